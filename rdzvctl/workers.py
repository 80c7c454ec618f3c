"""Checking many runs on every core: an ordered, bounded map over forked worker processes.

``list`` and ``corrupt-detect --all`` check each run the backend yields (decode, the
hostile-input bounds, torch's invariants, the phase): about 70 us of CPU per 8-node run,
where reading it costs 5-12.  Over 100,000 runs that is seconds of one core while the
others idle, so past :data:`SERIAL_FIRST` runs the checks go to worker processes, a
chunk of runs at a time, while this process keeps reading and printing.

What stays the same whatever the number of workers: the order (results come back in
the order the runs were read), the bounded memory (at most ``2 x jobs`` chunks of at most
1 MiB are in flight: the listing still streams; a large state is decoded here, one at a
time, as without workers), and the results (each is the same pure function of
its run; the clock was read once by the caller and is an argument).  Reading the
backend and every write to the terminal stay in this process.

Written here rather than on ``concurrent.futures.ProcessPoolExecutor``: its ``map``
submits every item at once (unbounded memory over a 100,000-run listing), its feeder and
manager threads are running when later workers fork, its shutdown can wait for ever after
an item fails to pickle, and its workers outlive a parent killed with SIGKILL.  Here a
worker is forked with only its own two pipes (so it ends at end of file when this process
closes them or is gone), is sent a chunk only when it waits for one (so neither side
blocks writing to the other), and ignores SIGINT (Ctrl-C stops this process, which closes
the pipes).  Linux only: elsewhere, or with ``jobs`` 1, everything runs here.  If a worker
is killed (the OOM killer, say), the runs it had, and every run after them, are checked
here.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections import deque
from typing import Any, Callable, Deque, Iterable, Iterator, List, NamedTuple, Optional, Tuple, TypeVar

__all__ = ["Ready", "default_jobs", "ordered_map", "SERIAL_FIRST", "CHUNK", "CHUNK_BYTES", "LARGE", "MAX_JOBS"]

T = TypeVar("T")
R = TypeVar("R")

#: Runs checked here before any worker starts: a small listing forks nothing.
SERIAL_FIRST = 2000
#: Runs per task handed to a worker (a few milliseconds of work, a few hundred KiB of state).
CHUNK = 500
#: The most bytes of items in one chunk; an item over LARGE is worked out here (decoding a
#: large state takes memory in proportion: one at a time, as without workers).
CHUNK_BYTES = 1 << 20
LARGE = 64 << 10
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


def ordered_map(fn: Callable[[T], R], items: Iterable[Any], jobs: int, size: Optional[Callable[[Any], int]] = None,
                serial_first: Optional[int] = None, chunk: Optional[int] = None) -> Iterator[R]:
    """``fn`` of each item (a :class:`Ready` item gives its value), in order, lazily.

    The first ``serial_first`` items, and every item when ``jobs`` is 1 or fork is
    unavailable, are worked out here (``serial_first`` and ``chunk`` default to
    :data:`SERIAL_FIRST` and :data:`CHUNK`).  The rest go to ``jobs`` forked workers, a
    chunk each in turn; ``fn`` is the workers' own copy, the items and results must
    pickle.  ``size`` gives an item's bytes: a chunk holds at most :data:`CHUNK_BYTES` of
    them, and an item over :data:`LARGE` is worked out here as it is read (an error ``fn``
    raises for it is raised then), so that what is in flight, and what a worker holds,
    stays small whatever the store holds.  An error ``fn`` raises in a worker is raised
    here, in its place in the order.
    """
    serial_first = SERIAL_FIRST if serial_first is None else serial_first
    it = iter(items)
    yield from _apply_each(fn, itertools.islice(it, serial_first))
    if jobs <= 1 or not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        yield from _apply_each(fn, it)
        return
    chunks = _chunks(fn, it, CHUNK if chunk is None else chunk, size)
    failed: List[Exception] = []  # reading failed (the backend, a large item): raised once what was read is out

    def read() -> Optional[List[Any]]:
        if not failed:
            try:
                return next(chunks, None)
            except Exception as exc:  # noqa: BLE001 - raised after the results before it, as without workers
                failed.append(exc)
        return None

    first: List[List[Any]] = []
    while len(first) < jobs:
        batch = read()
        if batch is None:
            break
        first.append(batch)
    if not first:
        if failed:
            raise failed[0]
        return
    try:
        pool = _Pool(fn, len(first))
    except OSError:  # no process or pipe to be had (a limit reached): everything here
        yield from _apply_each(fn, itertools.chain(*first, itertools.chain.from_iterable(chunks)))
        if failed:
            raise failed[0] from None
        return
    try:
        sent: Deque[Tuple[_Worker, List[Any]]] = deque()
        rest: Optional[Iterator[Any]] = None  # what is left to do here once a worker is gone
        for worker, batch in zip(pool.workers, first):
            try:
                worker.send(batch)
            except OSError:  # the worker is already gone: finish here
                rest = itertools.chain(*first, itertools.chain.from_iterable(chunks))
                break
            sent.append((worker, batch))
        while sent and rest is None:
            worker, batch = sent.popleft()
            try:
                done, error = worker.receive()
            except (EOFError, OSError):  # the worker was killed (the OOM killer, a signal): finish here
                rest = itertools.chain(batch, *(b for _, b in sent), itertools.chain.from_iterable(chunks))
                break
            following = read()  # the worker's next chunk before this one's results are used
            if following is not None:
                sent.append((worker, following))
                try:
                    worker.send(following)
                except OSError:  # killed once it had sent its results: what it was to do is done here
                    rest = itertools.chain(*(b for _, b in sent), itertools.chain.from_iterable(chunks))
            yield from (item.value if type(item) is Ready else result for item, result in zip(batch, done))
            if error is not None:
                raise error
        if rest is not None:
            sent.clear()
            pool.close()
            yield from _apply_each(fn, rest)
        if failed:
            raise failed[0]
    finally:
        pool.close()


_HOLE = Ready(None)


class _Worker:
    """One forked worker: chunks in, results out, over a pipe each way (pickles, in order)."""

    def __init__(self, pid: int, requests: Any, results: Any) -> None:
        self.pid, self.requests, self.results = pid, requests, results

    def send(self, batch: List[Any]) -> None:
        # The worker is waiting for it: nothing it sends is left unread.  A result already worked out
        # here (a large run's) stays here: the worker is sent, and sends back, a hole in its place.
        self.requests.send([_HOLE if type(item) is Ready else item for item in batch])

    def receive(self) -> Tuple[List[Any], Optional[BaseException]]:
        """The results of the chunk sent, and the error ``fn`` raised for the item after them, if any."""
        kind, value = self.results.recv()
        if kind == "error":
            done, error = value
            return list(done), error
        return list(value), None


class _Pool:
    """``count`` forked workers of ``fn``: no thread here, so none can be caught mid-lock by a fork,
    and each worker holds only its own pipes' ends, so it ends (end of file) when this process
    closes them or is gone, however it went."""

    def __init__(self, fn: Callable[[Any], Any], count: int) -> None:
        self.workers: List[_Worker] = []
        try:
            for _ in range(count):
                self._start(fn)
        except BaseException:  # no process or pipe to be had: the workers already started end with their pipes
            self.close()
            raise

    def _start(self, fn: Callable[[Any], Any]) -> None:
        from multiprocessing.connection import Pipe

        requests_out, requests_in = Pipe(duplex=False)[::-1]
        results_in, results_out = Pipe(duplex=False)
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here is inherited to be written twice
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        try:
            pid = os.fork()
        except BaseException:
            for end in (requests_out, requests_in, results_in, results_out):
                end.close()
            raise
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                for other in self.workers:
                    other.requests.close()
                    other.results.close()
                requests_out.close()
                results_in.close()
                _serve(fn, requests_in, results_out)
                code = 0
            finally:
                os._exit(code)
        requests_in.close()
        results_out.close()
        self.workers.append(_Worker(pid, requests_out, results_in))

    def close(self) -> None:
        for worker in self.workers:
            for end in (worker.requests, worker.results):
                end.close()
        for worker in self.workers:
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
        self.workers = []


def _serve(fn: Callable[[Any], Any], requests: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes the pipes
    while True:
        try:
            batch = requests.recv()
        except (EOFError, OSError):
            return
        done: List[Any] = []
        reply: Tuple[str, Any] = ("done", done)
        try:
            for item in batch:
                done.append(item.value if type(item) is Ready else fn(item))
        except Exception as exc:  # noqa: BLE001 - raised in the parent, in order, after the results before it
            reply = ("error", (done, exc))
        try:
            results.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - a result or an error that does not pickle
            results.send(("error", ([], RuntimeError(f"a worker's result cannot be sent back: {exc}"))))


def _chunks(fn: Callable[[Any], Any], items: Iterator[Any], count: int,
            size: Optional[Callable[[Any], int]]) -> Iterator[List[Any]]:
    """``items`` in lists of at most ``count`` items and CHUNK_BYTES, large items already worked out."""
    batch: List[Any] = []
    held = 0
    try:
        for item in items:
            if size is not None and type(item) is not Ready:
                bytes_ = size(item)
                if bytes_ > LARGE:
                    item = Ready(fn(item))
                held += bytes_  # a large run's result is in proportion: it ends its chunk
            batch.append(item)
            if len(batch) >= count or held >= CHUNK_BYTES:
                yield batch
                batch, held = [], 0
    except Exception:
        if batch:  # the items read before the error, then the error
            yield batch
        raise
    if batch:
        yield batch


def _apply_each(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        yield item.value if type(item) is Ready else fn(item)
