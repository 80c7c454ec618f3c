"""rdzvctl.follow.follow(): the library generator behind ``watch`` (in-memory backend: pure logic)."""

from __future__ import annotations

import datetime as _dt

import pytest

from rdzvctl.errors import ConditionNotMetError
from rdzvctl.follow import follow, parse_until
from rdzvctl.state.analysis import KeepAlive
from rdzvctl.state.jsonform import format_time
from tests.support.cli import NOW, Memory, make_state


def test_events_until_the_condition_holds(memory: Memory) -> None:
    memory.put(make_state(round=2, dead=0))
    backend = memory.backend()
    events = follow(backend, interval=0.01, keep_alive=KeepAlive(5.0, 3), until="round>=3", duration=30,
                    now=lambda: NOW)
    first = next(events)
    assert first["kind"] == "snapshot" and first["round"] == 2 and first["run_id"] == "job42"
    assert first["time"] == format_time(NOW)
    memory.put(make_state(round=3, dead=0))
    rest = list(events)
    kinds = [e["kind"] for e in rest]
    assert "round-advanced" in kinds and kinds[-1] == "until-met"
    assert rest[-1]["message"] == "condition 'round>=3' holds"


def test_stale_heartbeats_become_one_grouped_event(memory: Memory) -> None:
    memory.put(make_state(alive=0, dead=5, waiting=0))
    events = follow(memory.backend(), interval=0.01, duration=0.2,
                    now=lambda: NOW + _dt.timedelta(seconds=60))
    stale = [e for e in events if e["kind"] == "heartbeat-stale"]
    assert len(stale) == 1 and stale[0]["count"] == 5 and len(stale[0]["nodes"]) == 5


def test_until_not_met_within_duration_raises(memory: Memory) -> None:
    memory.put(make_state())
    with pytest.raises(ConditionNotMetError, match="did not hold within 0.1s"):
        list(follow(memory.backend(), interval=0.01, until="closed", duration=0.1, now=lambda: NOW))


def test_a_corrupt_value_is_reported_once_and_watching_goes_on(memory: Memory) -> None:
    memory.put(b"not a pickle")
    events = follow(memory.backend(), interval=0.01, until="absent", duration=30, now=lambda: NOW)
    first = next(events)
    assert first["kind"] == "state-corrupt"
    memory.backend().clear(memory.token())
    rest = [e["kind"] for e in events]
    assert rest == ["state-removed", "until-met"]


def test_closing_the_generator_stops_reading(memory: Memory) -> None:
    memory.put(make_state())
    events = follow(memory.backend(), interval=0.01, now=lambda: NOW)
    assert next(events)["kind"] == "snapshot"
    events.close()  # the background read stops; no exception, nothing left running to wait for


def test_parse_until_rejects_unknown_conditions() -> None:
    assert parse_until("round>=2")(make_state(round=2), True)
    assert parse_until(" absent ")(None, False)
    with pytest.raises(ValueError, match="expected complete, closed, absent or round>=N"):
        parse_until("done")


def test_a_good_state_after_a_corrupt_one_is_readable_again_not_new(memory: Memory) -> None:
    memory.put(make_state(round=2, dead=0))
    events = follow(memory.backend(), interval=0.01, until="round>=3", duration=30, now=lambda: NOW)
    assert next(events)["kind"] == "snapshot"
    memory.put(b"not a pickle")
    assert next(events)["kind"] == "state-corrupt"
    memory.put(make_state(round=3, dead=0))
    rest = list(events)
    assert rest[0]["kind"] == "state-created" and "readable again" in rest[0]["message"]
    assert [e["kind"] for e in rest[1:]] == ["round-advanced", "until-met"]  # no one "joined" anew
