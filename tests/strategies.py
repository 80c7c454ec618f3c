"""Hypothesis strategies for rendezvous states, ours and torch's.

* :func:`rendezvous_states` draws an :class:`rdzvctl.state.model.RendezvousState`.
* :func:`torch_states` draws a real torch ``_RendezvousState`` (built from
  torch's own classes) together with the ``RendezvousState`` that decoding its
  pickle must give.
* :func:`to_torch` and :func:`from_torch` convert between the two, so a test
  can run torch's own code on a drawn state and compare field by field.

torch is imported only by the functions that need it, so the strategies for
our own model work without torch.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import strategies as st

from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = [
    "UTC",
    "addrs",
    "node_descs",
    "aware_datetimes",
    "rendezvous_states",
    "torch_states",
    "to_torch",
    "from_torch",
    "torch_classes",
]

UTC = _dt.timezone.utc

# Addresses as torch sees them: FQDNs, IPs, and anything a user passes as
# local_addr, including underscores (they collide with the id separator) and
# non-ASCII text.
addrs = st.one_of(
    st.sampled_from(["node-0", "trainer_1", "10.0.0.7", "ip-10-1-2-3.ec2.internal", "a_b_c", "_", "", "héte_ü"]),
    st.text(alphabet=st.sampled_from("ab_-.0123456789"), max_size=12),
    st.text(max_size=12),
)

#: pids and local ids: small, typical, and up to the 64-bit limit torch's states hold.
ids = st.one_of(st.integers(0, 64), st.integers(0, 2**22), st.integers(0, 2**63 - 1))

node_descs = st.builds(NodeDesc, addrs, ids, ids)

#: Aware UTC datetimes with microseconds, over the whole range Python allows.
aware_datetimes = st.datetimes(
    min_value=_dt.datetime(1, 1, 2), max_value=_dt.datetime(9999, 12, 30), timezones=st.just(UTC)
)
#: Datetimes as live rendezvous write them: around now.
recent_datetimes = st.datetimes(
    min_value=_dt.datetime(2020, 1, 1), max_value=_dt.datetime(2040, 1, 1), timezones=st.just(UTC)
)
datetimes = st.one_of(recent_datetimes, aware_datetimes)


@st.composite
def rendezvous_states(draw: Any, naive: Optional[bool] = None, max_nodes: int = 8) -> RendezvousState:
    """A state with random membership: a node may sit in several containers at once."""
    pool: List[NodeDesc] = draw(st.lists(node_descs, max_size=max_nodes, unique=True))

    def subset() -> List[NodeDesc]:
        return [n for n in pool if draw(st.booleans())]

    members = subset()
    if draw(st.booleans()):  # torch's own shape: ranks 0..n-1 by node order
        ranks = dict(zip(sorted(members), range(len(members))))
    else:
        ranks = {n: draw(st.integers(0, 2**40)) for n in members}
    state = RendezvousState(
        round=draw(st.one_of(st.integers(0, 10), st.integers(0, 2**63 - 1))),
        complete=draw(st.booleans()),
        deadline=draw(st.none() | datetimes),
        closed=draw(st.booleans()),
        participants=ranks,
        wait_list=set(subset()),
        redundancy_list=set(subset()),
        last_heartbeats={n: draw(datetimes) for n in subset()},
        naive_datetimes=draw(st.booleans()) if naive is None else naive,
    )
    return state


def torch_classes() -> Tuple[type, type]:
    """torch's ``(_RendezvousState, _NodeDesc)`` (imports torch)."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

    return _RendezvousState, _NodeDesc


def to_torch(state: RendezvousState, shared: bool = True) -> Any:
    """A real torch ``_RendezvousState`` with the fields of ``state``.

    ``shared``: one ``_NodeDesc`` object per node across all containers (what a
    live handler holds); otherwise every container gets its own equal copies.
    Datetimes are naive UTC when ``state.naive_datetimes`` (torch < 2.6).
    """
    state_cls, node_cls = torch_classes()
    made: Dict[NodeDesc, Any] = {}

    def node(desc: NodeDesc) -> Any:
        if not shared:
            return node_cls(desc.addr, desc.pid, desc.local_id)
        if desc not in made:
            made[desc] = node_cls(desc.addr, desc.pid, desc.local_id)
        return made[desc]

    def when(value: Optional[_dt.datetime]) -> Optional[_dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=None) if state.naive_datetimes else value

    out = state_cls()
    out.round = state.round
    out.complete = state.complete
    out.deadline = when(state.deadline)
    out.closed = state.closed
    out.participants = {node(n): r for n, r in state.participants.items()}
    out.wait_list = {node(n) for n in state.wait_list}
    out.redundancy_list = {node(n) for n in state.redundancy_list}
    out.last_heartbeats = {node(n): when(t) for n, t in state.last_heartbeats.items()}
    return out


def from_torch(obj: Any) -> RendezvousState:
    """Our model of a real torch state, checking every node is a real ``_NodeDesc``.

    Naive datetimes are taken as UTC and recorded in ``naive_datetimes`` (only
    when the state holds any datetime, as :func:`rdzvctl.state.codec.decode` does).
    """
    state_cls, node_cls = torch_classes()
    assert type(obj) is state_cls, f"not a torch _RendezvousState: {type(obj)!r}"
    assert set(vars(obj)) == {
        "round", "complete", "deadline", "closed", "participants", "wait_list", "redundancy_list", "last_heartbeats"
    }, sorted(vars(obj))
    nodes = set(obj.participants) | obj.wait_list | obj.redundancy_list | set(obj.last_heartbeats)
    for n in nodes:
        assert type(n) is node_cls, f"not a torch _NodeDesc: {type(n)!r}"
    times = [t for t in [obj.deadline, *obj.last_heartbeats.values()] if t is not None]
    for t in times:
        assert type(t) is _dt.datetime

    def desc(n: Any) -> NodeDesc:
        return NodeDesc(n.addr, n.pid, n.local_id)

    def when(value: Optional[_dt.datetime]) -> Optional[_dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value

    return RendezvousState(
        round=obj.round,
        complete=obj.complete,
        deadline=when(obj.deadline),
        closed=obj.closed,
        participants={desc(n): r for n, r in obj.participants.items()},
        wait_list={desc(n) for n in obj.wait_list},
        redundancy_list={desc(n) for n in obj.redundancy_list},
        last_heartbeats={desc(n): when(t) for n, t in obj.last_heartbeats.items()},
        naive_datetimes=bool(times) and all(t.tzinfo is None for t in times),
    )


@st.composite
def torch_states(draw: Any, naive: Optional[bool] = False) -> Tuple[Any, RendezvousState]:
    """``(torch _RendezvousState, expected RendezvousState)``; imports torch.

    ``naive=None`` draws either style.  The expectation's ``naive_datetimes``
    is what decoding reports: True only if the state holds a naive datetime.
    """
    expected = draw(rendezvous_states(naive=naive))
    obj = to_torch(expected, shared=draw(st.booleans()))
    has_times = expected.deadline is not None or bool(expected.last_heartbeats)
    expected.naive_datetimes = expected.naive_datetimes and has_times
    return obj, expected
