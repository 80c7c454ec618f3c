"""rdzvctl edit: the state in $EDITOR, written back fenced (like kubectl edit)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from typing import Any, Optional

import click

from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, with_app, write_options
from rdzvctl.cli.change import apply_change
from rdzvctl.errors import NoStateError, StateValidationError, UsageError
from rdzvctl.inspection import take_snapshot
from rdzvctl.state.codec import encode
from rdzvctl.state.jsonform import JSONDocumentError, load_json_document, state_from_json, state_to_json

HEADER = (
    "# Edit the rendezvous state of run {run_id!r} ({backend} {endpoint}), token {token}.\n"
    "# Lines starting with '#' are ignored. An unchanged file writes nothing.\n"
    "# Node ids are addr_pid_localid; datetimes ISO-8601 UTC. The write is fenced by the token above.\n"
)

ERROR_HEADER = (
    "# rdzvctl could not use this edit, so nothing was written:\n"
    "{error}"
    "# Fix it and save to try again. To stop, save it unchanged or quit without saving\n"
    "# (the edit is then kept in a file), or empty the file to discard it.\n"
    "#\n"
)

#: The editor is reopened at most this many times on an invalid edit.
MAX_ROUNDS = 10
#: The largest edited file read back (a state's JSON is far smaller).
MAX_EDIT_BYTES = 64 * 1024 * 1024


@click.command("edit")
@with_app
@write_options
def command(app: App, yes: bool, dry_run: bool, backup_dir: Optional[str]) -> None:
    """Open the state as JSON in $EDITOR and write it back, fenced by its token.

    An edit that is not valid JSON or not a valid state reopens the editor
    with the error at the top (like kubectl edit); saving it unchanged stops
    and keeps the edit in a file whose path is printed.  If someone else
    writes the state while you edit, nothing is written and the exit code is
    3: run edit again on the fresh state.
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.refuse("edit")
    with app.open() as backend:
        snap = take_snapshot(backend)
        if snap.error is not None:
            raise snap.error
        if snap.state is None:
            raise NoStateError.for_run(
                snap.run_id, consequence="nothing to edit (use `rdzvctl set --create -f FILE` to create one)")
        if not dry_run:
            app.require_consent_possible(yes)  # before the editor: an edit nobody can confirm would be lost
        header = HEADER.format(run_id=snap.run_id, backend=snap.backend, endpoint=snap.endpoint,
                               token=snap.token_text)
        new_state = _edit_until_valid(app, header, json.dumps(state_to_json(snap.state), indent=2) + "\n",
                                      snap.token_text or "")
        if new_state is None:
            return
        if state_to_json(new_state) == state_to_json(snap.state):
            app.err("No changes: nothing was written.")
            return
        apply_change(app, backend, snap, encode(new_state), yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                     command="edit", title=f"Changes to run {snap.run_id!r}")


def _edit_until_valid(app: App, header: str, body: str, token: str) -> Any:
    """The state the user saved, reopening the editor on an invalid one; None when cancelled."""
    presented = header + body
    error: Optional[UsageError] = None
    for _ in range(MAX_ROUNDS):
        edited = _run_editor(presented)
        if edited is None:  # quit without saving
            if error is None:
                app.err("Edit cancelled: nothing was written.")
                return None
            raise _kept(error, body, token)
        previous, body = body, "".join(
            line for line in edited.splitlines(keepends=True) if not line.lstrip().startswith("#"))
        if error is not None and (edited == presented or body == previous):  # saved unchanged: stop
            raise _kept(error, body, token)
        if not body.strip():
            app.err("Edit cancelled (empty file): nothing was written.")
            return None
        try:
            return _parse(body)
        except UsageError as exc:
            error = exc
            lines = "".join(f"#   {line}\n" for line in str(exc).splitlines() or [""])
            presented = ERROR_HEADER.format(error=lines) + header + (body if body.endswith("\n") else body + "\n")
    assert error is not None
    raise _kept(error, body, token)


def _run_editor(text: str) -> Optional[str]:
    """``text`` edited in $VISUAL / $EDITOR (click's choice and command-line split); None when the
    editor exits without saving.  Every failure of this step (no such editor, an unbalanced quote
    in $EDITOR, a non-zero exit, the file deleted or replaced by something other than a regular
    file, bytes that are not UTF-8, over :data:`MAX_EDIT_BYTES`) is one :class:`UsageError`."""
    fd, path = tempfile.mkstemp(prefix="rdzvctl-edit-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        # mtime 2 s back, as click does, so a save is seen on a coarse-grained filesystem.
        before = os.stat(path)
        os.utime(path, (before.st_atime, before.st_mtime - 2))
        saved_at = os.stat(path).st_mtime_ns
        try:
            click.edit(filename=path)
        except click.ClickException as exc:  # the editor is missing or exited non-zero
            raise UsageError(f"{exc.format_message()} ($EDITOR / $VISUAL); nothing was written") from None
        except ValueError as exc:  # shlex: e.g. an unbalanced quote
            raise UsageError(f"cannot run the editor: $EDITOR / $VISUAL does not parse ({exc}); "
                             "nothing was written") from None
        return _read_edited(path, saved_at)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _read_edited(path: str, saved_at: int) -> Optional[str]:
    """The edited file's text, or None if unsaved; opened without following a link or blocking on
    a FIFO, and read only if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot open the edited file ({exc.strerror}): the editor removed or replaced it; "
                         "nothing was written") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UsageError("the editor replaced the edited file with something other than a regular file; "
                             "nothing was written")
        if info.st_mtime_ns == saved_at:
            return None
        data = handle.read(MAX_EDIT_BYTES + 1)
    if len(data) > MAX_EDIT_BYTES:
        raise UsageError(f"the edited file is over {MAX_EDIT_BYTES >> 20} MiB; nothing was written")
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise UsageError("the edited file is not UTF-8 text; nothing was written") from None


def _parse(body: str) -> Any:
    try:
        doc = load_json_document(body)
    except JSONDocumentError as exc:
        if exc.too_deep:
            raise UsageError("the edited JSON nests too deeply") from None
        raise UsageError(f"the edited text is not valid JSON: {exc}") from None
    return state_from_json(doc)


def _kept(error: UsageError, body: str, token: str) -> UsageError:
    """``error``, saying nothing was written and where the user's last edit is kept."""
    fd, path = tempfile.mkstemp(prefix="rdzvctl-edit-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        out.write(body)
    tail = (f"; nothing was written; your edit is kept in {path} "
            f"(fix it, then `rdzvctl set ... -f {path} --token {token}`)")
    if isinstance(error, StateValidationError):
        return StateValidationError(error.field, error.reason + tail)
    return UsageError(str(error) + tail)
