"""P7: peak memory (the child's own ``ru_maxrss``) of ``get -o json`` on the 4,096-node state.

Baseline: the same decode script as P3.  Reuses P3's processes when P3 ran.
"""

from __future__ import annotations

from typing import List

from bench import p3_large
from bench.context import Context
from bench.measure import Row, median, time_interleaved
from bench.servers import BACKENDS
from bench.states import state_bytes

ID = "P7"
LIMIT = 1.3


def run(ctx: Context) -> List[Row]:
    nodes = ctx.settings.large_nodes
    what = f"peak RSS of get -o json, {nodes} nodes"
    rows = ctx.skipped_rows(ID, what, list(BACKENDS))
    measured = ctx.shared.get("large", {})
    state = None
    for target in ctx.targets():
        timed = measured.get(target.label)
        if timed is None:
            ctx.log(f"P7 {target.label} ({nodes} nodes)")
            state = state or state_bytes(nodes)
            target.write(p3_large.RUN_ID, state)
            try:
                wanted = {k: v for k, v in p3_large.commands(target).items() if k != "table"}
                timed = time_interleaved(wanted, ctx.env, 1, 3)
            finally:
                target.clear(p3_large.RUN_ID)
        ours = median([p.max_rss_kib for p in timed["json"]]) / 1024
        base = median([p.max_rss_kib for p in timed["base"]]) / 1024
        rows.append(Row(ID, what, target.label, ours, base, "MiB", f"<= {LIMIT}x", LIMIT))
    return rows
