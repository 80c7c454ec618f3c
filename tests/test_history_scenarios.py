"""``rdzvctl history`` over runs real torch handlers went through: joins, a node kill, a scale-up, a restart storm.

The nodes are torch ``DynamicRendezvousHandler`` processes (tests/support/torch_handlers.py,
a 1 s keep-alive, 3 attempts, a 1 s last call).  Each target says where its history
comes from: a FileStore's log (``rdzvctl history`` on the backend) or, on a TCPStore,
which keeps none, a ``rdzvctl watch --record FILE`` subprocess started before the run
(``rdzvctl history --from FILE``); on Redis and etcd v3, rdzvctl's torchrun handlers
(the Redis write script's semantic versions, etcd's revisions).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Set

import pytest

from tests.e2e_cli.cli import Rdzvctl, Result
from tests.support.torch_handlers import NodeFactory, RendezvousNode, Target

pytestmark = pytest.mark.torch  # real torch rendezvous handlers and stores

TIMEOUT = "5"
#: (target id, how the history is read): "backend" (the backend's history) or "record" (watch --record).
HISTORY_TARGETS = [("c10d-file", "backend"), ("c10d-tcp", "record"), ("redis", "backend"), ("etcd-v3", "backend")]


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Target:
    kind = request.param
    if kind == "c10d-tcp":
        return Target(kind, "c10d", request.getfixturevalue("tcpstore_libuv").endpoint)
    if kind == "c10d-file":
        path = tmp_path_factory.mktemp("filestore") / "rendezvous.store"
        path.touch()  # an empty FileStore; torch's nodes open the same file
        return Target(kind, "c10d", str(path), {"store_type": "file"})
    if kind == "redis":  # rdzvctl's torchrun handler: its write script keeps the semantic versions
        return Target(kind, "redis", request.getfixturevalue("redis_server").endpoint)
    if kind == "etcd-v3":  # rdzvctl's torchrun handler: the key's revisions since the last compaction
        return Target(kind, "etcd-v3", request.getfixturevalue("etcd_server").endpoint)
    raise AssertionError(f"no history target {kind!r}")


def on_history_targets() -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("target", "source"), HISTORY_TARGETS, indirect=["target"],
                                   ids=[t for t, _ in HISTORY_TARGETS])


@pytest.fixture()
def cli(tmp_path: Path) -> Rdzvctl:
    return Rdzvctl(tmp_path / "backups")


@pytest.fixture()
def run_id() -> str:
    return f"hist-{uuid.uuid4().hex[:10]}"


class History:
    """Where a scenario's history is read from, and the ``history`` command over it."""

    def __init__(self, cli: Rdzvctl, target: Target, run_id: str, source: str, record: Path) -> None:
        self.cli, self.target, self.run_id, self.source, self.record = cli, target, run_id, source, record

    @property
    def args(self) -> List[str]:
        if self.source == "record":
            return ["--from", str(self.record)]
        return [*self.target.address(self.run_id), "--timeout", TIMEOUT]

    def run(self, *extra: str) -> Result:
        return self.cli("history", *self.args, *extra)

    def events(self, *extra: str, code: int = 0) -> List[Dict[str, Any]]:
        result = self.run("-o", "json", *extra)
        assert result.code == code, str(result)
        lines = [json.loads(line) for line in result.out.splitlines()]
        return [line for line in lines if line["kind"] != "notice"]  # a backend's notice: how far back it goes

    def wait_for_state(self, check: Callable[[Dict[str, Any]], bool], what: str, timeout: float = 30) -> None:
        """Until a recorded version (or the backend's current state) passes ``check`` (the JSON state)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(check(s) for s in self._states()):
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} was never recorded within {timeout:g}s")

    def versions_since_created(self) -> int:
        """How many versions the source holds from the first one with a state on."""
        if self.source == "record":
            lines = [json.loads(line) for line in self.record.read_text().splitlines()[1:]]
        else:
            from rdzvctl.backends.base import Address
            from rdzvctl.backends.registry import open_backend

            address = Address(self.target.backend, self.target.endpoint, self.run_id, dict(self.target.conf))
            with open_backend(address) as backend:
                lines = [{"state": v.value} if v.value is not None else {} for v in backend.history().versions]
        first = next(i for i, line in enumerate(lines) if "state" in line)
        return len(lines) - first

    def _states(self) -> Iterator[Dict[str, Any]]:
        if self.source == "record":
            if self.record.exists():
                for line in self.record.read_text().splitlines()[1:]:
                    doc = json.loads(line)
                    if "state" in doc:
                        yield doc["state"]
            return
        result = self.cli("get", *self.target.address(self.run_id), "--timeout", TIMEOUT, "-o", "json")
        if result.code == 0:
            yield result.json()["state"]


@pytest.fixture()
def history(request: pytest.FixtureRequest, cli: Rdzvctl, target: Target, run_id: str, source: str,
            tmp_path: Path) -> Iterator[History]:
    record = tmp_path / f"{run_id}.history"
    if source != "record":
        yield History(cli, target, run_id, source, record)
        return
    with cli.watch(*target.address(run_id), "--interval", "0.05", "--record", str(record)) as watch:
        watch.wait_for("snapshot")
        keeper = History(cli, target, run_id, source, record)
        keeper.watch = watch  # type: ignore[attr-defined]
        yield keeper


def membership(events: List[Dict[str, Any]]) -> List[tuple]:
    """(round, participants) at every "completed" event, replaying joined/left-participants events."""
    members: Set[str] = set()
    out = []
    for event in events:
        nodes = [event["node"]] if event.get("node") else list(event.get("nodes") or [])
        if event["kind"] == "joined-participants":
            members.update(nodes)
        elif event["kind"] == "left-participants":
            members.difference_update(nodes)
        elif event["kind"] == "completed":
            out.append((event["round"], frozenset(members)))
    return out


def complete_round(nodes: List[RendezvousNode], timeout: float = 45) -> List[Dict[str, Any]]:
    for node in nodes:
        node.send("next")
    return [node.expect("round", timeout) for node in nodes]


@on_history_targets()
def test_history_shows_joins_a_killed_node_and_a_scale_up_in_order(
        target: Target, source: str, node_factory: NodeFactory, history: History, run_id: str) -> None:
    options = {"min_nodes": 2, "max_nodes": 3}
    a, b = (node_factory.spawn(target, run_id, **options) for _ in range(2))
    nodes = [a, b]
    try:
        first = complete_round([a, b])  # two join; the last call completes round 0
        assert {r["round"] for r in first} == {0} and {r["world_size"] for r in first} == {2}
        b.kill()  # SIGKILL: its heartbeat goes stale, a's keep-alive sync drops it
        history.wait_for_state(lambda s: s["round"] == 0 and s["complete"] and b.node_id not in s["participants"],
                               f"{b.node_id} dropped")
        c = node_factory.spawn(target, run_id, **options)
        nodes.append(c)
        second = complete_round([a, c])  # a leaves round 0 (the round advances), c joins round 1
        assert {r["round"] for r in second} == {1}
        history.wait_for_state(lambda s: s["round"] == 1 and s["complete"], "round 1 complete")
        d = node_factory.spawn(target, run_id, **options)  # scale-up: d waits, the others restart
        nodes.append(d)
        d.send("next")
        history.wait_for_state(lambda s: d.node_id in s["wait_list"], f"{d.node_id} waiting")
        third = complete_round([a, c])
        third.append(d.expect("round", 45))
        assert {r["round"] for r in third} == {2} and {r["world_size"] for r in third} == {3}
        history.wait_for_state(lambda s: s["round"] == 2 and s["complete"], "round 2 complete")
    finally:
        for node in nodes:
            node.signal(signal.SIGKILL)
            node.close()

    events = history.events()
    assert events and all(e["run_id"] == run_id for e in events)
    advances = [(e["from"], e["to"]) for e in events if e["kind"] == "round-advanced"]
    assert advances == [(0, 1), (1, 2)]
    assert membership(events) == [(0, {a.node_id, b.node_id}), (1, {a.node_id, c.node_id}),
                                  (2, {a.node_id, c.node_id, d.node_id})]
    left_b = next(e for e in events if e["kind"] == "left-participants" and e.get("node") == b.node_id)
    assert left_b["round"] == 0  # dropped from round 0, before the round advanced
    assert [e["round"] for e in events if e["round"] is not None] == \
        sorted(e["round"] for e in events if e["round"] is not None)  # oldest first
    times = [e["time"] for e in events]
    assert times == sorted(times)
    # Redis records the write time; a FileStore log, etcd's revisions and a record file do not
    expected = "recorded" if source == "record" else "backend" if target.backend == "redis" else "heartbeat"
    assert {e["time_source"] for e in events} == {expected}
    # every keep-alive rewrote the state: those versions are folded into the entry before them
    # (Redis's write script keeps no heartbeat-only version in the first place)
    entries = {e["revision"] if source == "backend" else e["time"]: e.get("collapsed", 0) for e in events}
    folded = sum(entries.values())
    assert len(entries) + folded == history.versions_since_created()
    assert folded > 0 or target.backend == "redis"
    assert not any(e["kind"].startswith("heartbeat") for e in events)
    text = history.run()
    assert text.code == 0 and "round 0 -> 1" in text.out and b.node_id in text.out, str(text)
    newest = history.events("--limit", "2")
    assert newest == events[-2:]


@on_history_targets()
def test_a_restart_storm_of_real_handlers_is_reported(
        target: Target, source: str, node_factory: NodeFactory, history: History, run_id: str) -> None:
    """A lone node (min = max = 1) restarting again and again: each restart leaves the complete round
    (torch advances it, ``_remove_participant_epilogue``) and forms the next at once."""
    node = node_factory.spawn(target, run_id, min_nodes=1, max_nodes=1)
    try:
        for expected in range(4):
            assert node.call("next", "round", 45)["round"] == expected
            # each complete round is seen before the next restart (a polled record could skip one)
            history.wait_for_state(lambda s, r=expected: s["round"] == r and s["complete"], f"round {expected} complete")
    finally:
        node.kill()
        node.close()
    events = history.events(code=1)
    storms = [e for e in events if e["kind"] == "restart-storm"]
    assert len(storms) == 1 and storms[0]["round"] == 3 and storms[0]["severity"] == "error"
    assert "advanced 3 times" in storms[0]["message"]
    calm = history.events("--storm-rounds", "4")
    assert not [e for e in calm if e["kind"] == "restart-storm"]
    if source == "record":  # watch saw it live too
        live = history.watch.wait_for("restart-storm", timeout=10)  # type: ignore[attr-defined]
        assert live["round"] == 3 and live["run_id"] == run_id


@pytest.mark.parametrize("target", ["c10d-tcp"], indirect=True)
def test_history_on_a_tcpstore_points_at_watch_record(target: Target, cli: Rdzvctl, run_id: str) -> None:
    result = cli("history", *target.address(run_id), "--timeout", TIMEOUT)
    assert result.code == 2 and result.stderr.count("\n") == 1, str(result)
    assert "watch --record" in result.stderr and "history --from" in result.stderr
