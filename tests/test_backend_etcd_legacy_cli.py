"""Every command on the ``etcd`` backend (torch's legacy etcd rendezvous), with torch's real
``EtcdRendezvousHandler`` agents on a real etcd 3.4 with --enable-v2."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, List

import pytest

import rdzvctl.cli.legacy
from rdzvctl.backends.base import Address
from rdzvctl.backends.etcd_legacy import EtcdLegacyBackend
from rdzvctl.state.legacy_etcd import KEEPALIVE_TTL
from tests.support.cli import invoke, json_out, run_rdzvctl
from tests.support.legacy_etcd_agent import agents, rendezvous


@pytest.fixture()
def torch_peer():
    pytest.importorskip("torch")
    pytest.importorskip("etcd")


def new_run_id() -> str:
    return f"cli-{uuid.uuid4().hex[:10]}"


def flags(server: Any, run_id: str, *conf: str) -> List[str]:
    args = ["--rdzv-backend", "etcd", "--rdzv-endpoint", server.endpoint, "--rdzv-id", run_id]
    return args + (["--rdzv-conf", ",".join(conf)] if conf else [])


def backend(server: Any, run_id: str) -> EtcdLegacyBackend:
    return EtcdLegacyBackend.from_address(Address("etcd", server.endpoint, run_id, {}, 5.0))


def wait_for_exit(args: List[str], code: int, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = invoke(args)
        if result.exit_code == code or time.monotonic() > deadline:
            return result
        time.sleep(0.3)


def test_backends_lists_it(cli_env):
    result = invoke(["backends", "-o", "json"]) if "-o" in invoke(["backends", "--help"]).stdout \
        else invoke(["backends"])
    assert result.exit_code == 0
    assert "etcd" in result.stdout and "legacy" in result.stdout


def test_get_of_a_run_without_state_exits_5(cli_env, etcd_server):
    result = invoke(["get", *flags(etcd_server, new_run_id())])
    assert result.exit_code == 5
    assert "no rendezvous state" in result.stderr and "creates one" in result.stderr


def test_a_corrupt_value_exits_6_with_the_field_named(cli_env, etcd_server):
    run_id = new_run_id()
    b = backend(etcd_server, run_id)
    b.set_state(b'{"status": "joinable", "version": "1", "participants": [0, 0]}')
    result = invoke(["get", *flags(etcd_server, run_id)])
    assert result.exit_code == 6
    assert "participants[1]" in result.stdout
    detect = invoke(["corrupt-detect", *flags(etcd_server, run_id), "-o", "json"])
    assert detect.exit_code == 6 and json_out(detect)["runs"][0]["status"] == "corrupt"


def test_process_a_huge_corrupt_value_is_one_bounded_line(cli_env, etcd_server):
    run_id = new_run_id()
    backend(etcd_server, run_id).set_state(
        json.dumps({"status": "joinable", "version": "1", "participants": ["A" * 500_000]}).encode())
    for command in (["get"], ["corrupt-detect"]):
        done = run_rdzvctl([*command, *flags(etcd_server, run_id)])
        assert done.returncode == 6, done.stderr
        assert "participants[0]" in done.stdout + done.stderr
        assert max(len(line) for line in (done.stdout + done.stderr).splitlines()) < 400


def test_detect_all_and_list_read_every_run_under_the_prefix(cli_env, etcd_server):
    prefix = f"/all-{uuid.uuid4().hex[:8]}"
    conf = f"etcd_prefix={prefix}"
    ok = EtcdLegacyBackend.from_address(Address("etcd", etcd_server.endpoint, "ok", {"etcd_prefix": prefix}))
    bad = EtcdLegacyBackend.from_address(Address("etcd", etcd_server.endpoint, "bad\x1b[31m", {"etcd_prefix": prefix}))
    ok.set_state(b'{"status": "closed"}')
    bad.set_state(b'{"status": "\u001b[2Jgone"}')
    base = ["--rdzv-backend", "etcd", "--rdzv-endpoint", etcd_server.endpoint, "--rdzv-conf", conf]
    result = invoke(["corrupt-detect", "--all", *base, "-o", "json"])
    assert result.exit_code == 6
    runs = {r["run_id"]: r for r in json_out(result)["runs"]}
    assert runs["ok"]["status"] == "warning" and runs["ok"]["problems"][0]["code"] == "closed"
    assert runs["bad\x1b[31m"]["status"] == "corrupt"
    text = invoke(["list", *base])
    assert text.exit_code == 0 and "\x1b" not in text.stdout and "closed" in text.stdout
    assert "\x1b" not in invoke(["corrupt-detect", *base, "--rdzv-id", "bad\x1b[31m"]).stdout


def test_set_edit_prune_and_the_exporter_are_refused_with_the_alternatives(cli_env, etcd_server):
    args = flags(etcd_server, new_run_id())
    result = invoke(["set", *args, "--closed", "--yes"])
    assert result.exit_code == 2 and "reset --mode" in result.stderr
    assert invoke(["edit", *args, "--yes"]).exit_code == 2
    prune = invoke(["reset", *args, "--mode", "prune", "--yes"])
    assert prune.exit_code == 2 and "--mode reopen" in prune.stderr
    exporter = invoke(["exporter", *args])
    assert exporter.exit_code == 2 and "watch" in exporter.stderr
    # the v2 event window holds torch's JSON values: history says so instead of replaying them as pickles
    history = invoke(["history", *args])
    assert history.exit_code == 2 and "legacy etcd JSON" in history.stderr and "watch" in history.stderr
    record = invoke(["watch", *args, "--record", "/nonexistent-dir/x.history"])
    assert record.exit_code == 2


def test_hostile_strings_in_the_state_are_shown_escaped(cli_env, etcd_server):
    run_id = new_run_id()
    hostile = "/x\x1b]0;owned\x07\u202e\nrdzvctl: all good"
    backend(etcd_server, run_id).set_state(json.dumps(
        {"status": "final", "version": "1", "participants": [0], "keep_alives": [hostile],
         "num_workers_waiting": 0}).encode())
    for args in (["get"], ["corrupt-detect"], ["get", "-o", "json"], ["reset", "--mode", "reopen", "--dry-run"]):
        result = invoke([*args, *flags(etcd_server, run_id)])
        text = result.stdout + result.stderr
        assert result.exit_code in (0, 1), (args, text)
        assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text, args
        assert not any(line.startswith("rdzvctl: all good") for line in text.splitlines()), args


@pytest.mark.torch
def test_two_handlers_then_every_read_command(cli_env, etcd_server, torch_peer):
    run_id = new_run_id()
    args = flags(etcd_server, run_id)
    watcher = subprocess.Popen([sys.executable, "-m", "rdzvctl", "watch", *args, "-o", "json", "--until",
                                "complete", "--for", "120", "--interval", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with agents(etcd_server.endpoint, run_id, 2) as group:
            rounds = rendezvous(group)
            version = rounds[0]["version"]
            out, err = watcher.communicate(timeout=60)
            assert watcher.returncode == 0, err
            kinds = [json.loads(line)["kind"] for line in out.splitlines()]
            assert kinds[0] == "snapshot" and kinds[-1] == "until-met" and "status" in kinds

            text = invoke(["get", *args])
            assert text.exit_code == 0, text.stderr
            assert "final" in text.stdout and f"rdzv/v_{version}/rank_1" in text.stdout
            doc = json_out(invoke(["get", *args, "-o", "json"]))
            assert doc["schema"] == "rdzvctl.get.legacy-etcd/v1" and doc["state"]["status"] == "final"
            assert [n["lease"] for n in doc["nodes"]] == ["alive", "alive"] and doc["problems"] == []
            assert doc["key"] == f"/torchelastic/p2p/run_{run_id}/rdzv/active_version"
            raw = invoke(["get", *args, "-o", "raw", "--force"]) if "--force" in invoke(
                ["get", "--help"]).stdout else invoke(["get", *args, "-o", "raw"])
            assert json.loads(raw.stdout)["status"] == "final"

            assert invoke(["corrupt-detect", *args]).exit_code == 0
            listed = json_out(invoke(["list", "--rdzv-backend", "etcd", "--rdzv-endpoint", etcd_server.endpoint,
                                      "-o", "json"]))
            row = next(r for r in listed["runs"] if r["run_id"] == run_id)
            assert row["status"] == "final" and row["participants"] == 2 and row["health"] == "ok"
    finally:
        if watcher.poll() is None:
            watcher.kill()


@pytest.mark.torch
def test_a_killed_handler_is_named_by_detect_and_watch(cli_env, etcd_server, torch_peer):
    run_id = new_run_id()
    args = flags(etcd_server, run_id)
    with agents(etcd_server.endpoint, run_id, 2) as group:
        rounds = rendezvous(group)
        watcher = subprocess.Popen([sys.executable, "-m", "rdzvctl", "watch", *args, "-o", "json", "--for",
                                    str(KEEPALIVE_TTL + 8), "--interval", "0.3"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        next(a for a, r in zip(group, rounds) if r["rank"] == 1).kill()
        result = wait_for_exit(["corrupt-detect", *args, "-o", "json"], 1, KEEPALIVE_TTL + 8)
        assert result.exit_code == 1, result.stdout
        (problem,) = json_out(result)["runs"][0]["problems"]
        assert problem["code"] == "dead-participant" and problem["nodes"] == ["rank_1"]
        assert "reset --mode reopen" in problem["repair"]
        try:  # the watch saw the lease expire too (it polls the leases; it is stopped once it said so)
            assert watcher.stdout is not None
            for line in watcher.stdout:
                event = json.loads(line)
                if event["kind"] == "keep-alive-expired":
                    assert "rank 1" in event["message"]
                    break
            else:
                raise AssertionError("watch ended without a keep-alive-expired event")
        finally:
            watcher.kill()
            watcher.wait(timeout=10)


def _closed_run(endpoint: str) -> str:
    run_id = new_run_id()
    with agents(endpoint, run_id, 2) as group:
        rendezvous(group)
        assert group[0].call("shutdown", "shutdown")["result"] is True
    return run_id


@pytest.mark.torch
def test_closed_run_detected_reopened_then_restored(cli_env, etcd_server, torch_peer):
    run_id = _closed_run(etcd_server.endpoint)
    args = flags(etcd_server, run_id)
    with agents(etcd_server.endpoint, run_id, 1, min_nodes=1, max_nodes=1) as (new,):
        assert new.call("next", "error")["type"] == "RendezvousClosedError"
        detect = invoke(["corrupt-detect", *args])
        assert detect.exit_code == 1
        assert "closed-run-in-use" in detect.stdout and "RendezvousClosedError" in detect.stdout
        before = backend(etcd_server, run_id).get_state()
        gate = invoke(["corrupt-detect", *args, "--for-launch", "-o", "json"])
        assert gate.exit_code == 1 and "RendezvousClosedError" in json_out(gate)["launch"]["reason"]

        refused = invoke(["reset", *args, "--mode", "reopen"])  # off a terminal, no --yes
        assert refused.exit_code == 2 and backend(etcd_server, run_id).get_state() == before
        dry = invoke(["reset", *args, "--mode", "reopen", "--dry-run"])
        assert dry.exit_code == 0 and "wait_for_rendezvous_to_free" in dry.stderr
        assert backend(etcd_server, run_id).get_state() == before

        done = invoke(["reset", *args, "--mode", "reopen", "--yes", "-o", "json"])
        assert done.exit_code == 0, done.stderr
        result = json_out(done)
        assert result["written"] is True and Path(result["backup"]).is_file()
        assert invoke(["corrupt-detect", *args, "--for-launch"]).exit_code == 0  # no state: a job creates one
        joined = new.call("next", "round")  # the same handler, retried: torch's init_phase made the next version
        assert joined["rank"] == 0 and int(joined["version"]) == int(json.loads(before[0])["version"]) + 1
        assert invoke(["corrupt-detect", *args]).exit_code == 0

        back = invoke(["restore", result["backup"], "--yes"])
        assert back.exit_code == 0, back.stderr
        assert backend(etcd_server, run_id).get_state()[0] == before[0]
        assert new.call("closed", "closed")["closed"] is True


@pytest.mark.torch
def test_clear_removes_the_run_and_a_new_handler_starts_at_version_1(cli_env, etcd_server, torch_peer):
    run_id = _closed_run(etcd_server.endpoint)
    args = flags(etcd_server, run_id)
    cleared = invoke(["reset", *args, "--mode", "clear", "--yes", "-o", "json"])
    assert cleared.exit_code == 0, cleared.stderr
    assert "worker needs to die" in cleared.stderr  # the plan says who it is for
    saved = json.loads(Path(json_out(cleared)["run_directory_backup"]).read_text())
    keys = json.loads(base64.b64decode(saved["state_base64"]))["keys"]
    assert f"/torchelastic/p2p/run_{run_id}/rdzv/version_counter" in keys
    refused = invoke(["restore", json_out(cleared)["run_directory_backup"], "--yes"])
    assert refused.exit_code == 6 and "forensics" in refused.stderr
    assert backend(etcd_server, run_id).read_run().run_dir is None
    with agents(etcd_server.endpoint, run_id, 1, min_nodes=1, max_nodes=1) as (new,):
        assert new.call("next", "round")["version"] == "1"


@pytest.mark.torch
def test_a_reset_racing_a_live_handler_exits_3_and_writes_nothing(cli_env, etcd_server, torch_peer, monkeypatch):
    run_id = new_run_id()
    b = backend(etcd_server, run_id)
    with agents(etcd_server.endpoint, run_id, 2) as (first, second):
        first.send("next")
        deadline = time.monotonic() + 60
        while not ((s := b.get_state()) and b'"participants": [0]' in s[0]):
            assert time.monotonic() < deadline, "the first handler did not join"
            time.sleep(0.1)
        original = rdzvctl.cli.legacy.LegacyWrites.write

        def handler_moves_first(self, backend_, token, new):
            second.send("next")  # a real handler writes between our read and our write
            first.expect("round")
            second.expect("round")
            return original(self, backend_, token, new)

        monkeypatch.setattr(rdzvctl.cli.legacy.LegacyWrites, "write", handler_moves_first)
        result = invoke(["reset", *flags(etcd_server, run_id), "--mode", "reopen", "--yes"])
        assert result.exit_code == 3, result.stderr
        assert "Changed meanwhile" in result.stderr and "nothing was removed" in result.stderr
        state = b.get_state()
        assert state is not None and json.loads(state[0])["status"] == "final"  # the handlers' write stands


def test_reopen_retries_on_the_fresh_state_after_a_conflict(cli_env, etcd_server, monkeypatch):
    run_id = new_run_id()
    b = backend(etcd_server, run_id)
    _, token, _ = b.set_state(b'{"status": "closed"}')
    original = rdzvctl.cli.legacy.LegacyWrites.write
    raced = []

    def another_writer_first(self, backend_, token_, new):
        if not raced:  # once: a concurrent writer lands between our read and our write
            raced.append(b.set_state(b'{"status": "closed", "version": "2"}', token_))
        return original(self, backend_, token_, new)

    monkeypatch.setattr(rdzvctl.cli.legacy.LegacyWrites, "write", another_writer_first)
    args = flags(etcd_server, run_id)
    assert invoke(["reset", *args, "--mode", "reopen", "--yes"]).exit_code == 3
    assert b.get_state()[0] == b'{"status": "closed", "version": "2"}'
    raced.clear()
    result = invoke(["reset", *args, "--mode", "reopen", "--yes", "--retry", "1"])
    assert result.exit_code == 0, result.stderr
    assert "Conflict: retrying" in result.stderr and b.get_state() is None
