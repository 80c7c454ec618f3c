"""P9: a 65,536-node state: ``get -o json``, the plain table, peak RSS, and ``watch`` decoding once per version.

Baseline: :mod:`bench.baseline` ``get`` (read, allow-list unpickle,
``json.dumps``), as in P3.  The state is 5.9 MB of pickle (about 90 bytes a
node), under the codec's 16 MiB cap (``rdzvctl.state.codec.MAX_STATE_BYTES``).

The watch row runs :func:`rdzvctl.follow.follow` (what ``rdzvctl watch``
prints from) in a child process while this process writes new versions.
The child counts, with wrappers installed by this benchmark only, the states
the backend's watch delivered and the calls of the codec's one decoding
function (``codec._decode``, behind ``decode`` and ``check_writable``, in
every thread): each delivered version should be decoded exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import List

from bench.context import Context, cpu_ratio, ms
from bench.measure import REPO, Row, median, time_interleaved
from bench.p3_large import commands
from bench.servers import BACKENDS, Target
from bench.states import state_bytes

ID = "P9"
RUN_ID = "bench-huge"
JSON_LIMIT = 1.5
TABLE_LIMIT = 2.0
RSS_LIMIT = 2.0

_WATCHER = r"""
import json, sys
from rdzvctl.state import codec

calls = [0]
_decode = codec._decode


def counted(data):
    calls[0] += 1
    return _decode(data)


codec._decode = counted
from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from rdzvctl.follow import follow

backend_name, endpoint, run_id, conf, last_round = sys.argv[1:6]
delivered = [0]
with open_backend(Address(backend_name, endpoint, run_id, json.loads(conf), 60.0)) as backend:
    watch = backend.watch

    def counting_watch(*args, **kwargs):
        for item in watch(*args, **kwargs):
            delivered[0] += 1
            yield item

    backend.watch = counting_watch
    for event in follow(backend, interval=0.1, until=f"round>={last_round}", duration=300):
        if event["kind"] == "snapshot":
            print("ready", flush=True)
print(json.dumps({"decodes": calls[0], "versions": delivered[0]}), flush=True)
"""


def watch_decodes(ctx: Context, target: Target, nodes: int, versions: int) -> Row:
    """Write ``versions`` new rounds while a child follows the run; decodes per delivered version."""
    what = f"watch: decodes per new version, {nodes} nodes"
    states = [state_bytes(nodes, round_=2 + i) for i in range(versions)]
    env = dict(ctx.env)
    child = subprocess.Popen([sys.executable, "-c", _WATCHER, target.backend, target.endpoint, RUN_ID,
                              json.dumps(target.conf), str(1 + versions)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the watcher did not start: {child.communicate(timeout=60)[1][-2000:]}")
        for state in states:
            target.write(RUN_ID, state)
            time.sleep(0.5)  # a polled backend (c10d: every 0.1 s) sees each version
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"the watcher failed (exit {child.returncode}): {err[-2000:]}")
    counts = json.loads(out.strip().splitlines()[-1])
    # At most one decode per version written (the first one included); a polled backend
    # may skip a version written between two polls, never decode one twice.
    return Row(ID, what, target.label, float(counts["decodes"]), float(versions + 1), "decodes", "<= 1 per version",
               1.0, note=f"{counts['decodes']} decodes, {counts['versions']} versions delivered of "
                         f"{versions + 1} written")


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    nodes = s.huge_nodes
    rows = ctx.skipped_rows(ID, f"get, {nodes} nodes", list(BACKENDS))
    state = state_bytes(nodes)
    ctx.log(f"P9 state: {nodes} nodes, {len(state):,} bytes of pickle")
    repeats = max(3, s.repeats // 5)
    for target in ctx.targets():
        ctx.log(f"P9 {target.label} ({nodes} nodes)")
        target.write(RUN_ID, state)
        try:
            timed = time_interleaved(commands(target, RUN_ID), ctx.env, 1, repeats, timeout=300)
            base = ms(timed["base"])
            rows.append(Row(ID, f"get -o json, {nodes} nodes", target.label, ms(timed["json"]), base, "ms",
                            f"<= {JSON_LIMIT}x", JSON_LIMIT, cpu_ratio=cpu_ratio(timed["json"], timed["base"])))
            rows.append(Row(ID, f"get (plain table), {nodes} nodes", target.label, ms(timed["table"]), base, "ms",
                            f"<= {TABLE_LIMIT}x", TABLE_LIMIT, cpu_ratio=cpu_ratio(timed["table"], timed["base"])))
            rss = {k: median([p.max_rss_kib for p in v]) / 1024 for k, v in timed.items()}
            rows.append(Row(ID, f"peak RSS of get -o json, {nodes} nodes", target.label, rss["json"], rss["base"],
                            "MiB", f"<= {RSS_LIMIT}x", RSS_LIMIT))
            ctx.log(f"P9 {target.label} watch")
            rows.append(watch_decodes(ctx, target, nodes, s.watch_versions))
        finally:
            target.clear(RUN_ID)
    return rows
