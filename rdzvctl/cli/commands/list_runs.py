"""rdzvctl list: the runs on a backend with their health."""

from __future__ import annotations

import datetime as _dt
from functools import partial
from typing import Any, Dict, Iterator, Optional, Tuple

import click

from rdzvctl import clock
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, jobs_option, output_option, with_app
from rdzvctl.cli.render import Table, render_tables, with_progress
from rdzvctl.inspection import check_run
from rdzvctl.state.analysis import KeepAlive
from rdzvctl.workers import Ready, default_jobs, ordered_map


@click.command("list")
@with_app
@output_option("text", "json")
@jobs_option
def command(app: App, output: str, jobs: int) -> None:
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
        rows = _rows(app, backend, now, output == "json", jobs or default_jobs())
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


def _rows(app: App, backend: Any, now: Any, streamed: bool, jobs: int) -> Iterator[Dict[str, Any]]:
    """The listing's row of each run the backend lists (not c10d's "no state" sentinel), in order;
    the checks of a large fleet are shared with worker processes (rdzvctl.workers)."""
    row = partial(_row, now, app.keep_alive, app.max_nodes)  # parsed from --rdzv-conf once, not per run

    def runs() -> Iterator[Any]:
        for entry in with_progress(app, backend.list_runs(), streamed=streamed):
            raw = None if entry.state is None else entry.state[0]
            if raw is None and entry.error is None:
                continue  # e.g. c10d's "no state" sentinel
            token = None if entry.state is None else backend.format_token(entry.state[1])
            if entry.error is not None:  # worked out here: an exception need not cross to a worker
                yield Ready(row((entry.run_id, raw, token, entry.error)))
            else:
                yield entry.run_id, raw, token, None

    return ordered_map(row, runs(), jobs, lambda run: len(run[1]))


def _row(now: _dt.datetime, keep_alive: KeepAlive, max_nodes: Optional[int],
         run: Tuple[str, Optional[bytes], Optional[str], Optional[BaseException]]) -> Dict[str, Any]:
    """One run's row (``run_id``, stored bytes, token text, why it could not be read): what a worker computes."""
    run_id, raw, token, error = run
    report, state = check_run(run_id, raw, error, now, keep_alive, max_nodes)
    row = {"run_id": run_id, "health": report["status"], "phase": report["phase"],
           "round": None, "complete": None,
           "participants": None, "waiting": None, "closed": None,
           "token": token,
           "error": None}
    if state is not None:
        row.update(round=state.round, complete=state.complete, participants=len(state.participants),
                   waiting=len(state.wait_list), closed=state.closed)
    elif report.get("problems"):
        row["error"] = report["problems"][0]["message"]
    return row
