"""rdzvctl reset (clear, reopen, prune) and restore: planned, fenced, backed up, reversible."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pytest

from rdzvctl.backup import read_backup
from rdzvctl.state.model import NodeDesc
from tests.support.cli import (
    NOW,
    invoke,
    json_out,
    make_state,
)

DEAD = NodeDesc.parse("trainer-3.cluster.local_4103_0")


def racing(memory) -> list:
    return memory.flags(backend="memory-racing")


# -- prune --------------------------------------------------------------------------
def test_prune_removes_dead_nodes_after_a_backup(memory, cli_env):
    memory.put(make_state())
    before = memory.raw()
    result = invoke(["reset", *memory.flags(), "--mode", "prune", "--yes", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert f"1 dead node(s) to prune: {DEAD}" in result.stderr
    state = memory.state()
    assert DEAD not in state.nodes and len(state.participants) == 3
    out = json_out(result)
    assert out["written"] is True and out["token"] == str(memory.token())
    backup = read_backup(Path(out["backup"]))
    assert backup.state == before and backup.command == "reset --mode prune"


def test_prune_of_every_participant_starts_the_next_round(memory):
    memory.put(make_state(alive=0, dead=2, waiting=0))
    assert invoke(["reset", *memory.flags(), "--mode", "prune", "--yes"]).exit_code == 0
    state = memory.state()
    assert state.participants == {} and (state.round, state.complete) == (3, False)


def test_prune_below_min_nodes_clears_the_deadline(memory):
    state = make_state(alive=1, dead=1, waiting=0, complete=False)
    state.deadline = NOW + _dt.timedelta(seconds=20)
    memory.put(state)
    assert invoke(["reset", *memory.flags(conf="min_nodes=2"), "--mode", "prune", "--yes"]).exit_code == 0
    assert memory.state().deadline is None


def test_prune_honours_keep_alive_settings(memory):
    token = memory.put(make_state())
    result = invoke(["reset", *memory.flags(conf="keep_alive_interval=60"), "--mode", "prune", "--yes"])
    assert result.exit_code == 0
    assert "has no dead nodes: nothing to prune" in result.stderr
    assert memory.token() == token


def test_prune_dry_run_writes_nothing(memory, cli_env):
    token = memory.put(make_state())
    result = invoke(["reset", *memory.flags(), "--mode", "prune", "--dry-run"])
    assert result.exit_code == 0
    assert f'-    "{DEAD}": 3' in result.stderr
    assert "Dry run: nothing was written." in result.stderr
    assert memory.token() == token and not cli_env.exists()


# -- reopen ------------------------------------------------------------------------------
def test_reopen(memory):
    memory.put(make_state(closed=True))
    assert invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"]).exit_code == 0
    assert memory.state().closed is False
    assert memory.state() == make_state()


def test_reopen_of_an_open_run_does_nothing(memory):
    token = memory.put(make_state())
    result = invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"])
    assert result.exit_code == 0 and "is not closed: nothing to do" in result.stderr
    assert memory.token() == token


def test_reopen_of_a_corrupt_state_exits_6(memory):
    memory.put(b"\x80\x04garbage")
    result = invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"])
    assert result.exit_code == 6
    assert memory.raw() == b"\x80\x04garbage"


# -- clear and restore -------------------------------------------------------------------
def test_clear_then_restore_gives_back_identical_bytes(memory, cli_env):
    memory.put(make_state(closed=True))
    before = memory.raw()
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "The state was removed." in result.stderr
    assert memory.raw() is None
    (path,) = cli_env.glob("*.json")
    assert str(path) in result.stderr
    result = invoke(["restore", str(path), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.raw() == before


def test_restore_over_a_newer_state_is_fenced_and_backed_up(memory, cli_env):
    memory.put(make_state())
    before = memory.raw()
    assert invoke(["reset", *memory.flags(), "--mode", "prune", "--yes"]).exit_code == 0
    (path,) = cli_env.glob("*.json")
    memory.put(make_state(round=8))  # the job moved on
    result = invoke(["restore", str(path), "--yes"])
    assert result.exit_code == 0
    assert memory.raw() == before
    assert len(list(cli_env.glob("*.json"))) == 2


def test_clear_a_corrupt_pickle(memory, cli_env):
    memory.put(b"\x80\x04garbage")
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.raw() is None
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state == b"\x80\x04garbage"


def test_clear_a_corrupt_stored_value(memory, cli_env):
    """get_state raises for the value; the token comes from list_runs so clear still works, fenced."""
    memory.corrupt()
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    # (get_state of a corrupt value raises, so look at the value as stored.)
    assert memory.backend().peek() is None
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state == b"\x00corrupt"


def test_clear_of_a_corrupt_value_without_a_token_explains(memory):
    memory.corrupt()
    result = invoke(["reset", *memory.flags(backend="memory-unlisted"), "--mode", "clear", "--yes"])
    assert result.exit_code == 6
    (line,) = result.stderr.strip().splitlines()
    assert "gives no token for it" in line


def test_restore_defaults_to_the_backups_address_and_flags_override(memory, cli_env):
    memory.put(make_state())
    assert invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"]).exit_code == 0
    (path,) = cli_env.glob("*.json")
    result = invoke(["restore", str(path), "--rdzv-id", "elsewhere", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.state("elsewhere") == make_state() and memory.raw() is None


# -- conflicts and errors ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["clear", "reopen", "prune"])
def test_concurrent_writer_wins_and_nothing_is_written(memory, mode):
    memory.put(make_state(closed=True))
    result = invoke(["reset", *racing(memory), "--mode", mode, "--yes"])
    assert result.exit_code == 3, result.stderr
    state = memory.state()
    assert state.round == 3 and state.closed is True and DEAD in state.participants
    assert "Changed meanwhile:" in result.stderr and "round 2 -> 3" in result.stderr


def test_retry_reapplies_on_the_fresh_state(memory):
    memory.put(make_state())
    result = invoke(["reset", *racing(memory), "--mode", "prune", "--retry", "2", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "Conflict: retrying on the fresh state (1/2)." in result.stderr
    state = memory.state()
    assert state.round == 3 and DEAD not in state.nodes  # the intruder's change kept, ours applied on top


@pytest.mark.parametrize("mode", ["clear", "reopen", "prune"])
def test_reset_of_an_absent_run_exits_5(memory, mode):
    result = invoke(["reset", *memory.flags(run_id="absent"), "--mode", mode, "--yes"])
    assert result.exit_code == 5
    assert result.stderr.startswith("rdzvctl: NoStateError: ")


@pytest.mark.parametrize("args", [[], ["--mode", "wipe"], ["--mode", "clear", "--retry", "-1"]])
def test_reset_usage_errors_exit_2(memory, args):
    memory.put(make_state())
    assert invoke(["reset", *memory.flags(), *args, "--yes"]).exit_code == 2


def test_unwritable_backup_dir_exits_2_before_writing(memory, tmp_path):
    token = memory.put(make_state())
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes", "--backup-dir", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "backup" in result.stderr
    assert memory.token() == token


def test_restore_of_a_backup_of_no_state_removes_the_state(memory, tmp_path, cli_env):
    memory.put(make_state(), run_id="source")
    doc = tmp_path / "s.json"
    doc.write_text(invoke(["get", *memory.flags(run_id="source"), "-o", "json"]).stdout)
    assert invoke(["set", *memory.flags(), "--create", "-f", str(doc), "--yes"]).exit_code == 0
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state is None
    result = invoke(["restore", str(path), "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.raw() is None
