"""Real torch ``DynamicRendezvousHandler`` nodes in subprocesses, over any backend.

A :class:`NodeFactory` starts one zygote process (``tests/e2e_cli/rdzv_node.py``)
that imports torch once and forks a node per :meth:`NodeFactory.spawn`; each node
is its own process (its own pid, so its own torch node id) that a test drives
with commands (``next``, ``waiting``, ``closed``, ``shutdown``) and can kill
with any signal.  A :class:`Target` says where a rendezvous lives and how both
torch's handlers and rdzvctl address it.  ``node_factory`` is registered by
``pytest_plugins`` in ``tests/conftest.py``::

    def test_round(node_factory, target):
        with node_factory.group(target, "job42", count=3) as nodes:
            rounds = nodes.next_round()
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

__all__ = [
    "Target",
    "RendezvousNode",
    "NodeGroup",
    "NodeFactory",
    "NodeError",
    "frozen",
    "node_factory",
    "RDZVCTL_KEEP_ALIVE",
]

NODE_SCRIPT = Path(__file__).resolve().parents[1] / "e2e_cli" / "rdzv_node.py"
REPO_ROOT = Path(__file__).resolve().parents[2]

# rdzvctl's liveness matching the nodes' defaults (keep_alive_interval=1, keep_alive_max_attempt=3).
RDZVCTL_KEEP_ALIVE = {"keep_alive_interval": "1", "keep_alive_max_attempt": "3"}


@dataclass
class Target:
    """A backend server as torchrun and rdzvctl address it.

    ``backend`` is the name both torchrun and rdzvctl use; ``conf`` holds the
    backend options both understand (``store_type=file`` for a FileStore).
    """

    id: str
    backend: str
    endpoint: str
    conf: Dict[str, str] = field(default_factory=dict)
    lists_runs: bool = True

    def address(self, run_id: Optional[str], **extra: Any) -> List[str]:
        """rdzvctl's address flags; ``extra`` adds --rdzv-conf options (keep-alive by default)."""
        conf = {**self.conf, **RDZVCTL_KEEP_ALIVE, **{k: str(v) for k, v in extra.items()}}
        args = ["--rdzv-backend", self.backend, "--rdzv-endpoint", self.endpoint]
        if run_id is not None:
            args += ["--rdzv-id", run_id]
        return args + ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in conf.items())]


class NodeError(AssertionError):
    """A node answered with an error, died, or did not answer in time."""


class RendezvousNode:
    """One handler process, driven over its connection to the zygote."""

    def __init__(self, conn: socket.socket, timeout: float) -> None:
        self._conn = conn
        self._writer = conn.makefile("w", encoding="utf-8")
        self._events: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.expect("ready", timeout)
        self.node_id: str = ready["node"]
        self.pid: int = ready["pid"]

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._conn.makefile("r", encoding="utf-8"):
                self._events.put(json.loads(line))
        self._events.put(None)  # the node is gone

    def send(self, command: str) -> None:
        self._writer.write(command + "\n")
        self._writer.flush()

    def event(self, timeout: float) -> Dict[str, Any]:
        """The node's next answer (``{"event": "error", ...}`` included)."""
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            raise NodeError(f"node {getattr(self, 'node_id', '?')} did not answer within {timeout:g}s") from None
        if event is None:
            self._events.put(None)
            raise NodeError(f"node {getattr(self, 'node_id', '?')} exited")
        return event

    def expect(self, kind: str, timeout: float = 30.0) -> Dict[str, Any]:
        event = self.event(timeout)
        if event["event"] != kind:
            raise NodeError(f"expected {kind!r} from node {getattr(self, 'node_id', '?')}, got {event}")
        return event

    def call(self, command: str, kind: str, timeout: float = 30.0) -> Dict[str, Any]:
        self.send(command)
        return self.expect(kind, timeout)

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL: no shutdown(), no last heartbeat."""
        self.signal(signal.SIGKILL)
        self.wait_gone()

    def wait_gone(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise NodeError(f"node {self.node_id} still runs after {timeout:g}s")

    def close(self) -> None:
        """Leave without shutdown() (the keep-alive stops with the process)."""
        with contextlib.suppress(OSError, ValueError):
            self.send("exit")
        with contextlib.suppress(OSError):
            self._conn.close()


class NodeGroup:
    """Nodes of one run id; every method answers per node, in order."""

    def __init__(self, nodes: List[RendezvousNode]) -> None:
        self.nodes = nodes

    def __iter__(self) -> Iterator[RendezvousNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> RendezvousNode:
        return self.nodes[index]

    def next_round(self, timeout: float = 45.0) -> List[Dict[str, Any]]:
        """All nodes call next_rendezvous(); returns their ``round`` answers."""
        for node in self.nodes:
            node.send("next")
        return [node.expect("round", timeout) for node in self.nodes]


def _holds_file_lock(pids: List[int]) -> bool:
    """True if any of ``pids`` holds a flock/POSIX lock (a FileStore op in flight)."""
    try:
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return False
    wanted = {str(pid) for pid in pids}
    return any(len(parts) > 4 and parts[4] in wanted for parts in (line.split() for line in lines))


@contextlib.contextmanager
def frozen(nodes: List[RendezvousNode], attempts: int = 100) -> Iterator[None]:
    """SIGSTOP ``nodes`` (no heartbeats, no writes) for the block, then SIGCONT.

    A node is never left frozen while it holds a FileStore lock, which would
    block every other reader of the file.
    """
    pids = [node.pid for node in nodes]
    try:
        for _ in range(attempts):
            for node in nodes:
                node.signal(signal.SIGSTOP)
            time.sleep(0.02)
            if not _holds_file_lock(pids):
                break
            for node in nodes:
                node.signal(signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise NodeError("could not freeze the nodes outside a FileStore operation")
        yield
    finally:
        for node in nodes:
            node.signal(signal.SIGCONT)


class NodeFactory:
    """A zygote process forking rendezvous nodes; kills everything it started on stop().

    The zygote starts importing torch at once; the first :meth:`spawn` waits for it.
    """

    def __init__(self, start_timeout: float = 60.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="rdzvctl-nodes-")
        self.path = os.path.join(self._dir, "zygote.sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, str(NODE_SCRIPT), "--zygote", self.path],
            stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        self._nodes: List[RendezvousNode] = []
        self._lock = threading.Lock()
        self._start_timeout = start_timeout
        self._ready = False

    def _wait_ready(self) -> None:
        """The zygote imports torch in the background; the first spawn waits for it."""
        if self._ready:
            return
        line = _readline(self.process, self._start_timeout)
        if line.strip() != "ready":
            raise RuntimeError(f"the rendezvous node zygote did not start (said {line!r})")
        self._ready = True

    def spawn(self, target: Target, run_id: str, *, min_nodes: int = 2, max_nodes: int = 3,
              timeout: float = 30.0, **conf: Any) -> RendezvousNode:
        """A new handler process for ``run_id`` on ``target`` (``conf`` overrides handler options)."""
        self._wait_ready()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        options = {"backend": target.backend, "endpoint": target.endpoint, "run_id": run_id,
                   "min_nodes": min_nodes, "max_nodes": max_nodes, "conf": {**target.conf, **conf}}
        conn.sendall((json.dumps(options) + "\n").encode())
        node = RendezvousNode(conn, timeout)
        with self._lock:
            self._nodes.append(node)
        return node

    @contextlib.contextmanager
    def group(self, target: Target, run_id: str, count: int, **options: Any) -> Iterator[NodeGroup]:
        """``count`` nodes of one run id, killed (SIGKILL) when the block ends.

        By default min_nodes = max_nodes = count: the round completes as soon as
        all have joined, without a last call.
        """
        options.setdefault("min_nodes", count)
        options.setdefault("max_nodes", count)
        nodes: List[RendezvousNode] = []
        try:
            for _ in range(count):
                nodes.append(self.spawn(target, run_id, **options))
            yield NodeGroup(nodes)
        finally:
            for node in nodes:
                node.signal(signal.SIGKILL)
                node.close()

    def stop(self) -> None:
        with self._lock:
            nodes, self._nodes = self._nodes, []
        for node in nodes:
            node.signal(signal.SIGKILL)
            node.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


def _readline(process: subprocess.Popen, timeout: float) -> str:
    """One line of ``process``'s stdout, or '' after ``timeout``."""
    result: List[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


@pytest.fixture(scope="session")
def node_factory() -> Iterator[NodeFactory]:
    pytest.importorskip("torch")
    factory = NodeFactory()
    try:
        yield factory
    finally:
        factory.stop()
