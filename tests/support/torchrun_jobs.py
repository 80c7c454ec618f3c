"""Real ``torchrun`` jobs for scenario tests: N agents as subprocesses, gloo on loopback.

Each agent is ``python -m torch.distributed.run`` with ``--nnodes=MIN:MAX``,
``--rdzv-backend/--rdzv-endpoint/--rdzv-id/--rdzv-conf``, a short
``--monitor-interval`` and ``--max-restarts``, running ``tests/e2e/allreduce.py``
(a gloo all-reduce; it records its env in the job directory and can hold, or
keep all-reducing, until the test releases it).  Backends: ``c10d`` on a torch
TCPStore the test started (``tests/support/torch_peer.py``, IPv4 listen fd),
``redis`` and ``etcd-v3`` through rdzvctl's torchrun handlers (entry points).

Everything is bounded: every wait takes a timeout (and raises
:class:`JobTimeout` with the agents' logs), and :meth:`TorchrunJob.stop`
(called by the ``torchrun_jobs`` fixture, or the ``with`` block) SIGKILLs
every agent's process group and every worker (torch starts workers in
sessions of their own), whatever happened.  The fixtures (and the server
fixtures ``job_target`` asks for) are registered by ``pytest_plugins`` in
``tests/conftest.py``::

    @pytest.mark.parametrize("job_target", ["c10d", "redis", "etcd-v3"], indirect=True)
    def test_job(job_target, torchrun_jobs):
        job = torchrun_jobs.start(job_target, "job42", nodes=2)
        result = job.wait(timeout=120)
        assert result.returncodes == [0, 0], result.logs()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import pytest

from tests.support.torch_handlers import Target

__all__ = [
    "WORKER",
    "JOB_BACKENDS",
    "DEFAULT_CONF",
    "JobTimeout",
    "JobResult",
    "TorchrunJob",
    "JobRunner",
    "c10d_target",
    "job_target",
    "torchrun_jobs",
    "unique_run_id",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = REPO_ROOT / "tests" / "e2e" / "allreduce.py"

#: The backends a job can run on (``job_target`` params).
JOB_BACKENDS = ("c10d", "redis", "etcd-v3")

#: torch handler options (``--rdzv-conf``) for fast, still robust jobs on a loaded machine:
#: a 1 s last call, 1 s heartbeats that may be missed 10 times, bounded store reads.
DEFAULT_CONF: Dict[str, str] = {
    "join_timeout": "60",
    "last_call_timeout": "1",
    "close_timeout": "10",
    "heartbeat_timeout": "10",
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "10",
    "read_timeout": "30",
}


def unique_run_id(tag: str = "job") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


class JobTimeout(AssertionError):
    """The job did not end within the timeout; the message carries the agents' logs."""


@dataclass
class JobResult:
    """How a job ended: one exit code per agent (None: still running when the wait ended)."""

    returncodes: List[Optional[int]]
    directory: Path
    log_paths: List[Path]

    def log(self, index: int) -> str:
        try:
            return self.log_paths[index].read_text(errors="replace")
        except OSError:
            return ""

    def logs(self, tail: int = 4000) -> str:
        """Every agent's log (its last ``tail`` characters), for assertion messages."""
        return "\n".join(f"--- agent {i} (exit {code}) ---\n{self.log(i)[-tail:]}"
                         for i, code in enumerate(self.returncodes))

    def envs(self) -> List[Dict[str, Any]]:
        """The env records of every worker that started (see tests/e2e/allreduce.py)."""
        return read_envs(self.directory)

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes)


def read_envs(directory: Path) -> List[Dict[str, Any]]:
    records = []
    for path in sorted(directory.glob("env.*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def _children(pid: int) -> List[int]:
    found: List[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    seen: List[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def _kill(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1] != "Z"
    except OSError:
        return False


def _is_our_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(WORKER).encode() in f.read()
    except OSError:
        return False


class TorchrunJob:
    """N torchrun agents of one run id, each in its own process group, logs in ``directory``."""

    def __init__(
        self,
        target: Target,
        run_id: str,
        directory: Path,
        nodes: int = 2,
        *,
        min_nodes: Optional[int] = None,
        max_nodes: Optional[int] = None,
        nproc_per_node: int = 1,
        max_restarts: int = 0,
        monitor_interval: float = 0.5,
        conf: Optional[Mapping[str, Any]] = None,
        hold: float = 0,
        loop: bool = False,
        local_addr: Union[str, Sequence[str]] = "127.0.0.1",
        share_store: bool = False,
        pg_timeout: float = 60,
        env: Optional[Mapping[str, str]] = None,
        worker: Path = WORKER,
    ) -> None:
        """``hold``: seconds the workers wait for :meth:`release` after the all-reduce (0: exit
        at once); ``loop``: all-reduce while holding (a dead peer fails the workers);
        ``local_addr``: each agent's ``--local-addr`` (rank 0's becomes ``MASTER_ADDR``), one
        for all or one per agent; ``share_store``: torch's default agent-store sharing (off:
        ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which recovers quickly after a kill)."""
        if target.backend in ("redis", "etcd-v3") and target.backend not in {
                e.name for e in entry_points(group="torchrun.handlers")}:
            pytest.skip(f"rdzvctl's torchrun plugin {target.backend!r} is not registered (pip install -e .)")
        self.target = target
        self.run_id = run_id
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.min_nodes = nodes if min_nodes is None else min_nodes
        self.max_nodes = nodes if max_nodes is None else max_nodes
        self.nproc_per_node = nproc_per_node
        self.max_restarts = max_restarts
        self.monitor_interval = monitor_interval
        self.conf = {**DEFAULT_CONF, **target.conf, **{k: str(v) for k, v in (conf or {}).items()}}
        if target.backend == "c10d":
            self.conf.setdefault("is_host", "false")  # the test hosts the TCPStore
        self.hold = hold
        self.loop = loop
        self.local_addrs = [local_addr] * nodes if isinstance(local_addr, str) else list(local_addr)
        self.share_store = share_store
        self.pg_timeout = pg_timeout
        self.extra_env = dict(env or {})
        self.worker = worker
        self.procs: List[subprocess.Popen] = []
        self.log_paths: List[Path] = []
        self._worker_pids: List[int] = []

    # -- starting ------------------------------------------------------------------------------
    def command(self, index: int) -> List[str]:
        nnodes = str(self.min_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes}:{self.max_nodes}"
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nnodes}", f"--nproc-per-node={self.nproc_per_node}",
            f"--max-restarts={self.max_restarts}", f"--monitor-interval={self.monitor_interval:g}",
            f"--rdzv-backend={self.target.backend}", f"--rdzv-endpoint={self.target.endpoint}",
            f"--rdzv-id={self.run_id}",
            "--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in self.conf.items()),
            f"--local-addr={self.local_addrs[index % len(self.local_addrs)]}",
            str(self.worker),
        ]

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(
            RDZV_E2E_DIR=str(self.directory),
            RDZV_E2E_HOLD=f"{self.hold:g}",
            RDZV_E2E_LOOP="1" if self.loop else "0",
            RDZV_E2E_PG_TIMEOUT=f"{self.pg_timeout:g}",
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME="lo",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        if self.share_store:
            env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
        else:
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> "TorchrunJob":
        """Start every agent (``nodes`` of them); :meth:`add_agent` starts one more later."""
        for _ in range(self.nodes):
            self.add_agent()
        return self

    def add_agent(self) -> int:
        """Start one more agent (e.g. a scale-up or a replacement); returns its index."""
        index = len(self.procs)
        path = self.directory / f"agent{index}.log"
        with open(path, "ab") as log:
            proc = subprocess.Popen(self.command(index), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.environment(), cwd=REPO_ROOT,
                                    start_new_session=True)
        self.procs.append(proc)
        self.log_paths.append(path)
        return index

    # -- observing -----------------------------------------------------------------------------
    def result(self) -> JobResult:
        return JobResult([proc.poll() for proc in self.procs], self.directory, list(self.log_paths))

    def envs(self) -> List[Dict[str, Any]]:
        return read_envs(self.directory)

    def done_ranks(self) -> List[int]:
        """Global ranks whose worker finished the first all-reduce."""
        return sorted(int(p.name[4:-5]) for p in self.directory.glob("rank*.done"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str,
                 allow_exit: bool = False) -> None:
        """Poll ``predicate`` every 0.1 s for at most ``timeout`` s; raise :class:`JobTimeout`
        (with logs) on timeout, or as soon as an agent fails unless ``allow_exit``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._note_workers()
            failed = [(i, p.returncode) for i, p in enumerate(self.procs)
                      if p.poll() is not None and p.returncode != 0]
            if failed and not allow_exit:
                raise JobTimeout(f"agents {failed} exited while waiting for {what}\n{self.result().logs()}")
            if time.monotonic() > deadline:
                raise JobTimeout(f"timed out after {timeout:g}s waiting for {what}\n{self.result().logs()}")
            time.sleep(0.1)

    def wait_trained(self, timeout: float = 120.0) -> None:
        """Until every worker of the world finished its first all-reduce."""
        world = self.nodes * self.nproc_per_node
        self.wait_for(lambda: len(self.done_ranks()) >= world, timeout, f"{world} workers to all-reduce")

    def wait(self, timeout: float = 120.0, indices: Optional[Sequence[int]] = None) -> JobResult:
        """Wait (at most ``timeout`` s) until the agents (all, or ``indices``) exit; on timeout
        raise :class:`JobTimeout` with the logs (the agents keep running until :meth:`stop`)."""
        wanted = [self.procs[i] for i in (range(len(self.procs)) if indices is None else indices)]
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in wanted):
            self._note_workers()
            if time.monotonic() > deadline:
                raise JobTimeout(f"the job {self.run_id} did not end within {timeout:g}s\n{self.result().logs()}")
            time.sleep(0.1)
        return self.result()

    # -- acting --------------------------------------------------------------------------------
    def release(self) -> None:
        """Let holding workers finish (they exit 0 after a last barrier)."""
        (self.directory / "release").write_text("")

    def kill(self, index: int, sig: int = signal.SIGKILL, workers: bool = True, timeout: float = 10.0) -> None:
        """Send ``sig`` (default SIGKILL: no shutdown, no last heartbeat) to agent ``index``;
        with ``workers`` its workers get it too (a node crash).  Waits until the agent is gone."""
        proc = self.procs[index]
        victims = descendants(proc.pid) if workers else []
        _kill(proc.pid, sig)
        for pid in victims:
            _kill(pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise JobTimeout(f"agent {index} still runs {timeout:g}s after signal {sig}") from None

    def _note_workers(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    if pid not in self._worker_pids:
                        self._worker_pids.append(pid)

    def stop(self) -> None:
        """Kill everything still running, at once: SIGKILL to each agent's process group and to
        every worker seen (torch starts workers in sessions of their own).  Teardown needs no
        grace; a test that wants torchrun's own SIGTERM handling uses ``kill(i, SIGTERM)``."""
        self._note_workers()
        pids = set(self._worker_pids) | {r["pid"] for r in self.envs() if isinstance(r.get("pid"), int)}
        for proc in self.procs:
            if proc.poll() is None:
                _kill(proc.pid, signal.SIGKILL, group=True)
        killed = []
        for pid in pids:
            if _is_our_worker(pid) or pid in self._worker_pids:
                _kill(pid, signal.SIGKILL, group=True)
                _kill(pid, signal.SIGKILL)
                killed.append(pid)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # A worker is not our child (torch's agent was its parent): SIGKILL is sent, not waited for,
        # and a large process takes a moment to tear down.  Stopped means gone (or a zombie).
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> "TorchrunJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class JobRunner:
    """Starts jobs, each in a directory of its own, and stops all of them at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.jobs: List[TorchrunJob] = []

    def job(self, target: Target, run_id: str, nodes: int = 2, **options: Any) -> TorchrunJob:
        """A job not started yet (call ``start()``)."""
        directory = self.base / f"job{len(self.jobs)}-{run_id}"
        job = TorchrunJob(target, run_id, directory, nodes, **options)
        self.jobs.append(job)
        return job

    def start(self, target: Target, run_id: str, nodes: int = 2, **options: Any) -> TorchrunJob:
        return self.job(target, run_id, nodes, **options).start()

    def run(self, target: Target, run_id: str, nodes: int = 2, timeout: float = 120.0,
            **options: Any) -> JobResult:
        """Start a job and wait for it to end; the agents are stopped in any case."""
        with self.start(target, run_id, nodes, **options) as job:
            return job.wait(timeout)

    def stop(self) -> None:
        for job in self.jobs:
            job.stop()


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture()
def torchrun_jobs(tmp_path: Path) -> Iterator[JobRunner]:
    """A :class:`JobRunner`; every agent and worker it started is killed at teardown."""
    runner = JobRunner(tmp_path / "jobs")
    try:
        yield runner
    finally:
        runner.stop()


def c10d_target() -> Target:
    """torch's c10d backend on a torch TCPStore (libuv, IPv4 listen fd) the tests host."""
    from tests.support.torch_peer import shared_tcpstore

    server = shared_tcpstore(use_libuv=True)
    return Target("c10d", "c10d", server.endpoint, {})


@pytest.fixture()
def job_target(request: pytest.FixtureRequest) -> Target:
    """Where a job rendezvouses (parametrise indirectly with :data:`JOB_BACKENDS`):
    ``c10d`` a test-hosted TCPStore, ``redis`` a redis-server, ``etcd-v3`` an etcd member."""
    pytest.importorskip("torch")
    name = getattr(request, "param", "c10d")
    if name == "c10d":
        return c10d_target()
    if name == "redis":
        server = request.getfixturevalue("redis_server")
        return Target("redis", "redis", server.endpoint, {})
    if name == "etcd-v3":
        cluster = request.getfixturevalue("etcd_server")
        return Target("etcd-v3", "etcd-v3", cluster.endpoint, cluster.conf())
    raise ValueError(f"no job target {name!r}")


def job_dir(prefix: str = "rdzvctl-job-") -> Path:
    """A fresh directory outside pytest's tmp_path (for use without fixtures)."""
    return Path(tempfile.mkdtemp(prefix=prefix))

