"""``rdzvctl.workers.ordered_map`` and the commands that share their checks with worker processes.

The map is checked against ``map`` itself (order, passed-through results, errors, a killed
worker, an abandoned map), and ``list`` / ``corrupt-detect --all`` on a real FileStore print
the same bytes with workers as without.
"""

from __future__ import annotations

import base64
import datetime as _dt
import itertools
import multiprocessing
import os
import signal
from typing import Iterator, List

import pytest

from rdzvctl import workers
from rdzvctl.backends.filestore import FileStore
from rdzvctl.state.codec import encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.workers import Ready, ordered_map
from tests.support.cli import NOW, invoke, run_rdzvctl

PARENT = os.getpid()


def square(x: int) -> int:
    return x * x


def where(x: int) -> str:
    return "here" if os.getpid() == PARENT else "worker"


def fails_at_30(x: int) -> int:
    if x == 30:
        raise ValueError(f"bad item {x}")
    return x


def dies_in_a_worker(x: int) -> int:
    if x == 20 and os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return -x


@pytest.mark.parametrize("jobs", [1, 2])
def test_same_results_in_the_same_order(jobs):
    items: List[object] = list(range(50))
    items[7] = Ready("seven")
    items[40] = Ready(None)
    expected = [x.value if isinstance(x, Ready) else x * x for x in items]
    assert list(ordered_map(square, items, jobs, serial_first=3, chunk=4)) == expected


def test_the_first_items_are_worked_out_here_and_the_rest_in_workers():
    seen = list(ordered_map(where, range(40), 2, serial_first=10, chunk=5))
    assert seen[:10] == ["here"] * 10
    assert set(seen[10:]) == {"worker"}
    assert list(ordered_map(where, range(40), 1, serial_first=10, chunk=5)) == ["here"] * 40


def test_reads_a_bounded_window_ahead():
    read = []

    def items() -> Iterator[int]:
        for i in itertools.count():
            read.append(i)
            yield i

    results = ordered_map(square, items(), 2, serial_first=5, chunk=4)
    assert [next(results) for _ in range(30)] == [i * i for i in range(30)]
    # the serial items, then at most 2 x jobs chunks in flight and the next chunk read
    assert len(read) <= 30 + 2 * 2 * 4 + 4
    results.close()
    assert multiprocessing.active_children() == []


def test_an_error_in_a_worker_is_raised_here():
    with pytest.raises(ValueError, match="bad item 30"):
        list(ordered_map(fails_at_30, range(100), 2, serial_first=5, chunk=4))
    assert multiprocessing.active_children() == []


def test_a_killed_worker_leaves_its_items_to_this_process():
    assert list(ordered_map(dies_in_a_worker, range(60), 2, serial_first=5, chunk=4)) == [-x for x in range(60)]
    assert multiprocessing.active_children() == []


def test_default_jobs_is_the_cpus_this_process_may_use():
    assert 1 <= workers.default_jobs() <= min(workers.MAX_JOBS, len(os.sched_getaffinity(0)))


# -- the commands --------------------------------------------------------------------------------------
def _state(nodes: int, dead: int, now: _dt.datetime = NOW) -> bytes:
    state = RendezvousState(round=nodes, complete=True, closed=False)
    for rank in range(nodes):
        node = NodeDesc(f"node{rank}", 100 + rank, 0)
        state.participants[node] = rank
        state.last_heartbeats[node] = now - _dt.timedelta(seconds=3600 if rank < dead else 1)
    return encode(state)


@pytest.fixture
def fleet(tmp_path) -> str:
    """A FileStore of 40 runs: healthy ones, some with dead nodes, two not base64."""
    path = str(tmp_path / "store")
    files = FileStore(path, create=True)
    for i in range(40):
        value = b"not base64!" if i % 17 == 3 else base64.b64encode(_state(1 + i % 5, dead=i % 3 == 0))
        files.set(f"/torch.rendezvous.job-{i:02d}", value)
    return path


@pytest.mark.parametrize("command", [["list", "-o", "json"], ["list"], ["corrupt-detect", "--all", "-o", "json"],
                                     ["corrupt-detect", "--all"]], ids=["list-json", "list", "detect-json", "detect"])
def test_commands_print_the_same_with_workers(fleet, monkeypatch, frozen_now, command):
    monkeypatch.setattr(workers, "SERIAL_FIRST", 6)
    monkeypatch.setattr(workers, "CHUNK", 5)
    address = ["--rdzv-backend", "c10d", "--rdzv-endpoint", fleet, "--rdzv-conf", "store_type=file"]
    alone = invoke([*command, "-j", "1", *address])
    shared = invoke([*command, "--jobs", "2", *address])
    assert alone.exit_code == shared.exit_code == (6 if command[0] == "corrupt-detect" else 0), alone.output
    assert shared.stdout == alone.stdout
    assert shared.stderr == alone.stderr
    assert alone.stdout.count("job-") >= 40
    assert multiprocessing.active_children() == []


def test_a_real_process_prints_each_run_once_through_a_pipe(tmp_path):
    """Past SERIAL_FIRST in a fresh process: the workers are forked with the opening of the document
    already written; nothing is printed twice, nothing on stderr, the same bytes as without workers."""
    path = str(tmp_path / "store")
    files = FileStore(path, create=True)
    fresh = base64.b64encode(_state(2, dead=0, now=_dt.datetime.now(_dt.timezone.utc)))  # alive for 3 days
    for i in range(workers.SERIAL_FIRST + 3 * workers.CHUNK):
        files.set(f"/torch.rendezvous.run-{i:05d}", b"not base64!" if i % 1000 == 999 else fresh)
    address = ["--rdzv-backend", "c10d", "--rdzv-endpoint", path, "--rdzv-conf",
               "store_type=file,keep_alive_interval=86400"]
    for command in (["list", "-o", "json"], ["corrupt-detect", "--all", "-o", "json"]):
        alone = run_rdzvctl([*command, "-j", "1", *address], text=False)
        shared = run_rdzvctl([*command, "-j", "2", *address], text=False)
        assert shared.returncode == alone.returncode == (6 if command[0] == "corrupt-detect" else 0)
        assert shared.stderr == alone.stderr == b""
        assert shared.stdout == alone.stdout
        assert alone.stdout.count(b'"run_id"') == workers.SERIAL_FIRST + 3 * workers.CHUNK
