"""Checking many runs on every core: an ordered, bounded map over forked worker processes.

``list`` and ``corrupt-detect --all`` check each run the backend yields (decode, the
hostile-input bounds, torch's invariants, the phase): about 70 us of CPU per 8-node run,
where reading it costs 5-12.  Over 100,000 runs that is seconds of one core while the
others idle, so past :data:`SERIAL_FIRST` runs the checks go to worker processes, a
chunk of runs at a time, while this process keeps reading and printing.

What stays the same whatever the number of workers: the order (results come back in
the order the runs were read), the bounded memory (at most ``2 x jobs`` chunks are in
flight: the listing still streams), and the results (each is the same pure function of
its run; the clock was read once by the caller and is an argument).  Reading the
backend and every write to the terminal stay in this process.

``concurrent.futures.ProcessPoolExecutor`` does the work; what it lacks, a bounded
window over an unbounded iterator (its ``map`` submits every item at once), is the loop
below.  Workers are forked (Linux only: elsewhere, or with ``jobs`` 1, everything runs
here), ignore SIGINT (Ctrl-C stops this process, which stops them), and are gone when
the map ends, is abandoned, or fails; if one is killed (the OOM killer, say), the runs it
had, and every run after them, are checked here.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar

__all__ = ["Ready", "default_jobs", "ordered_map", "SERIAL_FIRST", "CHUNK", "MAX_JOBS"]

T = TypeVar("T")
R = TypeVar("R")

#: Runs checked here before any worker starts: a small listing forks nothing.
SERIAL_FIRST = 2000
#: Runs per task handed to a worker (a few milliseconds of work, a few hundred KiB of state).
CHUNK = 500
#: The most workers ``default_jobs`` picks: past this, reading and printing here is the limit.
MAX_JOBS = 4


class Ready(NamedTuple):
    """An item whose result is already known (worked out here): passed through in its place."""

    value: Any


def default_jobs() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count), at most MAX_JOBS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_JOBS))


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down


def _apply(fn: Callable[[Any], Any], chunk: List[Any]) -> List[Any]:
    return [item.value if type(item) is Ready else fn(item) for item in chunk]


def ordered_map(fn: Callable[[T], R], items: Iterable[Any], jobs: int, serial_first: Optional[int] = None,
                chunk: Optional[int] = None) -> Iterator[R]:
    """``fn`` of each item (a :class:`Ready` item gives its value), in order, lazily.

    ``fn`` and the items must pickle (a module-level function or a ``functools.partial``
    of one; plain data) once the workers start; the first ``serial_first`` items, and
    every item when ``jobs`` is 1 or fork is unavailable, are worked out here
    (``serial_first`` and ``chunk`` default to :data:`SERIAL_FIRST` and :data:`CHUNK`).
    """
    serial_first = SERIAL_FIRST if serial_first is None else serial_first
    chunk = CHUNK if chunk is None else chunk
    it = iter(items)
    yield from _apply_each(fn, itertools.islice(it, serial_first))
    if jobs <= 1 or not sys.platform.startswith("linux"):
        yield from _apply_each(fn, it)
        return
    batch = list(itertools.islice(it, chunk))
    if not batch:
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_quiet_worker)
    pending: Deque[Tuple["Future[List[Any]]", List[Any]]] = deque()
    try:
        while batch or pending:
            while batch and len(pending) < 2 * jobs:
                pending.append((pool.submit(_apply, fn, batch), batch))
                batch = list(itertools.islice(it, chunk))
            future, sent = pending.popleft()
            try:
                done = future.result()
            except BrokenProcessPool:  # a worker was killed (the OOM killer, a signal): finish here
                yield from _apply_each(fn, itertools.chain(sent, *(b for _, b in pending), batch, it))
                pending.clear()
                return
            yield from done
    finally:
        for future, _ in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _apply_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        yield item.value if type(item) is Ready else fn(item)
