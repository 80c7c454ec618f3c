"""What the picture of a run's history shows, gathered in one bounded pass over the entries.

Per node, the bars while it is a participant, waiting or redundant; the rounds
as bands (round number, participant count, a sample of the membership); the
events drawn as markers; the time span.  :mod:`rdzvctl.history_svg` draws it.

The size is bounded whatever the history: the entries are consumed once; at
most :data:`TRACKED_NODES` nodes are followed (nodes absent from the current
state are forgotten oldest first), each with at most :data:`SPANS_PER_NODE`
bars (the two neighbours whose union is shortest are merged first, so what
disappears is what is too narrow to see), the last :data:`MAX_BANDS` rounds and
:data:`MAX_MARKERS` markers are kept (what was left out is counted), and
:func:`ordered_nodes` picks :data:`MAX_ROWS` rows: the last state's
participants first (by rank), then its waiting and redundant nodes, then the
nodes seen last.
"""

from __future__ import annotations

import datetime as _dt
import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from rdzvctl.state.analysis import Event
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["HistoryEntryLike", "Collector", "ordered_nodes", "ROLES", "MARKED_KINDS", "MAX_ROWS", "TRACKED_NODES",
           "SPANS_PER_NODE", "MAX_MARKERS", "MAX_BANDS", "TOOLTIP_CHARS"]

#: Rows drawn; the others are counted in an "and N more nodes" note.
MAX_ROWS = 64
#: Nodes followed while reading; beyond it, nodes not in the current state are forgotten oldest first.
TRACKED_NODES = 4096
#: Bars kept per node; beyond it the two neighbouring bars whose union is shortest become one.
SPANS_PER_NODE = 48
#: Markers kept (the last ones); every marker is still counted.
MAX_MARKERS = 400
#: Round bands kept (the last ones).
MAX_BANDS = 200
#: Characters of a tooltip line (a marker's message is kept to this).
TOOLTIP_CHARS = 200
#: Participants named in a round's tooltip.
BAND_SAMPLE = 8
#: Distinct forgotten nodes counted exactly (as hashes); beyond it the note says "more than".
_HIDDEN_COUNTED = 100_000

UTC = _dt.timezone.utc

#: A bar's role, by index (a bar is ``[start, end, role index]``).
ROLES = ("participant", "waiting", "redundant")

#: Event kinds drawn as markers, with their legend text.
MARKED_KINDS = {
    "state-created": "state created",
    "round-advanced": "round advanced",
    "round-went-back": "round went back",
    "completed": "round completed",
    "closed": "closed",
    "reopened": "reopened",
    "state-removed": "state removed",
    "state-corrupt": "state corrupt",
}


class HistoryEntryLike(Protocol):
    """What the picture needs of one history entry (``rdzvctl.state.history.HistoryEntry``)."""

    @property
    def time(self) -> Optional[_dt.datetime]: ...  # None: a first version that says nothing about time

    @property
    def state(self) -> Optional[RendezvousState]: ...

    @property
    def events(self) -> Sequence[Event]: ...


@dataclass
class _Node:
    spans: List[List[float]] = field(default_factory=list)  # [start, end, role index]
    role: Optional[int] = None
    since: float = 0.0
    last_seen: float = 0.0
    merged: bool = False


@dataclass
class _Band:
    round: int
    start: float
    end: float
    participants: int = 0
    complete: bool = False
    sample: List[NodeDesc] = field(default_factory=list)


def _roles(state: RendezvousState) -> Dict[NodeDesc, int]:
    """Each node's role index; a node in several containers takes the first (participant first)."""
    roles = dict.fromkeys(state.redundancy_list, 2)
    roles.update(dict.fromkeys(state.wait_list, 1))
    roles.update(dict.fromkeys(state.participants, 0))
    return roles


def _seconds(when: object, previous: Optional[float]) -> Optional[float]:
    """``when`` as UTC epoch seconds, never before ``previous`` (history is drawn oldest first)."""
    if not isinstance(when, _dt.datetime):
        return previous
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        value = when.timestamp()
    except (OverflowError, ValueError, OSError):
        return previous
    return value if previous is None or value > previous else previous


class Collector:
    """One pass over the entries, keeping only bounded per-node bars, bands and markers."""

    def __init__(self) -> None:
        self.nodes: Dict[NodeDesc, _Node] = {}
        self.hidden: Set[int] = set()
        self.hidden_overflow = False
        self.markers: Deque[Tuple[float, str, str]] = deque(maxlen=MAX_MARKERS)
        self.marker_counts: Dict[str, int] = {}
        self.bands: Deque[_Band] = deque(maxlen=MAX_BANDS)
        self.band_count = 0
        self.roles: Dict[NodeDesc, int] = {}
        self.state: Optional[RendezvousState] = None
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.until: Optional[float] = None  # the newest heartbeat-only version folded into the last entry
        self.entries = 0
        self.merged = False

    def add(self, entry: HistoryEntryLike) -> None:
        now = _seconds(getattr(entry, "time", None), self.last)
        if now is None:
            return  # before the first entry with a time (replay gives none only to a removed or corrupt value)
        self.entries += 1
        if self.first is None:
            self.first = now
        self.last = now
        self.until = _seconds(getattr(entry, "until", None), None)
        state = getattr(entry, "state", None)
        if not isinstance(state, RendezvousState):
            state = None
        for event in getattr(entry, "events", None) or ():
            kind = getattr(event, "kind", None)
            if kind in MARKED_KINDS:
                self.marker_counts[kind] = self.marker_counts.get(kind, 0) + 1
                self.markers.append((now, kind, str(getattr(event, "message", kind))[:TOOLTIP_CHARS]))
        roles = _roles(state) if state is not None else {}
        if roles != self.roles:
            self._membership(roles, now)
        self._band(state, now)
        self.state = state

    def _membership(self, roles: Dict[NodeDesc, int], now: float) -> None:
        for node, role in self.roles.items():
            if roles.get(node) != role:
                self._close(node, now)
        for node, role in roles.items():
            if self.roles.get(node) != role:
                track = self.nodes.get(node)
                if track is None:
                    track = self.nodes[node] = _Node()
                track.role, track.since = role, now
        self.roles = roles
        if len(self.nodes) - len(roles) > TRACKED_NODES:
            self._forget()

    def _close(self, node: NodeDesc, now: float) -> None:
        track = self.nodes.get(node)
        if track is None or track.role is None:
            return
        spans = track.spans
        if spans and spans[-1][2] == track.role and spans[-1][1] >= track.since:
            spans[-1][1] = now  # adjacent equal spans are one
        else:
            spans.append([track.since, now, track.role])
        track.role = None
        track.last_seen = now
        if len(spans) > SPANS_PER_NODE:
            _merge_shortest(spans)
            track.merged = self.merged = True

    def _forget(self) -> None:
        """Forget the nodes not in the current state that were seen longest ago, down to half the cap."""
        idle = sorted((track.last_seen, i, node) for i, (node, track) in enumerate(self.nodes.items())
                      if node not in self.roles)
        for _, _, node in idle[:len(idle) - TRACKED_NODES // 2]:
            del self.nodes[node]
            if len(self.hidden) < _HIDDEN_COUNTED:
                self.hidden.add(hash(node))
            else:
                self.hidden_overflow = True

    def _band(self, state: Optional[RendezvousState], now: float) -> None:
        bands = self.bands
        current = bands[-1] if bands and self.state is not None else None
        if current is not None:
            current.end = now
        if state is None:
            return
        if current is None or current.round != state.round:
            current = _Band(state.round, now, now)
            bands.append(current)
            self.band_count += 1
        count = len(state.participants)
        if count > current.participants or (state.complete and not current.complete):
            current.participants = max(count, current.participants)
            ranked = heapq.nsmallest(BAND_SAMPLE, state.participants.items(), key=lambda item: (item[1], item[0]))
            current.sample = [node for node, _ in ranked]
        current.complete = current.complete or state.complete

    def finish(self) -> None:
        assert self.last is not None
        if self.until is not None and self.until > self.last:  # the last state held until its newest rewrite
            self.last = self.until
            if self.bands and self.state is not None:
                self.bands[-1].end = self.last
        for node in list(self.roles):
            self._close(node, self.last)

    def hidden_count(self, shown: Set[NodeDesc]) -> int:
        return len(self.hidden - {hash(node) for node in self.nodes}) + len(self.nodes) - len(shown)


def _merge_shortest(spans: List[List[float]]) -> None:
    """Merge the two neighbouring spans whose union is shortest; the union takes the longer one's role."""
    best = min(range(len(spans) - 1), key=lambda i: spans[i + 1][1] - spans[i][0])
    a, b = spans[best], spans[best + 1]
    role = a[2] if a[1] - a[0] >= b[1] - b[0] else b[2]
    spans[best:best + 2] = [[a[0], b[1], role]]


def ordered_nodes(collector: Collector) -> List[NodeDesc]:
    """Rows: the last state's participants by rank, its waiting then redundant nodes, then the latest seen."""
    state = collector.state
    chosen: List[NodeDesc] = []
    if state is not None:
        chosen += sorted(state.participants, key=lambda n: (state.participants[n], n))
        chosen += sorted(state.wait_list - set(state.participants))
        chosen += sorted(state.redundancy_list - set(state.participants) - state.wait_list)
    chosen = [n for n in chosen if n in collector.nodes][:MAX_ROWS]
    if len(chosen) < MAX_ROWS:
        taken = set(chosen)
        rest = sorted((n for n in collector.nodes if n not in taken and collector.nodes[n].spans),
                      key=lambda n: (-collector.nodes[n].spans[-1][1], n))
        chosen += rest[:MAX_ROWS - len(chosen)]
    return chosen
