"""rdzvctl set: write a state or change fields, always fenced."""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import click

from rdzvctl import clock
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, output_option, with_app, write_options
from rdzvctl.cli.change import apply_change
from rdzvctl.errors import NoStateError, StateValidationError, TokenConflictError, UsageError
from rdzvctl.inspection import take_snapshot
from rdzvctl.state.analysis import edit_state
from rdzvctl.state.codec import encode
from rdzvctl.state.invariants import torch_invariant_violations
from rdzvctl.state.jsonform import JSONDocumentError, load_json_document, state_from_document
from rdzvctl.state.model import NodeDesc

MAX_INPUT_BYTES = 64 * 1024 * 1024


def read_document(source: str) -> Any:
    """Read a JSON document from a path or ``-``; errors are one line."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{source}: larger than {MAX_INPUT_BYTES} bytes; not a rendezvous state")
    try:
        return load_json_document(data)
    except JSONDocumentError as exc:
        if exc.too_deep:
            raise UsageError(f"{source}: the JSON nests too deeply to be a rendezvous state") from None
        raise UsageError(f"{source}: not valid JSON: {exc}") from None


@click.command("set")
@with_app
@click.option("-f", "--filename", "source", metavar="FILE",
              help="A JSON state, or the whole document `get -o json` prints ('-' for stdin).")
@click.option("--token", metavar="TOKEN", help="Write only over this token (as printed by get).")
@click.option("--create", is_flag=True, help="Write only if no state exists.")
@click.option("--closed/--no-closed", default=None, help="Close or reopen the rendezvous.")
@click.option("--complete/--no-complete", default=None, help="Mark the current round complete or not.")
@click.option("--round", "round_", type=click.IntRange(min=0), help="Set the round number.")
@click.option("--clear-deadline", is_flag=True, help="Remove the last-call deadline.")
@click.option("--remove-node", "remove_nodes", multiple=True, metavar="NODE",
              help="Remove a node (addr_pid_localid) with torch's bookkeeping; repeatable.")
@click.option("--add-waiting", "add_waiting", multiple=True, metavar="NODE",
              help="Add a node to the wait list with a fresh heartbeat (forces live agents to re-rendezvous).")
@click.option("--force", is_flag=True,
              help="With -f: write a state that breaks torch's invariants (refused otherwise, exit 2).")
@write_options
@output_option("text", "json")
def command(app: App, source: Optional[str], token: Optional[str], create: bool, closed: Optional[bool],
            complete: Optional[bool], round_: Optional[int], clear_deadline: bool, remove_nodes: Tuple[str, ...],
            add_waiting: Tuple[str, ...], force: bool, yes: bool, dry_run: bool, backup_dir: Optional[str],
            output: str) -> None:
    """Write a state given as JSON, or change fields in place; always fenced.

    A JSON state (-f) replaces the stored one: with --token only over that
    token, with --create only if none exists, otherwise over the token read
    just before.  Field changes read, edit and write with the token they read.
    On a conflict nothing is written and the exit code is 3.  A JSON state
    that breaks torch's invariants (a complete round's rank outside the
    world, a node both participating and waiting, a node without a
    heartbeat) is refused with exit 2, naming each, unless --force.

    \b
    Examples:
      rdzvctl get ... -o json > s.json; vi s.json; rdzvctl set ... -f s.json --token TOKEN
      rdzvctl set ... --no-closed
      rdzvctl set ... --remove-node node3_4711_0 --yes
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.refuse("set")
    edits = any(v is not None for v in (closed, complete, round_)) or clear_deadline or remove_nodes or add_waiting
    if source is None and not edits:
        raise click.UsageError("nothing to write: give -f FILE or a field change (see --help)")
    if source is not None and edits:
        raise click.UsageError("-f and field changes are exclusive: edit the file instead")
    if create and token:
        raise click.UsageError("--create and --token are exclusive")
    new_state = None
    if force and source is None:
        raise click.UsageError("--force only applies to -f")
    if source is not None:
        new_state = state_from_document(read_document(source))  # validate before touching the backend
        violations = torch_invariant_violations(new_state)
        if violations and not force:
            where = "the state on stdin" if source == "-" else source
            raise StateValidationError("", f"{where} breaks torch's invariants: {'; '.join(violations)}; "
                                           "nothing was written (--force writes it anyway)")
    nodes_out = [_node(n, "--remove-node") for n in remove_nodes]
    nodes_in = [_node(n, "--add-waiting") for n in add_waiting]

    with app.open() as backend:
        snap = take_snapshot(backend)
        if snap.error is not None and new_state is None:
            raise snap.error
        if create and snap.exists:
            raise TokenConflictError(f"run {snap.run_id!r} already has a state (token {snap.token_text}); "
                                     "--create wrote nothing", None)
        if token is not None and token != snap.token_text:
            current = "no state" if not snap.exists else f"the current token is {snap.token_text}"
            raise TokenConflictError(f"token {token} is not current for run {snap.run_id!r} ({current}); "
                                     "nothing was written")
        if new_state is None:
            if snap.state is None:
                raise NoStateError.for_run(snap.run_id, consequence="nothing to change")
            new_state = edit_state(snap.state, clock.now_utc(), remove=nodes_out, waiting=nodes_in, closed=closed,
                                   complete=complete, round_=round_, clear_deadline=clear_deadline,
                                   min_nodes=app.min_nodes)
        elif snap.state is not None:
            new_state.naive_datetimes = new_state.naive_datetimes or snap.state.naive_datetimes
        result = apply_change(app, backend, snap, encode(new_state), yes=yes, dry_run=dry_run,
                              backup_dir=backup_dir, command="set", title=f"Changes to run {snap.run_id!r}")
    if output == "json":
        app.json(result or {"written": False, "run_id": snap.run_id})


def _node(text: str, option: str) -> Any:
    try:
        return NodeDesc.parse(text)
    except ValueError as exc:
        raise StateValidationError(option, str(exc)) from None
