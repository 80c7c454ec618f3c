"""The etcd-v2 backend's history: the state key's events still in the server's event window.

The v2 store keeps the last 1000 events of the *whole server* in memory
(every key's writes count, and a restart empties it).  ``GET
/v2/keys/<key>?wait=true&waitIndex=N`` answers at once with the key's first
event at index N or later when the window still holds one, blocks when there
is none yet, and fails with error 401 ("the requested history has been
cleared [<oldest>/<asked>]") when N is older than the window.
:func:`read_history` asks for index 1: a 401 names the oldest index kept, and
the replay starts there (the notice says how far back it goes).  One request
per event (at most 1000), each answered at once, so the replay stops at the
key's current ``modifiedIndex`` when it exists, at any event after the
server's ``X-Etcd-Index`` read at the start, and when a wait has nothing to
answer for :data:`SETTLE_SECONDS` (the window has no more events of the key).
etcd v2 records no write time: ``written_at`` is None; ``revision`` is the
event's ``modifiedIndex``.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Dict, Iterator, Optional

from rdzvctl.backends.base import HistoryVersion, HistoryWindow
from rdzvctl.errors import BackendUnavailableError

__all__ = ["read_history", "SETTLE_SECONDS", "WINDOW_EVENTS"]

#: A wait with nothing to answer for this long: the window holds no more events of the key.
SETTLE_SECONDS = 0.5
#: The events the v2 store keeps (etcd's ``v2store`` ``newWatchHub(1000)``).
WINDOW_EVENTS = 1000

_INDEX_CLEARED = 401
_REMOVED = ("delete", "compareAndDelete", "expire")
_CLEARED_CAUSE = re.compile(r"\[(\d{1,19})/\d{1,19}\]")


def _first_event(backend: Any, index: int, stop: threading.Event, idle: float) -> Optional[Dict[str, Any]]:
    event = backend._wait(index, stop, idle)
    if event is not None and event.get("errorCode") not in (None, _INDEX_CLEARED):
        message = str(event.get("message") or event.get("errorCode"))[:200]
        raise BackendUnavailableError(f"etcd at {backend.describe()} refused to replay {backend.key}: {message}")
    return event


def read_history(backend: Any) -> HistoryWindow:
    """The key's events in the server's window, oldest first (see the module docstring)."""
    status, doc, headers = backend._call("GET", backend.key, quorum="true")
    head = int(headers.get("x-etcd-index", doc.get("index", 0)))
    node = doc.get("node") if "errorCode" not in doc else None
    end = int(node["modifiedIndex"]) if isinstance(node, dict) and "modifiedIndex" in node else None
    idle = min(SETTLE_SECONDS, backend.address.timeout)
    stop = threading.Event()
    start, notice = 1, None
    first = _first_event(backend, 1, stop, idle)
    if first is not None and first.get("errorCode") == _INDEX_CLEARED:
        found = _CLEARED_CAUSE.search(str(first.get("cause", "")))
        if found is None:
            raise BackendUnavailableError(f"etcd at {backend.describe()} said its event window was cleared "
                                          "without saying where it starts")
        start, first = int(found.group(1)), None
        notice = (f"etcd v2 keeps the last {WINDOW_EVENTS} events of the whole server; "
                  f"this history goes back to index {start}")
    return HistoryWindow(_versions(backend, first, start, head, end, stop, idle), notice)


def _versions(backend: Any, first: Optional[Dict[str, Any]], start: int, head: int, end: Optional[int],
              stop: threading.Event, idle: float) -> Iterator[HistoryVersion]:
    event = first
    while start <= head:
        if event is None:
            event = _first_event(backend, start, stop, idle)
        if event is None or event.get("errorCode") is not None or not isinstance(event.get("node"), dict):
            return  # nothing more of the key in the window (or it moved past us: 401)
        node = event["node"]
        index = int(node.get("modifiedIndex", 0))
        if index > head or index < start:
            return
        if event.get("action") not in _REMOVED and "value" in node:
            yield HistoryVersion.unwrapped(lambda n: backend._decode_node(n)[0], node, None, index)
        else:
            yield HistoryVersion(None, None, index)
        if end is not None and index >= end:
            return
        start, event = index + 1, None
