"""rdzvctl edit: the state in $EDITOR, written back fenced; no change, no write."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.cli import (
    invoke,
    make_state,
    run_rdzvctl,
)


def editor(tmp_path: Path, body: str) -> str:
    """A tiny editor script: ``body`` runs with the file as $1."""
    script = tmp_path / "editor.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_edit_writes_the_change(memory, tmp_path, cli_env):
    memory.put(make_state())
    ed = editor(tmp_path, "sed -i 's/\"closed\": false/\"closed\": true/' \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0, result.stderr
    assert memory.state().closed is True
    assert '+  "closed": true,' in result.stderr
    assert len(list(cli_env.glob("*.json"))) == 1


def test_the_file_shows_the_token_and_ignores_comments(memory, tmp_path):
    token = memory.put(make_state())
    seen = tmp_path / "seen.json"
    ed = editor(tmp_path, f"cp \"$1\" {seen}; echo '# a comment of mine' >> \"$1\"; "
                          "sed -i 's/\"round\": 2/\"round\": 4/' \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0, result.stderr
    assert f"token {token}" in seen.read_text().splitlines()[0]
    assert memory.state().round == 4


def test_editor_that_does_not_save_writes_nothing(memory, cli_env):
    token = memory.put(make_state())
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": "true"})
    assert result.exit_code == 0
    assert "nothing was written" in result.stderr
    assert memory.token() == token
    assert not cli_env.exists() or not list(cli_env.iterdir())


def test_saved_but_unchanged_writes_nothing(memory, tmp_path, cli_env):
    token = memory.put(make_state())
    ed = editor(tmp_path, "sleep 0.01; touch \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0
    assert "No changes: nothing was written." in result.stderr
    assert memory.token() == token


def kept_file(stderr: str) -> Path:
    match = re.search(r"your edit is kept in (\S+) ", stderr)
    assert match, stderr
    return Path(match.group(1))


def test_invalid_json_saved_again_unchanged_exits_2_and_keeps_the_edit(memory, tmp_path, cli_env):
    token = memory.put(make_state())
    ed = editor(tmp_path, "echo '{ broken' > \"$1\"")  # writes the same broken text every time it is opened
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rdzvctl: UsageError: the edited text is not valid JSON")
    assert "nothing was written" in line and f"--token {token}" in line
    kept = kept_file(line)
    assert kept.read_text() == "{ broken\n"
    kept.unlink()
    assert memory.token() == token
    assert not cli_env.exists() or not list(cli_env.iterdir())


def test_invalid_field_from_the_editor_names_it(memory, tmp_path):
    token = memory.put(make_state())
    ed = editor(tmp_path, "sed -i 's/\"round\": 2/\"round\": -2/' \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 2
    assert "StateValidationError: round:" in result.stderr
    assert '"round": -2' in kept_file(result.stderr).read_text()
    kept_file(result.stderr).unlink()
    assert memory.token() == token


def two_round_editor(tmp_path: Path, first: str, second: str) -> str:
    """An editor that runs ``first`` when opened the first time and ``second`` after (keeping a copy of
    what it was shown each time as shown-1, shown-2 and the original state as original)."""
    return editor(tmp_path, f"""
cd "{tmp_path}"
if [ ! -e original ]; then cp "$1" original; cp "$1" shown-1; {first}
else cp "$1" shown-2; {second}
fi""")


def test_an_invalid_edit_reopens_the_editor_with_the_error_then_writes_the_fix(memory, tmp_path, cli_env):
    memory.put(make_state())
    fix = "sed 's/\"closed\": false/\"closed\": true/' original > \"$1\""
    ed = two_round_editor(tmp_path, "echo '{ broken' > \"$1\"", fix)
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0, result.stderr
    assert memory.state().closed is True
    shown = (tmp_path / "shown-2").read_text()
    assert shown.startswith("# rdzvctl could not use this edit, so nothing was written:\n#   the edited text is not valid JSON")
    assert "# Edit the rendezvous state of run" in shown and shown.endswith("{ broken\n")
    assert len(list(cli_env.glob("*.json"))) == 1  # one backup: one write


def test_an_invalid_field_reopens_with_the_field_named(memory, tmp_path):
    memory.put(make_state())
    ed = two_round_editor(tmp_path, "sed -i 's/\"round\": 2/\"round\": -2/' \"$1\"",
                          "sed -i 's/\"round\": -2/\"round\": 5/' \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0, result.stderr
    assert "#   round:" in (tmp_path / "shown-2").read_text()
    assert memory.state().round == 5


def test_quitting_the_reopened_editor_without_saving_keeps_the_edit(memory, tmp_path):
    token = memory.put(make_state())
    ed = two_round_editor(tmp_path, "echo '[1, 2' > \"$1\"", "true")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 2
    assert kept_file(result.stderr).read_text() == "[1, 2\n"
    kept_file(result.stderr).unlink()
    assert memory.token() == token


def test_emptying_the_reopened_file_discards_the_edit(memory, tmp_path):
    token = memory.put(make_state())
    ed = two_round_editor(tmp_path, "echo '{ broken' > \"$1\"", ": > \"$1\"")
    result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 0
    assert "Edit cancelled (empty file): nothing was written." in result.stderr
    assert memory.token() == token


def test_process_edit_reopens_on_a_filestore(tmp_path):
    done = run_rdzvctl(["demo", "--no-live", "--path", str(tmp_path / "demo")])
    assert done.returncode == 0, done.stderr
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(tmp_path / "demo" / "rendezvous.store"),
           "PET_RDZV_ID": "demo-job", "PET_RDZV_CONF": "store_type=file", "RDZVCTL_BACKUP_DIR": str(tmp_path / "b")}
    fix = "sed 's/\"closed\": false/\"closed\": true/' original > \"$1\""
    ed = two_round_editor(tmp_path, "echo 'not json' > \"$1\"", fix)
    edit = run_rdzvctl(["edit", "--yes"], env={**env, "EDITOR": ed})
    assert edit.returncode == 0, edit.stderr
    assert "not valid JSON" in (tmp_path / "shown-2").read_text()
    get = run_rdzvctl(["get", "-o", "json"], env=env)
    assert '"closed":true' in get.stdout


def test_edit_dry_run(memory, tmp_path):
    token = memory.put(make_state())
    ed = editor(tmp_path, "sed -i 's/\"closed\": false/\"closed\": true/' \"$1\"")
    result = invoke(["edit", *memory.flags(), "--dry-run"], env={"EDITOR": ed})
    assert result.exit_code == 0
    assert "Dry run" in result.stderr and memory.token() == token


def test_edit_of_an_absent_run_exits_5(memory):
    result = invoke(["edit", *memory.flags(run_id="absent")], env={"EDITOR": "true"})
    assert result.exit_code == 5
    assert "set --create" in result.stderr


def test_someone_else_writing_while_editing_exits_3(memory, tmp_path):
    memory.put(make_state())
    flags = memory.flags(backend="memory-racing")
    ed = editor(tmp_path, "sed -i 's/\"closed\": false/\"closed\": true/' \"$1\"")
    result = invoke(["edit", *flags, "--yes"], env={"EDITOR": ed})
    assert result.exit_code == 3
    assert "Changed meanwhile:" in result.stderr
    assert memory.state().closed is False and memory.state().round == 3


def test_visual_is_used_when_editor_is_unset(memory, tmp_path):
    memory.put(make_state())
    ed = editor(tmp_path, "sed -i 's/\"closed\": false/\"closed\": true/' \"$1\"")
    assert invoke(["edit", *memory.flags(), "--yes"], env={"VISUAL": ed, "EDITOR": None}).exit_code == 0
    assert memory.state().closed is True


def test_failing_editor_exits_2_and_writes_nothing(memory, tmp_path):
    token = memory.put(make_state())
    for ed in ("false", str(tmp_path / "no-such-editor")):
        result = invoke(["edit", *memory.flags(), "--yes"], env={"EDITOR": ed})
        assert result.exit_code == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("rdzvctl: UsageError: ") and "Editing failed" in line and "nothing was written" in line
    assert memory.token() == token


def test_process_every_failure_of_the_editor_step_is_one_line_exit_2_nothing_written(tmp_path):
    done = run_rdzvctl(["demo", "--no-live", "--path", str(tmp_path / "demo")])
    assert done.returncode == 0, done.stderr
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(tmp_path / "demo" / "rendezvous.store"),
           "PET_RDZV_ID": "demo-job", "PET_RDZV_CONF": "store_type=file", "RDZVCTL_BACKUP_DIR": str(tmp_path / "b")}
    before = run_rdzvctl(["get", "-o", "raw"], env=env, text=False).stdout
    scripts = {
        "deletes": "rm -f \"$1\"",
        "fifo": "rm -f \"$1\"; mkfifo \"$1\"",
        "symlink": "rm -f \"$1\"; ln -s /etc/hostname \"$1\"",
        "not utf-8": "printf '\\377\\376' > \"$1\"",
    }
    editors = {"unbalanced quote": '"x', "missing": str(tmp_path / "no-such-editor"), "fails": "false"}
    for i, (what, body) in enumerate(scripts.items()):
        (tmp_path / f"ed{i}").mkdir()
        editors[what] = editor(tmp_path / f"ed{i}", body)
    for what, command in editors.items():
        edit = run_rdzvctl(["edit", "--yes"], env={**env, "EDITOR": command, "VISUAL": ""}, timeout=30)
        assert edit.returncode == 2, (what, edit.stderr)
        (line,) = edit.stderr.splitlines()
        assert "nothing was written" in line and "internal error" not in line, (what, line)
    assert run_rdzvctl(["get", "-o", "raw"], env=env, text=False).stdout == before
