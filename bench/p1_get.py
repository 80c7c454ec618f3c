"""P1: ``rdzvctl get -o json`` as a fresh process on an 8-node state, every backend.

Baseline: :mod:`bench.baseline` ``get`` (click imported, same client library,
allow-list unpickle, JSON printed).  The server's own CLI (``redis-cli HGET``,
``etcdctl get``) is timed for reference: it reads the raw value only.
"""

from __future__ import annotations

import sys
from typing import List

from bench.context import Context, cpu_ratio, ms
from bench.measure import Row, baseline_argv, rdzvctl_argv, time_interleaved
from bench.p3_large import FRESH
from bench.servers import BACKENDS
from bench.states import state_bytes

ID = "P1"
WHAT = "get -o json, 8 nodes, fresh process"
RUN_ID = "bench-p1"
LIMIT = 1.2

#: What the client library's own import costs, timed beside the redis rows: redis-py 8's
#: sync client imports ``redis.asyncio`` (``redis.commands.core`` needs its recorder), so
#: ``asyncio`` is loaded whichever of redis's modules is imported first.
IMPORTS = {"redis": [("import redis", "import redis"), ("import asyncio", "import asyncio")]}


def run(ctx: Context) -> List[Row]:
    rows = ctx.skipped_rows(ID, WHAT, list(BACKENDS))
    state = state_bytes(ctx.settings.small_nodes)
    s = ctx.settings
    for target in ctx.targets():
        ctx.log(f"P1 {target.label}")
        target.write(RUN_ID, state)
        commands = {
            "ours": rdzvctl_argv() + ["get", "-o", "json"] + target.flags(RUN_ID, FRESH),
            "base": baseline_argv("get", target.label, target.endpoint, RUN_ID),
        }
        envs = {}
        reference = target.reference_read(RUN_ID)
        if reference is not None:
            commands["ref"] = reference.argv
            envs["ref"] = dict(ctx.env, **reference.env)
        for name, code in IMPORTS.get(target.label, []):
            commands[name] = [sys.executable, "-c", code]
        try:
            timed = time_interleaved(commands, ctx.env, s.warmup, s.repeats, envs=envs)
        finally:
            target.clear(RUN_ID)
        rows.append(Row(ID, WHAT, target.label, ms(timed["ours"]), ms(timed["base"]), "ms", f"<= {LIMIT}x", LIMIT,
                        cpu_ratio=cpu_ratio(timed["ours"], timed["base"])))
        if reference is not None:
            rows.append(Row(ID, f"  ref: {reference.name} (raw value only)", target.label, ms(timed["ref"]),
                            ms(timed["base"]), "ms", "-", verdict="ref"))
        for name, code in IMPORTS.get(target.label, []):
            rows.append(Row(ID, f"  ref: python -c {code!r} (both sides pay it)", target.label, ms(timed[name]),
                            ms(timed["base"]), "ms", "-", verdict="ref", cpu_ratio=cpu_ratio(timed[name], timed["base"])))
    return rows
