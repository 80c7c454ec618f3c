"""``corrupt-detect``'s output: the JSON document or the text, and the exit code, for every state format.

The pickled backends (:mod:`rdzvctl.cli.commands.detect`) and torch's legacy etcd JSON
(:mod:`rdzvctl.cli.legacy`) build reports of one shape and render them here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

from rdzvctl.cli.render import Table, render_tables
from rdzvctl.errors import EXIT_CORRUPT, EXIT_OK, EXIT_PROBLEMS
from rdzvctl.state.analysis import SEVERITIES

if TYPE_CHECKING:  # pragma: no cover
    from rdzvctl.cli.app import App

__all__ = ["exit_code", "show_reports"]


def exit_code(reports: List[Dict[str, Any]], fail_on: str) -> int:
    if any(r["status"] in ("corrupt", "unsafe") for r in reports):
        return EXIT_CORRUPT
    threshold = SEVERITIES.index(fail_on)
    if any(SEVERITIES.index(p["severity"]) >= threshold for r in reports for p in r["problems"]):
        return EXIT_PROBLEMS
    return EXIT_OK


def show_reports(app: "App", reports: List[Dict[str, Any]], all_runs: bool, verdict: Any, fail_on: str,
                 output: str) -> int:
    """Render corrupt-detect's reports (the JSON document or the text) and return the exit code.

    One place for every state format: the legacy etcd backend's reports take the same shape.
    """
    code = exit_code(reports, fail_on)
    if verdict is not None:
        code = EXIT_OK if verdict.ok else EXIT_PROBLEMS
    if output == "json":
        counts: Dict[str, int] = {}
        for r in reports:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        doc: Dict[str, Any] = {"schema": "rdzvctl.corrupt-detect/v1", "fail_on": fail_on, "runs": reports,
                               "summary": {"runs": len(reports), **counts}, "exit_code": code}
        if verdict is not None:
            doc["launch"] = {"ok": verdict.ok, "reason": verdict.reason, "round": verdict.round}
        app.json(doc)
    else:
        _render(app, reports, all_runs, verdict)
    return code


def _render(app: "App", reports: List[Dict[str, Any]], all_runs: bool, verdict: Any = None) -> None:
    if all_runs:
        rows = [[r["run_id"], r["status"], r.get("phase") or "-", str(len(r["problems"])),
                 ", ".join(sorted({p["code"] for p in r["problems"]}))] for r in reports]
        bad = sum(1 for r in reports if r["status"] != "ok")
        render_tables(app, [("runs", str(len(reports))), ("with findings", str(bad))],
                      [Table("Runs", ["run id", "status", "phase", "findings", "codes"], rows)])
        return
    report = reports[0]
    rows = [[p["severity"], p["code"], p["message"], p.get("torch_next") or "-", p.get("repair") or "-"]
            for p in report["problems"]]
    pairs = [("run id", report["run_id"]), ("status", report["status"])]
    if report.get("lifecycle"):
        pairs += [("phase", report["lifecycle"]["phase"]), ("next", report["lifecycle"]["outlook"])]
    if verdict is not None:
        pairs.append(("launch", ("yes: " if verdict.ok else "no: ") + verdict.reason))
    render_tables(app, pairs, [Table("Findings", ["severity", "code", "message", "torch next", "repair"], rows)])
