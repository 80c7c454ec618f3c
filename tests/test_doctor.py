"""rdzvctl doctor against real servers: torch's TCPStore (libuv and legacy), FileStore, etcd, Redis.

States are written with rdzvctl's encode() through the backends (torch loads
them; see test_torch_usable), heartbeats stamped at the real current time;
the healthy-run test uses real torch rendezvous handlers.
"""

# ruff: noqa: F811  (pytest fixtures imported by name)
from __future__ import annotations

import datetime as _dt
import socket
import uuid
from typing import Any, Dict, List, Optional

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from rdzvctl.backends.tcpstore import TcpStoreClient
from rdzvctl.state.codec import encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.support.cli import cli_env, closed_port, invoke, json_out  # noqa: F401
from tests.support.etcd_server import EtcdCluster, etcd_server  # noqa: F401
from tests.support.redis_server import RedisServer, redis_cluster_node, redis_server, redis_server_notify  # noqa: F401
from tests.support.torch_handlers import Target, node_factory  # noqa: F401
from tests.support.torch_peer import filestore_path, tcpstore_legacy, tcpstore_libuv  # noqa: F401


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def make_state(*addrs: str, complete: bool = True, ahead: Optional[Dict[str, float]] = None) -> RendezvousState:
    """A complete round of one node per address, every heartbeat fresh (``ahead``: seconds in the future)."""
    t = now()
    nodes = [NodeDesc(addr, 1000 + i, 0) for i, addr in enumerate(addrs)]
    return RendezvousState(
        round=1, complete=complete, participants={n: i for i, n in enumerate(nodes)},
        last_heartbeats={n: t + _dt.timedelta(seconds=(ahead or {}).get(n.addr, 0.0)) for n in nodes},
    )


def put(address: Address, state: RendezvousState) -> None:
    with open_backend(address) as backend:
        result = backend.set_state(encode(state))
        assert result is not None and result[2]


def put_master(endpoint: str, run_id: str, host: str, port: int, round_: int = 1) -> None:
    """The round's MASTER_ADDR/MASTER_PORT, where torch's handler keeps them in a c10d store."""
    store_host, store_port = endpoint.rsplit(":", 1)
    with TcpStoreClient(store_host, int(store_port)) as client:
        client.set(f"/torch.rendezvous.{run_id}.{round_}/MASTER_ADDR", host.encode())
        client.set(f"/torch.rendezvous.{run_id}.{round_}/MASTER_PORT", str(port).encode())
        assert client.check([f"/torch.rendezvous.{run_id}.{round_}/MASTER_PORT"])


def doctor(backend: str, endpoint: str, run_id: Optional[str], *extra: str) -> Any:
    args = ["doctor", "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--timeout", "5", "-o", "json"]
    if run_id is not None:
        args += ["--rdzv-id", run_id]
    result = invoke(args + list(extra))
    assert result.exit_code in (0, 1), (result.stdout, result.stderr)
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.doctor/v1"
    assert (result.exit_code == 1) == (doc["status"] == "fail"), doc
    return result.exit_code, doc


def checks(doc: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
    return [c for c in doc["checks"] if c["name"] == name]


def status(doc: Dict[str, Any], name: str) -> str:
    found = checks(doc, name)
    assert found, f"no check {name}: {[c['name'] for c in doc['checks']]}"
    return max((c["status"] for c in found), key=("ok", "warn", "fail").index)


def failing(doc: Dict[str, Any]) -> List[str]:
    return [f"{c['name']}: {c['message']}" for c in doc["checks"] if c["status"] == "fail"]


@pytest.fixture()
def run_id() -> str:
    return f"doc-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def listening() -> Any:
    """A loopback port something listens on (a stand-in for rank 0's store)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


# -- c10d TCPStore: both server flavours ---------------------------------------------------
@pytest.mark.parametrize("flavour", ["libuv", "legacy"])
def test_a_healthy_run_on_a_tcpstore_passes_and_names_the_flavour(flavour, request, cli_env, run_id, listening):
    server = request.getfixturevalue(f"tcpstore_{flavour}")
    address = Address("c10d", server.endpoint, run_id)
    put(address, make_state("127.0.0.1", "localhost"))
    put_master(server.endpoint, run_id, "127.0.0.1", listening)
    code, doc = doctor("c10d", server.endpoint, run_id)
    assert code == 0, failing(doc)
    assert status(doc, "endpoint.resolve") == status(doc, "endpoint.connect") == "ok"
    assert status(doc, "endpoint.protocol") == "ok"
    assert status(doc, "tcpstore.flavour") == ("ok" if flavour == "libuv" else "warn")
    assert doc["server"]["flavour"] == flavour
    assert status(doc, "bootstrap.master") == "ok"
    assert status(doc, "run.state") == "ok"


def test_an_unresolvable_node_address_fails(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost", "trainer-1.invalid"))
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    assert code == 1
    (check,) = checks(doc, "nodes.resolve")
    assert check["status"] == "fail" and "trainer-1.invalid" in check["message"] and check["fix"]


def test_a_loopback_address_among_remote_nodes_fails(tcpstore_libuv, cli_env, run_id):
    # 192.0.2.0/24 is TEST-NET-1: a literal address needs no DNS and is never this host.
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("192.0.2.10", "192.0.2.11", "localhost"))
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    assert code == 1
    (check,) = checks(doc, "nodes.loopback")
    assert check["status"] == "fail" and "localhost" in check["message"]


def test_loopback_nodes_on_one_host_pass(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost", "127.0.0.1"))
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    assert status(doc, "nodes.loopback") == "ok", failing(doc)


def test_a_closed_master_port_fails(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost", "127.0.0.1"))
    port = closed_port()
    put_master(tcpstore_libuv.endpoint, run_id, "127.0.0.1", port)
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    assert code == 1
    (check,) = checks(doc, "bootstrap.master")
    assert check["status"] == "fail" and f"127.0.0.1:{port}" in check["message"]


def test_a_heartbeat_in_the_future_warns_of_clock_skew(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id),
        make_state("localhost", "127.0.0.1", ahead={"127.0.0.1": 120.0}))
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    (check,) = checks(doc, "nodes.clock")
    assert check["status"] == "warn" and "127.0.0.1_1001_0" in check["message"]
    assert code == 0, failing(doc)  # a warning alone does not fail


def test_duplicates_max_nodes_and_a_shared_run_id(tcpstore_libuv, cli_env):
    run_id = "none"  # torch's old default (pytorch#82160)
    state = make_state("localhost", "127.0.0.1")
    state.wait_list.add(next(iter(state.participants)))
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), state)
    try:
        code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id, "--rdzv-conf", "max_nodes=1")
        assert code == 1
        assert status(doc, "nodes.duplicates") == "fail"
        assert status(doc, "nodes.max-nodes") == "fail"
        assert status(doc, "run.id") == "warn"
    finally:
        with open_backend(Address("c10d", tcpstore_libuv.endpoint, run_id)) as backend:
            current = backend.get_state()
            if current is not None:
                backend.clear(current[1])


def test_an_unreachable_endpoint_fails_without_a_traceback(cli_env, run_id):
    port = closed_port()
    code, doc = doctor("c10d", f"127.0.0.1:{port}", run_id)
    assert code == 1
    assert status(doc, "endpoint.connect") == "fail"
    assert status(doc, "endpoint.protocol") == "fail"


def test_an_unresolvable_endpoint_fails(cli_env, run_id):
    code, doc = doctor("c10d", "store.invalid:29400", run_id)
    assert code == 1 and status(doc, "endpoint.resolve") == "fail"


def test_text_output_is_one_line_per_check(tcpstore_libuv, cli_env, run_id):
    put(Address("c10d", tcpstore_libuv.endpoint, run_id), make_state("localhost", "node\x1b[2J.invalid"))
    flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", tcpstore_libuv.endpoint, "--rdzv-id", run_id]
    result = invoke(["doctor", *flags])
    assert result.exit_code == 1
    assert "\x1b" not in result.stdout and "\\x1b" in result.stdout  # shown escaped, never interpreted
    rows = [line.split()[:2] for line in result.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("ok", "warn", "fail")]
    _, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id)
    assert rows == [[c["status"], c["name"]] for c in doc["checks"]]
    assert ["fail", "nodes.resolve"] in rows


# -- FileStore -------------------------------------------------------------------------------
def test_a_filestore_reports_its_file_and_filesystem(filestore_path, cli_env, run_id):
    put(Address("c10d", filestore_path, run_id, {"store_type": "file"}), make_state("localhost"))
    code, doc = doctor("c10d", filestore_path, run_id, "--rdzv-conf", "store_type=file")
    assert code == 0, failing(doc)
    assert status(doc, "filestore.path") == status(doc, "filestore.permissions") == "ok"
    assert status(doc, "filestore.size") == "ok"
    assert checks(doc, "filestore.filesystem") and doc["server"]["fstype"]
    assert not checks(doc, "endpoint.connect")  # a file has no network endpoint


def test_a_missing_filestore_fails(tmp_path, cli_env, run_id):
    code, doc = doctor("c10d", str(tmp_path / "gone.store"), run_id, "--rdzv-conf", "store_type=file")
    assert code == 1 and status(doc, "filestore.path") == "fail"


# -- etcd --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd_without_v2():
    cluster = EtcdCluster.create(enable_v2=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_etcd_v2_with_the_v2_api_passes(etcd_server, cli_env, run_id):
    put(Address("etcd-v2", etcd_server.endpoint, run_id), make_state("localhost"))
    code, doc = doctor("etcd-v2", etcd_server.endpoint, run_id)
    assert code == 0, failing(doc)
    assert status(doc, "etcd.v2") == status(doc, "etcd.health") == status(doc, "etcd.members") == "ok"
    assert status(doc, "endpoint.resolve") == status(doc, "endpoint.connect") == status(doc, "endpoint.protocol") == "ok"
    assert doc["server"]["version"].startswith("3.")
    assert doc["server"]["leader"]


def test_etcd_v2_without_the_v2_api_fails(etcd_without_v2, cli_env, run_id):
    code, doc = doctor("etcd-v2", etcd_without_v2.endpoint, run_id)
    assert code == 1
    (check,) = checks(doc, "etcd.v2")
    assert check["status"] == "fail" and "--enable-v2" in check["fix"]


def test_etcd_v3_does_not_need_the_v2_api(etcd_without_v2, cli_env, run_id):
    put(Address("etcd-v3", etcd_without_v2.endpoint, run_id), make_state("localhost"))
    code, doc = doctor("etcd-v3", etcd_without_v2.endpoint, run_id)
    assert code == 0, failing(doc)
    assert status(doc, "etcd.v2") == "ok" and doc["server"]["v2_enabled"] is False
    assert status(doc, "endpoint.connect") == status(doc, "endpoint.protocol") == "ok"
    assert status(doc, "etcd.members") == "ok"


# -- Redis ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_evicting(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-lru"),
                         ["--maxmemory-policy", "allkeys-lru", "--notify-keyspace-events", "KEA"])
    try:
        yield server
    finally:
        server.stop()


def test_redis_without_keyspace_notifications_warns(redis_server, cli_env, run_id):
    put(Address("redis", redis_server.endpoint, run_id), make_state("localhost"))
    code, doc = doctor("redis", redis_server.endpoint, run_id)
    assert code == 0, failing(doc)
    (check,) = checks(doc, "redis.keyspace-events")
    assert check["status"] == "warn" and "notify-keyspace-events" in check["fix"]
    assert status(doc, "redis.maxmemory-policy") == "ok"
    assert doc["server"]["role"] == "master"
    assert status(doc, "endpoint.resolve") == status(doc, "endpoint.connect") == status(doc, "endpoint.protocol") == "ok"


def test_redis_with_keyspace_notifications_passes(redis_server_notify, cli_env, run_id):
    put(Address("redis", redis_server_notify.endpoint, run_id), make_state("localhost"))
    code, doc = doctor("redis", redis_server_notify.endpoint, run_id)
    assert code == 0, failing(doc)
    assert status(doc, "redis.keyspace-events") == "ok"


def test_redis_with_an_evicting_policy_fails(redis_evicting, cli_env, run_id):
    code, doc = doctor("redis", redis_evicting.endpoint, run_id)
    assert code == 1
    (check,) = checks(doc, "redis.maxmemory-policy")
    assert check["status"] == "fail" and "allkeys-lru" in check["message"] and "noeviction" in check["fix"]


# -- without a run id, only the endpoint ----------------------------------------------------------
def test_without_a_run_id_only_the_endpoint_is_checked(tcpstore_libuv, cli_env):
    code, doc = doctor("c10d", tcpstore_libuv.endpoint, None)
    assert code == 0, failing(doc)
    assert status(doc, "run.id") == "warn" and not checks(doc, "run.state")


# -- real torch handlers ---------------------------------------------------------------------------
@pytest.mark.torch
def test_a_real_torch_rendezvous_passes(tcpstore_libuv, node_factory, cli_env, run_id):
    """torch's handlers rendezvous; rank 0's worker store listens at MASTER_PORT as init_process_group makes it."""
    import torch.distributed as dist

    target = Target("c10d-tcp", "c10d", tcpstore_libuv.endpoint)
    with node_factory.group(target, run_id, 2) as nodes:
        nodes.next_round()
        host, port = tcpstore_libuv.endpoint.rsplit(":", 1)
        with TcpStoreClient(host, int(port)) as client:
            master_port = int(client.get(f"/torch.rendezvous.{run_id}.0/MASTER_PORT") or b"0")
        # The nodes run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: MASTER_PORT is where the workers'
        # store will listen (env:// init: TCPStore(MASTER_ADDR, MASTER_PORT, is_master=rank == 0)).
        workers_store = dist.TCPStore("127.0.0.1", master_port, is_master=True, wait_for_workers=False)
        code, doc = doctor("c10d", tcpstore_libuv.endpoint, run_id, "--rdzv-conf",
                           "keep_alive_interval=1,keep_alive_max_attempt=3")
        assert code == 0, failing(doc)
        assert status(doc, "run.state") == "ok"
        assert status(doc, "bootstrap.master") == "ok"
        assert f":{master_port} accepts connections" in checks(doc, "bootstrap.master")[0]["message"]
        del workers_store


def test_a_redis_cluster_reports_its_state(redis_cluster_node, cli_env, run_id):
    code, doc = doctor("redis", redis_cluster_node.endpoint, run_id, "--rdzv-conf", "cluster=true")
    assert status(doc, "redis.cluster") == "ok", doc["checks"]
    assert doc["server"]["cluster_enabled"] is True and doc["server"]["cluster_state"] == "ok"
