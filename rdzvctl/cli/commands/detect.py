"""rdzvctl corrupt-detect: decode, type-check and check torch's invariants."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import click

from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.errors import EXIT_CORRUPT, EXIT_OK, EXIT_PROBLEMS, StateError
from rdzvctl.state.analysis import SEVERITIES


def check_raw(run_id: str, raw: Optional[bytes], error: Optional[BaseException], app: App,
              now: Any) -> Tuple[Dict[str, Any], Any]:
    """One run's report (status ok/info/warning/error/corrupt/unsafe/absent, findings) and its state."""
    from rdzvctl.inspect import problem_for_error
    from rdzvctl.state.analysis import find_problems
    from rdzvctl.state.codec import decode

    state = None
    if error is None and raw is not None:
        try:
            state = decode(raw)
        except StateError as exc:
            error = exc
    if error is not None:
        kind = getattr(error, "kind", "corrupt")
        err = error if isinstance(error, StateError) else StateError(str(error))
        return {"run_id": run_id, "status": kind, "problems": [problem_for_error(err)]}, None
    if raw is None:
        return {"run_id": run_id, "status": "absent", "problems": []}, None
    findings = find_problems(state, now, app.keep_alive, max_nodes=app.max_nodes, run_id=run_id)
    return {
        "run_id": run_id,
        "status": "ok" if not findings else max((f.severity for f in findings), key=SEVERITIES.index),
        "round": state.round,
        "problems": [{"code": f.code, "severity": f.severity, "message": f.message, "repair": f.repair,
                      "nodes": list(f.nodes)} for f in findings],
    }, state


def exit_code(reports: List[Dict[str, Any]], fail_on: str) -> int:
    if any(r["status"] in ("corrupt", "unsafe") for r in reports):
        return EXIT_CORRUPT
    threshold = SEVERITIES.index(fail_on)
    if any(SEVERITIES.index(p["severity"]) >= threshold for r in reports for p in r["problems"]):
        return EXIT_PROBLEMS
    return EXIT_OK


def _progress(app: App, entries: Iterator[Any]) -> Iterator[Any]:
    """A progress display on stderr, only on a terminal."""
    import sys

    if not sys.stderr.isatty():
        yield from entries
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    with Progress(SpinnerColumn(), TextColumn("checking runs"), BarColumn(), MofNCompleteColumn(),
                  transient=True, console=app.console(stderr=True)) as progress:
        task = progress.add_task("runs", total=None)
        for entry in entries:
            yield entry
            progress.advance(task)


@click.command("corrupt-detect")
@with_app
@output_option("text", "json")
@click.option("--all", "all_runs", is_flag=True, help="Check every run on the backend (where it can list runs).")
@click.option("--fail-on", type=click.Choice(list(SEVERITIES)), default="error", show_default=True,
              help="Exit 1 when a finding at or above this severity is found.")
def command(app: App, output: str, all_runs: bool, fail_on: str) -> None:
    """Check a run (or --all runs) for corruption, broken invariants and stuck states.

    Checks that the state decodes (base64, pickle, allow-list) with the right
    types, that torch's invariants hold (ranks 0..n-1 when complete, every
    node has a heartbeat, no node both participating and waiting, complete
    implies participants, a deadline only while incomplete), and looks for
    trouble: dead participants, heartbeats from the future, closed with nodes
    waiting, more participants than max_nodes (--rdzv-conf max_nodes=N).
    Every finding has a severity, an explanation and the repair to run.

    Exit codes: 0 clean, 1 findings at or above --fail-on, 5 no state,
    6 a state is corrupt or unsafe.
    """
    from rdzvctl.cli import legacy

    if legacy.handles(app):  # torch's legacy etcd JSON, not a pickled state
        return legacy.detect(app, output, all_runs, fail_on)
    from rdzvctl.inspect import now_utc

    now = now_utc()
    if all_runs:
        with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
            reports = [check_raw(e.run_id, None if e.state is None else e.state[0], e.error, app, now)[0]
                       for e in _progress(app, backend.list_runs())]
        reports = [r for r in reports if r["status"] != "absent"]
    else:
        with app.open() as backend:
            try:
                current = backend.get_state()
                reports = [check_raw(backend.run_id, None if current is None else current[0], None, app, now)[0]]
            except StateError as exc:
                reports = [check_raw(backend.run_id, None, exc, app, now)[0]]
        if reports[0]["status"] == "absent":
            from rdzvctl.errors import NoStateError

            raise NoStateError(f"no rendezvous state for run {backend.run_id!r} on {backend.describe()}")
    code = exit_code(reports, fail_on)
    if output == "json":
        counts: Dict[str, int] = {}
        for r in reports:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        app.json({"schema": "rdzvctl.corrupt-detect/v1", "fail_on": fail_on, "runs": reports,
                  "summary": {"runs": len(reports), **counts}, "exit_code": code})
    else:
        _render(app, reports, all_runs)
    if code:
        app.exit(code)


def _render(app: App, reports: List[Dict[str, Any]], all_runs: bool) -> None:
    from rdzvctl.cli.render import Table, render_tables

    if all_runs:
        rows = [[r["run_id"], r["status"], str(len(r["problems"])),
                 ", ".join(sorted({p["code"] for p in r["problems"]}))] for r in reports]
        bad = sum(1 for r in reports if r["status"] != "ok")
        render_tables(app, [("runs", str(len(reports))), ("with findings", str(bad))],
                      [Table("Runs", ["run id", "status", "findings", "codes"], rows)])
        return
    report = reports[0]
    rows = [[p["severity"], p["code"], p["message"]] + [p.get("repair") or "-"] for p in report["problems"]]
    render_tables(app, [("run id", report["run_id"]), ("status", report["status"])],
                  [Table("Findings", ["severity", "code", "message", "repair"], rows)])
