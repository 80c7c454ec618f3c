"""The stack and memory limits the C unpickler runs under (see :mod:`rdzvctl.state.prescan`).

:func:`call_with_stack` runs the unpickler on a thread whose stack holds the
tuple nesting :func:`rdzvctl.state.prescan.tuple_depth_bound` allows (the
stack limit is read from ``RLIMIT_STACK`` or ``threading.stack_size()``);
:class:`MeteredInput` is the file the unpickler reads from: every
:data:`CHUNK` it consumes, the memory grown since the start is compared with
a budget derived from the input size, so a flood of cheap objects is refused
after a bounded amount of memory.  Written by hand: no library bounds what
``pickle.Unpickler`` allocates.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from rdzvctl.errors import StateCorruptError

__all__ = ["BYTES_PER_LEVEL", "MeteredInput", "stack_needed", "stack_available", "call_with_stack"]

#: C stack one level of tuple nesting may take while hashed: measured 52-64
#: bytes on x86-64 (CPython 3.11, 1 MiB and 8 MiB stacks); twice that for margin.
BYTES_PER_LEVEL = 128
#: Stack reserved for everything but the hash recursion (the interpreter's own frames).
STACK_MARGIN = 512 * 1024
#: Largest helper-thread stack decode will ask for (enough for 500,000 levels;
#: a 16 MiB real state has about 190,000 tuple opcodes, one per datetime).
MAX_HELPER_STACK = 64 * 1024 * 1024

#: Memory the unpickler may grow by: a floor plus a multiple of the input size.
#: Unpickling a real state grows the process by about 8x its size (65,536
#: nodes, 5.9 MB: 48 MB), so 10x leaves headroom; at the 16 MiB cap the budget
#: is 176 MiB, which with the interpreter and the input keeps a refusal under 256 MiB.
MEMORY_FLOOR = 16 * 1024 * 1024
MEMORY_PER_BYTE = 10
#: How much input the unpickler gets between two memory checks (16 KiB of
#: ``EMPTY_SET`` bytes is at most 3.5 MB of sets).
CHUNK = 16 * 1024


# -- the C stack ----------------------------------------------------------------


def stack_needed(depth: int) -> int:
    """C stack (bytes) hashing a tuple nested ``depth`` deep may take, with the margin."""
    return depth * BYTES_PER_LEVEL + STACK_MARGIN


def stack_available() -> int:
    """The current thread's stack size: ``RLIMIT_STACK`` for the main thread, else the size
    threads are created with (``threading.stack_size()``; 0 means the platform default,
    taken as the smaller of ``RLIMIT_STACK`` and 2 MiB)."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    limit = soft if soft != resource.RLIM_INFINITY and soft > 0 else 64 * 1024 * 1024
    if threading.current_thread() is threading.main_thread():
        return limit
    size = threading.stack_size()
    return size if size else min(limit, 2 * 1024 * 1024)


T = TypeVar("T")


def call_with_stack(func: Callable[[], T], needed: int) -> T:
    """``func()`` on this thread if its stack holds ``needed`` bytes, else on a helper thread with that stack."""
    if needed <= stack_available():
        return func()
    if needed > MAX_HELPER_STACK:
        raise StateCorruptError(f"the pickle has {needed // BYTES_PER_LEVEL:,} tuple opcodes, far more than a "
                                "state has (one per datetime); refused before unpickling")
    outcome: List[Tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, func()))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            outcome.append((False, exc))

    size = -(-needed // 65536) * 65536  # a multiple of the page size
    with _STACK_SIZE_LOCK:
        previous = threading.stack_size()
        try:
            threading.stack_size(size)
            worker = threading.Thread(target=run, name="rdzvctl-decode", daemon=True)
            worker.start()
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise StateCorruptError(f"the state needs a {size >> 20} MiB stack to unpickle safely, which this "
                                    f"process cannot have ({exc})") from None
        finally:
            threading.stack_size(previous)
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


_STACK_SIZE_LOCK = threading.Lock()


# -- memory ---------------------------------------------------------------------


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak (``ru_maxrss``).

    ``/proc/self/statm`` stays open: a ``pread`` of it costs a quarter of an
    ``open`` + ``read`` + ``close``, and a check of many small states reads it a few
    times per state.  A forked child drops the parent's (the file is the opener's).
    """
    global _statm
    try:
        if _statm is None:
            _statm = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return int(os.pread(_statm, 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


_statm: Optional[int] = None


def _forget_statm() -> None:
    global _statm
    if _statm is not None:
        try:
            os.close(_statm)
        except OSError:
            pass
        _statm = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_statm)


try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
    _PAGE = 4096


class MeteredInput:
    """The pickle as a file the C unpickler reads in :data:`CHUNK` pieces, checking memory at each.

    The unpickler prefetches with ``peek`` and consumes with ``read``; every
    call compares the memory grown since the start with ``budget`` and
    refuses (the exception ends the unpickling) once it is exceeded.  A piece
    is a slice of the input (the whole input, when asked for, is the input
    itself: no copy).
    """

    __slots__ = ("_raw", "_pos", "budget", "_start")

    def __init__(self, data: bytes, budget: Optional[int] = None) -> None:
        self._raw = data
        self._pos = 0
        self.budget = MEMORY_FLOOR + MEMORY_PER_BYTE * len(data) if budget is None else budget
        self._start = _resident_bytes()

    def _check(self) -> None:
        grown = _resident_bytes() - self._start
        if grown > self.budget:
            raise StateCorruptError(
                f"the pickle builds more than a state of {len(self._raw):,} bytes can hold (unpickling grew "
                f"memory by {grown >> 20} MiB, over the {self.budget >> 20} MiB budget); refused")

    def peek(self, size: int = 0) -> bytes:
        pos = self._pos
        if pos:  # before the first byte is consumed nothing is built yet: no memory to check
            self._check()
        return self._raw[pos:pos + min(max(size, 1), CHUNK)]

    def read(self, size: int = -1) -> bytes:
        self._check()
        pos = self._pos
        piece = self._raw[pos:] if size is None or size < 0 else self._raw[pos:pos + size]
        self._pos = pos + len(piece)
        return piece

    def readinto(self, buffer: Any) -> int:
        self._check()
        view = memoryview(buffer).cast("B")
        piece = memoryview(self._raw)[self._pos:self._pos + len(view)]
        view[:len(piece)] = piece
        self._pos += len(piece)
        return len(piece)

    def readline(self, size: int = -1) -> bytes:
        self._check()
        end = self._raw.find(b"\n", self._pos)
        stop = len(self._raw) if end < 0 else end + 1
        piece = self._raw[self._pos:stop]
        self._pos = stop
        return piece
