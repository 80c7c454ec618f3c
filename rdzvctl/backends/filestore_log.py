"""torch's c10d ``FileStore`` log format: the records, walked and written (no I/O).

The file is an append-only log without header: each record is a u32 LE key
length, the key, a u32 LE value length and the value.  The last record of a key
wins; a record whose key starts with ``-`` (``-/k``) deletes ``/k``.
:mod:`rdzvctl.backends.filestore` reads and appends the file under torch's
locking; the history replay and the benchmarks walk the same records.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Optional, Tuple

__all__ = ["Span", "iter_records", "parse_records", "index_records", "encode_record"]

_U32 = struct.Struct("<I")
Span = Tuple[int, int]  # (offset, length) of a value in the file


def iter_records(data: bytes, limit: Optional[int] = None) -> Iterator[Tuple[bytes, int, int]]:
    """The complete records at the start of ``data``, in order: ``(key, value offset, value length)``,
    offsets in ``data``.  A value may run past ``data`` up to ``limit`` (default: the end of
    ``data``), for a caller that knows the file holds it; the walk stops at the first record
    that is not complete, so a record's value ends where the next record starts."""
    pos, end = 0, len(data)
    limit = end if limit is None else limit
    unpack = _U32.unpack_from
    while pos + 4 <= end:
        klen = unpack(data, pos)[0]
        kend = pos + 4 + klen
        if kend + 4 > end:
            break
        vlen = unpack(data, kend)[0]
        vstart = kend + 4
        if vstart + vlen > limit:
            break
        yield data[pos + 4:kend], vstart, vlen
        pos = vstart + vlen


def parse_records(data: bytes) -> Tuple[List[Tuple[bytes, bytes]], int]:
    """Complete ``(key, value)`` records in ``data`` and the bytes they span."""
    records, pos = [], 0
    for key, vstart, vlen in iter_records(data):
        pos = vstart + vlen
        records.append((key, data[vstart:pos]))
    return records, pos


def index_records(data: bytes, base: int, size: int, index: Dict[bytes, Span]) -> int:
    """Apply the records starting in ``data`` (read at file offset ``base`` of a
    ``size``-byte file) to ``index`` as value spans; returns the file offset
    after the last complete record.  A value may run past ``data``: it is
    skipped, not read, when the file holds all of it."""
    pos = 0
    for key, vstart, vlen in iter_records(data, size - base):
        if key[:1] == b"-":
            index.pop(key[1:], None)
        else:
            index[key] = (base + vstart, vlen)
        pos = vstart + vlen
    return base + pos


def encode_record(key: bytes, value: bytes) -> bytes:
    return b"".join((_U32.pack(len(key)), key, _U32.pack(len(value)), value))
