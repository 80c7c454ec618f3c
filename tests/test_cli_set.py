"""rdzvctl set: JSON writes and field edits, always fenced, backed up, restorable."""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path

import pytest

from rdzvctl.backup import FORMAT, Backup, read_backup, write_backup
from rdzvctl.cli.app import App
from rdzvctl.state.model import NodeDesc
from tests.support.cli import (
    NOW,
    invoke,
    json_out,
    make_state,
    node,
)

DEAD = "trainer-3.cluster.local_4103_0"


def backups(directory: Path) -> list:
    return sorted(directory.glob("*.json")) if directory.exists() else []


def get_json(memory, run_id: str = "job42") -> dict:
    result = invoke(["get", *memory.flags(run_id=run_id), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    return json_out(result)


# -- JSON documents ---------------------------------------------------------------------
def test_set_accepts_exactly_what_get_prints(memory, tmp_path):
    memory.put(make_state())
    printed = invoke(["get", *memory.flags(), "-o", "json"]).stdout
    doc_file = tmp_path / "state.json"
    doc_file.write_text(printed)
    result = invoke(["set", *memory.flags(run_id="copy"), "--create", "-f", str(doc_file), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.state("copy") == memory.state("job42")
    assert memory.raw("copy") == memory.raw("job42")


def test_set_from_stdin(memory):
    memory.put(make_state())
    printed = invoke(["get", *memory.flags(), "-o", "json"]).stdout
    doc = json.loads(printed)
    doc["state"]["closed"] = True
    result = invoke(["set", *memory.flags(), "-f", "-", "--token", doc["token"], "--yes"], input=json.dumps(doc))
    assert result.exit_code == 0, result.stderr
    assert memory.state().closed is True


def test_unchanged_document_writes_nothing(memory, tmp_path, cli_env):
    token = memory.put(make_state())
    doc_file = tmp_path / "state.json"
    doc_file.write_text(invoke(["get", *memory.flags(), "-o", "json"]).stdout)
    result = invoke(["set", *memory.flags(), "-f", str(doc_file), "--yes"])
    assert result.exit_code == 0
    assert "no change" in result.stderr
    assert memory.token() == token
    assert backups(cli_env) == []


def test_bare_state_is_accepted(memory, tmp_path):
    memory.put(make_state())
    state = get_json(memory)["state"]
    state["round"] = 5
    doc_file = tmp_path / "bare.json"
    doc_file.write_text(json.dumps(state))
    assert invoke(["set", *memory.flags(), "-f", str(doc_file), "--yes"]).exit_code == 0
    assert memory.state().round == 5


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["state"].update(round="three"), "state.round"),
        (lambda d: d["state"].update(closed="yes"), "state.closed"),
        (lambda d: d["state"]["participants"].update({"not-a-node": 4}), "state.participants['not-a-node']"),
        (lambda d: d["state"]["last_heartbeats"].update({DEAD: "yesterday"}), f"state.last_heartbeats['{DEAD}']"),
        (lambda d: d["state"].pop("wait_list"), "state.wait_list"),
        (lambda d: d["state"].update(colour="blue"), "state.colour"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_validation_error_names_the_field_and_writes_nothing(memory, tmp_path, cli_env, edit, field):
    token = memory.put(make_state())
    doc = get_json(memory)
    edit(doc)
    doc_file = tmp_path / "bad.json"
    doc_file.write_text(json.dumps(doc))
    result = invoke(["set", *memory.flags(), "-f", str(doc_file), "--yes"])
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rdzvctl: StateValidationError: " + field + ":"), line
    assert memory.token() == token
    assert backups(cli_env) == []


def test_invalid_json_file_exits_2(memory, tmp_path):
    memory.put(make_state())
    doc_file = tmp_path / "bad.json"
    doc_file.write_text("{not json")
    result = invoke(["set", *memory.flags(), "-f", str(doc_file)])
    assert result.exit_code == 2
    assert "not valid JSON" in result.stderr


@pytest.mark.parametrize("args", [["-f", "x.json", "--closed"], [], ["--create", "--token", "1", "--closed"],
                                  ["--round", "-1"], ["--remove-node", "nope"], ["--add-waiting", "host_x_0"]])
def test_bad_combinations_exit_2(memory, args):
    token = memory.put(make_state())
    result = invoke(["set", *memory.flags(), *args, "--yes"])
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert memory.token() == token


def test_remove_node_that_is_not_there_names_the_option(memory):
    memory.put(make_state())
    result = invoke(["set", *memory.flags(), "--remove-node", "ghost_1_0", "--yes"])
    assert result.exit_code == 2
    assert "--remove-node: ghost_1_0 is not in the state" in result.stderr


# -- fencing -----------------------------------------------------------------------------
def test_stale_token_exits_3_and_writes_nothing(memory, tmp_path, cli_env):
    memory.put(make_state())
    doc = get_json(memory)
    stale = doc["token"]
    newer = memory.put(make_state(round=3))
    doc["state"]["closed"] = True
    doc_file = tmp_path / "s.json"
    doc_file.write_text(json.dumps(doc))
    result = invoke(["set", *memory.flags(), "-f", str(doc_file), "--token", stale, "--yes"])
    assert result.exit_code == 3
    assert f"token {stale} is not current" in result.stderr and f"current token is {newer}" in result.stderr
    assert memory.token() == newer and memory.state().closed is False
    assert backups(cli_env) == []


def test_current_token_writes(memory, tmp_path):
    memory.put(make_state())
    doc = get_json(memory)
    doc["state"]["closed"] = True
    doc_file = tmp_path / "s.json"
    doc_file.write_text(json.dumps(doc))
    result = invoke(["set", *memory.flags(), "-f", str(doc_file), "--token", doc["token"], "--yes", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    out = json_out(result)
    assert out["written"] is True and out["token"] == str(memory.token())
    assert Path(out["backup"]).exists()
    assert memory.state().closed is True


def test_create_when_a_state_exists_exits_3(memory, tmp_path):
    token = memory.put(make_state())
    doc_file = tmp_path / "s.json"
    doc_file.write_text(json.dumps(get_json(memory)))
    result = invoke(["set", *memory.flags(), "--create", "-f", str(doc_file), "--yes"])
    assert result.exit_code == 3
    assert "already has a state" in result.stderr
    assert memory.token() == token


def test_token_on_absent_run_exits_3(memory, tmp_path):
    memory.put(make_state())
    doc_file = tmp_path / "s.json"
    doc_file.write_text(json.dumps(get_json(memory)))
    result = invoke(["set", *memory.flags(run_id="absent"), "-f", str(doc_file), "--token", "1", "--yes"])
    assert result.exit_code == 3
    assert "no state" in result.stderr
    assert memory.raw("absent") is None


def test_concurrent_write_between_read_and_write_exits_3(memory, cli_env):
    memory.put(make_state())
    flags = memory.flags(backend="memory-racing")
    result = invoke(["set", *flags, "--closed", "--yes"])
    assert result.exit_code == 3, result.stderr
    # Nothing of ours was written: the intruder's state is intact.
    state = memory.state()
    assert state.closed is False and state.round == 3
    assert NodeDesc("intruder.cluster.local", 999, 0) in state.wait_list
    assert "Changed meanwhile:" in result.stderr
    assert "round 2 -> 3" in result.stderr
    assert "intruder.cluster.local_999_0 joined wait list" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rdzvctl: TokenConflictError: ")
    # The backup was written before the attempt and still holds what we read.
    (backup,) = backups(cli_env)
    assert read_backup(backup).state != memory.raw()


def test_field_edit_on_absent_run_exits_5(memory):
    result = invoke(["set", *memory.flags(run_id="absent"), "--closed", "--yes"])
    assert result.exit_code == 5
    assert result.stderr.startswith("rdzvctl: NoStateError:")


def test_json_write_over_a_corrupt_state(memory, tmp_path):
    memory.put(make_state())
    doc_file = tmp_path / "s.json"
    doc_file.write_text(json.dumps(get_json(memory)))
    memory.put(b"\x80\x04garbage")
    result = invoke(["set", *memory.flags(), "-f", str(doc_file), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.state() == make_state()


def test_field_edit_on_a_corrupt_state_exits_6(memory):
    memory.put(b"\x80\x04garbage")
    result = invoke(["set", *memory.flags(), "--closed", "--yes"])
    assert result.exit_code == 6
    assert memory.raw() == b"\x80\x04garbage"


# -- field edits ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "check"),
    [
        (["--closed"], lambda s: s.closed is True),
        (["--round", "9"], lambda s: s.round == 9),
        (["--no-complete"], lambda s: s.complete is False),
        (["--round", "4", "--complete", "--closed"], lambda s: (s.round, s.complete, s.closed) == (4, True, True)),
    ],
)
def test_field_edits(memory, args, check):
    memory.put(make_state(complete=True))
    result = invoke(["set", *memory.flags(), *args, "--yes"])
    assert result.exit_code == 0, result.stderr
    assert check(memory.state())


def test_no_closed_reopens(memory):
    memory.put(make_state(closed=True))
    assert invoke(["set", *memory.flags(), "--no-closed", "--yes"]).exit_code == 0
    assert memory.state().closed is False


def test_complete_marks_the_round_complete(memory):
    memory.put(make_state(complete=False))
    assert invoke(["set", *memory.flags(), "--complete", "--yes"]).exit_code == 0
    assert memory.state().complete is True


def test_clear_deadline(memory):
    state = make_state(complete=False)
    state.deadline = NOW + _dt.timedelta(seconds=30)
    memory.put(state)
    assert invoke(["set", *memory.flags(), "--clear-deadline", "--yes"]).exit_code == 0
    assert memory.state().deadline is None


def test_remove_node_uses_torchs_bookkeeping(memory):
    memory.put(make_state())
    result = invoke(["set", *memory.flags(), "--remove-node", DEAD, "--yes"])
    assert result.exit_code == 0, result.stderr
    state = memory.state()
    gone = NodeDesc.parse(DEAD)
    assert gone not in state.participants and gone not in state.last_heartbeats
    assert (state.round, state.complete) == (2, True)  # others remain: the round stands


def test_removing_the_last_participant_of_a_complete_round_starts_the_next(memory):
    memory.put(make_state(alive=1, dead=0, waiting=0))
    only = str(node(0))
    assert invoke(["set", *memory.flags(), "--remove-node", only, "--yes"]).exit_code == 0
    state = memory.state()
    assert state.participants == {} and (state.round, state.complete) == (3, False)


def test_removing_below_min_nodes_clears_the_deadline(memory):
    state = make_state(alive=2, dead=0, waiting=0, complete=False)
    state.deadline = NOW + _dt.timedelta(seconds=30)
    memory.put(state)
    args = ["set", *memory.flags(conf="min_nodes=2"), "--remove-node", str(node(1)), "--yes"]
    assert invoke(args).exit_code == 0
    assert memory.state().deadline is None
    # Without min_nodes torch keeps the deadline.
    memory.put(state, run_id="other")
    assert invoke(["set", *memory.flags(run_id="other"), "--remove-node", str(node(1)), "--yes"]).exit_code == 0
    assert memory.state("other").deadline == state.deadline


def test_add_waiting_forces_a_new_round(memory):
    memory.put(make_state())
    joiner = "late-joiner.cluster.local_77_0"
    result = invoke(["set", *memory.flags(), "--add-waiting", joiner, "--add-waiting", str(node(0)), "--yes"])
    assert result.exit_code == 0, result.stderr
    state = memory.state()
    assert NodeDesc.parse(joiner) in state.wait_list and state.last_heartbeats[NodeDesc.parse(joiner)] == NOW
    # A participant moved to the wait list leaves the participants.
    assert node(0) in state.wait_list and node(0) not in state.participants


def test_dry_run_shows_the_diff_and_writes_nothing(memory, cli_env):
    token = memory.put(make_state())
    result = invoke(["set", *memory.flags(), "--closed", "--dry-run"])
    assert result.exit_code == 0
    assert '-  "closed": false,' in result.stderr and '+  "closed": true,' in result.stderr
    assert "Dry run: nothing was written." in result.stderr
    assert memory.token() == token
    assert backups(cli_env) == []


def test_confirmation_on_a_terminal(memory, monkeypatch):
    token = memory.put(make_state())
    monkeypatch.setattr(App, "interactive", property(lambda self: True))
    result = invoke(["set", *memory.flags(), "--closed"], input="n\n")
    assert result.exit_code == 0  # declined: not a problem found, nothing written
    assert "Write this to run 'job42'" in result.stderr and "Declined: nothing was written." in result.stderr
    assert memory.token() == token
    result = invoke(["set", *memory.flags(), "--closed"], input="y\n")
    assert result.exit_code == 0
    assert memory.state().closed is True
    result = invoke(["set", *memory.flags(), "--no-closed", "--yes"])
    assert result.exit_code == 0 and "Write this" not in result.stderr


# -- backups and restore -----------------------------------------------------------------------
def test_backup_holds_the_exact_prior_bytes(memory, tmp_path):
    token = memory.put(make_state())
    before = memory.raw()
    backup_dir = tmp_path / "elsewhere"
    result = invoke(["set", *memory.flags(), "--closed", "--yes", "--backup-dir", str(backup_dir)])
    assert result.exit_code == 0, result.stderr
    (path,) = backups(backup_dir)
    assert f"Backup written: {path}" in result.stderr
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT == "rdzvctl.backup/v1"
    assert (doc["backend"], doc["endpoint"], doc["run_id"], doc["token"]) == ("memory", memory.endpoint, "job42",
                                                                                str(token))
    assert base64.b64decode(doc["state_base64"]) == before
    assert doc["command"] == "set" and doc["time"] == "2026-11-24T22:00:00.000000+00:00"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_restore_brings_back_identical_bytes(memory, cli_env):
    memory.put(make_state())
    before = memory.raw()
    assert invoke(["set", *memory.flags(), "--remove-node", DEAD, "--yes"]).exit_code == 0
    assert memory.raw() != before
    (path,) = backups(cli_env)
    result = invoke(["restore", str(path), "--dry-run"])
    assert result.exit_code == 0 and "Dry run" in result.stderr and memory.raw() != before
    result = invoke(["restore", str(path), "--yes", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert json_out(result)["written"] is True
    assert memory.raw() == before
    # What restore replaced was backed up too.
    assert len(backups(cli_env)) == 2


def test_restore_rejects_a_file_that_is_not_a_backup(memory, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"format": "something/v9"}')
    result = invoke(["restore", str(bogus), "--yes"])
    assert result.exit_code == 2
    assert "not an rdzvctl backup" in result.stderr


def test_backups_never_overwrite_each_other(memory, cli_env):
    memory.put(make_state())
    for args in (["--closed"], ["--round", "5"], ["--round", "6"]):
        assert invoke(["set", *memory.flags(), *args, "--yes"]).exit_code == 0
    paths = backups(cli_env)
    assert len(paths) == 3
    rounds = sorted(read_backup(p).state for p in paths)
    assert len(set(rounds)) == 3


def test_two_backups_in_the_same_instant_get_two_files(tmp_path):
    backup = Backup("memory", "e", "job42", {}, "1", "t", "set", b"state")
    first = write_backup(backup, tmp_path)
    second = write_backup(backup, tmp_path)
    assert first != second
    assert read_backup(first).state == read_backup(second).state == b"state"


def test_backup_is_fsynced_file_and_directory_before_the_write(memory, cli_env, monkeypatch):
    import os

    import rdzvctl.backup

    memory.put(make_state())
    synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), memory.state().closed))
        real_fsync(fd)

    monkeypatch.setattr(rdzvctl.backup.os, "fsync", fsync)
    assert invoke(["set", *memory.flags(), "--closed", "--yes"]).exit_code == 0
    (path,) = backups(cli_env)
    assert synced == [(str(path), False), (str(cli_env), False)]  # both before the state changed


BROKEN = {
    "rank outside the world": (lambda s: s["participants"].update({DEAD: 5}), "rank outside 0..3 (world size 4)"),
    "shared rank": (lambda s: s["participants"].update({DEAD: 0}), "1 participant(s) share a rank"),
    "participant waiting": (lambda s: s["wait_list"].append(DEAD), "1 node(s) both participating and waiting"),
    "no heartbeat": (lambda s: s["last_heartbeats"].pop(DEAD), "1 participant(s) without a heartbeat"),
    "complete without participants": (lambda s: s.update(participants={}),
                                       "the round is complete but has no participants"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_state_breaking_torchs_invariants_is_refused_unless_force(memory, tmp_path, cli_env, case):
    memory.put(make_state())
    doc = get_json(memory)
    edit, expected = BROKEN[case]
    edit(doc["state"])
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    before = memory.raw()
    result = invoke(["set", *memory.flags(), "-f", str(path), "--yes"])
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("rdzvctl: StateValidationError: ") and "torch's invariants" in line and expected in line
    assert "--force" in line and memory.raw() == before and not backups(cli_env)
    forced = invoke(["set", *memory.flags(), "-f", str(path), "--yes", "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert memory.raw() != before


def test_force_without_a_file_is_a_usage_error(memory):
    memory.put(make_state())
    result = invoke(["set", *memory.flags(), "--round", "3", "--force", "--yes"])
    assert result.exit_code == 2 and "--force only applies to -f" in result.stderr


def test_every_violation_is_named_in_one_line(memory, tmp_path):
    memory.put(make_state())
    doc = get_json(memory)
    doc["state"]["participants"] = {str(node(0)): 5}
    doc["state"]["wait_list"].append(str(node(0)))
    doc["state"]["last_heartbeats"].pop(str(node(0)))
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    result = invoke(["set", *memory.flags(), "-f", str(path), "--yes"])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    for part in ("rank outside 0..0 (world size 1)", "both participating and waiting",
                 "participant(s) without a heartbeat"):
        assert part in line, line
