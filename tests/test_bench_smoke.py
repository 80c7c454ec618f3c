"""Keep the benchmark suite from rotting: a quick P2 run must finish and print its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def _rows(args: list, tmp_path: Path) -> list:
    """The rows of a quick run, from its ``--json`` file."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.slow
def test_bench_quick_p9_on_a_filestore_prints_its_four_rows(tmp_path: Path) -> None:
    """P9 at a tiny size (--quick: 2,048 nodes): get -o json, the table, peak RSS and watch's decode count."""
    rows = _rows(["--only", "P9", "--backends", "c10d-file"], tmp_path)
    assert [r["what"].split(",")[0] for r in rows] == [
        "get -o json", "get (plain table)", "peak RSS of get -o json", "watch: decodes per new version"]
    assert all(r["verdict"] in ("ok", "MISSED") for r in rows)
    watch = rows[-1]
    # a count, not a time: never more decodes than versions written
    assert watch["verdict"] == "ok" and 1 <= watch["ours"] <= watch["base"], watch


@pytest.mark.slow
def test_bench_quick_p1_on_redis_times_the_client_import(tmp_path: Path) -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    rows = _rows(["--only", "P1", "--backends", "redis"], tmp_path)
    refs = [r["what"] for r in rows if r["verdict"] == "ref"]
    assert any("import redis" in what for what in refs) and any("import asyncio" in what for what in refs), refs
    assert any(r["what"].startswith("get -o json") and r["verdict"] in ("ok", "MISSED") for r in rows)


@pytest.mark.slow
def test_bench_quick_p12_prints_the_history_rows(tmp_path: Path) -> None:
    """P12 at a tiny size (--quick: 10,000 versions): the FileStore history row and its peak RSS."""
    rows = _rows(["--only", "P12", "--backends", "c10d-file"], tmp_path)
    assert [(r["backend"], r["what"].split(",")[0]) for r in rows if r["backend"] == "c10d-file"] == [
        ("c10d-file", "history"), ("c10d-file", "peak RSS")]
    assert all(r["verdict"] in ("ok", "MISSED", "skip") for r in rows), rows
