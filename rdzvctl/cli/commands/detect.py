"""rdzvctl corrupt-detect: decode, check torch's invariants, say what torch does next; the launch gate."""

from __future__ import annotations

import datetime as _dt
from functools import partial
from typing import Any, Dict, Optional, Tuple

import click

from rdzvctl import clock, inspection
from rdzvctl.cli import legacy
from rdzvctl.cli.app import App, jobs_option, output_option, with_app
from rdzvctl.cli.detect_output import show_reports
from rdzvctl.cli.render import with_progress
from rdzvctl.errors import BackendUnavailableError, RdzvctlError, StateError
from rdzvctl.inspection import check_run
from rdzvctl.state.analysis import SEVERITIES, KeepAlive
from rdzvctl.state.lifecycle import launch_verdict
from rdzvctl.workers import Ready, default_jobs, ordered_map


@click.command("corrupt-detect")
@with_app
@output_option("text", "json")
@click.option("--all", "all_runs", is_flag=True, help="Check every run on the backend (where it can list runs).")
@click.option("--fail-on", type=click.Choice(list(SEVERITIES)), default="error", show_default=True,
              help="Exit 1 when a finding at or above this severity is found.")
@click.option("--for-launch", is_flag=True,
              help="The launch gate: exit 0 if a job started now with this run id rendezvous, 1 if not.")
@click.option("--settle", is_flag=True,
              help="A run closed while agents still heartbeat: re-read until a normal end can be told from a "
                   "close under live agents (at most one keep-alive window).")
@jobs_option
def command(app: App, output: str, all_runs: bool, fail_on: str, for_launch: bool, settle: bool, jobs: int) -> None:
    """Check a run (or --all runs): corruption, torch's invariants, and what torch does next.

    Checks that the state decodes (base64, pickle, allow-list) with the right
    types, that torch's invariants hold (ranks 0..n-1 when complete, every
    node has a heartbeat, no node both participating and waiting, complete
    implies participants), the run's phase (forming, complete, recovering,
    stuck, closing, finished, closed-under-live-agents) and the incidents:
    dead participants, a closed run, heartbeats from the future, more
    participants than max_nodes (--rdzv-conf max_nodes=N), and, where the
    backend lists the run's store keys, a published MASTER_ADDR:PORT of a
    dead node (probed with one bounded TCP connect).  Every finding says
    what torch does next (torch_next); a repair is given only when torch
    will not fix it itself.

    --for-launch answers "will a job started now with this run id
    rendezvous?": no when the run is closed, when agents of a running job
    still heartbeat, or when the store already holds keys of the round the
    new job forms (stale MASTER_ADDR, where the backend lists store keys).

    Exit codes: 0 clean (--for-launch: yes), 1 findings at or above
    --fail-on (--for-launch: no), 5 no state (not with --for-launch: no
    state is a yes unless stale keys), 6 a state is corrupt or unsafe.
    """
    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.detect(app, output, all_runs, fail_on, for_launch)
    if for_launch and all_runs:
        raise click.UsageError("--for-launch judges one run id: it cannot be combined with --all")
    now = clock.now_utc()
    verdict = None
    if all_runs:
        with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
            # Streamed: each run is checked and printed (JSON) as the backend yields it, in order,
            # the checks of a large fleet shared with worker processes (rdzvctl.workers).
            settings = _settings(app)  # parsed from --rdzv-conf once, not per run
            runs = ((e.run_id, e.state[0]) if e.error is None and e.state is not None and e.state[0] is not None
                    else Ready(check_run(e.run_id, None, e.error, now, *settings)[0])
                    for e in with_progress(app, backend.list_runs(), streamed=output == "json"))
            checked = ordered_map(partial(_report, now, *settings), runs, jobs or default_jobs(), _size)
            code = show_reports(app, (r for r in checked if r["status"] != "absent"), True, None, fail_on, output)
        if code:
            app.exit(code)
        return
    with app.open() as backend:
        report, state, keys = _check_one(app, backend, now)
        if settle and report.get("phase") == "closing":
            report, state = _settle(app, backend, now, keys)
        reports = [report]
        if for_launch and report["status"] not in ("corrupt", "unsafe"):
            ka = app.keep_alive
            verdict = launch_verdict(state, clock.now_utc(), ka.interval, ka.max_attempt, keys)
    if reports[0]["status"] == "absent" and verdict is None:
        from rdzvctl.errors import NoStateError

        raise NoStateError.for_run(backend.run_id, backend.describe())
    code = show_reports(app, reports, all_runs, verdict, fail_on, output)
    if code:
        app.exit(code)


def _check_one(app: App, backend: Any, now: Any) -> Tuple[Dict[str, Any], Any, Optional[Dict[str, bytes]]]:
    """Read one run and its store keys (where the backend lists them) and check it.

    A stuck verdict while agents are alive stands only if it lasts
    (``rdzvctl.inspection.CONFIRM_SECONDS``): stuck means nothing changes.
    """
    keys = None
    try:
        keys = inspection.read_store_keys(backend)
    except BackendUnavailableError:
        raise  # the state cannot be read either: one line, exit 4, not a note first
    except RdzvctlError as exc:
        app.err(f"note: the run's store keys could not be read ({exc}); MASTER_ADDR not checked")
    report, state = inspection.reread_while(lambda: _read_one(app, backend, clock.now_utc(), keys),
                                         lambda checked: inspection.stays(checked[0]), inspection.CONFIRM_SECONDS,
                                         first=_read_one(app, backend, now, keys))
    return report, state, keys


def _report(now: _dt.datetime, keep_alive: KeepAlive, max_nodes: Optional[int], run: Tuple[str, bytes]) -> Dict[str, Any]:
    """The report of one listed run (``run_id``, stored bytes): what a worker process computes."""
    return check_run(run[0], run[1], None, now, keep_alive, max_nodes)[0]


def _size(run: Tuple[str, bytes]) -> int:
    return len(run[1])


def _settings(app: App) -> Tuple[KeepAlive, Optional[int]]:
    """The --rdzv-conf settings a check uses: torch's keep-alive and max_nodes."""
    return app.keep_alive, app.max_nodes


def _read_one(app: App, backend: Any, now: Any, keys: Any, closed_since: Any = None) -> Tuple[Dict[str, Any], Any]:
    try:
        current = backend.get_state()
    except StateError as exc:
        return check_run(backend.run_id, None, exc, now, *_settings(app))[0], None
    return check_run(backend.run_id, None if current is None else current[0], None, now, *_settings(app), keys,
                     closed_since)


def _settle(app: App, backend: Any, first_seen: Any, keys: Any) -> Tuple[Dict[str, Any], Any]:
    """Re-read a closed run until the phase is decided (finished or closed-under-live-agents), bounded."""
    ka = app.keep_alive
    return inspection.reread_while(
        lambda: _read_one(app, backend, clock.now_utc(), keys, closed_since=first_seen),
        lambda checked: checked[0].get("phase") == "closing",
        ka.expiry.total_seconds() + ka.interval + 1.0, pause=min(1.0, ka.interval))
