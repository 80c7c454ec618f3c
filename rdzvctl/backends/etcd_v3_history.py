"""The etcd-v3 backend's history: the state key's MVCC revisions since the last compaction.

etcd keeps every revision of a key until a compaction removes those before
some revision C.  A watch created with ``start_revision`` replays the key's
past PUT and DELETE events in revision order; one created before C is
canceled at once with ``compact_revision = C`` (the etcd v3 API's
``WatchResponse``).  So :func:`read_history`:

1. reads the key (its ``mod_revision`` M, and the store revision H);
2. asks for revision 1 (``kv/range`` with ``revision=1``): refused as
   compacted, a watch from 1 names C, the key's value at C (``revision=C``)
   is the oldest version left, and the notice says older ones are gone;
3. replays the watch from 1 (or C), ``fragment=True`` so a large batch
   arrives in parts, one event at a time.

It stops at M when the key exists (exact), at any event after H (a write
made since), and, when the key is gone (its last event is a DELETE at an
unknown revision), once the replay has been quiet for :data:`SETTLE_SECONDS`
after a DELETE (etcd replays a pending watch in batches of 1000 revisions
every 100 ms; quiet after a PUT means the replay was cut short: it resumes).  A broken stream
resumes after the last revision seen.  etcd records no write time:
``written_at`` is None (the reader infers it from the heartbeats);
``revision`` is the event's ``mod_revision``.
"""

from __future__ import annotations

import threading
from contextlib import closing
from typing import Any, Iterator, Optional

from rdzvctl.backends.base import HistoryVersion, HistoryWindow
from rdzvctl.backends.etcd_v3 import _stored_state
from rdzvctl.errors import BackendUnavailableError

__all__ = ["read_history", "SETTLE_SECONDS"]

#: With the key gone, the replay is over once the watch has been quiet this long.
SETTLE_SECONDS = 1.0
#: Re-opened watches (after a broken stream) before giving up.
_RESUMES = 3


def _compact_revision(gateway: Any, key: bytes, timeout: float) -> Optional[int]:
    """The revision etcd compacted up to, or None when revision 1 is still there."""
    from rdzvctl.backends.etcd_gateway import RevisionCompactedError

    try:
        gateway.range(key, revision="1", count_only=True)
        return None
    except RevisionCompactedError:
        pass
    stop = threading.Event()
    with closing(gateway.watch(key, 1, stop, idle=timeout)) as results:
        for result in results:
            if result.get("compact_revision"):
                return int(result["compact_revision"])
            if result.get("events"):
                break  # compacted meanwhile and not any more? take the replay as it is
    raise BackendUnavailableError("etcd refused revision 1 as compacted but its watch did not say up to where")


def read_history(backend: Any) -> HistoryWindow:
    """The key's versions since the last compaction, oldest first (see the module docstring)."""
    gateway, key, timeout = backend.gateway, backend._key, backend.address.timeout
    doc = gateway.range(key)
    head = int(doc["header"]["revision"])
    kvs = doc.get("kvs") or []
    end = int(kvs[0]["mod_revision"]) if kvs else None
    compacted = _compact_revision(gateway, key, timeout)
    notice = None
    if compacted is not None:
        notice = f"etcd compacted revisions before {compacted}: older versions are gone"
    return HistoryWindow(_versions(backend, compacted, head, end), notice)


def _versions(backend: Any, compacted: Optional[int], head: int, end: Optional[int]) -> Iterator[HistoryVersion]:
    gateway, key, timeout = backend.gateway, backend._key, backend.address.timeout
    start, removed = 1, True  # removed: the last version seen is a DELETE (or none was seen)
    if compacted is not None:
        start = compacted
        survivor = gateway.range(key, revision=str(compacted)).get("kvs") or []
        if survivor and int(survivor[0]["mod_revision"]) < compacted:  # written before C, still current at C
            revision = int(survivor[0]["mod_revision"])
            yield HistoryVersion.unwrapped(_stored_state, survivor[0], None, revision)
            removed = False
            if end is not None and revision >= end:
                return
    idle = timeout if end is not None else min(SETTLE_SECONDS, timeout)
    stop = threading.Event()
    resumes = 0
    while True:
        with closing(gateway.watch(key, start, stop, idle=idle, fragment=True)) as results:
            for result in results:
                if result.get("compact_revision"):
                    raise BackendUnavailableError(
                        f"etcd compacted revision {start} away while its history was read; read it again")
                for event in result.get("events") or ():
                    kv = event.get("kv") or {}
                    revision = int(kv["mod_revision"])
                    if revision > head:
                        return  # written after the read began
                    removed = event.get("type") == "DELETE"
                    yield (HistoryVersion(None, None, revision) if removed else
                           HistoryVersion.unwrapped(_stored_state, kv, None, revision))
                    start = revision + 1
                    if end is not None and revision >= end:
                        return
        if end is None and removed:
            return  # the key is gone and the replay went quiet after a DELETE: that was its last one
        resumes += 1
        if resumes > _RESUMES:
            target = f"revision {end}" if end is not None else "the key's removal"
            raise BackendUnavailableError(f"etcd's watch of {backend.key} ended before its history reached {target}")
