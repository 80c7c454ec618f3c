"""P4: ``corrupt-detect --all -o json`` over 10,000 runs, every backend, against the raw batched read.

The runs are written directly in each backend's layout, in bulk (redis
pipelines, etcd v3 transactions of 1,000 puts, parallel etcd v2 PUTs, pipelined
TCPStore SETs, one FileStore append), and removed the same way afterwards.
Every 50th run has two dead participants and every 200th is not base64, so
every path of the check runs.  The target is a ratio: rdzvctl's time (process
start-up included) at most 1.5x the baseline's (:mod:`bench.baseline`
``list``: read all in batches and unpickle each, no checks), on every backend;
runs/s and runs per CPU-second are printed for information.
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
LIMIT = 1.5
PREFIX = "bench-p4"
ORDER = ("redis", "etcd-v3", "etcd-v2", "c10d-tcp", "c10d-file")
CORRUPT = b"this is not base64!"
#: The runs' heartbeats are 1 s old when written and the dead nodes' an hour: at torch's default
#: expiry (5 s x 3) every node is dead 15 s into a measurement, which then describes a fleet of
#: dying runs instead of P4's mix.  A 10-minute interval (30-minute expiry) keeps the mix as written.
KEEP_ALIVE = "keep_alive_interval=600"


def runs(count: int, prefix: str = PREFIX) -> Iterator[Tuple[str, bytes]]:
    """``(run_id, stored value)``: base64 of the pickle, or garbage for every 200th run."""
    healthy = base64.b64encode(state_bytes(8))
    dying = base64.b64encode(state_bytes(8, dead=2))
    for i in range(count):
        value = CORRUPT if i % 200 == 199 else dying if i % 50 == 49 else healthy
        yield f"{prefix}-{i:06d}", value


def _populate_redis(target: Target, items: List[Tuple[str, bytes]]) -> None:
    client = target.server.client()
    for start in range(0, len(items), 1000):
        pipe = client.pipeline(transaction=False)
        for n, (run_id, value) in enumerate(items[start:start + 1000], start + 1):
            pipe.hset(f"torch.rendezvous.{run_id}", mapping={"state": value, "version": n})
        pipe.execute()
    client.close()


def _remove_redis(target: Target, items: List[Tuple[str, bytes]]) -> None:
    client = target.server.client()
    for start in range(0, len(items), 1000):
        client.delete(*(f"torch.rendezvous.{run_id}" for run_id, _ in items[start:start + 1000]))
    client.close()


def _post(conn: http.client.HTTPConnection, path: str, payload: Dict) -> Dict:
    conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
    answer = conn.getresponse()
    doc = json.loads(answer.read())
    if answer.status != 200:
        raise RuntimeError(f"{path}: HTTP {answer.status} {doc}")
    return doc


def _populate_etcd_v3(target: Target, items: List[Tuple[str, bytes]]) -> None:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
    for start in range(0, len(items), 1000):
        puts = [{"request_put": {"key": base64.b64encode(f"/torch/elastic/rendezvous/{run_id}".encode()).decode(),
                                 "value": base64.b64encode(value).decode()}}
                for run_id, value in items[start:start + 1000]]
        _post(conn, "/v3/kv/txn", {"success": puts})
    conn.close()


def _remove_etcd_v3(target: Target, prefix: str) -> None:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
    key = f"/torch/elastic/rendezvous/{prefix}-".encode()
    end = key[:-1] + bytes([key[-1] + 1])
    _post(conn, "/v3/kv/deleterange", {"key": base64.b64encode(key).decode(),
                                       "range_end": base64.b64encode(end).decode()})
    conn.close()


def _etcd_v2_each(target: Target, items: List[Tuple[str, bytes]], method: str) -> None:
    workers = 16

    def each(part: List[Tuple[str, bytes]]) -> None:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
        for run_id, value in part:
            body = urlencode({"value": value}) if method == "PUT" else None
            conn.request(method, f"/v2/keys/torch/elastic/rendezvous/{run_id}", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
            answer = conn.getresponse()
            answer.read()
            if answer.status not in (200, 201):
                raise RuntimeError(f"etcd v2 {method} {run_id}: HTTP {answer.status}")
        conn.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(each, [items[i::workers] for i in range(workers)]))


def _tcpstore_send(target: Target, records: Iterator[bytes], reply_bytes: int = 0) -> None:
    """Pipelined requests, then a PING: when its echo arrives (after ``reply_bytes`` of replies to the
    requests), the server has done every request."""
    with socket.create_connection((target.host, target.port), timeout=60) as sock:
        sock.sendall(struct.pack("<BI", 0, 0x3C85F7CE))  # VALIDATE
        chunk: List[bytes] = []
        for record in records:
            chunk.append(record)
            if len(chunk) == 500:
                sock.sendall(b"".join(chunk))
                chunk = []
        sock.sendall(b"".join(chunk) + struct.pack("<BI", 13, 7))  # PING
        left = reply_bytes + 4
        while left:
            part = sock.recv(min(left, 1 << 16))
            if not part:
                raise RuntimeError("the TCPStore closed the connection")
            left -= len(part)


def _populate_tcpstore(target: Target, items: List[Tuple[str, bytes]]) -> None:
    def sets() -> Iterator[bytes]:
        for run_id, value in items:
            key = f"/torch.rendezvous.{run_id}".encode()
            yield struct.pack("<BQ", 1, len(key)) + key + struct.pack("<Q", len(value)) + value  # SET

    _tcpstore_send(target, sets())


def _remove_tcpstore(target: Target, items: List[Tuple[str, bytes]]) -> None:
    def deletes() -> Iterator[bytes]:
        for run_id, _ in items:
            key = f"/torch.rendezvous.{run_id}".encode()
            yield struct.pack("<BQ", 8, len(key)) + key  # DELETE_KEY (replies a u64)

    _tcpstore_send(target, deletes(), 8 * len(items))


def _populate_filestore(path: str, items: List[Tuple[str, bytes]]) -> None:
    from rdzvctl.backends.filestore_log import encode_record

    with open(path, "wb") as f:
        f.write(b"".join(encode_record(f"/torch.rendezvous.{run_id}".encode(), value) for run_id, value in items))


def target_for(ctx: Context, label: str, name: str) -> Target:
    """The target of ``label``: c10d-file gets a FileStore ``name`` of its own, so other benchmarks keep
    a small log."""
    target = ctx.fleet.targets[label]
    if label == "c10d-file":
        return Target(label, target.backend, os.path.join(ctx.fleet.root, name), dict(target.conf))
    return target


def populate(target: Target, items: List[Tuple[str, bytes]]) -> None:
    """Write ``items`` (see :func:`runs`) straight to the server, in bulk."""
    if target.label == "redis":
        _populate_redis(target, items)
    elif target.label == "etcd-v3":
        _populate_etcd_v3(target, items)
    elif target.label == "etcd-v2":
        _etcd_v2_each(target, items, "PUT")
    elif target.label == "c10d-tcp":
        _populate_tcpstore(target, items)
    elif target.label == "c10d-file":
        _populate_filestore(target.endpoint, items)


def remove(target: Target, items: List[Tuple[str, bytes]], prefix: str) -> None:
    """Remove what :func:`populate` wrote, so later listings see only their own runs."""
    if target.label == "redis":
        _remove_redis(target, items)
    elif target.label == "etcd-v3":
        _remove_etcd_v3(target, prefix)
    elif target.label == "etcd-v2":
        _etcd_v2_each(target, items, "DELETE")
    elif target.label == "c10d-tcp":
        _remove_tcpstore(target, items)
    elif target.label == "c10d-file":
        os.unlink(target.endpoint)


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    count = s.runs
    what = f"corrupt-detect --all -o json, {count:,} runs"
    rows: List[Row] = []
    repeats = max(3, s.repeats // 4)
    for label in ORDER:
        if label not in ctx.fleet.targets:
            if label in ctx.fleet.skipped:
                rows.append(skip_row(ID, what, label, ctx.fleet.skipped[label]))
            continue
        target = target_for(ctx, label, "filestore-p4")
        items = list(runs(count))
        ctx.log(f"P4 {label}: writing {count:,} runs")
        populate(target, items)
        try:
            ctx.log(f"P4 {label}: measuring")
            commands = {
                "ours": rdzvctl_argv() + ["corrupt-detect", "--all", "-o", "json"] + target.flags(None, KEEP_ALIVE),
                "base": baseline_argv("list", label, target.endpoint),
            }
            timed = time_interleaved(commands, ctx.env, 1, repeats, ok_codes=(0, 1, 6), timeout=300)
        finally:
            remove(target, items, PREFIX)
        found = json.loads(timed["ours"][-1].stdout)["summary"]["runs"]
        if found != count:
            raise RuntimeError(f"P4 {label}: corrupt-detect saw {found} runs, {count} were written")
        ours = count / median([p.seconds for p in timed["ours"]])
        base = count / median([p.seconds for p in timed["base"]])
        per_cpu = count / median([p.cpu for p in timed["ours"]])
        rows.append(Row(ID, what, label, ours, base, "runs/s", f"<= {LIMIT}x", LIMIT, check="rate",
                        cpu_ratio=cpu_ratio(timed["ours"], timed["base"]),
                        note=f"{per_cpu:,.0f} runs per CPU-second"))
    return rows
