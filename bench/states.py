"""Rendezvous states to measure on: an n-node round, written the way torch writes it."""

from __future__ import annotations

import datetime as _dt
from typing import Optional

from rdzvctl.state.codec import encode
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["make_state", "state_bytes"]


def make_state(nodes: int, round_: int = 1, now: Optional[_dt.datetime] = None, dead: int = 0,
               waiting: int = 0) -> RendezvousState:
    """A complete round of ``nodes`` participants (ranks by torch's ordering), heartbeats fresh.

    ``dead`` participants have a heartbeat an hour old; ``waiting`` more nodes
    are in the wait list.  Node addresses look like cluster host names.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    members = sorted(NodeDesc(f"node-{i:05d}.cluster.example.com", 40000 + i, 0) for i in range(nodes))
    state = RendezvousState(round=round_, complete=True, closed=False)
    for rank, node in enumerate(members):
        state.participants[node] = rank
        age = 3600.0 if rank < dead else 1.0
        state.last_heartbeats[node] = now - _dt.timedelta(seconds=age, microseconds=rank)
    for i in range(waiting):
        late = NodeDesc(f"late-{i:05d}.cluster.example.com", 50000 + i, 0)
        state.wait_list.add(late)
        state.last_heartbeats[late] = now
    return state


def state_bytes(nodes: int, **kwargs: object) -> bytes:
    """``make_state`` pickled as torch pickles it (protocol 4 on Python 3.11)."""
    return encode(make_state(nodes, **kwargs))  # type: ignore[arg-type]
