"""Backups written before every destructive write, and read back by ``restore``.

A backup is one JSON file holding the backend, endpoint, run id, token, time
and the exact bytes replaced (base64).  Files are created exclusively (never
overwritten), mode 0600, and fsynced, file and directory, before the backend
is written.  A write that fails (disk full, read-only, no permission) removes
its partial file and raises :class:`BackupError`: the backend is never touched.

Default directory: ``$RDZVCTL_BACKUP_DIR``, else
``$XDG_STATE_HOME/rdzvctl/backups``, else ``~/.local/state/rdzvctl/backups``.
Directories rdzvctl creates get mode 0700.  Like OpenSSH's ``safe_path``
(StrictModes), a backup directory, a backup read by ``restore``, and every
parent up to the home directory (or ``/``) must be owned by the user or root
and not writable by group or others, or another user could swap a backup
before it is restored.  One deliberate difference: a *parent* with the sticky
bit (``/tmp``) may be world-writable, since nobody else can rename or remove
what the user owns in it.  Symlinks are resolved first and the real path is
checked, as OpenSSH does.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from rdzvctl import clock
from rdzvctl.errors import BackupError, UsageError
from rdzvctl.state.jsonform import JSONDocumentError, load_json_document

__all__ = ["Backup", "default_backup_dir", "backup_directory", "write_backup", "read_backup", "FORMAT"]

FORMAT = "rdzvctl.backup/v1"
MAX_BACKUP_BYTES = 256 * 1024 * 1024
_SECRET_KEYS = re.compile(r"pass|secret|token|key$", re.IGNORECASE)


def default_backup_dir() -> Path:
    env = os.environ.get("RDZVCTL_BACKUP_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "rdzvctl" / "backups"


@dataclass
class Backup:
    backend: str
    endpoint: str
    run_id: str
    conf: Dict[str, str]
    token: Optional[str]
    time: str
    command: str
    state: Optional[bytes]  # None: there was no state

    def to_json(self) -> Dict[str, Any]:
        from rdzvctl.text import scrub  # never a password in a backup, whatever the caller passed

        return {
            "format": FORMAT,
            "backend": self.backend,
            "endpoint": scrub(self.endpoint),
            "run_id": self.run_id,
            "conf": {k: scrub(v) for k, v in public_conf(self.conf).items()},
            "token": self.token,
            "time": self.time,
            "command": scrub(self.command),
            "state_base64": None if self.state is None else base64.b64encode(self.state).decode("ascii"),
        }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "run"


def backup_directory(directory: Optional[Path] = None) -> Path:
    """The real path of the backup directory, created (0700) if missing and checked safe.

    Raises :class:`BackupError` (exit 2) with the fix when it is unsafe or cannot be made.
    """
    directory = Path(directory) if directory is not None else default_backup_dir()
    _make_dirs(directory)
    real = Path(os.path.realpath(directory))
    if not real.is_dir():
        raise BackupError(f"the backup directory {directory} is not a directory: pass another --backup-dir")
    problem = _unsafe(real, "use another --backup-dir")
    if problem:
        raise BackupError(f"unsafe backup directory {directory}: {problem}; nothing was written")
    return real


def _make_dirs(directory: Path) -> None:
    """``mkdir -p`` where every directory made gets 0700 (whatever the umask)."""
    missing = []
    path = Path(os.path.abspath(directory))
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: the ownership check judges it
        except OSError as exc:
            raise BackupError(f"cannot create the backup directory {path}: {exc.strerror}: "
                              "pass another --backup-dir; nothing was written") from None
        os.chmod(path, 0o700)


def _unsafe(real: Path, elsewhere: str) -> Optional[str]:
    """What makes ``real`` or a parent (up to home or /) unsafe, with the fix; None when safe.

    ``elsewhere`` is the other way out, e.g. "use another --backup-dir".

    OpenSSH's ``safe_path``: owned by the user or root, not writable by group or
    others; a sticky parent (``/tmp``) may be writable by others.
    """
    uid = os.geteuid()
    home = os.path.realpath(os.path.expanduser("~"))
    path = real
    first = True
    while True:
        try:
            info = os.stat(path)
        except OSError as exc:
            return f"cannot check {path}: {exc.strerror}"
        if info.st_uid not in (uid, 0):
            return (f"{path} is owned by uid {info.st_uid}, not by you (uid {uid}) or root, so its owner could "
                    f"swap a backup: {elsewhere}")
        sticky_parent = not first and info.st_mode & stat.S_ISVTX
        if info.st_mode & 0o022 and not sticky_parent:
            who = "group and others" if info.st_mode & 0o022 == 0o022 else (
                "group" if info.st_mode & 0o020 else "others")
            return f"{path} is writable by {who}, who could swap a backup: run `chmod go-w {path}` or {elsewhere}"
        if str(path) == home or path == path.parent:
            return None
        path = path.parent
        first = False


def write_backup(backup: Backup, directory: Optional[Path] = None) -> Path:
    """Write ``backup`` durably under ``directory``; returns its path. Never overwrites.

    Any failure removes the partial file and raises :class:`BackupError`.
    """
    directory = backup_directory(directory)
    stamp = clock.now_utc().strftime("%Y%m%dT%H%M%S.%fZ")
    data = (json.dumps(backup.to_json(), indent=2) + "\n").encode("utf-8")
    for _ in range(100):
        path = directory / f"{_safe_name(backup.run_id)}-{stamp}-{secrets.token_hex(3)}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _write_error(directory, exc) from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException as exc:  # a partial backup must not look like one (Ctrl-C included)
            try:
                os.unlink(path)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise _write_error(directory, exc) from None
            raise
        return path
    raise BackupError(f"cannot find a free backup file name in {directory}")


_WRITE_HINTS = {
    errno.ENOSPC: "free some space or pass another --backup-dir",
    errno.EDQUOT: "free some of your quota or pass another --backup-dir",
    errno.EFBIG: "the file size limit (ulimit -f) is too small for it",
    errno.EROFS: "pass a writable --backup-dir",
    errno.EACCES: "pass a --backup-dir you can write to",
    errno.EPERM: "pass a --backup-dir you can write to",
}


def _write_error(directory: Path, exc: OSError) -> BackupError:
    hint = _WRITE_HINTS.get(exc.errno or 0, "pass another --backup-dir")
    return BackupError(f"cannot write a backup in {directory}: {exc.strerror or exc}; {hint}; "
                       "nothing was written (the backend was not touched)")


def public_conf(conf: Dict[str, str]) -> Dict[str, str]:
    """``--rdzv-conf`` without secrets (passwords are never written to backups)."""
    from rdzvctl.text import is_secret_option

    return {k: v for k, v in conf.items() if not _SECRET_KEYS.search(k) and not is_secret_option(k)}


def read_backup(path: Path) -> Backup:
    """Read and validate a backup file; errors are one line naming the problem.

    The file and its directories must be safe like a backup directory (see
    the module docstring): a backup another user could have changed is refused.
    """
    try:
        real = Path(os.path.realpath(path))
        if real.is_file():
            problem = _unsafe(real, "check it and copy it to a directory of your own")
            if problem:
                raise BackupError(f"refusing the backup {path}: {problem}")
        if os.path.getsize(path) > MAX_BACKUP_BYTES:
            raise UsageError(f"{path}: larger than any backup rdzvctl writes")
        with open(path, encoding="utf-8") as handle:
            doc = load_json_document(handle.read())
    except OSError as exc:
        raise UsageError(f"cannot read the backup {path}: {exc.strerror}") from None
    except JSONDocumentError as exc:
        if exc.too_deep:
            raise UsageError(f"{path}: not a backup file (the JSON nests too deeply)") from None
        raise UsageError(f"{path}: not a backup file (invalid JSON: {exc})") from None
    except ValueError as exc:  # bad UTF-8
        raise UsageError(f"{path}: not a backup file (invalid JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"{path}: not an rdzvctl backup (format must be {FORMAT!r})")
    for key in ("backend", "endpoint", "run_id", "time"):
        if not isinstance(doc.get(key), str):
            raise UsageError(f"{path}: field {key!r} is missing or not a string")
    raw = doc.get("state_base64")
    if raw is not None and not isinstance(raw, str):
        raise UsageError(f"{path}: field 'state_base64' must be a string or null")
    try:
        state = None if raw is None else base64.b64decode(raw, validate=True)
    except ValueError:
        raise UsageError(f"{path}: field 'state_base64' is not valid base64") from None
    conf = doc.get("conf") or {}
    if not isinstance(conf, dict) or not all(isinstance(v, str) for v in conf.values()):
        raise UsageError(f"{path}: field 'conf' must map names to strings")
    return Backup(doc["backend"], doc["endpoint"], doc["run_id"], conf, doc.get("token"), doc["time"],
                  str(doc.get("command", "")), state)
