"""A node's liveness as torch judges it: the keep-alive settings, each node's role and heartbeat age,
the dead nodes torch's sanitizer would drop, and the last-call deadline.

Everything takes ``now`` explicitly, so it is deterministic and testable.
"""

from __future__ import annotations

import datetime as _dt
from typing import List, NamedTuple, Optional

from rdzvctl.state.model import NodeDesc, RendezvousState, node_order

__all__ = ["KeepAlive", "DEFAULT_KEEP_ALIVE", "FUTURE_TOLERANCE", "NodeStatus", "node_statuses", "dead_nodes",
           "deadline_remaining"]

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
