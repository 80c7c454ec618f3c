"""Read and write torch's pickled ``_RendezvousState`` without torch, safely.

Decoding never executes a pickle and only builds what torch's own pickles
build.  An allow-list unpickler resolves exactly the five globals real states
contain (``_RendezvousState``, ``_NodeDesc`` and ``datetime``'s
``datetime``/``timezone``/``timedelta``) and refuses every other global,
persistent id and extension code with :class:`StateUnsafeError`; protocols 2
and 3 also need ``set``/``frozenset`` and ``_codecs.encode`` (latin-1 only).
The torch classes resolve to inert shells whose ``__setstate__`` decides
every ``BUILD``: only a plain dict, only once, only on an instance (a
``BUILD`` on the class object, or a slot-state tuple, which would set
attributes on the allowed classes themselves, is refused).  A shell is
unhashable until built, as torch's frozen ``_NodeDesc`` is.  Before the C
unpickler runs, :mod:`rdzvctl.state.prescan` refuses single opcodes that
would allocate far beyond the input and sizes the C stack for the deepest
tuple nesting the bytes could build; while it runs, its memory is metered
against a budget derived from the input size.

The result is then checked field by field against what torch's agents can
use (container types, ints within 64 bits, text that encodes as UTF-8,
datetimes re-validated: a pickled datetime skips its constructor's checks)
and converted into :class:`RendezvousState`; any malformed input becomes
:class:`StateCorruptError` with the reason.  :func:`decode` also reads what
older torch wrote (``fqdn``, ``last_keep_alives``, no ``redundancy_list``);
:func:`check_writable` is the stricter gate for bytes about to be written.

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
from typing import Any, Dict, Iterable, List, Optional, SupportsIndex, Tuple

from rdzvctl.errors import StateCorruptError, StateUnsafeError
from rdzvctl.state import prescan
from rdzvctl.state.convert import (
    _NO_STATE,
    NODE_CLASS,
    STATE_CLASS,
    _BuiltNode,
    _NodeShell,
    _reason,
    _StateShell,
    convert,
)
from rdzvctl.state.model import NodeDesc, RendezvousState, collector_paused

__all__ = [
    "TORCH_MODULE",
    "ALLOWED_GLOBALS",
    "MAX_STATE_BYTES",
    "decode",
    "check_writable",
    "encode",
    "decode_base64",
    "encode_base64",
]

TORCH_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

#: Refuse states larger than this before unpickling.  Real states are about
#: 90 bytes per node: 4,096 nodes are 356 KiB, 65,536 nodes 5.6 MiB.  16 MiB
#: (about 180,000 nodes) leaves three times the largest job torch's c10d store
#: is used for, and keeps deciding any input within 2 s and 256 MiB: decoding
#: grows memory by about 10x the state (prescan's budget: 12x + 16 MiB).
MAX_STATE_BYTES = 16 * 1024 * 1024

DEFAULT_PROTOCOL = 4  # what torch writes on Python 3.11

class _Narrow:
    """An allowed global that takes only the arguments torch's pickles pass it (BUILD on it is refused)."""

    __slots__ = ()
    _name = ""

    def __setstate__(self, state: Any = _NO_STATE) -> None:
        raise StateUnsafeError(f"the pickle tries to set attributes on {self._name}; refused")

    def _refuse(self) -> StateCorruptError:
        return StateCorruptError(f"the pickle calls {self._name} in a way a rendezvous state never does")


class _Latin1Encode(_Narrow):
    """``_codecs.encode`` as protocols 2-3 use it for bytes, and nothing more."""

    __slots__ = ()
    _name = "_codecs.encode"

    def __call__(self, text: Any, encoding: Any = "latin1") -> bytes:
        if type(text) is not str or encoding not in ("latin1", "latin-1"):
            raise StateCorruptError("the pickle calls _codecs.encode in a way bytes never need")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise StateCorruptError("the pickle calls _codecs.encode in a way bytes never need") from None


_DATETIME = _dt.datetime
_TIMEZONE = _dt.timezone


class _Datetime(_Narrow):
    """``datetime`` as its pickle calls it: its 10-byte payload (bytes; latin-1 text from Python 2) and a timezone."""

    __slots__ = ()
    _name = "datetime.datetime"

    def __call__(self, payload: Any = None, tz: Any = None, *rest: Any) -> _dt.datetime:
        kind = type(payload)
        if (kind is not bytes and kind is not str) or (tz is not None and type(tz) is not _TIMEZONE) or rest:
            raise self._refuse()
        return _DATETIME(payload, tz)  # type: ignore[call-arg, arg-type]  # the pickle form: (payload, tzinfo)


class _Offset(_Narrow):
    """``timedelta`` as a pickled timezone offset calls it: (days, seconds, microseconds), under a day."""

    __slots__ = ()
    _name = "datetime.timedelta"

    def __call__(self, *args: Any) -> _dt.timedelta:
        if len(args) != 3:
            raise self._refuse()
        days, seconds, microseconds = args
        if (type(days) is not int or type(seconds) is not int or type(microseconds) is not int
                or days not in (-1, 0) or not 0 <= seconds < 86400 or not 0 <= microseconds < 1_000_000):
            raise self._refuse()
        return _dt.timedelta(days, seconds, microseconds)


class _NodeSet(_Narrow):
    """``set`` as protocols 2-3 pickle a set of nodes: ``set([node, ...])`` with built nodes only."""

    __slots__ = ()
    _name = "set"

    def __call__(self, *args: Any) -> "set[Any]":
        if len(args) != 1 or type(args[0]) is not list:
            raise self._refuse()
        for item in args[0]:
            if type(item) is not _BuiltNode:
                raise StateCorruptError("the pickle puts something other than a built _NodeDesc into a set "
                                        "of nodes")
        return set(args[0])


ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    (TORCH_MODULE, STATE_CLASS): _StateShell,
    (TORCH_MODULE, NODE_CLASS): _NodeShell,
    ("datetime", "datetime"): _Datetime(),
    ("datetime", "timezone"): _dt.timezone,
    ("datetime", "timedelta"): _Offset(),
    # Protocols 2-3 have no set or bytes opcodes: sets are REDUCE(set, [items])
    # and a datetime's bytes payload is REDUCE(_codecs.encode, (str, "latin1")).
    ("builtins", "set"): _NodeSet(),
    ("__builtin__", "set"): _NodeSet(),
    ("_codecs", "encode"): _Latin1Encode(),
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
    """Decode torch's pickled state (older torch's field names too); raise StateCorruptError or StateUnsafeError."""
    return _decode(data)[0]


def check_writable(data: bytes) -> RendezvousState:
    """The decoded state if torch's agents can load and use ``data`` as it is, else StateCorruptError.

    Stricter than :func:`decode`: what only older torch wrote (legacy field
    names, no ``redundancy_list``) decodes, but is not written, since today's
    agents would fail on it.  Every state :func:`encode` writes passes.
    """
    state, lenient = _decode(data)
    if lenient:
        raise StateCorruptError(f"the bytes are a state only older torch could use ({'; '.join(lenient)}), "
                                "not one today's agents can load")
    return state


def _decode(data: bytes) -> Tuple[RendezvousState, List[str]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateCorruptError(f"the state is {type(data).__name__}, not bytes")
    if len(data) > MAX_STATE_BYTES:
        raise StateCorruptError(f"the state is {len(data):,} bytes, over the {MAX_STATE_BYTES:,}-byte "
                                f"({MAX_STATE_BYTES >> 20} MiB) limit")
    if not data:
        raise StateCorruptError("the state is empty")
    data = bytes(data)
    prescan.scan(data)
    with collector_paused():
        return convert(prescan.call_sized(lambda: _unpickle(data), data))


def _unpickle(data: bytes) -> Any:
    try:
        return _AllowListUnpickler(prescan.MeteredInput(data)).load()
    except (StateUnsafeError, StateCorruptError):
        raise
    except RecursionError:
        raise StateCorruptError("the pickle nests too deeply") from None
    except MemoryError:
        raise StateCorruptError("the pickle asks for more memory than a state can need") from None
    except TypeError as exc:
        if "unhashable type" in str(exc) and "Shell" in str(exc):
            raise StateCorruptError("not a valid pickle: a torch object is used as a key or set item "
                                    "before it is built") from None
        raise StateCorruptError(f"not a valid pickle: {_reason(exc)}") from None
    except Exception as exc:  # every malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise StateCorruptError(f"not a valid pickle: {_reason(exc)}") from None


def decode_base64(text: bytes) -> bytes:
    """Strict standard base64 (what torch's c10d and etcd backends store)."""
    try:
        if type(text) is bytes:  # what b64decode(text, validate=True) calls for bytes, without its wrapper
            return binascii.a2b_base64(text, strict_mode=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise StateCorruptError(f"the stored value is not valid base64: {_reason(exc)}") from exc


def encode_base64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- encoding --------------------------------------------------------------------
class _TorchState:
    """Pickles as torch's ``_RendezvousState``: NEWOBJ(cls, ()) + BUILD(dict)."""

    def __init__(self, fields: Dict[str, Any]) -> None:
        self.fields = fields

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (copyreg.__newobj__, (type(self),), self.fields)  # type: ignore[attr-defined]  # untyped in typeshed


class _TorchNode(_TorchState):
    """Pickles as torch's ``_NodeDesc``."""


_TORCH_NAMES = {_TorchState: (TORCH_MODULE, STATE_CLASS), _TorchNode: (TORCH_MODULE, NODE_CLASS)}


#: The pure-Python pickler (typeshed does not describe it): the one whose ``save_global`` can be overridden.
_PurePickler: Any = pickle._Pickler


class _TorchNamePickler(_PurePickler):  # type: ignore[misc]  # subclasses an untyped base
    """The pure-Python pickler, writing our stand-ins under torch's names.

    (The C pickler cannot: it imports the named module to check the class.)
    """

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        target = _TORCH_NAMES.get(obj)
        if target is None:
            super().save_global(obj, name)
            return
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
