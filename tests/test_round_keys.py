"""Per-round store keys (``torch.rendezvous.<id>.<round>/...``) and what reset does about them.

torch never deletes a round's keys (``MASTER_ADDR``, ``MASTER_PORT``, agent
keys), so ``reset --mode clear`` must never let a new job start at a round
that has some.  Here: the pure rules (``rdzvctl.state.restart``), the CLI on
the memory backend, and every real backend with the keys written the way
torch's handler writes them (``PrefixStore("torch.rendezvous.<id>.<round>", store)``
on the handler's own store: torch's TCPStore, FileStore and ``EtcdStore``,
rdzvctl's torchrun stores on Redis and etcd v3) -- including the conformance
kit's ``store_rounds`` case.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.backends.registry import open_backend
from rdzvctl.backup import read_backup
from rdzvctl.state.codec import decode, encode
from rdzvctl.state.restart import describe_rounds, fresh_state, join_round, restart_round
from rdzvctl.testing.conformance import run_conformance
from tests.support.cli import (
    invoke,
    json_out,
    make_state,
)


# -- the pure rules ------------------------------------------------------------------------------
@pytest.mark.parametrize(("keys", "old", "expected"), [
    ((), None, 0), ((), 0, 1), ((), 6, 7), ((0,), None, 1), ((0, 1, 2), 0, 3), ((0, 9), 4, 10), ((2,), 5, 6),
])
def test_restart_round_is_past_every_round_with_keys_and_the_old_round(keys, old, expected) -> None:
    assert restart_round(keys, old) == expected


def test_fresh_state_is_torchs_new_state_at_that_round() -> None:
    state = fresh_state(4)
    assert (state.round, state.complete, state.closed, state.deadline) == (4, False, False, None)
    assert not state.nodes
    assert decode(encode(state)) == state


def test_join_round_follows_torchs_join_op() -> None:
    assert join_round(make_state(round=3, complete=True)) == 4
    assert join_round(make_state(round=3, complete=False)) == 3


def test_describe_rounds() -> None:
    assert describe_rounds([]) == "none"
    assert describe_rounds([3, 0, 1, 2]) == "0-3"
    assert describe_rounds([0, 1, 5, 7, 8, 9]) == "0, 1, 5, 7-9"
    assert describe_rounds(range(0, 40, 2), limit=3) == "0, 2, 4, ..."


# -- the CLI on the memory backend -------------------------------------------------------------------
def test_clear_with_round_keys_writes_a_fresh_state_past_them(memory, cli_env) -> None:
    memory.put(make_state(round=2, closed=True))
    before = memory.raw()
    for round_ in (0, 1, 2):
        memory.backend().put_store_key(round_, "MASTER_ADDR", b"10.0.0.%d" % round_)
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert "store holds keys of rounds 0-2" in result.stderr and "at round 3" in result.stderr
    doc = json_out(result)
    assert doc["written"] is True
    assert (doc["action"], doc["next_round"], doc["store_key_rounds"]) == ("fresh-state", 3, [0, 1, 2])
    assert memory.state() == fresh_state(3)
    assert memory.backend().store_rounds() == {0, 1, 2}  # the keys stay
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state == before  # all that was replaced


def test_clear_dry_run_says_what_happens_to_the_round_keys(memory, cli_env) -> None:
    token = memory.put(make_state(round=5))
    memory.backend().put_store_key(5, "MASTER_ADDR", b"x")
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--dry-run", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert "Round keys: the store holds keys of rounds 5" in result.stderr
    assert "They stay" in result.stderr and "round 6" in result.stderr
    assert "Dry run: nothing was written." in result.stderr
    assert json_out(result) == {"written": False, "run_id": "job42", "action": "fresh-state", "next_round": 6,
                                "store_key_rounds": [5]}
    assert memory.token() == token and not list(cli_env.glob("*.json"))


def test_clear_without_round_keys_removes_the_state(memory, cli_env) -> None:
    memory.put(make_state(round=2))
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    assert "the store holds none for this run; the state is removed" in result.stderr
    assert json_out(result)["action"] == "remove" and memory.raw() is None


def test_clear_of_a_corrupt_state_uses_the_rounds_of_the_keys(memory, cli_env) -> None:
    memory.put(b"\x80\x04garbage")
    memory.backend().put_store_key(7, "MASTER_PORT", b"1")
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert memory.state() == fresh_state(8)
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state == b"\x80\x04garbage"


def test_clear_with_no_state_but_old_keys_creates_a_fresh_state(memory, cli_env) -> None:
    """The state of an earlier `clear` (or an expired one) is gone, the keys are not."""
    memory.backend().put_store_key(0, "MASTER_ADDR", b"old")
    result = invoke(["reset", *memory.flags(), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "is created as a fresh, empty state at round 1" in result.stderr
    assert memory.state() == fresh_state(1)
    (path,) = cli_env.glob("*.json")
    assert read_backup(path).state is None  # restore removes it again


def test_clear_with_neither_state_nor_keys_exits_5(memory) -> None:
    result = invoke(["reset", *memory.flags(run_id="absent"), "--mode", "clear", "--yes"])
    assert result.exit_code == 5


def test_clear_racing_a_writer_is_fenced(memory) -> None:
    memory.put(make_state(round=2))
    memory.backend().put_store_key(2, "MASTER_ADDR", b"x")
    result = invoke(["reset", *memory.flags(backend="memory-racing"), "--mode", "clear", "--yes"])
    assert result.exit_code == 3, result.stderr
    assert memory.state().round == 3  # the intruder's state, not ours


def test_reopen_names_the_round_new_agents_use(memory, cli_env) -> None:
    memory.put(make_state(round=4, closed=True))
    memory.backend().put_store_key(4, "MASTER_ADDR", b"x")
    result = invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "new agents will rendezvous in round 5, which has none" in result.stderr
    assert memory.state().closed is False


def test_reopen_of_a_rewound_run_refuses_and_writes_nothing(memory, cli_env) -> None:
    """Round 1 already has keys (an earlier clear restarted the run at 0): reopening would read them."""
    token = memory.put(make_state(round=0, closed=True))
    for round_ in (0, 1, 2):
        memory.backend().put_store_key(round_, "MASTER_ADDR", b"x")
    result = invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "round 1" in line and "reset --mode clear" in line and "nothing was written" in line
    assert memory.token() == token and not list(cli_env.glob("*.json"))


def test_clear_on_a_backend_that_cannot_list_keys_goes_past_the_old_round(memory, cli_env) -> None:
    memory.put(make_state(round=2))
    result = invoke(["reset", *memory.flags(backend="memory-unlisted"), "--mode", "clear", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "cannot list the run's store keys" in result.stderr and "past the old round 2" in result.stderr
    assert memory.state() == fresh_state(3)


# -- real backends, keys written as torch's handler writes them ----------------------------------------
Writer = Callable[[RendezvousBackend, int, str, bytes], None]


def _prefixed(store: Any, run_id: str, round_: int) -> Any:
    import torch.distributed as dist

    return dist.PrefixStore(f"torch.rendezvous.{run_id}.{round_}", store)


def _params(backend: str, endpoint: str, run_id: str) -> Any:
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(backend=backend, endpoint=endpoint, run_id=run_id, min_nodes=1, max_nodes=1,
                                read_timeout="10")


def _handler_store(name: str, endpoint: str, run_id: str) -> Any:
    """The store torchrun would build for the handler (rdzvctl's plugins, torch's etcd-v2)."""
    if name == "redis":
        from rdzvctl.torchrun.plugins import create_redis_backend

        return create_redis_backend(_params(name, endpoint, run_id))[1]
    if name == "etcd-v3":
        from rdzvctl.torchrun.plugins import create_etcd_v3_backend

        return create_etcd_v3_backend(_params(name, endpoint, run_id))[1]
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

    return create_backend(_params("etcd", endpoint, run_id))[1]


@pytest.fixture(params=["c10d-tcp", "c10d-file", "redis", "etcd-v2", "etcd-v3"])
def keyed_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Address, Writer]]:
    """(id, an address without run id, a writer of per-round keys through torch's own stores)."""
    pytest.importorskip("torch")
    from tests.support.torch_peer import shared_tcpstore, torch_filestore, torch_set, torch_tcpstore

    kind = request.param
    stores: Dict[str, Any] = {}
    if kind == "c10d-tcp":
        server = shared_tcpstore(use_libuv=True)
        client = torch_tcpstore(server)
        address = Address("c10d", server.endpoint, timeout=10)

        def write(backend: RendezvousBackend, round_: int, name: str, value: bytes) -> None:
            torch_set(_prefixed(client, backend.run_id, round_), name, value)
    elif kind == "c10d-file":
        path = str(tmp_path / "store")
        store = torch_filestore(path)
        address = Address("c10d", path, conf={"store_type": "file"}, timeout=10)

        def write(backend: RendezvousBackend, round_: int, name: str, value: bytes) -> None:
            _prefixed(store, backend.run_id, round_).set(name, value)
    else:
        server = request.getfixturevalue("redis_server" if kind == "redis" else "etcd_server")
        address = Address(kind, server.endpoint, timeout=10)

        def write(backend: RendezvousBackend, round_: int, name: str, value: bytes) -> None:
            if backend.run_id not in stores:
                stores[backend.run_id] = _handler_store(kind, server.endpoint, backend.run_id)
            _prefixed(stores[backend.run_id], backend.run_id, round_).set(name, value)
    yield kind, address, write


def _run_id() -> str:
    return f"keys-{uuid.uuid4().hex[:10]}"


def test_conformance_store_rounds_on_real_backends(keyed_backend) -> None:
    _, address, write = keyed_backend
    (result,) = run_conformance(lambda run_id: open_backend(address.with_run_id(run_id)), only=["store_rounds"],
                                store_writer=write)
    assert result.outcome == "pass", result.detail


def _flags(address: Address, run_id: str) -> list:
    flags = ["--rdzv-backend", address.backend, "--rdzv-endpoint", address.endpoint, "--rdzv-id", run_id]
    if address.conf:
        flags += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in address.conf.items())]
    return flags


def test_clear_on_real_backends_starts_past_the_round_keys(keyed_backend, cli_env) -> None:
    kind, address, write = keyed_backend
    run_id = _run_id()
    with open_backend(address.with_run_id(run_id)) as backend:
        old = encode(make_state(round=2, closed=True))
        assert backend.set_state(old)[2]
        for round_ in (0, 1, 2):
            write(backend, round_, "MASTER_ADDR", b"127.0.0.%d" % (round_ + 2))
        write(backend, 2, "torchelastic/agent/terminal_state/num_members", b"2")
        keys_before = backend.store_keys()
        result = invoke(["reset", *_flags(address, run_id), "--mode", "clear", "--yes", "-o", "json"])
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert (doc["action"], doc["next_round"], doc["store_key_rounds"]) == ("fresh-state", 3, [0, 1, 2]), kind
        state = decode(backend.get_state()[0])
        assert state == fresh_state(3)
        assert backend.store_keys() == keys_before  # untouched
        (path,) = cli_env.glob("*.json")
        assert read_backup(path).state == old


def test_clear_of_a_corrupt_state_on_real_backends(keyed_backend, cli_env) -> None:
    kind, address, write = keyed_backend
    run_id = _run_id()
    with open_backend(address.with_run_id(run_id)) as backend:
        assert backend.set_state(b"\x80\x04not a pickle")[2]
        write(backend, 4, "MASTER_PORT", b"29500")
        result = invoke(["reset", *_flags(address, run_id), "--mode", "clear", "--yes"])
        assert result.exit_code == 0, result.stderr
        assert decode(backend.get_state()[0]) == fresh_state(5), kind


def test_reopen_warns_about_participants_torch_never_expires(memory, cli_env) -> None:
    state = make_state(round=1, closed=True, dead=0)
    state.last_heartbeats.pop(sorted(state.participants)[0])
    memory.put(state)
    result = invoke(["reset", *memory.flags(), "--mode", "reopen", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "1 participant(s) have no heartbeat" in result.stderr and "--remove-node" in result.stderr


def test_clear_of_a_removed_state_with_old_keys_on_real_backends(keyed_backend, cli_env) -> None:
    """The state was removed (c10d: torch's sentinel is back) but round 0's keys were not."""
    kind, address, write = keyed_backend
    run_id = _run_id()
    with open_backend(address.with_run_id(run_id)) as backend:
        _, token, _ = backend.set_state(encode(make_state(round=0)))
        assert backend.clear(token) and backend.get_state() is None
        write(backend, 0, "MASTER_ADDR", b"127.0.0.9")
        result = invoke(["reset", *_flags(address, run_id), "--mode", "clear", "--yes"])
        assert result.exit_code == 0, result.stderr
        assert decode(backend.get_state()[0]) == fresh_state(1), kind
        (path,) = cli_env.glob("*.json")
        assert read_backup(path).state is None


def test_round_of_store_key_parses_only_torchs_keys() -> None:
    from rdzvctl.backends.base import round_of_store_key

    prefix = b"torch.rendezvous.job."
    assert round_of_store_key(b"torch.rendezvous.job.3/MASTER_ADDR", prefix) == (3, b"MASTER_ADDR")
    assert round_of_store_key(b"torch.rendezvous.job.12/torchelastic/role_info/0", prefix) == (
        12, b"torchelastic/role_info/0")
    for other in (b"torch.rendezvous.job", b"torch.rendezvous.job.5.0/MASTER_ADDR", b"torch.rendezvous.job1.0/x",
                  b"torch.rendezvous.job.3", b"torch.rendezvous.job.-1/x", b"torch.rendezvous.job. 3/x",
                  b"torch.rendezvous.job.\xd9\xa3/x", b"torch.rendezvous.job." + b"9" * 5000 + b"/x"):
        assert round_of_store_key(other, prefix) is None, other
