"""deploy/grafana/rdzvctl.json: a dashboard Grafana can import, querying only exported metrics.

Checked without a Grafana server: the JSON has what an import needs (uid,
title, schemaVersion, panels with ids and grid positions, a Prometheus
datasource variable), every query names metrics the exporter writes, and
every query is valid PromQL (promtool parses each as a recording rule, with
the dashboard variables filled in).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from rdzvctl.monitor.collector import METRIC_NAMES

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "rdzvctl.json"


@pytest.fixture(scope="module")
def dashboard() -> Dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(items: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels", []))


def _queries(dashboard: Dict[str, Any]) -> List[str]:
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_dashboard_has_what_an_import_needs(dashboard: Dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert dashboard.get("id") is None  # an import creates its own
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["refId"] for t in panel["targets"])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"backend", "endpoint", "run_id"} <= set(variables)


def test_the_phase_is_shown_per_run_and_counted_per_backend(dashboard: Dict[str, Any]) -> None:
    panels = list(_panels(dashboard["panels"]))
    (timeline,) = [p for p in panels if p["type"] == "state-timeline"]
    assert timeline["targets"][0]["legendFormat"] == "{{phase}}"
    assert re.match(r"rdzvctl_phase\{", timeline["targets"][0]["expr"])
    counted = [t["expr"] for p in panels for t in p.get("targets", []) if "count by (phase)" in t["expr"]]
    assert counted and all("rdzvctl_phase{" in e for e in counted)  # one series per run: count, not sum of 0/1
    assert any(r["id"] == "state-timeline" for r in dashboard["__requires"])


def test_every_query_names_exported_metrics(dashboard: Dict[str, Any]) -> None:
    for expr in _queries(dashboard):
        used = set(re.findall(r"\brdzvctl_[a-z_]+", expr))
        assert used, f"no rdzvctl metric in {expr!r}"
        assert used <= METRIC_NAMES, f"{expr!r} names {used - METRIC_NAMES}"


def test_the_run_row_repeats_per_run_with_the_promised_panels(dashboard: Dict[str, Any]) -> None:
    rows = [p for p in dashboard["panels"] if p["type"] == "row" and p.get("repeat") == "run_id"]
    assert len(rows) == 1
    after = dashboard["panels"][dashboard["panels"].index(rows[0]) + 1:]
    exprs = " ".join(t["expr"] for p in after for t in p["targets"])
    for metric in ("rdzvctl_phase", "rdzvctl_round", "rdzvctl_participants_alive", "rdzvctl_participants_dead",
                   "rdzvctl_waiting_nodes", "rdzvctl_heartbeat_newest_age_seconds", "rdzvctl_findings"):
        assert re.search(rf"\b{metric}\{{", exprs), metric
    assert all('run_id=~"$run_id"' in t["expr"] for p in after for t in p["targets"]
               if "keep_alive" not in t["expr"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_every_query_is_valid_promql(dashboard: Dict[str, Any], tmp_path: Path) -> None:
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(_queries(dashboard)):
        if expr.startswith("label_values("):  # Grafana's variable query: its argument is the PromQL
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        expr = re.sub(r"\$\w+", ".*", expr)
        lines += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "queries.yml"
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
