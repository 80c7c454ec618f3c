"""A finished job's run id used again: after ``reset --mode clear`` or ``--mode reopen``, real
torchrun jobs with the same id run to completion, again and again.

Each job is two ``torchrun`` agents (tests/support/torchrun_jobs.py) on c10d
(a torch TCPStore), Redis or etcd v3 (rdzvctl's torchrun handlers), doing a
gloo all-reduce.  A job's agents advertise an address of their own
(``--local-addr 127.0.0.<n>``), so a rank that read an earlier job's
``MASTER_ADDR`` from the store (the hazard of restarting a run at a round
whose keys survive) is seen in the env its worker recorded.

The hazard was a race (rank 1 reading the old round-0 keys before rank 0
rewrote them), so every backend and mode runs several reruns, and the
deterministic half is asserted too: after ``clear`` the state's round is past
every round the store has keys for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from rdzvctl.state.codec import decode
from tests.support.cli import run_rdzvctl
from tests.support.torch_handlers import Target
from tests.support.torchrun_jobs import (
    JOB_BACKENDS,
    JobResult,
    JobRunner,
    unique_run_id,
)

pytestmark = [pytest.mark.slow, pytest.mark.torch]

RERUNS = 3
JOB_TIMEOUT = 120.0
#: Dead participants of a finished job expire after 1 s x 5 (torch's _sanitize): a reopened run
#: moves on to the next round that soon.
CONF = {"keep_alive_interval": 1, "keep_alive_max_attempt": 5}


def _backend(target: Target, run_id: str) -> Any:
    return open_backend(Address(target.backend, target.endpoint, run_id, dict(target.conf), timeout=10))


def _state(target: Target, run_id: str) -> Any:
    with _backend(target, run_id) as backend:
        current = backend.get_state()
    return None if current is None else decode(current[0])


def _store_rounds(target: Target, run_id: str) -> frozenset:
    with _backend(target, run_id) as backend:
        return backend.store_rounds()


def _run_job(runner: JobRunner, target: Target, run_id: str, index: int) -> JobResult:
    """A 2-agent job whose agents advertise 127.0.0.<index + 2>; asserts it completed, consistently."""
    addr = f"127.0.0.{index + 2}"
    result = runner.run(target, run_id, nodes=2, timeout=JOB_TIMEOUT, local_addr=addr, conf=CONF)
    assert result.ok, f"job {index} of {run_id}:\n{result.logs()}"
    _assert_one_world(result, addr)
    return result


def _assert_one_world(result: JobResult, addr: str) -> None:
    """Every worker saw this job's rank 0 and a world of 2 (not an earlier job's keys)."""
    envs: List[Dict[str, Any]] = result.envs()
    assert sorted(e["RANK"] for e in envs) == ["0", "1"], envs
    assert {(e["MASTER_ADDR"], e["WORLD_SIZE"]) for e in envs} == {(addr, "2")}, envs
    assert len({e["MASTER_PORT"] for e in envs}) == 1, envs
    assert result.logs().count("all-reduce 3.0 (expected 3.0)") == 2, result.logs()


def _reset(target: Target, run_id: str, mode: str, backups: Path) -> Dict[str, Any]:
    flags = ["--rdzv-backend", target.backend, "--rdzv-endpoint", target.endpoint, "--rdzv-id", run_id]
    if target.conf:
        flags += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in target.conf.items())]
    done = run_rdzvctl(["reset", *flags, "--mode", mode, "--yes", "-o", "json", "--backup-dir", str(backups),
                        "--timeout", "10"])
    assert done.returncode == 0, done.stderr
    assert "Round keys:" in done.stderr, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("mode", ["clear", "reopen"])
@pytest.mark.parametrize("job_target", JOB_BACKENDS, indirect=True)
def test_a_new_job_runs_after_reset(job_target: Target, mode: str, torchrun_jobs: JobRunner,
                                    tmp_path: Path) -> None:
    run_id = unique_run_id(f"rerun-{mode}")
    _run_job(torchrun_jobs, job_target, run_id, 0)
    finished = _state(job_target, run_id)
    assert finished.closed and finished.complete  # torchrun's shutdown() closes the run
    assert finished.round in _store_rounds(job_target, run_id)  # the round's keys outlive the job
    for rerun in range(1, RERUNS + 1):
        before = _state(job_target, run_id)
        rounds = _store_rounds(job_target, run_id)
        doc = _reset(job_target, run_id, mode, tmp_path / "backups")
        assert doc["written"] is True
        if mode == "clear":
            assert doc["action"] == "fresh-state" and doc["next_round"] > max(rounds)
            expected_round = doc["next_round"]
            fresh = _state(job_target, run_id)
            assert fresh.round == expected_round and not fresh.nodes and not fresh.closed
        else:
            expected_round = before.round + 1  # torch drops the dead participants, then moves on
        _run_job(torchrun_jobs, job_target, run_id, rerun)
        after = _state(job_target, run_id)
        assert after.round == expected_round and after.complete and after.closed, (rerun, after)


@pytest.mark.parametrize("job_target", ["redis"], indirect=True)  # the backend rounds: tests/test_round_keys.py
def test_a_state_removed_the_old_way_is_started_past_the_old_keys(job_target: Target, torchrun_jobs: JobRunner,
                                                                  tmp_path: Path) -> None:
    """The old clear removed only the state: round 0 keys stayed for the next job to read.

    ``reset --mode clear`` on such a run (no state, old keys) writes a fresh state past them.
    """
    run_id = unique_run_id("rerun-removed")
    _run_job(torchrun_jobs, job_target, run_id, 0)
    with _backend(job_target, run_id) as backend:
        assert backend.clear(backend.get_state()[1])  # what `reset --mode clear` used to do
        assert backend.get_state() is None
        assert 0 in backend.store_rounds()  # a new job would start at round 0 over these
    doc = _reset(job_target, run_id, "clear", tmp_path / "backups")
    assert (doc["written"], doc["action"]) == (True, "fresh-state") and doc["next_round"] >= 1
    _run_job(torchrun_jobs, job_target, run_id, 1)
    assert _state(job_target, run_id).round == doc["next_round"]
