"""The torchrun job harness itself (tests/support/torchrun_jobs.py): a kill -9 of one agent, the
survivor training again on its own, and a teardown that leaves no agent or worker running."""

from __future__ import annotations

import signal

import pytest

from tests.support.torchrun_jobs import (
    JobRunner,
    JobTimeout,
    running,
    unique_run_id,
)

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def test_kill_one_agent_and_the_survivor_trains_alone(job_target, torchrun_jobs: JobRunner) -> None:
    job = torchrun_jobs.start(job_target, unique_run_id("harness"), nodes=2, min_nodes=1, max_nodes=2,
                              max_restarts=2, hold=120, loop=True, conf={"keep_alive_max_attempt": 5})
    job.wait_trained(timeout=120)
    first = job.envs()
    assert sorted(e["RANK"] for e in first) == ["0", "1"] and {e["WORLD_SIZE"] for e in first} == {"2"}
    for done in job.directory.glob("rank*.done"):
        done.unlink()
    job.kill(1)  # SIGKILL, the agent and its worker
    assert job.procs[1].returncode == -signal.SIGKILL
    # The survivor's worker fails in its all-reduce, its agent restarts it in a world of one.
    job.wait_for(lambda: job.done_ranks() == [0] and any(e["WORLD_SIZE"] == "1" for e in job.envs()),
                 timeout=120, what="the survivor to train alone", allow_exit=True)
    job.release()
    result = job.wait(timeout=60, indices=[0])
    assert result.returncodes[0] == 0, result.logs()
    assert [e["TORCHELASTIC_RESTART_COUNT"] for e in job.envs() if e["WORLD_SIZE"] == "1"] == ["1"]


def test_stop_kills_every_agent_and_worker(job_target, torchrun_jobs: JobRunner) -> None:
    job = torchrun_jobs.start(job_target, unique_run_id("harness"), nodes=2, hold=120)
    job.wait_trained(timeout=120)
    pids = [p.pid for p in job.procs] + [e["pid"] for e in job.envs()]
    with pytest.raises(JobTimeout, match="did not end within"):
        job.wait(timeout=0.5)  # holding: the wait is bounded and says so, with the logs
    job.stop()
    assert not [pid for pid in pids if running(pid)]
