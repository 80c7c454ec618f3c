"""Run the selected benchmarks and print one table.

    python -m bench                  # everything (15-20 minutes; P8 about 9)
    python -m bench --quick          # smoke run: few repetitions, small sizes
    python -m bench --only P1,P3     # some benchmarks
    python -m bench --backends redis,etcd-v3
    python -m bench --only P4,P8 --runs 2000 --many-runs 20000   # smaller fleets
    python -m bench --markdown       # the table as Markdown (docs/performance.md)

Progress goes to stderr, the table to stdout.  Exit 0 when every selected
benchmark ran (targets missed or not; ``--strict`` makes a miss exit 1), 2
when one failed to run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
import traceback
from typing import Callable, Dict, List, Optional

from bench.context import Context
from bench.measure import Row, Settings, bench_env
from bench.servers import BACKENDS, Fleet

#: Benchmark id -> module; the order is the order they run in (P6 imports torch: last).
ORDER = ("P2", "P1", "P3", "P7", "P9", "P5", "P4", "P8", "P10", "P11", "P12", "P6")
MODULES = {
    "P1": "bench.p1_get",
    "P2": "bench.p2_startup",
    "P3": "bench.p3_large",
    "P4": "bench.p4_detect",
    "P5": "bench.p5_watch",
    "P6": "bench.p6_tcpstore",
    "P7": "bench.p7_memory",
    "P8": "bench.p8_runs",
    "P9": "bench.p9_huge",
    "P10": "bench.p10_bounded",
    "P11": "bench.p11_exporter",
    "P12": "bench.p12_history",
}
NEEDS_SERVERS = {"P1", "P3", "P4", "P5", "P7", "P8", "P9", "P11", "P12"}
COLUMNS = ("id", "what", "backend", "rdzvctl", "baseline", "ratio", "cpu ratio", "target", "verdict")


def _value(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "runs/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit in ("ms", "us") and value >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def cells(row: Row) -> List[str]:
    ratio = row.ratio
    verdict = row.verdict + (f" ({row.note})" if row.note else "")
    return [row.id, row.what, row.backend, _value(row.ours, row.unit), _value(row.base, row.unit),
            "-" if ratio is None else f"{ratio:.2f}x", "-" if row.cpu_ratio is None else f"{row.cpu_ratio:.2f}x",
            row.target, verdict]


def format_table(rows: List[Row], markdown: bool = False) -> str:
    table = [list(COLUMNS)] + [cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="rdzvctl's benchmarks (P1-P12).")
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions, small sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmark ids, e.g. P1,P3")
    parser.add_argument("--backends", default="", help=f"comma-separated subset of {', '.join(BACKENDS)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--runs", type=int, metavar="N", help="runs on each backend for P4 (default 10,000)")
    parser.add_argument("--many-runs", type=int, metavar="N", help="runs on each backend for P8 (default 100,000)")
    args = parser.parse_args(argv)
    args.only = [x.strip().upper() for x in args.only.split(",") if x.strip()] or list(MODULES)
    unknown = [x for x in args.only if x not in MODULES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.backends = [x.strip() for x in args.backends.split(",") if x.strip()] or list(BACKENDS)
    unknown = [x for x in args.backends if x not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    import importlib

    args = parse_args(argv)
    settings = Settings.make(args.quick)
    if args.runs:
        settings.runs = args.runs
    if args.many_runs:
        settings.many_runs = args.many_runs
    selected = [b for b in ORDER if b in args.only]
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    rows: List[Row] = []
    failed = False
    fleet = Fleet(args.backends if NEEDS_SERVERS & set(selected) else [])
    with fleet:
        ctx = Context(settings, fleet, bench_env(os.path.join(fleet.root, "pycache")))
        if fleet.wanted:
            ctx.log(f"servers up: {', '.join(fleet.targets) or 'none'}"
                    + (f"; skipped: {', '.join(fleet.skipped)}" if fleet.skipped else ""))
        for bench_id in selected:
            run: Callable[[Context], List[Row]] = importlib.import_module(MODULES[bench_id]).run
            try:
                rows += [r.finish() for r in run(ctx)]
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                failed = True
                traceback.print_exc()
                rows.append(Row(bench_id, "(failed to run)", "-", None, None, "", "-", verdict="ERROR",
                                note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    rows.sort(key=lambda r: (r.id, _backend_order(r.backend)))
    elapsed = time.monotonic() - started
    header = (f"rdzvctl benchmarks ({'quick' if args.quick else 'full'}), "
              f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, {elapsed:.0f} s")
    print(header if not args.markdown else f"_{header}_\n")
    print(format_table(rows, args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [dict(vars(r), ratio=r.ratio) for r in rows]}, f, indent=2)
    missed = any(r.verdict == "MISSED" for r in rows)
    if failed:
        return 2
    return 1 if (missed and args.strict) else 0


def _backend_order(label: str) -> int:
    order: Dict[str, int] = {name: i for i, name in enumerate(BACKENDS)}
    return order.get(label, -1)
