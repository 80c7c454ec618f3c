"""Diagnoses against real torchrun jobs: what rdzvctl says is what torch does next.

Real ``torchrun`` agents (tests/support/torchrun_jobs.py: subprocesses, gloo on
loopback, 0.5 s monitor interval, 1 s heartbeats) on c10d, Redis and etcd-v3;
rdzvctl runs as a real process and judges liveness with the job's own
keep-alive settings.

1. kill -9 of an agent during training: while torch's survivors restart and
   re-rendezvous by themselves, ``corrupt-detect`` never recommends a write,
   and it names the dead node; the survivors' next round completes.
2. an abnormal end (a survivor without restarts left closes the run): the
   blocking finding is ``closed`` (a new job with this id fails) with
   ``reset --mode reopen``, no prune; after the reopen a new job rendezvous
   and torch drops the dead entries itself.
3. a clean finish: a finished run, and the launch gate says no.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, List, Optional

import pytest

from tests.support.cli import run_rdzvctl
from tests.support.torchrun_jobs import DEFAULT_CONF, JobRunner, unique_run_id

pytestmark = [pytest.mark.slow, pytest.mark.torch]

BACKENDS = ["c10d", "redis", "etcd-v3"]
#: rdzvctl judges liveness exactly as the job's agents do.
JOB_KEEP_ALIVE = {"keep_alive_interval": DEFAULT_CONF["keep_alive_interval"],
                  "keep_alive_max_attempt": DEFAULT_CONF["keep_alive_max_attempt"]}


def _flags(target: Any, run_id: str) -> List[str]:
    return [*target.address(run_id, **JOB_KEEP_ALIVE), "--timeout", "10"]


def detect(target: Any, run_id: str, *extra: str) -> Dict[str, Any]:
    """``corrupt-detect -o json`` as a real process; the document plus ``_code``."""
    result = run_rdzvctl(["corrupt-detect", *_flags(target, run_id), "-o", "json", *extra])
    assert result.returncode in (0, 1, 5), result.stderr
    doc = json.loads(result.stdout) if result.stdout.strip() else {"runs": []}
    doc["_code"] = result.returncode
    return doc


def wait_until(check: Callable[[], Optional[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.3)


def _writes(run: Dict[str, Any]) -> List[str]:
    """Repairs that would write (every rdzvctl repair starts with ``rdzvctl``)."""
    return [p["repair"] for p in run["problems"] if p["repair"].startswith("rdzvctl")]


def _node_id(job: Any, index: int) -> str:
    """torch's ``_NodeDescGenerator``: ``<local addr>_<agent pid>_<local id>`` (the agent's first handler: 0)."""
    return f"{job.local_addrs[index]}_{job.procs[index].pid}_0"


@pytest.mark.parametrize("job_target", BACKENDS, indirect=True)
def test_kill_during_training_recovers_and_nothing_is_advised(job_target: Any, torchrun_jobs: JobRunner) -> None:
    run_id = unique_run_id("kill")
    job = torchrun_jobs.start(job_target, run_id, nodes=3, min_nodes=2, max_nodes=3, max_restarts=3,
                              hold=120, loop=True)
    job.wait_trained()
    first = detect(job_target, run_id)["runs"][0]
    assert first["phase"] == "complete" and first["problems"] == [] and first["round"] is not None
    victim = _node_id(job, 2)
    job.kill(2)

    reports: List[Dict[str, Any]] = []

    def recovered() -> bool:
        run = detect(job_target, run_id)["runs"][0]
        reports.append(run)
        return run["phase"] == "complete" and run["round"] > first["round"]

    wait_until(recovered, 90, "the survivors' next round")
    during = [r for r in reports if r["phase"] != "complete"]
    assert during, [r["phase"] for r in reports]  # the recovery was seen
    for run in reports:
        if run["phase"] == "recovering":
            assert not _writes(run), run  # never a write that fights torch's own recovery
    named = [r for r in during if victim in r["lifecycle"]["nodes"]
             or any(victim in p["nodes"] for p in r["problems"])]
    assert named, during  # the dead node is named
    assert all(r["phase"] in ("complete", "recovering", "forming") for r in reports), [r["phase"] for r in reports]
    job.release()
    result = job.wait(timeout=60, indices=[0, 1])
    assert result.returncodes[:2] == [0, 0], result.logs()


@pytest.mark.parametrize("job_target", BACKENDS, indirect=True)
def test_abnormal_end_reports_closed_with_reopen_then_a_new_job_runs(job_target: Any,
                                                                     torchrun_jobs: JobRunner) -> None:
    run_id = unique_run_id("abend")
    job = torchrun_jobs.start(job_target, run_id, nodes=2, max_restarts=0, hold=120, loop=True)
    job.wait_trained()
    job.kill(1)  # the survivor's workers fail; without restarts left its agent closes the run and exits
    result = job.wait(timeout=90, indices=[0])
    assert result.returncodes[0] != 0, result.logs()

    def finished() -> Optional[Dict[str, Any]]:
        doc = detect(job_target, run_id)
        return doc if doc["runs"] and doc["runs"][0]["phase"] == "finished" else None

    doc = wait_until(finished, 40, "every agent's heartbeat to expire")
    run = doc["runs"][0]
    assert doc["_code"] == 1
    blocking = run["problems"][0]
    assert blocking["code"] == "closed" and blocking["severity"] == "error", run
    assert blocking["torch_next"] == "new-job-fails" and "RendezvousClosedError" in blocking["outlook"]
    assert blocking["repair"].startswith("rdzvctl reset --mode reopen")
    assert not [r for r in _writes(run) if "prune" in r or "--add-waiting" in r], run  # there are no survivors
    gate = run_rdzvctl(["corrupt-detect", *_flags(job_target, run_id), "--for-launch"])
    assert gate.returncode == 1 and "launch  no: the run is closed" in gate.stdout, gate.stdout

    reopened = run_rdzvctl(["reset", *_flags(job_target, run_id), "--mode", "reopen", "--yes",
                            "--backup-dir", str(torchrun_jobs.base / "backups")])
    assert reopened.returncode == 0, reopened.stderr
    gate = run_rdzvctl(["corrupt-detect", *_flags(job_target, run_id), "--for-launch"])
    assert gate.returncode == 0, gate.stdout
    rerun = torchrun_jobs.run(job_target, run_id, nodes=2, timeout=120)  # torch drops the dead entries itself
    assert rerun.ok, rerun.logs()


@pytest.mark.parametrize("job_target", BACKENDS, indirect=True)
def test_clean_finish_is_a_finished_run_and_the_launch_gate_says_no(job_target: Any,
                                                                   torchrun_jobs: JobRunner) -> None:
    run_id = unique_run_id("done")
    result = torchrun_jobs.run(job_target, run_id, nodes=2, timeout=120)
    assert result.ok, result.logs()
    doc = detect(job_target, run_id, "--settle")  # decided within one keep-alive window
    run = doc["runs"][0]
    assert run["phase"] == "finished", run
    codes = [p["code"] for p in run["problems"]]
    assert codes[0] == "closed" and "closed-while-alive" not in codes, codes
    gate = run_rdzvctl(["corrupt-detect", *_flags(job_target, run_id), "--for-launch", "-o", "json"])
    assert gate.returncode == 1, gate.stdout
    assert json.loads(gate.stdout)["launch"]["ok"] is False


def test_survivors_keeping_a_dead_rank0_address_are_recognised(torchrun_jobs: JobRunner) -> None:
    """torch's default shared agent store: after kill -9 of rank 0's agent the survivors' next rounds fail on
    its address (a new rank 0 publishes its own, the other survivor keeps the old one:
    ``DynamicRendezvousHandler.next_rendezvous``); rdzvctl names the round and the address nothing listens on."""
    from tests.support.torchrun_jobs import c10d_target

    target = c10d_target()
    run_id = unique_run_id("share")
    job = torchrun_jobs.start(target, run_id, nodes=3, min_nodes=2, max_nodes=3, max_restarts=5, hold=120,
                              loop=True, share_store=True, pg_timeout=8)
    job.wait_trained()
    first = json.loads(run_rdzvctl(["get", *_flags(target, run_id), "--keys", "-o", "json"]).stdout)
    published = first["store_keys"]
    rank0 = min(range(3), key=lambda i: job.procs[i].pid)  # torch ranks nodes by (addr, pid, local id)
    job.kill(rank0)

    def reported() -> Optional[Dict[str, Any]]:
        run = detect(target, run_id)["runs"][0]
        found = [p for p in run["problems"] if p["code"] == "master-addr-dead"]
        return found[0] if found else None

    finding = wait_until(reported, 150, "master-addr-dead")
    round0 = f"{published['0/MASTER_ADDR']}:{published['0/MASTER_PORT']}"
    assert "round 0" in finding["message"] and round0 in finding["message"], finding
    assert "refused" in finding["message"] and finding["torch_next"] == "agents-fail"
    assert "restart every agent" in finding["repair"]
