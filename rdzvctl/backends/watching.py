"""The one watch driver behind every backend's ``watch``.

A backend supplies two hooks (see :class:`rdzvctl.backends.base.RendezvousBackend`):

* ``watch_read() -> (state, cursor)``: read the state now, plus a *cursor*,
  whatever the backend needs to wait for the changes after this read (etcd's
  next index/revision; ``None`` for a backend that polls);
* ``watch_wait(cursor, stop, interval)``: a generator that waits for the next
  changes after ``cursor`` (pushed by the server, or polled) and yields
  ``(state, cursor)`` for each one it sees, or :data:`RESYNC` when the driver
  must read afresh (history compacted, an error event).  It may simply end
  (an idle or broken stream): the driver then waits again from the last cursor.

:func:`drive_watch` owns everything else, the same for every backend:

* the first item is the current state (unless ``since`` is the state the
  caller already knows); after that an item only when the token changes, so
  a re-read, a replayed event or a burst of notifications never repeats one;
* an outage (a restarted server, a failover, a leader election) is ridden out
  for up to ``timeout`` seconds once the first read worked: the hooks are
  called again (reconnect, resubscribe, resume from the cursor); a longer
  outage, or a failure of the very first read (bad endpoint, credentials),
  raises the backend's :class:`~rdzvctl.errors.BackendUnavailableError`;
* setting ``stop`` ends the iteration promptly (the hooks wait on ``stop``).
"""

from __future__ import annotations

import threading
import time
from contextlib import closing
from typing import Any, Callable, Generator, Iterator, Optional, Tuple, Union

from rdzvctl.errors import BackendUnavailableError

__all__ = ["RESYNC", "Change", "drive_watch", "poll_changes"]

#: Yielded by a ``watch_wait`` hook: read the state afresh before waiting again.
RESYNC: Any = object()
#: A state seen by a hook and where to resume waiting after it.
Change = Tuple[Any, Any]
#: Seconds between attempts while an outage is ridden out.
RETRY_PAUSE = 0.2
#: Seconds before waiting again after a hook ended without a change (an idle stream).
IDLE_PAUSE = 0.05

ReadHook = Callable[[], Change]
WaitHook = Callable[[Any, threading.Event, float], Generator[Union[Change, Any], None, None]]


def drive_watch(
    read: ReadHook,
    wait: WaitHook,
    *,
    timeout: float,
    interval: float = 1.0,
    stop: Optional[threading.Event] = None,
    since: Optional[Tuple[bytes, Any]] = None,
) -> Iterator[Optional[Tuple[bytes, Any]]]:
    """Yield the state (``None`` when absent) each time its token changes; see the module docstring."""
    stop = stop or threading.Event()
    owed = since is None  # the first item (the current state) is still owed
    last: Any = None if since is None else since[1]
    cursor: Any = RESYNC
    started = False  # the first read worked: from then on outages are ridden out
    outage: Optional[float] = None  # when the server stopped answering

    def fresh(state: Any) -> bool:
        nonlocal owed, last
        token = None if state is None else state[1]
        if owed or token != last:
            owed, last = False, token
            return True
        return False

    while not stop.is_set():
        try:
            if cursor is RESYNC:
                current, cursor = read()
                started, outage = True, None
                if fresh(current):
                    yield current
                continue
            with closing(wait(cursor, stop, interval)) as changes:
                for change in changes:
                    outage = None
                    if change is RESYNC:
                        cursor = RESYNC
                        break
                    current, cursor = change
                    if fresh(current):
                        yield current
                    if stop.is_set():
                        return
                else:  # the hook ended without an error: the server answered
                    outage = None
                    stop.wait(IDLE_PAUSE)
        except BackendUnavailableError:
            if not started or stop.is_set():
                raise
            now = time.monotonic()
            outage = now if outage is None else outage
            if now - outage >= timeout:
                raise
            stop.wait(min(RETRY_PAUSE, timeout))


def poll_changes(
    read: Callable[[], Optional[Tuple[bytes, Any]]],
    stop: threading.Event,
    interval: float,
    backoff: bool = False,
) -> Generator[Change, None, None]:
    """A ``watch_wait`` for a backend without server push: ``read`` every ``interval`` seconds.

    With ``backoff`` the pause grows (x1.5, up to ``max(interval, min(8 x interval, 5 s))``)
    while nothing changes and drops back to ``interval`` after a change.
    """
    cap = max(interval, min(interval * 8, 5.0)) if backoff else interval
    delay = interval
    last: Any = object()
    while not stop.wait(delay):
        current = read()
        token = None if current is None else current[1]
        if token != last:
            delay = interval
        else:
            delay = min(delay * 1.5, cap)
        last = token
        yield current, None
