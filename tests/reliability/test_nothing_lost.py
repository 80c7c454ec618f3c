"""Nothing lost: every destructive command backs up durably before it writes, and restore is exact.

* A crash injected right after the backup is written (``crash_after_backup.py``:
  ``os._exit`` with no cleanup) leaves the backend untouched and the backup
  complete and valid, for ``set``, ``edit``, ``reset`` and ``restore`` on every
  backend; the logged order shows the backup file and its directory fsynced
  before ``write_backup`` returned, and no backend write.
* A normal run logs: fsync(file), fsync(dir), backup returned, backend write.
* ``restore`` puts back byte-identical bytes (also bytes rdzvctl would not
  have encoded that way: a protocol-2 pickle).
* Backups never overwrite each other: 8 processes x 50 backups into one
  directory in the same instants, and a forced name collision.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from rdzvctl.backup import Backup, read_backup, write_backup
from rdzvctl.errors import UsageError
from rdzvctl.state.codec import decode, encode
from tests.reliability.common import REPO_ROOT, cli_env, put_state, sample_state
from tests.reliability.crash_after_backup import CRASH_EXIT
from tests.reliability.recorder import Recorder
from tests.reliability.servers import Target, make_target
from tests.support.cli import invoke

COMMANDS = ["set", "edit", "reset", "restore"]

_EDITOR = """import sys
path = sys.argv[1]
text = open(path).read()
open(path, "w").write(text.replace('"round": 3', '"round": 9'))
"""


def _instrumented(args: List[str], log: Path, mode: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.reliability.crash_after_backup", *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120,
                          env=cli_env({**env, "RDZVCTL_RELIABILITY_INJECT": mode, "RDZVCTL_RELIABILITY_LOG": str(log)}))


def _command_args(command: str, target: Target, run_id: str, tmp_path: Path) -> List[str]:
    """The destructive command to run on a state of round 3 with one dead node."""
    if command == "set":
        return ["set", *target.flags(run_id), "--round", "9", "--yes"]
    if command == "edit":
        return ["edit", *target.flags(run_id), "--yes"]
    if command == "reset":
        return ["reset", *target.flags(run_id), "--mode", "prune", "--yes"]
    saved = tmp_path / "to-restore.json"
    if not saved.exists():  # a backup of another state of this run, as restore reads it
        path = write_backup(Backup(target.backend, target.endpoint, run_id, dict(target.conf), None,
                                   "2026-11-24T22:00:00Z", "set", encode(sample_state(round=1))), tmp_path / "old")
        path.rename(saved)
    return ["restore", str(saved), "--yes"]


def _env(tmp_path: Path, backups: Path) -> Dict[str, str]:
    editor = tmp_path / "editor.py"
    editor.write_text(_EDITOR)
    return {"RDZVCTL_BACKUP_DIR": str(backups), "EDITOR": f"{sys.executable} {editor}"}


def _current(target: Target, run_id: str) -> Any:
    backend = target.open(run_id)
    try:
        return backend.get_state()
    finally:
        backend.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_crash_after_backup_leaves_the_backend_untouched(target: Target, command: str, tmp_path: Path,
                                                         recorder: Recorder) -> None:
    run_id = f"crash-{command}-{tmp_path.name[-6:]}"
    put_state(target.open(run_id), sample_state(round=3, dead=1))
    before = _current(target, run_id)
    backups, log = tmp_path / "backups", tmp_path / "events.log"
    done = _instrumented(_command_args(command, target, run_id, tmp_path), log, "crash", _env(tmp_path, backups))
    assert done.returncode == CRASH_EXIT, f"exit {done.returncode}: {done.stderr}"
    assert _current(target, run_id) == before, "the backend changed before the backup was complete"
    (path,) = backups.iterdir()
    saved = read_backup(path)  # complete, valid JSON, the right run
    assert saved.state == before[0] and saved.run_id == run_id
    assert json.loads(path.read_text())["format"] == "rdzvctl.backup/v1"
    events = log.read_text().splitlines()
    assert events == [f"fsync {path}", f"fsync {backups}", f"backup-returned {path}"], events
    recorder.add("backups", "complete after a crash injected between backup and write", 1)
    recorder.record_fault(target.id, f"crash between backup and write ({command})", True)


@pytest.mark.parametrize("command", COMMANDS)
def test_backup_is_durable_before_the_write(command: str, tmp_path: Path) -> None:
    """The order belongs to the write flow, the same for every backend: shown on a FileStore."""
    target = make_target("c10d-file", tmp_path / "store")
    run_id = f"order-{command}"
    put_state(target.open(run_id), sample_state(round=3, dead=1))
    backups, log = tmp_path / "backups", tmp_path / "events.log"
    done = _instrumented(_command_args(command, target, run_id, tmp_path), log, "trace", _env(tmp_path, backups))
    assert done.returncode == 0, done.stderr
    (path,) = backups.iterdir()
    events = log.read_text().splitlines()
    assert events == [f"fsync {path}", f"fsync {backups}", f"backup-returned {path}", "backend-write"], events
    assert decode(_current(target, run_id)[0]) != decode(read_backup(path).state)


def test_restore_is_byte_identical(target: Target, tmp_path: Path, recorder: Recorder) -> None:
    run_id = f"restore-{tmp_path.name[-8:]}"
    original = encode(sample_state(round=3, dead=1), protocol=2)  # not what rdzvctl itself would write
    backend = target.open(run_id)
    put_state(backend, original)
    backups = tmp_path / "backups"
    env = {"RDZVCTL_BACKUP_DIR": str(backups)}

    def newest() -> Path:
        return max(backups.iterdir(), key=lambda p: p.stat().st_mtime_ns)

    def run(*args: str) -> None:
        command, rest = args[0], list(args[1:])
        flags = [] if command == "restore" else target.flags(run_id)
        result = invoke([command, *flags, *rest, "--yes"], env=env)
        assert result.exit_code == 0, (args, result.stderr)

    identical = 0
    run("set", "--round", "9")
    after_set = backend.get_state()[0]
    first = newest()
    run("restore", str(first))
    assert backend.get_state()[0] == original
    identical += 1
    run("reset", "--mode", "clear")
    assert backend.get_state() is None
    cleared = newest()
    assert read_backup(cleared).state == original
    run("restore", str(cleared))
    assert backend.get_state()[0] == original
    identical += 1
    # The backup restore itself made (before the first restore) holds the round-9 bytes exactly.
    made_by_restore = sorted(backups.iterdir(), key=lambda p: p.stat().st_mtime_ns)[1]
    run("restore", str(made_by_restore))
    assert backend.get_state()[0] == after_set
    identical += 1
    paths = list(backups.iterdir())
    assert len(paths) == len({p.name for p in paths}) == 5  # one per write, none overwritten
    recorder.add("backups", "restored byte-identical", identical)
    recorder.add("backups", "written by set/reset/restore round trips", len(paths))


_WRITER = """
import sys
from pathlib import Path
from rdzvctl.backup import Backup, write_backup
directory, writer, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()
for i in range(count):
    write_backup(Backup("c10d", "127.0.0.1:29400", "job42", {}, None, "t", "set", f"{writer}/{i}".encode()), directory)
"""


def test_concurrent_backups_never_overwrite_each_other(tmp_path: Path, recorder: Recorder) -> None:
    """8 processes x 50 backups of one run into one directory, started together."""
    processes = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(w), "50"], stdin=subprocess.PIPE,
                                  text=True, env=cli_env(), cwd=REPO_ROOT) for w in range(8)]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        process.stdin.close()
        assert process.wait(timeout=120) == 0
    paths = list(tmp_path.iterdir())
    contents = sorted(read_backup(p).state for p in paths)
    assert contents == sorted(f"{w}/{i}".encode() for w in range(8) for i in range(50))
    recorder.add("backups", "written concurrently by 8 processes (none overwritten)", len(paths))


def test_a_name_collision_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the random suffix and the clock both forced, the second backup fails loudly instead."""
    import datetime as _dt

    import rdzvctl.backup as backup_module
    import rdzvctl.clock

    frozen = _dt.datetime(2026, 11, 24, 22, 0, 0, tzinfo=_dt.timezone.utc)
    monkeypatch.setattr(backup_module.secrets, "token_hex", lambda n: "c0ffee")
    monkeypatch.setattr(rdzvctl.clock, "now_utc", lambda: frozen)
    first = write_backup(Backup("c10d", "e", "job42", {}, None, "t", "set", b"first"), tmp_path)
    with pytest.raises(UsageError):
        write_backup(Backup("c10d", "e", "job42", {}, None, "t", "set", b"second"), tmp_path)
    assert read_backup(first).state == b"first"
    assert list(tmp_path.iterdir()) == [first]
