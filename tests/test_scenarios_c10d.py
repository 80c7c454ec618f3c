"""c10d-only scenarios: reading a run that does not exist never creates it.

torch's own ``C10dRendezvousBackend`` writes its "no state" sentinel when it is
constructed; rdzvctl must not: a read-only tool that created keys would make
every typo in a run id visible to torch's agents.  The checks use torch's
own store clients (``store.check``) on both TCPStore servers and a FileStore.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.e2e_cli.cli import Rdzvctl
from tests.support.torch_handlers import NodeFactory, Target
from tests.support.torch_peer import TcpStoreServer, torch_filestore, torch_tcpstore

pytestmark = pytest.mark.torch  # real torch rendezvous handlers and stores

TIMEOUT = 3.0
KEY_PREFIX = "torch.rendezvous."

# Commands that only read, and writes that must find nothing to write over.
NO_STATE_COMMANDS = (
    (["get"], 5),
    (["get", "-o", "json"], 5),
    (["get", "-o", "raw"], 5),
    (["corrupt-detect"], 5),
    (["reset", "--mode", "prune", "--yes"], 5),
    (["reset", "--mode", "clear", "--yes"], 5),
    (["set", "--round", "3", "--yes"], 5),
    (["watch", "--until", "absent"], 0),
)


@pytest.fixture()
def cli(tmp_path: Path) -> Rdzvctl:
    return Rdzvctl(tmp_path / "backups")


@pytest.fixture()
def run_id() -> str:
    return f"scn-missing-{uuid.uuid4().hex[:10]}"


def _run_all(cli: Rdzvctl, target: Target, run_id: str) -> None:
    address = [*target.address(run_id), "--timeout", f"{TIMEOUT:g}"]
    results = cli.all(*([*args, *address] for args, _ in NO_STATE_COMMANDS), ["list", *target.address(None)])
    for (_, code), result in zip(NO_STATE_COMMANDS, results):
        assert result.code == code, str(result)
        assert result.elapsed < TIMEOUT + 5, str(result)  # within the timeout (plus start-up)
        if code == 5:
            assert run_id in result.stderr and result.stderr.count("\n") == 1, str(result)
    assert results[-1].code == 0 and run_id not in results[-1].out, str(results[-1])


def test_missing_run_on_a_tcpstore_exits_5_and_creates_nothing(tcpstore_server: TcpStoreServer, cli: Rdzvctl,
                                                               run_id: str) -> None:
    store = torch_tcpstore(tcpstore_server)
    keys_before = store.num_keys()
    _run_all(cli, Target("c10d-tcp", "c10d", tcpstore_server.endpoint), run_id)
    assert not store.check([KEY_PREFIX + run_id])
    assert store.num_keys() == keys_before


def test_missing_run_in_a_filestore_exits_5_and_leaves_the_file_alone(tmp_path: Path, cli: Rdzvctl,
                                                                      run_id: str) -> None:
    path = tmp_path / "rendezvous.store"
    store = torch_filestore(str(path))
    store.set("unrelated", b"value")
    before = path.read_bytes()
    _run_all(cli, Target("c10d-file", "c10d", str(path), {"store_type": "file"}), run_id)
    assert path.read_bytes() == before  # not one record appended (no key, no refcount)
    assert not store.check([KEY_PREFIX + run_id])
    missing = tmp_path / "no-such.store"
    result = cli("get", "--rdzv-backend", "c10d", "--rdzv-endpoint", str(missing), "--rdzv-id", run_id,
                 "--rdzv-conf", "store_type=file", "--timeout", f"{TIMEOUT:g}")
    assert result.code == 5 and not os.path.exists(missing), str(result)  # never creates a FileStore


def test_torch_sentinel_reads_as_no_state(tcpstore_server: TcpStoreServer, node_factory: NodeFactory,
                                          cli: Rdzvctl, run_id: str) -> None:
    """A handler that was created but never joined leaves torch's sentinel: no state (5), untouched."""
    if not tcpstore_server.use_libuv:
        pytest.skip("elastic's handlers run on the libuv server")
    target = Target("c10d-tcp", "c10d", tcpstore_server.endpoint)
    store = torch_tcpstore(tcpstore_server)
    node = node_factory.spawn(target, run_id)  # torch's C10dRendezvousBackend writes the sentinel
    try:
        assert store.get(KEY_PREFIX + run_id) == b"Y2FuaW1hZGFt"
        result = cli("get", *target.address(run_id), "--timeout", f"{TIMEOUT:g}")
        assert result.code == 5, str(result)
        listed = cli("list", *target.address(None), "--timeout", f"{TIMEOUT:g}", "-o", "json")
        assert run_id not in {r["run_id"] for r in listed.json()["runs"]}, str(listed)
        assert store.get(KEY_PREFIX + run_id) == b"Y2FuaW1hZGFt"
    finally:
        node.kill()
        node.close()
