"""doctor's pure checks and the report's escaping and repair commands, on plain data."""

# ruff: noqa: F811  (pytest fixtures imported by name)
from __future__ import annotations

import datetime as _dt
import json
import shlex
import threading

from rdzvctl.backends.base import Address
from rdzvctl.backends.server_info import mount_of
from rdzvctl.doctor import checks as C
from rdzvctl.doctor.probes import Resolution, is_loopback_name, resolve, run_all
from rdzvctl.report import md, repair_commands
from rdzvctl.state.analysis import KeepAlive
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.support.cli import cli_env, frozen_now, invoke, make_state, memory  # noqa: F401

NOW = _dt.datetime(2026, 12, 1, 12, 0, tzinfo=_dt.timezone.utc)


def state_of(*addrs: str) -> RendezvousState:
    nodes = [NodeDesc(a, 10 + i, 0) for i, a in enumerate(addrs)]
    return RendezvousState(round=3, complete=True, participants={n: i for i, n in enumerate(nodes)},
                           last_heartbeats={n: NOW for n in nodes})


def by_name(found, name):
    (check,) = [c for c in found if c.name == name]
    return check


def test_loopback_names_and_literals():
    assert all(map(is_loopback_name, ["localhost", "LOCALHOST.", "a.localhost", "127.0.0.2", "::1", "[::1]",
                                             "::ffff:127.0.0.1", "0.0.0.0"]))
    assert not any(map(is_loopback_name, ["node0", "10.0.0.1", "localhost.example.com"]))
    assert resolve("192.0.2.1") == Resolution("192.0.2.1", ("192.0.2.1",), None, 0.0)  # no DNS for a literal


def test_loopback_is_judged_against_the_other_nodes():
    resolved = {"a": Resolution("a", ("10.0.0.1",)), "b": Resolution("b", ("10.0.0.2",)),
                "localhost": Resolution("localhost", ("127.0.0.1",))}
    mixed = C.node_checks(state_of("a", "b", "localhost"), NOW, KeepAlive(), None, resolved)
    assert by_name(mixed, "nodes.loopback").status == "fail"
    alone = C.node_checks(state_of("localhost"), NOW, KeepAlive(), None, resolved)
    assert by_name(alone, "nodes.loopback").status == "ok"


def test_keep_alive_against_the_node_count():
    many = state_of(*[f"n{i}" for i in range(1000)])
    resolved = {f"n{i}": Resolution(f"n{i}", (f"10.0.{i // 250}.{i % 250}",)) for i in range(1000)}
    check = by_name(C.node_checks(many, NOW, KeepAlive(5.0, 3), None, resolved), "nodes.keep-alive")
    assert check.status == "warn" and "keep_alive_interval to about 10 s" in check.fix
    few = by_name(C.node_checks(state_of("n0"), NOW, KeepAlive(5.0, 2), None, resolved), "nodes.keep-alive")
    assert few.status == "warn" and "keep_alive_max_attempt >= 3" in few.fix


def test_the_same_agent_process_twice_warns():
    state = state_of("a")
    state.participants[NodeDesc("a", 10, 1)] = 1
    state.last_heartbeats[NodeDesc("a", 10, 1)] = NOW
    check = by_name(C.node_checks(state, NOW, KeepAlive(), None, {}), "nodes.duplicates")
    assert check.status == "warn" and "a_10_1" in check.message


def test_bootstrap_target_is_the_latest_round_not_after_the_current():
    keys = {"1/MASTER_ADDR": b"old", "1/MASTER_PORT": b"1", "3/MASTER_ADDR": b"new", "3/MASTER_PORT": b"29500",
            "4/MASTER_ADDR": b"future", "3/other": b"x"}
    assert C.bootstrap_target(keys, 3) == (3, "new", 29500)
    assert C.bootstrap_target({"2/MASTER_ADDR": b"h", "2/MASTER_PORT": b"nope"}, 2) is None
    assert C.bootstrap_target({}, 0) is None


def test_a_stale_rounds_closed_port_only_warns():
    from rdzvctl.doctor.probes import Connection

    keys = {"1/MASTER_ADDR": b"h", "1/MASTER_PORT": b"2"}
    refused = {("h", 2): Connection("h", 2, False, 0.0, "Connection refused")}
    resolved = {"h": Resolution("h", ("10.0.0.9",))}
    assert C.bootstrap_checks(state_of("a"), keys, resolved, refused)[0].status == "warn"  # state at round 3
    keys = {"3/MASTER_ADDR": b"h", "3/MASTER_PORT": b"2"}
    assert C.bootstrap_checks(state_of("a"), keys, resolved, refused)[0].status == "fail"


def test_server_checks_of_redis_and_etcd():
    redis = {"kind": "redis", "version": "7.0", "mode": "single", "role": "master", "notify_keyspace_events": "",
             "maxmemory_policy": "volatile-lru", "maxmemory": "0", "save": "", "aof_enabled": False}
    found = {c.name: c.status for c in C.server_checks(redis, "redis")}
    assert found["redis.keyspace-events"] == "warn" and found["redis.maxmemory-policy"] == "fail"
    replica = {**redis, "role": "slave", "maxmemory_policy": "noeviction"}
    assert {c.name: c.status for c in C.server_checks(replica, "redis")}["redis.role"] == "fail"
    etcd = {"kind": "etcd", "version": "3.4.23", "health": True, "members": [{"id": "1", "name": "m0"}],
            "leader": None, "v2_enabled": False}
    found = {c.name: c.status for c in C.server_checks(etcd, "etcd-v2")}
    assert found["etcd.members"] == "fail" and found["etcd.v2"] == "fail"
    assert C.server_checks({"kind": "etcd", "error": "boom"}, "etcd-v3")[0].status == "fail"


def test_a_filestore_on_nfs_warns(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
    assert mount_of(str(tmp_path / "store"), str(mounts)) == (str(tmp_path), "nfs4")
    info = {"kind": "filestore", "path": "/x", "exists": True, "regular": True, "size": 10, "mode": "0644",
            "readable": True, "writable": True, "fstype": "nfs4", "mount": str(tmp_path)}
    assert {c.name: c.status for c in C.server_checks(info, "c10d")}["filestore.filesystem"] == "warn"


def test_probes_that_never_answer_time_out_without_blocking():
    gate = threading.Event()
    found = run_all(lambda item: gate.wait() or "late", ["a", "b"], 0.05, lambda item: "timed out")
    assert found == {"a": "timed out", "b": "timed out"}
    gate.set()


def test_markdown_escaping_of_untrusted_values():
    text = md("a|b`c`*d*_e_[f](g)<h>&\n# i\x1b")
    assert "|" not in text.replace("\\|", "") and "<" not in text and "\n" not in text and "\x1b" not in text
    assert text.startswith("a\\|b\\`c\\`\\*d\\*\\_e\\_\\[f\\](g)&lt;h>&amp;")


def test_repair_commands_are_quoted_and_carry_the_address():
    address = Address("redis", "redis://:hunter22@h:6379/0", "job 42; rm -rf /", {"ttl": "60", "password": "hunter22"})
    problems = [{"code": "participant-and-waiting", "message": "m", "repair": "rdzvctl set --remove-node NODE, then x",
                 "nodes": ["evil;$(id)_1_0"]},
                {"code": "heartbeat-in-future", "message": "m", "repair": "fix the clocks (NTP)"}]
    checks = [{"name": "run.findings", "status": "fail", "message": "m", "fix": "rdzvctl reset --mode prune (dead)"}]
    found = repair_commands(problems, checks, address)
    assert [r["source"] for r in found] == ["finding participant-and-waiting", "check run.findings"]
    words = shlex.split(found[0]["command"])
    assert words[:4] == ["rdzvctl", "set", "--remove-node", "evil;$(id)_1_0"]
    assert words[words.index("--rdzv-id") + 1] == "job 42; rm -rf /"
    assert words[words.index("--rdzv-conf") + 1] == "ttl=60"
    assert "hunter22" not in found[0]["command"]
    assert shlex.split(found[1]["command"])[:4] == ["rdzvctl", "reset", "--mode", "prune"]


def test_a_resolver_timeout_warns_but_a_missing_name_fails():
    state = state_of("slow", "gone")
    slow_only = {"slow": Resolution("slow", (), "no answer", 2.0, True), "gone": Resolution("gone", ("10.0.0.3",))}
    found = [c for c in C.node_checks(state, NOW, KeepAlive(), None, slow_only) if c.name == "nodes.resolve"]
    assert [c.status for c in found] == ["warn"] and "--dns-timeout" in found[0].fix
    both = {**slow_only, "gone": Resolution("gone", (), "Name or service not known")}
    found = [c for c in C.node_checks(state, NOW, KeepAlive(), None, both) if c.name == "nodes.resolve"]
    assert [c.status for c in found] == ["fail", "warn"]


def test_a_backend_without_server_info_still_gets_the_run_checked(memory):
    memory.put(make_state())
    result = invoke(["doctor", *memory.flags(), "-o", "json"])
    doc = json.loads(result.stdout)
    assert {c["name"]: c["status"] for c in doc["checks"]}["endpoint.server"] == "ok"
    assert doc["server"] is None and any(c["name"] == "run.state" for c in doc["checks"])
    assert result.exit_code == (1 if doc["status"] == "fail" else 0)
