"""The state codec against real torch: torch's pickles decode, ours load in torch."""

from __future__ import annotations

import base64
import copyreg
import datetime as _dt
import pickle
from typing import Any, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdzvctl.errors import StateCorruptError
from rdzvctl.state.codec import decode, decode_base64, encode, encode_base64
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import UTC, from_torch, rendezvous_states, to_torch, torch_classes, torch_states

pytest.importorskip("torch")

pytestmark = pytest.mark.torch

PROTOCOLS = st.sampled_from([2, 3, 4, 5])
ROUND_TRIP = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

A = NodeDesc("node_a", 4021, 0)
B = NodeDesc("node-b", 77, 1)
T0 = _dt.datetime(2026, 11, 24, 21, 59, 58, 1, tzinfo=UTC)


def assert_same(actual: RendezvousState, expected: RendezvousState) -> None:
    """Every field equal, including the datetime style (not part of ``==``)."""
    assert actual == expected
    assert actual.naive_datetimes == expected.naive_datetimes
    for when in [actual.deadline, *actual.last_heartbeats.values()]:
        if when is not None:
            assert when.utcoffset() == _dt.timedelta(0)


@ROUND_TRIP
@given(torch_states(naive=None), PROTOCOLS)
def test_torch_pickle_decodes_to_equal_state(pair: Any, protocol: int) -> None:
    obj, expected = pair
    assert_same(decode(pickle.dumps(obj, protocol=protocol)), expected)


@ROUND_TRIP
@given(rendezvous_states(), PROTOCOLS)
def test_encoded_state_loads_in_torch_with_equal_fields(state: RendezvousState, protocol: int) -> None:
    loaded = pickle.loads(encode(state, protocol=protocol))
    state_cls, _ = torch_classes()
    assert type(loaded) is state_cls
    # from_torch asserts real _NodeDesc nodes and plain datetimes.
    has_times = state.deadline is not None or bool(state.last_heartbeats)
    expected = state.copy()
    expected.naive_datetimes = state.naive_datetimes and has_times
    assert_same(from_torch(loaded), expected)
    assert loaded.__dict__ == to_torch(state).__dict__


@settings(max_examples=60, deadline=None)
@given(rendezvous_states(), PROTOCOLS)
def test_decode_of_encode_is_identity(state: RendezvousState, protocol: int) -> None:
    has_times = state.deadline is not None or bool(state.last_heartbeats)
    decoded = decode(encode(state, protocol=protocol))
    assert decoded == state
    assert decoded.naive_datetimes == (state.naive_datetimes and has_times)


@settings(max_examples=60, deadline=None)
@given(torch_states(naive=None))
def test_base64_wrapping_matches_torch_c10d(pair: Any) -> None:
    obj, expected = pair
    stored = base64.b64encode(pickle.dumps(obj))  # torch's C10dRendezvousBackend._encode_state
    assert_same(decode(decode_base64(stored)), expected)
    ours = encode_base64(encode(expected))
    assert pickle.loads(base64.b64decode(ours)).__dict__ == obj.__dict__


def test_encoded_nodes_are_shared_like_torch() -> None:
    state = RendezvousState(participants={A: 0}, wait_list={A}, last_heartbeats={A: T0})
    loaded = pickle.loads(encode(state))
    (node,) = loaded.participants
    assert next(iter(loaded.wait_list)) is node
    assert next(iter(loaded.last_heartbeats)) is node


def test_encode_refuses_unknown_protocol() -> None:
    for protocol in (0, 1, pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(ValueError):
            encode(RendezvousState(), protocol=protocol)


def test_torch_2_13_state_as_written_by_a_handler() -> None:
    """The exact shape a live 2.13 handler writes: aware UTC, memo-shared nodes."""
    state_cls, node_cls = torch_classes()
    obj = state_cls()
    a, b = node_cls(A.addr, A.pid, A.local_id), node_cls(B.addr, B.pid, B.local_id)
    obj.round, obj.complete = 3, True
    obj.participants = {a: 0, b: 1}
    obj.last_heartbeats = {a: T0, b: T0 + _dt.timedelta(seconds=5)}
    decoded = decode(pickle.dumps(obj))
    assert decoded == RendezvousState(
        round=3, complete=True, participants={A: 0, B: 1},
        last_heartbeats={A: T0, B: T0 + _dt.timedelta(seconds=5)},
    )
    assert decoded.naive_datetimes is False


# -- old formats ---------------------------------------------------------------
def test_state_without_redundancy_list_before_torch_2_3() -> None:
    obj = to_torch(RendezvousState(round=1, participants={A: 0}, last_heartbeats={A: T0}))
    del obj.redundancy_list
    for protocol in (2, 3, 4, 5):
        decoded = decode(pickle.dumps(obj, protocol=protocol))
        assert decoded.redundancy_list == set()
        assert decoded.participants == {A: 0}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_naive_datetimes_read_as_utc_and_written_back_naive(protocol: int) -> None:
    naive = T0.replace(tzinfo=None)
    obj = to_torch(RendezvousState(deadline=T0, wait_list={A}, last_heartbeats={A: T0}, naive_datetimes=True))
    assert obj.deadline == naive and obj.deadline.tzinfo is None
    decoded = decode(pickle.dumps(obj, protocol=protocol))
    assert decoded.naive_datetimes is True
    assert decoded.deadline == T0 and decoded.deadline.tzinfo is not None
    assert decoded.last_heartbeats == {A: T0}
    loaded = pickle.loads(encode(decoded, protocol=protocol))
    assert loaded.deadline == naive and loaded.deadline.tzinfo is None
    (when,) = loaded.last_heartbeats.values()
    assert when == naive and when.tzinfo is None


def test_aware_state_is_written_back_aware() -> None:
    decoded = decode(pickle.dumps(to_torch(RendezvousState(last_heartbeats={A: T0}))))
    assert decoded.naive_datetimes is False
    (when,) = pickle.loads(encode(decoded)).last_heartbeats.values()
    assert when == T0 and when.tzinfo is not None


def test_mixed_naive_and_aware_datetimes_are_corrupt() -> None:
    obj = to_torch(RendezvousState(deadline=T0, last_heartbeats={A: T0}))
    obj.deadline = T0.replace(tzinfo=None)
    with pytest.raises(StateCorruptError, match="naive"):
        decode(pickle.dumps(obj))


def test_non_utc_offsets_decode_to_the_same_instant_in_utc() -> None:
    plus2 = _dt.timezone(_dt.timedelta(hours=2))
    obj = to_torch(RendezvousState(last_heartbeats={A: T0}))
    obj.last_heartbeats = {k: T0.astimezone(plus2) for k in obj.last_heartbeats}
    decoded = decode(pickle.dumps(obj))
    (when,) = decoded.last_heartbeats.values()
    assert when == T0 and when.utcoffset() == _dt.timedelta(0)


class _Legacy:
    """Pickles as NEWOBJ(cls) + BUILD(fields): a torch object with fields we choose."""

    def __init__(self, cls: type, fields: Dict[str, Any]) -> None:
        self.cls, self.fields = cls, fields

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # the pickler checks NEWOBJ's class against this
        return self.cls

    def __reduce_ex__(self, protocol: int) -> Any:
        return (copyreg.__newobj__, (self.cls,), self.fields)


def _legacy_state(node_field: str = "fqdn", heartbeat_field: str = "last_keep_alives", extra: Any = None) -> Any:
    state_cls, node_cls = torch_classes()
    node = _Legacy(node_cls, {node_field: A.addr, "pid": A.pid, "local_id": A.local_id, **(extra or {})})
    fields = {
        "round": 2, "complete": True, "deadline": None, "closed": False,
        "participants": {node: 0}, "wait_list": set(), heartbeat_field: {node: T0},
    }
    return _Legacy(state_cls, fields)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_field_names_fqdn_and_last_keep_alives(protocol: int) -> None:
    decoded = decode(pickle.dumps(_legacy_state(), protocol=protocol))
    assert decoded == RendezvousState(round=2, complete=True, participants={A: 0}, last_heartbeats={A: T0})
    # Written back under today's names, which torch 2.13 loads.
    loaded = pickle.loads(encode(decoded))
    assert from_torch(loaded) == decoded


def test_legacy_and_current_name_together_are_corrupt() -> None:
    with pytest.raises(StateCorruptError, match="addr"):
        decode(pickle.dumps(_legacy_state(extra={"addr": "other"})))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.__dict__.pop("round"), "round"),
        (lambda s: s.__dict__.update(extra=1), "extra"),
        (lambda s: setattr(s, "round", "3"), "round"),
        (lambda s: setattr(s, "round", -1), "round"),
        (lambda s: setattr(s, "complete", 1), "complete"),
        (lambda s: setattr(s, "closed", None), "closed"),
        (lambda s: setattr(s, "deadline", 5), "deadline"),
        (lambda s: setattr(s, "participants", []), "participants"),
        (lambda s: setattr(s, "participants", {next(iter(s.last_heartbeats)): "0"}), "participants"),
        (lambda s: setattr(s, "wait_list", {1}), "wait_list"),
        (lambda s: setattr(s, "wait_list", []), "wait_list"),
        (lambda s: setattr(s, "redundancy_list", None), "redundancy_list"),
        (lambda s: setattr(s, "last_heartbeats", {next(iter(s.last_heartbeats)): "now"}), "last_heartbeats"),
        (lambda s: setattr(s, "last_heartbeats", {"a_1_0": T0}), "last_heartbeats"),
    ],
)
def test_wrong_shapes_are_corrupt_and_named(change: Any, match: str) -> None:
    obj = to_torch(RendezvousState(participants={A: 0}, last_heartbeats={A: T0}))
    change(obj)
    with pytest.raises(StateCorruptError, match=match):
        decode(pickle.dumps(obj))


@pytest.mark.parametrize("field, value", [("addr", 5), ("pid", "1"), ("local_id", True), ("pid", 1.0)])
def test_wrong_node_field_types_are_corrupt(field: str, value: Any) -> None:
    _, node_cls = torch_classes()
    state_cls, _ = torch_classes()
    fields = {"addr": "a", "pid": 1, "local_id": 0, field: value}
    node = _Legacy(node_cls, fields)
    obj = _Legacy(state_cls, {
        "round": 0, "complete": False, "deadline": None, "closed": False,
        "participants": {}, "wait_list": {node}, "redundancy_list": set(), "last_heartbeats": {},
    })
    # A float is refused before unpickling (no state holds one, and float keys collide by design).
    with pytest.raises(StateCorruptError, match="float" if type(value) is float else field):
        decode(pickle.dumps(obj))


def test_not_a_state_is_corrupt() -> None:
    _, node_cls = torch_classes()
    for value in (None, 1, [], {}, T0, node_cls("a", 1, 0)):
        with pytest.raises(StateCorruptError):
            decode(pickle.dumps(value))
    for value in ("text", b"", None):
        with pytest.raises(StateCorruptError):
            decode(value)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    raw = encode(RendezvousState(round=4))
    assert decode(bytearray(raw)).round == 4
    assert decode(memoryview(raw)).round == 4
