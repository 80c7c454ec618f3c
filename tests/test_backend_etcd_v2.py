"""The etcd-v2 backend against real etcd 3.4 members started with --enable-v2."""

from __future__ import annotations

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
from datetime import datetime, timezone
from urllib.parse import urlencode

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.etcd_v2 import EtcdV2Backend
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    StateCorruptError,
)
from rdzvctl.testing.conformance import BackendConformanceTests
from tests.support.etcd_server import (
    EtcdCluster,
)
from tests.support.torch_peer import blackhole_server, refused_port, scripted_server

TIMEOUT = 5.0
PREFIX = "/torch/elastic/rendezvous"


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def backend(endpoint: str, run_id: str = "", timeout: float = TIMEOUT, **conf: str) -> EtcdV2Backend:
    return EtcdV2Backend.from_address(Address("etcd-v2", endpoint, run_id or new_run_id(), conf, timeout))


def raw(cluster: EtcdCluster, method: str, key: str, **form: object) -> dict:
    """A plain v2 keys API call, bypassing the backend."""
    data = urlencode(form).encode() if form else None
    request = urllib.request.Request(f"{cluster.member.client_url}/v2/keys{key}", data=data, method=method)
    context = None
    if cluster.tls is not None:
        context = ssl.create_default_context(cafile=cluster.tls.ca_cert)
        context.load_cert_chain(cluster.tls.client_cert, cluster.tls.client_key)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


# -- conformance ------------------------------------------------------------------------
class TestConformance(BackendConformanceTests):
    @pytest.fixture(autouse=True)
    def _server(self, etcd_server):
        self.server = etcd_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id)

    def corrupt_state(self, b: EtcdV2Backend) -> None:
        raw(self.server, "PUT", b.key, value="%%% not base64 %%%")


class TestConformanceTls(BackendConformanceTests):
    """torch's https options: protocol, ca_cert, ssl_cert, ssl_cert_key."""

    @pytest.fixture(autouse=True)
    def _server(self, etcd_tls_server):
        self.server = etcd_tls_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id, **self.server.conf())

    def corrupt_state(self, b: EtcdV2Backend) -> None:
        raw(self.server, "PUT", b.key, value="%%% not base64 %%%")


# -- layout and torch's semantics -----------------------------------------------------------
def test_layout_is_torchs(etcd_server):
    b = backend(etcd_server.endpoint)
    _, token, _ = b.set_state(b"\x80\x04state")
    node = raw(etcd_server, "GET", f"{PREFIX}/{b.run_id}")["node"]
    assert base64.b64decode(node["value"]) == b"\x80\x04state"
    assert node["modifiedIndex"] == token
    assert 7100 < node["ttl"] <= 7200


def test_every_write_resets_the_ttl(etcd_server):
    b = backend(etcd_server.endpoint, ttl="300")
    _, token, _ = b.set_state(b"a")
    raw(etcd_server, "PUT", b.key, value=base64.b64encode(b"b").decode(), ttl=5, prevIndex=token)
    _, token = b.get_state()
    b.set_state(b"c", token)
    assert 290 < raw(etcd_server, "GET", b.key)["node"]["ttl"] <= 300


def test_key_prefix_option(etcd_server):
    b = backend(etcd_server.endpoint, key_prefix="/custom/rdzv")
    b.set_state(b"x")
    assert raw(etcd_server, "GET", f"/custom/rdzv/{b.run_id}")["node"]["value"] == "eA=="


def test_directory_at_the_key_is_not_state(etcd_server):
    b = backend(etcd_server.endpoint)
    raw(etcd_server, "PUT", b.key, dir="true")
    with pytest.raises(StateCorruptError, match="directory"):
        b.get_state()


def test_list_runs_is_one_recursive_read(etcd_server):
    prefix = f"/list-{uuid.uuid4().hex[:8]}"
    written = {}
    for i in range(5):
        b = backend(etcd_server.endpoint, f"run-{i}", key_prefix=prefix)
        written[b.run_id] = b.set_state(f"state-{i}".encode())[:2]
    raw(etcd_server, "PUT", f"{prefix}/broken", value="%%%")
    runs = {entry.run_id: entry for entry in backend(etcd_server.endpoint, key_prefix=prefix).list_runs()}
    assert {k: runs[k].state for k in written} == written
    assert runs["broken"].state is None
    assert isinstance(runs["broken"].error, StateCorruptError)


def test_list_runs_on_an_empty_prefix(etcd_server):
    assert list(backend(etcd_server.endpoint, key_prefix=f"/none-{uuid.uuid4().hex}").list_runs()) == []


@pytest.mark.slow
def test_list_runs_reads_10k_runs(etcd_server):
    """Writes 10,000 runs from 8 threads, then lists them all, in order, in one recursive read."""
    from concurrent.futures import ThreadPoolExecutor

    prefix = f"/bench-{uuid.uuid4().hex[:8]}"
    writer = backend(etcd_server.endpoint, key_prefix=prefix, timeout=30)
    body = urlencode({"value": base64.b64encode(bytes(600)).decode()}).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def put(i: int) -> None:
        writer._http.request("PUT", f"/v2/keys{prefix}/run-{i:05d}", body, form)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(10_000)))
    listed = [entry.run_id for entry in writer.list_runs() if entry.state is not None]
    assert listed == [f"run-{i:05d}" for i in range(10_000)]  # how fast: the benchmarks' (P4, P8)


def test_watch_resynchronises_when_its_index_was_cleared(etcd_server):
    """etcd v2 keeps 1000 events: waiting on an older index is 'index cleared' (401)."""
    b = backend(etcd_server.endpoint)
    _, token, _ = b.set_state(b"v0")
    stop = threading.Event()
    items = backend(etcd_server.endpoint, b.run_id).watch(stop=stop)
    assert next(items) == (b"v0", token)  # the watcher now waits from the next index
    filler = backend(etcd_server.endpoint)
    _, t, _ = filler.set_state(b"f")
    for _ in range(1100):
        _, t, _ = filler.set_state(b"f", t)
    _, token, _ = b.set_state(b"v1", token)
    assert next(items) == (b"v1", token)
    stop.set()
    items.close()


# -- torch's own EtcdRendezvousBackend as the peer --------------------------------------------
@pytest.fixture()
def torch_backend(etcd_server):
    pytest.importorskip("torch")
    etcd = pytest.importorskip("etcd")
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

    client = etcd.Client(host="127.0.0.1", port=etcd_server.member.client_port, read_timeout=10)
    return EtcdRendezvousBackend(client, new_run_id(), key_prefix=PREFIX)


@pytest.mark.torch
def test_torch_writes_we_read(etcd_server, torch_backend):
    state, token, has_set = torch_backend.set_state(b"\x80\x04from torch")
    assert has_set
    ours = backend(etcd_server.endpoint, torch_backend._key.rsplit("/", 1)[1])
    assert ours.get_state() == (b"\x80\x04from torch", token)


@pytest.mark.torch
def test_we_write_with_torchs_token_and_torch_reads(etcd_server, torch_backend):
    _, token, _ = torch_backend.set_state(b"torch")
    ours = backend(etcd_server.endpoint, torch_backend._key.rsplit("/", 1)[1])
    state, our_token, has_set = ours.set_state(b"rdzvctl", token)
    assert has_set
    assert torch_backend.get_state() == (b"rdzvctl", our_token)


@pytest.mark.torch
def test_stale_tokens_refused_both_ways(etcd_server, torch_backend):
    _, torch_token, _ = torch_backend.set_state(b"torch-1")
    ours = backend(etcd_server.endpoint, torch_backend._key.rsplit("/", 1)[1])
    _, our_token, _ = ours.set_state(b"rdzvctl-1", torch_token)
    # torch holds a stale token now
    assert torch_backend.set_state(b"torch-2", torch_token) == (b"rdzvctl-1", our_token, False)
    _, torch_token2, _ = torch_backend.set_state(b"torch-3", our_token)
    # and now ours is stale
    assert ours.set_state(b"rdzvctl-2", our_token) == (b"torch-3", torch_token2, False)
    assert torch_backend.get_state() == (b"torch-3", torch_token2)


_AGENT = r"""
import sys, time
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

endpoint, run_id, nodes = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = RendezvousParameters("etcd-v2", endpoint, run_id, nodes, nodes, join_timeout=60,
                              last_call_timeout=1)
backend, store = create_backend(params)
handler = create_handler(store, backend, params)
info = handler.next_rendezvous()
print("RANK", info.rank, info.world_size, flush=True)
sys.stdin.read()  # keep heartbeating until the test closes stdin
"""


@pytest.mark.torch
@pytest.mark.slow
def test_live_rendezvous_over_etcd_v2(etcd_server):
    pytest.importorskip("torch")
    pytest.importorskip("etcd")
    from rdzvctl.state.codec import decode

    run_id, nodes = new_run_id(), 3
    agents = [
        subprocess.Popen([sys.executable, "-c", _AGENT, etcd_server.endpoint, run_id, str(nodes)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(nodes)
    ]
    try:
        ranks = []
        for agent in agents:
            line = _readline(agent, 90)
            assert line.startswith("RANK"), line
            ranks.append(int(line.split()[1]))
        assert sorted(ranks) == list(range(nodes))
        state, _ = backend(etcd_server.endpoint, run_id).get_state()
        decoded = decode(state)
        assert decoded.complete and not decoded.closed
        assert sorted(decoded.participants.values()) == list(range(nodes))
        now = datetime.now(timezone.utc)
        for node in decoded.participants:
            assert (now - decoded.last_heartbeats[node]).total_seconds() < 15
    finally:
        for agent in agents:
            agent.kill()
            agent.wait(timeout=10)


def _readline(process: subprocess.Popen, timeout: float) -> str:
    result = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else "(no answer)"


# -- several members ----------------------------------------------------------------------------
@pytest.mark.slow
def test_failover_when_a_member_dies(etcd_cluster):
    b = backend(etcd_cluster.endpoint, timeout=15)
    _, token, _ = b.set_state(b"before")
    etcd_cluster.members[0].kill()
    assert b.get_state() == (b"before", token)
    state, token2, has_set = b.set_state(b"after", token)
    assert has_set and token2 != token
    fresh = backend(etcd_cluster.endpoint, b.run_id, timeout=15)
    assert fresh.get_state() == (b"after", token2)


# -- errors ----------------------------------------------------------------------------------
def _assert_one_line(exc: BaseException, *parts: str) -> None:
    text = str(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text


def test_refused_endpoint():
    port = refused_port()
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        backend(f"127.0.0.1:{port}").get_state()
    assert time.monotonic() - started < 2
    _assert_one_line(info.value, f"127.0.0.1:{port}", "refused")


def test_timeout_is_honoured():
    with blackhole_server() as port:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError) as info:
            backend(f"127.0.0.1:{port}", timeout=1.0).get_state()
        assert time.monotonic() - started < 2.5
    _assert_one_line(info.value, f"127.0.0.1:{port}", "1 s")


def test_read_timeout_option_shortens_the_timeout():
    with blackhole_server() as port:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            backend(f"127.0.0.1:{port}", timeout=30, read_timeout="1").get_state()
        assert time.monotonic() - started < 2.5


def _http_answer(status: str, ctype: str, body: bytes):
    def respond(conn):
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
    return respond


def test_http_server_that_is_not_etcd():
    with scripted_server(_http_answer("200 OK", "text/html", b"<html>hello</html>")) as port:
        with pytest.raises(BackendUnavailableError) as info:
            backend(f"127.0.0.1:{port}").get_state()
    _assert_one_line(info.value, f"127.0.0.1:{port}")


def test_server_that_does_not_speak_http():
    def respond(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")

    with scripted_server(respond) as port:
        with pytest.raises(BackendUnavailableError) as info:
            backend(f"127.0.0.1:{port}").get_state()
    _assert_one_line(info.value, f"127.0.0.1:{port}")


def test_etcd_without_the_v2_api(etcd_auth_server):
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_auth_server.endpoint).get_state()
    _assert_one_line(info.value, "--enable-v2")


def test_https_to_a_plain_http_member(etcd_server, etcd_tls_server):
    conf = dict(etcd_tls_server.conf())
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_server.endpoint, **conf).get_state()
    _assert_one_line(info.value, "TLS")


def test_http_to_a_tls_member(etcd_tls_server):
    with pytest.raises(BackendUnavailableError) as info:
        backend(etcd_tls_server.endpoint).get_state()
    _assert_one_line(info.value, etcd_tls_server.endpoint)


@pytest.mark.parametrize("conf", [
    {"protocol": "gopher"},
    {"protocol": "https", "ca_cert": "/nonexistent/ca.pem"},
    {"read_timeout": "0"},
    {"read_timeout": "soon"},
])
def test_bad_options(conf):
    with pytest.raises(BackendConfigError):
        backend("127.0.0.1:2379", **conf)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:notaport", "127.0.0.1:70000", "ftp://host:1", ","])
def test_bad_endpoints(endpoint):
    with pytest.raises(BackendConfigError):
        backend(endpoint)


def test_all_members_down_names_each():
    ports = [refused_port(), refused_port()]
    with pytest.raises(BackendUnavailableError) as info:
        backend(",".join(f"127.0.0.1:{p}" for p in ports)).get_state()
    _assert_one_line(info.value, *(f"127.0.0.1:{p}" for p in ports))


def test_import_is_light():
    code = ("import sys, rdzvctl.backends.etcd_v2; "
            "bad = [m for m in ('etcd', 'etcd3', 'etcd3gw', 'requests', 'grpc', 'torch', 'urllib3') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
