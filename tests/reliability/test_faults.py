"""Faults: servers killed and restarted mid-command, paused servers, a lost etcd leader.

Each command runs as a real ``python -m rdzvctl`` process with ``--timeout``.
"Mid-command" is made exact: the server is paused (SIGSTOP), the command is
started and the test waits until it holds an established connection to the
server, then the server is SIGKILLed (never resumed) and restarted on the
same port.  Checks: the command ends within its timeout (plus interpreter
start-up), exits 4 with one clear ``rdzvctl:`` line on stderr (or, if it got
through, exits 0 with the right answer), a fenced write is fully applied or
not at all, and the server serves again afterwards.  A TCPStore keeps its data
in memory, so after its restart the state is gone (as for torch).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import threading
import time
import uuid
from typing import Any, Iterator, List, Optional, Tuple, Union

import pytest

from rdzvctl.backup import read_backup
from rdzvctl.state.codec import decode, encode
from tests.reliability.common import (
    CliRun,
    assert_error_line,
    put_state,
    rdzvctl,
    sample_state,
    spawn_rdzvctl,
    wait_connected,
)
from tests.reliability.recorder import Recorder
from tests.reliability.servers import FileLockHolder, Target
from tests.support.etcd_server import EtcdCluster

pytestmark = pytest.mark.slow

#: --timeout of every command here.
TIMEOUT = 2.0
#: Interpreter start-up and teardown on a loaded 2-core machine, on top of the timeout.
SLACK = 6.0


@pytest.fixture
def server_target(fault_target: Target) -> Iterator[Target]:
    """A fault target (a server process), running again after the test whatever it did."""
    assert fault_target.server is not None
    try:
        yield fault_target
    finally:
        fault_target.server.ensure_running()


def _run_id(kind: str) -> str:
    return f"fault-{kind}-{uuid.uuid4().hex[:6]}"


def _raw(target: Target, run_id: str) -> Optional[bytes]:
    backend = target.open(run_id, timeout=10)
    try:
        current = backend.get_state()
        return None if current is None else current[0]
    finally:
        backend.close()


def _finish(proc: Any, started: float, limit: float) -> CliRun:
    try:
        out, err = proc.communicate(timeout=limit + 30)
    except Exception:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the command hung past {limit + 30:g} s: {err}") from None
    return CliRun(list(proc.args), proc.returncode, out, err, time.monotonic() - started)


def _kill_mid_command(target: Target, args: List[str], restart: bool = True) -> CliRun:
    """Start ``rdzvctl ARGS`` against a paused server, SIGKILL the server once the command is
    connected, restart it on the same port, and return the finished command."""
    server = target.server
    assert server is not None
    with server.paused():
        started = time.monotonic()
        proc = spawn_rdzvctl([*args, "--timeout", str(TIMEOUT)])
        connected = wait_connected(proc.pid, server.port, timeout=30)
        time.sleep(0.2)  # the request is in the server's socket buffer
        server.kill()
    if restart:
        server.start()
    run = _finish(proc, started, TIMEOUT + SLACK)
    assert connected, f"the command never connected: {run.stderr}"
    return run


def _check_failed_or_answered(run: CliRun, recorder: Recorder, target: Target, kind: str,
                              ok_codes: tuple = (0,), detail: str = "") -> bool:
    """Exit 4 with one clear line within the timeout, or a normal answer."""
    in_time = run.elapsed <= TIMEOUT + SLACK
    if run.returncode == 4:
        line = assert_error_line(run.stderr)
        clear = "Unavailable" in line or "Timeout" in line
    else:
        clear = run.returncode in ok_codes
    survived = in_time and clear
    recorder.record_fault(target.id, kind, survived, f"exit {run.returncode} in {run.elapsed:.1f} s {detail}".strip())
    assert in_time, f"{kind}: took {run.elapsed:.1f} s (timeout {TIMEOUT:g} s)"
    assert clear, f"{kind}: exit {run.returncode}: {run.stderr}"
    return run.returncode == 4


# -- SIGKILL + restart mid-command -------------------------------------------------------------
def test_kill_mid_get(server_target: Target, recorder: Recorder) -> None:
    run_id = _run_id("get")
    put_state(server_target.open(run_id), sample_state(round=3))
    run = _kill_mid_command(server_target, ["get", *server_target.flags(run_id), "-o", "json"])
    _check_failed_or_answered(run, recorder, server_target, "SIGKILL mid-get")
    after = rdzvctl(["get", *server_target.flags(run_id), "-o", "json", "--timeout", "10"])
    if server_target.server.persistent:
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["state"]["round"] == 3
    else:
        assert after.returncode == 5, after.stderr  # the TCPStore lost its memory, as for torch


@pytest.mark.parametrize("command", ["set", "reset"])
def test_kill_mid_write_applies_nothing(server_target: Target, recorder: Recorder, tmp_path: Any,
                                        command: str) -> None:
    run_id = _run_id(command)
    before = encode(sample_state(round=3, dead=1))
    put_state(server_target.open(run_id), before)
    args = ["set", "--round", "4"] if command == "set" else ["reset", "--mode", "clear"]
    run = _kill_mid_command(server_target, [args[0], *server_target.flags(run_id), *args[1:], "--yes",
                                            "--backup-dir", str(tmp_path)])
    failed = _check_failed_or_answered(run, recorder, server_target, f"SIGKILL mid-{command}")
    after = _raw(server_target, run_id)
    if not server_target.server.persistent:
        assert after is None  # the restarted TCPStore is empty
    elif failed:
        # The request died in the killed server's socket buffer: nothing was applied.
        assert after == before
    else:
        assert after is None if command == "reset" else decode(after).round == 4
    # Whatever happened, a complete backup of the old bytes was written first (the read came before).
    backups = list(tmp_path.iterdir())
    if backups:
        assert [read_backup(p).state for p in backups] == [before]


@pytest.mark.parametrize("command", ["set", "reset"])
def test_paused_server_write_is_applied_whole_or_not_at_all(server_target: Target, recorder: Recorder,
                                                            tmp_path: Any, command: str) -> None:
    """SIGSTOP mid-write: the command times out (exit 4); after SIGCONT the server may still apply
    the queued request, but only whole: the state is exactly the old or the new bytes."""
    run_id = _run_id(f"pause-{command}")
    before_state = sample_state(round=3, dead=1)
    before = encode(before_state)
    put_state(server_target.open(run_id), before)
    args = ["set", "--round", "4"] if command == "set" else ["reset", "--mode", "clear"]
    server = server_target.server
    started = time.monotonic()
    with server.paused():
        proc = spawn_rdzvctl([args[0], *server_target.flags(run_id), *args[1:], "--yes", "--backup-dir",
                              str(tmp_path), "--timeout", str(TIMEOUT)])
        run = _finish(proc, started, TIMEOUT + SLACK)
    time.sleep(0.5)  # let the resumed server drain what was queued
    after = _raw(server_target, run_id)
    new = None if command == "reset" else encode(_with_round(before_state, 4))
    whole = after == before or (after is None if command == "reset" else decode(after) == decode(new))
    outcome = "old state kept" if after == before else "new state applied after SIGCONT"
    _check_failed_or_answered(run, recorder, server_target, f"SIGSTOP mid-{command}", detail=outcome)
    assert run.returncode == 4, run.stderr  # a paused server never answers in time
    assert "nothing was written" not in run.stderr  # the outcome is unknown: never claim it
    assert whole, f"after SIGCONT the state is neither the old nor the new one: {after!r}"


def _with_round(state: Any, round: int) -> Any:
    copy = state.copy()
    copy.round = round
    return copy


def test_paused_server_timeout_is_honoured(server_target: Target, recorder: Recorder) -> None:
    run_id = _run_id("paused")
    with server_target.server.paused():
        run = rdzvctl(["get", *server_target.flags(run_id), "--timeout", str(TIMEOUT)], timeout=TIMEOUT + 60)
    _check_failed_or_answered(run, recorder, server_target, "SIGSTOP during get", ok_codes=())
    assert "Timeout" in assert_error_line(run.stderr)


def _watch_events(proc: Any) -> "queue.Queue[Optional[dict]]":
    events: "queue.Queue[Optional[dict]]" = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            if line.strip():
                events.put(json.loads(line))
        events.put(None)

    threading.Thread(target=read, daemon=True).start()
    return events


def _next_event(events: "queue.Queue[Optional[dict]]", kind: Union[str, Tuple[str, ...]], timeout: float = 15
                ) -> Optional[dict]:
    """The next event of ``kind`` (one kind or several); events of other kinds are skipped."""
    kinds = (kind,) if isinstance(kind, str) else kind
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if event is None:
            events.put(None)
            return None
        if event["kind"] in kinds:
            return event
    return None


def test_kill_mid_watch(server_target: Target, recorder: Recorder) -> None:
    """etcd keeps history: the watch rides out the restart and reports every round exactly once,
    also those written while it was disconnected (it is paused meanwhile, so it must replay them).
    Other backends keep none: the watch ends with exit 4 and one line, or goes on without repeats."""
    run_id = _run_id("watch")
    state = sample_state(round=1)
    put_state(server_target.open(run_id), state)
    history = server_target.backend.startswith("etcd")
    timeout = 8.0
    proc = spawn_rdzvctl(["watch", *server_target.flags(run_id), "-o", "json", "--interval", "0.1",
                          "--timeout", str(timeout)])
    events = _watch_events(proc)
    try:
        assert _next_event(events, "snapshot", timeout=30), "the watch never started"
        put_state(server_target.open(run_id), _with_round(state, 2))
        assert _next_event(events, "round-advanced") is not None
        server_target.server.kill()
        killed = time.monotonic()
        if history:
            time.sleep(1.5)  # the watch is riding out the outage now
            os.kill(proc.pid, signal.SIGSTOP)
        server_target.server.start()
        if server_target.server.persistent:
            writer = server_target.open(run_id)
            for round_ in (3, 4, 5):
                put_state(writer, _with_round(state, round_))
        if history:
            os.kill(proc.pid, signal.SIGCONT)
            seen = []
            for _ in range(3):
                event = _next_event(events, "round-advanced", timeout=timeout + SLACK)
                if event is None:
                    break
                seen.append(event["message"])
            repeated = _next_event(events, "round-advanced", timeout=0.5)
            proc.terminate()
            _, err = proc.communicate(timeout=10)
            expected = ["round 2 -> 3", "round 3 -> 4", "round 4 -> 5"]
            survived = seen == expected and repeated is None
            recorder.record_fault(server_target.id, "SIGKILL mid-watch (resume)", survived, f"{seen}")
            assert seen == expected, f"the watch did not resume over the restart: saw {seen}; stderr: {err}"
            assert repeated is None, f"an event was repeated: {repeated}"
        else:
            # No history: the watch ends cleanly, or goes on polling the restarted server and reports
            # what it finds there (the new rounds, or the state gone from a restarted TCPStore).
            resumed: List[dict] = []
            while time.monotonic() - killed < timeout + SLACK and proc.poll() is None and not resumed:
                # one call for both kinds: looking for one would skip (and lose) the other
                event = _next_event(events, ("round-advanced", "state-removed"), timeout=0.3)
                if event is not None:
                    resumed.append(event)
            if proc.poll() is None:
                proc.terminate()
            _, err = proc.communicate(timeout=10)
            ended = time.monotonic() - killed
            if resumed:
                more = []
                while not events.empty():
                    item = events.get()
                    if item and item["kind"] == "round-advanced":
                        more.append(item["message"])
                messages = [e["message"] for e in resumed if e["kind"] == "round-advanced"] + more
                survived = len(messages) == len(set(messages))  # nothing reported twice
            elif proc.returncode == 4:
                survived = "Unavailable" in assert_error_line(err) and ended <= timeout + SLACK
            else:
                survived = False
            recorder.record_fault(server_target.id, "SIGKILL mid-watch", survived,
                                  "resumed polling" if resumed else f"exit {proc.returncode}")
            assert survived, f"exit {proc.returncode} after {ended:.1f} s, resumed {resumed}: {err}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()


def test_watch_gives_up_when_the_outage_outlasts_the_timeout(server_target: Target, recorder: Recorder) -> None:
    """A server that stays down: even the watch that rides out outages exits 4 within its timeout."""
    run_id = _run_id("watch-down")
    put_state(server_target.open(run_id), sample_state(round=1))
    proc = spawn_rdzvctl(["watch", *server_target.flags(run_id), "-o", "json", "--interval", "0.1",
                          "--timeout", str(TIMEOUT)])
    events = _watch_events(proc)
    try:
        assert _next_event(events, "snapshot", timeout=30), "the watch never started"
        server_target.server.kill()
        killed = time.monotonic()
        try:
            proc.wait(timeout=TIMEOUT + SLACK)
        except subprocess.TimeoutExpired:
            pass
        ended = time.monotonic() - killed
        code = proc.poll()
        _, err = proc.communicate(timeout=10) if code is not None else ("", "")
        ok = code == 4 and ended <= TIMEOUT + SLACK
        recorder.record_fault(server_target.id, "SIGKILL during watch, no restart", ok, f"exit {code}")
        assert ok, f"exit {code} after {ended:.1f} s: {err}"
        assert "Unavailable" in assert_error_line(err) or "Timeout" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("fault_target", ["redis", "etcd-v2", "etcd-v3"], indirect=True)  # (a TCPStore forgets)
def test_kill_during_a_write_stream_keeps_every_acknowledged_write(server_target: Target,
                                                                  recorder: Recorder) -> None:
    """Fenced increments until the server is SIGKILLed at an arbitrary moment, then a restart:
    the state is the last acknowledged write or the one in flight, whole, and writable again."""
    run_id = _run_id("stream")
    backend = server_target.open(run_id, timeout=TIMEOUT)
    put_state(backend, sample_state(round=0))
    acknowledged, in_flight, failures = [0], [0], []

    def write() -> None:
        while True:
            try:
                raw, token = backend.get_state()
                state = decode(raw)
                state.round += 1
                in_flight[0] = state.round
                result = backend.set_state(encode(state), token)
            except Exception as exc:  # the kill
                failures.append(exc)
                return
            if result is not None and result[2]:
                acknowledged[0] = state.round

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5 + random.random())
    server_target.server.kill()
    writer.join(timeout=TIMEOUT + 10)
    server_target.server.start()
    after = decode(_raw(server_target, run_id)).round
    fresh = server_target.open(run_id)
    raw, token = fresh.get_state()
    state = decode(raw)
    state.round += 1
    writable = bool(fresh.set_state(encode(state), token)[2])
    ok = after in (acknowledged[0], in_flight[0]) and acknowledged[0] > 0 and writable and bool(failures)
    recorder.record_fault(server_target.id, "SIGKILL during a write stream", ok,
                          f"acknowledged {acknowledged[0]}, in flight {in_flight[0]}, after restart {after}")
    assert failures and type(failures[0]).__module__.startswith("rdzvctl"), failures[:1]
    assert after in (acknowledged[0], in_flight[0]), (acknowledged[0], in_flight[0], after)
    assert writable


# -- FileStore: a peer stuck holding torch's lock ----------------------------------------------------
def test_stuck_lock_holder_timeout_is_honoured(filestore_target: Target, recorder: Recorder) -> None:
    run_id = _run_id("lock")
    put_state(filestore_target.open(run_id), sample_state(round=3))
    holder = FileLockHolder(filestore_target.endpoint)
    try:
        run = rdzvctl(["get", *filestore_target.flags(run_id), "--timeout", str(TIMEOUT)], timeout=TIMEOUT + 60)
    finally:
        holder.release()
    _check_failed_or_answered(run, recorder, filestore_target, "lock held during get", ok_codes=())
    assert "locked" in run.stderr


def test_lock_holder_killed_mid_set(filestore_target: Target, recorder: Recorder, tmp_path: Any) -> None:
    """A peer dies holding the lock mid-set: the lock goes with it and the write goes through, once."""
    run_id = _run_id("lock-set")
    put_state(filestore_target.open(run_id), sample_state(round=3))
    holder = FileLockHolder(filestore_target.endpoint)
    started = time.monotonic()
    try:
        proc = spawn_rdzvctl(["set", *filestore_target.flags(run_id), "--round", "4", "--yes", "--backup-dir",
                              str(tmp_path), "--timeout", "8"])
        time.sleep(1.5)
    finally:
        holder.process.kill()
        holder.release()
    run = _finish(proc, started, 8 + SLACK)
    ok = run.returncode == 0 and decode(_raw(filestore_target, run_id)).round == 4
    recorder.record_fault(filestore_target.id, "lock holder SIGKILLed mid-set", ok, f"exit {run.returncode}")
    assert ok, run.stderr


# -- a 3-member etcd cluster losing its leader -------------------------------------------------------
def _leader(cluster: EtcdCluster) -> int:
    status = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json"))
    leader = status[0]["Status"]["leader"]
    for index, entry in enumerate(status):
        if entry["Status"]["header"]["member_id"] == leader:
            return index
    raise AssertionError(f"no leader among {status}")


@pytest.mark.parametrize("backend", ["etcd-v2", "etcd-v3"])
def test_etcd_cluster_survives_losing_its_leader(etcd_cluster: EtcdCluster, recorder: Recorder,
                                                 tmp_path: Any, backend: str) -> None:
    target = Target(f"{backend} 3-member", backend, etcd_cluster.endpoint)
    run_id = _run_id("leader")
    before = sample_state(round=3)
    put_state(target.open(run_id), before)
    etcd_cluster.members[_leader(etcd_cluster)].kill()
    timeout = ["--timeout", "10"]
    get = rdzvctl(["get", *target.flags(run_id), "-o", "json", *timeout])
    write = rdzvctl(["set", *target.flags(run_id), "--round", "4", "--yes", "--backup-dir", str(tmp_path), *timeout])
    watch = rdzvctl(["watch", *target.flags(run_id), "--until", "round>=4", "-o", "json", *timeout])
    reset = rdzvctl(["reset", *target.flags(run_id), "--mode", "clear", "--yes", "--backup-dir", str(tmp_path),
                     *timeout])
    gone = rdzvctl(["get", *target.flags(run_id), *timeout])
    ok = (get.returncode, write.returncode, watch.returncode, reset.returncode, gone.returncode) == (0, 0, 0, 0, 5)
    recorder.record_fault(target.id, "leader SIGKILLed", ok,
                          f"exits {[r.returncode for r in (get, write, watch, reset, gone)]}")
    assert get.returncode == 0, get.stderr
    assert json.loads(get.stdout)["state"]["round"] == 3
    assert write.returncode == 0, write.stderr
    assert watch.returncode == 0, watch.stderr
    assert reset.returncode == 0, reset.stderr
    assert gone.returncode == 5, gone.stderr
