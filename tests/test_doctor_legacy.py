"""doctor and report on the ``etcd`` backend (torch's legacy etcd JSON state, not a pickle), on a real etcd
with --enable-v2: a healthy run passes, a corrupt one gets the legacy diagnosis and its repairs."""

# ruff: noqa: F811  (pytest fixtures imported by name)
from __future__ import annotations

import json
import uuid
from typing import List

from rdzvctl.state.legacy_etcd import DEFAULT_PREFIX, KEEPALIVE_TTL
from tests.support.cli import cli_env, invoke, json_out  # noqa: F401
from tests.support.etcd_server import etcd_server  # noqa: F401
from tests.test_backend_etcd_legacy import backend, raw


def flags(server, run_id: str) -> List[str]:
    return ["--rdzv-backend", "etcd", "--rdzv-endpoint", server.endpoint, "--rdzv-id", run_id, "--timeout", "5"]


def healthy_run(server) -> str:
    """A final version 1 with both ranks' keep-alive keys alive and the counter at 1, as torch leaves it."""
    run_id = f"dl-{uuid.uuid4().hex[:10]}"
    path = f"{DEFAULT_PREFIX}/run_{run_id}/rdzv"
    raw(server, "PUT", f"{path}/version_counter", value="1")
    leases = []
    for rank in (0, 1):
        raw(server, "PUT", f"{path}/v_1/rank_{rank}", value="", ttl=KEEPALIVE_TTL)
        leases.append(f"{path}/v_1/rank_{rank}")
    backend(server.endpoint, run_id).set_state(json.dumps(
        {"status": "final", "version": "1", "participants": [0, 1], "keep_alives": leases,
         "num_workers_waiting": 0}).encode())
    return run_id


def test_doctor_passes_a_healthy_legacy_run(cli_env, etcd_server):
    run_id = healthy_run(etcd_server)
    result = invoke(["doctor", *flags(etcd_server, run_id)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "pickle" not in result.stdout and "n/a on this backend" in result.stdout
    doc = json_out(invoke(["doctor", *flags(etcd_server, run_id), "-o", "json"]))
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["run.state"]["status"] == "ok" and "final" in checks["run.state"]["message"]
    assert checks["run.findings"]["status"] == "ok"
    assert "needs it" in checks["etcd.v2"]["message"]  # the legacy handler is a v2 client too


def test_report_of_a_healthy_legacy_run_shows_its_state_and_suggests_nothing(cli_env, etcd_server):
    run_id = healthy_run(etcd_server)
    result = invoke(["report", *flags(etcd_server, run_id)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    text = result.stdout
    assert "does not decode" not in text and "pickle" not in text
    assert "| status | final" in text and "legacy" in text
    assert "reset --mode clear" not in text and "None suggested." in text
    bundle = json_out(invoke(["report", *flags(etcd_server, run_id), "-o", "json"]))
    assert bundle["get"]["schema"] == "rdzvctl.get.legacy-etcd/v1" and bundle["repairs"] == []


def test_a_dead_rank_and_a_corrupt_state_get_the_legacy_diagnosis_and_repairs(cli_env, etcd_server):
    run_id = healthy_run(etcd_server)
    raw(etcd_server, "DELETE", f"{DEFAULT_PREFIX}/run_{run_id}/rdzv/v_1/rank_1")  # its lease expired
    doctor = invoke(["doctor", *flags(etcd_server, run_id), "-o", "json"])
    assert doctor.exit_code == 1
    checks = {c["name"]: c for c in json_out(doctor)["checks"]}
    assert checks["run.findings"]["status"] == "fail" and "dead-participant" in checks["run.findings"]["message"]
    bundle = json_out(invoke(["report", *flags(etcd_server, run_id), "-o", "json"]))
    commands = [r["command"] for r in bundle["repairs"]]
    assert any("reset --mode reopen" in c for c in commands) and not any("--mode clear" in c for c in commands)

    raw(etcd_server, "PUT", f"{DEFAULT_PREFIX}/run_{run_id}/rdzv/active_version",
        value='{"status": "joinable", "version": "1", "participants": [0, 0]}')
    doctor = invoke(["doctor", *flags(etcd_server, run_id), "-o", "json"])
    assert doctor.exit_code == 1
    state = {c["name"]: c for c in json_out(doctor)["checks"]}["run.state"]
    assert state["status"] == "fail" and "participants[1]" in state["message"] and "pickle" not in state["message"]
    report = invoke(["report", *flags(etcd_server, run_id)])
    assert report.exit_code == 0 and "The state does not decode." in report.stdout
    assert "reset --mode reopen" in report.stdout and "--mode clear" not in report.stdout
