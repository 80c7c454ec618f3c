"""The c10d backend over torch 2.13 TCPStore servers (libuv and legacy), torch as the peer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.c10d import NULL_SENTINEL, C10dBackend, parse_endpoint
from rdzvctl.backends.registry import open_backend
from rdzvctl.backends.tcpstore import TcpStoreClient
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    StateCorruptError,
)
from rdzvctl.testing.conformance import BackendConformanceTests, run_conformance
from tests.support.torch_peer import (
    blackhole_server,
    refused_port,
    scripted_server,
    torch_set,
    torch_tcpstore,
)

pytestmark = pytest.mark.torch
TIMEOUT = 5.0


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def backend(endpoint: str, run_id: str = "", timeout: float = TIMEOUT, **conf: str) -> C10dBackend:
    return C10dBackend.from_address(Address("c10d", endpoint, run_id or new_run_id(), conf, timeout))


def torch_backend(store, run_id: str):
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    return C10dRendezvousBackend(store, run_id)


@pytest.fixture(scope="module")
def torch_store(tcpstore_server):
    return torch_tcpstore(tcpstore_server)


# -- the conformance kit, once per server flavour ----------------------------------------
class _Kit(BackendConformanceTests):
    server_fixture = ""

    @pytest.fixture(autouse=True)
    def _server(self, request):
        self.server = request.getfixturevalue(self.server_fixture)

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id)

    def corrupt_state(self, b: C10dBackend) -> None:
        with TcpStoreClient(self.server.host, self.server.port, TIMEOUT) as client:
            client.set(b.key, b"%%% not base64 %%%")


class TestConformanceLibuv(_Kit):
    server_fixture = "tcpstore_libuv"


class TestConformanceLegacy(_Kit):
    server_fixture = "tcpstore_legacy"


def test_no_aba_is_a_declared_limitation(tcpstore_libuv):
    [result] = run_conformance(lambda run_id: backend(tcpstore_libuv.endpoint, run_id), only=["no_aba"])
    assert result.outcome == "limitation", result.detail
    assert C10dBackend.strict_fencing is False


# -- reading never writes ------------------------------------------------------------------
def test_get_of_a_missing_run_is_none_and_creates_no_key(tcpstore_server, torch_store):
    b = backend(tcpstore_server.endpoint, timeout=2.0)
    start = time.monotonic()
    assert b.get_state() is None
    assert b.get_state() is None  # the connection survived (legacy drops it on a raw GET)
    assert time.monotonic() - start < 2.0
    assert torch_store.check([f"torch.rendezvous.{b.run_id}"]) is False


def test_constructing_and_listing_write_nothing(tcpstore_server, torch_store):
    before = torch_store.num_keys()
    b = backend(tcpstore_server.endpoint)
    list(b.list_runs())
    b.store_keys()
    b.get_state()
    assert torch_store.num_keys() == before


def test_sentinel_reads_as_no_state(tcpstore_server, torch_store):
    run_id = new_run_id()
    torch_backend(torch_store, run_id)  # torch's constructor writes the sentinel
    b = backend(tcpstore_server.endpoint, run_id)
    assert b.get_state() is None
    state, token, has_set = b.set_state(b"ours")
    assert has_set and token == b"b3Vycw=="
    assert torch_store.get(f"torch.rendezvous.{run_id}") == b"b3Vycw=="


def test_non_base64_value_is_corrupt_and_names_the_run(tcpstore_server, torch_store):
    b = backend(tcpstore_server.endpoint)
    torch_set(torch_store, f"torch.rendezvous.{b.run_id}", "3")  # e.g. a counter, not a state
    with pytest.raises(StateCorruptError, match=b.run_id):
        b.get_state()


# -- cross-writes with torch's own C10dRendezvousBackend ------------------------------------
def test_torch_writes_we_read_the_same_bytes_and_token(tcpstore_server, torch_store):
    run_id = new_run_id()
    theirs = torch_backend(torch_store, run_id)
    _, torch_token, has_set = theirs.set_state(b"\x80\x04torch state")
    assert has_set
    assert backend(tcpstore_server.endpoint, run_id).get_state() == (b"\x80\x04torch state", torch_token)


def test_we_write_with_torchs_token_and_torch_reads_it(tcpstore_server, torch_store):
    run_id = new_run_id()
    theirs = torch_backend(torch_store, run_id)
    _, torch_token, _ = theirs.set_state(b"v1")
    state, token, has_set = backend(tcpstore_server.endpoint, run_id).set_state(b"v2", torch_token)
    assert has_set and state == b"v2"
    assert theirs.get_state() == (b"v2", token)


def test_torchs_stale_token_is_refused_by_our_write(tcpstore_server, torch_store):
    run_id = new_run_id()
    theirs = torch_backend(torch_store, run_id)
    _, stale, _ = theirs.set_state(b"v1")
    _, current, _ = theirs.set_state(b"v2", stale)
    assert backend(tcpstore_server.endpoint, run_id).set_state(b"v3", stale) == (b"v2", current, False)
    assert theirs.get_state() == (b"v2", current)


def test_our_stale_token_is_refused_by_torchs_write(tcpstore_server, torch_store):
    ours = backend(tcpstore_server.endpoint)
    _, stale, _ = ours.set_state(b"v1")
    _, current, _ = ours.set_state(b"v2", stale)
    theirs = torch_backend(torch_store, ours.run_id)
    assert theirs.set_state(b"v3", stale) == (b"v2", current, False)
    assert ours.get_state() == (b"v2", current)


def test_token_on_a_missing_run_writes_nothing(tcpstore_server, torch_store):
    b = backend(tcpstore_server.endpoint)
    token = b"eA=="  # base64 of b"x", the "lie" would echo it back
    assert b.set_state(b"x", token) is None
    assert b.set_state(b"y", token) is None
    assert torch_store.check([f"torch.rendezvous.{b.run_id}"]) is False


def test_clear_restores_the_sentinel(tcpstore_server, torch_store):
    b = backend(tcpstore_server.endpoint)
    _, token, _ = b.set_state(b"x")
    assert b.clear(token) is True
    assert torch_store.get(f"torch.rendezvous.{b.run_id}") == NULL_SENTINEL
    assert torch_backend(torch_store, b.run_id).get_state() is None
    assert b.clear(token) is False


# -- list_runs and the per-round store keys ------------------------------------------------
def test_list_runs_finds_runs_sentinels_and_corrupt_values(tcpstore_server, torch_store):
    b = backend(tcpstore_server.endpoint)
    ok, empty, bad = new_run_id(), new_run_id(), new_run_id()
    _, token, _ = backend(tcpstore_server.endpoint, ok).set_state(b"listed")
    torch_backend(torch_store, empty)
    torch_set(torch_store, f"torch.rendezvous.{bad}", "%%%")
    torch_set(torch_store, f"torch.rendezvous.{ok}.0/MASTER_ADDR", "node0")
    runs = {entry.run_id: entry.state for entry in b.list_runs()}
    assert runs[ok] == (b"listed", token)
    assert runs[empty] is None
    assert runs[bad] == (b"%%%", b"%%%")
    assert f"{ok}.0/MASTER_ADDR" not in runs and not any("/" in r for r in runs)


def test_list_runs_batches_many_runs(tcpstore_libuv):
    prefix = f"many-{uuid.uuid4().hex[:6]}"
    with TcpStoreClient(tcpstore_libuv.host, tcpstore_libuv.port, TIMEOUT) as client:
        for i in range(2500):
            client.compare_set(f"/torch.rendezvous.{prefix}-{i}", b"", b"c3RhdGU=")
    runs = [e for e in backend(tcpstore_libuv.endpoint).list_runs() if e.run_id.startswith(prefix)]
    assert len(runs) == 2500
    assert all(e.state == (b"state", b"c3RhdGU=") for e in runs)


def test_store_keys_of_every_round(tcpstore_server, torch_store):
    import torch.distributed as dist

    b = backend(tcpstore_server.endpoint)
    for round_ in (0, 2):
        round_store = dist.PrefixStore(f"torch.rendezvous.{b.run_id}.{round_}", torch_store)
        torch_set(round_store, "MASTER_ADDR", f"node{round_}")
        torch_set(round_store, "MASTER_PORT", "29500")
    torch_set(torch_store, f"torch.rendezvous.{b.run_id}x.0/MASTER_ADDR", "another run")
    assert b.store_keys() == {
        "0/MASTER_ADDR": b"node0",
        "0/MASTER_PORT": b"29500",
        "2/MASTER_ADDR": b"node2",
        "2/MASTER_PORT": b"29500",
    }


# -- addressing and errors ------------------------------------------------------------------
def test_registry_opens_the_c10d_backend(tcpstore_libuv):
    b = open_backend(Address("c10d", tcpstore_libuv.endpoint, new_run_id(), {}, TIMEOUT))
    assert isinstance(b, C10dBackend) and b.describe() == tcpstore_libuv.endpoint


def test_reading_the_backend_module_imports_no_torch():
    code = "import sys, rdzvctl.backends.c10d; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("endpoint, expected", [
    ("", ("localhost", 29400)),
    ("node1", ("node1", 29400)),
    ("node1:1234", ("node1", 1234)),
    ("[::1]:1234", ("::1", 1234)),
    ("[::1]", ("::1", 29400)),
])
def test_endpoints_parse_like_torch(endpoint, expected):
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint, conf", [
    ("node1:99999", {}),
    ("node1:http", {}),
    ("bad host:1", {}),
    ("127.0.0.1:1", {"store_type": "s3"}),
    ("127.0.0.1:1", {"read_timeout": "0"}),
    ("127.0.0.1:1", {"read_timeout": "soon"}),
    ("", {"store_type": "file"}),
])
def test_bad_endpoints_and_options_are_config_errors(endpoint, conf):
    with pytest.raises(BackendConfigError):
        backend(endpoint, **conf)


def test_read_timeout_lowers_the_timeout():
    assert backend("127.0.0.1:1", timeout=30, read_timeout="2").store.timeout == 2.0
    assert backend("127.0.0.1:1", timeout=3, read_timeout="60").store.timeout == 3.0


def test_refused_endpoint_is_unavailable_and_named():
    port = refused_port()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}") as info:
        backend(f"127.0.0.1:{port}").get_state()
    assert not isinstance(info.value, BackendTimeoutError)


def test_black_hole_times_out_within_the_timeout():
    with blackhole_server() as port:
        b = backend(f"127.0.0.1:{port}", timeout=0.5)
        start = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            b.get_state()
        assert time.monotonic() - start < 1.5


def test_wrong_protocol_is_unavailable():
    def garbage(conn) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n<html>hello</html>")

    with scripted_server(garbage) as port:
        with pytest.raises(BackendUnavailableError, match="not a TCPStore"):
            backend(f"127.0.0.1:{port}").set_state(b"x")


# -- a live rendezvous of torch handlers ------------------------------------------------------
_NODE = r"""
import json, sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

params = RendezvousParameters(backend="c10d", endpoint=sys.argv[1], run_id=sys.argv[2],
                              min_nodes=3, max_nodes=3, is_host="false", join_timeout="90")
backend, store = create_backend(params)
handler = create_handler(store, backend, params)
info = handler.next_rendezvous()
print(json.dumps({"rank": info.rank, "world_size": info.world_size}), flush=True)
sys.stdin.read()  # stay alive (heartbeating) until the test is done
"""


@pytest.mark.slow
def test_live_rendezvous_of_three_torch_nodes(tcpstore_libuv):
    from rdzvctl.state.codec import decode

    run_id = new_run_id()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    nodes = [
        subprocess.Popen([sys.executable, "-c", _NODE, tcpstore_libuv.endpoint, run_id],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env)
        for _ in range(3)
    ]
    try:
        infos = [json.loads(node.stdout.readline() or "null") for node in nodes]
        assert sorted(info["rank"] for info in infos) == [0, 1, 2]
        b = backend(tcpstore_libuv.endpoint, run_id)
        raw, token = b.get_state()
        state = decode(raw)
        assert state.complete and not state.closed
        assert sorted(state.participants.values()) == [0, 1, 2]
        now = datetime.now(timezone.utc)
        for node in state.participants:
            assert now - state.last_heartbeats[node] < timedelta(seconds=15)
        assert f"{state.round}/MASTER_ADDR" in b.store_keys()
    finally:
        for node in nodes:
            node.stdin.close()
        for node in nodes:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
