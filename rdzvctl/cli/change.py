"""The write flow shared by set, edit, reset and restore.

Show the plan as a diff, stop there on ``--dry-run``, check the backup
directory, ask on a terminal unless ``--yes`` (off a terminal, refuse without
it), write a durable backup of what is replaced, then write fenced by the
token that was read.  A conflict reports what changed meanwhile and exits 3
with nothing written; 'no' at the prompt writes nothing and exits 0.

Each step is recorded in ``app.progress`` so that Ctrl-C reports truthfully
what was written (:func:`interrupted_message`).
"""

from __future__ import annotations

import base64
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, TypeVar

from rdzvctl import clock
from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.backup import Backup, backup_directory, public_conf, write_backup
from rdzvctl.cli.render import render_plan
from rdzvctl.errors import StateError, TokenConflictError
from rdzvctl.fence import write_fenced
from rdzvctl.inspection import Snapshot
from rdzvctl.state.analysis import diff_states, group_events
from rdzvctl.state.codec import check_writable, decode
from rdzvctl.state.jsonform import format_time, state_to_json

if TYPE_CHECKING:  # the App only types arguments here
    from rdzvctl.cli.app import App

__all__ = ["apply_change", "view_of", "interrupted_message"]


def view_of(raw: Optional[bytes]) -> Any:
    """What a plan shows for stored bytes: the JSON state, or the raw bytes if undecodable."""
    if raw is None:
        return None
    try:
        return state_to_json(decode(raw))
    except StateError as exc:
        return {"undecodable": str(exc), "bytes_base64": base64.b64encode(raw[:4096]).decode("ascii")}


def apply_change(
    app: "App",
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
    fmt: Any = None,
) -> Optional[Dict[str, Any]]:
    """Run the write flow; returns a result document, or None when nothing was written.

    ``notes`` are shown with the plan (before the diff, also on ``--dry-run``).  ``fmt`` replaces the
    pickled state's hooks for another stored format (``view``, ``check``, ``write``, ``report_conflict``;
    e.g. :class:`rdzvctl.cli.legacy.LegacyWrites`)."""
    if snap.error is not None and snap.token is None:
        # The value is there but unreadable and the backend gave no token: any
        # write would be blind (or refused as a conflict), so say why instead.
        raise type(snap.error)(f"{snap.error}; the {snap.backend} backend gives no token for it, so rdzvctl "
                               "cannot replace or remove it fenced: delete it with the backend's own tools")
    view = view_of if fmt is None else fmt.view
    if new is not None:
        (_check_writable if fmt is None else fmt.check)(new)
    for note in notes:
        app.err(note)
    changed = render_plan(app, view(snap.raw), view(new), title)
    if not changed:
        return None
    if dry_run:
        app.err("Dry run: nothing was written.")
        return None
    directory = backup_directory(Path(backup_dir) if backup_dir else None)  # unsafe: refuse before asking
    if not app.confirm(f"Write this to run {snap.run_id!r} on {snap.backend} {snap.endpoint}?", yes):
        app.err("Declined: nothing was written.")
        return None
    path = _save_backup(app, backend, snap, command, directory)
    if snap.raw is not None:
        app.err(_restore_hint(path, snap, decoded=fmt is not None and snap.error is None))
    progress = app.progress
    progress["writing"] = True
    try:
        result = write_fenced(backend, snap.token, new) if fmt is None else fmt.write(backend, snap.token, new)
    except TokenConflictError as exc:
        progress["writing"] = False  # a lost fenced write wrote nothing
        (_report_conflict if fmt is None else fmt.report_conflict)(app, snap, exc)
        raise
    progress.update(writing=False, written=True)
    token = None if result is None else backend.format_token(result[1])
    app.err("Written." + (f" New token: {token}" if token else " The state was removed."))
    return {"written": True, "run_id": snap.run_id, "token": token, "backup": str(path)}


T = TypeVar("T")


def retry_conflicts(app: "App", retries: int, attempt: Callable[[bool], T], yes: bool) -> T:
    """``attempt(yes)``, a read-plan-write; after a token conflict it runs again on the fresh state, up to
    ``retries`` more times, confirmed (the operation, not the bytes, was confirmed; each attempt backs up
    what it replaces).  The last conflict is raised."""
    for done in range(retries):
        try:
            return attempt(yes)
        except TokenConflictError:
            app.err(f"Conflict: retrying on the fresh state ({done + 1}/{retries}).")
            yes = True  # the operation, not the bytes, was confirmed
    return attempt(yes)


def _save_backup(app: "App", backend: RendezvousBackend, snap: Snapshot, command: str, directory: Path) -> Path:
    """Back up what the write replaces; from here on an interruption names the backup."""
    address = backend.address
    path = write_backup(
        # describe(), not the raw endpoint: a URL may hold a password, and backups never store secrets.
        Backup(address.backend, backend.describe(), snap.run_id, public_conf(dict(address.conf)), snap.token_text,
               format_time(clock.now_utc()) or "", command, snap.raw),
        directory,
    )
    app.progress.update(backup=str(path), run_id=snap.run_id)
    app.err(f"Backup written: {path}")
    return path


def interrupted_message(progress: Dict[str, Any]) -> str:
    """What Ctrl-C reports for a command that writes, true to how far the write flow got."""
    backup, run_id = progress.get("backup"), progress.get("run_id")
    restore = f"`rdzvctl restore {shlex.quote(str(backup))}` puts back what was there"
    if progress.get("writing"):
        return (f"Interrupted during the write: run {run_id!r} may have been changed; check with `rdzvctl get` "
                f"(same address flags); {restore}.")
    if progress.get("written"):
        return f"Interrupted after the write: run {run_id!r} was changed; {restore}."
    if backup:
        return f"Interrupted before the write: the backend was not changed (a backup was already saved: {backup})."
    return "Interrupted: nothing was written."


def _restore_hint(path: Path, snap: Snapshot, decoded: bool = False) -> str:
    """What the backup is good for: ``restore`` for a usable state, forensics for bytes torch cannot load."""
    if snap.error is not None or (snap.state is None and not decoded):
        return ("It keeps the undecodable bytes for forensics; restore will not write bytes torch cannot load "
                "back.")
    return f"To undo: rdzvctl restore {path}"


def _check_writable(new: bytes) -> None:
    """Write only what torch's agents can load and use: they unpickle the stored bytes unchecked.

    Every state rdzvctl encodes passes; this stops ``restore`` from putting
    foreign bytes (a tampered or corrupt backup, a state only older torch
    wrote) where torch would load them.
    """
    try:
        check_writable(new)
    except StateError as exc:
        raise type(exc)(f"refusing to write bytes that are not a valid rendezvous state ({exc}); "
                        "nothing was written") from None


def _report_conflict(app: "App", snap: Snapshot, exc: TokenConflictError) -> None:
    current = exc.current
    try:
        now_state = None if current is None else decode(current[0])
    except StateError:
        app.err("Meanwhile the stored state became undecodable.")
        return

    events = group_events(diff_states(snap.state, now_state))
    if events:
        app.err("Changed meanwhile:")
        for _, message, _ in events:
            app.err(f"  {message}")
    elif current is not None:
        app.err("Changed meanwhile: the state was rewritten (heartbeats or equal content).")
