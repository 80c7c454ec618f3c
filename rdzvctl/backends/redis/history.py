"""The run's history in Redis: the last N *semantic* versions, kept by the write script itself.

Every write (rdzvctl's own and torch's agents' through rdzvctl's torchrun
handler: both call :meth:`RedisBackend.set_state`) passes the script a digest
of the new state's semantic part (:func:`semantic_digest`: round, complete,
deadline, closed, participants with ranks, wait list, redundancy list; not
the heartbeats).  The script keeps the digest in the state hash (field
``digest``) and appends the new state to the run's history list only when the
digest differs from the stored one, so the heartbeat churn (every agent
rewrites the whole state every keep-alive interval) never reaches the list.

History list ``{<state key>}:history`` (:func:`history_key`, same cluster slot
as the state), a LIST of entries ``"<seq> <version> <seconds>.<micros> <value>"``:
``seq`` counts the run's semantic versions from 1 (the previous entry's plus
one), ``version`` is the token the write produced, the time is the server's
``TIME`` at the write, ``value`` the state's base64 (as in the hash) or ``-``
for a removal (``clear``).  ``LTRIM`` keeps the last ``history`` entries
(``--rdzv-conf history=N``, :data:`DEFAULT_HISTORY`, at most
:data:`MAX_HISTORY`, 0 keeps none); the list gets the run's TTL on every
write.  See ``docs/redis-layout.md``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterator, List, NamedTuple, Optional

from rdzvctl.backends.base import HistoryVersion, HistoryWindow
from rdzvctl.errors import StateError

__all__ = [
    "DEFAULT_HISTORY",
    "MAX_HISTORY",
    "history_key",
    "semantic_digest",
    "parse_entry",
    "read_history",
]

#: Semantic versions kept per run unless ``--rdzv-conf history=N`` says otherwise.
DEFAULT_HISTORY = 100
#: The largest ``history``: each entry is a whole state (a 1,000-node state is ~100 KB of base64).
MAX_HISTORY = 10_000
#: Entries per LRANGE while reading, at most; fewer when entries are large (see :data:`READ_BYTES`).
READ_BATCH = 32
#: About the most bytes one LRANGE brings back (the newest entry's size tells how many fit).
READ_BYTES = 8 << 20
#: The ``last`` of a read that goes to the end of the list (its newest entry is not the script's).
_NO_END = 1 << 63
#: How many times a read starts over after writers trimmed the list under it.
_RESTARTS = 8


def history_key(key: str) -> str:
    """The history list of state key ``key``, in the same cluster slot (like the version counter)."""
    from rdzvctl.backends.redis.layout import counter_key

    counter = counter_key(key)
    return (counter[: -len(":version")] if counter else key) + ":history"


def semantic_digest(state: bytes) -> str:
    """A digest of what torch's rendezvous means by ``state``, without its heartbeats.

    Decoded with the safe codec (never unpickled).  Bytes that do not decode
    get a digest of the bytes themselves (prefix ``b:``), so a corrupt write is
    recorded and never equals a decodable one (prefix ``s:``).
    """
    import hashlib

    from rdzvctl.state.codec import decode

    try:
        decoded = decode(state)
    except (StateError, RecursionError, MemoryError):
        return "b:" + hashlib.blake2b(bytes(state), digest_size=16).hexdigest()
    deadline = decoded.deadline.isoformat() if decoded.deadline is not None else ""
    semantic = (
        decoded.round, decoded.complete, deadline, decoded.closed,
        sorted((node.id, rank) for node, rank in decoded.participants.items()),
        sorted(node.id for node in decoded.wait_list),
        sorted(node.id for node in decoded.redundancy_list),
    )
    return "s:" + hashlib.blake2b(repr(semantic).encode(), digest_size=16).hexdigest()


class Entry(NamedTuple):
    """One parsed history entry; ``version`` is the raw value (None: a removal)."""

    seq: int
    version: HistoryVersion


def parse_entry(raw: Any) -> Optional[Entry]:
    """A list entry as a version, or ``None`` when it is not one of the script's entries (untrusted)."""
    from rdzvctl.state.codec import decode_base64

    if not isinstance(raw, bytes):
        return None
    parts = raw.split(b" ", 3)
    if len(parts) != 4 or not parts[0].isdigit() or len(parts[0]) > 19:
        return None
    seconds, _, micros = parts[2].partition(b".")
    if not (seconds.isdigit() and micros.isdigit() and len(seconds) <= 12 and len(micros) <= 6):
        return None
    try:
        written = _dt.datetime.fromtimestamp(int(seconds), _dt.timezone.utc) + _dt.timedelta(microseconds=int(micros))
    except (ValueError, OverflowError, OSError):  # past year 9999: no TIME of a Redis server wrote that
        return None
    seq = int(parts[0])
    if parts[3] == b"-":
        return Entry(seq, HistoryVersion(None, written, seq))
    return Entry(seq, HistoryVersion.unwrapped(decode_base64, parts[3], written, seq))


def _seq(client: Any, key: str, index: int) -> "tuple[Optional[int], int]":
    """The sequence number of the entry at ``index`` (None: none there, or not an entry) and its size."""
    raw = client.lindex(key, index)
    entry = parse_entry(raw)
    return (None if entry is None else entry.seq), len(raw) if isinstance(raw, bytes) else 0


def read_history(backend: Any) -> HistoryWindow:
    """The run's kept semantic versions, oldest first, streamed a few entries at a time (bounded memory).

    Reads up to the newest entry there was when called.  Writers may append
    (and trim the head) meanwhile: each batch re-reads the entry before it,
    and when that moved the read goes back to where the entry now is (or to
    the head), skipping what it already yielded, so no kept version is
    skipped or repeated.
    """
    client, key = backend.client, backend.history_key
    with backend.errors():
        kind = client.type(key)
        if kind not in (b"list", b"none", "list", "none"):
            from rdzvctl.errors import StateCorruptError

            raise StateCorruptError(f"the run's history key {key!r} holds a {kind.decode() if isinstance(kind, bytes) else kind} "
                                    "where rdzvctl keeps a list: it is no history rdzvctl wrote (the write script "
                                    "leaves it alone); delete it to keep a history again")
        (first, _), (last, size) = _seq(client, key, 0), _seq(client, key, -1)
        length = client.llen(key) if first is None or last is None else 1
    kept = ("rdzvctl's Redis layout keeps only the last N semantic versions (--rdzv-conf history=N of the "
            f"writers, default {DEFAULT_HISTORY}); heartbeat-only writes are not kept")
    if (first is None or last is None) and length:
        # Its first or newest entry is not one the write script wrote: read what parses, to the end.
        notice = f"{kept}; the list also holds entries the write script did not write (skipped)"
        return HistoryWindow(_stream(backend, client, key, _NO_END, READ_BATCH), notice)
    if first is None or last is None:
        notice = ("no history kept for this run: rdzvctl's Redis layout keeps the last N semantic versions "
                  f"(--rdzv-conf history=N of the writers, default {DEFAULT_HISTORY}; 0 keeps none) from the first "
                  "write made with it on")
        return HistoryWindow(iter(()), notice)
    notice = f"{kept}; {first - 1} older ones were trimmed" if first > 1 else kept
    batch = max(1, min(READ_BATCH, READ_BYTES // max(size, 1)))
    return HistoryWindow(_stream(backend, client, key, last, batch), notice)


def _stream(backend: Any, client: Any, key: str, last: int, batch: int) -> Iterator[HistoryVersion]:
    seen, start, restarts = 0, 0, 0
    while seen < last:
        low = start - 1 if start > 0 else 0
        with backend.errors():
            rows: List[Any] = client.lrange(key, low, low + batch)
        if not rows or (last == _NO_END and low == start - 1 and len(rows) == 1):
            return  # nothing after the row read last: the end of the list
        entries = [entry for entry in map(parse_entry, rows) if entry is not None]
        if low > 0 and restarts < _RESTARTS and (not entries or entries[0].seq > seen):
            # The head was trimmed under us: entries are numbered one by one, so the one after ``seen``
            # is ``seen - head + 1`` places from the head; if that guess fails too, start over from it.
            restarts += 1
            with backend.errors():
                head, _ = _seq(client, key, 0)
            start = seen - head + 1 if restarts == 1 and head is not None and head <= seen else 0
            continue
        for entry in entries:
            if entry.seq <= seen:
                continue
            if entry.seq > last:
                return
            seen = entry.seq
            yield entry.version
        start = low + len(rows)
