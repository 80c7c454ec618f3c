"""torch's invariants of a rendezvous state, as a pure check linear in the node count.

A state torch itself writes always satisfies these (the functions cited are
in ``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py``); one that
breaks them makes agents misbehave (a rank outside the world, a node that can
never be detected dead).  ``set -f`` refuses such a state unless ``--force``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["torch_invariant_violations", "some_of"]


def some_of(names: Iterable[object], limit: int = 3) -> str:
    """``a, b, c and N more``: the first ``limit`` names of a sorted collection."""
    items = sorted(str(n) for n in names)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def torch_invariant_violations(state: RendezvousState) -> List[str]:
    """One line per invariant ``state`` breaks (empty when torch could have written it)."""
    out: List[str] = []
    participants = state.participants
    if state.complete:
        # _mark_rendezvous_complete numbers the sorted participants 0..n-1, and
        # _get_world returns (participants[node], len(participants)) as (rank, world size).
        world = len(participants)
        if not world:
            # _remove_participant_epilogue: the last participant leaving a complete round starts the next one.
            out.append("the round is complete but has no participants")
        outside = [node for node, rank in participants.items() if not 0 <= rank < world]
        if outside:
            out.append(f"{len(outside)} participant(s) of the complete round have a rank outside 0..{world - 1} "
                       f"(world size {world}): {some_of(outside)}")
        seen: Dict[int, NodeDesc] = {}
        repeated = [node for node, rank in participants.items() if seen.setdefault(rank, node) is not node]
        if repeated:
            out.append(f"{len(repeated)} participant(s) share a rank with another: {some_of(repeated)}")
    for first, second, label in (
        (participants.keys(), state.wait_list, "both participating and waiting"),  # _add_to_participants
        (participants.keys(), state.redundancy_list, "both participating and redundant"),
        (state.wait_list, state.redundancy_list, "both waiting and redundant"),  # _add_to_wait_list
    ):
        both = first & second
        if both:
            out.append(f"{len(both)} node(s) {label}: {some_of(both)}")
    # Every join calls _keep_alive; every removal deletes the heartbeat with the node.
    for group, label in ((participants.keys(), "participant"), (state.wait_list, "waiting node"),
                         (state.redundancy_list, "redundant node")):
        missing = [node for node in group if node not in state.last_heartbeats]
        if missing:
            out.append(f"{len(missing)} {label}(s) without a heartbeat (never detected dead): {some_of(missing)}")
    return out
