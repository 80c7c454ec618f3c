"""rdzvctl list: the runs on a backend with their health."""

from __future__ import annotations

from typing import Any, Dict, Iterator

import click

from rdzvctl import clock
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.cli.render import Table, render_tables, with_progress
from rdzvctl.inspection import check_run


@click.command("list")
@with_app
@output_option("text", "json")
def command(app: App, output: str) -> None:
    """List the runs on a backend: round, complete, participants, waiting, closed, phase, health.

    Phase is what torch is doing with the run (forming, complete, recovering,
    stuck, closing, finished, closed-under-live-agents); health is the worst
    finding of corrupt-detect: ok, info, warning, error, corrupt or unsafe; a
    run that cannot be read is listed with why.  Runs are sorted by run id on
    every backend.  Needs a backend that can list runs (not every c10d store
    can).
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.list_runs(app, output)
    now = clock.now_utc()
    with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
        # One run at a time, as the backend yields them (sorted): -o json is streamed.
        rows = _rows(app, backend, now, output == "json")
        if output == "json":
            app.json_stream({"schema": "rdzvctl.list/v1", "backend": app.address.backend}, "runs", rows, dict)
            return

        def show(value: object) -> str:
            return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

        cells, unreadable = [], []
        for r in rows:
            cells.append([r["run_id"], *(show(r[k]) for k in ("round", "complete", "participants", "waiting",
                                                               "closed", "phase")), r["health"]])
            if r["error"]:
                unreadable.append([r["run_id"], r["error"]])
    table = Table("", ["run id", "round", "complete", "participants", "waiting", "closed", "phase", "health"], cells)
    tables = [table] + ([Table("Unreadable runs", ["run id", "why"], unreadable)] if unreadable else [])
    render_tables(app, [], tables)


def _rows(app: App, backend: Any, now: Any, streamed: bool) -> Iterator[Dict[str, Any]]:
    """The listing's row of each run the backend lists (not c10d's "no state" sentinel)."""
    keep_alive, max_nodes = app.keep_alive, app.max_nodes  # parsed from --rdzv-conf once, not per run
    for entry in with_progress(app, backend.list_runs(), streamed=streamed):
        raw = None if entry.state is None else entry.state[0]
        if raw is None and entry.error is None:
            continue  # e.g. c10d's "no state" sentinel
        report, state = check_run(entry.run_id, raw, entry.error, now, keep_alive, max_nodes)
        row = {"run_id": entry.run_id, "health": report["status"], "phase": report["phase"],
               "round": None, "complete": None,
               "participants": None, "waiting": None, "closed": None,
               "token": None if entry.state is None else backend.format_token(entry.state[1]),
               "error": None}
        if state is not None:
            row.update(round=state.round, complete=state.complete, participants=len(state.participants),
                       waiting=len(state.wait_list), closed=state.closed)
        elif report.get("problems"):
            row["error"] = report["problems"][0]["message"]
        yield row
