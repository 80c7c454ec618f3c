"""Pure analysis of a state: liveness, deadline, findings, repairs, diffs and their grouping.

Everything takes ``now`` explicitly so it is deterministic and testable; the
repairs mirror torch's own bookkeeping in ``dynamic_rendezvous.py``
(``_sanitize`` and ``_remove_participant_epilogue``).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from rdzvctl.state.model import NodeDesc, RendezvousState, node_order

__all__ = [
    "KeepAlive",
    "DEFAULT_KEEP_ALIVE",
    "NodeStatus",
    "Finding",
    "SEVERITIES",
    "node_statuses",
    "dead_nodes",
    "deadline_remaining",
    "find_problems",
    "prune_dead_nodes",
    "reopen",
    "remove_node",
    "add_waiting",
    "Event",
    "diff_states",
    "stale_transitions",
    "group_events",
    "GROUP_NODES",
    "GROUP_NAMED",
    "SUSPICIOUS_RUN_IDS",
]

SEVERITIES = ("info", "warning", "error")

#: Run ids that many unrelated jobs end up sharing (pytorch#82160: "none").
SUSPICIOUS_RUN_IDS = frozenset({"", "none", "None", "default", "test", "job", "run", "0", "1"})

#: The placeholder node ``set --add-waiting`` puts in the wait list to make live
#: agents restart a round; it never joins, so torch expires it like any dead node.
RESTART_NODE = "rdzvctl-restart_0_0"

#: A heartbeat this far in the future is clock skew, not jitter.
FUTURE_TOLERANCE = _dt.timedelta(seconds=1)


class KeepAlive(NamedTuple):
    """torch's keep-alive settings: a node is dead after ``interval × max_attempt``."""

    interval: float = 5.0
    max_attempt: int = 3

    @property
    def expiry(self) -> _dt.timedelta:
        return _dt.timedelta(seconds=self.interval * self.max_attempt)


#: torch's defaults (``RendezvousTimeout.heartbeat`` 5 s, ``keep_alive_max_attempt`` 3).
DEFAULT_KEEP_ALIVE = KeepAlive()


class NodeStatus(NamedTuple):
    """What the state says about one node at ``now``."""

    node: NodeDesc
    role: str  # participant | waiting | redundant | orphan (heartbeat only)
    rank: Optional[int]
    last_heartbeat: Optional[_dt.datetime]
    age: Optional[float]  # seconds since the last heartbeat (negative: in the future)
    alive: Optional[bool]  # None when the node has no heartbeat


def _age(now: _dt.datetime, when: Optional[_dt.datetime]) -> Optional[float]:
    return None if when is None else (now - when).total_seconds()


def node_statuses(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE) -> List[NodeStatus]:
    """Every node with its role, rank and liveness; participants first, by rank."""
    expire = now - keep_alive.expiry
    rows: List[NodeStatus] = []

    def add(node: NodeDesc, role: str, rank: Optional[int]) -> None:
        when = state.last_heartbeats.get(node)
        alive = None if when is None else not when < expire  # torch: dead iff heartbeat < now - expiry
        rows.append(NodeStatus(node, role, rank, when, _age(now, when), alive))

    for node, rank in sorted(state.participants.items(), key=lambda kv: (kv[1], kv[0])):
        add(node, "participant", rank)
    # frozenset(a dict) and set operations reuse the stored hashes (no NodeDesc.__hash__ calls,
    # which run in Python); a dict's keys() view does not.
    participants = frozenset(state.participants)
    for node in sorted(state.wait_list - participants, key=node_order):
        add(node, "waiting", None)
    for node in sorted(state.redundancy_list - participants - state.wait_list, key=node_order):
        add(node, "redundant", None)
    orphans = frozenset(state.last_heartbeats) - participants - state.wait_list - state.redundancy_list
    for node in sorted(orphans, key=node_order):
        add(node, "orphan", None)
    return rows


def dead_nodes(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE) -> List[NodeDesc]:
    """Nodes torch's sanitizer would remove: a heartbeat older than the expiry."""
    expire = now - keep_alive.expiry
    return sorted(node for node, when in state.last_heartbeats.items() if when < expire)


def deadline_remaining(state: RendezvousState, now: _dt.datetime) -> Optional[float]:
    """Seconds until the last-call deadline (negative once passed), or None."""
    return None if state.deadline is None else (state.deadline - now).total_seconds()


class Finding(NamedTuple):
    """One problem: a stable code, a severity, one line of explanation and the repair.

    ``torch_next`` says what torch does next about it (a key of
    :data:`rdzvctl.state.lifecycle.TORCH_NEXT`) and ``outlook`` says it in a
    sentence; ``repair`` is empty when torch fixes it itself.
    """

    code: str
    severity: str
    message: str
    repair: str = ""
    nodes: Tuple[str, ...] = ()
    torch_next: str = ""
    outlook: str = ""

    def to_json(self) -> Dict[str, object]:
        """The finding as documented in ``get -o json`` (``problems``) and ``corrupt-detect -o json``."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "repair": self.repair,
                "nodes": list(self.nodes), "torch_next": self.torch_next, "outlook": self.outlook}

    def at_least(self, severity: str) -> bool:
        return SEVERITIES.index(self.severity) >= SEVERITIES.index(severity)


def find_problems(
    state: RendezvousState,
    now: _dt.datetime,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    run_id: Optional[str] = None,
    closed_since: Optional[_dt.datetime] = None,
) -> List["Finding"]:
    """torch's invariants and the field incidents, most severe first (see :mod:`rdzvctl.state.findings`)."""
    from rdzvctl.state.findings import find_problems as _find

    return _find(state, now, keep_alive, max_nodes=max_nodes, run_id=run_id, closed_since=closed_since)


# -- repairs ------------------------------------------------------------------------
def prune_dead_nodes(
    state: RendezvousState,
    now: _dt.datetime,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    min_nodes: Optional[int] = None,
) -> Tuple[RendezvousState, List[NodeDesc]]:
    """torch's ``_sanitize``: drop dead nodes everywhere, then its epilogue.

    Returns the new state and the removed nodes; ``state`` is not modified.
    Without ``min_nodes`` an incomplete round keeps its deadline (torch's join
    re-checks ``min_nodes`` before completing, so that is safe).
    """
    new = state.copy()
    removed = dead_nodes(state, now, keep_alive)
    participant_removed = False
    for node in removed:
        new.last_heartbeats.pop(node, None)
        if new.participants.pop(node, None) is not None:
            participant_removed = True
        new.wait_list.discard(node)
        new.redundancy_list.discard(node)
    if participant_removed:
        _remove_participant_epilogue(new, min_nodes)
    return new, removed


def _remove_participant_epilogue(state: RendezvousState, min_nodes: Optional[int]) -> None:
    """torch's ``_remove_participant_epilogue``, in place, after participants left.

    A complete round with nobody left is over (incomplete, next round); an
    incomplete round below ``min_nodes`` loses its last-call deadline.  Without
    ``min_nodes`` the deadline stays (torch's join re-checks ``min_nodes``).
    """
    if state.complete:
        if not state.participants:
            state.complete = False
            state.round += 1
    elif min_nodes is not None and len(state.participants) < min_nodes:
        state.deadline = None


def reopen(state: RendezvousState) -> RendezvousState:
    new = state.copy()
    new.closed = False
    return new


def remove_node(state: RendezvousState, node: NodeDesc, min_nodes: Optional[int] = None) -> RendezvousState:
    """Remove ``node`` the way torch removes a leaving node (with the same epilogue)."""
    new = state.copy()
    was_participant = new.participants.pop(node, None) is not None
    new.wait_list.discard(node)
    new.redundancy_list.discard(node)
    new.last_heartbeats.pop(node, None)
    if was_participant:
        _remove_participant_epilogue(new, min_nodes)
    return new


def add_waiting(state: RendezvousState, nodes: Iterable[NodeDesc], now: _dt.datetime) -> RendezvousState:
    """Put ``nodes`` on the wait list with a heartbeat at ``now`` (out of participants and redundancy).

    torch's agents re-rendezvous when they see a waiting node
    (``_RendezvousJoinOp``/``should_keep_alive`` in ``dynamic_rendezvous.py``).
    """
    new = state.copy()
    for node in nodes:
        new.participants.pop(node, None)
        new.redundancy_list.discard(node)
        new.wait_list.add(node)
        new.last_heartbeats[node] = now
    return new


# -- semantic diff -------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """A semantic change between two states (what ``watch`` prints)."""

    kind: str
    message: str
    node: Optional[str] = None
    data: Dict[str, object] = field(default_factory=dict, compare=False)


def diff_states(old: Optional[RendezvousState], new: Optional[RendezvousState]) -> List[Event]:
    """The events that turn ``old`` into ``new`` (``None`` = no state)."""
    if old is None and new is None:
        return []
    if old is None:
        assert new is not None
        return [Event("state-created", f"state created (round {new.round})", data={"round": new.round})]
    if new is None:
        return [Event("state-removed", "state removed")]
    events: List[Event] = []
    if new.round != old.round:
        events.append(Event("round-advanced", f"round {old.round} -> {new.round}",
                            data={"from": old.round, "to": new.round}))
    for label, before, after in (
        ("participants", set(old.participants), set(new.participants)),
        ("wait_list", old.wait_list, new.wait_list),
        ("redundancy_list", old.redundancy_list, new.redundancy_list),
    ):
        for node in sorted(after - before):
            events.append(Event(f"joined-{label.replace('_', '-')}", f"{node} joined {label.replace('_', ' ')}",
                                str(node)))
        for node in sorted(before - after):
            events.append(Event(f"left-{label.replace('_', '-')}", f"{node} left {label.replace('_', ' ')}",
                                str(node)))
    for node in sorted(set(old.participants) & set(new.participants)):
        if old.participants[node] != new.participants[node]:
            events.append(Event("rank-changed", f"{node} rank {old.participants[node]} -> {new.participants[node]}",
                                str(node), {"from": old.participants[node], "to": new.participants[node]}))
    if new.complete != old.complete:
        events.append(Event("completed" if new.complete else "incomplete",
                            f"round {new.round} " + ("complete" if new.complete else "no longer complete")))
    if new.closed != old.closed:
        events.append(Event("closed" if new.closed else "reopened",
                            "rendezvous closed" if new.closed else "rendezvous reopened"))
    if new.deadline != old.deadline:
        if new.deadline is None:
            events.append(Event("deadline-cleared", "last-call deadline cleared"))
        else:
            events.append(Event("deadline-set", f"last-call deadline set to {new.deadline.isoformat()}",
                                data={"deadline": new.deadline.isoformat()}))
    return events


def stale_transitions(
    state: RendezvousState, now: _dt.datetime, already: Set[NodeDesc], keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE
) -> List[Event]:
    """Events for nodes whose heartbeat went stale since ``already`` (updated in place)."""
    dead = set(dead_nodes(state, now, keep_alive))
    events = [
        Event("heartbeat-stale", f"{node} heartbeat stale ({(now - state.last_heartbeats[node]).total_seconds():.0f} s)",
              str(node))
        for node in sorted(dead - already)
    ]
    events += [Event("heartbeat-fresh", f"{node} heartbeating again", str(node)) for node in sorted(already - dead)
               if node in state.last_heartbeats]
    already.clear()
    already.update(dead)
    return events


#: A grouped event (many nodes changing the same way at once) lists this many node ids in ``nodes``...
GROUP_NODES = 20
#: ... and names this many in its message.
GROUP_NAMED = 3
_GROUP_PHRASE = {"heartbeat-fresh": "heartbeating again", "rank-changed": "changed rank"}


def group_events(events: Iterable[Event]) -> List[Tuple[str, str, Dict[str, Any]]]:
    """Semantic events as (kind, message, fields), one per kind for node events.

    One node: its own message, ``node`` and data.  Several nodes of one kind
    (5,000 heartbeats going stale): one entry with ``count``, the first
    :data:`GROUP_NODES` ids in ``nodes`` and the first :data:`GROUP_NAMED`
    named in the message, so neither ``watch`` nor a conflict report floods.
    """
    groups: Dict[Any, List[Event]] = {}
    for event in events:
        groups.setdefault(event.kind if event.node else id(event), []).append(event)
    out: List[Tuple[str, str, Dict[str, Any]]] = []
    for group in groups.values():
        first = group[0]
        if len(group) == 1:
            out.append((first.kind, first.message, {"node": first.node, **first.data} if first.node else
                        dict(first.data)))
            continue
        nodes = [e.node for e in group]
        shown = ", ".join(str(n) for n in nodes[:GROUP_NAMED]) + (f" and {len(nodes) - GROUP_NAMED} more"
                                                                  if len(nodes) > GROUP_NAMED else "")
        phrase = _GROUP_PHRASE.get(first.kind, first.kind.replace("-", " "))
        out.append((first.kind, f"{len(nodes)} nodes {phrase}: {shown}",
                    {"count": len(nodes), "nodes": nodes[:GROUP_NODES]}))
    return out
