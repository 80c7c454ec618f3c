"""Real redis-server processes for the tests, on free loopback ports.

Variants: plain, with keyspace notifications, with a password and an ACL
user, TLS-only (certificates made at test time with the ``openssl`` CLI), a
single-node Redis Cluster, and a Sentinel watching a plain server.  Each
server gets its own temporary directory and is stopped by its fixture.

The fixtures are registered for every test module by ``pytest_plugins`` in
``tests/conftest.py``; a test names them as arguments.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence

import pytest

from tests.support.harness import free_port, stop_process, wait_ready

__all__ = [
    "RedisServer",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "redis_server",
    "redis_server_notify",
    "redis_server_auth",
    "redis_server_tls",
    "redis_server_paused",
    "redis_cluster_node",
    "redis_sentinel",
    "ACL_USER",
    "ACL_PASSWORD",
    "DEFAULT_PASSWORD",
]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0

DEFAULT_PASSWORD = "s3cret-default-pw"
ACL_USER = "trainer"
ACL_PASSWORD = "s3cret-acl-pw"


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA with a server and a client certificate signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", "-new", *ec, "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=rdzvctl test CA", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=rdzvctl test {name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=directory)
    return TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


class RedisServer:
    """One redis-server (or sentinel) process with its own directory.

    :meth:`start` may be called again after the process died: the server comes
    back on the same port with the same arguments (and, with an append-only
    file in ``args``, the same data) -- what the reliability suite's restarts use.
    """

    def __init__(
        self,
        directory: Path,
        args: Sequence[str] = (),
        *,
        tls: Optional[TlsFiles] = None,
        password: Optional[str] = None,
        username: Optional[str] = None,
        config: Optional[str] = None,
        sentinel: bool = False,
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.username = username
        self.sentinel = sentinel
        command: List[str] = [REDIS_SERVER]
        if config is not None:
            path = directory / ("sentinel.conf" if sentinel else "redis.conf")
            path.write_text(config.format(port=self.port, dir=directory))
            command.append(str(path))
        if sentinel:
            command.append("--sentinel")
        command += ["--bind", "127.0.0.1", "--dir", str(directory)]
        if not sentinel:
            command += ["--save", "", "--appendonly", "no"]
        if tls is not None:
            command += [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
                "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "optional",
            ]
        elif config is None:
            command += ["--port", str(self.port)]
        command += list(args)
        self.command = command
        self.log = directory / "server.log"
        self._log_file: Optional[BinaryIO] = None
        self.process: subprocess.Popen = None  # type: ignore[assignment]  # set by start()
        self.start()

    def start(self) -> None:
        """Start the process (again, after it died) and wait until it accepts connections."""
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log, "ab")
        since = self._log_file.tell()  # a restart is ready when *its* log says so
        self.process = subprocess.Popen(self.command, stdout=self._log_file, stderr=subprocess.STDOUT)

        def ready() -> bool:
            with open(self.log, "rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
            return "Ready to accept connections" in text or (self.sentinel and "+monitor" in text)

        try:
            wait_ready(ready, self.process, timeout=START_TIMEOUT, what="redis-server", log=self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object):
        """A plain redis-py client with full rights, for direct reads and writes."""
        import redis

        options: dict = {"host": "127.0.0.1", "port": self.port, "socket_timeout": 5}
        if self.password is not None:
            options["password"] = self.password
        if self.username is not None:
            options["username"] = self.username
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        options.update(kwargs)
        return redis.Redis(**options)

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server and return its stdout."""
        command = ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            command += ["--tls", "--cacert", str(self.tls.ca)]
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        if self.username is not None:
            command += ["--user", self.username]
        done = subprocess.run(command + list(args), capture_output=True, env=env, timeout=10, check=True)
        return done.stdout.decode()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server for the duration of the block (always resumed)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop the process (SIGTERM, bounded; SIGKILL: a crash, no SIGCONT first)."""
        stop_process(self.process, signum, timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@contextlib.contextmanager
def _running(*args, **kwargs) -> Iterator[RedisServer]:
    server = RedisServer(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A plain server with keyspace notifications off (watch must poll)."""
    with _running(tmp_path_factory.mktemp("redis-plain")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server_notify(tmp_path_factory) -> Iterator[RedisServer]:
    """A server with ``notify-keyspace-events KEA`` (watch is pushed)."""
    with _running(tmp_path_factory.mktemp("redis-notify"), ["--notify-keyspace-events", "KEA"]) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server_auth(tmp_path_factory) -> Iterator[RedisServer]:
    """A server with a default-user password and an ACL user ``trainer``."""
    args = [
        "--requirepass", DEFAULT_PASSWORD,
        "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all",
    ]
    with _running(tmp_path_factory.mktemp("redis-auth"), args, password=DEFAULT_PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server_tls(tmp_path_factory) -> Iterator[RedisServer]:
    """A TLS-only server; ``server.tls`` holds the CA and a client certificate."""
    tls = make_tls_files(tmp_path_factory.mktemp("redis-tls-certs"))
    with _running(tmp_path_factory.mktemp("redis-tls"), tls=tls) as server:
        yield server


@pytest.fixture()
def redis_server_paused(tmp_path_factory) -> Iterator[RedisServer]:
    """A server of its own for tests that SIGSTOP it."""
    with _running(tmp_path_factory.mktemp("redis-paused")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster_node(tmp_path_factory) -> Iterator[RedisServer]:
    """A one-node Redis Cluster that owns every slot (enough to catch CROSSSLOT)."""
    directory = tmp_path_factory.mktemp("redis-cluster")
    args = [
        "--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
        # The bus port defaults to port + 10000, which may be taken or past 65535.
        "--cluster-port", str(free_port()),
    ]
    with _running(directory, args) as server:
        server.cli("cluster", "addslotsrange", "0", "16383")
        wait_ready(lambda: "cluster_state:ok" in server.cli("cluster", "info"), server.process,
                   timeout=START_TIMEOUT, what="the one-node cluster", log=server.log, interval=0.05)
        yield server


SENTINEL_CONFIG = """\
port {port}
sentinel resolve-hostnames no
sentinel monitor {master} 127.0.0.1 {master_port} 1
sentinel down-after-milliseconds {master} 5000
"""


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory) -> Iterator[tuple]:
    """A plain master and one sentinel monitoring it as ``mymaster``: yields (sentinel, master)."""
    with _running(tmp_path_factory.mktemp("redis-sentinel-master")) as master:
        config = SENTINEL_CONFIG.replace("{master}", "mymaster").replace("{master_port}", str(master.port))
        with _running(tmp_path_factory.mktemp("redis-sentinel"), config=config, sentinel=True) as sentinel:
            yield sentinel, master
