"""P8: ``list -o json`` and ``corrupt-detect --all -o json`` over 100,000 runs: streaming, memory, time.

The runs (P4's mix: every 50th with two dead participants, every 200th not
base64) are written straight to the server in bulk (:func:`bench.p4_detect.populate`:
redis pipelines, etcd v3 transactions of 1,000 puts, pipelined TCPStore SETs, one
FileStore file) and removed afterwards.  Each command is a fresh process whose
stdout is read as it comes (:func:`bench.measure.run_streamed`); per backend and
command three rows:

* the wall time against :mod:`bench.baseline` ``list`` (read every run in
  batches and unpickle it, no checks) on the same runs: at most 1.5x;
* when the first run's line arrived, over when the output ended: at most 0.1x
  (the output streams rather than coming at the end);
* the child's own peak RSS (``ru_maxrss`` through the launcher, as P7): at most 200 MiB.

Redis, etcd-v3 and c10d (TCPStore and FileStore); etcd-v2 lists with one
recursive GET and is not measured here.
"""

from __future__ import annotations

import json
import time
from typing import Dict, List

from bench import p4_detect
from bench.context import Context, cpu_ratio, skip_row
from bench.measure import Process, Row, Streamed, baseline_argv, median, rdzvctl_argv, run_once, run_streamed

ID = "P8"
TIME_LIMIT = 1.5
FIRST_LIMIT = 0.1
MIB = 200
PREFIX = "bench-p8"
ORDER = ("redis", "etcd-v3", "c10d-tcp", "c10d-file")
COMMANDS = {"list -o json": ["list", "-o", "json"], "corrupt-detect --all -o json": ["corrupt-detect", "--all", "-o", "json"]}
MARKER = b'"run_id"'  # one per run line in both documents


def _summary_runs(streamed: Streamed) -> int:
    """corrupt-detect's ``summary.runs``, from the document's last line (``],"summary":{...},...}``)."""
    last = streamed.tail.rstrip().rsplit(b"\n", 1)[-1]
    return int(json.loads(b"{" + last[2:])["summary"]["runs"])


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    count = s.many_runs
    repeats = 1 if s.quick else 3
    rows: List[Row] = []
    for label in ORDER:
        if label not in ctx.fleet.targets:
            if label in ctx.fleet.skipped:
                rows.append(skip_row(ID, f"list, corrupt-detect --all, {count:,} runs", label,
                                     ctx.fleet.skipped[label]))
            continue
        target = p4_detect.target_for(ctx, label, "filestore-p8")
        items = list(p4_detect.runs(count, PREFIX))
        started = time.monotonic()
        p4_detect.populate(target, items)
        ctx.log(f"P8 {label}: wrote {count:,} runs in {time.monotonic() - started:.1f} s; measuring")
        streamed: Dict[str, List[Streamed]] = {name: [] for name in COMMANDS}
        base: List[Process] = []
        try:
            for i in range(repeats):
                names = ["base", *COMMANDS]
                if i % 2:
                    names.reverse()  # nobody always goes first
                for name in names:
                    if name == "base":
                        base.append(run_once(baseline_argv("list", label, target.endpoint), ctx.env, timeout=900))
                    else:
                        argv = rdzvctl_argv() + COMMANDS[name] + target.flags(None, p4_detect.KEEP_ALIVE)
                        streamed[name].append(run_streamed(argv, ctx.env, MARKER, timeout=900, ok_codes=(0, 1, 6)))
        finally:
            p4_detect.remove(target, items, PREFIX)
        for name, results in streamed.items():
            last = results[-1]
            seen = _summary_runs(last) if name.startswith("corrupt-detect") else last.lines
            if seen != count or last.lines != count:
                raise RuntimeError(f"P8 {label}: {name} printed {last.lines} runs, {count} were written")
            procs = [r.process for r in results]
            ours = median([p.seconds for p in procs])
            theirs = median([p.seconds for p in base])
            what = f"{name}, {count:,} runs"
            rows.append(Row(ID, what, label, ours, theirs, "s", f"<= {TIME_LIMIT}x", TIME_LIMIT,
                            cpu_ratio=cpu_ratio(procs, base), note=f"{count / ours:,.0f} runs/s"))
            first = median([r.first if r.first is not None else r.total for r in results])
            rows.append(Row(ID, f"  {name}: first run line / whole output", label, first,
                            median([r.total for r in results]), "s", f"<= {FIRST_LIMIT}x", FIRST_LIMIT))
            rows.append(Row(ID, f"  {name}: peak RSS", label, median([p.max_rss_kib for p in procs]) / 1024,
                            median([p.max_rss_kib for p in base]) / 1024, "MiB", f"<= {MIB} MiB", MIB,
                            check="at_most"))
    return rows
