"""A run's past as semantic events: replay versions of the state, collapse heartbeat churn, spot restart storms.

No I/O here.  :func:`replay` takes the versions a backend kept
(:class:`rdzvctl.backends.base.HistoryVersion`, oldest first, a lazy
iterator), decodes each with the safe codec (never unpickling), diffs it with
the previous *semantic* version (:func:`rdzvctl.state.analysis.diff_states`)
and yields one :class:`HistoryEntry` per semantic change.  Every agent rewrites
the whole state each keep-alive interval (a 1,000-node job writes ~200
versions a second), so a version where only ``last_heartbeats`` changed is
folded into the entry before it (``collapsed`` counts them).  A state
appearing (``state-created``) also says who it already holds (``joined-*``,
``completed``, ...: the changes from an empty state of its round).  Memory is one
decoded version and one pending entry, whatever the length of the history.

Time of an entry: the backend's write time when it has one
(``time_source="backend"``), else the newest heartbeat in the version
(``"heartbeat"``: torch's writer stamps its own heartbeat in the state it
writes, ``_RendezvousStateHolder``/``_keep_alive`` in ``dynamic_rendezvous.py``),
never earlier than the entry before it unless it is more than 10 minutes earlier (then the
entry before it had a clock far ahead); a version with neither (a removal) takes
the time of the version before it.  ``watch --record`` files carry the time a
version was observed (``"recorded"``, :func:`replay_observations`).

Restart storms (:class:`StormDetector`, finding ``restart-storm``): the round
advanced ``advances`` times (default 3) within ``window`` seconds (default 600,
10 minutes) with no round in between that stayed complete for at least
``stable`` seconds (default 60).  torch advances the round when the last
participant of a complete round leaves (``_remove_participant_epilogue``):
agents that keep failing and restarting do that again and again without the job
ever making progress.

The JSON event form (:func:`entry_events`, one object per line in ``history -o
json``) has the keys of :func:`rdzvctl.follow.follow`'s events (``time``,
``kind``, ``message``, ``run_id``, ``node`` or ``count``/``nodes``) plus
``round`` (the round after the change, None when there is no state),
``revision`` (the backend's counter of that version), ``time_source`` and
``collapsed`` (the heartbeat-only versions folded into the change).
"""

from __future__ import annotations

import collections
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional

from rdzvctl.errors import StateError
from rdzvctl.state.analysis import Event, Finding, diff_states, group_events, readable_again
from rdzvctl.state.codec import decode
from rdzvctl.state.jsonform import format_time
from rdzvctl.state.model import RendezvousState

__all__ = [
    "TIME_SOURCES",
    "Observation",
    "HistoryEntry",
    "replay",
    "replay_observations",
    "StormSettings",
    "DEFAULT_STORM",
    "StormDetector",
    "storm_event",
    "entry_events",
    "timeline",
]

#: Where an entry's time comes from.
TIME_SOURCES = ("backend", "heartbeat", "recorded")


class Observation(NamedTuple):
    """One version of the state, already decoded (or why not).

    ``exists`` False: the key was absent or deleted then.  ``error`` is the
    reason a present value is unusable (``state`` is None then).
    """

    state: Optional[RendezvousState]
    exists: bool
    written_at: Optional[_dt.datetime] = None
    time_source: str = "backend"  # of written_at, when given
    revision: Optional[int] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class HistoryEntry:
    """One semantic change of the state (see the module docstring).

    ``time`` is None only for a first version that says nothing about time
    (a corrupt or removed value the backend kept no write time for).
    ``until`` is the time of the newest heartbeat-only version folded into
    it (``None`` when none was): the state held at least until then.
    """

    time: Optional[_dt.datetime]
    time_source: str
    revision: Optional[int]
    state: Optional[RendezvousState]
    events: List[Event] = field(default_factory=list)
    collapsed: int = 0
    until: Optional[_dt.datetime] = None

    @property
    def round(self) -> Optional[int]:
        return None if self.state is None else self.state.round


#: How much older than the entry before it a version's newest heartbeat may be and still take
#: that entry's time (see :func:`replay_observations`): torch's default heartbeat timeout is 30 s.
_CLAMP_LIMIT = _dt.timedelta(minutes=10)


def _newest_heartbeat(state: Optional[RendezvousState]) -> Optional[_dt.datetime]:
    if state is None or not state.last_heartbeats:
        return None
    return max(state.last_heartbeats.values())


def _observe(versions: Iterable[Any]) -> Iterator[Observation]:
    """Backend versions (``value``, ``written_at``, ``revision``) decoded with the safe codec."""
    for version in versions:
        error = getattr(version, "error", None)
        if error is not None:
            yield Observation(None, True, version.written_at, "backend", version.revision, error)
            continue
        if version.value is None:
            yield Observation(None, False, version.written_at, "backend", version.revision)
            continue
        try:
            state = decode(version.value)
        except StateError as exc:
            yield Observation(None, True, version.written_at, "backend", version.revision, str(exc))
            continue
        yield Observation(state, True, version.written_at, "backend", version.revision)


def replay(versions: Iterable[Any], *, collapse: bool = True) -> Iterator[HistoryEntry]:
    """The semantic history of backend versions (:class:`~rdzvctl.backends.base.HistoryVersion`), oldest first.

    Streams: ``versions`` is consumed lazily and nothing but the previous
    version is kept.  With ``collapse=False`` every version is an entry (a
    heartbeat-only one with no events).
    """
    return replay_observations(_observe(versions), collapse=collapse)


def replay_observations(observations: Iterable[Observation], *, collapse: bool = True) -> Iterator[HistoryEntry]:
    """:func:`replay` over already decoded versions (what ``history --from FILE`` reads)."""
    previous: Optional[RendezvousState] = None
    last_good: Optional[RendezvousState] = None  # the last readable version, across corrupt ones
    corrupt: Optional[str] = None  # the reason the previous version was unusable
    last_time: Optional[_dt.datetime] = None
    last_source = "heartbeat"
    pending: Optional[HistoryEntry] = None
    folded = 0
    until: Optional[_dt.datetime] = None
    for obs in observations:
        when: Optional[_dt.datetime]
        if obs.written_at is not None:
            when, source = obs.written_at, obs.time_source
        else:
            when, source = _newest_heartbeat(obs.state), "heartbeat"
            # A newest heartbeat a little older than the last time: the node that wrote it left
            # (its heartbeat went with it).  Much older: the last time came from a clock far ahead
            # (one node's skew, a hostile write), and carrying it on would stamp every later
            # version with it (and make advances hours apart look like a storm in 0 s).
            if when is None or (last_time is not None and last_time - _CLAMP_LIMIT <= when < last_time):
                when, source = last_time, last_source
        if obs.error is not None:
            events = [] if obs.error == corrupt else [Event("state-corrupt", obs.error)]
            state: Optional[RendezvousState] = None
        else:
            state = obs.state if obs.exists else None
            if corrupt is not None and state is None:
                events = [Event("state-removed", "state removed (it was corrupt)")]
            elif corrupt is not None and state is not None and last_good is not None:
                events = readable_again(last_good, state)
            else:
                events = diff_states(previous, state)
                if previous is None and state is not None:  # who the first version already holds
                    events += diff_states(RendezvousState(round=state.round), state)
        if when is not None:
            last_time, last_source = when, source
        previous, corrupt = state, obs.error
        if state is not None or (obs.error is None and not obs.exists):
            last_good = state  # a removal forgets it: a state after that is a new one
        if not events and collapse and pending is not None:
            folded += 1  # heartbeat-only (or an identical rewrite): part of the entry before it
            until = when
            continue
        if not events and collapse:
            continue  # before the first change (e.g. a run with no state yet)
        if pending is not None:
            yield _with_collapsed(pending, folded, until)
        pending, folded, until = HistoryEntry(when, source, obs.revision, state, events), 0, None
    if pending is not None:
        yield _with_collapsed(pending, folded, until)


def _with_collapsed(entry: HistoryEntry, folded: int, until: Optional[_dt.datetime]) -> HistoryEntry:
    if not folded:
        return entry
    return HistoryEntry(entry.time, entry.time_source, entry.revision, entry.state, entry.events, folded, until)


# -- restart storms -------------------------------------------------------------------
class StormSettings(NamedTuple):
    """When round advances are a restart storm (see the module docstring)."""

    advances: int = 3
    window: float = 600.0  # seconds
    stable: float = 60.0  # seconds a complete round must last to count as progress

    def describe(self) -> str:
        return (f"{self.advances} round advances within {self.window:g} s without a round complete "
                f"for {self.stable:g} s")


#: The defaults: K=3 advances within W=10 minutes, no complete round lasting 60 s in between.
DEFAULT_STORM = StormSettings()


class StormDetector:
    """Feed it each version's (time, state) in order; it returns a ``restart-storm`` finding when one happens.

    A round that jumps by N (a polled source, ``watch --record``, missed the
    versions in between) counts as N advances at that time.  Bounded: it keeps
    at most ``advances`` times.  After a report it starts
    counting again, so a storm that goes on is reported once per
    ``advances`` further advances.
    """

    def __init__(self, settings: StormSettings = DEFAULT_STORM) -> None:
        if settings.advances < 1 or settings.window <= 0 or settings.stable < 0:
            raise ValueError("a restart storm needs advances >= 1, a positive window and stable >= 0")
        self.settings = settings
        self._round: Optional[int] = None
        self._complete_since: Optional[_dt.datetime] = None
        self._advances: Deque[_dt.datetime] = collections.deque(maxlen=settings.advances)
        self._rounds: Deque[int] = collections.deque(maxlen=settings.advances)

    def observe(self, when: Optional[_dt.datetime], state: Optional[RendezvousState]) -> Optional[Finding]:
        if when is None or state is None:
            return None
        finding = None
        if self._round is not None and state.round > self._round:
            if self._advances and when < self._advances[-1]:
                # The clock went backwards (a record file out of order, a stepped clock): how far
                # apart these advances are is unknown, so the count starts again.
                self._advances.clear()
                self._rounds.clear()
            lasted = None if self._complete_since is None else (when - self._complete_since).total_seconds()
            if lasted is not None and lasted >= self.settings.stable:
                self._advances.clear()  # that round made progress: not a storm
                self._rounds.clear()
            # A jump of several rounds at once (a polled source missed versions) is that many advances.
            for round_ in range(max(self._round + 1, state.round - self.settings.advances + 1), state.round + 1):
                self._advances.append(when)
                self._rounds.append(round_)
            self._complete_since = None
            window = _dt.timedelta(seconds=self.settings.window)
            if len(self._advances) >= self.settings.advances and when - self._advances[0] <= window:
                finding = self._finding(when)
                self._advances.clear()
                self._rounds.clear()
        if state.complete:
            if self._complete_since is None:
                self._complete_since = when
        else:
            self._complete_since = None
        self._round = state.round
        return finding

    def _finding(self, when: _dt.datetime) -> Finding:
        s = self.settings
        span = (when - self._advances[0]).total_seconds()
        rounds = list(self._rounds)
        return Finding(
            "restart-storm", "error",
            f"restart storm: the round advanced {len(rounds)} times in {span:.0f} s (to rounds "
            f"{', '.join(str(r) for r in rounds)}) without a round staying complete for {s.stable:g} s",
            repair="find why the workers fail right after a round completes (their logs, rdzvctl doctor); "
                   "torch restarts them until max_restarts is used up",
            torch_next="stays",
            outlook="torch's agents keep restarting the round until max_restarts runs out")


def storm_event(finding: Finding, when: Optional[_dt.datetime], run_id: str,
                round_: Optional[int] = None) -> Dict[str, Any]:
    """A ``restart-storm`` finding as an event (the shape of :func:`entry_events`, plus ``severity``)."""
    return {"time": format_time(when), "kind": finding.code, "message": finding.message, "run_id": run_id,
            "round": round_, "severity": finding.severity, "repair": finding.repair}


def entry_events(entry: HistoryEntry, run_id: str) -> Iterator[Dict[str, Any]]:
    """The entry's events as JSON-able dicts, many nodes changing the same way at once grouped into one."""
    time = format_time(entry.time)
    for kind, message, fields in group_events(entry.events):
        event: Dict[str, Any] = {"time": time, "kind": kind, "message": message, "run_id": run_id}
        event.update(fields)
        event.update({"round": entry.round, "revision": entry.revision, "time_source": entry.time_source,
                      "collapsed": entry.collapsed})
        yield event


def timeline(entries: Iterable[HistoryEntry], run_id: str, *, storm: Optional[StormSettings] = DEFAULT_STORM,
             since: Optional[_dt.datetime] = None) -> Iterator[Dict[str, Any]]:
    """Every event of ``entries`` (:func:`entry_events`), a ``restart-storm`` event after the entry that made one.

    ``since`` hides what happened before it (storms are still counted from the
    start); ``storm=None`` turns detection off.
    """
    detector = None if storm is None else StormDetector(storm)
    for entry in entries:
        shown = since is None or (entry.time is not None and entry.time >= since)
        if shown:
            yield from entry_events(entry, run_id)
        finding = None if detector is None else detector.observe(entry.time, entry.state)
        if finding is not None and shown:
            yield storm_event(finding, entry.time, run_id, entry.round)
