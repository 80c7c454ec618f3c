"""P3: ``get -o json`` and the plain table view on a 4,096-node state, every backend.

Baseline: :mod:`bench.baseline` ``get`` (read, allow-list unpickle,
``json.dumps``).  The processes' peak RSS is kept for P7.
"""

from __future__ import annotations

from typing import Dict, List

from bench.context import Context, cpu_ratio, ms
from bench.measure import Row, baseline_argv, rdzvctl_argv, time_interleaved
from bench.servers import BACKENDS, Target
from bench.states import state_bytes

ID = "P3"
RUN_ID = "bench-large"
JSON_LIMIT = 1.3
TABLE_LIMIT = 1.6


#: The state's heartbeats stay fresh however long the benchmark takes (torch's expiry is
#: interval x max_attempt, 15 s by default): a live job is measured, not one dying midway.
FRESH = "keep_alive_interval=3600"


def commands(target: Target, run_id: str = RUN_ID) -> Dict[str, List[str]]:
    return {
        "json": rdzvctl_argv() + ["get", "-o", "json"] + target.flags(run_id, FRESH),
        "table": rdzvctl_argv() + ["get"] + target.flags(run_id, FRESH),
        "base": baseline_argv("get", target.label, target.endpoint, run_id),
    }


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    nodes = s.large_nodes
    rows = ctx.skipped_rows(ID, f"get, {nodes} nodes", list(BACKENDS))
    state = state_bytes(nodes)
    repeats = max(3, s.repeats // 2)
    for target in ctx.targets():
        ctx.log(f"P3 {target.label} ({nodes} nodes)")
        target.write(RUN_ID, state)
        try:
            timed = time_interleaved(commands(target), ctx.env, 1, repeats)
        finally:
            target.clear(RUN_ID)
        ctx.shared.setdefault("large", {})[target.label] = timed
        base = ms(timed["base"])
        rows.append(Row(ID, f"get -o json, {nodes} nodes", target.label, ms(timed["json"]), base, "ms",
                        f"<= {JSON_LIMIT}x", JSON_LIMIT, cpu_ratio=cpu_ratio(timed["json"], timed["base"])))
        rows.append(Row(ID, f"get (plain table), {nodes} nodes", target.label, ms(timed["table"]), base, "ms",
                        f"<= {TABLE_LIMIT}x", TABLE_LIMIT, cpu_ratio=cpu_ratio(timed["table"], timed["base"])))
    return rows
