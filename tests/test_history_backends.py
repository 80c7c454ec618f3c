"""The backends' history sources (``history()``) against real servers and real torch handlers.

Redis keeps the last N semantic versions in its write script; etcd v3 replays
the key's MVCC revisions since the last compaction; etcd v2 its server's
1000-event window.  Each window is read back and decoded with the safe codec.
"""

from __future__ import annotations

import datetime as dt
import uuid
from importlib.metadata import entry_points
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from rdzvctl.backends.base import Address, HistoryVersion
from rdzvctl.backends.etcd_v2 import EtcdV2Backend
from rdzvctl.backends.etcd_v3 import EtcdV3Backend
from rdzvctl.backends.redis import RedisBackend
from rdzvctl.backends.redis.history import MAX_HISTORY, parse_entry, semantic_digest
from rdzvctl.errors import BackendConfigError
from rdzvctl.state.codec import decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.support.etcd_server import EtcdCluster, _started
from tests.support.torch_handlers import NodeFactory, Target

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
A, B, C = NodeDesc("10.0.0.1", 11, 0), NodeDesc("10.0.0.2", 12, 0), NodeDesc("10.0.0.3", 13, 0)


def _run_id() -> str:
    return f"hist-{uuid.uuid4().hex[:10]}"


def _state(round_: int, *nodes: NodeDesc, beat: int = 0) -> bytes:
    state = RendezvousState(round=round_, complete=True, participants={n: i for i, n in enumerate(nodes)},
                            last_heartbeats={n: NOW + dt.timedelta(seconds=beat) for n in nodes})
    return encode(state)


def _write(backend: Any, values: List[bytes]) -> Any:
    current = backend.get_state()
    token = None if current is None else current[1]
    for value in values:
        result = backend.set_state(value, token)
        assert result is not None and result[2]
        token = result[1]
    return token


def _rounds(versions: Iterator[HistoryVersion]) -> List[Optional[Tuple[int, Tuple[str, ...]]]]:
    out: List[Optional[Tuple[int, Tuple[str, ...]]]] = []
    for version in versions:
        if version.value is None:
            out.append(None)
            continue
        state = decode(version.value)
        out.append((state.round, tuple(sorted(n.id for n in state.participants))))
    return out


@pytest.fixture(scope="module")
def own_etcd() -> Iterator[EtcdCluster]:
    """An etcd of this module's own (v2 on): compaction and a full v2 window would disturb other tests."""
    yield from _started(enable_v2=True)


def _redis(endpoint: str, run_id: str, **conf: str) -> RedisBackend:
    return RedisBackend.from_address(Address("redis", endpoint, run_id, conf, 5.0))


# -- Redis ---------------------------------------------------------------------------------------
def test_redis_keeps_semantic_versions_only_and_trims_to_n(redis_server) -> None:
    b = _redis(redis_server.endpoint, _run_id(), history="3", ttl="600")
    assert "history" in b.capabilities
    # round 1 with heartbeats rewritten 5 times, then rounds 2..5: 5 semantic versions, 3 kept
    _write(b, [_state(1, A, B, beat=i) for i in range(6)] + [_state(r, A, B) for r in range(2, 6)])
    window = b.history()
    assert "last N semantic versions" in window.notice and "2 older ones were trimmed" in window.notice
    versions = list(window.versions)
    assert [v.revision for v in versions] == [3, 4, 5]
    assert _rounds(iter(versions)) == [(r, (A.id, B.id)) for r in (3, 4, 5)]
    assert all(v.written_at is not None and v.written_at.tzinfo is not None for v in versions)
    assert abs(versions[-1].written_at - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    # the list lives as long as the run: the same TTL, renewed by a heartbeat-only write
    assert 0 < int(redis_server.cli("ttl", b.history_key)) <= 600
    assert redis_server.cli("type", b.history_key).strip() == "list"


def test_redis_heartbeat_only_writes_are_not_appended(redis_server) -> None:
    b = _redis(redis_server.endpoint, _run_id())
    token = _write(b, [_state(1, A, beat=i) for i in range(20)])
    assert [v.revision for v in b.history().versions] == [1]
    assert b.history().notice is not None and "trimmed" not in b.history().notice
    # a membership change is a new version; the same membership with new heartbeats is not
    _write(b, [_state(1, A, B), _state(1, A, B, beat=9), _state(1, B, A)])
    assert _rounds(b.history().versions) == [(1, (A.id,)), (1, (A.id, B.id)), (1, (A.id, B.id))]
    assert token is not None


def test_redis_clear_records_a_removal_and_a_new_life(redis_server) -> None:
    b = _redis(redis_server.endpoint, _run_id())
    token = _write(b, [_state(1, A), _state(2, A)])
    assert b.clear(token)
    _write(b, [_state(0, B)])
    assert _rounds(b.history().versions) == [(1, (A.id,)), (2, (A.id,)), None, (0, (B.id,))]


def test_redis_history_off_and_bounds(redis_server) -> None:
    off = _redis(redis_server.endpoint, _run_id(), history="0")
    _write(off, [_state(1, A), _state(2, A)])
    assert not redis_server.client().exists(off.history_key)
    assert redis_server.client().hget(off.key, "digest") is None
    window = off.history()
    assert list(window.versions) == [] and "no history kept" in window.notice
    for bad in ("-1", str(MAX_HISTORY + 1), "many"):
        with pytest.raises(BackendConfigError, match="history"):
            _redis(redis_server.endpoint, "x", history=bad)


def test_redis_corrupt_and_foreign_entries(redis_server) -> None:
    b = _redis(redis_server.endpoint, _run_id())
    _write(b, [_state(1, A), b"not a pickle", b"not a pickle", _state(2, A)])
    values = [v.value for v in b.history().versions]
    assert values[1] == b"not a pickle" and len(values) == 3  # recorded once, handed on as stored
    assert semantic_digest(b"not a pickle").startswith("b:") and semantic_digest(_state(1, A)).startswith("s:")
    for junk in (b"", b"1 2 3", b"x 1 2.3 QQ==", b"1 2 99999999999999.1 QQ==", "1 2 3.4 -"):
        assert parse_entry(junk) is None or junk == b"1 2 3.4 -"
    assert parse_entry(b"7 9 1.000002 -") == (7, HistoryVersion(None, NOW.fromtimestamp(1, dt.timezone.utc)
                                                                 + dt.timedelta(microseconds=2), 7))
    # a history key of another type never breaks a write: it is left alone
    other = _redis(redis_server.endpoint, _run_id())
    redis_server.client().set(other.history_key, "someone else's")
    _write(other, [_state(1, A), _state(2, A)])
    assert redis_server.client().get(other.history_key) == b"someone else's"
    # ... and reading it says which key is foreign (it said the state hash was of another type)
    from rdzvctl.errors import StateCorruptError

    with pytest.raises(StateCorruptError, match="history key .* holds a string"):
        other.history()


def test_redis_hostile_history_entries_are_skipped_not_fatal(redis_server) -> None:
    from rdzvctl.state.history import replay

    b = _redis(redis_server.endpoint, _run_id())
    _write(b, [_state(1, A), _state(2, A, B)])
    # Anyone who can write the server: a time past year 9999 was "internal error: ValueError";
    # a newest entry that is no entry hid the whole history ("the state was never written").
    redis_server.client().rpush(b.history_key, b"3 9 253402300800.000000 -", b"garbage")
    assert parse_entry(b"3 9 253402300800.000000 -") is None
    window = b.history()
    assert "did not write" in window.notice
    assert _rounds(window.versions) == [(1, (A.id,)), (2, (A.id, B.id))]
    assert len(list(replay(b.history().versions))) == 2


# -- etcd ----------------------------------------------------------------------------------------
def test_etcd_v3_history_since_compaction(own_etcd: EtcdCluster) -> None:
    b = EtcdV3Backend.from_address(Address("etcd-v3", own_etcd.endpoint, _run_id(), {}, 5.0))
    assert "history" in b.capabilities
    token = _write(b, [_state(r, A) for r in range(1, 4)])
    window = b.history()
    versions = list(window.versions)
    assert [(r, n) for r, n in _rounds(iter(versions))] == [(r, (A.id,)) for r in (1, 2, 3)]
    assert versions[-1].revision == token and all(v.written_at is None for v in versions)
    assert b.clear(token)
    assert _rounds(b.history().versions)[-1] is None  # the removal is the last version
    token = _write(b, [_state(5, B), _state(6, B), _state(7, B)])
    own_etcd.etcdctl("compact", str(token - 1))
    window = b.history()
    assert window.notice == f"etcd compacted revisions before {token - 1}: older versions are gone"
    assert _rounds(window.versions) == [(6, (B.id,)), (7, (B.id,))]
    b.close()


def test_etcd_v2_history_window(own_etcd: EtcdCluster) -> None:
    b = EtcdV2Backend.from_address(Address("etcd-v2", own_etcd.endpoint, _run_id(), {}, 5.0))
    assert "history" in b.capabilities
    token = _write(b, [_state(1, A), _state(2, A, B)])
    assert b.clear(token)
    assert _rounds(b.history().versions) == [(1, (A.id,)), (2, (A.id, B.id)), None]
    noise = EtcdV2Backend.from_address(Address("etcd-v2", own_etcd.endpoint, _run_id(), {}, 5.0))
    _write(noise, [_state(1, C, beat=i) for i in range(1010)])  # pushes the run's events out of the window
    _write(b, [_state(3, A)])
    window = b.history()
    assert window.notice is not None and "last 1000 events of the whole server" in window.notice
    assert "goes back to index" in window.notice
    assert _rounds(window.versions) == [(3, (A.id,))]


# -- real torch handlers -------------------------------------------------------------------------
def _plugins() -> List[str]:
    return [ep.name for ep in entry_points(group="torchrun.handlers")]


@pytest.fixture(params=["redis", "etcd-v3"])
def torch_target(request: pytest.FixtureRequest) -> Target:
    if request.param not in _plugins():
        pytest.skip(f"rdzvctl's torchrun plugin {request.param!r} is not registered (pip install -e .)")
    if request.param == "redis":
        return Target("redis", "redis", request.getfixturevalue("redis_server").endpoint)
    return Target("etcd-v3", "etcd-v3", request.getfixturevalue("etcd_server").endpoint)


def _wait_for(check: Any, timeout: float, what: str) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_history_of_a_torch_run_with_a_kill_and_a_scale_up(torch_target: Target, node_factory: NodeFactory) -> None:
    run_id = _run_id()
    b = (RedisBackend if torch_target.backend == "redis" else EtcdV3Backend).from_address(
        Address(torch_target.backend, torch_target.endpoint, run_id, {}, 5.0))
    with node_factory.group(torch_target, run_id, 3, min_nodes=2) as nodes:
        first = nodes.next_round()
        assert {r["world_size"] for r in first} == {3}
        everyone = sorted(n.node_id for n in nodes)
        victim, survivors = nodes[1], [nodes[0], nodes[2]]
        victim.kill()

        def dropped() -> bool:
            current = b.get_state()
            return current is not None and victim.node_id not in {n.id for n in decode(current[0]).participants}

        _wait_for(dropped, 30, f"the survivors dropping {victim.node_id}")
        for node in survivors:
            node.send("next")
        again = [node.expect("round", timeout=45) for node in survivors]
        assert {r["world_size"] for r in again} == {2}
        late = node_factory.spawn(torch_target, run_id, min_nodes=2, max_nodes=3)  # scale up
        late.send("next")
        _wait_for(lambda: b.get_state() is not None and decode(b.get_state()[0]).wait_list, 30, "the late joiner")
        for node in survivors:
            node.send("next")
        grown = [node.expect("round", timeout=45) for node in [*survivors, late]]
        assert {r["world_size"] for r in grown} == {3}
        final = sorted([*(n.node_id for n in survivors), late.node_id])
        versions = list(b.history().versions)
        late.kill()

    revisions = [v.revision for v in versions]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    states = [decode(v.value) for v in versions if v.value is not None]
    complete: List[Tuple[int, List[str]]] = []
    for state in states:
        entry = (state.round, sorted(n.id for n in state.participants))
        if state.complete and (not complete or complete[-1] != entry):
            complete.append(entry)
    rounds = [r for r, _ in complete]
    assert rounds == sorted(rounds)  # rounds only advance
    assert complete[0][1] == everyone  # the first complete round had all three
    survivor_ids = sorted(n.node_id for n in survivors)
    assert any(r > complete[0][0] and nodes_ == survivor_ids for r, nodes_ in complete)  # re-formed without the victim
    assert complete[-1][1] == final and complete[-1][0] > complete[0][0]  # grown with the late joiner
    if torch_target.backend == "redis":
        # heartbeat-only writes never reached the list: neighbours differ in their semantic part
        digests = [semantic_digest(v.value) for v in versions if v.value is not None]
        assert all(a != b_ for a, b_ in zip(digests, digests[1:]))
    b.close()


def test_redis_side_keys_under_a_tagged_prefix_are_not_runs(redis_server) -> None:
    run_id = _run_id()
    prefix = f"{{t-{run_id}}}.rdzv."
    b = _redis(redis_server.endpoint, run_id, key_prefix=prefix)
    _write(b, [_state(1, A), _state(2, A)])
    assert b.history_key == prefix + run_id + ":history" and redis_server.client().exists(b.history_key)
    assert [(entry.run_id, entry.error) for entry in b.list_runs()] == [(run_id, None)]


def test_torchrun_redis_handler_takes_the_history_option(redis_server) -> None:
    pytest.importorskip("torch")
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from rdzvctl.torchrun.plugins import create_redis_backend

    params = RendezvousParameters(backend="redis", endpoint=redis_server.endpoint, run_id=_run_id(),
                                  min_nodes=1, max_nodes=2, history="2")
    torch_backend, _ = create_redis_backend(params)
    assert torch_backend.backend.settings.history == 2
    for round_ in range(1, 5):
        current = torch_backend.get_state()
        torch_backend.set_state(_state(round_, A), None if current is None else current[1])
    assert _rounds(torch_backend.backend.history().versions) == [(3, (A.id,)), (4, (A.id,))]


@pytest.mark.parametrize("read_bytes", [None, 1], ids=["default-batch", "one-entry-batches"])
def test_redis_read_survives_writers_trimming_the_list_under_it(redis_server, monkeypatch, read_bytes) -> None:
    if read_bytes is not None:  # entries "too large" for more than one per LRANGE
        monkeypatch.setattr("rdzvctl.backends.redis.history.READ_BYTES", read_bytes)
    b = _redis(redis_server.endpoint, _run_id(), history="100")
    token = _write(b, [_state(r, A) for r in range(1, 101)])
    versions = b.history().versions
    seen = [next(versions).revision for _ in range(40)]  # two LRANGE batches read
    for r in range(101, 104):  # three more semantic versions: the head loses seq 1..3
        token = b.set_state(_state(r, A), token)[1]
    seen += [v.revision for v in versions]
    assert seen == list(range(1, 101))  # nothing skipped or repeated; stops at the newest there was
    assert [v.revision for v in b.history().versions] == list(range(4, 104))
