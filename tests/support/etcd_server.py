"""Real etcd servers for the tests: single members or a 3-member cluster on loopback.

Each member gets free loopback ports and its own data directory, and is killed
when its fixture ends.  Options: the v2 API (``enable_v2``), user auth (a
``root`` user with a password, then ``etcdctl auth enable``) and TLS
(a throwaway CA, server and client certificates made with ``openssl``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import pytest

from tests.support.harness import free_port, stop_process, wait_ready

__all__ = [
    "EtcdMember",
    "EtcdCluster",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "etcd_server",
    "etcd_auth_server",
    "etcd_tls_server",
    "etcd_cluster",
    "ROOT_PASSWORD",
]

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
ROOT_PASSWORD = "s3cret-Root-pw"


@dataclass
class TlsFiles:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str) -> TlsFiles:
    """A CA plus server (SAN 127.0.0.1, localhost) and client certificates."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rdzvctl-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    return TlsFiles(p("ca.crt"), p("server.crt"), p("server.key"), p("client.crt"), p("client.key"))


@dataclass
class EtcdMember:
    """One etcd process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    scheme: str = "http"
    process: Optional[subprocess.Popen] = None
    log_path: str = ""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def kill(self) -> None:
        stop_process(self.process, signal.SIGKILL)


@dataclass
class EtcdCluster:
    """One or more members started together; ``endpoint`` lists them all."""

    members: List[EtcdMember]
    enable_v2: bool = False
    tls: Optional[TlsFiles] = None
    root: str = ""
    extra_args: List[str] = field(default_factory=list)

    @classmethod
    def create(cls, size: int = 1, enable_v2: bool = False, tls: bool = False,
               extra_args: Optional[List[str]] = None) -> "EtcdCluster":
        root = tempfile.mkdtemp(prefix="rdzvctl-etcd-")
        files = make_tls_files(root) if tls else None
        members = [
            EtcdMember(f"m{i}", free_port(), free_port(), os.path.join(root, f"m{i}.etcd"),
                       scheme="https" if tls else "http")
            for i in range(size)
        ]
        return cls(members, enable_v2, files, root, list(extra_args or []))

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    @property
    def member(self) -> EtcdMember:
        return self.members[0]

    def conf(self) -> Dict[str, str]:
        """``--rdzv-conf`` options for a client of this cluster."""
        if self.tls is None:
            return {}
        return {"protocol": "https", "ca_cert": self.tls.ca_cert,
                "ssl_cert": self.tls.client_cert, "ssl_cert_key": self.tls.client_key}

    def start(self) -> "EtcdCluster":
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            args = [
                ETCD, "--name", member.name, "--data-dir", member.data_dir,
                "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", os.path.basename(self.root),
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--enable-v2=" + ("true" if self.enable_v2 else "false"),
                "--log-level", "warn", *self.extra_args,
            ]
            if self.tls is not None:
                args += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                         "--trusted-ca-file", self.tls.ca_cert, "--client-cert-auth"]
            member.log_path = os.path.join(self.root, f"{member.name}.log")
            with open(member.log_path, "wb") as log:
                member.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        for member in self.members:
            self._wait_healthy(member)
        return self

    def _wait_healthy(self, member: EtcdMember, timeout: float = 30.0) -> None:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca_cert)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)

        def healthy() -> bool:
            with urllib.request.urlopen(member.client_url + "/health", timeout=1, context=context) as answer:
                return bool(json.load(answer).get("health") == "true")

        wait_ready(healthy, member.process, timeout=timeout, what=f"etcd {member.name}", log=member.log_path,
                   interval=0.05)

    def log(self, member: EtcdMember) -> str:
        try:
            with open(member.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def etcdctl(self, *args: str, user: Optional[str] = None, input: Optional[str] = None) -> str:
        cmd = [ETCDCTL, "--endpoints", ",".join(m.client_url for m in self.members), "--dial-timeout", "5s"]
        if self.tls is not None:
            cmd += ["--cacert", self.tls.ca_cert, "--cert", self.tls.client_cert, "--key", self.tls.client_key]
        if user:
            cmd += ["--user", user]
        env = dict(os.environ, ETCDCTL_API="3")
        result = subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, input=input,
                                timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def enable_auth(self, password: str = ROOT_PASSWORD) -> None:
        """Create ``root`` with ``password`` and turn authentication on."""
        self.etcdctl("user", "add", "root", "--interactive=false", input=password + "\n")
        self.etcdctl("auth", "enable")

    def stop(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _started(**options) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.create(**options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    """One member with the v2 API on (the v3 API is always on)."""
    yield from _started(enable_v2=True)


@pytest.fixture(scope="session")
def etcd_auth_server() -> Iterator[EtcdCluster]:
    """One member with authentication enabled: user ``root``, password :data:`ROOT_PASSWORD`."""
    for cluster in _started():
        cluster.enable_auth()
        yield cluster


@pytest.fixture(scope="session")
def etcd_tls_server() -> Iterator[EtcdCluster]:
    """One member serving HTTPS only, requiring client certificates; v2 on."""
    yield from _started(enable_v2=True, tls=True)


@pytest.fixture()
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh three-member cluster on loopback, v2 on, for a test that kills members."""
    yield from _started(size=3, enable_v2=True)
