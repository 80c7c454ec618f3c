"""Backups written before every destructive write, and read back by ``restore``.

A backup is one JSON file holding the backend, endpoint, run id, token, time
and the exact bytes replaced (base64).  Files are created exclusively (never
overwritten) and fsynced, file and directory, before the backend is written.

Default directory: ``$RDZVCTL_BACKUP_DIR``, else
``$XDG_STATE_HOME/rdzvctl/backups``, else ``~/.local/state/rdzvctl/backups``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from rdzvctl.errors import UsageError

__all__ = ["Backup", "default_backup_dir", "write_backup", "read_backup", "FORMAT"]

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


def write_backup(backup: Backup, directory: Optional[Path] = None) -> Path:
    """Write ``backup`` durably under ``directory``; returns its path. Never overwrites."""
    directory = Path(directory) if directory is not None else default_backup_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create the backup directory {directory}: {exc.strerror}") from None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    data = (json.dumps(backup.to_json(), indent=2) + "\n").encode("utf-8")
    for _ in range(100):
        path = directory / f"{_safe_name(backup.run_id)}-{stamp}-{secrets.token_hex(3)}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot write a backup in {directory}: {exc.strerror}") from None
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
        return path
    raise UsageError(f"cannot find a free backup file name in {directory}")


def public_conf(conf: Dict[str, str]) -> Dict[str, str]:
    """``--rdzv-conf`` without secrets (passwords are never written to backups)."""
    from rdzvctl.text import is_secret_option

    return {k: v for k, v in conf.items() if not _SECRET_KEYS.search(k) and not is_secret_option(k)}


def read_backup(path: Path) -> Backup:
    """Read and validate a backup file; errors are one line naming the problem."""
    try:
        if os.path.getsize(path) > MAX_BACKUP_BYTES:
            raise UsageError(f"{path}: larger than any backup rdzvctl writes")
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read the backup {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a backup file (invalid JSON: {exc})") from None
    except RecursionError:
        raise UsageError(f"{path}: not a backup file (the JSON nests too deeply)") from None
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
