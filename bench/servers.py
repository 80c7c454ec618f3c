"""The backends to measure, on servers started here and stopped at the end.

Starts them with the test launchers in ``tests/support`` (``RedisServer``,
``EtcdCluster``, ``start_tcpstore``), built on the one server harness
:mod:`tests.support.harness` (free loopback ports, bounded readiness waits and
stops, own temporary directories).  Every backend rdzvctl ships is covered: c10d over a
torch TCPStore and over a FileStore, redis (keyspace notifications on, so
``watch`` is pushed), etcd-v2 and etcd-v3 (one etcd member serves both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.backends.registry import open_backend

__all__ = ["Target", "Reference", "Fleet", "BACKENDS"]

#: Every backend label, in table order.
BACKENDS = ("c10d-tcp", "c10d-file", "redis", "etcd-v2", "etcd-v3")


@dataclass
class Reference:
    """A server's own command-line client doing the same thing, for reference."""

    name: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Target:
    """One backend on a running server: how rdzvctl and the baseline address it."""

    label: str  # c10d-tcp, c10d-file, redis, etcd-v2, etcd-v3
    backend: str  # the --rdzv-backend name
    endpoint: str
    conf: Dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    server: Any = None  # the launcher object (RedisServer, EtcdCluster, TcpStoreServer)

    def flags(self, run_id: Optional[str], *extra_conf: str) -> List[str]:
        """rdzvctl's address flags for ``run_id`` (None: no run id) and more ``k=v`` options."""
        conf = [f"{k}={v}" for k, v in self.conf.items()] + list(extra_conf)
        flags = ["--rdzv-backend", self.backend, "--rdzv-endpoint", self.endpoint]
        flags += [] if run_id is None else ["--rdzv-id", run_id]
        return flags + (["--rdzv-conf", ",".join(conf)] if conf else [])

    def open(self, run_id: str) -> RendezvousBackend:
        return open_backend(Address(self.backend, self.endpoint, run_id, dict(self.conf), 30.0))

    def write(self, run_id: str, state: bytes) -> None:
        """Store ``state`` for ``run_id`` through rdzvctl's own backend (fenced overwrite)."""
        with self.open(run_id) as backend:
            for _ in range(10):
                current = backend.get_state()
                result = backend.set_state(state, None if current is None else current[1])
                if result is not None and result[2]:
                    return
        raise RuntimeError(f"could not write the state of {run_id} on {self.label}")

    def clear(self, run_id: str) -> None:
        """Remove ``run_id``'s state (c10d: torch's "no state" sentinel), so listings skip it."""
        with self.open(run_id) as backend:
            current = backend.get_state()
            if current is not None:
                backend.clear(current[1])

    def reference_read(self, run_id: str) -> Optional[Reference]:
        """The server's own CLI reading the raw value, if it has one and it is installed."""
        return _installed(self._reference_read(run_id))

    def reference_watch(self, run_id: str) -> Optional[Reference]:
        """The server's own CLI following the run's key, if it has one and it is installed."""
        return _installed(self._reference_watch(run_id))

    def _reference_read(self, run_id: str) -> Optional[Reference]:
        if self.label == "redis":
            return Reference("redis-cli HGET", ["redis-cli", "-h", self.host, "-p", str(self.port), "HGET",
                                                f"torch.rendezvous.{run_id}", "state"])
        if self.label in ("etcd-v2", "etcd-v3"):
            api = self.label[-1]
            return Reference(f"etcdctl get (API {api})", ["etcdctl", "--endpoints", f"http://{self.endpoint}", "get",
                                                          f"/torch/elastic/rendezvous/{run_id}"], {"ETCDCTL_API": api})
        return None

    def _reference_watch(self, run_id: str) -> Optional[Reference]:
        key = f"/torch/elastic/rendezvous/{run_id}"
        url = f"http://{self.endpoint}"
        if self.label == "redis":
            channel = f"__keyspace@0__:torch.rendezvous.{run_id}"
            return Reference("redis-cli SUBSCRIBE (keyspace)",
                             ["redis-cli", "-h", self.host, "-p", str(self.port), "--csv", "subscribe", channel])
        if self.label == "etcd-v3":
            return Reference("etcdctl watch", ["etcdctl", "--endpoints", url, "watch", key], {"ETCDCTL_API": "3"})
        if self.label == "etcd-v2":
            return Reference("etcdctl watch --forever (API 2)",
                             ["etcdctl", "--endpoints", url, "watch", "--forever", key], {"ETCDCTL_API": "2"})
        return None


def _installed(reference: Optional[Reference]) -> Optional[Reference]:
    return reference if reference is not None and shutil.which(reference.argv[0]) else None


@contextlib.contextmanager
def _shm_tempdir() -> Iterator[None]:
    """Make ``tempfile`` use /dev/shm for a while: etcd fsyncs every write."""
    old = tempfile.tempdir
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        tempfile.tempdir = "/dev/shm"
    try:
        yield
    finally:
        tempfile.tempdir = old


class Fleet:
    """Start the servers the wanted backends need; ``targets`` has the ones that came up."""

    def __init__(self, wanted: Optional[List[str]] = None) -> None:
        self.wanted = list(wanted or BACKENDS)
        self.targets: Dict[str, Target] = {}
        self.skipped: Dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        self.root = ""

    def __enter__(self) -> "Fleet":
        self.root = tempfile.mkdtemp(prefix="rdzvctl-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._stack.callback(shutil.rmtree, self.root, True)
        try:
            for label in self.wanted:
                try:
                    self._start(label)
                except Exception as exc:  # noqa: BLE001 - a missing server skips its backend
                    self.skipped[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self, label: str) -> None:
        if label == "c10d-tcp":
            from tests.support.torch_peer import start_tcpstore

            try:
                server = start_tcpstore(use_libuv=True)
            except BaseException as exc:  # pytest.importorskip raises Skipped (a BaseException)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise RuntimeError(f"no torch TCPStore server: {exc}") from None
            self._stack.callback(server.stop)
            self.targets[label] = Target(label, "c10d", server.endpoint, {}, server.host, server.port, server)
        elif label == "c10d-file":
            path = os.path.join(self.root, "filestore")
            open(path, "wb").close()  # an empty FileStore log: no records yet
            self.targets[label] = Target(label, "c10d", path, {"store_type": "file"})
        elif label == "redis":
            from pathlib import Path

            from tests.support.redis_server import RedisServer

            server = RedisServer(Path(self.root) / "redis", ["--notify-keyspace-events", "KEA"])
            self._stack.callback(server.stop)
            self.targets[label] = Target(label, "redis", server.endpoint, {}, "127.0.0.1", server.port, server)
        elif label in ("etcd-v2", "etcd-v3"):
            cluster = self._etcd()
            member = cluster.member
            self.targets[label] = Target(label, label, member.endpoint, {}, "127.0.0.1", member.client_port, cluster)
        else:
            raise ValueError(f"unknown backend {label!r}")

    def _etcd(self) -> Any:
        for target in self.targets.values():
            if target.backend.startswith("etcd"):
                return target.server
        from tests.support.etcd_server import EtcdCluster

        with _shm_tempdir():
            cluster = EtcdCluster.create(enable_v2=True, extra_args=["--max-txn-ops", "1024",
                                                                     "--max-request-bytes", "33554432"])
        self._stack.callback(cluster.stop)
        cluster.start()
        return cluster
