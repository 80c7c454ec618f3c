"""A node's liveness as torch judges it: the keep-alive settings, each node's role and heartbeat age,
the dead nodes torch's sanitizer would drop, and the last-call deadline.

Everything takes ``now`` explicitly, so it is deterministic and testable.
"""

from __future__ import annotations

import datetime as _dt
from typing import List, NamedTuple, Optional

from rdzvctl.state.model import NodeDesc, RendezvousState, by_rank, node_order

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


def node_statuses(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE) -> List[NodeStatus]:
    """Every node with its role, rank and liveness; participants first, by rank."""
    expire = now - keep_alive.expiry
    # frozenset(a dict) and set operations reuse the stored hashes (no NodeDesc.__hash__ calls,
    # which run in Python); a dict's keys() view does not.
    participants = frozenset(state.participants)
    groups = (
        ("participant", by_rank(state.participants)),
        ("waiting", [(n, None) for n in sorted(state.wait_list - participants, key=node_order)]),
        ("redundant", [(n, None) for n in sorted(state.redundancy_list - participants - state.wait_list,
                                                 key=node_order)]),
        ("orphan", [(n, None) for n in sorted(frozenset(state.last_heartbeats) - participants - state.wait_list
                                              - state.redundancy_list, key=node_order)]),
    )
    heartbeat = state.last_heartbeats.get
    row = tuple.__new__  # NodeStatus's own __new__ is a Python function: a call per node saved
    rows: List[NodeStatus] = []
    append = rows.append
    for role, members in groups:
        for node, rank in members:
            when = heartbeat(node)
            if when is None:
                append(row(NodeStatus, (node, role, rank, None, None, None)))
            else:  # torch: dead iff heartbeat < now - expiry
                append(row(NodeStatus, (node, role, rank, when, (now - when).total_seconds(), not when < expire)))
    return rows


def dead_nodes(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE) -> List[NodeDesc]:
    """Nodes torch's sanitizer would remove: a heartbeat older than the expiry."""
    expire = now - keep_alive.expiry
    return sorted(node for node, when in state.last_heartbeats.items() if when < expire)


def deadline_remaining(state: RendezvousState, now: _dt.datetime) -> Optional[float]:
    """Seconds until the last-call deadline (negative once passed), or None."""
    return None if state.deadline is None else (state.deadline - now).total_seconds()
