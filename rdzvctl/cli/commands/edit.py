"""rdzvctl edit: the state in $EDITOR, written back fenced (like kubectl edit)."""

from __future__ import annotations

import json
from typing import Optional

import click

from rdzvctl.cli.app import App, with_app, write_options
from rdzvctl.errors import NoStateError, UsageError

HEADER = (
    "# Edit the rendezvous state of run {run_id!r} ({backend} {endpoint}), token {token}.\n"
    "# Lines starting with '#' are ignored. An unchanged file writes nothing.\n"
    "# Node ids are addr_pid_localid; datetimes ISO-8601 UTC. The write is fenced by the token above.\n"
)


@click.command("edit")
@with_app
@write_options
def command(app: App, yes: bool, dry_run: bool, backup_dir: Optional[str]) -> None:
    """Open the state as JSON in $EDITOR and write it back, fenced by its token.

    If someone else writes the state while you edit, nothing is written and
    the exit code is 3: run edit again on the fresh state.
    """
    from rdzvctl.cli.change import apply_change
    from rdzvctl.inspect import take_snapshot
    from rdzvctl.state.codec import encode
    from rdzvctl.state.jsonform import state_from_json, state_to_json

    with app.open() as backend:
        snap = take_snapshot(backend)
        if snap.error is not None:
            raise snap.error
        if snap.state is None:
            raise NoStateError(f"no rendezvous state for run {snap.run_id!r}: nothing to edit "
                               "(use `rdzvctl set --create -f FILE` to create one)")
        if not dry_run:
            app.require_consent_possible(yes)  # before the editor: an edit nobody can confirm would be lost
        original = json.dumps(state_to_json(snap.state), indent=2) + "\n"
        text = HEADER.format(run_id=snap.run_id, backend=snap.backend, endpoint=snap.endpoint,
                             token=snap.token_text) + original
        try:
            edited = click.edit(text, extension=".json", require_save=True)
        except click.ClickException as exc:  # the editor is missing or exited non-zero
            raise UsageError(f"{exc.format_message()} ($EDITOR / $VISUAL); nothing was written") from None
        if edited is None:
            app.err("Edit cancelled: nothing was written.")
            return
        body = "\n".join(line for line in edited.splitlines() if not line.lstrip().startswith("#"))
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise UsageError(f"the edited text is not valid JSON: {exc}; nothing was written") from None
        except RecursionError:
            raise UsageError("the edited JSON nests too deeply; nothing was written") from None
        new_state = state_from_json(doc)
        if state_to_json(new_state) == state_to_json(snap.state):
            app.err("No changes: nothing was written.")
            return
        apply_change(app, backend, snap, encode(new_state), yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                     command="edit", title=f"Changes to run {snap.run_id!r}")
