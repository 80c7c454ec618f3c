"""deploy/prometheus/rdzvctl-alerts.yml: promtool accepts it and its unit tests pass.

The unit tests (``promtool test rules``) feed each alert the series the
exporter writes in that situation and pin what the on-call reads: the labels
naming the run, the summary, the description and the repair command.  A
near miss next to each case must not fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

from rdzvctl.monitor.collector import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "rdzvctl-alerts.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")

RUN = {"backend": "redis", "endpoint": "redis://:***@10.0.0.5:6379/0", "run_id": "job42"}
FILE_RUN = {"backend": "c10d", "endpoint": "/shared/rdzv/store", "run_id": "job7"}
OTHER = {"backend": "redis", "endpoint": "redis://:***@10.0.0.5:6379/0", "run_id": "idle"}
BACKEND = {"backend": "etcd-v3", "endpoint": "10.0.0.7:2379"}


def series(name: str, labels: Dict[str, str], values: str) -> Dict[str, str]:
    text = ",".join(f'{k}={json.dumps(v)}' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def alert(name: str, at: str, labels: Dict[str, str], severity: str, **annotations: str) -> Dict[str, Any]:
    expected = [{"exp_labels": {**labels, "severity": severity}, "exp_annotations": annotations}] if annotations else []
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


def quiet(name: str, at: str) -> Dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": []}


def case(inputs: List[Dict[str, str]], checks: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"interval": "1m", "input_series": inputs, "alert_rule_test": checks}


CASES = [
    # Stuck: incomplete for longer than the join timeout while a live participant waits; the idle
    # run (nobody alive, nobody waiting) stays quiet.
    case([
        series("rdzvctl_round_incomplete_seconds", RUN, "0+60x20"),
        series("rdzvctl_participants_alive", RUN, "1x20"),
        series("rdzvctl_waiting_nodes", RUN, "0x20"),
        series("rdzvctl_round_incomplete_seconds", OTHER, "0+60x20"),
        series("rdzvctl_participants_alive", OTHER, "0x20"),
        series("rdzvctl_waiting_nodes", OTHER, "0x20"),
        series("rdzvctl_join_timeout_seconds", {k: RUN[k] for k in ("backend", "endpoint")}, "600x20"),
        # a second exporter (an HA pair) on the same backend must not break the match
        series("rdzvctl_join_timeout_seconds", {"backend": RUN["backend"], "endpoint": RUN["endpoint"],
                                                "instance": "exporter-b:9469"}, "600x20"),
    ], [
        quiet("RendezvousStuck", "10m"),
        alert("RendezvousStuck", "13m", RUN, "page",
              summary="Rendezvous job42 has not completed for longer than its join timeout",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 has had round incomplete for 13m 0s "
                          "while live nodes wait; torch's agents give up after join_timeout with "
                          "RendezvousTimeoutError. Either too few nodes joined (min_nodes not reached) or dead "
                          "participants hold the round.",
              repair="rdzvctl corrupt-detect --rdzv-backend redis --rdzv-endpoint 'redis://:***@10.0.0.5:6379/0' "
                     "--rdzv-id 'job42'; if it reports dead participants: rdzvctl reset --mode prune (same flags)"),
    ]),
    # Dead participants in a complete round (a FileStore: the repair says store_type=file); the
    # same finding in an incomplete round does not page.
    case([
        series("rdzvctl_participants_dead", FILE_RUN, "1x10"),
        series("rdzvctl_complete", FILE_RUN, "1x10"),
        series("rdzvctl_findings", {**FILE_RUN, "code": "dead-participants", "severity": "error"}, "1x10"),
        series("rdzvctl_participants_dead", OTHER, "1x10"),
        series("rdzvctl_complete", OTHER, "0x10"),
        series("rdzvctl_findings", {**OTHER, "code": "dead-participants", "severity": "warning"}, "1x10"),
    ], [
        quiet("RendezvousDeadParticipants", "1m"),
        alert("RendezvousDeadParticipants", "3m", FILE_RUN, "page",
              summary="Rendezvous job7: 1 dead participant(s) in a complete round",
              description="1 participant(s) of the complete round of run job7 on c10d /shared/rdzv/store stopped "
                          "heartbeating; the survivors will not re-rendezvous on their own.",
              repair="rdzvctl reset --mode prune --rdzv-backend c10d --rdzv-endpoint '/shared/rdzv/store' "
                     "--rdzv-id 'job7' --rdzv-conf store_type=file"),
    ]),
    # Closed while participants still heartbeat.
    case([
        series("rdzvctl_findings", {**RUN, "code": "closed-while-alive", "severity": "warning"}, "1x10"),
        series("rdzvctl_findings", {**OTHER, "code": "closed", "severity": "info"}, "1x10"),
    ], [
        quiet("RendezvousClosedWhileAlive", "0m"),
        alert("RendezvousClosedWhileAlive", "2m", RUN, "page",
              summary="Rendezvous job42 is closed while its nodes still heartbeat",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 is closed although live agents still "
                          "heartbeat (an agent's SIGTERM closed it for the survivors?); every re-rendezvous fails "
                          "with RendezvousClosedError.",
              repair="rdzvctl reset --mode reopen --rdzv-backend redis --rdzv-endpoint "
                     "'redis://:***@10.0.0.5:6379/0' --rdzv-id 'job42'"),
    ]),
    # Restart storm: 3 rounds advanced within 15 minutes; 2 do not.
    case([
        series("rdzvctl_rounds_advanced_total", RUN, "0 0 1 2 3 3 3"),
        series("rdzvctl_rounds_advanced_total", OTHER, "0 0 1 2 2 2 2"),
    ], [
        quiet("RendezvousRestartStorm", "2m"),
        alert("RendezvousRestartStorm", "6m", RUN, "warning",
              summary="Rendezvous job42 restarted 3 times in 15 minutes",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 advanced its round 3 times in 15 "
                          "minutes: workers keep failing or nodes keep joining and leaving, and every round "
                          "restarts training from the last checkpoint.",
              repair="rdzvctl watch -o json --rdzv-backend redis --rdzv-endpoint 'redis://:***@10.0.0.5:6379/0' "
                     "--rdzv-id 'job42' (shows which node joins or leaves each round)"),
    ]),
    # A state that does not decode.
    case([
        series("rdzvctl_state_decoded", RUN, "0x5"),
        series("rdzvctl_state_decoded", OTHER, "1x5"),
    ], [
        alert("RendezvousStateCorrupt", "2m", RUN, "page",
              summary="Rendezvous job42: the stored state does not decode",
              description="The stored state of run job42 on redis redis://:***@10.0.0.5:6379/0 is corrupt or "
                          "unsafe (it is never executed); torch's agents fail on it.",
              repair="rdzvctl corrupt-detect --rdzv-backend redis --rdzv-endpoint 'redis://:***@10.0.0.5:6379/0' "
                     "--rdzv-id 'job42'; then rdzvctl reset --mode clear (same flags; the bytes are backed up "
                     "first)"),
    ]),
    # The backend does not answer (for 2 minutes, not a blip); runs beyond --max-runs.
    case([
        series("rdzvctl_backend_up", BACKEND, "1 0 0 0 0 0"),
        series("rdzvctl_runs_over_limit", BACKEND, "5x15"),
    ], [
        quiet("RendezvousBackendDown", "2m"),
        alert("RendezvousBackendDown", "4m", BACKEND, "page",
              summary="The rendezvous backend etcd-v3 10.0.0.7:2379 does not answer",
              description="rdzvctl exporter cannot read etcd-v3 10.0.0.7:2379: torch's agents of every run there "
                          "cannot rendezvous or heartbeat either. The exporter's log and "
                          "rdzvctl_backend_errors_total{kind} say why.",
              repair="rdzvctl list --rdzv-backend etcd-v3 --rdzv-endpoint '10.0.0.7:2379' (one line says why: "
                     "refused, timed out, TLS, auth)"),
        quiet("RendezvousRunsOverLimit", "5m"),
        alert("RendezvousRunsOverLimit", "12m", BACKEND, "warning",
              summary="5 run(s) on etcd-v3 10.0.0.7:2379 are not monitored",
              description="The backend etcd-v3 10.0.0.7:2379 holds more runs than the exporter's --max-runs; 5 of "
                          "them are counted but not exported.",
              repair="rdzvctl list --rdzv-backend etcd-v3 --rdzv-endpoint '10.0.0.7:2379' (old runs: rdzvctl reset "
                     "--mode clear), or raise rdzvctl exporter --max-runs"),
    ]),
]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)  # type: ignore[list-item]


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": CASES}
    path = tmp_path / "rdzvctl-alerts.test.json"  # JSON is YAML to promtool
    path.write_text(json.dumps(spec, indent=1))
    done = _promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_and_explained() -> None:
    text = RULES.read_text()
    alerts = re.findall(r"^\s+- alert: (\w+)$", text, re.MULTILINE)
    tested = {check["alertname"] for c in CASES for check in c["alert_rule_test"] if check["exp_alerts"]}
    assert sorted(alerts) == sorted(tested)
    assert text.count("summary:") == text.count("description:") == text.count("repair:") == len(alerts)


def test_rules_name_only_exported_metrics() -> None:
    used = set(re.findall(r"\brdzvctl_[a-z_]+", RULES.read_text()))
    assert used and used <= METRIC_NAMES, used - METRIC_NAMES
