"""torch's c10d ``FileStore`` file, read and appended with torch's locking.

The records (:mod:`rdzvctl.backends.filestore_log`) form an append-only log;
the last record of a key wins.  User keys are stored as ``/key``;
``refcount/`` and ``cleanup/`` are torch's bookkeeping.

Rules kept here so live torch processes are never disturbed (as torch's
``FileStore.cpp`` does): ``flock`` LOCK_SH to read and LOCK_EX to
append at EOF; the file is never truncated, compacted or replaced; existing
files are opened without ``O_CREAT`` (a store torch deleted stays deleted); and
``refcount/``/``cleanup/`` are never written.  Reads replay only what was
appended since the previous read, and only the position of each key's latest
value is remembered: a value is read from the file when a call asks for it, so
memory follows what the command needs, not what anyone appended to the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from rdzvctl.backends.filestore_log import _U32, Span, encode_record, index_records, parse_records
from rdzvctl.errors import BackendConfigError, BackendTimeoutError, BackendUnavailableError, StateCorruptError

__all__ = ["FileStore"]

_INTERNAL = (b"refcount/", b"cleanup/")
_HEAD = 64  # bytes remembered to notice a file replaced under the same inode
_CHUNK = 1 << 20  # bytes read at a time; a replay skips a larger value without reading it

Key = Union[bytes, str]
T = TypeVar("T")


def _b(value: Key) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _flock():
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise BackendConfigError("the FileStore needs flock(2), which this system lacks") from None
    return fcntl


class FileStore:
    """A torch ``FileStore`` file, shared safely with the torch processes using it.

    Keys are the stored (wire) keys: ``b"/k"`` is what torch calls ``k``.
    ``timeout`` bounds waiting for torch's lock.  With ``create=True`` a write
    may create a missing file (used to build a fresh store, e.g. for a demo);
    otherwise a missing file reads as empty and refuses writes.
    """

    def __init__(self, path: str, timeout: float = 10.0, create: bool = False) -> None:
        if not path:
            raise BackendConfigError("the FileStore needs a file path as its endpoint")
        self.path = path
        self.timeout = float(timeout)
        self.create = create
        self._lock = threading.Lock()
        self._index: Dict[bytes, Span] = {}
        self._offset = 0
        self._ident: Optional[Tuple[int, int]] = None
        self._head = b""

    @property
    def endpoint(self) -> str:
        return self.path

    def close(self) -> None:
        with self._lock:
            self._index, self._offset, self._ident, self._head = {}, 0, None, b""

    # -- file access --------------------------------------------------------------
    def _open(self, write: bool) -> Optional[int]:
        """An fd of the file, or None if it does not exist (and may not be created)."""
        flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        if write and self.create:
            flags |= os.O_CREAT
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if write:
                raise BackendUnavailableError(
                    f"the FileStore file {self.path} does not exist (the job's store was removed "
                    "or never created); refusing to create it"
                ) from None
            return None
        except IsADirectoryError:
            raise BackendConfigError(f"the FileStore path {self.path} is a directory") from None
        except OSError as exc:
            raise BackendUnavailableError(
                f"cannot open the FileStore file {self.path}: {exc.strerror}"
            ) from exc

    def _lock_file(self, fd: int, exclusive: bool) -> None:
        """flock like torch, waiting at most ``timeout`` for torch to release it."""
        fcntl = _flock()
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.timeout
        pause = 0.0005
        while True:
            try:
                fcntl.flock(fd, mode)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    raise BackendUnavailableError(
                        f"cannot lock the FileStore file {self.path}: {exc.strerror}"
                    ) from exc
            if time.monotonic() >= deadline:
                raise BackendTimeoutError(
                    f"the FileStore file {self.path} stayed locked for {self.timeout:g} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _refresh(self, fd: int) -> int:
        """Index what was appended since the last read; returns the file size."""
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        head = os.pread(fd, len(self._head), 0) if self._offset else b""
        if ident != self._ident or st.st_size < self._offset or head != self._head:
            self._index, self._offset, self._ident, self._head = {}, 0, ident, b""
        size = st.st_size
        while self._offset < size:  # in chunks; large values are skipped, not read
            chunk = os.pread(fd, min(_CHUNK, size - self._offset), self._offset)
            if not chunk:
                break
            if not self._head:
                self._head = chunk[:_HEAD]
            after = index_records(chunk, self._offset, size, self._index)
            if after == self._offset and len(chunk) < size - self._offset:
                # One record header longer than a chunk (a huge key): read it whole.
                klen = _U32.unpack_from(chunk, 0)[0]
                chunk = os.pread(fd, min(8 + klen, size - self._offset), self._offset)
                after = index_records(chunk, self._offset, size, self._index)
            if after == self._offset:
                break
            self._offset = after
        if self._offset < size:
            # Writers append whole records under LOCK_EX, so under our lock
            # a torn tail is damage (a crashed or unlocked writer).
            raise StateCorruptError(
                f"the FileStore file {self.path} ends with an incomplete record at byte "
                f"{self._offset}; torch cannot read past it either"
            )
        return size

    def _value(self, fd: int, key: bytes) -> Optional[bytes]:
        """The latest value of ``key``, read from the file (the caller holds the lock)."""
        span = self._index.get(key)
        if span is None:
            return None
        offset, length = span
        parts = []
        while length:
            part = os.pread(fd, min(_CHUNK, length), offset)
            if not part:
                raise StateCorruptError(f"the FileStore file {self.path} shrank while being read")
            parts.append(part)
            offset += len(part)
            length -= len(part)
        return b"".join(parts)

    def _read(self, use: Callable[[Optional[int]], T]) -> T:
        """``use(fd)`` under LOCK_SH after indexing the file (``fd`` is None and the
        index empty when the file does not exist); the caller holds ``_lock``."""
        fd = self._open(write=False)
        if fd is None:
            self._index, self._offset, self._ident, self._head = {}, 0, None, b""
            return use(None)
        try:
            self._lock_file(fd, exclusive=False)
            self._refresh(fd)
            return use(fd)
        finally:
            os.close(fd)  # also releases the flock

    def versions(self, key: Key, limit: int) -> Iterator[Tuple[int, Optional[bytes], int]]:
        """Every value ever written to ``key``, oldest first: ``(record number, value, its full length)``,
        value ``None`` for a deletion.

        The record number counts every record of the log from 1.  Streamed: the
        log is read one chunk at a time, each chunk under its own LOCK_SH (so
        torch's writers wait for one ``pread``, never for the whole replay), up
        to the size the file had at the first read; nothing is yielded while
        the lock is held.  Values of other keys are parsed or skipped, never
        kept; a value of ``key`` longer than ``limit`` comes cut to
        ``limit + 1`` bytes (so a reader can tell it is too long without
        reading it all).
        """
        key = _b(key)
        tomb = b"-" + key
        fd = self._open(write=False)
        if fd is None:
            return
        try:
            size: Optional[int] = None
            offset = number = 0
            while True:
                with self._shared(fd):
                    if size is None:
                        size = os.fstat(fd).st_size
                    chunk = os.pread(fd, min(_CHUNK, size - offset), offset) if offset < size else b""
                if not chunk:
                    if offset < size:
                        raise StateCorruptError(f"the FileStore file {self.path} shrank while being read")
                    return
                records, used = parse_records(chunk)
                found: List[Tuple[int, Optional[bytes], int]] = []
                for record_key, value in records:
                    number += 1
                    if record_key == key:
                        found.append((number, value[:limit + 1], len(value)))
                    elif record_key == tomb:
                        found.append((number, None, 0))
                del records
                offset += used
                if not used:  # one record longer than a chunk: its header first, its value only if it is ours
                    number += 1
                    offset, big = self._big_record(fd, offset, size, key, tomb, limit)
                    if big is not None:
                        found.append((number, *big))
                yield from found

        finally:
            os.close(fd)

    def _big_record(self, fd: int, offset: int, size: int, key: bytes, tomb: bytes,
                    limit: int) -> Tuple[int, Optional[Tuple[Optional[bytes], int]]]:
        """The record at ``offset`` that a chunk cannot hold: (offset after it, ``(value, full length)`` if it is
        ``key``'s)."""
        with self._shared(fd):
            klen = _U32.unpack(os.pread(fd, 4, offset).ljust(4, b"\0"))[0]
            ours = klen in (len(key), len(tomb))
            record_key = os.pread(fd, klen, offset + 4) if ours else b""
            vlen_bytes = os.pread(fd, 4, offset + 4 + klen)
            end = offset + 8 + klen + (_U32.unpack(vlen_bytes)[0] if len(vlen_bytes) == 4 else size)
            if end > size:
                raise StateCorruptError(
                    f"the FileStore file {self.path} ends with an incomplete record at byte "
                    f"{offset}; torch cannot read past it either"
                )
            if record_key == key:
                start = offset + 8 + klen
                return end, (os.pread(fd, min(end - start, limit + 1), start), end - start)
        return end, ((None, 0) if record_key == tomb else None)

    @contextlib.contextmanager
    def _shared(self, fd: int) -> Iterator[None]:
        """LOCK_SH on ``fd`` for the block (torch's rule for reading)."""
        self._lock_file(fd, exclusive=False)
        try:
            yield
        finally:
            _flock().flock(fd, _flock().LOCK_UN)

    def _append(self, fd: int, key: bytes, value: bytes) -> None:
        """Append one record at EOF (the caller holds LOCK_EX and just refreshed)."""
        record = encode_record(key, value)
        os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view):]
        if self._offset == 0:
            self._head = record[:_HEAD]
        if key[:1] == b"-":
            self._index.pop(key[1:], None)
        else:
            self._index[key] = (self._offset + 8 + len(key), len(value))
        self._offset += len(record)

    def _update(self, key: bytes, decide) -> bytes:
        """Under LOCK_EX: ``decide(current) -> (value to append or None, reply)``."""
        if key in _INTERNAL or key[:1] == b"-":
            raise BackendConfigError(f"refusing to write the FileStore bookkeeping key {key!r}")
        with self._lock:
            fd = self._open(write=True)
            assert fd is not None
            try:
                self._lock_file(fd, exclusive=True)
                self._refresh(fd)
                new, reply = decide(self._value(fd, key))
                if new is not None:
                    self._append(fd, *new)
                return reply
            except OSError as exc:
                raise BackendUnavailableError(
                    f"cannot write the FileStore file {self.path}: {exc.strerror}"
                ) from exc
            finally:
                os.close(fd)

    # -- operations (torch's Store semantics) ---------------------------------------
    def check(self, keys: Iterable[Key]) -> bool:
        with self._lock:
            return self._read(lambda fd: all(_b(k) in self._index for k in keys))

    def get(self, key: Key) -> Optional[bytes]:
        """The value of ``key`` or ``None`` when absent (never waits for it to appear)."""
        with self._lock:
            return self._read(lambda fd: None if fd is None else self._value(fd, _b(key)))

    def multi_get(self, keys: Sequence[Key]) -> List[Optional[bytes]]:
        """The values of ``keys``, from one replay; memory is the sum of the values
        asked for, so a caller walking many keys asks for few at a time."""
        with self._lock:
            return self._read(lambda fd: [None if fd is None else self._value(fd, _b(k)) for k in keys])

    def list_keys(self) -> List[bytes]:
        """Every stored key, torch's bookkeeping keys included (no value is read)."""
        with self._lock:
            return self._read(lambda fd: list(self._index))

    def value_sizes(self, keys: Sequence[Key]) -> List[Optional[int]]:
        """The length of each key's latest value (None when absent), from one replay (no value read):
        lets a caller walking many keys ask :meth:`multi_get` for a bounded number of bytes at a time."""
        with self._lock:
            return self._read(lambda fd: [None if span is None else span[1]
                                          for span in map(self._index.get, map(_b, keys))])

    def compare_set(self, key: Key, expected: Key, desired: Key) -> bytes:
        """torch's ``compare_set``: the value current after the call.

        Like torch's: a missing key with empty ``expected`` is created; a
        missing key with non-empty ``expected`` creates nothing and replies
        ``expected``.
        """
        key, expected, desired = _b(key), _b(expected), _b(desired)

        def decide(current: Optional[bytes]):
            if current is None:
                if expected:
                    return None, expected
                return (key, desired), desired
            if current == expected:
                return (key, desired), desired
            return None, current

        return self._update(key, decide)

    def set(self, key: Key, value: Key) -> None:
        key, value = _b(key), _b(value)
        self._update(key, lambda current: ((key, value), b""))

    def delete_key(self, key: Key) -> bool:
        """Append a tombstone (like torch, even for a missing key); True if it existed."""
        key = _b(key)
        return bool(self._update(key, lambda current: ((b"-" + key, b""), b"1" if current is not None else b"")))

    def __repr__(self) -> str:
        return f"<FileStore {self.path}>"
