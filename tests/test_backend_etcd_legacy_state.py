"""The legacy etcd rendezvous JSON: strict parsing and analysis (plain data, no server)."""

from __future__ import annotations

import json

import pytest

from rdzvctl.errors import StateCorruptError
from rdzvctl.state.legacy_etcd import (
    MAX_STATE_BYTES,
    KeyInfo,
    LegacyRun,
    LegacyState,
    analyse,
    check_json,
    diff_runs,
    encode_state,
    launch_of,
    list_row,
    parse_state,
    phase_of,
    ttl_for,
)

PREFIX = "/torchelastic/p2p/"
NOW = 1_800_000_000.0


def lease(run_id: str, version: str, rank: int) -> str:
    return f"{PREFIX}run_{run_id}/rdzv/v_{version}/rank_{rank}"


def run_of(doc, run_id="job42", *, ttl=None, counter="1", alive=(), run_ttl=3000, versions=("1",)) -> LegacyRun:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    run = LegacyRun(PREFIX, run_id, KeyInfo(f"{PREFIX}run_{run_id}", run_ttl),
                    KeyInfo("active_version", ttl, None, 7), raw,
                    None if counter is None else KeyInfo("version_counter", None, None, 3, counter), tuple(versions))
    for rank in alive:
        run.version_keys[f"rank_{rank}"] = KeyInfo(lease(run_id, "1", rank), 8)
    return run


def final(ranks=2, confirmed=None, waiting=0, run_id="job42"):
    confirmed = ranks if confirmed is None else confirmed
    return {"status": "final", "version": "1", "participants": list(range(ranks)),
            "keep_alives": [lease(run_id, "1", r) for r in range(confirmed)], "num_workers_waiting": waiting}


def codes(run: LegacyRun, **options) -> list:
    return [f.code for f in analyse(run, NOW, **options).findings]


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", [
    {"status": "setup"},
    {"status": "joinable", "version": "1", "participants": []},
    {"status": "frozen", "version": "12", "participants": [0, 1], "keep_alives": []},
    final(),
    {"status": "closed"},
    {**final(), "status": "closed"},
])
def test_what_torch_writes_parses_and_reencodes_byte_for_byte(doc):
    raw = json.dumps(doc).encode()
    state = parse_state(raw)
    assert state.status == doc["status"]
    assert encode_state(state) == raw


@pytest.mark.parametrize("raw, words", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"version": "1"}', "no status"),
    (b'{"status": "frozen!"}', "none of"),
    (b'{"status": "joinable", "version": "1"}', "participants"),
    (b'{"status": "final", "version": "1", "participants": [], "keep_alives": []}', "num_workers_waiting"),
    (b'{"status": "setup", "status": "closed"}', "twice"),
    (b'{"status": "joinable", "version": 1, "participants": []}', "decimal string"),
    (b'{"status": "joinable", "version": "1", "participants": [1]}', "participants[0]"),
    (b'{"status": "joinable", "version": "1", "participants": [0, 0]}', "participants[1]"),
    (b'{"status": "joinable", "version": "1", "participants": [true]}', "participants[0]"),
    (b'{"status": "frozen", "version": "1", "participants": [], "keep_alives": ["/a"]}', "keep-alive keys"),
    (b'{"status": "frozen", "version": "1", "participants": [0], "keep_alives": [3]}', "keep_alives[0]"),
    (b'{"status": "closed", "num_workers_waiting": -1}', "out of range"),
    (b'{"status": "closed", "num_workers_waiting": NaN}', "NaN"),
    (b'{"status": "closed", "num_workers_waiting": 1.5}', "integer"),
    (b'{"status": "closed", "num_workers_waiting": 1' + b"0" * 5000 + b"}", "18 digits"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"status": "closed"}\xff', "UTF-8"),
    (b" " * (MAX_STATE_BYTES + 1), "cap"),
])
def test_untrusted_json_is_refused_with_the_reason(raw, words):
    with pytest.raises(StateCorruptError) as info:
        parse_state(raw)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw", [
    json.dumps({"status": "joinable", "version": "1", "participants": ["A" * 500_000]}).encode(),
    json.dumps({"status": "S" * 500_000}).encode(),
    b'{"status": "closed", "' + b"k" * 500_000 + b'": 1, "' + b"k" * 500_000 + b'": 2}',
    json.dumps({"status": "joinable", "version": "1", "participants": [[["A" * 100] * 100] * 10]}).encode(),
])
def test_an_untrusted_value_quoted_in_the_reason_is_cut(raw):
    with pytest.raises(StateCorruptError) as info:
        parse_state(raw)
    assert len(str(info.value)) < 300


def test_unknown_fields_are_kept_and_reported():
    state = parse_state(b'{"status": "closed", "owner": "x"}')
    assert state.unknown_fields == ("owner",)
    assert "unknown-fields" in codes(run_of(b'{"status": "closed", "owner": "x"}', run_ttl=None))


def test_ttls_follow_torchs_transitions():
    assert ttl_for(LegacyState("setup")) == 5
    assert ttl_for(LegacyState("frozen", "1", (0,), ())) == 10
    assert ttl_for(LegacyState("joinable", "1", (0, 1))) is None
    assert ttl_for(LegacyState("joinable", "1", (0, 1)), min_nodes=2) == 10
    assert ttl_for(LegacyState("final", "1", (0,), ("k",), 0)) is None


# -- analysis ------------------------------------------------------------------------------------
def test_a_healthy_final_round_has_no_findings():
    report = analyse(run_of(final(), alive=(0, 1)), NOW)
    assert report.findings == []
    assert [n.lease for n in report.nodes] == ["alive", "alive"]


def test_final_with_an_expired_keep_alive_names_the_rank():
    report = analyse(run_of(final(), alive=(0,)), NOW)
    (finding,) = report.findings
    assert finding.code == "dead-participant" and finding.severity == "error" and finding.nodes == ("rank_1",)
    assert "reset --mode reopen" in finding.repair
    assert "deletes active_version" in report.next_step


def test_closed_warns_and_a_fresh_lease_renewal_makes_it_an_error():
    closed = {**final(), "status": "closed"}
    assert codes(run_of(closed, alive=(0, 1), run_ttl=3000)) == ["closed"]
    assert codes(run_of(closed, alive=(0, 1), run_ttl=7190)) == ["closed-run-in-use"]


def test_shared_run_id_is_flagged():
    assert "shared-run-id" in codes(run_of({"status": "closed"}, run_id="none"))


@pytest.mark.parametrize("status", ["setup", "frozen"])
def test_transitional_states_without_a_ttl_are_stuck(status):
    doc = {"status": status} if status == "setup" else {"status": status, "version": "1", "participants": [0],
                                                        "keep_alives": []}
    assert f"stuck-{status}" in codes(run_of(doc, ttl=None))
    assert f"stuck-{status}" not in codes(run_of(doc, ttl=4))


def test_joinable_past_the_last_call_timeout_needs_an_observed_age():
    doc = {"status": "joinable", "version": "1", "participants": [0, 1]}
    assert codes(run_of(doc, ttl=8), min_nodes=2) == []
    assert codes(run_of(doc, ttl=8), min_nodes=2, status_age=60, last_call_timeout=30) == ["stuck-joinable"]
    assert codes(run_of(doc, ttl=None), min_nodes=2) == ["stuck-joinable"]


def test_frozen_past_the_last_call_timeout():
    doc = {"status": "frozen", "version": "1", "participants": [0, 1], "keep_alives": [lease("job42", "1", 0)]}
    assert codes(run_of(doc, ttl=9, alive=(0,))) == []
    assert codes(run_of(doc, ttl=9, alive=(0,)), status_age=100) == ["stuck-frozen"]
    assert codes(run_of(doc, ttl=9, alive=())) == ["frozen-keep-alive-expired"]


def test_counter_and_key_consistency():
    assert "version-counter-missing" in codes(run_of(final(), alive=(0, 1), counter=None))
    assert "version-ahead-of-counter" in codes(run_of(final(), alive=(0, 1), counter="0"))
    assert "version-dir-missing" in codes(run_of(final(), alive=(0, 1), versions=()))
    foreign = {**final(), "keep_alives": ["/elsewhere/rank_0", lease("job42", "1", 1)]}
    assert "keep-alive-key-foreign" in codes(run_of(foreign, alive=(0, 1)))


def test_waiting_workers_are_reported():
    assert codes(run_of(final(waiting=2), alive=(0, 1))) == ["workers-waiting"]


def test_corrupt_json_is_a_finding_with_torchs_next_step():
    report = analyse(run_of(b"{oops"), NOW)
    assert report.error is not None and [f.code for f in report.findings] == ["state-corrupt"]
    assert "RendezvousTimeoutError" in report.next_step


def test_watch_events():
    joinable = analyse(run_of({"status": "joinable", "version": "1", "participants": [0]}), NOW)
    joined = analyse(run_of({"status": "joinable", "version": "1", "participants": [0, 1]}), NOW)
    done = analyse(run_of(final(), alive=(0, 1)), NOW)
    dead = analyse(run_of(final(), alive=(0,)), NOW)
    assert diff_runs(joinable, joined) == [("joined", "rank 1 joined version 1")]
    assert [k for k, _ in diff_runs(joined, done)] == ["status", "confirmed", "confirmed"]
    assert [k for k, _ in diff_runs(done, dead)] == ["keep-alive-expired"]
    assert [k for k, _ in diff_runs(None, done)] == ["created"]


# -- phases, torch_next and the launch gate ------------------------------------------------------
def test_phases_and_what_torch_does_next():
    def phase(run):
        return phase_of(run, analyse(run, NOW))

    assert phase(run_of(final(), alive=(0, 1))) == "complete"
    assert phase(run_of(final(), alive=(0,))) == "stuck"
    assert phase(run_of(final(waiting=1), alive=(0,))) == "recovering"
    assert phase(run_of({"status": "joinable", "version": "1", "participants": [0]})) == "forming"
    assert phase(run_of({**final(), "status": "closed"}, alive=(0, 1))) == "closing"
    assert phase(run_of({**final(), "status": "closed"})) == "finished"
    assert phase(run_of({"status": "setup"}, ttl=None)) == "stuck"


def test_a_finding_torch_fixes_itself_carries_no_repair():
    recovering = analyse(run_of(final(waiting=1), alive=(0,)), NOW)
    dead = next(f for f in recovering.findings if f.code == "dead-participant")
    assert dead.torch_next == "recovers" and dead.repair == "" and dead.severity == "warning"
    stuck = analyse(run_of(final(), alive=(0,)), NOW).findings[0]
    assert stuck.torch_next == "stays" and "reopen" in stuck.repair and stuck.outlook
    closed = analyse(run_of({"status": "closed"}), NOW).findings[0]
    assert closed.torch_next == "new-job-fails" and closed.repair


@pytest.mark.parametrize("doc, alive, ok, words", [
    (None, (), True, "creates version 2"),
    ({"status": "closed"}, (), False, "RendezvousClosedError"),
    (final(), (0, 1), False, "running job"),
    (final(), (0,), True, "destroys it"),
    ({"status": "joinable", "version": "1", "participants": [0]}, (), False, "would join it"),
    ({"status": "setup"}, (), False, "setup"),
])
def test_the_launch_gate(doc, alive, ok, words):
    run = run_of(doc or b"", alive=alive)
    if doc is None:
        run.raw, run.active = None, None
    verdict = launch_of(run, analyse(run, NOW))
    assert verdict.ok is ok and words in verdict.reason


def test_check_json_and_list_row_share_health_round_and_phase():
    run = run_of(final(ranks=2), alive=(0,))  # rank 1's keep-alive expired, nobody waits
    report = analyse(run, NOW)
    checked = check_json(run, report)
    assert checked["status"] == "error" and checked["round"] == 1 and checked["legacy_status"] == "final"
    assert checked["phase"] == "stuck" and checked["state_format"] == "legacy-etcd-json"
    row = list_row(run, report, "7")
    assert (row["health"], row["round"], row["phase"], row["token"]) == ("error", 1, "stuck", "7")
    assert row["complete"] is True and row["closed"] is False and row["participants"] == 2
    corrupt = run_of(b"{not json")
    assert check_json(corrupt, analyse(corrupt, NOW))["status"] == "corrupt"

