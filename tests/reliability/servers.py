"""Backend servers the reliability tests can kill, restart on the same port, and pause.

Every backend is reached through a :class:`Target` (how rdzvctl addresses it)
with an optional :class:`Server` behind it (what a fault test does to it):

* ``c10d-tcp``  a torch TCPStore (libuv) forked from a zygote that imported torch
  once, so a restart on the same port takes milliseconds; a restart loses the
  data, as it does for torch (the store lives in memory);
* ``c10d-file`` a FileStore file; there is no server, but a process holding
  torch's exclusive ``flock`` stands in for a stuck peer;
* ``redis``     redis-server with ``--appendonly yes --appendfsync always``, so a
  write acknowledged before SIGKILL survives the restart;
* ``etcd-v2`` / ``etcd-v3`` one etcd member (v2 API on) with a data directory
  that outlives its process.

Servers are stopped by the fixtures that start them (see ``conftest.py``).  The
launchers are the test suite's own (:class:`tests.support.redis_server.RedisServer`,
:class:`tests.support.etcd_server.EtcdCluster`) on the one harness,
:mod:`tests.support.harness`; this module adds kill, restart and pause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.backends.registry import open_backend
from tests.support.etcd_server import EtcdCluster
from tests.support.redis_server import RedisServer

__all__ = [
    "BACKEND_IDS",
    "Server",
    "TcpStoreZygote",
    "TcpStoreServer",
    "RedisAofServer",
    "EtcdServer",
    "FileLockHolder",
    "Target",
    "make_target",
]

#: Every backend the suite runs against, in the order the summary lists them.
BACKEND_IDS = ("c10d-tcp", "c10d-file", "redis", "etcd-v2", "etcd-v3")

class Server:
    """What a fault test does to a server: SIGKILL, start again, SIGSTOP/SIGCONT."""

    name = "server"
    persistent = False  # True: what was acknowledged survives kill() + start()

    @property
    def pid(self) -> int:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def ensure_running(self) -> None:
        """Resume and, if it is dead, restart (after a test that may have failed midway)."""
        with contextlib.suppress(ProcessLookupError, AssertionError, TypeError):
            os.kill(self.pid, signal.SIGCONT)
        if not self.running():
            self.start()

    def kill(self) -> None:
        """SIGKILL (no SIGCONT first: a paused server dies without running again); waits until gone."""
        raise NotImplementedError

    def stop(self) -> None:
        """Shut down for good (fixture teardown)."""
        raise NotImplementedError

    def restart(self) -> None:
        self.kill()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the duration of the block; always resumed."""
        pid = self.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# -- torch TCPStore ------------------------------------------------------------------------
_ZYGOTE = r"""
import os, signal, sys, time
from datetime import timedelta
import torch.distributed as dist

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed servers
parent = os.getpid()
print("ready", flush=True)
for line in sys.stdin:
    port = int(line)
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                                  use_libuv=True, timeout=timedelta(seconds=30), multi_tenant=False)
            os.write(write_end, f"{os.getpid()} {store.port}\n".encode())
        except Exception as exc:
            os.write(write_end, f"error {exc}\n".encode())
            os._exit(1)
        while os.getppid() == parent:  # serve until the zygote is gone
            time.sleep(0.5)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        print(answer.readline().strip(), flush=True)
os._exit(0)
"""


class TcpStoreZygote:
    """One process that imported torch once and forks TCPStore servers on demand."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._lock = threading.Lock()
        if self._readline(120) != "ready":
            self.close()
            raise RuntimeError("the TCPStore zygote did not start")

    def _readline(self, timeout: float) -> str:
        out: List[str] = []
        reader = threading.Thread(target=lambda: out.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return out[0].strip() if out else ""

    def fork_server(self, port: int) -> "tuple[int, int]":
        """A new TCPStore server on ``port`` (0: any); returns (pid, port)."""
        with self._lock:
            self.process.stdin.write(f"{port}\n")
            self.process.stdin.flush()
            line = self._readline(30)
        pid, _, real_port = line.partition(" ")
        if not pid.isdigit():
            raise RuntimeError(f"the TCPStore server did not start on port {port}: {line}")
        return int(pid), int(real_port)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


class TcpStoreServer(Server):
    """A torch TCPStore server that a restart brings back on the same port (empty)."""

    name = "torch TCPStore"

    def __init__(self, zygote: TcpStoreZygote) -> None:
        self.zygote = zygote
        self._pid, self._port = zygote.fork_server(0)

    @property
    def port(self) -> int:
        return self._port

    def running(self) -> bool:
        return self._alive()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _alive(self) -> bool:
        try:
            os.kill(self._pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self) -> None:
        deadline = time.monotonic() + 15
        while True:  # the port may be held for a moment by the killed server's sockets
            try:
                self._pid, _ = self.zygote.fork_server(self._port)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.kill()


# -- redis ------------------------------------------------------------------------------
class RedisAofServer(Server):
    """redis-server with an fsync-always append-only file, restartable on its port.

    The launcher is :class:`tests.support.redis_server.RedisServer`; this adds
    what a fault test does to it.
    """

    name = "redis-server"

    def __init__(self, directory: Path, persistent: bool = True, extra: Optional[List[str]] = None) -> None:
        self.persistent = persistent
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.redis = RedisServer(Path(directory), [*aof, *(extra or [])])

    @property
    def pid(self) -> int:
        return self.redis.process.pid

    @property
    def port(self) -> int:
        return self.redis.port

    def running(self) -> bool:
        return self.redis.process.poll() is None

    @property
    def endpoint(self) -> str:
        return self.redis.endpoint

    def start(self) -> None:
        self.redis.start()

    def kill(self) -> None:
        self.redis.stop(signal.SIGKILL)

    def stop(self) -> None:
        self.kill()


# -- etcd -------------------------------------------------------------------------------
class EtcdServer(Server):
    """One etcd member (v2 API on) whose data directory survives kill() + start()."""

    name = "etcd"
    persistent = True

    def __init__(self) -> None:
        self.cluster = EtcdCluster.create(size=1, enable_v2=True).start()

    @property
    def member(self):
        return self.cluster.members[0]

    @property
    def pid(self) -> int:
        return self.member.process.pid

    @property
    def port(self) -> int:
        return self.member.client_port

    def running(self) -> bool:
        return self.member.process is not None and self.member.process.poll() is None

    @property
    def endpoint(self) -> str:
        return self.cluster.endpoint

    def start(self) -> None:
        self.cluster.start()

    def kill(self) -> None:
        self.member.kill()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        self.cluster.stop()


# -- FileStore -----------------------------------------------------------------------------
_HOLD = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


class FileLockHolder:
    """A process holding torch's exclusive ``flock`` on a FileStore file: a stuck peer."""

    def __init__(self, path: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "locked":
            self.release()
            raise RuntimeError("could not lock the FileStore file")

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


# -- targets ------------------------------------------------------------------------------
@dataclass
class Target:
    """A backend as rdzvctl addresses it, and the server behind it (None for a FileStore)."""

    id: str
    backend: str
    endpoint: str
    conf: Dict[str, str] = field(default_factory=dict)
    server: Optional[Server] = None

    @property
    def strict(self) -> bool:
        """Whether every accepted write yields a never-seen token (not c10d's value tokens)."""
        return not self.backend.startswith("c10d")

    def address(self, run_id: str, timeout: float = 10.0, **conf: str) -> Address:
        return Address(self.backend, self.endpoint, run_id, {**self.conf, **conf}, timeout)

    def open(self, run_id: str, timeout: float = 10.0, **conf: str) -> RendezvousBackend:
        return open_backend(self.address(run_id, timeout, **conf))

    def flags(self, run_id: Optional[str], **conf: str) -> List[str]:
        args = ["--rdzv-backend", self.backend, "--rdzv-endpoint", self.endpoint]
        if run_id is not None:
            args += ["--rdzv-id", run_id]
        merged = {**self.conf, **conf}
        if merged:
            args += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in merged.items())]
        return args


def make_target(backend_id: str, root: Path, zygote: Optional[TcpStoreZygote] = None,
                persistent_redis: bool = True) -> Target:
    """Start the server of ``backend_id`` (files under ``root``) and return its target."""
    if backend_id == "c10d-tcp":
        if zygote is None:
            raise ValueError("c10d-tcp needs a TCPStore zygote")
        server = TcpStoreServer(zygote)
        return Target(backend_id, "c10d", server.endpoint, {}, server)
    if backend_id == "c10d-file":
        root.mkdir(parents=True, exist_ok=True)
        path = tempfile.mktemp(prefix="filestore-", dir=root)
        open(path, "wb").close()  # an existing store file: rdzvctl never creates one
        return Target(backend_id, "c10d", path, {"store_type": "file"}, None)
    if backend_id == "redis":
        server = RedisAofServer(root / "redis", persistent=persistent_redis)
        return Target(backend_id, "redis", server.endpoint, {}, server)
    if backend_id in ("etcd-v2", "etcd-v3"):
        server = EtcdServer()
        return Target(backend_id, backend_id, server.endpoint, {}, server)
    raise ValueError(f"unknown backend id {backend_id!r}")
