"""Liveness, findings, repairs (checked against torch's own code) and semantic diffs."""

from __future__ import annotations

import datetime as _dt
import types
from typing import Any, List, Optional

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rdzvctl.state.analysis import (
    Event,
    Finding,
    KeepAlive,
    dead_nodes,
    deadline_remaining,
    diff_states,
    find_problems,
    node_statuses,
    prune_dead_nodes,
    remove_node,
    reopen,
)
from rdzvctl.state.lifecycle import TORCH_NEXT
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import UTC, from_torch, node_descs, rendezvous_states, to_torch

A = NodeDesc("node_a", 1, 0)
B = NodeDesc("node_b", 2, 0)
C = NodeDesc("node_c", 3, 0)
D = NodeDesc("node_d", 4, 0)
NOW = _dt.datetime(2026, 11, 24, 22, 0, 0, tzinfo=UTC)
FRESH = NOW - _dt.timedelta(seconds=1)
STALE = NOW - _dt.timedelta(seconds=60)
SECOND = _dt.timedelta(seconds=1)


def _healthy() -> RendezvousState:
    return RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, last_heartbeats={A: FRESH, B: FRESH})


def _codes(findings: List[Finding]) -> List[str]:
    return [f.code for f in findings]


def _one(findings: List[Finding], code: str) -> Finding:
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, _codes(findings)
    return found[0]


# -- liveness ---------------------------------------------------------------------------
def test_default_keep_alive_is_torchs_5s_times_3() -> None:
    assert KeepAlive().expiry == _dt.timedelta(seconds=15)
    assert KeepAlive(interval=1, max_attempt=4).expiry == _dt.timedelta(seconds=4)


@pytest.mark.parametrize("keep_alive, seconds", [(KeepAlive(), 15), (KeepAlive(2.5, 2), 5), (KeepAlive(60, 1), 60)])
def test_liveness_boundary_matches_torch(keep_alive: KeepAlive, seconds: float) -> None:
    """torch: dead iff last_heartbeat < now - interval * max_attempt (the boundary is alive)."""
    edge = NOW - _dt.timedelta(seconds=seconds)
    just_dead = edge - _dt.timedelta(microseconds=1)
    state = RendezvousState(participants={A: 0, B: 1}, last_heartbeats={A: edge, B: just_dead})
    assert dead_nodes(state, NOW, keep_alive) == [B]
    rows = {row.node: row for row in node_statuses(state, NOW, keep_alive)}
    assert rows[A].alive is True and rows[B].alive is False
    assert rows[A].age == seconds


def test_node_statuses_roles_order_and_missing_heartbeats() -> None:
    state = RendezvousState(
        participants={B: 0, A: 1}, wait_list={C}, redundancy_list={D},
        last_heartbeats={A: FRESH, B: STALE, D: NOW + SECOND, NodeDesc("gone", 9, 9): FRESH},
    )
    rows = node_statuses(state, NOW)
    assert [(str(r.node), r.role, r.rank) for r in rows] == [
        ("node_b_2_0", "participant", 0),
        ("node_a_1_0", "participant", 1),
        ("node_c_3_0", "waiting", None),
        ("node_d_4_0", "redundant", None),
        ("gone_9_9", "orphan", None),
    ]
    by_node = {r.node: r for r in rows}
    assert by_node[B].alive is False and by_node[B].age == 60
    assert by_node[C].alive is None and by_node[C].last_heartbeat is None and by_node[C].age is None
    assert by_node[D].alive is True and by_node[D].age == -1


def test_a_node_in_several_lists_is_listed_once() -> None:
    state = RendezvousState(participants={A: 0}, wait_list={A, B}, redundancy_list={A, B}, last_heartbeats={A: FRESH})
    rows = node_statuses(state, NOW)
    assert [(r.node, r.role) for r in rows] == [(A, "participant"), (B, "waiting")]


def test_deadline_remaining() -> None:
    assert deadline_remaining(RendezvousState(), NOW) is None
    assert deadline_remaining(RendezvousState(deadline=NOW + 30 * SECOND), NOW) == 30
    assert deadline_remaining(RendezvousState(deadline=NOW - 2 * SECOND), NOW) == -2


# -- findings -----------------------------------------------------------------------------
def test_healthy_state_has_no_findings() -> None:
    assert find_problems(_healthy(), NOW, max_nodes=2, run_id="job-7f3a") == []
    assert find_problems(RendezvousState(), NOW) == []
    waiting = RendezvousState(round=1, deadline=NOW + 30 * SECOND, participants={A: 0}, last_heartbeats={A: FRESH})
    assert find_problems(waiting, NOW) == []


def _scenario(code: str) -> tuple:
    """(state, find_problems kwargs, expected severity, expected nodes or None)."""
    s = _healthy()
    kwargs: dict = {}
    nodes: Optional[tuple] = None
    severity = "error"
    if code == "ranks-invalid":
        s.participants = {A: 0, B: 0}
    elif code == "participant-left":
        s.participants = {A: 0, B: 2}
    elif code == "complete-without-participants":
        s.participants, s.last_heartbeats = {}, {}
    elif code == "deadline-on-complete":
        s.deadline, severity = NOW + SECOND, "info"
    elif code == "missing-heartbeat":
        del s.last_heartbeats[B]
        nodes = (str(B),)
    elif code == "participant-and-waiting":
        s.wait_list = {A}
        nodes = (str(A),)
    elif code == "dead-participants":
        s.last_heartbeats[B] = STALE
        nodes = (str(B),)
    elif code == "dead-nodes":
        s.wait_list, s.last_heartbeats[C] = {C}, STALE
        nodes, severity = (str(C),), "info"
    elif code == "heartbeat-in-future":
        s.last_heartbeats[B] = NOW + 10 * SECOND
        nodes, severity = (str(B),), "warning"
    elif code == "closed-while-alive":  # seen closed a minute ago, and A and B still heartbeat
        s.closed, kwargs["closed_since"] = True, NOW - 60 * SECOND
        nodes = (str(A), str(B))
    elif code == "closed":
        s = RendezvousState(round=4, closed=True)
    elif code == "over-max-nodes":
        kwargs["max_nodes"] = 1
    elif code == "shared-run-id":
        kwargs["run_id"], severity = "none", "warning"
    elif code == "deadline-passed":
        s = RendezvousState(round=1, deadline=NOW - 5 * SECOND, participants={A: 0}, last_heartbeats={A: FRESH})
        severity = "info"
    elif code == "orphan-heartbeats":
        s.last_heartbeats[D] = FRESH
        nodes, severity = (str(D),), "info"
    elif code == "naive-datetimes":
        s.naive_datetimes, severity = True, "info"
    else:  # pragma: no cover
        raise AssertionError(code)
    return s, kwargs, severity, nodes


CODES = [
    "ranks-invalid", "participant-left", "complete-without-participants", "deadline-on-complete", "missing-heartbeat",
    "participant-and-waiting", "dead-participants", "dead-nodes", "heartbeat-in-future", "closed-while-alive", "closed", "over-max-nodes", "shared-run-id", "deadline-passed", "orphan-heartbeats",
    "naive-datetimes",
]


@pytest.mark.parametrize("code", CODES)
def test_each_finding_in_a_minimal_scenario(code: str) -> None:
    state, kwargs, severity, nodes = _scenario(code)
    findings = find_problems(state, NOW, **kwargs)
    finding = _one(findings, code)
    assert finding.severity == severity
    assert finding.message and "\n" not in finding.message
    if nodes is not None:
        assert finding.nodes == nodes
    assert finding.torch_next in TORCH_NEXT and finding.outlook and "\n" not in finding.outlook
    # The minimal scenario produces this finding alone.
    assert set(_codes(findings)) == {code}


def test_dead_participants_of_a_complete_round_nobody_waiting_are_an_error() -> None:
    """Stuck: torch's ``_sanitize`` drops B without renumbering; nobody restarts A (``num_nodes_waiting`` is 0)."""
    state = _healthy()
    state.last_heartbeats[B] = STALE
    finding = _one(find_problems(state, NOW), "dead-participants")
    assert finding.severity == "error" and finding.torch_next == "stays"
    assert finding.repair.startswith("rdzvctl reset --mode prune") and "--add-waiting" in finding.repair
    state.complete = False  # forming: A's next sync drops B (``_sanitize``), nothing to repair
    finding = _one(find_problems(state, NOW), "dead-participants")
    assert finding.severity == "info" and finding.nodes == (str(B),) and finding.torch_next == "recovers"
    assert not finding.repair


def test_custom_keep_alive_changes_who_is_dead() -> None:
    state = _healthy()
    state.last_heartbeats[B] = NOW - 10 * SECOND
    assert find_problems(state, NOW) == []
    assert _codes(find_problems(state, NOW, keep_alive=KeepAlive(1, 4))) == ["dead-participants"]


def test_closed_with_only_dead_nodes_is_closed_not_alive() -> None:
    state = RendezvousState(closed=True, participants={A: 0}, complete=True, last_heartbeats={A: STALE})
    assert set(_codes(find_problems(state, NOW))) == {"closed", "dead-participants"}


@pytest.mark.parametrize("run_id", ["none", "None", " none ", "default", "0", ""])
def test_suspicious_run_ids(run_id: str) -> None:
    assert "shared-run-id" in _codes(find_problems(_healthy(), NOW, run_id=run_id))


def test_findings_are_sorted_most_severe_first() -> None:
    state = _healthy()
    state.naive_datetimes = True  # info
    state.last_heartbeats[B] = NOW + 60 * SECOND  # warning
    state.participants = {A: 0, B: 5}  # error (a participant left, nobody waits)
    severities = [f.severity for f in find_problems(state, NOW)]
    assert severities == ["error", "warning", "info"]
    assert Finding("x", "warning", "m").at_least("warning")
    assert not Finding("x", "info", "m").at_least("warning")


def test_a_repair_only_where_torch_does_not_fix_it_itself() -> None:
    for code in CODES:
        state, kwargs, _, _ = _scenario(code)
        for finding in find_problems(state, NOW, **kwargs):
            assert finding.severity in ("info", "warning", "error")
            assert finding.torch_next in TORCH_NEXT and finding.outlook
            if finding.torch_next in ("recovers", "next-join-fixes"):
                assert not finding.repair, finding
            elif finding.torch_next in ("stays", "agents-fail", "new-job-fails"):
                assert finding.repair, finding


# -- repairs, against torch's own code -------------------------------------------------------
def test_prune_dead_nodes_minimal() -> None:
    state = RendezvousState(round=5, complete=True, participants={A: 0}, wait_list={C}, redundancy_list={D},
                            last_heartbeats={A: STALE, C: STALE, D: FRESH})
    new, removed = prune_dead_nodes(state, NOW)
    assert removed == [A, C]
    assert new == RendezvousState(round=6, complete=False, redundancy_list={D}, last_heartbeats={D: FRESH})
    assert state.participants == {A: 0} and state.round == 5  # not modified


def test_prune_keeps_the_deadline_unless_min_nodes_says_otherwise() -> None:
    state = RendezvousState(round=1, deadline=NOW, participants={A: 0, B: 1}, last_heartbeats={A: FRESH, B: STALE})
    assert prune_dead_nodes(state, NOW)[0].deadline == NOW
    assert prune_dead_nodes(state, NOW, min_nodes=1)[0].deadline == NOW
    assert prune_dead_nodes(state, NOW, min_nodes=2)[0].deadline is None


def _torch_settings(keep_alive: KeepAlive, min_nodes: int) -> Any:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousSettings, RendezvousTimeout

    return RendezvousSettings(
        run_id="job", min_nodes=min_nodes, max_nodes=max(min_nodes, 8), timeout=RendezvousTimeout(),
        keep_alive_interval=_dt.timedelta(seconds=keep_alive.interval),
        keep_alive_max_attempt=keep_alive.max_attempt,
    )


@pytest.fixture(scope="module")
def dynamic_rendezvous() -> Any:
    pytest.importorskip("torch")
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    return dynamic_rendezvous


def _torch_sanitize(module: Any, state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive,
                    min_nodes: int) -> tuple:
    """Run torch's ``_BackendRendezvousStateHolder._sanitize`` on ``state`` at ``now``."""

    class FrozenClock(_dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> _dt.datetime:  # type: ignore[override]
            return now

    holder = types.SimpleNamespace(_state=to_torch(state), _settings=_torch_settings(keep_alive, min_nodes),
                                   _dead_nodes=[])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "datetime", FrozenClock)
        module._BackendRendezvousStateHolder._sanitize(holder)
    dead = sorted(NodeDesc(n.addr, n.pid, n.local_id) for n in holder._dead_nodes)
    return from_torch(holder._state), dead


@st.composite
def _sanitize_cases(draw: Any) -> tuple:
    state = draw(rendezvous_states(naive=False))
    keep_alive = KeepAlive(draw(st.sampled_from([0.5, 1.0, 5.0, 30.0])), draw(st.integers(1, 5)))
    times = list(state.last_heartbeats.values()) + ([state.deadline] if state.deadline else [])
    try:
        if times and draw(st.booleans()):  # right at a node's expiry: the boundary case
            now = draw(st.sampled_from(times)) + keep_alive.expiry
            now += draw(st.sampled_from([-1, 0, 1])) * _dt.timedelta(microseconds=1)
        else:
            now = draw(st.datetimes(min_value=_dt.datetime(2019, 1, 1), max_value=_dt.datetime(2041, 1, 1),
                                    timezones=st.just(UTC)))
        now - keep_alive.expiry  # noqa: B018 - must not overflow
    except OverflowError:
        assume(False)
    return state, now, keep_alive, draw(st.integers(1, 4))


@settings(max_examples=250, deadline=None)
@given(_sanitize_cases())
def test_prune_matches_torchs_sanitize(dynamic_rendezvous: Any, case: tuple) -> None:
    state, now, keep_alive, min_nodes = case
    expected, expected_dead = _torch_sanitize(dynamic_rendezvous, state, now, keep_alive, min_nodes)
    new, removed = prune_dead_nodes(state, now, keep_alive, min_nodes=min_nodes)
    assert removed == expected_dead
    assert new == expected
    assert (new.round, new.complete, new.deadline) == (expected.round, expected.complete, expected.deadline)


@settings(max_examples=150, deadline=None)
@given(rendezvous_states(naive=False), node_descs, st.integers(0, 8), st.integers(1, 4))
def test_remove_node_matches_torchs_leave(dynamic_rendezvous: Any, state: RendezvousState, node: NodeDesc,
                                          rank: int, min_nodes: int) -> None:
    """A participant leaving: torch's ``_remove_from_participants`` and its epilogue."""
    state.participants[node] = rank
    state.last_heartbeats[node] = NOW
    state.wait_list.discard(node)
    state.redundancy_list.discard(node)
    torch_state = to_torch(state)
    executor = types.SimpleNamespace(
        _state=torch_state, _settings=_torch_settings(KeepAlive(), min_nodes),
        _node=next(n for n in torch_state.participants if (n.addr, n.pid, n.local_id) == (node.addr, node.pid,
                                                                                         node.local_id)),
        _record=lambda *args, **kwargs: None,
    )
    dynamic_rendezvous._DistributedRendezvousOpExecutor._remove_from_participants(executor)
    assert remove_node(state, node, min_nodes=min_nodes) == from_torch(torch_state)


def test_remove_node_from_every_list() -> None:
    state = RendezvousState(round=1, complete=True, participants={A: 0}, wait_list={A, B}, redundancy_list={A},
                            last_heartbeats={A: FRESH, B: FRESH})
    new = remove_node(state, A)
    assert new == RendezvousState(round=2, complete=False, wait_list={B}, last_heartbeats={B: FRESH})
    assert remove_node(state, NodeDesc("x", 0, 0)) == state


def test_reopen() -> None:
    state = RendezvousState(round=3, closed=True, participants={A: 0}, last_heartbeats={A: FRESH})
    new = reopen(state)
    assert new.closed is False and state.closed is True
    assert (new.round, new.participants, new.last_heartbeats) == (3, {A: 0}, {A: FRESH})


# -- diffs -----------------------------------------------------------------------------------
def _kinds(events: List[Event]) -> List[str]:
    return [e.kind for e in events]


def test_diff_state_created_and_removed() -> None:
    assert diff_states(None, None) == []
    assert _kinds(diff_states(None, _healthy())) == ["state-created"]
    assert _kinds(diff_states(_healthy(), None)) == ["state-removed"]
    assert diff_states(_healthy(), _healthy()) == []


def test_diff_heartbeats_alone_are_not_events() -> None:
    new = _healthy()
    new.last_heartbeats[A] = NOW
    assert diff_states(_healthy(), new) == []


@pytest.mark.parametrize("change, kinds, node", [
    (lambda s: setattr(s, "round", 3), ["round-advanced"], None),
    (lambda s: setattr(s, "round", 0), ["round-went-back"], None),
    (lambda s: s.participants.update({C: 2}), ["joined-participants"], C),
    (lambda s: s.participants.pop(B), ["left-participants"], B),
    (lambda s: s.wait_list.add(C), ["joined-wait-list"], C),
    (lambda s: s.redundancy_list.add(D), ["joined-redundancy-list"], D),
    (lambda s: s.participants.update({A: 1, B: 0}), ["rank-changed", "rank-changed"], A),
    (lambda s: setattr(s, "complete", False), ["incomplete"], None),
    (lambda s: setattr(s, "closed", True), ["closed"], None),
    (lambda s: setattr(s, "deadline", NOW), ["deadline-set"], None),
])
def test_diff_events(change: Any, kinds: List[str], node: Optional[NodeDesc]) -> None:
    old, new = _healthy(), _healthy()
    change(new)
    events = diff_states(old, new)
    assert _kinds(events) == kinds
    if node is not None:
        assert events[0].node == str(node)
    assert all(e.message for e in events)
    # And the reverse change gives the opposite events.
    back = _kinds(diff_states(new, old))
    opposite = {"joined-participants": "left-participants", "left-participants": "joined-participants",
                "joined-wait-list": "left-wait-list", "joined-redundancy-list": "left-redundancy-list",
                "incomplete": "completed", "closed": "reopened", "deadline-set": "deadline-cleared",
                "round-advanced": "round-went-back", "round-went-back": "round-advanced"}
    assert back == [opposite.get(k, k) for k in kinds]


def test_diff_event_data() -> None:
    old, new = _healthy(), _healthy()
    new.round = 7
    new.participants = {A: 1, B: 0}
    events = diff_states(old, new)
    assert [(e.kind, e.node, e.data) for e in events] == [
        ("round-advanced", None, {"from": 2, "to": 7}),
        ("rank-changed", str(A), {"from": 0, "to": 1}),
        ("rank-changed", str(B), {"from": 1, "to": 0}),
    ]
