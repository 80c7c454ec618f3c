"""Timing primitives: one-shot processes (wall time, peak RSS), medians, result rows."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Row",
    "Settings",
    "Process",
    "run_once",
    "run_streamed",
    "Streamed",
    "time_interleaved",
    "median",
    "percentile",
    "bench_env",
    "rdzvctl_argv",
    "baseline_argv",
    "REPO",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Settings:
    """How hard to measure: ``quick`` is a smoke run."""

    quick: bool = False
    warmup: int = 2
    repeats: int = 25
    large_nodes: int = 4096
    huge_nodes: int = 65536
    watch_versions: int = 3
    small_nodes: int = 8
    runs: int = 10000
    many_runs: int = 100_000  # P8
    watch_events: int = 100
    tcp_samples: int = 20000

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, warmup=1, repeats=3, large_nodes=512, huge_nodes=2048, watch_versions=2,
                       runs=1000, many_runs=2000, watch_events=8, tcp_samples=2000)
        return cls()


@dataclass
class Row:
    """One line of the result table."""

    id: str
    what: str
    backend: str
    ours: Optional[float]  # the measured value of rdzvctl
    base: Optional[float]  # the baseline's, same unit
    unit: str  # "ms", "us", "MiB", "runs/s"
    target: str  # shown as is, e.g. "<= 1.3x"
    limit: Optional[float] = None  # see ``check``
    # ratio: ours/base <= limit; rate: base/ours <= limit (rates: above 1 is slower);
    # at_most: ours <= limit; at_least: ours >= limit
    check: str = "ratio"
    verdict: str = ""  # filled by finish() unless set (ref, info, skip ...)
    note: str = ""
    cpu_ratio: Optional[float] = None  # rdzvctl's CPU time / the baseline's (processes only)

    @property
    def ratio(self) -> Optional[float]:
        """How many times slower (or bigger) rdzvctl is than the baseline."""
        if not self.ours or not self.base:
            return None
        return self.base / self.ours if self.check in ("at_least", "rate") else self.ours / self.base

    def finish(self) -> "Row":
        if self.verdict:
            return self
        if self.limit is None or self.ours is None:
            self.verdict = "info"
            return self
        if self.check == "at_least":
            met = self.ours >= self.limit
        elif self.check == "at_most":
            met = self.ours <= self.limit
        else:
            met = self.ratio is not None and self.ratio <= self.limit
        self.verdict = "ok" if met else "MISSED"
        return self


@dataclass
class Process:
    """One finished child: wall time (s), peak RSS (KiB), exit code, output, CPU time (s)."""

    seconds: float
    max_rss_kib: int
    returncode: int
    stdout: bytes
    stderr: bytes
    cpu: float = 0.0


def bench_env(pycache: str, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A user's environment: no rendezvous variables leaking in, no colour, repo importable.

    Byte-code is cached (in ``pycache``, outside the source tree) like in an
    installed package, even where ``PYTHONDONTWRITEBYTECODE`` is set: otherwise
    every run would compile rdzvctl from source.  Output is buffered as usual.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RDZVCTL_", "PET_RDZV_"))
           and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME")}
    env["PYTHONPYCACHEPREFIX"] = pycache
    env["NO_COLOR"] = "1"
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def rdzvctl_argv() -> List[str]:
    """The installed ``rdzvctl`` console script next to this interpreter (not a shell shim)."""
    script = os.path.join(os.path.dirname(sys.executable), "rdzvctl")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "rdzvctl"]


def baseline_argv(*args: str) -> List[str]:
    """The minimal baseline script (:mod:`bench.baseline`) with its arguments."""
    return [sys.executable, "-c", "import sys; from bench.baseline import main; sys.exit(main())", *args]


# Spawns the measured command and reports its wall time and own peak RSS on fd argv[1].
# Linux carries the RSS high-water mark across fork/vfork + exec, so a child spawned
# straight from this (big) process would report at least this process's RSS; the
# launcher is a small ``python -I -S`` whose mark is below any measured command's.
_LAUNCHER = """
import os, signal, sys, time
fd, limit, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
signal.setitimer(signal.ITIMER_REAL, limit)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
cpu = usage.ru_utime + usage.ru_stime
os.write(fd, f"{seconds!r} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {cpu!r}".encode())
"""


def run_once(argv: Sequence[str], env: Mapping[str, str], timeout: float = 120.0,
             ok_codes: Tuple[int, ...] = (0,)) -> Process:
    """Run ``argv`` to completion: its wall time from spawn to reaped, and its own peak RSS."""
    read_end, write_end = os.pipe()
    try:
        with tempfile.TemporaryFile() as errfile:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(write_end), str(timeout), *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile, env=dict(env), cwd=REPO,
                pass_fds=(write_end,),
            )
            os.close(write_end)
            write_end = -1
            out, _ = proc.communicate(timeout=timeout + 10)
            report = os.read(read_end, 200).decode()
            errfile.seek(0)
            err = errfile.read()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    return _process(argv, report, out, err, timeout, ok_codes)


def _process(argv: Sequence[str], report: str, out: bytes, err: bytes, timeout: float,
             ok_codes: Iterable[int]) -> "Process":
    """The launcher's report (wall seconds, peak RSS, exit code, CPU seconds) as a Process, or why it failed."""
    if not report:
        raise RuntimeError(f"could not run {' '.join(argv)}: {err.decode(errors='replace')[-2000:]}")
    seconds, rss, code, cpu = report.split()
    if int(code) == -signal.SIGKILL:
        raise RuntimeError(f"timed out after {timeout:g} s: {' '.join(argv)}")
    if int(code) not in ok_codes:
        raise RuntimeError(f"exit {code}: {' '.join(argv)}\n{err.decode(errors='replace')[-2000:]}")
    return Process(float(seconds), int(rss), int(code), out, err, float(cpu))


@dataclass
class Streamed:
    """One finished child whose stdout was read as it came: the :class:`Process`, when the first
    line holding ``marker`` arrived (s after spawn, as seen here), lines holding it, the end."""

    process: Process
    first: Optional[float]
    total: float  # spawn to the end of stdout, as seen here (the same clock as ``first``)
    lines: int
    tail: bytes


def run_streamed(argv: Sequence[str], env: Mapping[str, str], marker: bytes, timeout: float = 600.0,
                 ok_codes: Tuple[int, ...] = (0,)) -> Streamed:
    """Run ``argv`` like :func:`run_once`, timestamping its stdout: when the first line holding
    ``marker`` arrived, how many lines hold it.  Keeps only the last 64 KiB of the output."""
    import time

    read_end, write_end = os.pipe()
    first: Optional[float] = None
    lines = 0
    tail = b""
    try:
        with tempfile.TemporaryFile() as errfile:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(write_end), str(timeout), *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile, env=dict(env), cwd=REPO,
                pass_fds=(write_end,),
            )
            os.close(write_end)
            write_end = -1
            assert proc.stdout is not None
            pending = b""
            while True:
                chunk = proc.stdout.read1(1 << 16)
                if not chunk:
                    break
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if cut:
                    done, pending = pending[:cut], pending[cut:]
                    found = done.count(marker)  # one marker per line in the outputs measured
                    if found and first is None:
                        first = time.perf_counter() - start
                    lines += found
                    tail = (tail + done)[-65536:]
            total = time.perf_counter() - start
            tail = (tail + pending)[-65536:]
            proc.wait(timeout=timeout + 10)
            report = os.read(read_end, 200).decode()
            errfile.seek(0)
            err = errfile.read()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    return Streamed(_process(argv, report, tail, err, timeout, ok_codes), first, total, lines, tail)


def time_interleaved(commands: Mapping[str, Sequence[str]], env: Mapping[str, str], warmup: int, repeats: int,
                     ok_codes: Tuple[int, ...] = (0,), timeout: float = 120.0,
                     envs: Optional[Mapping[str, Mapping[str, str]]] = None) -> Dict[str, List[Process]]:
    """Run each command ``warmup`` times, then ``repeats`` rounds of all of them in turn.

    Interleaving makes machine noise hit every command alike; the warm-up fills
    the page cache and writes the ``.pyc`` files.  ``envs`` overrides the
    environment of single commands (e.g. ``ETCDCTL_API``).
    """
    envs = envs or {}

    def once(name: str) -> Process:
        return run_once(commands[name], envs.get(name, env), timeout, ok_codes)

    for _ in range(warmup):
        for name in commands:
            once(name)
    results: Dict[str, List[Process]] = {name: [] for name in commands}
    for i in range(repeats):
        names = list(commands)
        if i % 2:
            names.reverse()  # nobody always goes first
        for name in names:
            results[name].append(once(name))
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]
