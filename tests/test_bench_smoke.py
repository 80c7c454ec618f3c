"""Keep the benchmark suite from rotting: a quick P2 run must finish and print its table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_quick_p2_prints_its_rows() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "P2"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["id", "what", "backend"]
    rows = [line for line in lines[2:] if line.startswith("P2 ")]
    assert len(rows) == 2
    assert all(row.rstrip().endswith(("ok", "MISSED")) for row in rows)


@pytest.mark.slow
def test_bench_quick_p8_prints_its_rows_at_a_tiny_size() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "P8", "--many-runs", "300",
                           "--backends", "c10d-file,redis"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines()[2:] if line.startswith("P8 ")]
    # Per backend and command: the time, the first run line and the peak RSS, each with a verdict.
    assert len(rows) == 2 * 2 * 3
    for backend in ("c10d-file", "redis"):
        assert sum(f" {backend} " in row for row in rows) == 6
    verdicts = [row.rstrip().rsplit("  ", 1)[-1].split(" (")[0].strip() for row in rows]
    assert set(verdicts) <= {"ok", "MISSED"}, verdicts
