"""What the allow-list unpickler builds, and its conversion into the model.

The torch classes unpickle into shells: ``__setstate__`` takes the BUILD
state (a plain dict, once, on an instance: never the class object, never a
slot-state tuple) and turns the shell into its built, hashable class; an
unbuilt shell is unhashable, like torch's frozen ``_NodeDesc`` without
fields.  :func:`convert` then checks every field against what torch's agents
can use and builds :class:`RendezvousState`, noting what only older torch
wrote (the caller decides whether that is acceptable).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, ClassVar, Dict, List, Optional, Set, Tuple

from rdzvctl.errors import StateCorruptError, StateUnsafeError
from rdzvctl.state.model import STATE_FIELDS, NodeDesc, RendezvousState

__all__ = ["convert"]

STATE_CLASS = "_RendezvousState"
NODE_CLASS = "_NodeDesc"

#: Integers torch's fields hold (round, pid, local_id, rank) fit in 64 bits.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

_NO_STATE = object()
_UTC = _dt.timezone.utc

#: Refuse states with more distinct nodes than this before converting them.  A node can
#: take as little as 36 bytes (one addr, memoised), so 16 MiB could hold 430,000 (2 s of
#: CPU and 350 MiB to convert); 262,144 take about 1.5 s and 205 MiB, and are more than a
#: 16 MiB state of distinct hosts holds (about 180,000).
MAX_NODES = 2**18


class _Shell:
    """Inert stand-in for a torch class while unpickling; the fields land in ``_fields``."""

    __slots__ = ("_fields",)
    _torch_name = ""
    _built: ClassVar[type]  # the class a BUILD turns the shell into

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # NEWOBJ (what torch writes) calls only __new__; REDUCE and OBJ with arguments call the class.
        raise StateCorruptError(f"the pickle calls torch's {self._torch_name} class with arguments, "
                                "which torch's own pickles never do")

    def __setstate__(self, state: Any = _NO_STATE) -> None:
        if state is _NO_STATE or not isinstance(self, _Shell):  # looked up on the class itself
            raise StateUnsafeError("the pickle tries to set attributes on one of torch's classes itself "
                                   "(BUILD on the class object); refused, nothing was changed")
        if type(state) is not dict:
            if type(state) is tuple:
                raise StateUnsafeError(f"the pickle sets {self._torch_name} attributes through a slot-state "
                                       "BUILD, which torch's own pickles never do (torch itself fails on it)")
            raise StateCorruptError(f"a {self._torch_name} is built from {type(state).__name__}, not a dict")
        # Copied, as torch's BUILD copies the items: a later SETITEM on the same dict
        # (fetched from the memo) changes neither torch's object nor ours.
        self._fields = state.copy()
        self.__class__ = self._built


class _Built(_Shell):
    __slots__ = ()
    __hash__ = object.__hash__  # identity, like any object; the fields are compared by the converter

    def __setstate__(self, state: Any = _NO_STATE) -> None:
        if state is _NO_STATE or not isinstance(self, _Shell):
            raise StateUnsafeError("the pickle tries to set attributes on one of torch's classes itself; refused")
        raise StateCorruptError(f"the pickle builds the same {self._torch_name} twice")


class _BuiltState(_Built):
    __slots__ = ()
    _torch_name = STATE_CLASS


class _BuiltNode(_Built):
    __slots__ = ()
    _torch_name = NODE_CLASS


class _StateShell(_Shell):
    """``_RendezvousState`` before its BUILD."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]
    _torch_name = STATE_CLASS
    _built = _BuiltState


class _NodeShell(_Shell):
    """``_NodeDesc`` before its BUILD: unhashable, as torch's frozen dataclass without fields is unusable."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]
    _torch_name = NODE_CLASS
    _built = _BuiltNode


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]



# -- conversion from unpickled shells to the model ------------------------------
_NODE_FIELDS = {"addr", "pid", "local_id"}
_STATE_FIELDS = set(STATE_FIELDS)
# Older torch's names: read and converted, never written.
_LEGACY_STATE_FIELDS = {"last_keep_alives": "last_heartbeats"}
_LEGACY_NODE_FIELDS = {"fqdn": "addr"}


class _Converter:
    def __init__(self) -> None:
        self.nodes: Dict[int, NodeDesc] = {}
        self.naive: Set[bool] = set()
        self.lenient: List[str] = []

    def node(self, obj: Any, where: str) -> NodeDesc:
        cached = self.nodes.get(id(obj))
        if cached is not None:
            return cached
        if type(obj) is not _BuiltNode:
            if type(obj) is _NodeShell:
                raise StateCorruptError(f"{where}: a _NodeDesc without fields (never built)")
            raise StateCorruptError(f"{where}: expected a _NodeDesc, found {_kind(obj)}")
        fields = obj._fields
        if len(fields) == 3:  # fast path: exactly today's three fields, right types
            addr, pid, local_id = fields.get("addr"), fields.get("pid"), fields.get("local_id")
            if (type(addr) is str and addr.isascii() and type(pid) is int and type(local_id) is int
                    and _INT_MIN <= pid <= _INT_MAX and _INT_MIN <= local_id <= _INT_MAX):
                node = self.nodes[id(obj)] = NodeDesc(addr, pid, local_id)
                return node
        fields = _renamed(_fields(fields, where), _LEGACY_NODE_FIELDS, where, self.lenient)
        if set(fields) != _NODE_FIELDS:
            raise StateCorruptError(f"{where}: a _NodeDesc has fields {_names(fields)}, expected addr, pid, local_id")
        addr, pid, local_id = fields["addr"], fields["pid"], fields["local_id"]
        if type(addr) is not str:
            raise StateCorruptError(f"{where}: node addr is {_kind(addr)}, expected str")
        try:
            addr.encode("utf-8")
        except UnicodeEncodeError:
            raise StateCorruptError(f"{where}: a node addr is not valid text (it holds a lone surrogate)") from None
        for label, value in (("pid", pid), ("local_id", local_id)):
            _check_int(value, f"{where}: node {label}")
        node = NodeDesc(addr, pid, local_id)
        self.nodes[id(obj)] = node
        return node

    def time(self, value: Any, where: str, node: Optional[NodeDesc] = None) -> _dt.datetime:
        """A validated aware UTC datetime; ``node`` only labels errors (built on error only: this is hot)."""
        if type(value) is not _dt.datetime:
            raise StateCorruptError(f"{_label(where, node)}: expected a datetime, found {_kind(value)}")
        tz = value.tzinfo
        if tz is not None and type(tz) is not _dt.timezone:
            raise StateCorruptError(f"{_label(where, node)}: a datetime with a {_kind(tz)} time zone")
        # A pickled payload skips the constructor's range checks (day 0, hour 25, ...); replace()
        # builds the datetime again from its fields through the constructor (CPython's
        # datetime_replace calls datetime_new with year..tzinfo and sets fold after), so it makes
        # exactly the constructor's checks, with its messages, in one C call.
        try:
            checked = value.replace(tzinfo=_UTC) if tz is None else value.replace()
        except (ValueError, OverflowError, TypeError) as exc:
            raise StateCorruptError(f"{_label(where, node)}: not a valid datetime: {_reason(exc)}") from None
        if tz is None:
            self.naive.add(True)
            return checked
        self.naive.add(False)
        if tz is _UTC:  # what torch writes (a zero offset unpickles as the utc singleton)
            return checked
        try:
            return checked.astimezone(_dt.timezone.utc)
        except (OverflowError, ValueError) as exc:
            raise StateCorruptError(f"{_label(where, node)}: datetime out of range: {_reason(exc)}") from None

    def node_set(self, value: Any, where: str) -> Set[NodeDesc]:
        if type(value) is not set:
            hint = " (torch's agents add to and remove from it)" if type(value) is frozenset else ""
            raise StateCorruptError(f"{where}: expected a set, found {_kind(value)}{hint}")
        return {self.node(item, where) for item in value}

    def node_map(self, value: Any, where: str) -> Dict[Any, Any]:
        if type(value) is not dict:
            raise StateCorruptError(f"{where}: expected a dict, found {_kind(value)}")
        return value


def _label(where: str, node: Optional[NodeDesc]) -> str:
    return where if node is None else f"{where}[{node}]"


def _kind(value: Any) -> str:
    if isinstance(value, _Shell):
        return value._torch_name if isinstance(value, _Built) else f"a {value._torch_name} never built"
    return type(value).__name__


def _names(fields: Dict[str, Any]) -> str:
    return ", ".join(ascii(name)[1:-1] for name in sorted(fields)[:10]) or "none"


def _check_int(value: Any, label: str) -> None:
    if type(value) is not int:
        raise StateCorruptError(f"{label} is {_kind(value)}, expected int")
    if not _INT_MIN <= value <= _INT_MAX:
        raise StateCorruptError(f"{label} is out of the 64-bit range torch's states hold")


def _fields(fields: Any, where: str) -> Dict[str, Any]:
    if type(fields) is not dict or not all(type(k) is str for k in fields):
        raise StateCorruptError(f"{where}: object without a field dictionary")
    return fields


def _renamed(fields: Dict[str, Any], legacy: Dict[str, str], where: str, lenient: List[str]) -> Dict[str, Any]:
    """``fields`` under today's names; a field present under both names is corrupt."""
    out: Dict[str, Any] = {}
    for key, value in fields.items():
        name = legacy.get(key, key)
        if name in out:
            raise StateCorruptError(f"{where}: the field {name} appears under both its old and new name")
        if name != key:
            note = f"{where} uses the old field name {key} for {name}"
            if note not in lenient:
                lenient.append(note)
        out[name] = value
    return out


def _check_node_count(raw: Dict[str, Any]) -> None:
    containers = [raw[name] for name in ("participants", "last_heartbeats", "wait_list", "redundancy_list")
                  if type(raw[name]) in (dict, set)]
    if sum(len(c) for c in containers) <= MAX_NODES:  # the common case: no node set built
        return
    if len({id(key) for c in containers for key in c}) > MAX_NODES:
        raise StateCorruptError(f"the state holds more than {MAX_NODES:,} nodes, more than rdzvctl decodes")


def convert(obj: Any) -> Tuple[RendezvousState, List[str]]:
    if type(obj) is not _BuiltState:
        what = "a _RendezvousState without fields (never built)" if type(obj) is _StateShell else _kind(obj)
        raise StateCorruptError(f"the pickle holds {what}, not a _RendezvousState")
    conv = _Converter()
    raw = _renamed(_fields(obj._fields, "state"), _LEGACY_STATE_FIELDS, "state", conv.lenient)
    if "redundancy_list" not in raw:  # torch < 2.3
        raw["redundancy_list"] = set()
        conv.lenient.append("the state has no redundancy_list (torch before 2.3)")
    missing = _STATE_FIELDS - set(raw)
    extra = set(raw) - _STATE_FIELDS
    if missing:
        raise StateCorruptError(f"the state lacks the field(s) {', '.join(sorted(missing))}")
    if extra:
        raise StateCorruptError(f"the state has unknown field(s) {_names(dict.fromkeys(extra))}")
    _check_int(raw["round"], "round")
    if raw["round"] < 0:
        raise StateCorruptError(f"round: negative ({raw['round']})")
    for name in ("complete", "closed"):
        if type(raw[name]) is not bool:
            raise StateCorruptError(f"{name}: expected bool, found {_kind(raw[name])}")
    deadline = None if raw["deadline"] is None else conv.time(raw["deadline"], "deadline")

    _check_node_count(raw)
    participants: Dict[NodeDesc, int] = {}
    known = conv.nodes  # a node already converted (by id of the unpickled object) costs no call
    for key, rank in conv.node_map(raw["participants"], "participants").items():
        node = known.get(id(key)) or conv.node(key, "participants")
        if type(rank) is not int or not _INT_MIN <= rank <= _INT_MAX:
            _check_int(rank, f"participants: rank of {node}")
        participants[node] = rank
    heartbeats: Dict[NodeDesc, _dt.datetime] = {}
    for key, when in conv.node_map(raw["last_heartbeats"], "last_heartbeats").items():
        node = known.get(id(key)) or conv.node(key, "last_heartbeats")
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
    return state, conv.lenient
