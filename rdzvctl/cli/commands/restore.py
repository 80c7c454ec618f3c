"""rdzvctl restore: write a backup back, fenced, after showing the diff."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from rdzvctl.backends.base import Address, parse_conf
from rdzvctl.backends.registry import open_backend
from rdzvctl.backup import read_backup
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, output_option, with_app, write_options
from rdzvctl.cli.change import apply_change
from rdzvctl.errors import StateError, UsageError
from rdzvctl.inspection import take_snapshot
from rdzvctl.state.codec import decode
from rdzvctl.state.legacy_etcd import parse_state as parse_legacy


@click.command("restore")
@click.argument("backup_file", metavar="BACKUP", type=click.Path(dir_okay=False))
@with_app
@write_options
@output_option("text", "json")
def command(app: App, backup_file: str, yes: bool, dry_run: bool, backup_dir: Optional[str], output: str) -> None:
    """Write the state saved in BACKUP back to its run, fenced by the current token.

    The backend, endpoint and run id come from the backup unless given; pass
    secrets (passwords) again with --rdzv-conf or the environment, since
    backups never store them.  What restore replaces is itself backed up.

    A backup of a corrupt or unsafe state keeps those exact bytes for
    forensics, but restore never writes bytes torch cannot load: it exits 6
    and writes nothing (`reset --mode clear` starts over instead).
    """
    saved = read_backup(Path(backup_file))
    backend_name, endpoint, run_id, conf, timeout = app.flags
    legacy_json = legacy.handles_backend(backend_name or saved.backend)  # torch's legacy etcd JSON
    _check_restorable(backup_file, saved.state, legacy_json)
    if endpoint is None and "***" in saved.endpoint:
        raise UsageError(f"the backup's endpoint {saved.endpoint} had a password, which backups never keep: "
                         "pass the real one with --rdzv-endpoint")
    merged = dict(saved.conf)
    merged.update(parse_conf(conf or ""))
    base = Address.from_env(backend_name or saved.backend, endpoint or saved.endpoint, run_id or saved.run_id,
                            None, timeout)
    address = Address(base.backend, base.endpoint, base.run_id, {**base.conf, **merged}, base.timeout)
    with open_backend(address) as backend:
        if legacy_json:
            result = legacy.restore(app, backend, saved, backup_file, yes, dry_run, backup_dir)
        else:
            snap = take_snapshot(backend)
            result = apply_change(app, backend, snap, saved.state, yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                                  command=f"restore {backup_file}",
                                  title=f"Restore of run {snap.run_id!r} from {backup_file} (saved {saved.time})")
        run_id = backend.run_id
    if output == "json":
        app.json(result or {"written": False, "run_id": run_id})


def _check_restorable(backup_file: str, state: Optional[bytes], legacy_json: bool) -> None:
    """Refuse, before touching the backend, a backup whose bytes torch could not load (on the legacy etcd
    backend: that is not torch's legacy JSON state)."""
    if state is None:
        return
    try:
        parse_legacy(state) if legacy_json else decode(state)
    except StateError as exc:
        if legacy_json:
            what, fresh = f"holds no usable legacy etcd state ({exc}): nothing was written", "reopen"
        else:
            what, fresh = (f"holds a {exc.kind} state ({exc}): rdzvctl never writes bytes torch cannot load, so "
                           "nothing was written"), "clear"
        raise type(exc)(f"{backup_file} {what}; the backup is kept for forensics (for a fresh start: "
                        f"rdzvctl reset --mode {fresh})") from None
