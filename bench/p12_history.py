"""P12: ``rdzvctl history`` over a long history, against a raw replay of the same versions.

The FileStore row: a log of 100,000 versions of one run's state (10,000 with
``--quick``), as torch's agents write it: mostly heartbeat-only rewrites of an
8-node state, a membership change every 1,000 versions, other keys' records
in between.  ``rdzvctl history -o json`` (the CLI, streaming the log) is timed
against the raw replay baseline: the same process reading the log with the
record parser and decoding every value with the safe codec, no diffing, no
output.  Both report versions/s; the peak RSS of ``history`` must stay bounded
whatever the length (it holds one version at a time).

The etcd-v3 row: 20,000 revisions of one run's key (2,000 with ``--quick``;
each is a PUT of its own, as torch's writes are), the same mix of
heartbeat-only and membership changes.  ``rdzvctl history`` (a watch from
revision 1, streamed) against the raw replay: the same watch read with
``http.client``, each value base64-decoded and decoded with the safe codec,
no diffing, no output.  Both are bounded below by etcd itself, which replays
a pending watch 1,000 revisions per 100 ms batch.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
from typing import Callable, Iterator, List

from bench.context import Context, cpu_ratio, ms, skip_row
from bench.measure import Row, median, rdzvctl_argv, time_interleaved

ID = "P12"
RATIO = 2.0  # history may cost at most this many times the raw replay
MIB = 128
NODES = 8
RUN_ID = "bench-history"

_RAW = """
import sys
from rdzvctl.backends.filestore_log import parse_records
from rdzvctl.state.codec import decode, decode_base64
key = b"/torch.rendezvous." + sys.argv[2].encode()
count = 0
rest = b""
with open(sys.argv[1], "rb") as f:
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        records, used = parse_records(rest + chunk)
        rest = (rest + chunk)[used:]
        for k, v in records:
            if k == key:
                decode(decode_base64(v))
                count += 1
print(count)
"""


_RAW_ETCD = """
import base64, http.client, json, sys
from rdzvctl.state.codec import decode
host, port, key = sys.argv[1], int(sys.argv[2]), base64.b64encode(sys.argv[3].encode()).decode()
conn = http.client.HTTPConnection(host, port, timeout=600)
conn.request("POST", "/v3/kv/range", json.dumps({"key": key}), {"Content-Type": "application/json"})
last = int(json.loads(conn.getresponse().read())["kvs"][0]["mod_revision"])
conn.request("POST", "/v3/watch", json.dumps({"create_request": {"key": key, "start_revision": 1}}),
             {"Content-Type": "application/json"})
answer, count, seen = conn.getresponse(), 0, 0
while seen < last:
    line = answer.readline()
    if not line:
        break
    for event in json.loads(line).get("result", {}).get("events", []):
        kv = event["kv"]
        seen = int(kv["mod_revision"])
        decode(base64.b64decode(base64.b64decode(kv["value"])))
        count += 1
print(count)
"""


def _versions(versions: int) -> Iterator[bytes]:
    """``versions`` pickled states of :data:`RUN_ID` (see the module docstring)."""
    from rdzvctl.state.codec import encode
    from rdzvctl.state.model import NodeDesc, RendezvousState

    t0 = _dt.datetime(2026, 11, 24, 22, 0, tzinfo=_dt.timezone.utc)
    nodes = [NodeDesc(f"trainer-{i}.cluster.local", 4100 + i, 0) for i in range(NODES)]
    state = RendezvousState(round=1, complete=True, participants={n: i for i, n in enumerate(nodes)},
                            last_heartbeats={n: t0 for n in nodes})
    spare = NodeDesc("trainer-spare.cluster.local", 5000, 0)
    for i in range(versions):
        when = t0 + _dt.timedelta(milliseconds=5 * i)
        if i % 1000 == 999:  # a membership change: the spare node joins, or leaves
            if spare in state.wait_list:
                state.wait_list.discard(spare)
                state.last_heartbeats.pop(spare, None)
            else:
                state.wait_list.add(spare)
                state.last_heartbeats[spare] = when
        else:  # one agent's keep-alive: only its heartbeat changes
            state.last_heartbeats[nodes[i % NODES]] = when
        yield encode(state)


def write_log(path: str, versions: int) -> None:
    """A FileStore log of ``versions`` states of :data:`RUN_ID` (see the module docstring)."""
    from rdzvctl.backends.filestore_log import encode_record
    from rdzvctl.state.codec import encode_base64

    key = f"/torch.rendezvous.{RUN_ID}".encode()
    with open(path, "wb") as f:
        for i, value in enumerate(_versions(versions)):
            f.write(encode_record(key, encode_base64(value)))
            if i % 100 == 0:
                f.write(encode_record(b"/torch.rendezvous.other.1/barrier", b"x" * 16))


def _filestore_rows(ctx: Context) -> List[Row]:
    versions = 10_000 if ctx.settings.quick else 100_000
    repeats = 1 if ctx.settings.quick else 3
    with tempfile.TemporaryDirectory(prefix="rdzvctl-p12-") as tmp:
        path = os.path.join(tmp, "rendezvous.store")
        ctx.log(f"P12 writing a {versions:,}-version FileStore log")
        write_log(path, versions)
        size = os.path.getsize(path) >> 20
        ours = [*rdzvctl_argv(), "history", "--rdzv-backend", "c10d", "--rdzv-endpoint", path,
                "--rdzv-id", RUN_ID, "--rdzv-conf", "store_type=file", "-o", "json", "--no-storm"]
        timed = time_interleaved({"history": ours, "raw": [sys.executable, "-c", _RAW, path, RUN_ID]},
                                 ctx.env, 1, repeats, timeout=600)
    out = timed["history"][0].stdout.decode()
    events = len(out.splitlines())
    t_ours, t_base = ms(timed["history"]), ms(timed["raw"])
    rss = median([p.max_rss_kib for p in timed["history"]]) / 1024
    base_rss = median([p.max_rss_kib for p in timed["raw"]]) / 1024
    what = f"history, {versions:,}-version FileStore log ({size} MiB)"
    return [
        Row(ID, what, "c10d-file", t_ours, t_base, "ms", f"<= {RATIO:g}x raw replay", RATIO,
            cpu_ratio=cpu_ratio(timed["history"], timed["raw"]),
            note=f"{versions / (t_ours / 1000):,.0f} vs {versions / (t_base / 1000):,.0f} versions/s; "
                 f"{events} events"),
        Row(ID, f"peak RSS, {what}", "c10d-file", rss, base_rss, "MiB", f"<= {MIB} MiB", MIB, check="at_most"),
    ]


def _etcd_v3_rows(ctx: Context) -> List[Row]:
    import base64
    import http.client
    import json
    import uuid

    versions = 2_000 if ctx.settings.quick else 20_000
    what = f"history, {versions:,} etcd-v3 revisions"
    if "etcd-v3" not in ctx.fleet.targets:
        return [skip_row(ID, what, "etcd-v3", ctx.fleet.skipped.get("etcd-v3", "no etcd server"))]
    target = ctx.fleet.targets["etcd-v3"]
    run_id = f"{RUN_ID}-{uuid.uuid4().hex[:8]}"
    key = f"/torch/elastic/rendezvous/{run_id}"
    ctx.log(f"P12 writing {versions:,} etcd-v3 revisions")
    conn = http.client.HTTPConnection(target.host, target.port, timeout=60)
    for value in _versions(versions):  # one PUT per version: each its own revision, as torch's writes are
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                           "value": base64.b64encode(base64.b64encode(value)).decode()})
        conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
    ours = [*rdzvctl_argv(), "history", *target.flags(run_id), "-o", "json", "--no-storm"]
    raw = [sys.executable, "-c", _RAW_ETCD, target.host, str(target.port), key]
    try:
        timed = time_interleaved({"history": ours, "raw": raw}, ctx.env, 1, 1 if ctx.settings.quick else 3,
                                 timeout=600)
    finally:
        conn.request("POST", "/v3/kv/deleterange", json.dumps({"key": base64.b64encode(key.encode()).decode()}),
                     {"Content-Type": "application/json"})
        conn.getresponse().read()
        conn.close()
    t_ours, t_base = ms(timed["history"]), ms(timed["raw"])
    rss = median([p.max_rss_kib for p in timed["history"]]) / 1024
    base_rss = median([p.max_rss_kib for p in timed["raw"]]) / 1024
    return [
        Row(ID, what, "etcd-v3", t_ours, t_base, "ms", f"<= {RATIO:g}x raw replay", RATIO,
            cpu_ratio=cpu_ratio(timed["history"], timed["raw"]),
            note=f"{versions / (t_ours / 1000):,.0f} vs {versions / (t_base / 1000):,.0f} versions/s"),
        Row(ID, f"peak RSS, {what}", "etcd-v3", rss, base_rss, "MiB", f"<= {MIB} MiB", MIB, check="at_most"),
    ]


#: One function per history source; each returns its rows (a skip row when its server is not up).
SOURCES: List[Callable[[Context], List[Row]]] = [_filestore_rows, _etcd_v3_rows]


def run(ctx: Context) -> List[Row]:
    rows: List[Row] = []
    for source in SOURCES:
        rows += source(ctx)
    return rows
