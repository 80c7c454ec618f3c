"""rdzvctl get: the decoded state of a run, explained."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import click

from rdzvctl import inspection
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.cli.render import render_get
from rdzvctl.errors import EXIT_CORRUPT, EXIT_NO_STATE, NoStateError, UnsupportedOperationError
from rdzvctl.inspection import describe, read_store_keys, reread_while, stays, take_snapshot


@click.command("get")
@with_app
@output_option("text", "json", "raw")
@click.option("--all-nodes", is_flag=True, help="Show every node even in large states (default: summarise).")
@click.option("--keys", "show_keys", is_flag=True, help="Also show the run's per-round store keys (e.g. MASTER_ADDR).")
def command(app: App, output: str, all_nodes: bool, show_keys: bool) -> None:
    """Show the decoded state of a run: phase, round, nodes with rank and liveness, problems.

    The phase says what torch does next (forming, complete, recovering,
    stuck, closing, finished, closed-under-live-agents).  With --keys the
    round's published MASTER_ADDR:PORT is also probed (one bounded TCP
    connect) and a dead rank-0 address is a finding.

    \b
    Examples:
      rdzvctl get --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job42
      rdzvctl get ... -o json | jq '.nodes[] | select(.alive == false)'
      rdzvctl get ... -o raw > state.pickle
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.get(app, output, all_nodes, show_keys)
    with app.open() as backend:
        snap = take_snapshot(backend)
        if output == "raw":
            if snap.raw is None:
                if snap.error is not None:
                    raise snap.error
                raise NoStateError.for_run(snap.run_id, f"{snap.backend} {snap.endpoint}")
            app.raw(snap.raw)
            return
        keys = None
        if show_keys and snap.state is not None:
            try:
                keys = read_store_keys(backend)
            except UnsupportedOperationError as exc:
                app.err(f"note: {exc}")
            if keys is None and "store_keys" not in backend.capabilities:
                app.err(f"note: the {backend.name} backend has no per-round store keys")
        if not snap.exists:
            raise NoStateError.for_run(snap.run_id, f"{snap.backend} {snap.endpoint}")
        # A stuck verdict while agents live stands only if it lasts (see rdzvctl.inspection.CONFIRM_SECONDS).
        table = output != "json"  # the table shows no heartbeat times: describe() skips them
        snap, doc = reread_while(lambda: _described(app, take_snapshot(backend), keys, table),
                                 lambda pair: stays(pair[1]), inspection.CONFIRM_SECONDS,
                                 first=_described(app, snap, keys, table))
    if output == "json":
        app.json(doc)
    else:
        render_get(app, doc, all_nodes)
    if snap.error is not None:
        app.exit(EXIT_CORRUPT)
    if not snap.exists:  # removed while a stuck verdict was re-checked
        app.exit(EXIT_NO_STATE)


def _described(app: App, snap: Any, keys: Any, table: bool) -> Tuple[Any, Dict[str, Any]]:
    return snap, describe(snap, app.keep_alive, app.max_nodes, keys, heartbeats=not table)
