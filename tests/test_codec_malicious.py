"""Hostile input to the codec: refused with a typed error, never executed, never a crash."""

from __future__ import annotations

import base64
import builtins
import copyreg
import importlib
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdzvctl.errors import StateCorruptError, StateError, StateUnsafeError
from rdzvctl.state import codec
from rdzvctl.state.codec import TORCH_MODULE, decode, decode_base64, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.strategies import UTC

A = NodeDesc("node_a", 4021, 0)

PROTO = pickle.PROTO + bytes([4])


def _str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


# -- payload builders: each would create ``marker`` if it were ever unpickled ------
class _Reduce:
    """An object that pickles as ``func(*args)``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return (self.func, self.args)


def _touch(marker: Path) -> Dict[str, Any]:
    """Ways to create ``marker`` through a REDUCE, by the global they need."""
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.eval": _Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.check_call": _Reduce(subprocess.check_call, ["touch", str(marker)]),
        "builtins.open": _Reduce(builtins.open, str(marker), "w"),
    }


def _torch_shaped_state(**fields: Any) -> Any:
    """A pickle-able object that writes torch's ``_RendezvousState`` global with our fields."""
    return _Shaped("_RendezvousState", {
        "round": 0, "complete": False, "deadline": None, "closed": False, "participants": {},
        "wait_list": set(), "redundancy_list": set(), "last_heartbeats": {}, **fields,
    })


class _FakeState:
    """Stands in for torch's ``_RendezvousState`` (pickled under torch's names by :func:`_dumps`)."""


class _FakeNode:
    """Stands in for torch's ``_NodeDesc``; identity-hashed, so any payload can sit in its fields."""


_FakeState.__module__ = _FakeNode.__module__ = TORCH_MODULE
_FakeState.__qualname__ = _FakeState.__name__ = "_RendezvousState"
_FakeNode.__qualname__ = _FakeNode.__name__ = "_NodeDesc"
_TORCH_CLASSES = {"_RendezvousState": _FakeState, "_NodeDesc": _FakeNode}


def _Shaped(cls_name: str, fields: Dict[str, Any]) -> Any:
    """An object that pickles as NEWOBJ(torch class) + BUILD(fields), without torch."""
    obj = _TORCH_CLASSES[cls_name]()
    obj.__dict__.update(fields)
    return obj


def _dumps(obj: Any, protocol: int) -> bytes:
    """The pure-Python pickler, which writes our stand-in classes under torch's names."""
    import io

    class Pickler(pickle._Pickler):  # type: ignore[name-defined]
        def save_global(self, obj: Any, name: Any = None) -> None:
            if obj in (_FakeState, _FakeNode):
                self.write(pickle.GLOBAL + f"{TORCH_MODULE}\n{obj.__name__}\n".encode())
                self.memoize(obj)
                return
            super().save_global(obj, name)

    buffer = io.BytesIO()
    Pickler(buffer, protocol).dump(obj)
    return buffer.getvalue()


def _node(desc: NodeDesc = A) -> Any:
    return _Shaped("_NodeDesc", {"addr": desc.addr, "pid": desc.pid, "local_id": desc.local_id})


def _hostile_objects(marker: Path) -> List[Tuple[str, Any]]:
    """(label, object) pairs: bare payloads and payloads hidden inside a state."""
    out: List[Tuple[str, Any]] = []
    for name, payload in _touch(marker).items():
        node = _node()
        out.append((f"bare {name}", payload))
        out.append((f"{name} as a participant key", _torch_shaped_state(participants={payload: 0})))
        out.append((f"{name} as a participant rank", _torch_shaped_state(participants={node: payload})))
        out.append((f"{name} as a heartbeat value", _torch_shaped_state(
            participants={node: 0}, last_heartbeats={node: payload})))
        out.append((f"{name} in the wait list", _torch_shaped_state(wait_list={payload})))
        out.append((f"{name} as the deadline", _torch_shaped_state(deadline=payload)))
        out.append((f"{name} as an extra field", _torch_shaped_state(extra=payload)))
        out.append((f"{name} as a node addr", _torch_shaped_state(
            wait_list={_Shaped("_NodeDesc", {"addr": payload, "pid": 1, "local_id": 0})})))
    out.append(("importlib.import_module", _Reduce(importlib.import_module, "colorsys")))
    return out


def _assert_refused_unsafe(data: bytes, marker: Path) -> None:
    modules = set(sys.modules)
    with pytest.raises(StateUnsafeError) as info:
        decode(data)
    assert not marker.exists(), "the payload ran"
    assert set(sys.modules) == modules, "decoding imported a module"
    assert "refused" in str(info.value) or "never does" in str(info.value)


def test_the_payloads_really_run_when_unpickled(tmp_path: Path) -> None:
    """Positive control: the marker check would see a payload that ran."""
    for name in ("os.system", "subprocess.check_call", "builtins.eval"):
        marker = tmp_path / name
        pickle.loads(pickle.dumps(_touch(marker)[name]))
        assert marker.exists(), name


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_reduce_payloads_are_refused_unsafe(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    for label, obj in _hostile_objects(marker):
        data = _dumps(obj, protocol)
        try:
            _assert_refused_unsafe(data, marker)
        except BaseException as exc:
            raise AssertionError(f"{label} (protocol {protocol}): {exc!r}") from exc


def test_unsafe_error_names_the_global(tmp_path: Path) -> None:
    with pytest.raises(StateUnsafeError, match=r"os\.system|posix\.system"):
        decode(pickle.dumps(_touch(tmp_path / "m")["os.system"]))
    assert StateUnsafeError.kind == "unsafe" and StateCorruptError.kind == "corrupt"


def test_inst_opcode_to_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = pickle.MARK + pickle.STRING + f"'touch {marker}'\n".encode() + pickle.INST + b"os\nsystem\n" + pickle.STOP
    assert not marker.exists()
    _assert_refused_unsafe(data, marker)


def test_obj_opcode_to_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = PROTO + pickle.MARK + _global("os", "system") + _str(f"touch {marker}") + pickle.OBJ + pickle.STOP
    _assert_refused_unsafe(data, marker)


def test_stack_global_to_builtins_eval(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()"
    data = (PROTO + _str("builtins") + _str("eval") + pickle.STACK_GLOBAL + _str(code) + pickle.TUPLE1
            + pickle.REDUCE + pickle.STOP)
    _assert_refused_unsafe(data, marker)


@pytest.mark.parametrize("module", ["builtins", "__builtin__", "_codecs", "datetime", "copyreg", TORCH_MODULE])
def test_neighbours_of_allowed_globals_are_refused(tmp_path: Path, module: str) -> None:
    for name in ("getattr", "eval", "__import__", "decode", "sys", "_reconstructor", "dynamic_rendezvous", "os"):
        data = PROTO + _global(module, name) + pickle.STOP
        _assert_refused_unsafe(data, tmp_path / "never")


def test_torch_state_with_an_extra_global(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _assert_refused_unsafe(_dumps(_torch_shaped_state(hook=_Reduce(os.system, f"touch {marker}")), 4), marker)
    # A harmless-looking extra global is refused just the same.
    _assert_refused_unsafe(_dumps(_torch_shaped_state(extra=_Reduce(int, "1")), 4), marker)
    # Without it, the same shape decodes: the refusal is about the global alone.
    assert decode(_dumps(_torch_shaped_state(), 4)) == RendezvousState()


@pytest.mark.parametrize("module", ["os", "posix", "nt"])
def test_reduce_to_system_by_any_module_name(tmp_path: Path, module: str) -> None:
    marker = tmp_path / "ran"
    data = PROTO + _global(module, "system") + _str(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    _assert_refused_unsafe(data, marker)


@pytest.mark.parametrize("data", [
    pickle.PERSID + b"0\n" + pickle.STOP,
    PROTO + _str("x") + pickle.BINPERSID + pickle.STOP,
])
def test_persistent_ids_are_refused(tmp_path: Path, data: bytes) -> None:
    _assert_refused_unsafe(data, tmp_path / "never")


_EXTENSIONS = {  # opcode -> (code, module, name, how the payload calls it)
    pickle.EXT1: (0xF0, "os", "system", "touch {marker}"),
    pickle.EXT2: (0x1F0F, "posix", "system", "touch {marker}"),
    pickle.EXT4: (0x7FFF0000, "builtins", "exec", "open({marker!r}, 'w').close()"),
}


@pytest.fixture()
def extensions() -> Any:
    """Dangerous callables registered as copyreg extension codes, removed afterwards."""
    for code, module, name, _ in _EXTENSIONS.values():
        copyreg.add_extension(module, name, code)
    try:
        yield _EXTENSIONS
    finally:
        for code, module, name, _ in _EXTENSIONS.values():
            copyreg.remove_extension(module, name, code)
        copyreg.clear_extension_cache()


def _ext(opcode: bytes, code: int) -> bytes:
    size = {pickle.EXT1: "<B", pickle.EXT2: "<H", pickle.EXT4: "<i"}[opcode]
    return opcode + struct.pack(size, code)


@pytest.mark.parametrize("cached", [False, True], ids=["registered", "registered-and-cached"])
def test_extension_codes_are_refused(tmp_path: Path, extensions: Dict[bytes, Any], cached: bool) -> None:
    marker = tmp_path / "ran"
    for opcode, (code, _, name, arg) in extensions.items():
        if cached:  # another unpickle in the process resolved the code: the C unpickler caches it
            resolved = pickle.loads(PROTO + _ext(opcode, code) + pickle.STOP)
            assert resolved.__name__ == name
        call = _str(arg.format(marker=str(marker))) + pickle.TUPLE1 + pickle.REDUCE
        _assert_refused_unsafe(PROTO + _ext(opcode, code) + call + pickle.STOP, marker)
        # Hidden inside an otherwise real state, too.
        state = encode(RendezvousState(participants={A: 0}))
        hidden = state[:-1] + pickle.POP + _ext(opcode, code) + call + pickle.POP + pickle.STOP
        _assert_refused_unsafe(hidden, marker)


def test_unregistered_extension_code_is_a_state_error() -> None:
    with pytest.raises(StateError):
        decode(PROTO + _ext(pickle.EXT1, 0xF1) + pickle.STOP)


# -- malformed, not malicious: corrupt ----------------------------------------------
@pytest.mark.parametrize("data, label", [
    (PROTO + _global("datetime", "timedelta") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT
     + _str("x") + pickle.NONE + pickle.SETITEM + pickle.BUILD + pickle.STOP, "BUILD on a timedelta"),
    (PROTO + _global("builtins", "set") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.EMPTY_DICT
     + _str("x") + pickle.NONE + pickle.SETITEM + pickle.BUILD + pickle.STOP, "BUILD on a set"),
    (PROTO + _global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
     + pickle.EMPTY_DICT + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.NONE + pickle.SETITEMS
     + pickle.BUILD + pickle.STOP, "BUILD with a non-string field name"),
    (PROTO + _global(TORCH_MODULE, "_RendezvousState") + _str("x") + pickle.TUPLE1 + pickle.NEWOBJ
     + pickle.STOP, "NEWOBJ with arguments"),
    (PROTO + _global("_codecs", "encode") + _str("é€") + _str("utf-8") + pickle.TUPLE2 + pickle.REDUCE
     + pickle.STOP, "_codecs.encode beyond latin-1"),
    (PROTO + _global("datetime", "timedelta") + pickle.BININT + struct.pack("<i", 10**9) + pickle.TUPLE1
     + pickle.REDUCE + pickle.STOP, "timedelta out of range"),
    (PROTO + pickle.EMPTY_DICT + pickle.EMPTY_LIST + pickle.NONE + pickle.SETITEM + pickle.STOP, "unhashable key"),
    (PROTO + pickle.NEXT_BUFFER + pickle.STOP, "out-of-band buffer"),
    (PROTO + pickle.APPEND + pickle.STOP, "stack underflow"),
    (PROTO + b"\xff" + pickle.STOP, "unknown opcode"),
])
def test_malformed_pickles_are_corrupt(data: bytes, label: str) -> None:
    with pytest.raises(StateCorruptError):
        decode(data)


@pytest.mark.parametrize("data, label", [
    (PROTO + _global(TORCH_MODULE, "_NodeDesc") + pickle.EMPTY_DICT + _str("addr") + _str("a") + pickle.SETITEM
     + pickle.BUILD + pickle.STOP, "BUILD on the class object itself"),
    (PROTO + _global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.NONE
     + pickle.EMPTY_DICT + _str("__class__") + _global(TORCH_MODULE, "_NodeDesc") + pickle.SETITEM
     + pickle.TUPLE2 + pickle.BUILD + pickle.STOP, "BUILD re-classing a state into a node"),
])
def test_builds_that_would_change_classes_are_unsafe(data: bytes, label: str) -> None:
    with pytest.raises(StateUnsafeError):
        decode(data)


@pytest.mark.parametrize("offset, value", [(3, 0), (3, 31), (4, 24), (5, 60), (6, 60), (7, 0xFF)],
                         ids=["day-0", "nov-31", "hour-24", "minute-60", "second-60", "microsecond-too-big"])
@pytest.mark.parametrize("naive", [False, True])
def test_out_of_range_datetime_payloads_are_corrupt(offset: int, value: int, naive: bool) -> None:
    """The pickled datetime payload skips the constructor's range checks: decode must not."""
    import datetime as dt

    when = dt.datetime(2026, 11, 24, 21, 59, 58, 123456, tzinfo=UTC)
    payload = when.__reduce__()[1][0]
    data = encode(RendezvousState(wait_list={A}, last_heartbeats={A: when}, naive_datetimes=naive))
    assert data.count(payload) == 1
    bad = bytearray(payload)
    bad[offset] = value
    with pytest.raises(StateCorruptError, match="datetime"):
        decode(data.replace(payload, bytes(bad)))


def test_every_truncation_of_a_real_state_is_corrupt() -> None:
    import datetime as dt

    data = encode(RendezvousState(
        round=3, complete=True, participants={A: 0, NodeDesc("b", 2, 1): 1},
        last_heartbeats={A: dt.datetime(2026, 1, 1, tzinfo=UTC)},
    ))
    for end in range(len(data)):
        with pytest.raises(StateCorruptError):
            decode(data[:end])


@pytest.mark.parametrize("text", [
    b"not base64!", b"abc", b"YWJj\n", b"YW Jj", b"====", "zzzé", b"\xff\xfe", b"YWJj\x00", "-_-_",
])
def test_non_base64_is_corrupt(text: Any) -> None:
    with pytest.raises(StateCorruptError, match="base64"):
        decode_base64(text)


def test_base64_of_garbage_is_corrupt() -> None:
    for raw in (b"", b"canimadam", os.urandom(64), b"\x80\x04" + os.urandom(32)):
        with pytest.raises(StateCorruptError):
            decode(decode_base64(base64.b64encode(raw)))
    with pytest.raises(StateCorruptError):
        decode_base64(None)  # type: ignore[arg-type]


def test_state_over_the_size_limit_is_refused_before_unpickling() -> None:
    with pytest.raises(StateCorruptError, match="limit"):
        decode(b"\x80\x04" + b"N" * codec.MAX_STATE_BYTES)


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deep_nesting_is_corrupt_without_crashing(depth: int) -> None:
    lists = PROTO + pickle.MARK * depth + pickle.LIST * depth + pickle.STOP
    dicts = PROTO + pickle.EMPTY_DICT + (pickle.NONE + pickle.EMPTY_DICT) * depth + pickle.SETITEM * depth + pickle.STOP
    sets = PROTO + pickle.MARK * depth + pickle.FROZENSET * depth + pickle.STOP
    for data in (lists, dicts, sets):
        with pytest.raises(StateCorruptError):
            decode(data)


_DEEP_TUPLE_SCRIPT = r"""
import pickle, sys
from rdzvctl.errors import StateCorruptError
from rdzvctl.state.codec import decode
depth = int(sys.argv[1])
deep = pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth
memo = pickle.EMPTY_TUPLE + (pickle.TUPLE1 + pickle.MEMOIZE) * depth
cases = {
    "dict key": pickle.EMPTY_DICT + deep + pickle.NONE + pickle.SETITEM,
    "set item": pickle.EMPTY_SET + pickle.MARK + deep + pickle.ADDITEMS,
    "frozenset": pickle.MARK + deep + pickle.FROZENSET,
    "memoised levels": pickle.EMPTY_DICT + memo + pickle.NONE + pickle.SETITEM,
    "marked tuples": pickle.EMPTY_DICT + pickle.MARK * depth + pickle.TUPLE * depth + pickle.NONE + pickle.SETITEM,
    "equal keys": pickle.EMPTY_DICT + deep + pickle.NONE + pickle.SETITEM + deep + pickle.NONE + pickle.SETITEM,
}
for name, body in cases.items():
    try:
        decode(pickle.PROTO + bytes([4]) + body + pickle.STOP)
    except StateCorruptError:
        print("corrupt", name)
"""


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deeply_nested_tuple_keys_are_corrupt_without_crashing(depth: int) -> None:
    """Hashing such a key recurses in C without a guard: it used to kill the process."""
    done = subprocess.run([sys.executable, "-c", _DEEP_TUPLE_SCRIPT, str(depth)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split("\n").count("") == 1 and done.stdout.count("corrupt") == 6, done.stdout


def test_tuple_nesting_is_hashed_on_a_big_enough_stack_or_refused() -> None:
    from rdzvctl.state import prescan

    def keyed(depth: int) -> bytes:
        return PROTO + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * (depth - 1) + pickle.NONE \
            + pickle.SETITEM + pickle.STOP

    # A tuple that is not a call's arguments is refused before unpickling (prescan), so
    # the stack sizing below it is a second line: neither nest reaches the unpickler.
    with pytest.raises(StateCorruptError, match="tuple that is not a call's arguments"):
        decode(keyed(prescan.stack_available() // prescan.BYTES_PER_LEVEL + 1))
    with pytest.raises(StateCorruptError, match="tuple"):
        decode(keyed(prescan.MAX_HELPER_STACK // prescan.BYTES_PER_LEVEL + 1))


def test_large_real_states_fit_the_default_stack() -> None:
    """One TUPLE2 per heartbeat: a 4,096-node state is unpickled on the calling thread (8 MiB stack)."""
    import datetime as dt

    from rdzvctl.state import prescan

    now = dt.datetime.now(dt.timezone.utc)
    state = RendezvousState(round=1, complete=True)
    for i in range(4096):
        node = NodeDesc(f"trainer-{i}.cluster.local", 1000 + i, 0)
        state.participants[node] = i
        state.last_heartbeats[node] = now
    assert prescan.stack_needed(prescan.tuple_depth_bound(codec.encode(state))) <= 8 * 1024 * 1024


@pytest.mark.parametrize("opcode", [pickle.BINBYTES8, pickle.BINUNICODE8, pickle.BYTEARRAY8])
@pytest.mark.parametrize("length", [2**60, 2**63 - 1, 2**40, 2**34])
def test_huge_claimed_lengths_fail_fast_without_memory(opcode: bytes, length: int) -> None:
    data = pickle.PROTO + bytes([5]) + opcode + struct.pack("<Q", length) + b"abc" + pickle.STOP
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(StateCorruptError):
        decode(data)
    assert time.monotonic() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB


@pytest.mark.parametrize("opcode", [pickle.BINBYTES, pickle.BINUNICODE, pickle.LONG4, pickle.BINSTRING])
def test_huge_claimed_4_byte_lengths_fail_fast(opcode: bytes) -> None:
    fmt = "<i" if opcode in (pickle.LONG4, pickle.BINSTRING) else "<I"
    value = 2**31 - 1 if fmt == "<i" else 2**32 - 1
    with pytest.raises(StateCorruptError):
        decode(PROTO + opcode + struct.pack(fmt, value) + b"abc" + pickle.STOP)


# -- fuzz ---------------------------------------------------------------------------
class _RecordingGlobals(dict):
    """The allow-list, recording every name the unpickler asks for."""

    def __init__(self, allowed: Dict[Tuple[str, str], Any]) -> None:
        super().__init__(allowed)
        self.asked: List[Tuple[str, str]] = []

    def __getitem__(self, key: Any) -> Any:
        self.asked.append(key)
        return super().__getitem__(key)


_ALLOWED = dict(codec.ALLOWED_GLOBALS)
_FIND_CLASS = codec._AllowListUnpickler.find_class


def _decode_watched(data: bytes) -> None:
    """Decode; only StateError may escape, only allow-listed globals may resolve, nothing may be imported."""
    recorder = _RecordingGlobals(_ALLOWED)
    resolved: List[Any] = []

    def find_class(self: Any, module: str, name: str) -> Any:
        found = _FIND_CLASS(self, module, name)
        resolved.append(found)
        return found

    modules = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec, "ALLOWED_GLOBALS", recorder)
        patch.setattr(codec._AllowListUnpickler, "find_class", find_class)
        try:
            result = decode(data)
        except StateError:
            result = None
    assert set(sys.modules) == modules, "decoding imported a module"
    allowed_objects = [id(obj) for obj in _ALLOWED.values()]
    assert all(id(obj) in allowed_objects for obj in resolved), resolved
    assert len(resolved) == sum(key in _ALLOWED for key in recorder.asked)
    if result is not None:
        assert isinstance(result, RendezvousState)


FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_OPCODE_BYTES = [op.code.encode("latin-1") for op in __import__("pickletools").opcodes]


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_watched(data)


_OPCODE_SOUP = st.lists(st.sampled_from(_OPCODE_BYTES + [b"\x00", b"\x01", b"\xff" * 4, b"\n", b"os\nsystem\n"]),
                        max_size=32)


@settings(FUZZ, max_examples=1000)
@given(_OPCODE_SOUP)
def test_fuzz_opcode_soup(parts: List[bytes]) -> None:
    _decode_watched(PROTO + b"".join(parts))


def _seed_states() -> List[bytes]:
    """Real encoded states to mutate: every protocol, aware and naive, small and larger."""
    import datetime as dt

    t0 = dt.datetime(2026, 11, 24, 21, 59, 58, 123456, tzinfo=UTC)
    nodes = [NodeDesc(f"node_{i}", 4000 + i, i % 2) for i in range(6)]
    states = [
        RendezvousState(),
        RendezvousState(round=3, complete=True, participants={n: i for i, n in enumerate(nodes[:3])},
                        wait_list={nodes[3]}, redundancy_list={nodes[4]},
                        last_heartbeats={n: t0 + dt.timedelta(seconds=i) for i, n in enumerate(nodes[:5])}),
        RendezvousState(round=1, deadline=t0, participants={nodes[0]: 0}, last_heartbeats={nodes[0]: t0},
                        naive_datetimes=True),
        RendezvousState(round=2**63 - 1, closed=True, wait_list=set(nodes), last_heartbeats={nodes[5]: t0}),
    ]
    return [encode(state, protocol=p) for state in states for p in (2, 3, 4, 5)]


_SEEDS = _seed_states()


@st.composite
def mutated_states(draw: Any) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "opcode", "global"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "opcode":
            data[at:at] = draw(st.sampled_from(_OPCODE_BYTES))
        elif kind == "global":
            module, name = draw(st.sampled_from([("os", "system"), ("builtins", "eval"), ("posix", "system"),
                                                 ("subprocess", "Popen"), ("builtins", "getattr")]))
            data[at:at] = _global(module, name)
    return bytes(data)


@FUZZ
@given(mutated_states())
def test_fuzz_mutated_real_states(data: bytes) -> None:
    _decode_watched(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=128) | st.text(max_size=64))
def test_fuzz_decode_base64_raises_only_corrupt(text: Any) -> None:
    try:
        raw = decode_base64(text)
    except StateCorruptError:
        return
    assert isinstance(raw, bytes)
