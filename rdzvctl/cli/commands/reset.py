"""rdzvctl reset: clear, reopen or prune a run — planned, fenced, backed up."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click

from rdzvctl import clock
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, output_option, with_app, write_options
from rdzvctl.cli.change import apply_change, retry_conflicts
from rdzvctl.errors import NoStateError
from rdzvctl.inspection import take_snapshot
from rdzvctl.round_keys import check_reopen, plan_clear
from rdzvctl.state.analysis import prune_dead_nodes, reopen
from rdzvctl.state.codec import encode

#: How many dead nodes the prune plan names (the diff or its summary has the rest).
PRUNE_NAMED = 5


@click.command("reset")
@with_app
@click.option("--mode", type=click.Choice(["clear", "reopen", "prune"]), required=True,
              help="clear: start the run afresh (a fresh state past every round with store keys, or the "
                   "state removed if the store has none); reopen: closed -> false; "
                   "prune: drop dead nodes with torch's own bookkeeping.")
@click.option("--retry", type=click.IntRange(min=0), default=0, show_default=True,
              help="On a conflict, re-read and re-apply reopen/prune up to N times (each attempt backed up).")
@write_options
@output_option("text", "json")
def command(app: App, mode: str, retry: int, yes: bool, dry_run: bool, backup_dir: Optional[str],
            output: str) -> None:
    """Repair a run. Shows the plan as a diff, asks unless --yes, backs up, writes fenced.

    \b
    clear   a finished job closed the run id, or the state is corrupt: start over
    reopen  RendezvousClosedError for new agents: mark the rendezvous open again
    prune   dead nodes keep a round full or stuck: remove them as torch would

    Round keys: torch keeps each round's MASTER_ADDR/MASTER_PORT and agent keys
    in the store under torch.rendezvous.<id>.<round>/ and never deletes them.
    clear leaves them and writes a fresh, empty state at a round past all of
    them (no keys: it removes the state), so the next job never reads an old
    job's keys; with no state left but old keys, it writes that fresh state.
    reopen refuses if the round new agents would use already has keys.

    Liveness uses --rdzv-conf keep_alive_interval and keep_alive_max_attempt
    (torch's defaults 5 s x 3); min_nodes=N lets prune clear the deadline like torch.
    The backup path is printed; `rdzvctl restore PATH` puts a decodable state
    back (the bytes of a corrupt one are kept there for forensics only).
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.reset(app, mode, yes, dry_run, backup_dir, output, retry)
    with app.open() as backend:
        retry_conflicts(app, retry if mode != "clear" else 0,
                        lambda confirmed: _reset_once(app, backend, mode, confirmed, dry_run, backup_dir, output), yes)


def _reset_once(app: App, backend: Any, mode: str, yes: bool, dry_run: bool, backup_dir: Optional[str],
                output: str) -> None:
    """Read, plan and write one reset (a conflict raises :class:`TokenConflictError`)."""
    snap = take_snapshot(backend)
    plan = plan_clear(backend, snap) if mode == "clear" else None
    if not snap.exists and plan is None:
        raise NoStateError.for_run(snap.run_id, consequence="nothing to reset")
    extra: Dict[str, Any] = {}
    notes = []
    if plan is not None:
        notes = plan.notes
        new = plan.new
        extra = plan.to_json()
    else:
        if snap.error is not None:
            raise snap.error  # only clear can repair an undecodable state
        assert snap.state is not None
        if mode == "reopen":
            if not snap.state.closed:
                app.err(f"Run {snap.run_id!r} is not closed: nothing to do.")
                return
            notes = [check_reopen(backend, snap.state)]
            new_state = reopen(snap.state)
        else:
            new_state, removed = prune_dead_nodes(snap.state, clock.now_utc(), app.keep_alive, app.min_nodes)
            if not removed:
                app.err(f"Run {snap.run_id!r} has no dead nodes: nothing to prune.")
                return
            shown = ", ".join(map(str, removed[:PRUNE_NAMED]))
            more = f" and {len(removed) - PRUNE_NAMED} more" if len(removed) > PRUNE_NAMED else ""
            app.err(f"{len(removed)} dead node(s) to prune: {shown}{more}")
        new = encode(new_state)
    result = apply_change(app, backend, snap, new, yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                          command=f"reset --mode {mode}", title=f"Reset ({mode}) of run {snap.run_id!r}",
                          notes=notes)
    if output == "json":
        app.json({**(result or {"written": False, "run_id": snap.run_id}), **extra})
