"""torch as a test peer: TCPStore servers in subprocesses and FileStore paths.

The TCPStore server runs in its own process so that latency measurements of our
client and torch's do not share a GIL with it.  Each server listens on a free
loopback port (torch picks it: port 0) and is stopped when its fixture ends.

The fixtures (``tcpstore_libuv``, ``tcpstore_legacy``, ``tcpstore_server``,
``filestore_path``) are registered by ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterator

import pytest

from tests.support.harness import free_port

__all__ = [
    "TcpStoreServer",
    "start_tcpstore",
    "shared_tcpstore",
    "torch_tcpstore",
    "torch_set",
    "torch_filestore",
    "tcpstore_libuv",
    "tcpstore_legacy",
    "tcpstore_server",
    "filestore_path",
    "refused_port",
    "blackhole_server",
    "scripted_server",
]

# The server listens on an IPv4 loopback socket we hand it: on torch's default
# dual-stack socket, peers show up as ::ffff:127.0.0.1, which torch resolves
# (getnameinfo) for every connection -- through DNS, as /etc/hosts only names
# 127.0.0.1; a slow or rate-limited resolver then stalls the server for
# seconds.  It also keeps the test server off the network.
_SERVER_SCRIPT = r"""
import os, socket, sys
from datetime import timedelta
import torch.distributed as dist
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
port = listener.getsockname()[1]
store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                      use_libuv=sys.argv[1] == "1", timeout=timedelta(seconds=30),
                      master_listen_fd=listener.detach())
print(port, flush=True)
sys.stdin.read()  # serve until the test closes our stdin
os._exit(0)  # skip torch's slow interpreter teardown
"""


@dataclass
class TcpStoreServer:
    """A torch TCPStore server process on ``host:port``."""

    host: str
    port: int
    use_libuv: bool
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)


def start_tcpstore(use_libuv: bool = True) -> TcpStoreServer:
    """Start a torch TCPStore server in a subprocess and wait for its port."""
    pytest.importorskip("torch")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_SCRIPT, "1" if use_libuv else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.strip().isdigit():
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"the torch TCPStore server did not start (said {line!r})")
    return TcpStoreServer("127.0.0.1", int(line), use_libuv, proc)


def torch_tcpstore(server: TcpStoreServer, timeout: float = 10.0):
    """A torch ``TCPStore`` client of ``server`` (in this process)."""
    import torch.distributed as dist

    return dist.TCPStore(
        server.host, server.port, is_master=False, use_libuv=server.use_libuv,
        timeout=timedelta(seconds=timeout),
    )


def torch_set(store, key: str, value) -> None:
    """torch's ``store.set``, then a round trip so the server has applied it.

    SET has no reply: without this, a read on another connection can reach
    the server first.
    """
    store.set(key, value)
    store.check([key])


def torch_filestore(path: str):
    """torch's ``FileStore(path)`` as elastic opens it (world_size -1: never deleted)."""
    import torch.distributed as dist

    return dist.FileStore(path)


_SHARED: Dict[bool, TcpStoreServer] = {}


def shared_tcpstore(use_libuv: bool) -> TcpStoreServer:
    """One server per flavour for the whole test run, stopped at exit.

    pytest makes a separate fixture of each module's import, so the cache
    lives here.  A server also exits by itself when our process dies: it
    serves only until its stdin (our pipe) closes.
    """
    server = _SHARED.get(use_libuv)
    if server is None or server.process.poll() is not None:
        server = _SHARED[use_libuv] = start_tcpstore(use_libuv)
        atexit.register(server.stop)
    return server


@pytest.fixture(scope="session")
def tcpstore_libuv() -> TcpStoreServer:
    return shared_tcpstore(use_libuv=True)


@pytest.fixture(scope="session")
def tcpstore_legacy() -> TcpStoreServer:
    return shared_tcpstore(use_libuv=False)


@pytest.fixture(scope="session", params=["libuv", "legacy"])
def tcpstore_server(request: pytest.FixtureRequest) -> TcpStoreServer:
    """Each test using it runs against both server flavours."""
    return shared_tcpstore(use_libuv=request.param == "libuv")


@pytest.fixture()
def filestore_path() -> Iterator[str]:
    """A FileStore file that torch has created and keeps open for the test's duration."""
    pytest.importorskip("torch")
    with tempfile.TemporaryDirectory(prefix="rdzvctl-filestore-") as tmp:
        path = os.path.join(tmp, "store")
        store = torch_filestore(path)
        yield path
        del store


# -- peers that are not a working TCPStore (error paths) -----------------------------
def refused_port() -> int:
    """A loopback port nobody listens on (connecting is refused)."""
    return free_port()


@contextlib.contextmanager
def blackhole_server() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextlib.contextmanager
def scripted_server(respond: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server running ``respond(conn)`` on each connection, then closing it.

    For example an HTTP server that answers garbage, or one that hangs up.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    respond(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
