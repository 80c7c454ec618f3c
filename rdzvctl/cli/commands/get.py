"""rdzvctl get: the decoded state of a run, explained."""

from __future__ import annotations

import click

from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.errors import EXIT_CORRUPT, EXIT_NO_STATE, NoStateError, UnsupportedOperationError


@click.command("get")
@with_app
@output_option("text", "json", "raw")
@click.option("--all-nodes", is_flag=True, help="Show every node even in large states (default: summarise).")
@click.option("--keys", "show_keys", is_flag=True, help="Also show the run's per-round store keys (e.g. MASTER_ADDR).")
def command(app: App, output: str, all_nodes: bool, show_keys: bool) -> None:
    """Show the decoded state of a run: round, nodes with rank and liveness, problems.

    \b
    Examples:
      rdzvctl get --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job42
      rdzvctl get ... -o json | jq '.nodes[] | select(.alive == false)'
      rdzvctl get ... -o raw > state.pickle
    """
    from rdzvctl.cli import legacy

    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.get(app, output, all_nodes, show_keys)
    from rdzvctl.inspect import describe, take_snapshot

    with app.open() as backend:
        snap = take_snapshot(backend)
        if output == "raw":
            if snap.raw is None:
                if snap.error is not None:
                    raise snap.error
                raise NoStateError(f"no rendezvous state for run {snap.run_id!r} on {snap.backend} {snap.endpoint}")
            app.raw(snap.raw)
            return
        keys = None
        if show_keys and snap.state is not None:
            try:
                keys = {k: _printable(v) for k, v in backend.store_keys().items()}
            except UnsupportedOperationError as exc:
                app.err(f"note: {exc}")
    if not snap.exists:
        raise NoStateError(f"no rendezvous state for run {snap.run_id!r} on {snap.backend} {snap.endpoint}")
    doc = describe(snap, app.keep_alive, app.max_nodes, keys)
    if output == "json":
        app.json(doc)
    else:
        from rdzvctl.cli.render import render_get

        render_get(app, doc, all_nodes)
    if snap.error is not None:
        app.exit(EXIT_CORRUPT)
    if not snap.exists:
        app.exit(EXIT_NO_STATE)


def _printable(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
