"""Every kind of state rdzvctl writes is one torch 2.13's agents load and use.

Each state goes through torch's real ``pickle.loads`` (real ``_RendezvousState``
and ``_NodeDesc``), then through torch's own code: ``_BackendRendezvousStateHolder.sync``
(which unpickles and runs ``_sanitize``, dropping dead nodes), the operations a
handler does on the containers (``wait_list.add``, ``redundancy_list.add``,
``del last_heartbeats[...]``), ``_remove_participant_epilogue``, torch's
re-pickling (``mark_dirty`` + ``sync``), and our decoder again.  The holder's
backend is an in-memory dict: only torch's pure state logic runs.

States only older torch wrote (legacy names, no ``redundancy_list``) decode,
but :func:`check_writable` refuses to write them; what torch cannot use at all
is refused by decode, with torch's own failure shown as the positive control.
"""

from __future__ import annotations

import copyreg
import datetime as _dt
import pickle
from typing import Any, Dict, List, Optional, Tuple

import pytest

from rdzvctl.errors import StateCorruptError, StateError, StateUnsafeError
from rdzvctl.state.analysis import prune_dead_nodes, remove_node, reopen
from rdzvctl.state.codec import check_writable, decode, encode
from rdzvctl.state.jsonform import state_from_json, state_to_json
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import torch_classes

pytest.importorskip("torch")

pytestmark = pytest.mark.torch

UTC = _dt.timezone.utc
A, B, C, D = (NodeDesc(f"node-{c}.cluster.local", 4000 + i, 0) for i, c in enumerate("abcd"))


def _many(n: int, fresh: _dt.datetime) -> RendezvousState:
    nodes = [NodeDesc(f"trainer-{i:05d}.cluster.local", 10000 + i, 0) for i in range(n)]
    return RendezvousState(round=7, complete=True, participants={x: i for i, x in enumerate(nodes)},
                           last_heartbeats={x: fresh for x in nodes})


def _written_states(now: Optional[_dt.datetime] = None) -> List[Tuple[str, RendezvousState]]:
    """What encode() is given on every write path (set, edit, reset, restore of our own bytes).

    Built when a test runs: torch's _sanitize judges heartbeats by its own clock.
    """
    current = now or _dt.datetime.now(UTC).replace(microsecond=0)
    fresh = current - _dt.timedelta(seconds=1)
    stale = current - _dt.timedelta(hours=1)
    complete = RendezvousState(round=3, complete=True, participants={A: 0, B: 1}, wait_list={C},
                               redundancy_list={D}, last_heartbeats={A: fresh, B: stale, C: fresh, D: fresh})
    states = [
        ("empty", RendezvousState()),
        ("forming", RendezvousState(round=1, deadline=current + _dt.timedelta(seconds=30), participants={A: 0, B: 0},
                                    last_heartbeats={A: fresh, B: fresh})),
        ("complete with wait and redundancy lists", complete),
        ("closed", RendezvousState(round=2, complete=True, closed=True, participants={A: 0},
                                   last_heartbeats={A: fresh})),
        ("naive datetimes (torch < 2.6)", RendezvousState(round=1, deadline=current, participants={A: 0}, wait_list={B},
                                                         last_heartbeats={A: fresh, B: fresh}, naive_datetimes=True)),
        ("4096 nodes", _many(4096, fresh)),
        ("reset --mode prune", prune_dead_nodes(complete, current)[0]),
        ("reset --mode reopen", reopen(RendezvousState(round=2, complete=True, closed=True, participants={A: 0},
                                                       last_heartbeats={A: fresh}))),
        ("reset --mode clear (a fresh state)", RendezvousState()),
        ("set --remove-node", remove_node(complete, A)),
        ("set -f (get -o json round trip)", state_from_json(state_to_json(complete))),
    ]
    return states


_LABELS = [label for label, _ in _written_states()]
_AWARE = [label for label, state in _written_states() if not state.naive_datetimes]


def _state(label: str) -> RendezvousState:
    return dict(_written_states())[label]


class _MemoryBackend:
    """torch's RendezvousBackend contract over one in-memory value (fenced by a counter)."""

    def __init__(self, value: Optional[bytes]) -> None:
        self.value, self.token = value, 1

    name = "memory"

    def get_state(self) -> Optional[Tuple[bytes, Any]]:
        return None if self.value is None else (self.value, self.token)

    def set_state(self, state: bytes, token: Any = None) -> Optional[Tuple[bytes, Any, bool]]:
        if token != self.token:
            return self.value, self.token, False  # type: ignore[return-value]
        self.value, self.token = state, self.token + 1
        return state, self.token, True


def _holder(data: bytes) -> Tuple[Any, _MemoryBackend]:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        RendezvousSettings,
        RendezvousTimeout,
        _BackendRendezvousStateHolder,
    )

    backend = _MemoryBackend(data)
    settings = RendezvousSettings("job", 1, 8, RendezvousTimeout(), _dt.timedelta(seconds=5), 3)
    return _BackendRendezvousStateHolder(backend, settings, cache_duration=0), backend  # type: ignore[arg-type]


@pytest.mark.parametrize("label", _LABELS)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_written_states_load_and_work_in_torch(label: str, protocol: int) -> None:
    state = _state(label)
    state_cls, node_cls = torch_classes()
    data = encode(state, protocol=protocol)
    assert check_writable(data) == state  # the gate every write path uses
    loaded = pickle.loads(data)  # torch's agents: plain pickle.loads, real classes
    assert type(loaded) is state_cls
    for container in (loaded.wait_list, loaded.redundancy_list):
        assert type(container) is set
    assert type(loaded.participants) is dict and type(loaded.last_heartbeats) is dict
    assert all(type(n) is node_cls for n in [*loaded.participants, *loaded.last_heartbeats, *loaded.wait_list])
    late = node_cls("late.cluster.local", 1, 0)
    # What a handler does to the state (_add_to_wait_list, _add_to_redundancy_list, _mark_dead ...).
    loaded.wait_list.add(late)
    loaded.redundancy_list.add(late)
    loaded.redundancy_list.remove(late)
    loaded.last_heartbeats[late] = loaded.deadline or (_dt.datetime.utcnow() if state.naive_datetimes else _dt.datetime.now(UTC))
    del loaded.last_heartbeats[late]
    loaded.wait_list.discard(late)
    again = decode(pickle.dumps(loaded))  # torch re-pickles it (its holder's sync does pickle.dumps)
    assert again == state and again.naive_datetimes == state.naive_datetimes


@pytest.mark.parametrize("label", _AWARE)
def test_torch_state_holder_syncs_sanitizes_and_writes_back(label: str) -> None:
    """torch 2.13's own holder: sync() unpickles our bytes, _sanitize() drops the stale nodes (aware
    datetimes: torch 2.13 compares with datetime.now(timezone.utc)), and its write-back decodes."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _remove_participant_epilogue

    state = _state(label)
    holder, backend = _holder(encode(state))
    holder.sync()
    torch_state = holder.state
    # Fresh heartbeats are 1 s old, stale ones an hour: torch's 15 s expiry splits them either way.
    stale = {n for n, when in state.last_heartbeats.items() if when < _dt.datetime.now(UTC) - _dt.timedelta(minutes=1)}
    assert {(n.addr, n.pid, n.local_id) for n in torch_state.last_heartbeats} == \
        {(n.addr, n.pid, n.local_id) for n in set(state.last_heartbeats) - stale}
    _remove_participant_epilogue(torch_state, holder._settings)
    torch_state.wait_list.add(next(iter(torch_state.last_heartbeats), None) or torch_classes()[1]("x", 1, 0))
    holder.mark_dirty()
    assert holder.sync() is True
    written = check_writable(backend.value)  # what torch wrote back is itself writable by rdzvctl
    assert written.round == torch_state.round and len(written.participants) == len(torch_state.participants)


def test_naive_states_work_with_the_torch_that_wrote_them() -> None:
    """torch < 2.6 compares heartbeats with naive utcnow(); rdzvctl writes such a state back naive."""
    state = next(s for _, s in _written_states() if s.naive_datetimes)
    loaded = pickle.loads(encode(state))
    expire = _dt.datetime.utcnow() - _dt.timedelta(seconds=15)
    assert all(when.tzinfo is None and when > expire for when in loaded.last_heartbeats.values())


# -- what only older torch wrote: read, never written -------------------------------------------------
class _Raw:
    """Pickles as NEWOBJ(cls) + BUILD(fields) with any fields (legacy names, odd containers)."""

    def __init__(self, cls: type, fields: Any) -> None:
        self.cls, self.fields = cls, fields

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return self.cls

    def __reduce_ex__(self, protocol: int) -> Any:
        return (copyreg.__newobj__, (self.cls,), self.fields)


def _raw_state(node_fields: Optional[Dict[str, Any]] = None, state_node: Any = None, **fields: Any) -> bytes:
    state_cls, node_cls = torch_classes()
    node = state_node or _Raw(node_cls, node_fields or {"addr": A.addr, "pid": A.pid, "local_id": A.local_id})
    base: Dict[str, Any] = {"round": 1, "complete": True, "deadline": None, "closed": False,
                            "participants": {node: 0}, "wait_list": set(), "redundancy_list": set(),
                            "last_heartbeats": {node: _dt.datetime(2026, 11, 24, 22, 0, tzinfo=UTC)}}
    base.update(fields)
    return pickle.dumps(_Raw(state_cls, {k: v for k, v in base.items() if v is not _DROP}))


_DROP = object()
_LEGACY = {
    "fqdn for addr": _raw_state(node_fields={"fqdn": A.addr, "pid": A.pid, "local_id": A.local_id}),
    "last_keep_alives for last_heartbeats": _raw_state(last_heartbeats=_DROP, last_keep_alives={}),
    "no redundancy_list (torch < 2.3)": _raw_state(redundancy_list=_DROP),
}


@pytest.mark.parametrize("label", list(_LEGACY))
def test_legacy_states_decode_but_are_not_written(label: str) -> None:
    data = _LEGACY[label]
    state = decode(data)
    with pytest.raises(StateCorruptError, match="older torch"):
        check_writable(data)
    # What rdzvctl writes instead (set/edit/reset re-encode) is today's layout, usable by torch.
    assert check_writable(encode(state)) == state
    assert type(pickle.loads(encode(state)).redundancy_list) is set


# -- what torch cannot use: refused by decode (positive control: torch's own failure) ----------------
def test_frozen_wait_list_breaks_torch_and_is_refused() -> None:
    data = _raw_state(wait_list=frozenset())
    with pytest.raises(AttributeError):
        pickle.loads(data).wait_list.add(torch_classes()[1]("x", 1, 0))
    for field in ("wait_list", "redundancy_list"):
        # refused before unpickling: no state holds a frozenset (and frozensets of ints collide by design)
        with pytest.raises(StateCorruptError, match="holds a frozenset"):
            decode(_raw_state(**{field: frozenset()}))


def test_slot_state_node_fields_fail_inside_torch_pickle_loads_and_are_refused() -> None:
    import dataclasses

    _, node_cls = torch_classes()
    node = _Raw(node_cls, (None, {"addr": A.addr, "pid": A.pid, "local_id": A.local_id}))
    data = _raw_state(state_node=node)
    with pytest.raises(dataclasses.FrozenInstanceError):  # not a PickleError: escapes torch's handling
        pickle.loads(data)
    with pytest.raises(StateUnsafeError, match="slot-state"):
        decode(data)


@pytest.mark.parametrize("value, field", [(10**5000, "round"), (2**63, "round"), (-(2**63) - 1, "pid"),
                                          (10**5000, "pid"), (2**64, "local_id"), (2**63, "rank")],
                         ids=["round-10**5000", "round-2**63", "pid-below-int64", "pid-10**5000", "local_id-2**64",
                              "rank-2**63"])
def test_integers_beyond_64_bits_are_corrupt(value: int, field: str) -> None:
    node = {"addr": A.addr, "pid": A.pid, "local_id": A.local_id}
    if field == "round":
        data = _raw_state(round=value)
    elif field == "rank":
        _, node_cls = torch_classes()
        n = _Raw(node_cls, node)
        data = _raw_state(state_node=n, participants={n: value})
    else:
        data = _raw_state(node_fields={**node, field: value})
    # beyond 64 bits: refused before unpickling; 2^63 (64 bits as LONG1): by the converter
    with pytest.raises(StateCorruptError, match="64-bit|beyond 64 bits"):
        decode(data)


@pytest.mark.parametrize("addr", ["\ud800", "node-\udcff.local", "a\udfff_b"])
def test_addresses_with_lone_surrogates_are_corrupt(addr: str) -> None:
    data = _raw_state(node_fields={"addr": addr, "pid": 1, "local_id": 0})
    assert addr in {n.addr for n in pickle.loads(data).participants}  # torch loads it (and fails later)
    with pytest.raises(StateCorruptError, match="surrogate"):
        decode(data)


def test_every_refusal_is_a_state_error() -> None:
    for data in (_raw_state(wait_list=frozenset()), _raw_state(round=10**5000)):
        with pytest.raises(StateError):
            check_writable(data)


def test_a_build_dict_changed_afterwards_decodes_as_torch_sees_it() -> None:
    """torch's BUILD copies the dict's items: a later SETITEM on the memoised dict changes nothing."""
    import struct

    from rdzvctl.state.codec import TORCH_MODULE

    def text(value: str) -> bytes:
        return pickle.BINUNICODE + struct.pack("<I", len(value)) + value.encode()

    node = (pickle.GLOBAL + f"{TORCH_MODULE}\n_NodeDesc\n".encode() + pickle.EMPTY_TUPLE + pickle.NEWOBJ
            + pickle.EMPTY_DICT + pickle.MARK + text("addr") + text("a") + text("pid") + pickle.BININT1 + b"\x01"
            + text("local_id") + pickle.BININT1 + b"\x00" + pickle.SETITEMS + pickle.BINPUT + b"\xf0" + pickle.BUILD)
    fields = {"round": pickle.BININT1 + b"\x00", "complete": pickle.NEWFALSE, "deadline": pickle.NONE,
              "closed": pickle.NEWFALSE, "participants": pickle.EMPTY_DICT,
              "wait_list": pickle.EMPTY_SET + pickle.MARK + node + pickle.ADDITEMS
              + pickle.BINGET + b"\xf0" + text("addr") + text("b") + pickle.SETITEM + pickle.POP,
              "redundancy_list": pickle.EMPTY_SET, "last_heartbeats": pickle.EMPTY_DICT}
    data = (b"\x80\x04" + pickle.GLOBAL + f"{TORCH_MODULE}\n_RendezvousState\n".encode() + pickle.EMPTY_TUPLE
            + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK + b"".join(text(k) + v for k, v in fields.items())
            + pickle.SETITEMS + pickle.BUILD + pickle.STOP)
    (seen_by_torch,) = pickle.loads(data).wait_list
    assert decode(data).wait_list == {NodeDesc(seen_by_torch.addr, 1, 0)} == {NodeDesc("a", 1, 0)}
