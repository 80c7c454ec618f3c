"""``corrupt-detect``'s output: the JSON document or the text, and the exit code, for every state format.

The pickled backends (:mod:`rdzvctl.cli.commands.detect`) and torch's legacy etcd JSON
(:mod:`rdzvctl.cli.legacy`) build reports of one shape and render them here, one
report at a time as the backend yields them (a 100,000-run listing is streamed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable

from rdzvctl.cli.render import Table, render_tables
from rdzvctl.errors import EXIT_CORRUPT, EXIT_OK, EXIT_PROBLEMS
from rdzvctl.state.analysis import SEVERITIES

if TYPE_CHECKING:  # pragma: no cover
    from rdzvctl.cli.app import App

__all__ = ["Tally", "exit_code", "show_reports"]


class Tally:
    """What corrupt-detect's summary and exit code need of the reports, taken one report at a time."""

    def __init__(self, fail_on: str) -> None:
        self.threshold = SEVERITIES.index(fail_on)
        self.runs = 0
        self.counts: Dict[str, int] = {}
        self.corrupt = False
        self.over = False
        self.bad = 0  # runs whose status is not ok

    def add(self, report: Dict[str, Any]) -> Dict[str, Any]:
        status = report["status"]
        self.runs += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        self.bad += status != "ok"
        self.corrupt = self.corrupt or status in ("corrupt", "unsafe")
        if not self.over:
            self.over = any(SEVERITIES.index(p["severity"]) >= self.threshold for p in report["problems"])
        return report

    def exit_code(self) -> int:
        return EXIT_CORRUPT if self.corrupt else EXIT_PROBLEMS if self.over else EXIT_OK


def exit_code(reports: Iterable[Dict[str, Any]], fail_on: str) -> int:
    tally = Tally(fail_on)
    for report in reports:
        tally.add(report)
    return tally.exit_code()


def show_reports(app: "App", reports: Iterable[Dict[str, Any]], all_runs: bool, verdict: Any, fail_on: str,
                 output: str) -> int:
    """Render corrupt-detect's reports (the JSON document or the text) and return the exit code.

    One place for every state format: the legacy etcd backend's reports take the same shape.
    ``reports`` is consumed once, as it comes: the JSON document is streamed, the text
    keeps one table row per run.
    """
    tally = Tally(fail_on)

    def code() -> int:
        return tally.exit_code() if verdict is None else EXIT_OK if verdict.ok else EXIT_PROBLEMS

    if output == "json":
        def tail() -> Dict[str, Any]:
            doc: Dict[str, Any] = {"summary": {"runs": tally.runs, **tally.counts}, "exit_code": code()}
            if verdict is not None:
                doc["launch"] = {"ok": verdict.ok, "reason": verdict.reason, "round": verdict.round}
            return doc

        app.json_stream({"schema": "rdzvctl.corrupt-detect/v1", "fail_on": fail_on}, "runs",
                        map(tally.add, reports), tail)
    else:
        _render(app, map(tally.add, reports), all_runs, tally, verdict)
    return code()

def _render(app: "App", reports: Iterable[Dict[str, Any]], all_runs: bool, tally: Tally, verdict: Any = None) -> None:
    if all_runs:
        rows = [[r["run_id"], r["status"], r.get("phase") or "-", str(len(r["problems"])),
                 ", ".join(sorted({p["code"] for p in r["problems"]}))] for r in reports]
        render_tables(app, [("runs", str(len(rows))), ("with findings", str(tally.bad))],
                      [Table("Runs", ["run id", "status", "phase", "findings", "codes"], rows)])
        return
    report = list(reports)[0]
    rows = [[p["severity"], p["code"], p["message"], p.get("torch_next") or "-", p.get("repair") or "-"]
            for p in report["problems"]]
    pairs = [("run id", report["run_id"]), ("status", report["status"])]
    if report.get("lifecycle"):
        pairs += [("phase", report["lifecycle"]["phase"]), ("next", report["lifecycle"]["outlook"])]
    if verdict is not None:
        pairs.append(("launch", ("yes: " if verdict.ok else "no: ") + verdict.reason))
    render_tables(app, pairs, [Table("Findings", ["severity", "code", "message", "torch next", "repair"], rows)])
