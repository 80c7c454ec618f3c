"""P11: ``rdzvctl exporter --all`` scraping 10,000 runs, unchanged and 1 % changed, and its steady RSS.

The runs are P4's (written in bulk in each backend's layout: every 50th with
dead participants, every 200th not base64).  One exporter process serves
them; a scrape is one HTTP GET of ``/metrics`` from this process, the whole
page read.  The baseline is the raw batched read the exporter does at each
scrape (``list(backend.list_runs())`` through rdzvctl's backend, in this
process, no decoding), so the ratio is what decoding, analysing and
formatting cost on top of the read.  For "1 % changed", 100 runs get a new
state (a new token) before each scrape, outside the timed window.

How the cost grows: a scrape is the batched read (O(runs on the backend)) +
one token comparison per run + one decode per changed run + the analysis
and the page, O(runs x series per run, about 16).  So unchanged and 1 %
changed cost nearly the same, and both grow linearly with the runs.  The
RSS row is the exporter's VmRSS after the scrapes (its cache holds one
decoded state per run, bounded by ``--max-runs``).
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from typing import Callable, List, Optional

from bench import p4_detect
from bench.context import Context, skip_row
from bench.measure import Row, median
from bench.servers import Target
from bench.states import state_bytes

ID = "P11"
ORDER = p4_detect.ORDER
RSS_LIMIT_MIB = 256.0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (steadier than wall time on a busy machine)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scrape(url: str, pid: int, cpu: List[float]) -> float:
    """One GET of the whole page: wall seconds; the exporter's CPU seconds go to ``cpu``."""
    before = _cpu_seconds(pid)
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as answer:
        answer.read()
    elapsed = time.perf_counter() - started
    cpu.append(_cpu_seconds(pid) - before)
    return elapsed


def _raw_read(target: Target, cpu: List[float]) -> Callable[[], float]:
    backend = target.open("")

    def once() -> float:
        started, cpu_started = time.perf_counter(), time.process_time()
        count = sum(1 for _ in backend.list_runs())
        elapsed = time.perf_counter() - started
        cpu.append(time.process_time() - cpu_started)
        if count < 1:
            raise RuntimeError(f"P11 {target.label}: the batched read found no runs")
        return elapsed

    once.backend = backend  # type: ignore[attr-defined]
    return once


def _backend_value(text: str, name: str) -> float:
    """A backend-wide sample of the page (one line; parsing the whole 10,000-run page would take seconds)."""
    match = re.search(rf"^{name}{{[^\n]*}} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"P11: no {name} on the exporter's page")
    return float(match.group(1))


def _rss_mib(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(ctx: Context) -> List[Row]:
    from tests.support.exporter import ExporterProcess

    s = ctx.settings
    count = s.runs
    changed = max(1, count // 100)
    repeats = max(3, s.repeats // 5)
    rows: List[Row] = []
    for label in ORDER:
        if label not in ctx.fleet.targets:
            if label in ctx.fleet.skipped:
                rows.append(skip_row(ID, f"exporter scrape, {count:,} runs", label, ctx.fleet.skipped[label]))
            continue
        target = p4_detect.target_for(ctx, label, "filestore-p11")
        ctx.log(f"P11 {label}: writing {count:,} runs")
        items = list(p4_detect.runs(count))
        p4_detect.populate(target, items)
        base_cpu: List[float] = []
        raw = _raw_read(target, base_cpu)
        flags = target.flags(None, p4_detect.KEEP_ALIVE)
        exporter = ExporterProcess(["--all", "--max-runs", str(count * 5), *flags], env=ctx.env, start_timeout=120)
        try:
            ctx.log(f"P11 {label}: first scrape")
            pid = exporter.process.pid
            first = _scrape(exporter.url, pid, [])  # decodes every run
            found = _backend_value(exporter.get()[1], "rdzvctl_runs")
            if found < count:
                raise RuntimeError(f"P11 {label}: the exporter saw {found} runs, {count} were written")
            ctx.log(f"P11 {label}: measuring")
            decodes = [_backend_value(exporter.get()[1], "rdzvctl_state_decodes_total")]
            unchanged, base, unchanged_cpu, some_cpu = [], [], [], []  # type: ignore[var-annotated]
            for _ in range(repeats):
                base.append(raw())
                unchanged.append(_scrape(exporter.url, pid, unchanged_cpu))
            decodes.append(_backend_value(exporter.get()[1], "rdzvctl_state_decodes_total"))
            some: List[float] = []
            for n in range(repeats):
                for i in range(0, count, count // changed):
                    target.write(f"bench-p4-{i:06d}", state_bytes(8, round_=n + 10))
                some.append(_scrape(exporter.url, pid, some_cpu))
            decodes.append(_backend_value(exporter.get()[1], "rdzvctl_state_decodes_total"))
            rss = _rss_mib(exporter.process.pid)
        finally:
            exporter.stop()
            raw.backend.close()  # type: ignore[attr-defined]
            p4_detect.remove(target, items, p4_detect.PREFIX)  # later benchmarks list only their own runs
        raw_s, raw_cpu = median(base), median(base_cpu)
        rows.append(Row(ID, f"exporter scrape, {count:,} runs unchanged", label, median(unchanged) * 1000,
                        raw_s * 1000, "ms", "-", cpu_ratio=median(unchanged_cpu) / raw_cpu if raw_cpu else None,
                        note=f"{decodes[1] - decodes[0]:,.0f} decodes in {repeats} scrapes; "
                        f"first scrape {first * 1000:,.0f} ms (all decoded)"))
        rows.append(Row(ID, f"exporter scrape, {count:,} runs, 1 % changed", label, median(some) * 1000,
                        raw_s * 1000, "ms", "-", cpu_ratio=median(some_cpu) / raw_cpu if raw_cpu else None,
                        note=f"{(decodes[2] - decodes[1]) / repeats:,.0f} decodes per scrape; exporter CPU "
                        f"{median(some_cpu) * 1000:,.0f} ms per scrape"))
        rows.append(Row(ID, f"exporter steady RSS, {count:,} runs", label, rss, None, "MiB",
                        f"<= {RSS_LIMIT_MIB:.0f} MiB", RSS_LIMIT_MIB, check="at_most"))
    return rows
