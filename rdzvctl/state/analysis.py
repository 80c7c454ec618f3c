"""Pure analysis of a state: semantic diffs between two states and their grouping.

Also the one import path of the state's analysis as a whole: liveness
(:mod:`rdzvctl.state.nodes`), repairs as torch does them
(:mod:`rdzvctl.state.repairs`) and the findings (:mod:`rdzvctl.state.findings`)
are re-exported here.  Everything takes ``now`` explicitly so it is
deterministic and testable.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from rdzvctl.state.findings import SEVERITIES, SUSPICIOUS_RUN_IDS, Finding, find_problems
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.state.nodes import (
    DEFAULT_KEEP_ALIVE,
    FUTURE_TOLERANCE,
    KeepAlive,
    NodeStatus,
    dead_nodes,
    deadline_remaining,
    node_statuses,
)
from rdzvctl.state.repairs import RESTART_NODE, add_waiting, edit_state, prune_dead_nodes, remove_node, reopen

__all__ = [
    "readable_again",
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
    "edit_state",
    "Event",
    "diff_states",
    "stale_transitions",
    "group_events",
    "GROUP_NODES",
    "GROUP_NAMED",
    "SUSPICIOUS_RUN_IDS",
    "RESTART_NODE",
    "FUTURE_TOLERANCE",
]


# -- semantic diff -------------------------------------------------------------------
class Event(NamedTuple):
    """A semantic change between two states (what ``watch`` prints).

    Events are equal when their kind, message and node are; ``data`` (the details
    ``-o json`` prints) is left out, and is never changed once the event is made.
    A named tuple, not a dataclass: this module is on every command's start-up path,
    and a dataclass costs its generated methods' compilation at import.
    """

    kind: str
    message: str
    node: Optional[str] = None
    data: Dict[str, object] = {}  # shared by events made without data: read-only by contract

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self[:3] == other[:3]

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self[:3])


def readable_again(last_good: RendezvousState, new: RendezvousState) -> List[Event]:
    """The events of a readable state after corrupt versions: ``state-created`` saying it is readable
    again, then how it differs from ``last_good``, the last readable one (not from nothing: its nodes
    did not all join anew)."""
    return [Event("state-created", f"state readable again (round {new.round}) after corrupt versions",
                  data={"round": new.round}), *diff_states(last_good, new)]


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
    if new.round > old.round:
        events.append(Event("round-advanced", f"round {old.round} -> {new.round}",
                            data={"from": old.round, "to": new.round}))
    elif new.round < old.round:  # torch only counts up: someone wrote an older or a fresh state over the run
        events.append(Event("round-went-back", f"round {old.round} -> {new.round}: went back (a state written "
                            "over the run, not by torch's agents)", data={"from": old.round, "to": new.round}))
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
