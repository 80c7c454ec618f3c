"""The lifecycle model: what torch 2.13's agents do next with a state, phase by phase.

Each test names the function of torch's
``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py`` whose behaviour
it relies on.  Pure data; no backend.
"""

from __future__ import annotations

import datetime as _dt

import pytest

from rdzvctl.state.analysis import KeepAlive
from rdzvctl.state.findings import find_problems, master_address_findings, master_addresses
from rdzvctl.state.lifecycle import PHASES, launch_verdict, lifecycle
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import UTC

A = NodeDesc("node_a", 1, 0)
B = NodeDesc("node_b", 2, 0)
C = NodeDesc("node_c", 3, 0)
NOW = _dt.datetime(2026, 11, 24, 22, 0, 0, tzinfo=UTC)
SECOND = _dt.timedelta(seconds=1)
FRESH = NOW - SECOND
STALE = NOW - 60 * SECOND


def _codes(state: RendezvousState, **kwargs) -> dict:
    return {f.code: f for f in find_problems(state, NOW, **kwargs)}


def _writes(state: RendezvousState, **kwargs) -> list:
    """Repairs that write (every repair rdzvctl gives is an rdzvctl command)."""
    return [f.repair for f in find_problems(state, NOW, **kwargs) if f.repair.startswith("rdzvctl")]


# -- forming --------------------------------------------------------------------------------
def test_a_new_run_is_forming() -> None:
    """``_RendezvousJoinOp``: the first agent to join an empty state adds itself to the participants."""
    life = lifecycle(RendezvousState(), NOW)
    assert life.phase == "forming" and life.torch_next == "proceeds"


def test_forming_with_a_running_deadline() -> None:
    """``_add_to_participants`` sets the last-call deadline at min_nodes; ``_RendezvousJoinOp`` completes after it."""
    state = RendezvousState(round=1, deadline=NOW + 20 * SECOND, participants={A: 0, B: 0},
                            last_heartbeats={A: FRESH, B: FRESH})
    life = lifecycle(state, NOW)
    assert life.phase == "forming" and "last call ends" in life.outlook
    assert find_problems(state, NOW) == []


def test_forming_with_a_dead_participant_recovers_without_a_repair() -> None:
    """``_sanitize`` (run by every live agent's ``sync``) drops B and ``_remove_participant_epilogue`` follows."""
    state = RendezvousState(round=1, participants={A: 0, B: 0}, last_heartbeats={A: FRESH, B: STALE})
    life = lifecycle(state, NOW)
    assert life.phase == "forming" and life.torch_next == "recovers" and str(B) in life.nodes
    dead = _codes(state)["dead-participants"]
    assert dead.torch_next == "recovers" and not dead.repair and dead.nodes == (str(B),)


# -- complete -------------------------------------------------------------------------------
def test_a_complete_round_with_live_participants_is_training() -> None:
    """``_RendezvousJoinOp`` returns FINISH for a participant of a complete round: nothing changes."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, last_heartbeats={A: FRESH, B: FRESH})
    assert lifecycle(state, NOW).phase == "complete"


# -- recovering -----------------------------------------------------------------------------
def test_survivors_waiting_and_the_dead_node_the_only_participant_is_recovering() -> None:
    """The field incident: after kill -9 of C, A and B left round 2 to wait (``_RendezvousExitOp``, then
    ``_RendezvousJoinOp`` -> ``_add_to_wait_list``).  C is the only participant; once its heartbeat expires the
    waiting agents' ``sync``/``_sanitize`` drop it, ``_remove_participant_epilogue`` moves to round 3 and they join.
    Nothing may be written; the dead node is named.
    """
    state = RendezvousState(round=2, complete=True, participants={C: 2}, wait_list={A, B},
                            last_heartbeats={A: FRESH, B: FRESH, C: NOW - 3 * SECOND})
    life = lifecycle(state, NOW)
    assert life.phase == "recovering" and life.torch_next == "recovers"
    assert set(life.nodes) == {str(A), str(B), str(C)}
    findings = find_problems(state, NOW)
    assert not _writes(state) and all(f.severity == "info" for f in findings)
    left = {f.code: f for f in findings}["participant-left"]
    assert str(C) in left.nodes and left.torch_next == "recovers"
    # Later: C's heartbeat expired, A and B still wait: still recovering, C named as dead, still no write.
    state.last_heartbeats[C] = STALE
    life = lifecycle(state, NOW)
    assert life.phase == "recovering" and str(C) in life.outlook
    dead = _codes(state)["dead-participants"]
    assert dead.nodes == (str(C),) and dead.torch_next == "recovers" and not _writes(state)


def test_a_waiting_node_makes_the_participants_restart() -> None:
    """Scale-up: the agent's monitor loop restarts when ``num_nodes_waiting`` > 0."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, wait_list={C},
                            last_heartbeats={A: FRESH, B: FRESH, C: FRESH})
    life = lifecycle(state, NOW)
    assert life.phase == "recovering" and "num_nodes_waiting" in life.outlook
    assert find_problems(state, NOW) == []


# -- stuck ----------------------------------------------------------------------------------
def test_a_dead_participant_of_a_complete_round_and_nobody_waiting_is_stuck() -> None:
    """torch 2.13's ``_sanitize`` only drops B (no renumbering, no wait-list entry: PR #151220 is not in it),
    and the survivors restart only when ``num_nodes_waiting`` > 0: the repair is offered."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, last_heartbeats={A: FRESH, B: STALE})
    life = lifecycle(state, NOW)
    assert life.phase == "stuck" and life.torch_next == "stays" and str(B) in life.outlook
    dead = _codes(state)["dead-participants"]
    assert dead.severity == "error" and dead.repair.startswith("rdzvctl reset --mode prune")


def test_a_rank_hole_with_nobody_waiting_is_stuck() -> None:
    """A participant left (``_RendezvousExitOp`` / ``_sanitize``) without renumbering; nobody waits."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 2}, last_heartbeats={A: FRESH, B: FRESH})
    assert lifecycle(state, NOW).phase == "stuck"
    left = _codes(state)["participant-left"]
    assert left.severity == "error" and "--add-waiting" in left.repair and "[1]" in left.message


def test_no_live_agent_left_is_stuck_and_the_next_job_fixes_it() -> None:
    """Every agent died without closing: nothing changes until a new agent's first ``sync`` runs ``_sanitize``,
    which empties the complete round and ``_remove_participant_epilogue`` starts the next one."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1}, last_heartbeats={A: STALE, B: STALE})
    life = lifecycle(state, NOW)
    assert life.phase == "stuck" and life.torch_next == "next-join-fixes"
    dead = _codes(state)["dead-participants"]
    assert dead.severity == "warning" and not dead.repair and set(dead.nodes) == {str(A), str(B)}
    verdict = launch_verdict(state, NOW)
    assert verdict.ok and verdict.round == 3


# -- closed ---------------------------------------------------------------------------------
def test_closed_and_nobody_alive_is_finished_and_a_new_job_fails() -> None:
    """``shutdown`` stops the heartbeats and ``_RendezvousCloseOp`` closes; a join of a closed run returns
    ERROR_CLOSED (``_RendezvousJoinOp``) -> RendezvousClosedError.  The blocking finding is ``closed``."""
    state = RendezvousState(round=3, complete=True, closed=True, participants={A: 0, B: 1},
                            last_heartbeats={A: STALE, B: STALE})
    life = lifecycle(state, NOW)
    assert life.phase == "finished" and life.torch_next == "new-job-fails"
    findings = find_problems(state, NOW)
    assert findings[0].code == "closed" and findings[0].severity == "error"
    assert findings[0].repair.startswith("rdzvctl reset --mode reopen")
    assert "prune" not in " ".join(f.repair for f in findings)  # there are no survivors to help
    verdict = launch_verdict(state, NOW)
    assert not verdict.ok and "RendezvousClosedError" in verdict.reason


def test_closed_while_agents_heartbeat_cannot_yet_tell_and_says_when() -> None:
    """An agent stops heartbeating when it shuts down (``shutdown`` -> ``_stop_heartbeats``); a closed run
    with fresh heartbeats may be a normal end in progress.  No repair: an agent still in ``_RendezvousCloseOp``
    would close a reopened run again."""
    state = RendezvousState(round=3, complete=True, closed=True, participants={A: 0, B: 1},
                            last_heartbeats={A: NOW - 2 * SECOND, B: FRESH})
    life = lifecycle(state, NOW)
    assert life.phase == "closing" and life.known_at == FRESH + 15 * SECOND
    closed = _codes(state)["closed"]
    assert closed.severity == "error" and not closed.repair and "2026-11-24T22:00:14" in closed.outlook
    # Nobody heartbeat after the window: a normal end.
    assert lifecycle(state, NOW + 16 * SECOND, closed_since=NOW).phase == "finished"


def test_agents_heartbeating_a_window_after_the_close_is_closed_under_live_agents() -> None:
    """``_RendezvousKeepAliveOp`` heartbeats into a closed state: agents that run on keep it fresh."""
    state = RendezvousState(round=3, complete=True, closed=True, participants={A: 0, B: 1},
                            last_heartbeats={A: FRESH, B: FRESH})
    seen = NOW - 20 * SECOND
    life = lifecycle(state, NOW, closed_since=seen)
    assert life.phase == "closed-under-live-agents" and set(life.nodes) == {str(A), str(B)}
    finding = _codes(state, closed_since=seen)["closed-while-alive"]
    assert finding.severity == "error" and finding.repair == "rdzvctl reset --mode reopen"
    # Seen closed only 5 s ago: not yet decided.
    assert lifecycle(state, NOW, closed_since=NOW - 5 * SECOND).phase == "closing"


def test_every_phase_is_reachable() -> None:
    states = [
        (RendezvousState(), {}),
        (RendezvousState(complete=True, participants={A: 0}, last_heartbeats={A: FRESH}), {}),
        (RendezvousState(complete=True, participants={A: 0}, wait_list={B}, last_heartbeats={A: FRESH, B: FRESH}),
         {}),
        (RendezvousState(complete=True, participants={A: 0}, last_heartbeats={A: STALE}), {}),
        (RendezvousState(closed=True, participants={A: 0}, last_heartbeats={A: FRESH}), {}),
        (RendezvousState(closed=True, participants={A: 0}, last_heartbeats={A: STALE}), {}),
        (RendezvousState(closed=True, participants={A: 0}, last_heartbeats={A: FRESH}), {"closed_since": STALE}),
    ]
    assert [lifecycle(s, NOW, **kw).phase for s, kw in states] == list(PHASES)


def test_keep_alive_settings_decide_who_is_dead() -> None:
    """``_sanitize``: dead iff the heartbeat is older than keep_alive_interval x keep_alive_max_attempt."""
    state = RendezvousState(round=2, complete=True, participants={A: 0, B: 1},
                            last_heartbeats={A: FRESH, B: NOW - 10 * SECOND})
    assert lifecycle(state, NOW).phase == "complete"
    assert lifecycle(state, NOW, interval=1, max_attempt=4).phase == "stuck"


# -- linear in the nodes, never in a value -------------------------------------------------------
def test_huge_ranks_are_a_finding_without_materialising_ranges() -> None:
    """A 400-byte complete round with ranks {0, 10**12}: never torch's (``_mark_rendezvous_complete``
    numbers 0..n-1, and c10d takes ranks as C int)."""
    state = RendezvousState(round=1, complete=True, participants={A: 0, B: 10**12},
                            last_heartbeats={A: FRESH, B: FRESH})
    findings = _codes(state)  # a range(10**12) here would never finish
    life = lifecycle(state, NOW)
    assert "ranks-invalid" in findings and "1000000000000" in findings["ranks-invalid"].message
    assert life.phase == "stuck"


def test_a_rank_at_or_above_max_nodes_is_invalid() -> None:
    state = RendezvousState(round=1, complete=True, participants={A: 0, B: 7}, last_heartbeats={A: FRESH, B: FRESH})
    assert "ranks-invalid" in _codes(state, max_nodes=4)
    assert "ranks-invalid" not in _codes(state) and "participant-left" in _codes(state)


# -- the launch gate ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "keys", "ok", "reason"),
    [
        (None, {}, True, "round 0"),
        (None, {"0/MASTER_ADDR": b"10.0.0.1"}, False, "stale"),
        (None, None, True, "not checked"),
        (RendezvousState(closed=True), {}, False, "closed"),
        (RendezvousState(round=2, complete=True, participants={A: 0}, last_heartbeats={A: FRESH}), {}, False,
         "running job"),
        (RendezvousState(round=2, complete=True, participants={A: 0}, last_heartbeats={A: STALE}),
         {"2/MASTER_ADDR": b"a", "2/MASTER_PORT": b"1"}, True, "round 3"),
        (RendezvousState(round=2, complete=True, participants={A: 0}, last_heartbeats={A: STALE}),
         {"3/MASTER_ADDR": b"a"}, False, "round(s) [3]"),
        (RendezvousState(round=2, complete=True, participants={A: 0}, last_heartbeats={}), {}, False,
         "stays complete"),
    ],
)
def test_launch_verdict(state, keys, ok, reason) -> None:
    """What a new job's first agent sees after its first ``sync`` (``_sanitize``) and its ``_RendezvousJoinOp``."""
    verdict = launch_verdict(state, NOW, store_keys=keys)
    assert verdict.ok is ok and reason in verdict.reason, verdict


# -- the published rank-0 address ---------------------------------------------------------------
def test_master_addresses_are_read_per_round() -> None:
    keys = {"0/MASTER_ADDR": b"host0", "0/MASTER_PORT": b"29500", "1/MASTER_ADDR": "host1", "1/MASTER_PORT": "bad",
            "2/other": b"x"}
    assert master_addresses(keys) == [(0, "host0", 29500)]


def test_a_published_address_of_a_dead_node_is_a_finding() -> None:
    """``DynamicRendezvousHandler.next_rendezvous`` keeps the first round's bootstrap store address when the agent
    store is shared: survivors connect to a dead rank 0."""
    dead = NodeDesc("10.0.0.9", 7, 0)
    state = RendezvousState(round=3, complete=True, participants={A: 0, dead: 1},
                            last_heartbeats={A: FRESH, dead: STALE})
    keys = {"0/MASTER_ADDR": b"10.0.0.9", "0/MASTER_PORT": b"29500"}
    (finding,) = master_address_findings(state, NOW, keys, {("10.0.0.9", 29500): "refused"})
    assert finding.code == "master-addr-dead" and finding.nodes == (str(dead),)
    assert finding.torch_next == "agents-fail" and "10.0.0.9:29500" in finding.message and "refused" in finding.message
    assert master_address_findings(state, NOW, keys, {("10.0.0.9", 29500): "listening"}) == []
    # Keys of the current round: every round publishes its own (no shared agent store), torch recovers.
    assert master_address_findings(state, NOW, {"3/MASTER_ADDR": b"10.0.0.9", "3/MASTER_PORT": b"29500"},
                                   {("10.0.0.9", 29500): "refused"}) == []
    # Nobody alive: no agent uses the address, a new job publishes its own.
    gone = RendezvousState(round=3, complete=True, participants={dead: 1}, last_heartbeats={dead: STALE})
    assert master_address_findings(gone, NOW, keys, {("10.0.0.9", 29500): "refused"}) == []
    # A live node at that address and nothing probed: no finding; probed and refused: a finding.
    state.last_heartbeats[dead] = FRESH
    assert master_address_findings(state, NOW, keys, {}) == []
    assert master_address_findings(state, NOW, keys, {("10.0.0.9", 29500): "refused"})


def test_the_field_case_a_survivor_keeps_the_dead_rank0_address_of_round_0() -> None:
    """Seen live (shared agent store, kill -9 of rank 0's agent): round 1's new rank 0 created a store and
    published its own address (``next_rendezvous``: a new rank 0 without a store server), the other survivor kept
    round 0's, and round 2 published nothing; the dead node has already been dropped (``_sanitize``)."""
    a, b = NodeDesc("127.0.0.1", 101, 0), NodeDesc("127.0.0.1", 102, 0)
    state = RendezvousState(round=2, complete=True, participants={a: 0, b: 1}, last_heartbeats={a: FRESH, b: FRESH})
    keys = {"0/MASTER_ADDR": b"127.0.0.1", "0/MASTER_PORT": b"43873",
            "1/MASTER_ADDR": b"127.0.0.1", "1/MASTER_PORT": b"37729"}
    probes = {("127.0.0.1", 43873): "refused", ("127.0.0.1", 37729): "listening"}
    (finding,) = master_address_findings(state, NOW, keys, probes)
    assert "round 0" in finding.message and "43873" in finding.message and "no longer in the state" in finding.message
    assert finding.nodes == () and "restart every agent" in finding.repair
    # Round 2 forming: round 1 (the last complete one) published, round 0's sharing is still shown by nothing.
    forming = RendezvousState(round=2, participants={a: 0}, last_heartbeats={a: FRESH})
    assert master_address_findings(forming, NOW, keys, probes) == []


def test_keep_alive_namedtuple_is_what_the_model_reads() -> None:
    ka = KeepAlive(2, 3)
    state = RendezvousState(participants={A: 0}, last_heartbeats={A: NOW - 7 * SECOND})
    assert lifecycle(state, NOW, ka.interval, ka.max_attempt).phase == "stuck"
