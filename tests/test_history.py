"""The pure history layer: replay with heartbeat collapse, time inference, restart storms, the event form."""

from __future__ import annotations

import datetime as _dt
import tracemalloc
from typing import Iterator, List, Optional

import pytest

from rdzvctl.backends.base import HistoryVersion
from rdzvctl.state.codec import encode
from rdzvctl.state.history import (
    Observation,
    StormDetector,
    StormSettings,
    entry_events,
    replay,
    replay_observations,
    timeline,
)
from rdzvctl.state.model import NodeDesc, RendezvousState

UTC = _dt.timezone.utc
T0 = _dt.datetime(2026, 11, 24, 22, 0, 0, tzinfo=UTC)
A = NodeDesc("node_a", 1, 0)
B = NodeDesc("node_b", 2, 0)
C = NodeDesc("node_c", 3, 0)


def at(seconds: float) -> _dt.datetime:
    return T0 + _dt.timedelta(seconds=seconds)


def state(round_: int, participants, t: float, complete: bool = False, wait=(), beats=None) -> RendezvousState:
    nodes = list(participants) + list(wait)
    return RendezvousState(
        round=round_, complete=complete,
        participants={n: i for i, n in enumerate(sorted(participants))} if complete else {n: 0 for n in participants},
        wait_list=set(wait),
        last_heartbeats=beats if beats is not None else {n: at(t) for n in nodes})


def versions(*states: Optional[RendezvousState], written: bool = False) -> List[HistoryVersion]:
    return [HistoryVersion(None if s is None else encode(s),
                           at(i) if written else None, i) for i, s in enumerate(states)]


def kinds(entries) -> List[List[str]]:
    return [[e.kind for e in entry.events] for entry in entries]


def test_replay_collapses_heartbeat_only_versions() -> None:
    history = versions(
        state(0, [A], 0),
        state(0, [A], 5), state(0, [A], 10),  # heartbeat-only
        state(0, [A, B], 12),
        state(0, [A, B], 15), state(0, [A, B], 20), state(0, [A, B], 20),  # heartbeat-only, one identical
        state(0, [A, B], 21, complete=True),
    )
    entries = list(replay(history))
    assert kinds(entries) == [["state-created", "joined-participants"], ["joined-participants"],
                              ["rank-changed", "completed"]]
    assert [e.collapsed for e in entries] == [2, 3, 0]
    assert [e.revision for e in entries] == [0, 3, 7]
    assert entries[1].events[0].node == str(B)
    # the folded versions say how long each state held (what the picture draws up to)
    assert [e.until for e in entries] == [at(10), at(20), None]
    # every version is an entry without collapsing
    assert len(list(replay(history, collapse=False))) == len(history)


def test_time_is_the_backend_write_time_else_the_newest_heartbeat() -> None:
    entries = list(replay(versions(state(0, [A], 100), state(0, [A, B], 200), written=True)))
    assert [(e.time, e.time_source) for e in entries] == [(at(0), "backend"), (at(1), "backend")]
    beats = {A: at(50), B: at(70)}
    entries = list(replay(versions(state(0, [A], 40), state(0, [A, B], 0, beats=beats), None)))
    assert [(e.time, e.time_source) for e in entries] == [(at(40), "heartbeat"), (at(70), "heartbeat"),
                                                          (at(70), "heartbeat")]  # removal: time before it
    assert kinds(entries)[2] == ["state-removed"]
    assert kinds(entries)[0] == ["state-created", "joined-participants"]
    # inferred time never goes back (the node with the newest heartbeat left)
    entries = list(replay(versions(state(0, [A, B], 0, beats={A: at(10), B: at(90)}),
                                   state(0, [A], 0, beats={A: at(20)}))))
    assert entries[1].time == at(90)


def test_corrupt_versions_are_reported_once_and_replay_goes_on() -> None:
    good = encode(state(0, [A], 1))
    history = [HistoryVersion(good, None, 0), HistoryVersion(b"\x80\x04garbage", None, 1),
               HistoryVersion(b"\x80\x04garbage", None, 2), HistoryVersion(None, None, 3),
               HistoryVersion(good, None, 4)]
    entries = list(replay(history))
    created = ["state-created", "joined-participants"]  # a new state says who it already holds
    assert kinds(entries) == [created, ["state-corrupt"], ["state-removed"], created]
    assert entries[1].state is None and entries[1].collapsed == 1
    assert entries[1].time == at(1)


def test_a_run_without_state_yet_has_no_entries_until_it_has_one() -> None:
    entries = list(replay(versions(None, None, state(1, [A], 3))))
    assert kinds(entries) == [["state-created", "joined-participants"]] and entries[0].revision == 2


def test_replay_streams_in_bounded_memory() -> None:
    blobs = [encode(state(0, [A, B], i)) for i in range(2)]

    def many() -> Iterator[HistoryVersion]:
        for i in range(20_000):
            yield HistoryVersion(blobs[i % 2], None, i)

    tracemalloc.start()
    try:
        entries = replay(many())
        first = next(entries)
        assert list(entries) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.collapsed == 19_999
    assert peak < 2_000_000


def test_event_form_has_follow_keys_and_history_fields() -> None:
    many = [NodeDesc(f"n{i}", i, 0) for i in range(30)]
    entries = list(replay(versions(state(0, [A], 0), state(0, [A, *many], 1), written=True)))
    events = [e for entry in entries for e in entry_events(entry, "job")]
    assert events[0] == {"time": "2026-11-24T22:00:00.000000+00:00", "kind": "state-created",
                         "message": "state created (round 0)", "run_id": "job", "round": 0, "revision": 0,
                         "time_source": "backend", "collapsed": 0}
    assert events[1]["kind"] == "joined-participants" and events[1]["node"] == str(A)
    grouped = events[2]
    assert grouped["kind"] == "joined-participants" and grouped["count"] == 30 and len(grouped["nodes"]) == 20


def storm_run(stable_for: float) -> List[Observation]:
    """Rounds 0..4: each completes, stays complete for ``stable_for`` s, then the round advances."""
    out = []
    t = 0.0
    for r in range(5):
        out.append(Observation(state(r, [A, B], t), True, at(t)))
        t += 1
        out.append(Observation(state(r, [A, B], t, complete=True), True, at(t)))
        t += stable_for
    return out


def test_restart_storm_is_found_when_rounds_advance_quickly() -> None:
    events = list(timeline(replay_observations(storm_run(5)), "job"))
    storms = [e for e in events if e["kind"] == "restart-storm"]
    assert len(storms) == 1
    assert storms[0]["round"] == 3 and "3 times" in storms[0]["message"]
    assert storms[0]["severity"] == "error"
    # the storm follows the entry that made it
    index = events.index(storms[0])
    assert events[index - 1]["round"] == 3


def test_no_storm_when_rounds_last_or_advances_are_spread() -> None:
    assert not [e for e in timeline(replay_observations(storm_run(120)), "job") if e["kind"] == "restart-storm"]
    spread = StormSettings(advances=3, window=10, stable=60)
    assert not [e for e in timeline(replay_observations(storm_run(5)), "job", storm=spread)
                if e["kind"] == "restart-storm"]
    assert not [e for e in timeline(replay_observations(storm_run(5)), "job", storm=None)
                if e["kind"] == "restart-storm"]


def test_storm_settings_are_configurable_and_checked() -> None:
    quick = StormSettings(advances=2, window=600, stable=60)
    assert len([e for e in timeline(replay_observations(storm_run(5)), "job", storm=quick)
                if e["kind"] == "restart-storm"]) == 2
    with pytest.raises(ValueError):
        StormDetector(StormSettings(advances=0))


def test_since_hides_earlier_events() -> None:
    events = list(timeline(replay_observations(storm_run(5)), "job", since=at(12)))
    assert events and all(e["time"] >= "2026-11-24T22:00:12" for e in events)


def test_a_jump_of_several_rounds_counts_as_that_many_advances() -> None:
    run = [Observation(state(0, [A], 0, complete=True), True, at(0)),
           Observation(state(3, [A], 1, complete=True), True, at(1))]
    storms = [e for e in timeline(replay_observations(run), "job") if e["kind"] == "restart-storm"]
    assert len(storms) == 1 and "rounds 1, 2, 3" in storms[0]["message"]


def test_a_heartbeat_far_ahead_does_not_stamp_later_versions_or_make_a_storm() -> None:
    # One node's clock years ahead in round 0; then the round advances once an hour.  Carrying
    # the skewed time on made every later advance "0 s" apart: a storm that never happened.
    history = [state(0, [A, B], 0, complete=True, beats={A: at(0), B: at(10**8)})]
    history += [state(r, [A], 3600 * r, complete=True) for r in range(1, 6)]
    events = list(timeline(replay(versions(*history)), "job"))
    assert not [e for e in events if e["kind"] == "restart-storm"]
    advanced = [e for e in events if e["kind"] == "round-advanced"]
    assert [e["time"][:19] for e in advanced] == [at(3600 * r).isoformat()[:19] for r in range(1, 6)]


def test_a_writer_leaving_keeps_the_time_in_order() -> None:
    # The version where a node leaves lost its heartbeat: its newest one is older, a little.
    entries = list(replay(versions(state(0, [A, B], 0, beats={A: at(0), B: at(20)}),
                                   state(0, [A], 0, beats={A: at(5)}))))
    assert entries[-1].time == at(20)


def test_no_storm_from_advances_whose_times_go_backwards() -> None:
    # A record file out of order (or a clock stepped back): the round advanced hourly, backwards.
    observations = [Observation(state(r, [A, B], 0, complete=True), True, at(-3600 * r), "recorded")
                    for r in range(6)]
    events = list(timeline(replay_observations(observations), "job"))
    assert [e["kind"] for e in events].count("round-advanced") == 5
    assert not [e for e in events if e["kind"] == "restart-storm"]


def test_a_corrupt_version_between_two_good_ones_is_no_new_start() -> None:
    # After one corrupt version the next good one was "state created, 2 nodes joined": as if the job
    # had started again.  It is the same state readable again, and only what changed is an event.
    good, later = encode(state(0, [A, B], 1, complete=True)), encode(state(1, [A, B], 9, complete=True))
    history = [HistoryVersion(good, None, 0), HistoryVersion(b"cos\nsystem\n(S'true'\ntR.", None, 1),
               HistoryVersion(good, None, 2), HistoryVersion(later, None, 3)]
    entries = list(replay(history))
    assert kinds(entries)[1:] == [["state-corrupt"], ["state-created"], ["round-advanced"]]
    assert "readable again" in entries[2].events[0].message
    removed_between = [HistoryVersion(good, None, 0), HistoryVersion(b"\x80\x04garbage", None, 1),
                       HistoryVersion(None, None, 2), HistoryVersion(good, None, 3)]
    assert kinds(list(replay(removed_between)))[-1] == ["state-created", "joined-participants", "joined-participants",
                                                         "completed"]  # after a removal it is a new state
