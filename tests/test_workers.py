"""``rdzvctl.workers.ordered_map`` and the commands that share their checks with worker processes.

The map is checked against ``map`` itself (order, passed-through results, errors, a killed
worker, an abandoned map), and ``list`` / ``corrupt-detect --all`` on a real FileStore print
the same bytes with workers as without.
"""

from __future__ import annotations

import base64
import datetime as _dt
import itertools
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


def _children() -> set:
    """This process's forked workers: its child processes running this very command line (not the
    servers other modules' fixtures started in the same test process)."""
    with open(f"/proc/{PARENT}/task/{PARENT}/children") as f:
        kids = f.read().split()
    with open(f"/proc/{PARENT}/cmdline", "rb") as f:
        ours = f.read()
    forks = set()
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if f.read() == ours:
                    forks.add(kid)
        except OSError:  # ended meanwhile
            pass
    return forks


CHILDREN = _children()  # none: no map has run yet


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
    assert _children() == CHILDREN


def test_an_error_in_a_worker_is_raised_here():
    with pytest.raises(ValueError, match="bad item 30"):
        list(ordered_map(fails_at_30, range(100), 2, serial_first=5, chunk=4))
    assert _children() == CHILDREN


def test_a_killed_worker_leaves_its_items_to_this_process():
    assert list(ordered_map(dies_in_a_worker, range(60), 2, serial_first=5, chunk=4)) == [-x for x in range(60)]
    assert _children() == CHILDREN


def _until_error(results: Iterator[int]) -> List[int]:
    seen: List[int] = []
    with pytest.raises(ValueError, match="bad item 30"):
        for x in results:
            seen.append(x)
    return seen


def test_the_results_before_an_error_in_a_worker_are_yielded_first():
    """As without workers: the items of the failing item's chunk before it are not lost."""
    alone = _until_error(ordered_map(fails_at_30, range(100), 1, serial_first=5, chunk=4))
    assert alone == list(range(30))
    assert _until_error(ordered_map(fails_at_30, range(100), 2, serial_first=5, chunk=4)) == alone
    assert _children() == CHILDREN


def test_a_killed_worker_leaves_the_rest_to_be_read_as_needed():
    """The runs after a killed worker's are still read a window at a time, not all at once."""
    read = []

    def items() -> Iterator[int]:
        for i in range(100_000):
            read.append(i)
            yield i

    results = ordered_map(dies_in_a_worker, items(), 2, serial_first=5, chunk=4)
    assert [next(results) for _ in range(40)] == [-x for x in range(40)]
    assert len(read) <= 40 + 2 * 2 * 4 + 4
    results.close()
    assert _children() == CHILDREN


def test_workers_killed_once_they_have_sent_their_results_leave_the_rest_here():
    """A worker gone when it is sent its next chunk (killed between two chunks): no BrokenPipeError,
    which the command would take for its output's reader gone and stop, the listing cut short."""
    import time

    results = ordered_map(where, range(200), 2, serial_first=0, chunk=4)
    assert next(results) == "worker"
    kids = _children() - CHILDREN
    time.sleep(0.2)  # both have sent the results of the chunk they were given
    for kid in kids:
        os.kill(int(kid), signal.SIGKILL)
    for kid in kids:
        while open(f"/proc/{kid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    rest = list(results)
    assert len(rest) == 199 and rest[-1] == "here"
    assert _children() == CHILDREN


def test_no_process_to_be_had_leaves_everything_here(monkeypatch):
    """A fork refused (a process limit reached) after one worker started: the items are worked out
    here, the worker started ends, nothing is raised."""
    fork, forks = os.fork, []

    def limited() -> int:
        forks.append(1)
        if len(forks) > 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return fork()

    monkeypatch.setattr(os, "fork", limited)
    assert list(ordered_map(where, range(40), 2, serial_first=5, chunk=4)) == ["here"] * 40
    assert len(forks) == 2
    assert _children() == CHILDREN


@pytest.mark.parametrize("fails_at", [3, 7, 12, 50, 97])
def test_what_was_read_before_a_read_error_comes_out_before_it(fails_at):
    """The backend failing mid-listing: every run read before, then the error, as without workers
    (not the chunks read ahead and in flight lost)."""

    def items() -> Iterator[int]:
        for i in range(100):
            if i == fails_at:
                raise ConnectionError("the backend is gone")
            yield i

    for jobs in (1, 2, 3):
        seen: List[int] = []
        with pytest.raises(ConnectionError):
            for x in ordered_map(abs, items(), jobs, serial_first=5, chunk=4):
                seen.append(x)
        assert seen == list(range(fails_at)), jobs
    assert _children() == CHILDREN


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
    assert _children() == CHILDREN


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


def test_large_items_are_worked_out_here_and_chunks_stay_small(monkeypatch):
    monkeypatch.setattr(workers, "LARGE", 100)
    monkeypatch.setattr(workers, "CHUNK_BYTES", 250)
    items = [("x" * (150 if i % 7 == 0 else 60), i) for i in range(60)]
    seen = list(ordered_map(where_of_item, items, 2, size=lambda item: len(item[0]), serial_first=0, chunk=50))
    assert [s for s, i in zip(seen, range(60)) if i % 7 == 0] == ["here"] * 9
    assert all(s == "worker" for s, i in zip(seen, range(60)) if i % 7)
    chunks = list(workers._chunks(where_of_item, iter(items), 50, lambda item: len(item[0])))
    assert [x for c in chunks for x in c if type(x) is Ready] == [Ready("here")] * 9
    assert max(sum(len(x[0]) for x in c if type(x) is not Ready) for c in chunks) < 250 + 60
    assert _children() == CHILDREN


def where_of_item(item) -> str:
    return where(item[1])


def test_a_result_worked_out_here_stays_here():
    """A Ready result (a large run's report, megabytes) is not sent to a worker and back: a hole
    crosses in its place (here: a value that cannot even be pickled)."""
    here = Ready(lambda: "not picklable")
    items: List[object] = [*range(10), here, *range(10, 20)]
    assert list(ordered_map(square, items, 2, serial_first=0, chunk=4)) == [
        *(x * x for x in range(10)), here.value, *(x * x for x in range(10, 20))]
    assert _children() == CHILDREN


def test_large_items_count_towards_their_chunk(monkeypatch):
    """The results of large items are in proportion to them: a chunk of them is as bounded as one of
    small items (not 500 large reports held, in flight, at once)."""
    monkeypatch.setattr(workers, "LARGE", 100)
    monkeypatch.setattr(workers, "CHUNK_BYTES", 250)
    items = [("x" * 300, i) for i in range(20)]
    chunks = list(workers._chunks(where_of_item, iter(items), 50, lambda item: len(item[0])))
    assert [len(c) for c in chunks] == [1] * 20


def test_an_item_that_does_not_pickle_is_an_error_not_a_hang():
    with pytest.raises(Exception, match="pickle|lambda"):
        list(ordered_map(square, [1, 2, 3, lambda: 4, 5], 2, serial_first=0, chunk=2))
    assert _children() == CHILDREN


def test_workers_end_when_this_process_is_killed(tmp_path):
    """A parent killed with SIGKILL mid-map leaves no worker behind (each ends at end of file)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from rdzvctl.workers import ordered_map\n"
        "def slow(x):\n    time.sleep(0.01)\n    return x\n"
        "for x in ordered_map(slow, range(10**6), 2, serial_first=0, chunk=5):\n"
        "    if x == 20:\n        print(os.getpid(), flush=True)\n        time.sleep(60)\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": repo})
    pid = int(proc.stdout.readline())
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    assert len(kids) == 2
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{k}") and "Z" not in open(f"/proc/{k}/stat").read().split()[2] for k in kids):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.05)
