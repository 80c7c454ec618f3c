"""Backups only where no other user can swap them, and a failed backup write leaves nothing behind.

Through the real CLI as subprocesses, on a real Redis (and a FileStore where
the local disk matters):

* OpenSSH's ``safe_path`` rules: a backup directory (or a parent up to home
  or /) owned by another user, or writable by group or others, is refused
  with exit 2 and the fix; a sticky parent such as /tmp is accepted; symlinks
  are judged by their target; directories rdzvctl makes are 0700 and backups
  0600 whatever the umask; ``restore`` refuses a backup file others could
  have changed.
* Real write failures, each one line with exit 2, no partial file, backend
  untouched: ENOSPC on a full 64 KiB tmpfs, EROFS on a read-only tmpfs (both
  need mount privileges and are skipped without them), EFBIG from
  RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails instead of
  killing the process), and EACCES in a directory the user cannot write
  (as root, the command runs under ``setpriv`` without CAP_DAC_OVERRIDE and
  CAP_DAC_READ_SEARCH, since those let root ignore permission bits).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

import pytest

from rdzvctl.backup import Backup, write_backup
from rdzvctl.state.codec import encode
from tests.reliability.common import cli_env, put_state, sample_state
from tests.reliability.servers import Target, make_target

WAIT = 60.0
NOBODY = pwd.getpwnam("nobody") if "nobody" in {p.pw_name for p in pwd.getpwall()} else None
IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def redis_target() -> Iterator[Target]:
    root = Path(tempfile.mkdtemp(prefix="rdzvctl-backup-redis-"))
    target = make_target("redis", root, persistent_redis=False)
    try:
        yield target
    finally:
        assert target.server is not None
        target.server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["c10d-file", "redis"])
def any_target(request: pytest.FixtureRequest, redis_target: Target) -> Iterator[Target]:
    if request.param == "redis":
        yield redis_target
        return
    root = Path(tempfile.mkdtemp(prefix="rdzvctl-backup-file-"))
    try:
        yield make_target("c10d-file", root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_RUNS = iter(range(1_000_000))


def _seed(target: Target, nodes: int = 3) -> Tuple[str, Any]:
    run_id = f"backup-{os.getpid()}-{next(_RUNS)}"
    backend = target.open(run_id)
    put_state(backend, sample_state(round=3, nodes=nodes, dead=1))
    return run_id, backend.get_state()


def _reset(target: Target, run_id: str, backups: Path, *, prefix: Sequence[str] = (),
           **popen: Any) -> subprocess.CompletedProcess:
    argv = ["reset", *target.flags(run_id), "--mode", "clear", "--yes", "--backup-dir", str(backups)]
    return _run(argv, prefix=prefix, **popen)


def _run(argv: Sequence[str], *, prefix: Sequence[str] = (), **popen: Any) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "rdzvctl", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=cli_env(), timeout=WAIT, **popen)


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("rdzvctl:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    return lines[0]


def _files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def _refused(target: Target, run_id: str, before: Any, backups: Path, *wanted: str) -> str:
    done = _reset(target, run_id, backups)
    line = _one_line(done)
    assert done.returncode == 2, done.stderr
    assert line.startswith("rdzvctl: BackupError:") and "nothing was written" in line, line
    for text in wanted:
        assert text in line, line
    assert target.open(run_id).get_state() == before
    assert _files(backups) == []
    return line


# -- where backups may go -------------------------------------------------------------------------

def test_a_group_writable_backup_directory_is_refused_with_the_fix(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    backups = tmp_path / "shared"
    backups.mkdir(mode=0o700)
    backups.chmod(0o770)
    _refused(redis_target, run_id, before, backups, f"chmod go-w {backups}", "writable by group", "--backup-dir")


def test_a_world_writable_parent_is_refused_but_a_sticky_one_like_tmp_is_not(redis_target: Target,
                                                                              tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # anyone could rename `backups` away and put their own in its place
    _refused(redis_target, run_id, before, open_parent / "backups", f"{open_parent} is writable by group and others")

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: nobody else can rename what we own in it
    done = _reset(redis_target, run_id, sticky / "backups")
    assert done.returncode == 0, done.stderr
    assert len(_files(sticky / "backups")) == 1 and redis_target.open(run_id).get_state() is None


@pytest.mark.skipif(not IS_ROOT or NOBODY is None, reason="giving a directory to another user needs root")
def test_a_backup_directory_owned_by_another_user_is_refused(redis_target: Target, tmp_path: Path) -> None:
    assert NOBODY is not None
    run_id, before = _seed(redis_target)
    backups = tmp_path / "theirs"
    backups.mkdir(mode=0o700)
    os.chown(backups, NOBODY.pw_uid, NOBODY.pw_gid)
    _refused(redis_target, run_id, before, backups, f"owned by uid {NOBODY.pw_uid}", "--backup-dir")


def test_symlinks_are_judged_by_their_target(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    unsafe.chmod(0o775)
    (tmp_path / "to-unsafe").symlink_to(unsafe)
    _refused(redis_target, run_id, before, tmp_path / "to-unsafe", f"chmod go-w {unsafe}")

    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    (tmp_path / "to-safe").symlink_to(safe)
    done = _reset(redis_target, run_id, tmp_path / "to-safe")
    assert done.returncode == 0, done.stderr
    (backup,) = _files(safe)
    assert f"Backup written: {backup}" in done.stderr  # the real path is reported


def test_the_directory_is_checked_before_consent_is_asked(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    backups = tmp_path / "shared"
    backups.mkdir()
    backups.chmod(0o777)
    done = _run(["reset", *redis_target.flags(run_id), "--mode", "clear", "--backup-dir", str(backups)])
    assert done.returncode == 2 and "unsafe backup directory" in _one_line(done)  # not "add --yes"
    assert redis_target.open(run_id).get_state() == before


def test_made_directories_are_0700_and_backups_0600_whatever_the_umask(redis_target: Target,
                                                                        tmp_path: Path) -> None:
    run_id, _ = _seed(redis_target)
    backups = tmp_path / "a" / "b" / "backups"
    done = _reset(redis_target, run_id, backups, preexec_fn=lambda: os.umask(0))
    assert done.returncode == 0, done.stderr
    for directory in (tmp_path / "a", tmp_path / "a" / "b", backups):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    (backup,) = _files(backups)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


def test_restore_refuses_a_backup_others_could_have_changed(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    folder = tmp_path / "saved"
    saved = write_backup(Backup("redis", redis_target.endpoint, run_id, {}, None, "t", "set",
                                encode(sample_state(round=9))), folder)
    restore = ["restore", str(saved), "--yes", "--backup-dir", str(tmp_path / "backups")]

    saved.chmod(0o666)
    done = _run(restore)
    assert done.returncode == 2 and f"chmod go-w {saved}" in _one_line(done), done.stderr
    saved.chmod(0o600)
    folder.chmod(0o770)
    done = _run(restore)
    assert done.returncode == 2 and f"chmod go-w {folder}" in _one_line(done), done.stderr
    folder.chmod(0o700)
    if IS_ROOT and NOBODY is not None:
        os.chown(saved, NOBODY.pw_uid, NOBODY.pw_gid)
        done = _run(restore)
        assert done.returncode == 2 and f"owned by uid {NOBODY.pw_uid}" in _one_line(done), done.stderr
        os.chown(saved, 0, 0)
    assert redis_target.open(run_id).get_state() == before
    done = _run(restore)  # safe again: restored
    assert done.returncode == 0, done.stderr


# -- when the backup cannot be written ------------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'no privilege'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def _fill(directory: Path, leave: int) -> None:
    """Fill the filesystem of ``directory``, then free ``leave`` bytes."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_a_full_disk_fails_the_backup_cleanly_and_leaves_the_backend_alone(any_target: Target,
                                                                           tmp_path: Path) -> None:
    run_id, before = _seed(any_target, nodes=200)  # a backup of ~30 KiB: a partial write happens first
    with _tmpfs(tmp_path / "small", "size=64k,mode=0700") as mount:
        backups = mount / "backups"
        backups.mkdir(mode=0o700)
        _fill(mount, leave=8192)
        done = _reset(any_target, run_id, backups)
        line = _one_line(done)
        assert done.returncode == 2, done.stderr
        assert "No space left on device" in line and "free some space" in line and "not touched" in line, line
        assert list(backups.iterdir()) == []  # the partial file was removed
    assert any_target.open(run_id).get_state() == before


def test_a_read_only_backup_directory_fails_cleanly(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    with _tmpfs(tmp_path / "ro", "size=64k,mode=0700,ro") as mount:
        done = _reset(redis_target, run_id, mount)
        line = _one_line(done)
        assert done.returncode == 2 and "Read-only file system" in line, done.stderr
        assert "nothing was written" in line
    assert redis_target.open(run_id).get_state() == before


def test_the_file_size_limit_fails_the_backup_cleanly(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target, nodes=200)  # a backup of ~30 KiB
    backups = tmp_path / "backups"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    done = _reset(redis_target, run_id, backups, preexec_fn=limit)
    line = _one_line(done)
    assert done.returncode == 2 and "File too large" in line and "ulimit -f" in line, done.stderr
    assert list(backups.iterdir()) == []
    assert redis_target.open(run_id).get_state() == before


def test_a_directory_the_user_cannot_write_fails_cleanly(redis_target: Target, tmp_path: Path) -> None:
    run_id, before = _seed(redis_target)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o500)
    prefix: List[str] = []
    if IS_ROOT:
        setpriv = shutil.which("setpriv")
        caps = "-dac_override,-dac_read_search"
        if setpriv is None or subprocess.run([setpriv, f"--bounding-set={caps}", "true"]).returncode != 0:
            pytest.skip("root ignores permission bits and setpriv cannot drop CAP_DAC_OVERRIDE here")
        prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    done = _reset(redis_target, run_id, backups, prefix=prefix)
    line = _one_line(done)
    assert done.returncode == 2 and "Permission denied" in line and "you can write to" in line, done.stderr
    assert list(backups.iterdir()) == []
    assert redis_target.open(run_id).get_state() == before
