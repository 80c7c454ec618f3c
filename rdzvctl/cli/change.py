"""The write flow shared by set, edit, reset and restore.

Show the plan as a diff, stop there on ``--dry-run``, ask on a terminal
unless ``--yes``, write a durable backup of what is replaced, then write
fenced by the token that was read.  A conflict reports what changed meanwhile
and exits 3 with nothing written.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.backup import Backup, public_conf, write_backup
from rdzvctl.errors import StateError, TokenConflictError
from rdzvctl.fence import write_fenced
from rdzvctl.inspect import Snapshot, now_utc
from rdzvctl.state.analysis import diff_states
from rdzvctl.state.codec import decode
from rdzvctl.state.jsonform import format_time, state_to_json

__all__ = ["apply_change", "view_of"]


def view_of(raw: Optional[bytes]) -> Any:
    """What a plan shows for stored bytes: the JSON state, or the raw bytes if undecodable."""
    if raw is None:
        return None
    try:
        return state_to_json(decode(raw))
    except StateError as exc:
        return {"undecodable": str(exc), "bytes_base64": base64.b64encode(raw[:4096]).decode("ascii")}


def apply_change(
    app: Any,
    backend: RendezvousBackend,
    snap: Snapshot,
    new: Optional[bytes],
    *,
    yes: bool,
    dry_run: bool,
    backup_dir: Optional[str],
    command: str,
    title: str,
    notes: Sequence[str] = (),
) -> Optional[Dict[str, Any]]:
    """Run the write flow; returns a result document, or None when nothing was written.

    ``notes`` are shown with the plan (before the diff, also on ``--dry-run``)."""
    from rdzvctl.cli.render import render_plan

    if snap.error is not None and snap.token is None:
        # The value is there but unreadable and the backend gave no token: any
        # write would be blind (or refused as a conflict), so say why instead.
        raise type(snap.error)(f"{snap.error}; the {snap.backend} backend gives no token for it, so rdzvctl "
                               "cannot replace or remove it fenced: delete it with the backend's own tools")
    if new is not None:
        _check_writable(new)
    for note in notes:
        app.err(note)
    changed = render_plan(app, view_of(snap.raw), view_of(new), title)
    if not changed:
        return None
    if dry_run:
        app.err("Dry run: nothing was written.")
        return None
    app.confirm(f"Write this to run {snap.run_id!r} on {snap.backend} {snap.endpoint}?", yes)
    address = backend.address
    path = write_backup(
        # describe(), not the raw endpoint: a URL may hold a password, and backups never store secrets.
        Backup(address.backend, backend.describe(), snap.run_id, public_conf(dict(address.conf)), snap.token_text,
               format_time(now_utc()) or "", command, snap.raw),
        Path(backup_dir) if backup_dir else None,
    )
    app.err(f"Backup written: {path}")
    try:
        result = write_fenced(backend, snap.token, new)
    except TokenConflictError as exc:
        _report_conflict(app, snap, exc)
        raise
    token = None if result is None else backend.format_token(result[1])
    app.err("Written." + (f" New token: {token}" if token else " The state was removed."))
    return {"written": True, "run_id": snap.run_id, "token": token, "backup": str(path)}


def _check_writable(new: bytes) -> None:
    """Write only what our own decoder accepts: torch unpickles the stored bytes unchecked.

    Every state rdzvctl encodes passes; this stops ``restore`` from putting
    foreign bytes (a tampered or corrupt backup) where torch would load them.
    """
    try:
        decode(new)
    except StateError as exc:
        raise type(exc)(f"refusing to write bytes that are not a valid rendezvous state ({exc}); "
                        "nothing was written") from None


def _report_conflict(app: Any, snap: Snapshot, exc: TokenConflictError) -> None:
    current = exc.current
    try:
        now_state = None if current is None else decode(current[0])
    except StateError:
        app.err("Meanwhile the stored state became undecodable.")
        return
    events = diff_states(snap.state, now_state)
    if events:
        app.err("Changed meanwhile:")
        for event in events:
            app.err(f"  {event.message}")
    elif current is not None:
        app.err("Changed meanwhile: the state was rewritten (heartbeats or equal content).")
