"""Consent and interruption through the real CLI, as subprocesses, on a real FileStore and Redis.

* Off a terminal (stdin or stderr not a tty) a write without ``--yes`` is
  refused with exit 2 and the backend keeps its exact bytes and token; the
  ``rdzvctl reset --mode clear ... 2>&1 | tail -1`` case (stdin a terminal,
  stderr a pipe) included.  ``--dry-run`` needs no ``--yes``.
* On a pseudo-terminal the question is asked: "n" writes nothing (exit 0),
  "y" writes after a backup.
* Ctrl-C (SIGINT sent to the process) exits 130 with a line true to what
  happened: at the prompt nothing was written; between the backup and the
  fenced write the backend was not changed and the backup is named; during
  the write it may have been written; a read-only ``watch`` says only
  "Interrupted.".
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest

from rdzvctl.backup import Backup, write_backup
from rdzvctl.state.codec import decode, encode
from tests.reliability.common import cli_env, put_state, sample_state
from tests.reliability.servers import Target, make_target

#: A generous bound on waiting for a subprocess to reach a point (a hang guard, not a speed claim).
WAIT = 60.0
BACKENDS = ("c10d-file", "redis")


@pytest.fixture(scope="module", params=BACKENDS)
def consent_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    root = Path(tempfile.mkdtemp(prefix=f"rdzvctl-consent-{request.param}-"))
    target = make_target(request.param, root, persistent_redis=False)
    try:
        yield target
    finally:
        if target.server is not None:
            target.server.stop()


@pytest.fixture(scope="module")
def redis_target() -> Iterator[Target]:
    root = Path(tempfile.mkdtemp(prefix="rdzvctl-consent-redis-"))
    target = make_target("redis", root, persistent_redis=False)
    try:
        yield target
    finally:
        assert target.server is not None
        target.server.stop()


_RUNS = iter(range(1_000_000))


def _seed(target: Target) -> Tuple[str, Any]:
    """A fresh run with one dead participant; returns the run id and its (bytes, token)."""
    run_id = f"consent-{os.getpid()}-{next(_RUNS)}"
    backend = target.open(run_id)
    put_state(backend, sample_state(round=3, nodes=3, dead=1))
    return run_id, backend.get_state()


def _current(target: Target, run_id: str) -> Any:
    return target.open(run_id).get_state()


def _command(target: Target, run_id: str, args: Sequence[str], backups: Path) -> List[str]:
    return [args[0], *target.flags(run_id), *args[1:], "--backup-dir", str(backups)]


def _rdzvctl(argv: Sequence[str], *, module: str = "rdzvctl") -> List[str]:
    return [sys.executable, "-m", module, *argv]


class Terminal:
    """rdzvctl with stdin and stderr on a pseudo-terminal (as typed at a shell), stdout a pipe.

    A thread drains the terminal so a long plan never blocks the process.
    """

    def __init__(self, argv: Sequence[str], env: Dict[str, str], stderr_tty: bool = True) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE,
                                     stderr=slave if stderr_tty else subprocess.PIPE, env=env)
        os.close(slave)
        self._master = master
        self._text = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: the process closed its end
                chunk = b""
            with self._changed:
                if not chunk:
                    self._text += "\0"  # end marker
                    self._changed.notify_all()
                    return
                self._text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._text.rstrip("\0")

    def expect(self, wanted: str) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: wanted in self._text or self._text.endswith("\0"), WAIT)
            if not ok or wanted not in self._text:
                raise AssertionError(f"{wanted!r} never appeared on the terminal: {self._text!r}")

    def send(self, text: str) -> None:
        os.write(self._master, text.encode())

    def finish(self) -> Tuple[int, str, str]:
        """Exit code, stdout, and what the terminal showed."""
        stdout, stderr = self.proc.communicate(timeout=WAIT)
        self._reader.join(WAIT)
        os.close(self._master)
        return self.proc.returncode, stdout.decode(), self.text + (stderr or b"").decode()


_READ = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)


def _wait_blocked(pid: int, reading_stdin: bool = False) -> None:
    """Until the main thread sleeps in a system call (``read(0, ...)`` for the prompt).

    A SIGINT that lands while the process is still on its way into the call
    only sets Python's flag, and the call then blocks with the flag unseen, a
    race a person pressing Ctrl-C never hits.  Without ``/proc`` this is best effort.
    """
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/syscall") as handle:
                call = handle.read().split()
        except OSError:
            return
        if state == "S" and call and call[0] != "running":
            if not reading_stdin or _READ is None or call[:2] == [_READ, "0x0"]:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} never blocked in a system call ({state}, {call})")
        time.sleep(0.01)


def _backups(directory: Path) -> List[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


# -- off a terminal -------------------------------------------------------------------------------

WRITES = [["reset", "--mode", "clear"], ["reset", "--mode", "prune"], ["set", "--closed"]]


@pytest.mark.parametrize("args", WRITES, ids=lambda a: " ".join(a))
def test_off_a_terminal_a_write_without_yes_writes_nothing(consent_target: Target, tmp_path: Path,
                                                           args: List[str]) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    done = subprocess.run(_rdzvctl(_command(consent_target, run_id, args, backups)), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=cli_env(), timeout=WAIT)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "not a terminal (stdin is not a tty)" in last and "add --yes to write" in last, done.stderr
    assert "nothing was written" in last and "Traceback" not in done.stderr
    assert _current(consent_target, run_id) == before  # the same bytes and token
    assert _backups(backups) == []


def test_restore_and_edit_off_a_terminal_need_yes(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    saved = write_backup(Backup("redis", redis_target.endpoint, run_id, {}, None, "t", "set",
                                encode(sample_state(round=9))), tmp_path / "saved")
    backups = tmp_path / "backups"
    editor = tmp_path / "editor.sh"
    ran = tmp_path / "editor-ran"
    editor.write_text(f"#!/bin/sh\ntouch {ran}\nsed -i 's/\"round\": 3/\"round\": 4/' \"$1\"\n")
    editor.chmod(0o700)
    for argv in (["restore", str(saved), "--backup-dir", str(backups)],
                 _command(redis_target, run_id, ["edit"], backups)):
        done = subprocess.run(_rdzvctl(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=cli_env({"EDITOR": str(editor)}), timeout=WAIT)
        assert done.returncode == 2 and "add --yes to write" in done.stderr, (argv, done.stderr)
        assert _current(redis_target, run_id) == before
    assert _backups(backups) == []
    assert not ran.exists()  # refused before the editor opened: no edit is lost


def test_stderr_piped_like_tail_is_refused_even_with_a_terminal_on_stdin(consent_target: Target,
                                                                         tmp_path: Path) -> None:
    """``rdzvctl reset --mode clear ... 2>&1 | tail -1``: the question would be swallowed by the pipe."""
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    master, slave = pty.openpty()
    try:
        done = subprocess.run(_rdzvctl(_command(consent_target, run_id, ["reset", "--mode", "clear"], backups)),
                              stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env(),
                              timeout=WAIT)
    finally:
        os.close(slave)
        os.close(master)
    last = done.stdout.decode().strip().splitlines()[-1]  # what `| tail -1` shows
    assert done.returncode == 2
    assert "not a terminal (stderr is not a tty)" in last and "add --yes" in last, last
    assert _current(consent_target, run_id) == before
    assert _backups(backups) == []


def test_dry_run_off_a_terminal_needs_no_yes(consent_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    done = subprocess.run(_rdzvctl(_command(consent_target, run_id, ["reset", "--mode", "clear", "--dry-run"],
                                            backups)),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=cli_env(), timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert "Dry run: nothing was written." in done.stderr
    assert _current(consent_target, run_id) == before


def test_with_yes_off_a_terminal_it_writes(consent_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    done = subprocess.run(_rdzvctl(_command(consent_target, run_id, ["reset", "--mode", "clear", "--yes"],
                                            backups)),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=cli_env(), timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert _current(consent_target, run_id) is None
    assert len(_backups(backups)) == 1


# -- on a terminal --------------------------------------------------------------------------------

def test_answering_no_at_the_prompt_writes_nothing_and_exits_0(consent_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    term = Terminal(_rdzvctl(_command(consent_target, run_id, ["reset", "--mode", "clear"], backups)), cli_env())
    term.expect("[y/N]:")
    term.send("n\n")
    code, _, shown = term.finish()
    assert code == 0, shown
    assert f"Write this to run {run_id!r}" in shown and "Declined: nothing was written." in shown
    assert _current(consent_target, run_id) == before
    assert _backups(backups) == []


def test_answering_yes_at_the_prompt_backs_up_and_writes(consent_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    term = Terminal(_rdzvctl(_command(consent_target, run_id, ["set", "--closed"], backups)), cli_env())
    term.expect("[y/N]:")
    term.send("y\n")
    code, _, shown = term.finish()
    assert code == 0, shown
    assert "Backup written:" in shown and "Written." in shown
    after = _current(consent_target, run_id)
    assert after is not None and decode(after[0]).closed is True
    assert len(_backups(backups)) == 1


def test_ctrl_d_at_the_prompt_is_a_no(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    backups = tmp_path / "backups"
    term = Terminal(_rdzvctl(_command(redis_target, run_id, ["reset", "--mode", "clear"], backups)), cli_env())
    term.expect("[y/N]:")
    term.send("\x04")  # the terminal's end-of-file character
    code, _, shown = term.finish()
    assert code == 0 and "Declined: nothing was written." in shown, shown
    assert _current(redis_target, run_id) == before
    assert _backups(backups) == []


def test_ctrl_c_at_the_prompt_exits_130_and_nothing_was_written(consent_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    term = Terminal(_rdzvctl(_command(consent_target, run_id, ["reset", "--mode", "clear"], backups)), cli_env())
    term.expect("[y/N]:")
    _wait_blocked(term.proc.pid, reading_stdin=True)
    term.proc.send_signal(signal.SIGINT)
    code, _, shown = term.finish()
    assert code == 130, shown
    assert shown.strip().splitlines()[-1] == "Interrupted: nothing was written."
    assert "Aborted" not in shown and "Traceback" not in shown
    assert _current(consent_target, run_id) == before
    assert _backups(backups) == []


def test_ctrl_c_in_a_read_only_watch_says_nothing_about_writing(consent_target: Target) -> None:
    run_id, _ = _seed(consent_target)
    proc = subprocess.Popen(_rdzvctl(["watch", *consent_target.flags(run_id), "-o", "json", "--interval", "0.2"]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the snapshot event: watch is running
        assert '"kind":"snapshot"' in first, first
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "Interrupted.", stderr


# -- Ctrl-C between the backup and the write, and during the write ---------------------------------

def _held(target: Target, run_id: str, tmp_path: Path, backups: Path) -> Tuple[subprocess.Popen, Path, Path]:
    """``reset --mode clear --yes`` stopped right after its backup (tests/reliability/crash_after_backup.py)."""
    log, go = tmp_path / "events.log", tmp_path / "go"
    env = cli_env({"RDZVCTL_RELIABILITY_INJECT": "hold", "RDZVCTL_RELIABILITY_LOG": str(log),
                   "RDZVCTL_RELIABILITY_GO": str(go)})
    proc = subprocess.Popen(_rdzvctl([*_command(target, run_id, ["reset", "--mode", "clear"], backups), "--yes",
                                      "--timeout", "30"], module="tests.reliability.crash_after_backup"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    _wait_for_line(log, "held", proc)
    return proc, log, go


def _wait_for_line(log: Path, line: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT
    while not (log.exists() and line in log.read_text().splitlines()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{line!r} never logged; exit {proc.poll()}; {proc.communicate()[1]}")
        time.sleep(0.02)


def test_ctrl_c_after_the_backup_names_it_and_the_backend_is_unchanged(consent_target: Target,
                                                                       tmp_path: Path) -> None:
    run_id, before = _seed(consent_target)
    backups = tmp_path / "backups"
    proc, log, _ = _held(consent_target, run_id, tmp_path, backups)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=WAIT)
    (backup,) = _backups(backups)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"Interrupted before the write: the backend was not changed (a backup was already saved: {backup}).", \
        stderr
    assert "backend-write" not in log.read_text()
    assert _current(consent_target, run_id) == before


def test_ctrl_c_during_the_write_says_it_may_have_been_written(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    backups = tmp_path / "backups"
    proc, log, go = _held(redis_target, run_id, tmp_path, backups)
    server = redis_target.server
    assert server is not None
    with server.paused():  # the write cannot complete while the server is stopped
        go.touch()
        _wait_for_line(log, "backend-write", proc)
        _wait_blocked(proc.pid)  # waiting for the stopped server's answer
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT)
    (backup,) = _backups(backups)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"Interrupted during the write: run {run_id!r} may have been changed"), stderr
    assert "rdzvctl get" in last and f"rdzvctl restore {backup}" in last
    assert _current(redis_target, run_id) in (before, None)  # old or new, never anything else


def test_each_step_of_the_write_flow_has_its_own_interruption_message() -> None:
    """The pure wording behind the cases above, including "after the write", which no signal hits reliably."""
    from rdzvctl.cli.change import interrupted_message

    assert interrupted_message({"writes": True}) == "Interrupted: nothing was written."
    held = {"writes": True, "backup": "/b/r.json", "run_id": "r"}
    assert "the backend was not changed" in interrupted_message(held) and "/b/r.json" in interrupted_message(held)
    assert "may have been changed" in interrupted_message({**held, "writing": True})
    after = interrupted_message({**held, "written": True})
    assert after.startswith("Interrupted after the write: run 'r' was changed") and "rdzvctl restore /b/r.json" in after


# -- exit codes of the root help ------------------------------------------------------------------

def test_root_help_documents_130_and_consent() -> None:
    done = subprocess.run(_rdzvctl(["--help"]), capture_output=True, text=True, env=cli_env(), timeout=WAIT)
    assert "130 interrupted" in done.stdout and "needs --yes" in done.stdout

