"""rdzvctl corrupt-detect (one run, --all) and list: findings, severities, exit codes."""

from __future__ import annotations

import datetime as _dt
import pickle
import re

import pytest

from tests.support.cli import (
    NOW,
    invoke,
    json_out,
    make_state,
    node,
)


@pytest.fixture(autouse=True)
def _quick_confirmation(monkeypatch):
    """These states never change: confirming a stuck verdict needs no real wait here."""
    import rdzvctl.inspection

    monkeypatch.setattr(rdzvctl.inspection, "CONFIRM_SECONDS", 0.3)


def codes(result) -> list:
    return [p["code"] for r in json_out(result)["runs"] for p in r["problems"]]


class _Explode:
    def __reduce__(self):
        import os

        return (os.system, ("false",))


# -- one run ------------------------------------------------------------------------
def test_clean_run_exits_0(memory):
    memory.put(make_state(dead=0))
    result = invoke(["corrupt-detect", *memory.flags()])
    assert result.exit_code == 0, result.stderr
    assert "status  ok" in result.stdout


def test_dead_participants_in_a_complete_round_exit_1_with_the_repair(memory):
    memory.put(make_state(waiting=0))  # nobody waits: torch's survivors stay in the round
    result = invoke(["corrupt-detect", *memory.flags()])
    assert result.exit_code == 1
    assert "dead-participants" in result.stdout and "trainer-3.cluster.local_4103_0" in result.stdout
    assert "rdzvctl reset --mode prune" in result.stdout


@pytest.mark.parametrize(
    ("state", "code", "severity"),
    [
        (make_state(complete=False), "dead-participants", "info"),  # the next live sync drops it
        (make_state(alive=0, dead=2, waiting=0), "dead-participants", "warning"),  # nobody alive: a new job's sync drops it
        (make_state(dead=0, closed=True), "closed", "error"),  # closing: a new job fails
        (make_state(alive=0, dead=0, complete=False, closed=True), "closed", "error"),  # finished
    ],
)
@pytest.mark.parametrize("fail_on", ["info", "warning", "error"])
def test_fail_on_levels(memory, state, code, severity, fail_on):
    memory.put(state)
    result = invoke(["corrupt-detect", *memory.flags(), "--fail-on", fail_on, "-o", "json"])
    levels = ["info", "warning", "error"]
    expected = 1 if levels.index(severity) >= levels.index(fail_on) else 0
    assert result.exit_code == expected, result.stdout
    doc = json_out(result)
    assert code in codes(result) and doc["exit_code"] == expected and doc["fail_on"] == fail_on


def test_invariants_are_checked(memory):
    state = make_state(dead=0, waiting=0)
    state.participants[node(1)] = 0  # a rank twice
    state.wait_list.add(node(0))  # participating and waiting
    state.participants[node(50)] = 3  # no heartbeat
    state.last_heartbeats[node(60)] = NOW + _dt.timedelta(minutes=5)  # clock skew, in no list
    state.deadline = NOW  # a deadline on a complete round
    memory.put(state)
    result = invoke(["corrupt-detect", *memory.flags(conf="max_nodes=2"), "-o", "json"])
    assert result.exit_code == 1
    assert set(codes(result)) >= {"ranks-invalid", "participant-and-waiting", "missing-heartbeat",
                                  "heartbeat-in-future", "deadline-on-complete", "over-max-nodes",
                                  "orphan-heartbeats"}
    for problem in json_out(result)["runs"][0]["problems"]:
        assert problem["message"] and problem["severity"] in ("info", "warning", "error")


def test_shared_run_id_is_flagged(memory):
    memory.put(make_state(dead=0), run_id="none")
    result = invoke(["corrupt-detect", *memory.flags(run_id="none"), "-o", "json"])
    assert "shared-run-id" in codes(result)


def test_absent_run_exits_5(memory):
    result = invoke(["corrupt-detect", *memory.flags(run_id="absent")])
    assert result.exit_code == 5
    assert result.stderr.startswith("rdzvctl: NoStateError: ")


def test_corrupt_pickle_exits_6(memory):
    memory.put(b"\x80\x04garbage")
    result = invoke(["corrupt-detect", *memory.flags(), "-o", "json"])
    assert result.exit_code == 6
    (run,) = json_out(result)["runs"]
    assert run["status"] == "corrupt" and run["problems"][0]["code"] == "state-corrupt"
    assert "reset --mode clear" in run["problems"][0]["repair"]


def test_corrupt_stored_value_exits_6(memory):
    memory.corrupt()
    result = invoke(["corrupt-detect", *memory.flags()])
    assert result.exit_code == 6
    assert "status  corrupt" in result.stdout


def test_unsafe_pickle_exits_6(memory):
    memory.put(pickle.dumps(_Explode()))
    result = invoke(["corrupt-detect", *memory.flags(), "-o", "json"])
    assert result.exit_code == 6
    (run,) = json_out(result)["runs"]
    assert run["status"] == "unsafe" and run["problems"][0]["code"] == "state-unsafe"


# -- every run ---------------------------------------------------------------------------
@pytest.fixture
def several_runs(memory):
    memory.put(make_state(dead=0), run_id="healthy")
    memory.put(make_state(waiting=0), run_id="stuck")
    memory.put(make_state(dead=0, closed=True), run_id="closed")
    return memory


def test_all_runs_json_summary(several_runs):
    memory = several_runs
    result = invoke(["corrupt-detect", *memory.flags(run_id=None), "--all", "-o", "json"])
    assert result.exit_code == 1
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.corrupt-detect/v1"
    assert [(r["run_id"], r["status"], r["phase"]) for r in doc["runs"]] == [
        ("closed", "error", "closing"), ("healthy", "ok", "recovering"), ("stuck", "error", "stuck")]  # healthy: a node waits
    assert doc["summary"] == {"runs": 3, "ok": 1, "error": 2}
    assert doc["exit_code"] == 1


def test_corrupt_takes_precedence_over_findings(several_runs):
    memory = several_runs
    memory.put(b"\x80\x04garbage", run_id="broken")
    memory.put(pickle.dumps(_Explode()), run_id="evil")
    result = invoke(["corrupt-detect", *memory.flags(run_id=None), "--all", "-o", "json"])
    assert result.exit_code == 6
    summary = json_out(result)["summary"]
    assert summary == {"runs": 5, "ok": 1, "error": 2, "corrupt": 1, "unsafe": 1}


def test_all_runs_text(several_runs):
    result = invoke(["corrupt-detect", *several_runs.flags(run_id=None), "--all"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[:2] == ["runs           3", "with findings  2"]
    assert any(line.split()[:4] == ["stuck", "error", "stuck", "1"] for line in lines)


def test_all_runs_on_an_empty_backend(memory):
    result = invoke(["corrupt-detect", *memory.flags(run_id=None), "--all", "-o", "json"])
    assert result.exit_code == 0
    assert json_out(result)["runs"] == []


def test_all_runs_on_an_empty_filestore(memory, tmp_path):
    store = tmp_path / "store"
    store.write_bytes(b"")
    result = invoke(["corrupt-detect", "--rdzv-backend", "c10d", "--rdzv-endpoint", str(store), "--rdzv-conf",
                     "store_type=file", "--all", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert json_out(result)["summary"] == {"runs": 0}


@pytest.mark.parametrize("command", ["corrupt-detect --all", "list"])
def test_listing_on_a_backend_that_cannot_list_exits_2(memory, command):
    result = invoke([*command.split(), *memory.flags(run_id=None, backend="memory-unlisted")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "rdzvctl: UnsupportedOperationError: the memory-unlisted backend cannot list runs"


# -- list ---------------------------------------------------------------------------------
def test_list_json(several_runs):
    memory = several_runs
    memory.put(b"\x80\x04garbage", run_id="broken")
    result = invoke(["list", *memory.flags(run_id=None), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.list/v1" and doc["backend"] == "memory"
    rows = {r["run_id"]: r for r in doc["runs"]}
    assert set(rows) == {"broken", "closed", "healthy", "stuck"}
    assert rows["stuck"]["health"] == "error" and rows["stuck"]["participants"] == 4
    assert rows["stuck"]["waiting"] == 0 and rows["stuck"]["round"] == 2 and rows["stuck"]["complete"] is True
    assert rows["stuck"]["phase"] == "stuck" and rows["healthy"]["phase"] == "recovering"
    assert rows["closed"]["closed"] is True and rows["closed"]["phase"] == "closing"
    assert rows["broken"]["health"] == "corrupt" and rows["broken"]["round"] is None
    assert rows["healthy"]["token"] == str(memory.token("healthy"))


def test_list_text(several_runs):
    result = invoke(["list", *several_runs.flags(run_id=None)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "ID", "ROUND", "COMPLETE", "PARTICIPANTS", "WAITING", "CLOSED", "PHASE",
                                "HEALTH"]
    assert lines[1:] and lines[-1].split() == ["stuck", "2", "yes", "4", "0", "no", "stuck", "error"]


def test_list_of_an_unknown_backend_exits_2(memory):
    result = invoke(["list", "--rdzv-backend", "nope"])
    assert result.exit_code == 2
    assert "registered backends:" in result.stderr


def _options_of_every_command() -> set:
    import importlib

    import click

    from rdzvctl.cli.main import COMMANDS

    options = set()
    for module, _ in COMMANDS.values():
        for param in importlib.import_module(module).command.params:
            if isinstance(param, click.Option):
                options.update(param.opts + param.secondary_opts)
    return options


def test_every_repair_names_real_options(memory):
    state = make_state(closed=True)
    state.participants[node(1)] = 7
    state.wait_list.add(node(0))
    state.participants[node(50)] = 3
    state.last_heartbeats[node(60)] = NOW + _dt.timedelta(minutes=5)
    state.deadline = NOW
    memory.put(state, run_id="none")
    memory.put(make_state(alive=0, dead=0, complete=False, closed=True), run_id="closed")
    memory.put(make_state(waiting=0), run_id="stuck")
    memory.put(b"\x80\x04garbage", run_id="broken")
    result = invoke(["corrupt-detect", *memory.flags(run_id=None, conf="max_nodes=2"), "--all", "-o", "json"])
    repairs = {p["repair"] for r in json_out(result)["runs"] for p in r["problems"] if p["repair"]}
    assert len(repairs) >= 6
    known = _options_of_every_command()
    for repair in repairs:
        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", repair):
            assert option in known, f"{repair!r} advises {option}, which no command has"
