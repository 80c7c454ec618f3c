"""torch's invariants of a state (``set -f`` refuses what breaks them): plain data, no backend."""

from __future__ import annotations

import datetime as _dt

from rdzvctl.state.invariants import some_of, torch_invariant_violations
from rdzvctl.state.model import NodeDesc, RendezvousState

NOW = _dt.datetime(2026, 11, 24, 22, 0, tzinfo=_dt.timezone.utc)


def complete(n: int) -> RendezvousState:
    nodes = [NodeDesc(f"trainer-{i}", 4100 + i, 0) for i in range(n)]
    return RendezvousState(round=1, complete=True, participants={node: r for r, node in enumerate(sorted(nodes))},
                           last_heartbeats={node: NOW for node in nodes})


def test_a_state_torch_writes_has_no_violation():
    assert torch_invariant_violations(complete(4)) == []
    assert torch_invariant_violations(RendezvousState()) == []  # torch's initial state


def test_an_incomplete_round_may_hold_any_ranks():
    state = complete(3)
    state.complete = False
    state.participants = dict.fromkeys(state.participants, 0)  # _add_to_participants sets 0 until completion
    assert torch_invariant_violations(state) == []


def test_rank_outside_the_world():
    state = complete(1)
    state.participants = {node: 5 for node in state.participants}
    (line,) = torch_invariant_violations(state)
    assert "rank outside 0..0 (world size 1)" in line and "trainer-0_4100_0" in line


def test_shared_ranks_and_membership_overlaps_and_missing_heartbeats():
    state = complete(3)
    a, b, c = sorted(state.participants)
    state.participants[b] = 0
    state.wait_list.add(a)
    state.redundancy_list.update({a, NodeDesc("spare", 1, 0)})
    state.wait_list.add(NodeDesc("spare", 1, 0))
    del state.last_heartbeats[c]
    lines = torch_invariant_violations(state)
    assert any("share a rank" in line for line in lines)
    assert any("both participating and waiting: trainer-0_4100_0" in line for line in lines)
    assert any("both participating and redundant" in line for line in lines)
    assert any("both waiting and redundant" in line for line in lines)
    assert any("participant(s) without a heartbeat" in line and "trainer-2_4102_0" in line for line in lines)
    assert "1 waiting node(s) without a heartbeat (never detected dead): spare_1_0" in lines


def test_complete_without_participants():
    assert torch_invariant_violations(RendezvousState(complete=True)) == [
        "the round is complete but has no participants"]


def test_large_states_name_a_few_nodes_and_count_the_rest():
    state = complete(50_000)
    state.last_heartbeats.clear()
    (line,) = torch_invariant_violations(state)
    assert line.startswith("50000 participant(s) without a heartbeat") and line.endswith(" and 49997 more")
    assert some_of(["b", "a"]) == "a, b"
