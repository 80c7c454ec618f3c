"""rdzvctl list: the runs on a backend with their health."""

from __future__ import annotations

import click

from rdzvctl import clock
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
    now = clock.now_utc()
    rows = []
    with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
        for entry in with_progress(app, backend.list_runs()):
            raw = None if entry.state is None else entry.state[0]
            if raw is None and entry.error is None:
                continue  # e.g. c10d's "no state" sentinel
            report, state = check_run(entry.run_id, raw, entry.error, now, app.keep_alive, app.max_nodes)
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
            rows.append(row)
    if output == "json":
        app.json({"schema": "rdzvctl.list/v1", "backend": app.address.backend, "runs": rows})
        return

    def show(value: object) -> str:
        return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

    table = Table("", ["run id", "round", "complete", "participants", "waiting", "closed", "phase", "health"],
                  [[r["run_id"], *(show(r[k]) for k in ("round", "complete", "participants", "waiting", "closed",
                                                        "phase")), r["health"]] for r in rows])
    unreadable = [[r["run_id"], r["error"]] for r in rows if r["error"]]
    tables = [table] + ([Table("Unreadable runs", ["run id", "why"], unreadable)] if unreadable else [])
    render_tables(app, [], tables)
