"""The JSON form of a state: exact round trips and validation errors that name the field."""

from __future__ import annotations

import copy
import datetime as _dt
import json
from typing import Any, Callable, Dict

import pytest
from hypothesis import given, settings

from rdzvctl.errors import StateValidationError, UsageError
from rdzvctl.state.jsonform import (
    DOCUMENT_KEYS,
    STATE_KEYS,
    parse_time,
    state_from_document,
    state_from_json,
    state_to_json,
)
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import UTC, rendezvous_states

A = NodeDesc("node_a", 4021, 0)
B = NodeDesc("node-b", 77, 1)
T0 = _dt.datetime(2026, 11, 24, 21, 59, 58, 1, tzinfo=UTC)


def _sample() -> RendezvousState:
    return RendezvousState(
        round=3, complete=True, deadline=T0, closed=False, participants={A: 1, B: 0},
        wait_list={NodeDesc("c", 5, 0)}, redundancy_list=set(),
        last_heartbeats={A: T0, B: T0 + _dt.timedelta(microseconds=7)},
    )


def _assert_exact(actual: RendezvousState, expected: RendezvousState) -> None:
    assert actual == expected
    assert actual.naive_datetimes == expected.naive_datetimes
    for when in [actual.deadline, *actual.last_heartbeats.values()]:
        if when is not None:
            assert when.tzinfo is not None and when.utcoffset() == _dt.timedelta(0)


@settings(max_examples=300, deadline=None)
@given(rendezvous_states())
def test_round_trip_is_exact(state: RendezvousState) -> None:
    doc = state_to_json(state)
    _assert_exact(state_from_json(doc), state)
    _assert_exact(state_from_json(json.loads(json.dumps(doc))), state)
    _assert_exact(state_from_json(json.loads(json.dumps(doc, ensure_ascii=False))), state)
    # And the JSON itself is stable: state -> JSON -> state -> JSON gives the same text.
    assert json.dumps(state_to_json(state_from_json(doc))) == json.dumps(doc)


@settings(max_examples=100, deadline=None)
@given(rendezvous_states())
def test_document_wrapper_round_trip(state: RendezvousState) -> None:
    document = {"schema": 1, "backend": "c10d", "run_id": "job", "token": "x", "state": state_to_json(state),
                "nodes": [], "problems": []}
    _assert_exact(state_from_document(json.loads(json.dumps(document))), state)
    _assert_exact(state_from_document(state_to_json(state)), state)


def test_documented_shape() -> None:
    doc = state_to_json(_sample())
    assert list(doc) == list(STATE_KEYS)
    assert doc == {
        "round": 3,
        "complete": True,
        "deadline": "2026-11-24T21:59:58.000001+00:00",
        "closed": False,
        "participants": {"node-b_77_1": 0, "node_a_4021_0": 1},
        "wait_list": ["c_5_0"],
        "redundancy_list": [],
        "last_heartbeats": {
            "node-b_77_1": "2026-11-24T21:59:58.000008+00:00",
            "node_a_4021_0": "2026-11-24T21:59:58.000001+00:00",
        },
        "datetime_style": "aware",
    }
    assert list(doc["participants"]) == ["node-b_77_1", "node_a_4021_0"]  # by rank


def test_naive_style_is_preserved() -> None:
    state = _sample()
    state.naive_datetimes = True
    doc = json.loads(json.dumps(state_to_json(state)))
    assert doc["datetime_style"] == "naive"
    assert doc["deadline"].endswith("+00:00")  # still written as UTC
    _assert_exact(state_from_json(doc), state)
    del doc["datetime_style"]
    assert state_from_json(doc).naive_datetimes is False


def test_datetime_formats_accepted() -> None:
    expected = _dt.datetime(2026, 11, 24, 21, 59, 58, 500000, tzinfo=UTC)
    for text in ("2026-11-24T21:59:58.5Z", "2026-11-24T21:59:58.500000+00:00", "2026-11-24T23:59:58.5+02:00",
                 "2026-11-24 21:59:58.5z", "2026-11-24T16:59:58.500-05:00"):
        parsed = parse_time(text, "deadline")
        assert parsed == expected and parsed.utcoffset() == _dt.timedelta(0)


def test_node_ids_with_underscores_and_unicode() -> None:
    nodes = [NodeDesc("a_b_c", 1, 2), NodeDesc("", 0, 0), NodeDesc("héte_ü", 2**63 - 1, 3), NodeDesc("_", 5, 6)]
    state = RendezvousState(wait_list=set(nodes), last_heartbeats={n: T0 for n in nodes})
    _assert_exact(state_from_json(json.loads(json.dumps(state_to_json(state)))), state)
    assert NodeDesc.parse("a_b_c_1_2") == NodeDesc("a_b_c", 1, 2)


# -- validation -----------------------------------------------------------------------
Mutation = Callable[[Dict[str, Any]], None]


def _set(key: str, value: Any) -> Mutation:
    return lambda doc: doc.__setitem__(key, value)


def _drop(key: str) -> Mutation:
    return lambda doc: doc.pop(key)


INVALID = [
    # wrong types of each field
    (_set("round", "3"), "round"),
    (_set("round", 3.0), "round"),
    (_set("round", True), "round"),
    (_set("round", None), "round"),
    (_set("round", -1), "round"),
    (_set("complete", "true"), "complete"),
    (_set("complete", 1), "complete"),
    (_set("closed", None), "closed"),
    (_set("deadline", 5), "deadline"),
    (_set("deadline", "2026-11-24T21:59:58"), "deadline"),  # no offset
    (_set("deadline", "yesterday"), "deadline"),
    (_set("deadline", "2026-13-01T00:00:00+00:00"), "deadline"),
    (_set("deadline", ""), "deadline"),
    (_set("participants", []), "participants"),
    (_set("participants", {"node_a_4021_0": "1"}), "participants['node_a_4021_0']"),
    (_set("participants", {"node_a_4021_0": -1}), "participants['node_a_4021_0']"),
    (_set("participants", {"node_a_4021_0": 1.0}), "participants['node_a_4021_0']"),
    (_set("participants", {"node_a_4021_0": None}), "participants['node_a_4021_0']"),
    (_set("wait_list", "c_5_0"), "wait_list"),
    (_set("wait_list", {"c_5_0": 1}), "wait_list"),
    (_set("wait_list", [1]), "wait_list[0]"),
    (_set("wait_list", ["c_5_0", "c_5_0"]), "wait_list"),  # duplicates
    (_set("redundancy_list", None), "redundancy_list"),
    (_set("redundancy_list", ["x_1_1", "y_2_2", "x_1_1"]), "redundancy_list"),
    (_set("last_heartbeats", ["node_a_4021_0"]), "last_heartbeats"),
    (_set("last_heartbeats", {"node_a_4021_0": 12}), "last_heartbeats['node_a_4021_0']"),
    (_set("last_heartbeats", {"node_a_4021_0": "2026-11-24T21:59:58"}), "last_heartbeats['node_a_4021_0']"),
    (_set("last_heartbeats", {"node_a_4021_0": "garbage"}), "last_heartbeats['node_a_4021_0']"),
    (_set("datetime_style", "local"), "datetime_style"),
    (_set("datetime_style", None), "datetime_style"),
    # bad node ids
    (_set("wait_list", ["nonode"]), "wait_list[0]"),
    (_set("wait_list", ["a_1"]), "wait_list[0]"),
    (_set("wait_list", ["a_x_1"]), "wait_list[0]"),
    (_set("wait_list", ["a_01_1"]), "wait_list[0]"),  # not how torch writes it
    (_set("wait_list", ["a_+1_1"]), "wait_list[0]"),
    (_set("wait_list", ["a_ 1_1"]), "wait_list[0]"),
    (_set("wait_list", ["a_1_1 "]), "wait_list[0]"),
    (_set("wait_list", ["a_١_1"]), "wait_list[0]"),  # non-ASCII digit
    (_set("participants", {"a_1": 0}), "participants['a_1']"),
    (_set("last_heartbeats", {"bad": "2026-11-24T21:59:58+00:00"}), "last_heartbeats['bad']"),
    # unknown and missing fields
    (_set("extra", 1), "extra"),
    (_set("last_keep_alives", {}), "last_keep_alives"),
    (_drop("round"), "round"),
    (_drop("participants"), "participants"),
    (_drop("last_heartbeats"), "last_heartbeats"),
    (_drop("deadline"), "deadline"),
]


@pytest.mark.parametrize("mutate, field", INVALID)
def test_validation_error_names_the_field(mutate: Mutation, field: str) -> None:
    doc = json.loads(json.dumps(state_to_json(_sample())))
    mutate(doc)
    with pytest.raises(StateValidationError) as info:
        state_from_json(doc)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


@pytest.mark.parametrize("mutate, field", INVALID[:12])
def test_validation_error_inside_a_document_is_prefixed(mutate: Mutation, field: str) -> None:
    doc = {"schema": 1, "state": json.loads(json.dumps(state_to_json(_sample())))}
    mutate(doc["state"])
    with pytest.raises(StateValidationError) as info:
        state_from_document(doc)
    assert info.value.field == f"state.{field}"


def test_unknown_document_field_is_named() -> None:
    doc = {"state": state_to_json(_sample()), "stat": {}}
    with pytest.raises(StateValidationError) as info:
        state_from_document(doc)
    assert info.value.field == "stat"
    # Every read-only field is accepted and ignored.
    doc = {key: "anything" for key in DOCUMENT_KEYS}
    doc["state"] = state_to_json(_sample())
    assert state_from_document(doc) == _sample()


@pytest.mark.parametrize("doc", [None, [], "state", 3, {"state": None}, {"state": []}])
def test_not_an_object(doc: Any) -> None:
    with pytest.raises(StateValidationError) as info:
        state_from_document(doc)
    assert info.value.field in ("state", "state.state")


def test_input_document_is_not_modified() -> None:
    doc = state_to_json(_sample())
    before = copy.deepcopy(doc)
    state_from_document({"state": doc, "problems": []})
    assert doc == before
