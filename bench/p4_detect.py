"""P4: ``corrupt-detect --all -o json`` over 10,000 runs -> runs/s, every backend.

The runs are written directly in each backend's layout, in bulk (redis
pipelines, etcd v3 transactions of 1,000 puts, parallel etcd v2 PUTs, pipelined
TCPStore SETs, one FileStore append).  Every 50th run has two dead
participants and every 200th is not base64, so every path of the check runs.
The target (>= 5,000 runs/s, process start-up included) applies to redis and
etcd-v3; the baseline (:mod:`bench.baseline` ``list``: read all in batches and
unpickle each, no checks) is shown for scale.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Tuple
from urllib.parse import urlencode

from bench.context import Context, cpu_ratio, skip_row
from bench.measure import Row, baseline_argv, median, rdzvctl_argv, time_interleaved
from bench.servers import Target
from bench.states import state_bytes

ID = "P4"
TARGET_RUNS_PER_S = 5000.0
GATED = ("redis", "etcd-v3")
ORDER = ("redis", "etcd-v3", "etcd-v2", "c10d-tcp", "c10d-file")
CORRUPT = b"this is not base64!"


def runs(count: int) -> Iterator[Tuple[str, bytes]]:
    """``(run_id, stored value)``: base64 of the pickle, or garbage for every 200th run."""
    healthy = base64.b64encode(state_bytes(8))
    dying = base64.b64encode(state_bytes(8, dead=2))
    for i in range(count):
        value = CORRUPT if i % 200 == 199 else dying if i % 50 == 49 else healthy
        yield f"bench-p4-{i:06d}", value


def _populate_redis(target: Target, count: int) -> None:
    client = target.server.client()
    items = list(runs(count))
    for start in range(0, count, 1000):
        pipe = client.pipeline(transaction=False)
        for n, (run_id, value) in enumerate(items[start:start + 1000], start + 1):
            pipe.hset(f"torch.rendezvous.{run_id}", mapping={"state": value, "version": n})
        pipe.execute()
    client.close()


def _post(conn: http.client.HTTPConnection, path: str, payload: Dict) -> Dict:
    conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
    answer = conn.getresponse()
    doc = json.loads(answer.read())
    if answer.status != 200:
        raise RuntimeError(f"{path}: HTTP {answer.status} {doc}")
    return doc


def _populate_etcd_v3(target: Target, count: int) -> None:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
    items = list(runs(count))
    for start in range(0, count, 1000):
        puts = [{"request_put": {"key": base64.b64encode(f"/torch/elastic/rendezvous/{run_id}".encode()).decode(),
                                 "value": base64.b64encode(value).decode()}}
                for run_id, value in items[start:start + 1000]]
        _post(conn, "/v3/kv/txn", {"success": puts})
    conn.close()


def _populate_etcd_v2(target: Target, count: int) -> None:
    items = list(runs(count))
    workers = 16

    def put(part: List[Tuple[str, bytes]]) -> None:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
        for run_id, value in part:
            body = urlencode({"value": value})
            conn.request("PUT", f"/v2/keys/torch/elastic/rendezvous/{run_id}", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
            answer = conn.getresponse()
            answer.read()
            if answer.status not in (200, 201):
                raise RuntimeError(f"etcd v2 PUT {run_id}: HTTP {answer.status}")
        conn.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, [items[i::workers] for i in range(workers)]))


def _populate_tcpstore(target: Target, count: int) -> None:
    with socket.create_connection((target.host, target.port), timeout=60) as sock:
        sock.sendall(struct.pack("<BI", 0, 0x3C85F7CE))  # VALIDATE
        chunk = []
        for run_id, value in runs(count):
            key = f"/torch.rendezvous.{run_id}".encode()
            chunk.append(struct.pack("<BQ", 1, len(key)) + key + struct.pack("<Q", len(value)) + value)  # SET
            if len(chunk) == 500:
                sock.sendall(b"".join(chunk))
                chunk = []
        sock.sendall(b"".join(chunk) + struct.pack("<BI", 13, 7))  # PING: every SET before it is done
        echo = b""
        while len(echo) < 4:
            echo += sock.recv(4 - len(echo))


def _populate_filestore(path: str, count: int) -> None:
    from rdzvctl.backends.filestore import encode_record

    with open(path, "wb") as f:
        f.write(b"".join(encode_record(f"/torch.rendezvous.{run_id}".encode(), value) for run_id, value in runs(count)))


def _target_for(ctx: Context, label: str) -> Target:
    """The P4 target: c10d-file gets a FileStore of its own, so other benchmarks keep a small log."""
    target = ctx.fleet.targets[label]
    if label == "c10d-file":
        path = os.path.join(ctx.fleet.root, "filestore-p4")
        return Target(label, target.backend, path, dict(target.conf))
    return target


def _populate(target: Target, count: int) -> None:
    if target.label == "redis":
        _populate_redis(target, count)
    elif target.label == "etcd-v3":
        _populate_etcd_v3(target, count)
    elif target.label == "etcd-v2":
        _populate_etcd_v2(target, count)
    elif target.label == "c10d-tcp":
        _populate_tcpstore(target, count)
    elif target.label == "c10d-file":
        _populate_filestore(target.endpoint, count)


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    count = s.runs
    what = f"corrupt-detect --all -o json, {count:,} runs"
    rows: List[Row] = []
    repeats = max(3, s.repeats // 4)
    for label in ORDER:
        gated = label in GATED and not s.quick  # 1,000 runs: start-up dominates, the rate means little
        if label not in ctx.fleet.targets:
            if label in ctx.fleet.skipped:
                rows.append(skip_row(ID, what, label, ctx.fleet.skipped[label]))
            continue
        target = _target_for(ctx, label)
        ctx.log(f"P4 {label}: writing {count:,} runs")
        _populate(target, count)
        ctx.log(f"P4 {label}: measuring")
        commands = {
            "ours": rdzvctl_argv() + ["corrupt-detect", "--all", "-o", "json"] + target.flags(None),
            "base": baseline_argv("list", label, target.endpoint),
        }
        timed = time_interleaved(commands, ctx.env, 1, repeats, ok_codes=(0, 1, 6), timeout=300)
        found = json.loads(timed["ours"][-1].stdout)["summary"]["runs"]
        if found != count:
            raise RuntimeError(f"P4 {label}: corrupt-detect saw {found} runs, {count} were written")
        ours = count / median([p.seconds for p in timed["ours"]])
        base = count / median([p.seconds for p in timed["base"]])
        per_cpu = count / median([p.cpu for p in timed["ours"]])
        rows.append(Row(ID, what, label, ours, base, "runs/s",
                        f">= {TARGET_RUNS_PER_S:,.0f}/s" if gated else "-",
                        TARGET_RUNS_PER_S if gated else None, check="at_least",
                        cpu_ratio=cpu_ratio(timed["ours"], timed["base"]),
                        note=f"{per_cpu:,.0f} runs per CPU-second"))
    return rows
