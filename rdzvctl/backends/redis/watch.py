"""The Redis backend's ``watch_wait``: keyspace notifications when the server sends them, else polling.

The driver (:mod:`rdzvctl.backends.watching`) owns de-duplication, the
outage ride-out and stop; this module only waits.  With notifications on
(``notify-keyspace-events`` with ``K`` plus ``A``, or ``g`` and ``h``) it
subscribes to the run's key, then re-reads the state on every notification
and every few seconds in case one was lost.  Without them it polls with a
backoff.  Redis keeps no history, so states written during an outage are not
replayed: the first state after it is reported once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Generator

from rdzvctl.backends.watching import Change, poll_changes

if TYPE_CHECKING:
    from rdzvctl.backends.redis.backend import RedisBackend

__all__ = ["notifications_enabled", "keyspace_changes", "STOP_CHECK"]

STOP_CHECK = 0.1  # seconds between checks of ``stop`` while waiting for a notification
RESYNC_SECONDS = 5.0  # re-read at least this often, in case a notification was lost


def notifications_enabled(backend: "RedisBackend") -> bool:
    """True if the server publishes the keyspace events ``watch`` needs.

    Needs ``K`` plus ``A`` (or both ``g`` and ``h``) in ``notify-keyspace-events``;
    a server that forbids or renamed CONFIG counts as off.
    """
    from redis import exceptions as rx

    node = backend.node_client()
    with backend.errors():
        try:
            reply = node.config_get("notify-keyspace-events")
        except rx.ResponseError:
            return False
    raw = reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b""))
    flags = raw.decode() if isinstance(raw, bytes) else str(raw)
    return "K" in flags and ("A" in flags or ("g" in flags and "h" in flags))


def keyspace_changes(backend: "RedisBackend", stop: threading.Event, interval: float) -> Generator[Change, None, None]:
    """``(state, None)`` after each notification (or resync), or each poll without notifications."""
    if not notifications_enabled(backend):
        yield from poll_changes(backend.get_state, stop, interval, backoff=True)
        return
    channel = f"__keyspace@{backend.settings.db}__:{backend.key}"
    resync = max(interval, RESYNC_SECONDS)
    pubsub: Any = backend.node_client().pubsub(ignore_subscribe_messages=True)
    try:
        with backend.errors():
            pubsub.subscribe(channel)
        while not stop.is_set():
            # Subscribed before this read, so no change between read and wait is missed.
            yield backend.get_state(), None
            deadline = time.monotonic() + resync
            while not stop.is_set() and time.monotonic() < deadline:
                with backend.errors():
                    message = pubsub.get_message(timeout=STOP_CHECK)
                    if message is not None:
                        while pubsub.get_message(timeout=0) is not None:
                            pass  # one re-read covers a burst (hset + expire)
                if message is not None:
                    break
    finally:
        with contextlib.suppress(Exception):
            pubsub.close()
