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
``heartbeat-fresh``, ``state-corrupt`` (watching goes on), ``state-removed``,
``restart-storm`` (the round advanced K times quickly: see
:class:`rdzvctl.state.history.StormSettings`, with ``round``, ``severity``
and ``repair``) and ``until-met`` (last).  A backend error ends the generator by raising it;
``until`` not met within ``duration`` raises
:class:`rdzvctl.errors.ConditionNotMetError`.  Closing the generator (or
leaving the ``for``) stops the background read; the backend stays open.
No printing here.

On a backend that keeps torch's legacy etcd JSON (``--rdzv-backend etcd``,
:mod:`rdzvctl.state.legacy_etcd`) the run is polled every ``interval``
(state, counter and keep-alive leases: a lease expires without any write to
``active_version``) and the events, in the same dict shape, are
``snapshot`` (with ``round``, the version, and ``status``), the changes of
:func:`rdzvctl.state.legacy_etcd.diff_runs` (``created``, ``removed``,
``corrupt``, ``status``, ``joined``, ``confirmed``, ``keep-alive-expired``,
``waiting``), ``stuck-*`` once per status and ``until-met``; ``complete``
means ``final`` and ``round>=N`` the version.
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
from rdzvctl.inspection import is_legacy_etcd, legacy_options
from rdzvctl.state.analysis import (
    DEFAULT_KEEP_ALIVE,
    Event,
    KeepAlive,
    diff_states,
    group_events,
    readable_again,
    stale_transitions,
)
from rdzvctl.state.codec import decode
from rdzvctl.state.history import DEFAULT_STORM, StormDetector, StormSettings
from rdzvctl.state.jsonform import format_time
from rdzvctl.state.legacy_etcd import LegacyReport, LegacyRun, diff_runs
from rdzvctl.state.legacy_etcd import analyse as analyse_legacy
from rdzvctl.state.legacy_etcd import parse_state as parse_legacy
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["follow", "parse_until", "UNTIL_HELP"]

_UNTIL = re.compile(r"^(complete|closed|absent|round>=(\d+))$")

#: What :func:`parse_until` accepts, for error messages.
UNTIL_HELP = "expected complete, closed, absent or round>=N"

Predicate = Callable[[Optional[RendezvousState], bool], bool]
#: ``on_version(time observed, state or None, token text or None, exists, error or None)``.
OnVersion = Callable[[_dt.datetime, Optional[RendezvousState], Optional[str], bool, Optional[str]], None]


def _until_parts(text: str) -> Tuple[str, int]:
    """``complete|closed|absent|round>=N`` as (kind, N; 0 but for round); ValueError otherwise."""
    match = _UNTIL.match(text.strip())
    if not match:
        raise ValueError(UNTIL_HELP)
    return match.group(1).split(">=")[0], int(match.group(2) or 0)


def parse_until(text: str) -> Predicate:
    """``complete|closed|absent|round>=N`` as a predicate over (state, exists); ValueError otherwise."""
    kind, target = _until_parts(text)
    if kind == "complete":
        return lambda state, exists: state is not None and state.complete
    if kind == "closed":
        return lambda state, exists: state is not None and state.closed
    if kind == "absent":
        return lambda state, exists: not exists
    return lambda state, exists: state is not None and state.round >= target


def _legacy_until(text: str) -> Callable[[LegacyReport], bool]:
    """The same conditions over a legacy etcd report: complete is ``final``, round the version."""
    kind, target = _until_parts(text)
    if kind == "absent":
        return lambda r: r.state is None and r.error is None
    if kind in ("complete", "closed"):
        wanted = "final" if kind == "complete" else "closed"
        return lambda r: r.state is not None and r.state.status == wanted
    return lambda r: r.state is not None and r.state.version is not None and int(r.state.version) >= target


def follow(
    backend: RendezvousBackend,
    *,
    interval: float = 1.0,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    until: Optional[str] = None,
    duration: Optional[float] = None,
    now: Optional[Callable[[], _dt.datetime]] = None,
    storm: Optional[StormSettings] = DEFAULT_STORM,
    on_version: Optional[OnVersion] = None,
) -> Generator[Dict[str, Any], None, None]:
    """Yield the run's semantic events as they happen (see the module docstring).

    ``interval`` is the polling interval where the backend has no native
    watch, and how often heartbeats are checked for going stale (torch's
    ``keep_alive``).  With ``until`` (``complete``, ``closed``, ``absent``,
    ``round>=N``) the generator ends after an ``until-met`` event once it
    holds; ``duration`` (seconds) ends it, raising ConditionNotMetError if
    ``until`` was given.  ``now`` is the clock (default
    :func:`rdzvctl.clock.now_utc`).  ``storm`` (None: off) sets when round
    advances make a ``restart-storm`` event (:class:`rdzvctl.state.history.StormDetector`,
    timed by this clock).  ``on_version(time, state, token text, exists, error)``
    is called with each version read, before its events (``watch --record``);
    not on torch's legacy etcd JSON.
    """
    clock_now = now if now is not None else (lambda: clock.now_utc())
    if is_legacy_etcd(backend):
        yield from _follow_legacy(backend, interval, until, duration, clock_now)
        return
    predicate = None if until is None else parse_until(until)
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
        return _event(backend, clock_now, kind, message, extra)

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
    last_good: Optional[RendezvousState] = None  # the state before it became unusable
    stale: Set[NodeDesc] = set()
    detector = None if storm is None else StormDetector(storm)
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
            if on_version is not None and kind in ("state", "corrupt"):
                token = None if kind != "state" or item is None else backend.format_token(item[1])
                on_version(clock_now(), state, token, kind == "corrupt" or item is not None,
                           None if error is None else str(error))
            if error is not None:
                exists = True
                if str(error) != corrupt:
                    yield event("state-corrupt", str(error))
                last_good = previous if previous is not None else last_good
                previous, first, corrupt = None, False, str(error)
            elif kind == "state":
                exists = item is not None
                if first:
                    yield event("snapshot", _describe_start(state, exists),
                                {"round": None if state is None else state.round})
                elif corrupt is not None and state is None:
                    yield event("state-removed", "state removed (it was corrupt)")
                elif corrupt is not None and state is not None and last_good is not None:
                    yield from grouped(readable_again(last_good, state))
                else:
                    yield from grouped(diff_states(previous, state))
                previous, first, corrupt, last_good = state, False, None, None
                found = None if detector is None else detector.observe(clock_now(), state)
                if found is not None:
                    yield event(found.code, found.message, {"round": None if state is None else state.round,
                                                            "severity": found.severity, "repair": found.repair})
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


def _event(backend: RendezvousBackend, clock_now: Callable[[], _dt.datetime], kind: str, message: str,
           extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The one event shape: ``time``, ``kind``, ``message``, ``run_id`` and the kind's fields."""
    out: Dict[str, Any] = {"time": format_time(clock_now()), "kind": kind, "message": message,
                           "run_id": backend.run_id}
    if extra:
        out.update(extra)
    return out


def _follow_legacy(
    backend: Any,  # an EtcdLegacyBackend (read_run)
    interval: float,
    until: Optional[str],
    duration: Optional[float],
    clock_now: Callable[[], _dt.datetime],
) -> Iterator[Dict[str, Any]]:
    """:func:`follow` on torch's legacy etcd JSON: poll the run (state, counter, keep-alive leases) every
    ``interval``, since keep-alives expire without any write to ``active_version`` (its native watch alone
    would miss them); how long a status lasts is measured here (etcd v2 keeps no write times)."""
    predicate = None if until is None else _legacy_until(until)
    options = legacy_options(backend)
    deadline = None if duration is None else time.monotonic() + duration
    previous: Optional[LegacyReport] = None
    seen: Optional[Tuple[Any, ...]] = None  # (status, version, has a TTL) of the current status
    since = time.monotonic()
    reported: Set[Tuple[str, Optional[Tuple[Any, ...]]]] = set()
    while True:
        run: LegacyRun = backend.read_run()
        try:
            parsed = None if run.raw is None else parse_legacy(run.raw)
        except StateError:
            parsed = None
        # A joinable state gets its TTL when min_nodes joined: the last call starts then.
        key = None if parsed is None else (parsed.status, parsed.version,
                                           run.active is not None and run.active.ttl is not None)
        if key != seen:
            seen, since = key, time.monotonic()
        report = analyse_legacy(run, time.time(), status_age=time.monotonic() - since if key else None, **options)
        state = report.state
        if previous is None:
            yield _event(backend, clock_now, "snapshot", "no state yet" if run.raw is None else
                         ("state corrupt" if state is None else
                          f"{state.status}, version {state.version or '-'}, {len(state.participants or ())} "
                          f"participant(s), {len(state.keep_alives or ())} confirmed"),
                         {"status": None if state is None else state.status,
                          "round": None if state is None or state.version is None else int(state.version)})
        else:
            for kind, message in diff_runs(previous, report):
                yield _event(backend, clock_now, kind, message)
        for finding in report.findings:
            if finding.code.startswith("stuck-") and (finding.code, seen) not in reported:
                reported.add((finding.code, seen))
                yield _event(backend, clock_now, finding.code, finding.message)
        previous = report
        if predicate is not None and predicate(report):
            yield _event(backend, clock_now, "until-met", f"condition {until!r} holds")
            return
        wait = interval
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                if until is not None:
                    raise ConditionNotMetError(f"the condition {until!r} did not hold within {duration:g}s")
                return
            wait = min(wait, left)
        time.sleep(wait)


def _describe_start(state: Optional[RendezvousState], exists: bool) -> str:
    if not exists:
        return "no state yet"
    if state is None:
        return "state present"
    return (f"round {state.round}, {'complete' if state.complete else 'incomplete'}"
            f"{', closed' if state.closed else ''}, {len(state.participants)} participants, "
            f"{len(state.wait_list)} waiting")
