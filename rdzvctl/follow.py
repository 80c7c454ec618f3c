"""Follow a run live: the semantic events of ``rdzvctl watch``, as a generator.

:func:`follow` reads the run through ``backend.watch(interval=..., stop=...)``
(the backend's native watch, or polling) on a background thread and yields
one dict per event, in order::

    from rdzvctl.backends.base import Address
    from rdzvctl.backends.registry import open_backend
    from rdzvctl.follow import follow

    address = Address.from_env("etcd-v3", "10.0.0.5:2379", "job42", None, None)
    with open_backend(address) as backend:
        for event in follow(backend, until="complete", duration=600):
            print(event["time"], event["kind"], event["message"])

Every event has ``time`` (ISO 8601, UTC), ``kind``, ``message`` and
``run_id``; node events add ``node`` (one node) or ``count`` and ``nodes``
(many nodes of one kind at once, see :func:`rdzvctl.state.analysis.group_events`).
The kinds: ``snapshot`` (first, with ``round``), the changes of
:func:`rdzvctl.state.analysis.diff_states`, ``heartbeat-stale`` /
``heartbeat-fresh``, ``state-corrupt`` (watching goes on), ``state-removed``
and ``until-met`` (last).  A backend error ends the generator by raising it;
``until`` not met within ``duration`` raises
:class:`rdzvctl.errors.ConditionNotMetError`.  Closing the generator (or
leaving the ``for``) stops the background read; the backend stays open.
No printing here.
"""

from __future__ import annotations

import datetime as _dt
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Set, Tuple

from rdzvctl import clock
from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.errors import ConditionNotMetError, StateError
from rdzvctl.state.analysis import DEFAULT_KEEP_ALIVE, Event, KeepAlive, diff_states, group_events, stale_transitions
from rdzvctl.state.codec import decode
from rdzvctl.state.jsonform import format_time
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["follow", "parse_until", "UNTIL_HELP"]

_UNTIL = re.compile(r"^(complete|closed|absent|round>=(\d+))$")

#: What :func:`parse_until` accepts, for error messages.
UNTIL_HELP = "expected complete, closed, absent or round>=N"

Predicate = Callable[[Optional[RendezvousState], bool], bool]


def parse_until(text: str) -> Predicate:
    """``complete|closed|absent|round>=N`` as a predicate over (state, exists); ValueError otherwise."""
    match = _UNTIL.match(text.strip())
    if not match:
        raise ValueError(UNTIL_HELP)
    kind = match.group(1)
    if kind == "complete":
        return lambda state, exists: state is not None and state.complete
    if kind == "closed":
        return lambda state, exists: state is not None and state.closed
    if kind == "absent":
        return lambda state, exists: not exists
    target = int(match.group(2))
    return lambda state, exists: state is not None and state.round >= target


def follow(
    backend: RendezvousBackend,
    *,
    interval: float = 1.0,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    until: Optional[str] = None,
    duration: Optional[float] = None,
    now: Optional[Callable[[], _dt.datetime]] = None,
) -> Generator[Dict[str, Any], None, None]:
    """Yield the run's semantic events as they happen (see the module docstring).

    ``interval`` is the polling interval where the backend has no native
    watch, and how often heartbeats are checked for going stale (torch's
    ``keep_alive``).  With ``until`` (``complete``, ``closed``, ``absent``,
    ``round>=N``) the generator ends after an ``until-met`` event once it
    holds; ``duration`` (seconds) ends it, raising ConditionNotMetError if
    ``until`` was given.  ``now`` is the clock (default
    :func:`rdzvctl.clock.now_utc`).
    """
    predicate = None if until is None else parse_until(until)
    clock_now = now if now is not None else (lambda: clock.now_utc())
    deadline = None if duration is None else time.monotonic() + duration
    items: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                for item in backend.watch(interval=interval, stop=stop):
                    items.put(("state", item))
                    if stop.is_set():
                        return
                return
            except StateError as exc:
                # The stored value cannot even be unwrapped (bad base64, a key of another
                # type): report it and watch again, so a repair or removal is seen.
                items.put(("corrupt", exc))
                stop.wait(interval)
            except Exception as exc:  # raised by the generator, in the caller's thread
                items.put(("error", exc))
                return

    def event(kind: str, message: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        out = {"time": format_time(clock_now()), "kind": kind, "message": message, "run_id": backend.run_id}
        if extra:
            out.update(extra)
        return out

    def grouped(events: List[Event]) -> Iterator[Dict[str, Any]]:
        """One event per change; many nodes of one kind at once become one event with a count."""
        for kind, message, fields in group_events(events):
            yield event(kind, message, fields or None)

    thread = threading.Thread(target=read, name="rdzvctl-watch", daemon=True)
    thread.start()
    previous: Optional[RendezvousState] = None
    first = True
    exists = False
    corrupt: Optional[str] = None  # why the stored value is unusable, while it is
    stale: Set[NodeDesc] = set()
    try:
        while True:
            wait = interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                kind, item = items.get(timeout=wait)
            except queue.Empty:
                kind, item = "tick", None
            if kind == "error":
                raise item
            error: Optional[StateError] = item if kind == "corrupt" else None
            state = None
            if kind == "state" and item is not None:
                try:
                    state = decode(item[0])
                except StateError as exc:
                    error = exc
            if error is not None:
                exists = True
                if str(error) != corrupt:
                    yield event("state-corrupt", str(error))
                previous, first, corrupt = None, False, str(error)
            elif kind == "state":
                exists = item is not None
                if first:
                    yield event("snapshot", _describe_start(state, exists),
                                {"round": None if state is None else state.round})
                elif corrupt is not None and state is None:
                    yield event("state-removed", "state removed (it was corrupt)")
                else:
                    yield from grouped(diff_states(previous, state))
                previous, first, corrupt = state, False, None
            if previous is not None:
                yield from grouped(stale_transitions(previous, clock_now(), stale, keep_alive))
            if predicate is not None and not first and predicate(previous, exists):
                yield event("until-met", f"condition {until!r} holds")
                return
            if deadline is not None and time.monotonic() >= deadline:
                if until is not None:
                    raise ConditionNotMetError(f"the condition {until!r} did not hold within {duration:g}s")
                return
    finally:
        stop.set()


def _describe_start(state: Optional[RendezvousState], exists: bool) -> str:
    if not exists:
        return "no state yet"
    if state is None:
        return "state present"
    return (f"round {state.round}, {'complete' if state.complete else 'incomplete'}"
            f"{', closed' if state.closed else ''}, {len(state.participants)} participants, "
            f"{len(state.wait_list)} waiting")
