"""Repairs as torch makes them: each mirrors torch's own bookkeeping in ``dynamic_rendezvous.py``
(``_sanitize`` and ``_remove_participant_epilogue``) on a copy of the state.
"""

from __future__ import annotations

import datetime as _dt
from typing import Iterable, List, Optional, Tuple

from rdzvctl.errors import StateValidationError
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.state.nodes import DEFAULT_KEEP_ALIVE, KeepAlive, dead_nodes

__all__ = ["RESTART_NODE", "prune_dead_nodes", "reopen", "remove_node", "add_waiting", "edit_state"]

#: The placeholder node ``set --add-waiting`` puts in the wait list to make live
#: agents restart a round; it never joins, so torch expires it like any dead node.
RESTART_NODE = "rdzvctl-restart_0_0"


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


def edit_state(
    state: RendezvousState,
    now: _dt.datetime,
    *,
    remove: Iterable[NodeDesc] = (),
    waiting: Iterable[NodeDesc] = (),
    closed: Optional[bool] = None,
    complete: Optional[bool] = None,
    round_: Optional[int] = None,
    clear_deadline: bool = False,
    min_nodes: Optional[int] = None,
) -> RendezvousState:
    """``set``'s field changes on a copy of ``state``: each node of ``remove`` leaves with torch's
    bookkeeping (:func:`remove_node`), the ``waiting`` nodes join the wait list (:func:`add_waiting`),
    then the flags, the round and the deadline change.  A node to remove that is not (or no
    longer) in the state raises :class:`StateValidationError` naming ``--remove-node``."""
    new = state.copy()
    for node in remove:
        if node not in new.nodes:
            raise StateValidationError("--remove-node", f"{node} is not in the state")
        new = remove_node(new, node, min_nodes)
    new = add_waiting(new, waiting, now)
    if closed is not None:
        new.closed = closed
    if complete is not None:
        new.complete = complete
    if round_ is not None:
        new.round = round_
    if clear_deadline:
        new.deadline = None
    return new
