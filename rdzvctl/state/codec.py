"""Read and write torch's pickled ``_RendezvousState`` without torch, safely.

Decoding never executes a pickle: an allow-list unpickler resolves exactly the
five globals real states contain (``_RendezvousState``, ``_NodeDesc`` and
``datetime``'s ``datetime``/``timezone``/``timedelta``) and refuses every
other global, persistent id and extension code with :class:`StateUnsafeError`.
The torch classes resolve to inert shells, so the only callables a pickle can
reach are the stdlib datetime constructors (plus ``set``/``frozenset`` and a
latin-1-only ``_codecs.encode``, which protocols 2 and 3 need for sets and bytes).
Two holes of the C unpickler are closed by an opcode walk before it runs
(skipped when it provably cannot matter): extension codes already in
copyreg's cache bypass ``find_class``, and hashing tuples nested very deep
overflows the C stack.  A third one by a lean size check that always runs:
before Python 3.14 a tiny pickle naming a huge memo index (``LONG_BINPUT``,
``PUT``) makes the C unpickler allocate and zero a memo table of that size,
gigabytes for a few bytes (CPython gh-115952), and length fields are
allocated before they are read.  The result is then checked field by field (datetimes
included: a pickled datetime skips its constructor's range checks) and
converted into :class:`RendezvousState`; any malformed input becomes
:class:`StateCorruptError` with the reason.

Encoding uses the pure-Python pickler with stand-in classes that it writes under
torch's module and class names, so torch unpickles real ``_RendezvousState``
and ``_NodeDesc`` objects (same layout as torch's own output: NEWOBJ + BUILD).
"""

from __future__ import annotations

import base64
import binascii
import copyreg
import datetime as _dt
import io
import pickle
import pickletools
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from rdzvctl.errors import StateCorruptError, StateUnsafeError
from rdzvctl.state.model import STATE_FIELDS, NodeDesc, RendezvousState

__all__ = [
    "TORCH_MODULE",
    "ALLOWED_GLOBALS",
    "MAX_STATE_BYTES",
    "decode",
    "encode",
    "decode_base64",
    "encode_base64",
]

TORCH_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"
STATE_CLASS = "_RendezvousState"
NODE_CLASS = "_NodeDesc"

#: Refuse states larger than this before unpickling (real ones are kilobytes;
#: 4,096 nodes are about 400 KiB).
MAX_STATE_BYTES = 64 * 1024 * 1024

DEFAULT_PROTOCOL = 4  # what torch writes on Python 3.11

#: Deepest tuple-in-tuple nesting accepted (real states nest 2 deep).  Hashing a
#: deeper tuple (as a dict key or set item) recurses in C without a recursion
#: guard and can crash the interpreter, so such pickles are refused up front.
MAX_TUPLE_DEPTH = 1000

#: Tuple nesting the C hash is known to survive with a small stack (it crashed
#: between 100,000 and 200,000 levels on an 8 MiB stack); pickles that could
#: nest deeper than this are walked opcode by opcode before unpickling.
SAFE_HASH_DEPTH = 20_000

# Opcodes that build a tuple from stack items: a nesting of depth d needs d of them.
_TUPLE_OPCODES = (pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.TUPLE)
# Opcodes that can reach code without naming a global the allow-list sees:
# extension codes resolved from copyreg's cache skip ``find_class`` entirely.
_UNSAFE_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


class _StateShell:
    """Inert stand-in for ``_RendezvousState`` while unpickling (identity hash)."""

    __slots__ = ("__dict__",)


class _NodeShell:
    """Inert stand-in for ``_NodeDesc`` while unpickling (identity hash)."""

    __slots__ = ("__dict__",)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as protocols 2-3 use it for bytes, and nothing more."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise StateCorruptError("the pickle calls _codecs.encode in a way bytes never need")
    return text.encode("latin-1")


ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    (TORCH_MODULE, STATE_CLASS): _StateShell,
    (TORCH_MODULE, NODE_CLASS): _NodeShell,
    ("datetime", "datetime"): _dt.datetime,
    ("datetime", "timezone"): _dt.timezone,
    ("datetime", "timedelta"): _dt.timedelta,
    # Protocols 2-3 have no set or bytes opcodes: sets are REDUCE(set, [items])
    # and a datetime's bytes payload is REDUCE(_codecs.encode, (str, "latin1")).
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
}


class _AllowListUnpickler(pickle.Unpickler):
    """The C unpickler with every name lookup routed through the allow-list."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise StateUnsafeError(
                f"the pickle asks for the global {module}.{name}, which is not part of a "
                "rendezvous state; refused without executing it"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise StateUnsafeError("the pickle uses a persistent id, which a rendezvous state never does")


def decode(data: bytes) -> RendezvousState:
    """Decode torch's pickled state; raise StateCorruptError or StateUnsafeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateCorruptError(f"the state is {type(data).__name__}, not bytes")
    if len(data) > MAX_STATE_BYTES:
        raise StateCorruptError(f"the state is {len(data)} bytes, over the {MAX_STATE_BYTES}-byte limit")
    if not data:
        raise StateCorruptError("the state is empty")
    data = bytes(data)
    _check_sizes(data)
    if _needs_scan(data):
        _scan(data)
    try:
        obj = _AllowListUnpickler(io.BytesIO(data)).load()
    except StateUnsafeError:
        raise
    except RecursionError:
        raise StateCorruptError("the pickle nests too deeply") from None
    except MemoryError:
        raise StateCorruptError("the pickle asks for more memory than a state can need") from None
    except Exception as exc:  # every malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise StateCorruptError(f"not a valid pickle: {_reason(exc)}") from None
    return _convert(obj)


# Argument kinds of every opcode for _check_sizes: n >= 0 is a fixed-size
# argument; the rest are named below (length-prefixed: -10 - width).
_K_STOP, _K_UNKNOWN, _K_LINE, _K_LINES2, _K_PUT, _K_LONG_BINPUT = -1, -2, -3, -4, -5, -6


def _argument_kinds() -> Tuple[int, ...]:
    prefixed = {pickletools.TAKEN_FROM_ARGUMENT1: -11, pickletools.TAKEN_FROM_ARGUMENT4: -14,
                pickletools.TAKEN_FROM_ARGUMENT4U: -14, pickletools.TAKEN_FROM_ARGUMENT8U: -18}
    kinds = [_K_UNKNOWN] * 256
    for op in pickletools.opcodes:
        if op.name == "STOP":
            kind = _K_STOP
        elif op.name == "PUT":
            kind = _K_PUT
        elif op.name == "LONG_BINPUT":
            kind = _K_LONG_BINPUT
        elif op.arg is None:
            kind = 0
        elif op.arg.n >= 0:
            kind = op.arg.n
        elif op.arg.n == pickletools.UP_TO_NEWLINE:
            kind = _K_LINES2 if op.arg is pickletools.stringnl_noescape_pair else _K_LINE
        else:
            kind = prefixed[op.arg.n]
        kinds[ord(op.code)] = kind
    return tuple(kinds)


_ARGUMENT_KINDS = _argument_kinds()


def _check_sizes(data: bytes) -> None:
    """Refuse memo indices and length fields beyond the size of ``data``, before unpickling.

    A real state's memo indices count its objects and its length fields count
    bytes that follow, so both stay below ``len(data)``; the C unpickler would
    otherwise allocate (and, for the memo, zero) whatever they claim.  A lean
    walk that only skips arguments; anything else malformed is left to the
    unpickler to report.
    """
    end = len(data)
    pos = 0
    kinds = _ARGUMENT_KINDS
    find = data.find
    while pos < end:
        kind = kinds[data[pos]]
        pos += 1
        if kind >= 0:
            pos += kind
        elif kind <= -11:  # length-prefixed (signed 4-byte lengths read unsigned: negative is huge)
            width = -10 - kind
            pos += width + int.from_bytes(data[pos:pos + width], "little")
            if pos > end:
                raise StateCorruptError("not a valid pickle: a length field claims more bytes than the state holds")
        elif kind == _K_LINE:
            pos = find(b"\n", pos) + 1
            if not pos:
                return
        elif kind == _K_LINES2:
            pos = find(b"\n", pos) + 1
            if not pos:
                return
            pos = find(b"\n", pos) + 1
            if not pos:
                return
        elif kind == _K_LONG_BINPUT:
            if int.from_bytes(data[pos:pos + 4], "little") >= end:
                raise StateCorruptError("not a valid pickle: a memo index beyond any object the state holds")
            pos += 4
        elif kind == _K_PUT:
            newline = find(b"\n", pos)
            if newline < 0:
                return
            try:
                index = int(data[pos:newline]) if newline - pos <= 20 else end
            except ValueError:
                return  # the unpickler refuses it
            if index >= end:
                raise StateCorruptError("not a valid pickle: a memo index beyond any object the state holds")
            pos = newline + 1
        else:  # STOP or an unknown opcode: the unpickler takes it from here
            return


def _needs_scan(data: bytes) -> bool:
    """Whether ``data`` could hold something the C unpickler must not see.

    Each level of tuple nesting needs its own tuple-building opcode byte (a
    ``TUPLE`` also needs its own ``MARK``), so this C-speed count bounds the
    deepest nesting the bytes can build.  Below :data:`SAFE_HASH_DEPTH`
    hashing cannot crash, and any nesting deeper than a real state's is then
    refused by the type checks after loading; so every real state, even with
    thousands of nodes (one ``TUPLE2`` per heartbeat), skips the slow walk.
    Without a registered copyreg extension nothing else needs the walk.
    """
    if copyreg._inverted_registry or copyreg._extension_cache:  # type: ignore[attr-defined]
        return True
    bound = data.count(pickle.TUPLE1) + data.count(pickle.TUPLE2) + data.count(pickle.TUPLE3)
    bound += min(data.count(pickle.TUPLE), data.count(pickle.MARK))
    return bound >= SAFE_HASH_DEPTH


def _stack_effect(opcode: Any) -> Tuple[int, int, int]:
    """(items popped below a mark or -1 without one, items popped, items pushed)."""
    before = opcode.stack_before
    below = before.index(pickletools.markobject) if pickletools.markobject in before else -1
    return below, len(before), len(opcode.stack_after)


_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_TUPLES = {"TUPLE": -1, "EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _scan(data: bytes) -> None:
    """Walk the opcodes without building anything (``pickletools.genops``).

    Refuses extension codes and persistent ids (unsafe) and tuples nested
    deeper than :data:`MAX_TUPLE_DEPTH` (corrupt).  The stack is simulated
    only as far as tuple depths go (every other object counts as depth 0),
    with the C unpickler's rules: a mark fences the stack below it.
    """
    stack: List[int] = []
    marks: List[int] = []
    memo: Dict[Any, int] = {}
    fence = 0
    name = ""
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _UNSAFE_OPCODES:
                kind = "an extension code" if name.startswith("EXT") else "a persistent id"
                raise StateUnsafeError(f"the pickle uses {kind}, which a rendezvous state never does")
            if name in _TUPLES:
                size = _TUPLES[name]
                if size < 0:
                    start = marks.pop()
                    fence = marks[-1] if marks else 0
                else:
                    start = len(stack) - size
                    if start < fence:
                        raise ValueError(f"stack underflow at {name}")
                depth = 1 + max(stack[start:], default=0)
                del stack[start:]
                if depth > MAX_TUPLE_DEPTH:
                    raise StateCorruptError(f"the pickle nests tuples over {MAX_TUPLE_DEPTH} deep, which no state does")
                stack.append(depth)
            elif name in _PUTS:
                if len(stack) <= fence:
                    raise ValueError(f"stack underflow at {name}")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in _GETS:
                stack.append(memo.get(arg, 0))
            elif name == "MARK":
                marks.append(len(stack))
                fence = len(stack)
            elif name == "DUP":
                if len(stack) <= fence:
                    raise ValueError("stack underflow at DUP")
                stack.append(stack[-1])
            elif name == "POP" and marks and fence == len(stack):
                marks.pop()  # the C unpickler pops the mark itself here
                fence = marks[-1] if marks else 0
            else:
                below, popped, pushed = _EFFECTS[name]
                if below >= 0:
                    del stack[marks.pop():]
                    fence = marks[-1] if marks else 0
                    popped = below
                if popped:
                    if len(stack) - popped < fence:
                        raise ValueError(f"stack underflow at {name}")
                    del stack[-popped:]
                if pushed:
                    stack.extend((0,) * pushed)
    except (StateUnsafeError, StateCorruptError):
        raise
    except Exception as exc:  # genops: unknown opcode, truncated argument; a mark missing, ...
        raise StateCorruptError(f"not a valid pickle: {_reason(exc)}") from None


def decode_base64(text: bytes) -> bytes:
    """Strict standard base64 (what torch's c10d and etcd backends store)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise StateCorruptError(f"the stored value is not valid base64: {_reason(exc)}") from None


def encode_base64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# -- conversion from unpickled shells to the model ------------------------------
_NODE_FIELDS = {"addr", "pid", "local_id"}
_STATE_FIELDS = set(STATE_FIELDS)
# Pre-release torch names, accepted if seen.
_LEGACY_STATE_FIELDS = {"last_keep_alives": "last_heartbeats"}
_LEGACY_NODE_FIELDS = {"fqdn": "addr"}


class _Converter:
    def __init__(self) -> None:
        self.nodes: Dict[int, NodeDesc] = {}
        self.naive: Set[bool] = set()

    def node(self, obj: Any, where: str) -> NodeDesc:
        if type(obj) is not _NodeShell:
            raise StateCorruptError(f"{where}: expected a _NodeDesc, found {_kind(obj)}")
        cached = self.nodes.get(id(obj))
        if cached is not None:
            return cached
        fields = obj.__dict__
        if type(fields) is dict and len(fields) == 3:  # fast path: exactly today's three fields, right types
            addr, pid, local_id = fields.get("addr"), fields.get("pid"), fields.get("local_id")
            if type(addr) is str and type(pid) is int and type(local_id) is int:
                node = self.nodes[id(obj)] = NodeDesc(addr, pid, local_id)
                return node
        fields = _renamed(_fields(obj, where), _LEGACY_NODE_FIELDS, where)
        if set(fields) != _NODE_FIELDS:
            raise StateCorruptError(f"{where}: a _NodeDesc has fields {sorted(fields)}, expected addr, pid, local_id")
        addr, pid, local_id = fields["addr"], fields["pid"], fields["local_id"]
        if type(addr) is not str:
            raise StateCorruptError(f"{where}: node addr is {_kind(addr)}, expected str")
        for label, value in (("pid", pid), ("local_id", local_id)):
            if type(value) is not int:
                raise StateCorruptError(f"{where}: node {label} is {_kind(value)}, expected int")
        node = NodeDesc(addr, pid, local_id)
        self.nodes[id(obj)] = node
        return node

    def time(self, value: Any, where: str, node: Optional[NodeDesc] = None) -> _dt.datetime:
        """A validated aware UTC datetime; ``node`` only labels errors (built lazily: this is hot)."""

        def label() -> str:
            return where if node is None else f"{where}[{node}]"

        if type(value) is not _dt.datetime:
            raise StateCorruptError(f"{label()}: expected a datetime, found {_kind(value)}")
        try:  # a pickled payload skips the constructor's range checks (day 0, hour 25, ...)
            value = _dt.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                                 value.microsecond, value.tzinfo, fold=value.fold)
        except (ValueError, OverflowError, TypeError) as exc:
            raise StateCorruptError(f"{label()}: not a valid datetime: {_reason(exc)}") from None
        if value.tzinfo is None:
            self.naive.add(True)
            return value.replace(tzinfo=_dt.timezone.utc)
        self.naive.add(False)
        try:
            return value.astimezone(_dt.timezone.utc)
        except (OverflowError, ValueError) as exc:
            raise StateCorruptError(f"{label()}: datetime out of range: {_reason(exc)}") from None

    def node_set(self, value: Any, where: str) -> Set[NodeDesc]:
        if type(value) not in (set, frozenset):
            raise StateCorruptError(f"{where}: expected a set, found {_kind(value)}")
        return {self.node(item, where) for item in value}

    def node_map(self, value: Any, where: str) -> Dict[Any, Any]:
        if type(value) is not dict:
            raise StateCorruptError(f"{where}: expected a dict, found {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    return type(value).__name__


def _fields(obj: Any, where: str) -> Dict[str, Any]:
    fields = getattr(obj, "__dict__", None)
    if type(fields) is not dict or not all(type(k) is str for k in fields):
        raise StateCorruptError(f"{where}: object without a field dictionary")
    return fields


def _renamed(fields: Dict[str, Any], legacy: Dict[str, str], where: str) -> Dict[str, Any]:
    """``fields`` under today's names; a field present under both names is corrupt."""
    out: Dict[str, Any] = {}
    for key, value in fields.items():
        name = legacy.get(key, key)
        if name in out:
            raise StateCorruptError(f"{where}: the field {name} appears under both its old and new name")
        out[name] = value
    return out


def _convert(obj: Any) -> RendezvousState:
    if type(obj) is not _StateShell:
        raise StateCorruptError(f"the pickle holds {_kind(obj)}, not a _RendezvousState")
    raw = _renamed(_fields(obj, "state"), _LEGACY_STATE_FIELDS, "state")
    raw.setdefault("redundancy_list", set())  # torch < 2.3
    missing = _STATE_FIELDS - set(raw)
    extra = set(raw) - _STATE_FIELDS
    if missing:
        raise StateCorruptError(f"the state lacks the field(s) {', '.join(sorted(missing))}")
    if extra:
        raise StateCorruptError(f"the state has unknown field(s) {', '.join(sorted(extra))}")
    conv = _Converter()
    for name in ("round",):
        if type(raw[name]) is not int:
            raise StateCorruptError(f"{name}: expected int, found {_kind(raw[name])}")
    if raw["round"] < 0:
        raise StateCorruptError(f"round: negative ({raw['round']})")
    for name in ("complete", "closed"):
        if type(raw[name]) is not bool:
            raise StateCorruptError(f"{name}: expected bool, found {_kind(raw[name])}")
    deadline = None if raw["deadline"] is None else conv.time(raw["deadline"], "deadline")

    participants: Dict[NodeDesc, int] = {}
    for key, rank in conv.node_map(raw["participants"], "participants").items():
        node = conv.node(key, "participants")
        if type(rank) is not int:
            raise StateCorruptError(f"participants: rank of {node} is {_kind(rank)}, expected int")
        participants[node] = rank
    heartbeats: Dict[NodeDesc, _dt.datetime] = {}
    for key, when in conv.node_map(raw["last_heartbeats"], "last_heartbeats").items():
        node = conv.node(key, "last_heartbeats")
        heartbeats[node] = conv.time(when, "last_heartbeats", node)
    state = RendezvousState(
        round=raw["round"],
        complete=raw["complete"],
        deadline=deadline,
        closed=raw["closed"],
        participants=participants,
        wait_list=conv.node_set(raw["wait_list"], "wait_list"),
        redundancy_list=conv.node_set(raw["redundancy_list"], "redundancy_list"),
        last_heartbeats=heartbeats,
    )
    if conv.naive == {True, False}:
        raise StateCorruptError(
            "the state mixes naive and timezone-aware datetimes, which torch cannot compare"
        )
    state.naive_datetimes = conv.naive == {True}
    return state


# -- encoding --------------------------------------------------------------------
class _TorchState:
    """Pickles as torch's ``_RendezvousState``: NEWOBJ(cls, ()) + BUILD(dict)."""

    def __init__(self, fields: Dict[str, Any]) -> None:
        self.fields = fields

    def __reduce_ex__(self, protocol: int) -> Any:
        return (copyreg.__newobj__, (type(self),), self.fields)


class _TorchNode(_TorchState):
    """Pickles as torch's ``_NodeDesc``."""


_TORCH_NAMES = {_TorchState: (TORCH_MODULE, STATE_CLASS), _TorchNode: (TORCH_MODULE, NODE_CLASS)}


class _TorchNamePickler(pickle._Pickler):  # type: ignore[name-defined]
    """The pure-Python pickler, writing our stand-ins under torch's names.

    (The C pickler cannot: it imports the named module to check the class.)
    """

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        target = _TORCH_NAMES.get(obj)
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        self.memoize(obj)


def encode(state: RendezvousState, protocol: int = DEFAULT_PROTOCOL) -> bytes:
    """Bytes that torch unpickles into its own ``_RendezvousState`` with equal fields."""
    if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise ValueError(f"pickle protocol {protocol} is not supported (2..{pickle.HIGHEST_PROTOCOL})")
    nodes: Dict[NodeDesc, _TorchNode] = {}

    def node(desc: NodeDesc) -> _TorchNode:
        found = nodes.get(desc)
        if found is None:
            found = nodes[desc] = _TorchNode(
                {"addr": desc.addr, "pid": desc.pid, "local_id": desc.local_id}
            )
        return found

    def when(value: Optional[_dt.datetime]) -> Optional[_dt.datetime]:
        if value is None:
            return None
        value = value.astimezone(_dt.timezone.utc) if value.tzinfo else value
        return value.replace(tzinfo=None) if state.naive_datetimes else value.replace(tzinfo=_dt.timezone.utc)

    # Node objects are shared (memoised) across the containers, like torch's own output.
    fields = {
        "round": int(state.round),
        "complete": bool(state.complete),
        "deadline": when(state.deadline),
        "closed": bool(state.closed),
        "participants": {node(n): int(r) for n, r in _sorted_items(state.participants)},
        "wait_list": {node(n) for n in sorted(state.wait_list)},
        "redundancy_list": {node(n) for n in sorted(state.redundancy_list)},
        "last_heartbeats": {node(n): when(t) for n, t in _sorted_items(state.last_heartbeats)},
    }
    buffer = io.BytesIO()
    _TorchNamePickler(buffer, protocol).dump(_TorchState(fields))
    return buffer.getvalue()


def _sorted_items(mapping: Dict[NodeDesc, Any]) -> Iterable[Tuple[NodeDesc, Any]]:
    return sorted(mapping.items(), key=lambda item: item[0])
