"""The etcd-v3 backend against real etcd 3.4 members (plain, with auth, with TLS, a cluster)."""

from __future__ import annotations

try:  # protobuf first, as inside torchrun; the subprocess test below makes the order certain
    import google.protobuf  # noqa: F401
except ImportError:  # pragma: no cover - protobuf comes with torch and etcd3
    pass

import base64
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Optional

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.etcd_v3 import EtcdV3Backend
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    StateCorruptError,
)
from rdzvctl.testing.conformance import BackendConformanceTests
from tests.support.etcd_server import (
    ROOT_PASSWORD,
    EtcdCluster,
)
from tests.support.torch_peer import blackhole_server, refused_port, scripted_server

TIMEOUT = 5.0
PREFIX = "/torch/elastic/rendezvous"


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def backend(endpoint: str, run_id: str = "", timeout: float = TIMEOUT, **conf: str) -> EtcdV3Backend:
    return EtcdV3Backend.from_address(Address("etcd-v3", endpoint, run_id or new_run_id(), conf, timeout))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw(cluster: EtcdCluster, path: str, payload: Dict[str, Any], auth: Optional[str] = None) -> Dict[str, Any]:
    """A plain v3 JSON gateway call, bypassing the backend."""
    context = None
    if cluster.tls is not None:
        context = ssl.create_default_context(cafile=cluster.tls.ca_cert)
        context.load_cert_chain(cluster.tls.client_cert, cluster.tls.client_key)
    headers = {"Content-Type": "application/json"}
    if auth:
        token = raw(cluster, "auth/authenticate", {"name": "root", "password": auth})["token"]
        headers["Authorization"] = token
    request = urllib.request.Request(f"{cluster.member.client_url}/v3/{path}",
                                     data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return json.loads(answer.read().splitlines()[0])
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def stored(cluster: EtcdCluster, key: str, auth: Optional[str] = None) -> Optional[Dict[str, Any]]:
    kvs = raw(cluster, "kv/range", {"key": b64(key.encode())}, auth).get("kvs")
    return kvs[0] if kvs else None


# -- conformance ------------------------------------------------------------------------
class TestConformance(BackendConformanceTests):
    @pytest.fixture(autouse=True)
    def _server(self, etcd_server):
        self.server = etcd_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id)

    def corrupt_state(self, b: EtcdV3Backend) -> None:
        raw(self.server, "kv/put", {"key": b64(b.key.encode()), "value": b64(b"%%% not base64 %%%")})


class TestConformanceAuth(BackendConformanceTests):
    """Authentication enabled on the server; the backend logs in as root."""

    @pytest.fixture(autouse=True)
    def _server(self, etcd_auth_server):
        self.server = etcd_auth_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id, username="root", password=ROOT_PASSWORD)

    def corrupt_state(self, b: EtcdV3Backend) -> None:
        raw(self.server, "kv/put", {"key": b64(b.key.encode()), "value": b64(b"%%% not base64 %%%")},
            auth=ROOT_PASSWORD)


class TestConformanceTls(BackendConformanceTests):
    """HTTPS with a private CA and a client certificate."""

    @pytest.fixture(autouse=True)
    def _server(self, etcd_tls_server):
        self.server = etcd_tls_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id, **self.server.conf())

    def corrupt_state(self, b: EtcdV3Backend) -> None:
        raw(self.server, "kv/put", {"key": b64(b.key.encode()), "value": b64(b"%%% not base64 %%%")})


# -- layout, lease -------------------------------------------------------------------------
def test_layout_key_value_and_token(etcd_server):
    b = backend(etcd_server.endpoint)
    _, token, _ = b.set_state(b"\x80\x04state")
    kv = stored(etcd_server, f"{PREFIX}/{b.run_id}")
    assert base64.b64decode(kv["value"]) == b64(b"\x80\x04state").encode()  # etcdctl shows base64 text
    assert int(kv["mod_revision"]) == token


def test_state_is_leased_with_torchs_ttl(etcd_server):
    b = backend(etcd_server.endpoint)
    b.set_state(b"x")
    lease = stored(etcd_server, b.key)["lease"]
    ttl = int(raw(etcd_server, "lease/timetolive", {"ID": lease})["grantedTTL"])
    assert ttl == 7200


def test_replace_keeps_and_renews_the_lease(etcd_server):
    b = backend(etcd_server.endpoint, ttl="60")
    _, token, _ = b.set_state(b"x")
    lease = stored(etcd_server, b.key)["lease"]
    time.sleep(2.2)
    before = int(raw(etcd_server, "lease/timetolive", {"ID": lease})["TTL"])
    assert before <= 58
    backend(etcd_server.endpoint, b.run_id, ttl="60").set_state(b"y", token)
    assert stored(etcd_server, b.key)["lease"] == lease
    assert int(raw(etcd_server, "lease/timetolive", {"ID": lease})["TTL"]) > before


def test_abandoned_state_expires(etcd_server):
    b = backend(etcd_server.endpoint, ttl="2")
    b.set_state(b"x")
    deadline = time.monotonic() + 10
    while b.get_state() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b.get_state() is None


def test_a_state_stored_without_lease_gets_one(etcd_server):
    b = backend(etcd_server.endpoint)
    raw(etcd_server, "kv/put", {"key": b64(b.key.encode()), "value": b64(b64(b"plain").encode())})
    state, token = b.get_state()
    assert state == b"plain"
    _, token2, has_set = b.set_state(b"leased", token)
    assert has_set and b.get_state() == (b"leased", token2)
    assert int(stored(etcd_server, b.key).get("lease", 0)) != 0


def test_lost_create_race_leaves_no_lease_behind(etcd_server):
    b = backend(etcd_server.endpoint)
    b.set_state(b"first")
    before = raw(etcd_server, "lease/leases", {}).get("leases", [])
    assert b.set_state(b"second")[2] is False
    after = raw(etcd_server, "lease/leases", {}).get("leases", [])
    assert len(after) == len(before)


def test_list_runs_one_range_with_corrupt_entries_flagged(etcd_server):
    prefix = f"/list-{uuid.uuid4().hex[:8]}"
    written = {}
    for i in range(5):
        b = backend(etcd_server.endpoint, f"run-{i}", key_prefix=prefix)
        written[b.run_id] = b.set_state(f"state-{i}".encode())[:2]
    raw(etcd_server, "kv/put", {"key": b64(f"{prefix}/broken".encode()), "value": b64(b"%%%")})
    raw(etcd_server, "kv/put", {"key": b64(f"{prefix}x/not-ours".encode()), "value": b64(b"eA==")})
    runs = {e.run_id: e for e in backend(etcd_server.endpoint, key_prefix=prefix).list_runs()}
    assert set(runs) == set(written) | {"broken"}
    assert {k: runs[k].state for k in written} == written
    assert runs["broken"].state is None and isinstance(runs["broken"].error, StateCorruptError)


def test_list_runs_pages_through_the_range_in_order(etcd_server, monkeypatch):
    import rdzvctl.backends.etcd_v3 as module

    monkeypatch.setattr(module, "LIST_PAGE", 3)
    prefix = f"/page-{uuid.uuid4().hex[:8]}"
    written = {}
    for i in range(10):
        b = backend(etcd_server.endpoint, f"run-{i:02d}", key_prefix=prefix)
        written[b.run_id] = b.set_state(f"state-{i}".encode())[:2]
    raw(etcd_server, "kv/put", {"key": b64(f"{prefix}x/not-ours".encode()), "value": b64(b"eA==")})
    entries = list(backend(etcd_server.endpoint, key_prefix=prefix).list_runs())
    assert [e.run_id for e in entries] == sorted(written)
    assert {e.run_id: e.state for e in entries} == written


@pytest.mark.slow
def test_list_runs_reads_10k_runs(etcd_server):
    """Writes 10,000 runs in batched transactions, then lists them all, in order (pages of 500 keys).

    How fast is the benchmarks' business (P4, P8), never a test's."""
    prefix = f"/bench-{uuid.uuid4().hex[:8]}"
    value = b64(b64(bytes(600)).encode())
    for start in range(0, 10_000, 100):
        puts = [{"request_put": {"key": b64(f"{prefix}/run-{i:05d}".encode()), "value": value}}
                for i in range(start, start + 100)]
        raw(etcd_server, "kv/txn", {"success": puts})
    b = backend(etcd_server.endpoint, key_prefix=prefix, timeout=30)
    listed = [entry.run_id for entry in b.list_runs() if entry.state is not None]
    assert listed == [f"run-{i:05d}" for i in range(10_000)]


# -- watch ----------------------------------------------------------------------------------
# -- several members ----------------------------------------------------------------------------
@pytest.mark.slow
def test_failover_when_a_member_dies(etcd_cluster):
    b = backend(etcd_cluster.endpoint, timeout=15)
    _, token, _ = b.set_state(b"before")
    etcd_cluster.members[0].kill()
    assert b.get_state() == (b"before", token)
    _, token2, has_set = b.set_state(b"after", token)
    assert has_set and token2 != token
    assert backend(etcd_cluster.endpoint, b.run_id, timeout=15).get_state() == (b"after", token2)


@pytest.mark.slow
def test_watch_resumes_on_another_member_without_losing_writes(etcd_cluster):
    b = backend(etcd_cluster.endpoint, timeout=15)
    _, token, _ = b.set_state(b"v0")
    stop = threading.Event()
    items = backend(etcd_cluster.endpoint, b.run_id, timeout=15).watch(stop=stop)
    assert next(items) == (b"v0", token)  # the watch stream is open on the first member
    etcd_cluster.members[0].kill()
    _, token1, _ = b.set_state(b"v1", token)
    _, token2, _ = b.set_state(b"v2", token1)
    assert next(items) == (b"v1", token1)  # replayed from the last revision seen
    assert next(items) == (b"v2", token2)
    stop.set()
    items.close()


# -- auth -----------------------------------------------------------------------------------
def test_wrong_password_is_a_one_line_error_without_the_password(etcd_auth_server):
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_auth_server.endpoint, username="root", password="not-the-Pa55word").get_state()
    assert "\n" not in str(info.value)
    assert "not-the-Pa55word" not in str(info.value)
    assert "root" in str(info.value) and etcd_auth_server.endpoint in str(info.value)


def test_no_credentials_on_an_auth_server(etcd_auth_server):
    with pytest.raises(BackendUnavailableError, match="username"):
        backend(etcd_auth_server.endpoint).get_state()


def test_credentials_from_the_environment(etcd_auth_server, monkeypatch):
    monkeypatch.setenv("ETCD_USERNAME", "root")
    monkeypatch.setenv("ETCD_PASSWORD", ROOT_PASSWORD)
    b = backend(etcd_auth_server.endpoint)
    assert b.set_state(b"x")[2]
    assert ROOT_PASSWORD not in b.describe() and ROOT_PASSWORD not in repr(b)


def test_expired_auth_token_is_renewed(etcd_auth_server):
    b = backend(etcd_auth_server.endpoint, username="root", password=ROOT_PASSWORD)
    b.set_state(b"x")
    b._gw._token = "expired.token"  # what the server says after --auth-token-ttl
    assert b.get_state()[0] == b"x"


# -- errors ----------------------------------------------------------------------------------
def _assert_one_line(exc: BaseException, *parts: str) -> None:
    assert "\n" not in str(exc)
    for part in parts:
        assert part in str(exc)


def test_refused_endpoint():
    port = refused_port()
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        backend(f"127.0.0.1:{port}").set_state(b"x")
    assert time.monotonic() - started < 2
    _assert_one_line(info.value, f"127.0.0.1:{port}", "refused")


def test_timeout_is_honoured():
    with blackhole_server() as port:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError) as info:
            backend(f"127.0.0.1:{port}", timeout=1.0).get_state()
        assert time.monotonic() - started < 2.5
    _assert_one_line(info.value, f"127.0.0.1:{port}")


def test_timeout_is_shared_across_members():
    with blackhole_server() as first, blackhole_server() as second:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError) as info:
            backend(f"127.0.0.1:{first},127.0.0.1:{second}", timeout=1.0).get_state()
        assert time.monotonic() - started < 2.5
    _assert_one_line(info.value, f"127.0.0.1:{first}")


def test_http_server_that_is_not_etcd():
    body = b"<html>not found</html>"

    def respond(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    with scripted_server(respond) as port:
        with pytest.raises(BackendUnavailableError) as info:
            backend(f"127.0.0.1:{port}").get_state()
    _assert_one_line(info.value, f"127.0.0.1:{port}")


def test_https_to_a_plain_http_member(etcd_server, etcd_tls_server):
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_server.endpoint, **etcd_tls_server.conf()).get_state()
    _assert_one_line(info.value, "TLS")


def test_tls_without_the_client_certificate(etcd_tls_server):
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_tls_server.endpoint, ca_cert=etcd_tls_server.tls.ca_cert).get_state()
    _assert_one_line(info.value, etcd_tls_server.endpoint)


@pytest.mark.parametrize("conf", [
    {"protocol": "gopher"},
    {"ca_cert": "/nonexistent/ca.pem"},
    {"ssl_cert_key": "/etc/hostname"},
    {"password": "x"},
    {"ttl": "forever"},
])
def test_bad_options(conf):
    with pytest.raises(BackendConfigError):
        backend("127.0.0.1:2379", **conf)


# -- imports ----------------------------------------------------------------------------------
def test_import_is_light():
    code = ("import sys, rdzvctl.backends.etcd_v3; "
            "bad = [m for m in ('etcd3', 'etcd3gw', 'requests', 'grpc', 'google.protobuf', 'torch', "
            "'http.client') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


_PROTOBUF_FIRST = r"""
import google.protobuf
from google.protobuf import descriptor_pb2, struct_pb2  # really load the runtime, as torchrun does
import sys, threading
from rdzvctl.backends.base import Address
from rdzvctl.backends.etcd_v3 import EtcdV3Backend

b = EtcdV3Backend.from_address(Address("etcd-v3", sys.argv[1], "protobuf-first", {}, 5.0))
_, token, has_set = b.set_state(b"hello")
assert has_set and b.get_state() == (b"hello", token)
stop = threading.Event()
items = b.watch(stop=stop)
assert next(items) == (b"hello", token)
_, token2, _ = EtcdV3Backend.from_address(Address("etcd-v3", sys.argv[1], "protobuf-first", {}, 5.0)).set_state(b"bye", token)
assert next(items) == (b"bye", token2)
stop.set()
assert b.clear(token2)
print("ok", google.protobuf.__version__)
"""


def test_works_when_protobuf_was_imported_first(etcd_server):
    pytest.importorskip("google.protobuf")
    out = subprocess.run([sys.executable, "-c", _PROTOBUF_FIRST, etcd_server.endpoint],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_store_keys_are_torchruns_round_keys(etcd_server):
    b = backend(etcd_server.endpoint)
    store = f"/torch/elastic/store/{b.run_id}/torch.rendezvous.{b.run_id}"
    raw(etcd_server, "kv/put", {"key": b64(f"{store}.3/MASTER_ADDR".encode()), "value": b64(b"10.0.0.1")})
    raw(etcd_server, "kv/put", {"key": b64(f"{store}.3/MASTER_PORT".encode()), "value": b64(b"29500")})
    raw(etcd_server, "kv/put", {"key": b64(f"{store}.x/NOT_A_ROUND".encode()), "value": b64(b"-")})
    assert b.store_keys() == {"3/MASTER_ADDR": b"10.0.0.1", "3/MASTER_PORT": b"29500"}


def test_a_hang_up_during_the_tls_handshake_is_named_as_tls() -> None:
    """A plain-http member answers a TLS hello with a reset or a rejected HTTP 400, by timing."""
    from rdzvctl.backends.etcd_gateway import _reason

    reset = ConnectionResetError(104, "Connection reset by peer")
    assert "TLS" in _reason(reset, tls=True) and "protocol" in _reason(reset, tls=True)
    assert _reason(reset) == "connection reset by peer"
