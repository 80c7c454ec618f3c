"""`rdzvctl conformance` as a real process on real servers leaves the backend as it found it."""

from __future__ import annotations

import json
import urllib.request

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from tests.support.cli import run_rdzvctl


def nothing_new(before, after) -> None:
    """Every key the run created is gone (the servers are shared: others' keys may come and go)."""
    assert sorted(set(after) - set(before)) == []


def conformance(*flags: str) -> None:
    done = run_rdzvctl(["conformance", "-o", "json", "--racers", "4", *flags], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["passed"] is True


def etcd_v2_keys(endpoint: str) -> list:
    with urllib.request.urlopen(f"http://{endpoint}/v2/keys/?recursive=true", timeout=10) as answer:
        root = json.load(answer)["node"]
    found, stack = [], list(root.get("nodes", []))
    while stack:
        node = stack.pop()
        found.append(node["key"])
        stack.extend(node.get("nodes", []))
    return sorted(found)


def etcd_v3_keys_and_leases(endpoint: str) -> tuple:
    def call(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://{endpoint}/v3/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    everything = call("kv/range", {"key": "AA==", "range_end": "AA==", "keys_only": True})
    leases = call("lease/leases", {}).get("leases", [])
    return sorted(kv["key"] for kv in everything.get("kvs", [])), sorted(lease["ID"] for lease in leases)


def test_redis(redis_server):
    client = redis_server.client()
    client.set("unrelated", "1")
    before = sorted(client.scan_iter("*"))
    conformance("--rdzv-backend", "redis", "--rdzv-endpoint", redis_server.endpoint)
    nothing_new(before, client.scan_iter("*"))
    assert client.get("unrelated") == b"1"


def test_etcd_v2(etcd_server):
    before = etcd_v2_keys(etcd_server.endpoint)
    conformance("--rdzv-backend", "etcd-v2", "--rdzv-endpoint", etcd_server.endpoint)
    nothing_new(before, etcd_v2_keys(etcd_server.endpoint))


def test_etcd_v2_keeps_directories_other_runs_use(etcd_server):
    address = Address("etcd-v2", etcd_server.endpoint, "someone-elses-run", {}, 5.0)
    with open_backend(address) as backend:
        assert backend.set_state(b"theirs")[2]
        conformance("--rdzv-backend", "etcd-v2", "--rdzv-endpoint", etcd_server.endpoint)
        assert backend.get_state()[0] == b"theirs"
        backend.clear(backend.get_state()[1])


def test_etcd_v3(etcd_server):
    before = etcd_v3_keys_and_leases(etcd_server.endpoint)
    conformance("--rdzv-backend", "etcd-v3", "--rdzv-endpoint", etcd_server.endpoint)
    after = etcd_v3_keys_and_leases(etcd_server.endpoint)
    nothing_new(before[0], after[0])
    nothing_new(before[1], after[1])


@pytest.mark.torch
def test_c10d_tcpstore(tcpstore_libuv):
    from rdzvctl.backends.tcpstore import TcpStoreClient

    with TcpStoreClient(tcpstore_libuv.host, tcpstore_libuv.port) as client:
        before = sorted(client.list_keys())
        conformance("--rdzv-backend", "c10d", "--rdzv-endpoint", f"{tcpstore_libuv.host}:{tcpstore_libuv.port}")
        nothing_new(before, client.list_keys())


def test_c10d_filestore(tmp_path):
    from rdzvctl.backends.filestore import FileStore

    path = tmp_path / "store"
    path.write_bytes(b"")
    conformance("--rdzv-backend", "c10d", "--rdzv-endpoint", str(path), "--rdzv-conf", "store_type=file")
    assert FileStore(str(path)).list_keys() == []
