"""corrupt-detect --for-launch (the launch gate), --settle, and the published MASTER_ADDR probe.

The in-memory backend holds per-round store keys (what the c10d, redis and
etcd-v3 backends return from ``store_keys()``); the probe connects to real
loopback ports.
"""

from __future__ import annotations

import datetime as _dt
import socket
import threading
from typing import Dict

import pytest

import rdzvctl.clock
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.support.cli import (
    NOW,
    closed_port,
    invoke,
    json_out,
    make_state,
)

SECOND = _dt.timedelta(seconds=1)


def set_keys(memory, keys: Dict[str, bytes]) -> None:
    """Per-round store keys as torch's handler writes them (``"<round>/<name>"``)."""
    backend = memory.backend()
    for key, value in keys.items():
        round_, _, name = key.partition("/")
        backend.put_store_key(int(round_), name, value)


@pytest.fixture
def keyed(memory):
    return memory


def gate(memory, *extra):
    return invoke(["corrupt-detect", *memory.flags(), "--for-launch", "-o", "json", *extra])


# -- the launch gate -------------------------------------------------------------------------
def test_no_state_and_no_keys_is_a_yes(keyed):
    result = gate(keyed)
    assert result.exit_code == 0, result.stdout
    assert json_out(result)["launch"] == {"ok": True, "reason": "a new job forms round 0", "round": 0}


def test_no_state_but_stale_round_keys_is_a_no(keyed):
    set_keys(keyed, {"0/MASTER_ADDR": b"10.1.2.3", "0/MASTER_PORT": b"29500"})
    result = gate(keyed)
    assert result.exit_code == 1
    assert "stale MASTER_ADDR" in json_out(result)["launch"]["reason"]


def test_a_finished_run_is_a_no_even_with_fail_on_error(keyed):
    keyed.put(make_state(alive=0, dead=2, waiting=0, closed=True))
    result = gate(keyed, "--fail-on", "error")
    assert result.exit_code == 1
    doc = json_out(result)
    assert doc["launch"]["ok"] is False and "RendezvousClosedError" in doc["launch"]["reason"]
    (run,) = doc["runs"]
    assert run["phase"] == "finished" and run["problems"][0]["code"] == "closed"
    text = invoke(["corrupt-detect", *keyed.flags(), "--for-launch"])
    assert text.exit_code == 1 and "launch  no: the run is closed" in text.stdout


def test_a_run_whose_agents_all_died_is_a_yes(keyed):
    set_keys(keyed, {"2/MASTER_ADDR": b"10.1.2.3", "2/MASTER_PORT": b"29500"})  # round 2's own keys
    keyed.put(make_state(alive=0, dead=2, waiting=0))
    result = gate(keyed)
    assert result.exit_code == 0, result.stdout
    assert json_out(result)["launch"]["round"] == 3


def test_a_running_job_is_a_no(keyed):
    keyed.put(make_state(dead=0, waiting=0))
    assert gate(keyed).exit_code == 1


def test_without_store_keys_the_gate_says_what_it_did_not_check(memory):
    result = invoke(["corrupt-detect", *memory.flags(backend="memory-unlisted"), "--for-launch", "-o", "json"])
    assert result.exit_code == 0 and "not checked" in json_out(result)["launch"]["reason"]


def test_a_corrupt_state_exits_6_as_usual(keyed):
    keyed.put(b"\x80\x04garbage")
    assert gate(keyed).exit_code == 6


def test_for_launch_with_all_is_a_usage_error(keyed):
    result = invoke(["corrupt-detect", *keyed.flags(run_id=None), "--all", "--for-launch"])
    assert result.exit_code == 2


# -- the published rank-0 address -------------------------------------------------------------
def test_a_dead_rank0_address_where_nothing_listens_is_a_finding(keyed):
    """The survivors' next round would connect there (torch keeps the first round's address)."""
    port = closed_port()
    dead = NodeDesc("127.0.0.1", 4242, 0)
    alive = NodeDesc("10.9.9.9", 1, 0)
    keyed.put(RendezvousState(round=1, complete=True, participants={dead: 0, alive: 1},
                              last_heartbeats={dead: NOW - 60 * SECOND, alive: NOW - SECOND}))
    set_keys(keyed, {"0/MASTER_ADDR": b"127.0.0.1", "0/MASTER_PORT": str(port).encode()})
    result = invoke(["corrupt-detect", *keyed.flags(), "-o", "json"])
    assert result.exit_code == 1
    found = {p["code"]: p for p in json_out(result)["runs"][0]["problems"]}
    finding = found["master-addr-dead"]
    assert finding["nodes"] == [str(dead)] and "refused" in finding["message"]
    assert finding["torch_next"] == "agents-fail" and f"127.0.0.1:{port}" in finding["message"]
    shown = invoke(["get", *keyed.flags(), "--keys", "-o", "json"])
    assert "master-addr-dead" in {p["code"] for p in json_out(shown)["problems"]}


def test_a_listening_rank0_address_is_not_a_finding(keyed):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        node = NodeDesc("127.0.0.1", 4242, 0)
        keyed.put(RendezvousState(round=1, complete=True, participants={node: 0},
                                  last_heartbeats={node: NOW - SECOND}))
        set_keys(keyed, {"1/MASTER_ADDR": b"127.0.0.1", "1/MASTER_PORT": str(port).encode()})
        result = invoke(["corrupt-detect", *keyed.flags(), "-o", "json"])
    assert result.exit_code == 0, result.stdout
    assert json_out(result)["runs"][0]["problems"] == []


# -- a stuck verdict is confirmed ---------------------------------------------------------------
def test_a_restarting_agent_between_leaving_and_waiting_is_not_reported_stuck(real_clock):
    """torch's restarting agent writes twice: ``_RendezvousExitOp`` removes it from the complete round (a free
    rank, nobody waiting: looks stuck), then ``_RendezvousJoinOp`` puts it on the wait list (recovering)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    a, b, c = (NodeDesc(f"node_{x}", i, 0) for i, x in enumerate("abc"))
    left = RendezvousState(round=1, complete=True, participants={b: 1, c: 2}, last_heartbeats={b: now, c: now})
    real_clock.put(left)
    waiting = left.copy()
    waiting.wait_list, waiting.last_heartbeats[a] = {a}, now
    timer = threading.Timer(0.4, real_clock.put, args=(waiting,))
    timer.start()
    try:
        result = invoke(["corrupt-detect", *real_clock.flags(), "-o", "json"])
    finally:
        timer.cancel()
    run = json_out(result)["runs"][0]
    assert run["phase"] == "recovering" and result.exit_code == 0, result.stdout
    assert not [p for p in run["problems"] if p["repair"]]


# -- --settle ---------------------------------------------------------------------------------
@pytest.fixture
def real_clock(memory, monkeypatch):
    monkeypatch.setattr(rdzvctl.clock, "now_utc", lambda: _dt.datetime.now(_dt.timezone.utc))
    return memory


FAST = "keep_alive_interval=0.2,keep_alive_max_attempt=2"


def _closed_now(memory) -> None:
    """A run closed just now whose two agents heartbeat this instant."""
    now = _dt.datetime.now(_dt.timezone.utc)
    a, b = NodeDesc("node_a", 1, 0), NodeDesc("node_b", 2, 0)
    memory.put(RendezvousState(round=1, complete=True, closed=True, participants={a: 0, b: 1},
                               last_heartbeats={a: now, b: now}))


def test_settle_tells_a_normal_end(real_clock):
    """Nobody heartbeats after the close: finished within one keep-alive window."""
    _closed_now(real_clock)
    once = invoke(["corrupt-detect", *real_clock.flags(conf=FAST), "-o", "json"])
    settled = invoke(["corrupt-detect", *real_clock.flags(conf=FAST), "--settle", "-o", "json"])
    assert json_out(settled)["runs"][0]["phase"] == "finished", settled.stdout
    assert json_out(once)["runs"][0]["phase"] in ("closing", "finished")


def test_settle_tells_a_close_under_live_agents(real_clock):
    """Agents heartbeat into the closed run (torch's ``_RendezvousKeepAliveOp`` does): closed-under-live-agents."""
    _closed_now(real_clock)
    stop = threading.Event()
    backend = real_clock.backend("job42")

    def heartbeat() -> None:
        from rdzvctl.state.codec import decode, encode

        while not stop.wait(0.05):
            raw, token = backend.get_state()
            state = decode(raw)
            now = _dt.datetime.now(_dt.timezone.utc)
            for node in state.participants:
                state.last_heartbeats[node] = now
            backend.set_state(encode(state), token)

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        settled = invoke(["corrupt-detect", *real_clock.flags(conf=FAST), "--settle", "-o", "json"])
    finally:
        stop.set()
        thread.join()
    run = json_out(settled)["runs"][0]
    assert run["phase"] == "closed-under-live-agents", settled.stdout
    (finding,) = [p for p in run["problems"] if p["code"] == "closed-while-alive"]
    assert finding["repair"] == "rdzvctl reset --mode reopen" and settled.exit_code == 1
