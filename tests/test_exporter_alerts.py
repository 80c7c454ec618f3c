"""deploy/prometheus/rdzvctl-alerts.yml: promtool accepts it and its unit tests pass.

The unit tests (``promtool test rules``) feed each alert the series the
exporter writes in that situation and pin what the on-call reads: the labels
naming the run, the summary, the description and the repair command.  A
near miss next to each case must not fire: torch recovering, a run with no
live agent, a close not settled yet and a finished run never page.
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


ENDED = {"backend": "redis", "endpoint": "redis://:***@10.0.0.5:6379/0", "run_id": "ended"}
REDIS_FLAGS = "--rdzv-backend redis --rdzv-endpoint 'redis://:***@10.0.0.5:6379/0' --rdzv-id 'job42'"
FILE_FLAGS = "--rdzv-backend c10d --rdzv-endpoint '/shared/rdzv/store' --rdzv-id 'job7' --rdzv-conf store_type=file"
RENDEZVOUS_ALERTS = ["RendezvousJoinTimeout", "RendezvousDeadParticipants", "RendezvousParticipantLeft",
                     "RendezvousClosedWhileAlive", "RendezvousNeedsRepair", "RendezvousRestartStorm",
                     "RendezvousStateCorrupt"]


def finding(labels: Dict[str, str], code: str, severity: str, torch_next: str) -> Dict[str, str]:
    return {**labels, "code": code, "severity": severity, "torch_next": torch_next}


def phase(labels: Dict[str, str], name: str) -> Dict[str, str]:
    return {**labels, "phase": name}


CASES = [
    # Forming past the join timeout while a live participant waits; the idle run (nobody alive)
    # and a closed run with an incomplete round (phase closing, not forming) stay quiet.
    case([
        series("rdzvctl_round_incomplete_seconds", RUN, "0+60x20"),
        series("rdzvctl_participants_alive", RUN, "1x20"),
        series("rdzvctl_phase", phase(RUN, "forming"), "1x20"),
        series("rdzvctl_round_incomplete_seconds", OTHER, "0+60x20"),
        series("rdzvctl_participants_alive", OTHER, "0x20"),
        series("rdzvctl_phase", phase(OTHER, "forming"), "1x20"),
        series("rdzvctl_round_incomplete_seconds", ENDED, "0+60x20"),
        series("rdzvctl_participants_alive", ENDED, "2x20"),
        series("rdzvctl_phase", phase(ENDED, "closing"), "1x20"),
        series("rdzvctl_join_timeout_seconds", {k: RUN[k] for k in ("backend", "endpoint")}, "600x20"),
        # a second exporter (an HA pair) on the same backend must not break the match
        series("rdzvctl_join_timeout_seconds", {"backend": RUN["backend"], "endpoint": RUN["endpoint"],
                                                "instance": "exporter-b:9469"}, "600x20"),
    ], [
        quiet("RendezvousJoinTimeout", "10m"),
        alert("RendezvousJoinTimeout", "13m", RUN, "page",
              summary="Rendezvous job42 has been forming for longer than its join timeout",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 has had its round forming for 13m 0s "
                          "while live participants wait. What torch does next: the round completes only when "
                          "enough nodes (min_nodes) have joined and the last call ends; every agent that has "
                          "waited join_timeout gives up with RendezvousTimeoutError (`_RendezvousJoinOp`). Too "
                          "few nodes joined.",
              repair=f"rdzvctl corrupt-detect {REDIS_FLAGS} (names who is alive and what holds the round); "
                     "start the missing nodes"),
    ]),
    # Dead participants, the round stuck (a FileStore: the repair says store_type=file); the same
    # finding while torch recovers (a node waits) or with no agent alive (the next job fixes it)
    # does not page.
    case([
        series("rdzvctl_participants_dead", FILE_RUN, "1x10"),
        series("rdzvctl_findings", finding(FILE_RUN, "dead-participants", "error", "stays"), "1x10"),
        series("rdzvctl_phase", phase(FILE_RUN, "stuck"), "1x10"),
        series("rdzvctl_participants_dead", OTHER, "1x10"),
        series("rdzvctl_findings", finding(OTHER, "dead-participants", "info", "recovers"), "1x10"),
        series("rdzvctl_phase", phase(OTHER, "recovering"), "1x10"),
        series("rdzvctl_participants_dead", ENDED, "2x10"),
        series("rdzvctl_findings", finding(ENDED, "dead-participants", "warning", "next-join-fixes"), "1x10"),
        series("rdzvctl_phase", phase(ENDED, "stuck"), "1x10"),
    ], [
        quiet("RendezvousDeadParticipants", "1m"),
        alert("RendezvousDeadParticipants", "3m", FILE_RUN, "page",
              summary="Rendezvous job7: 1 dead participant(s), the round is stuck",
              description="1 participant(s) of the complete round of run job7 on c10d /shared/rdzv/store stopped "
                          "heartbeating and no node waits (phase stuck). What torch does next: nothing moves the "
                          "run; the live agents drop the dead node(s) at their next sync without renumbering "
                          "(`_sanitize`) and keep the round; they restart only when a node waits "
                          "(`num_nodes_waiting`) or their workers fail. (While a node waits torch recovers by "
                          "itself and this does not fire.)",
              repair=f"rdzvctl reset --mode prune {FILE_FLAGS}; then, if the survivors' workers do not fail and "
                     "restart by themselves: rdzvctl set --add-waiting rdzvctl-restart_0_0 (same flags)"),
        quiet("RendezvousNeedsRepair", "3m"),
    ]),
    # A participant left a complete round and nobody waits; a free rank while torch recovers does not page.
    case([
        series("rdzvctl_findings", finding(RUN, "participant-left", "error", "stays"), "1x10"),
        series("rdzvctl_findings", finding(OTHER, "participant-left", "info", "recovers"), "1x10"),
    ], [
        quiet("RendezvousParticipantLeft", "1m"),
        alert("RendezvousParticipantLeft", "3m", RUN, "page",
              summary="Rendezvous job42: a participant left the complete round, the round is stuck",
              description="A participant left the complete round of run job42 on redis "
                          "redis://:***@10.0.0.5:6379/0 (its rank is free) and no node waits (phase stuck); this "
                          "is what dead participants become once the survivors drop them. What torch does next: "
                          "nothing; the survivors keep the round and restart only when a node waits "
                          "(`num_nodes_waiting`) or their workers fail.",
              repair=f"rdzvctl set --add-waiting rdzvctl-restart_0_0 {REDIS_FLAGS} (a waiting node makes the live "
                     "agents restart the round; it expires after one keep-alive window)"),
        quiet("RendezvousNeedsRepair", "3m"),
    ]),
    # Closed while the agents still heartbeat, settled; a close not settled yet (closing) and a
    # finished run (closed, nobody alive: only a new job with this id would fail) stay quiet.
    case([
        series("rdzvctl_phase", phase(RUN, "closed-under-live-agents"), "1x10"),
        series("rdzvctl_findings", finding(RUN, "closed-while-alive", "error", "new-job-fails"), "1x10"),
        series("rdzvctl_phase", phase(OTHER, "closing"), "1x10"),
        series("rdzvctl_findings", finding(OTHER, "closed", "error", "new-job-fails"), "1x10"),
        series("rdzvctl_phase", phase(ENDED, "finished"), "1x10"),
        series("rdzvctl_findings", finding(ENDED, "closed", "error", "new-job-fails"), "1x10"),
        series("rdzvctl_findings", finding(ENDED, "dead-participants", "info", "new-job-fails"), "1x10"),
        series("rdzvctl_participants_dead", ENDED, "2x10"),
    ], [
        quiet("RendezvousClosedWhileAlive", "0m"),
        alert("RendezvousClosedWhileAlive", "2m", RUN, "page",
              summary="Rendezvous job42 is closed while its agents still heartbeat",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 is closed and its agents still "
                          "heartbeat: the exporter saw them heartbeat a keep-alive window after it first saw the "
                          "close (it settles as corrupt-detect --settle does) and that lasted a minute more, so "
                          "this is not a normal end (agents stop heartbeating when they shut down). What torch "
                          "does next: the live agents' next rendezvous, and any new job with this run id, fail "
                          "with RendezvousClosedError (`_RendezvousJoinOp`).",
              repair=f"rdzvctl reset --mode reopen {REDIS_FLAGS}"),
        *[quiet(name, "5m") for name in RENDEZVOUS_ALERTS if name != "RendezvousClosedWhileAlive"],
    ]),
    # Any other error torch will not fix; the corrupt state has its own alert, an info finding none.
    case([
        series("rdzvctl_findings", finding(RUN, "missing-heartbeat", "error", "stays"), "1x10"),
        series("rdzvctl_findings", finding(OTHER, "over-max-nodes", "info", "recovers"), "1x10"),
        series("rdzvctl_findings", finding(ENDED, "state-corrupt", "error", "agents-fail"), "1x10"),
    ], [
        quiet("RendezvousNeedsRepair", "1m"),
        alert("RendezvousNeedsRepair", "3m", {**RUN, "code": "missing-heartbeat"}, "page",
              summary="Rendezvous job42: missing-heartbeat, which torch will not fix",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 has the finding missing-heartbeat "
                          "(error). What torch does next: nothing in torch changes it, or its agents fail on it "
                          "(torch_next stays or agents-fail); corrupt-detect says which and why.",
              repair=f"rdzvctl corrupt-detect {REDIS_FLAGS} (gives the finding's repair)"),
    ]),
    # Recovering (a dead participant, a node waits, the participants restart): nothing pages, ever.
    case([
        series("rdzvctl_phase", phase(RUN, "recovering"), "1x30"),
        series("rdzvctl_participants_dead", RUN, "1x30"),
        series("rdzvctl_participants_alive", RUN, "2x30"),
        series("rdzvctl_waiting_nodes", RUN, "1x30"),
        series("rdzvctl_findings", finding(RUN, "dead-participants", "info", "recovers"), "1x30"),
        series("rdzvctl_findings", finding(RUN, "participant-left", "info", "recovers"), "1x30"),
        series("rdzvctl_state_decoded", RUN, "1x30"),
        series("rdzvctl_rounds_advanced_total", RUN, "0 0 0 1 1 1"),
        series("rdzvctl_join_timeout_seconds", {k: RUN[k] for k in ("backend", "endpoint")}, "600x30"),
    ], [quiet(name, at) for name in RENDEZVOUS_ALERTS for at in ("1m", "5m", "25m")]),
    # Restart storm: 3 rounds advanced within 15 minutes; 2 do not.
    case([
        series("rdzvctl_rounds_advanced_total", RUN, "0 0 1 2 3 3 3"),
        series("rdzvctl_rounds_advanced_total", OTHER, "0 0 1 2 2 2 2"),
    ], [
        quiet("RendezvousRestartStorm", "2m"),
        alert("RendezvousRestartStorm", "6m", RUN, "warning",
              summary="Rendezvous job42 restarted 3 times in 15 minutes",
              description="Run job42 on redis redis://:***@10.0.0.5:6379/0 advanced its round 3 times in 15 "
                          "minutes: workers keep failing or nodes keep joining and leaving. Each time torch "
                          "recovered by itself and restarted training from the last checkpoint; what torch does "
                          "next: a worker failure counts against each agent's --max-restarts, after which that "
                          "agent fails (`SimpleElasticAgent._invoke_run`); a node joining or leaving does not.",
              repair=f"rdzvctl watch -o json {REDIS_FLAGS} (shows which node joins or leaves each round)"),
    ]),
    # A state that does not decode.
    case([
        series("rdzvctl_state_decoded", RUN, "0x5"),
        series("rdzvctl_state_decoded", OTHER, "1x5"),
    ], [
        alert("RendezvousStateCorrupt", "2m", RUN, "page",
              summary="Rendezvous job42: the stored state does not decode",
              description="The stored state of run job42 on redis redis://:***@10.0.0.5:6379/0 is corrupt or "
                          "unsafe (finding state-corrupt or state-unsafe; rdzvctl never executes it). What torch "
                          "does next: every agent's next sync fails to load it, and unpickles an unsafe one "
                          "unchecked (`_BackendRendezvousStateHolder.sync`); nothing in torch replaces it.",
              repair=f"rdzvctl reset --mode clear {REDIS_FLAGS} (the bytes are kept in the backup for forensics)"),
    ]),
    # The backend does not answer (for 2 minutes, not a blip); runs beyond --max-runs.
    case([
        series("rdzvctl_backend_up", BACKEND, "1 0 0 0 0 0"),
        series("rdzvctl_runs_over_limit", BACKEND, "5x15"),
    ], [
        quiet("RendezvousBackendDown", "2m"),
        alert("RendezvousBackendDown", "4m", BACKEND, "page",
              summary="The rendezvous backend etcd-v3 10.0.0.7:2379 does not answer",
              description="rdzvctl exporter cannot read etcd-v3 10.0.0.7:2379; the exporter's log and "
                          "rdzvctl_backend_errors_total{kind} say why. What torch does next, if its agents cannot "
                          "reach it either: their heartbeats fail (logged by `DynamicRendezvousHandler._keep_alive`), "
                          "a rendezvous fails with RendezvousConnectionError, and once it answers again the first "
                          "agent to sync drops every node whose heartbeat is older than the keep-alive expiry "
                          "(`_sanitize`).",
              repair="rdzvctl list --rdzv-backend etcd-v3 --rdzv-endpoint '10.0.0.7:2379' (one line says why: "
                     "refused, timed out, TLS, auth)"),
        quiet("RendezvousRunsOverLimit", "5m"),
        alert("RendezvousRunsOverLimit", "12m", BACKEND, "warning",
              summary="5 run(s) on etcd-v3 10.0.0.7:2379 are not monitored",
              description="The backend etcd-v3 10.0.0.7:2379 holds more runs than the exporter's --max-runs; 5 of "
                          "them are counted but not exported (torch is unaffected; nobody watches those runs).",
              repair="rdzvctl list --rdzv-backend etcd-v3 --rdzv-endpoint '10.0.0.7:2379' (old runs: rdzvctl reset "
                     "--mode clear), or raise rdzvctl exporter --max-runs"),
    ]),
]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)  # type: ignore[list-item]


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


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


def test_the_readme_and_the_header_list_every_alert_and_the_codes_used() -> None:
    text = RULES.read_text()
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", text, re.MULTILINE))
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Monitoring"):readme.index("## Safety design")]
    assert {a for a in re.findall(r"^\| `(Rendezvous\w+)`", section, re.MULTILINE)} == alerts
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    rules = "\n".join(re.findall(r"expr: \|\n(.*?)\n\s+(?:for|labels):", text, re.DOTALL))
    for used in set(re.findall(r'(?:code|phase)=~?"([a-z-|.*]+)"', rules)):
        for name in used.split("|"):
            if not name.endswith(".*"):
                assert f"`{name}`" in header and f"`{name}`" in section, name
    for metric in set(re.findall(r"\brdzvctl_[a-z_]+", rules)):
        assert metric in header, metric
