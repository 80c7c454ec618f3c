"""rdzvctl watch: semantic events while another writer changes the state, and --until gates."""

from __future__ import annotations

import json
import threading
from typing import Callable, Iterator, List

import pytest

from rdzvctl.state.codec import encode
from rdzvctl.testing.memory import MemoryBackend
from tests.support.cli import (
    invoke,
    make_state,
    node,
    run_rdzvctl,
)

FAST = ["--interval", "0.02"]


@pytest.fixture
def watching(monkeypatch) -> threading.Event:
    """Set once watch has yielded its first state, so changes made afterwards are events."""
    started = threading.Event()
    original = MemoryBackend.watch

    def watch(self, *args, **kwargs) -> Iterator:
        for item in original(self, *args, **kwargs):
            yield item
            started.set()

    monkeypatch.setattr(MemoryBackend, "watch", watch)
    return started


def writer(memory, started: threading.Event, steps: List[Callable[[], None]]) -> threading.Thread:
    """Another writer: once watch runs, apply ``steps`` a little apart."""

    def run() -> None:
        assert started.wait(10)
        for step in steps:
            threading.Event().wait(0.1)
            step()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def events(result) -> List[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_until_complete_reports_joined_and_completed(memory, watching):
    memory.put(make_state(alive=2, dead=0, waiting=0, complete=False))
    joined = make_state(alive=3, dead=0, waiting=0, complete=False)
    done = make_state(alive=3, dead=0, waiting=0, complete=True)
    thread = writer(memory, watching, [lambda: memory.put(joined), lambda: memory.put(done)])
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "complete", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    got = events(result)
    assert [e["kind"] for e in got] == ["snapshot", "joined-participants", "completed", "until-met"]
    assert got[0]["message"] == "round 2, incomplete, 2 participants, 0 waiting" and got[0]["round"] == 2
    assert got[1]["node"] == str(node(2))
    for event in got:
        assert set(event) >= {"time", "kind", "message", "run_id"} and event["run_id"] == "job42"
        assert event["time"] == "2026-11-24T22:00:00.000000+00:00"


def test_until_round(memory, watching):
    memory.put(make_state(dead=0, round=2))
    steps = [lambda r=r: memory.put(make_state(dead=0, round=r)) for r in (3, 4)]
    thread = writer(memory, watching, steps)
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "round>=4", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    got = events(result)
    rounds = [(e["from"], e["to"]) for e in got if e["kind"] == "round-advanced"]
    assert rounds == [(2, 3), (3, 4)]
    assert got[-1]["kind"] == "until-met" and got[-1]["message"] == "condition 'round>=4' holds"


def test_until_absent(memory, watching):
    memory.put(make_state(dead=0))

    def clear() -> None:
        assert memory.backend().clear(memory.token())

    thread = writer(memory, watching, [clear])
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "absent", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    assert [e["kind"] for e in events(result)] == ["snapshot", "state-removed", "until-met"]


def test_created_closed_and_corrupt_as_text(memory, watching):
    state = make_state(dead=0)
    closed = make_state(dead=0, closed=True)
    steps = [lambda: memory.put(state), lambda: memory.put(b"\x80\x04garbage"), lambda: memory.put(closed)]
    thread = writer(memory, watching, steps)
    result = invoke(["watch", *memory.flags(), "--until", "closed", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    kinds = [line.split()[1] for line in lines]
    # readable again after the corrupt value: the change from the last readable state is told (closed)
    assert kinds == ["snapshot", "state-created", "state-corrupt", "state-created", "closed", "until-met"]
    assert "readable again" in lines[3]

    assert lines[0] == "2026-11-24T22:00:00.000000+00:00  snapshot               no state yet"
    assert "not a valid pickle" in lines[2]


def test_corrupt_wrapping_then_removed_goes_on(memory, watching):
    memory.put(make_state(dead=0))

    thread = writer(memory, watching, [memory.corrupt, memory.backend().drop])
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "absent", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    assert [e["kind"] for e in events(result)] == ["snapshot", "state-corrupt", "state-removed", "until-met"]


def test_stale_heartbeats_are_reported(memory):
    memory.put(make_state(dead=1))
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "round>=0", "--for", "20", *FAST])
    assert result.exit_code == 0
    got = events(result)
    assert [e["kind"] for e in got] == ["snapshot", "heartbeat-stale", "until-met"]
    assert got[1]["node"] == "trainer-3.cluster.local_4103_0" and "(50 s)" in got[1]["message"]


def test_many_stale_heartbeats_are_one_event_with_a_count(memory):
    memory.put(make_state(alive=2, dead=40, waiting=0))
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "round>=0", "--for", "20", *FAST])
    assert result.exit_code == 0, result.stderr
    got = events(result)
    assert [e["kind"] for e in got] == ["snapshot", "heartbeat-stale", "until-met"]
    assert got[1]["count"] == 40 and len(got[1]["nodes"]) == 20 and "node" not in got[1]
    assert got[1]["message"].startswith("40 nodes heartbeat stale: trainer-") and got[1]["message"].endswith(
        " and 37 more")


def test_without_until_for_ends_the_watch_with_0(memory):
    memory.put(make_state(dead=0))
    result = invoke(["watch", *memory.flags(), "-o", "json", "--for", "0.2", *FAST])
    assert result.exit_code == 0, result.stderr
    assert [e["kind"] for e in events(result)] == ["snapshot"]


def test_timeout_is_only_the_per_operation_bound(memory):
    memory.put(make_state(complete=True, dead=0))
    result = invoke(["watch", *memory.flags(), "--until", "complete", "--timeout", "0.01", *FAST])
    assert result.exit_code == 0, result.stderr


def test_until_with_only_timeout_stays_bounded_as_before(memory):
    """A CI gate written before --for existed (--until X --timeout N) must not wait forever."""
    memory.put(make_state(complete=False, dead=0))
    result = invoke(["watch", *memory.flags(), "--until", "complete", "--timeout", "0.3", *FAST])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("rdzvctl: warning: --until with --timeout and no --for waits at most 0.3s")
    assert lines[-1] == "rdzvctl: ConditionNotMetError: the condition 'complete' did not hold within 0.3s"


def test_until_never_met_times_out_with_1(memory):
    memory.put(make_state(complete=False, dead=0))
    result = invoke(["watch", *memory.flags(), "--until", "complete", "--for", "0.3", *FAST])
    assert result.exit_code == 1
    assert result.stderr.strip() == "rdzvctl: ConditionNotMetError: the condition 'complete' did not hold within 0.3s"


@pytest.mark.parametrize("until", ["done", "round>3", "round>=x", ""])
def test_bad_until_exits_2(memory, until):
    memory.put(make_state())
    result = invoke(["watch", *memory.flags(), "--until", until, "--timeout", "1"])
    assert result.exit_code == 2
    assert "--until" in result.stderr


def test_watch_needs_a_run_id(memory):
    result = invoke(["watch", *memory.flags(run_id=None), "--until", "complete", "--timeout", "1"])
    assert result.exit_code == 2


def test_watch_of_an_unsafe_state_never_executes_it(memory, tmp_path, watching):
    import pickle

    class Explode:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    memory.put(pickle.dumps(Explode()))
    thread = writer(memory, watching, [lambda: memory.put(encode(make_state(dead=0, closed=True)))])
    result = invoke(["watch", *memory.flags(), "-o", "json", "--until", "closed", "--for", "20", *FAST])
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    got = events(result)
    assert got[0]["kind"] == "state-corrupt" and "posix.system" in got[0]["message"]
    assert not (tmp_path / "pwned").exists()


NON_FINITE = [
    (["watch", "--until", "closed", "--for", "nan"], "--for"),
    (["watch", "--until", "closed", "--for", "inf"], "--for"),
    (["watch", "--until", "closed", "--interval", "nan"], "--interval"),
    (["watch", "--until", "closed", "--interval", "1e300"], "--interval"),
    (["watch", "--until", "closed", "--timeout", "nan"], "--timeout"),
    (["get", "--timeout", "inf"], "--timeout"),
    (["doctor", "--dns-timeout", "nan"], "--dns-timeout"),
    (["report", "--connect-timeout", "inf"], "--connect-timeout"),
    (["demo", "--no-live", "--duration", "nan"], "--duration"),
]


def test_process_non_finite_seconds_exit_2_naming_the_option(tmp_path):
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(tmp_path / "store"), "PET_RDZV_ID": "job",
           "PET_RDZV_CONF": "store_type=file"}
    for args, option in NON_FINITE:
        done = run_rdzvctl(args, env=env, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.splitlines()
        assert option in line and "internal error" not in line, line
    done = run_rdzvctl(["get"], env={**env, "RDZVCTL_TIMEOUT": "nan"})
    assert done.returncode == 2 and "RDZVCTL_TIMEOUT" in done.stderr, done.stderr
