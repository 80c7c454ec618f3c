"""A corpus of malicious pickles, built at test time so each one aims at a fresh marker file.

Every payload is raw pickle bytes.  ``live`` payloads create their marker file
when given to plain ``pickle.loads`` (the test proves it in a subprocess, so
the corpus cannot rot into harmless bytes); the others attack the decoder
itself (memo tricks, BUILD on the wrong objects, malformed allowed globals)
and must be refused without crashing.  rdzvctl's decoder must refuse every
one with a ``StateError`` and create no marker.

Kinds: REDUCE to os/posix/subprocess/builtins/importlib/runpy/pty/...;
the same through GLOBAL, STACK_GLOBAL, INST and OBJ; BUILD on unexpected
objects and ``__setstate__`` holders; persistent ids; extension codes (with
and without a registered, cached extension); memo tricks; torch-shaped states
hiding a payload in a field; protocol 5 buffers; the allowed globals misused.

:func:`trust_payloads` adds what decodes under a plain allow-list but must
not: BUILDs that change the allowed classes themselves (``__hash__``,
``__del__`` set on ``_NodeDesc`` through a slot-state BUILD on the class
object), states torch's agents cannot use (slot-state node fields,
frozensets, unbuilt or twice-built nodes), integers beyond 64 bits and lone
surrogates.  :func:`resource_payloads` are floods of cheap opcodes at a given
size and :func:`deep_tuple_payloads` tuple nests for small stacks.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Tuple

from rdzvctl.state.codec import TORCH_MODULE

__all__ = ["Payload", "build_corpus", "EXTENSION_CODE", "trust_payloads", "resource_payloads", "deep_tuple_payloads",
           "hash_flood_payloads", "node_hash_flood"]

#: The copyreg extension code the EXT payloads use (registered by the test, to os.system).
EXTENSION_CODE = 0x7A11


@dataclass(frozen=True)
class Payload:
    name: str
    data: bytes
    marker: str  # the file it creates if executed ("" if it creates none)
    live: bool  # plain pickle.loads runs it (creates ``marker``)
    needs_extension: bool = False  # live only with EXTENSION_CODE registered to os.system


def _str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


P2 = pickle.PROTO + b"\x02"
P4 = pickle.PROTO + b"\x04"
P5 = pickle.PROTO + b"\x05"


def _call(func: bytes, *args: bytes) -> bytes:
    """REDUCE ``func`` with positional ``args`` (each already pickled)."""
    return func + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def _list(*items: bytes) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(items) + pickle.APPENDS


def _shell(fields: bytes) -> bytes:
    """torch's _RendezvousState NEWOBJ + BUILD with the given pickled field dict."""
    return (_global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + fields + pickle.BUILD)


def _fields(**values: bytes) -> bytes:
    base = {"round": pickle.BININT1 + b"\x00", "complete": pickle.NEWFALSE, "deadline": pickle.NONE,
            "closed": pickle.NEWFALSE, "participants": pickle.EMPTY_DICT, "wait_list": pickle.EMPTY_SET,
            "redundancy_list": pickle.EMPTY_SET, "last_heartbeats": pickle.EMPTY_DICT}
    base.update(values)
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(k) + v for k, v in base.items()) + pickle.SETITEMS


def build_corpus(markers: Path) -> List[Payload]:
    """Every payload, each aimed at its own file under ``markers``."""
    out: List[Payload] = []

    def add(name: str, body: bytes, live: bool = True, header: bytes = P2, extension: bool = False) -> None:
        out.append(Payload(name, header + body + pickle.STOP, str(markers / name), live, extension))

    def touch(name: str) -> str:
        return f"touch {markers / name}"

    def pyopen(name: str) -> str:
        return f"open({str(markers / name)!r}, 'w').close()"

    # -- REDUCE through GLOBAL to every usual way of running code ----------------------------
    for module in ("os", "posix"):
        name = f"reduce-{module}.system"
        add(name, _call(_global(module, "system"), _str(touch(name))))
    name = "reduce-os.popen"
    add(name, _call(_global("os", "popen"), _str(touch(name))))
    for func in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        name = f"reduce-subprocess.{func}"
        command = _str(touch(name)) if func.startswith("get") else _list(_str("touch"), _str(str(markers / name)))
        add(name, _call(_global("subprocess", func), command))
    for func in ("eval", "exec"):
        name = f"reduce-builtins.{func}"
        add(name, _call(_global("builtins", func), _str(pyopen(name))))
        name = f"reduce-__builtin__.{func}"  # protocol 2 spelling, mapped by fix_imports
        add(name, _call(_global("__builtin__", func), _str(pyopen(name))))
    name = "reduce-builtins.open"
    add(name, _call(_global("builtins", "open"), _str(str(markers / name)), _str("w")))
    name = "reduce-builtins.compile+exec"
    code = _call(_global("builtins", "compile"), _str(pyopen(name)), _str("<x>"), _str("exec"))
    add(name, _call(_global("builtins", "exec"), code))
    name = "reduce-importlib.import_module+getattr"
    os_module = _call(_global("importlib", "import_module"), _str("os"))
    system = _call(_global("builtins", "getattr"), os_module, _str("system"))
    add(name, system + pickle.MARK + _str(touch(name)) + pickle.TUPLE + pickle.REDUCE)
    name = "reduce-builtins.__import__+getattr"
    os_module = _call(_global("builtins", "__import__"), _str("os"))
    system = _call(_global("builtins", "getattr"), os_module, _str("system"))
    add(name, system + pickle.MARK + _str(touch(name)) + pickle.TUPLE + pickle.REDUCE)
    name = "reduce-runpy._run_code"
    add(name, _call(_global("runpy", "_run_code"), _str(pyopen(name)), pickle.EMPTY_DICT))
    name = "reduce-pty.spawn"
    add(name, _call(_global("pty", "spawn"), _list(_str("touch"), _str(str(markers / name)))))
    name = "reduce-code.InteractiveInterpreter.runsource"  # class + attribute path
    add(name, _call(_global("code", "InteractiveInterpreter.runsource"),
                    _call(_global("code", "InteractiveInterpreter")), _str(pyopen(name))), live=False)
    name = "reduce-timeit.timeit"
    add(name, _call(_global("timeit", "timeit"), _str(pyopen(name)), _str("pass"), _str("time.perf_counter"),
                    pickle.BININT1 + b"\x01"), live=False)

    # -- the same through STACK_GLOBAL (protocol 4), INST and OBJ --------------------------------
    name = "stack_global-os.system"
    add(name, _call(_stack_global("os", "system"), _str(touch(name))), header=P4)
    name = "stack_global-builtins.eval"
    add(name, _call(_stack_global("builtins", "eval"), _str(pyopen(name))), header=P4)
    name = "inst-os.system"
    add(name, pickle.MARK + _str(touch(name)) + pickle.INST + b"os\nsystem\n")
    name = "obj-os.system"
    add(name, pickle.MARK + _global("os", "system") + _str(touch(name)) + pickle.OBJ)
    name = "obj-subprocess.Popen"
    add(name, pickle.MARK + _global("subprocess", "Popen") + _list(_str("touch"), _str(str(markers / name)))
        + pickle.OBJ)
    name = "newobj-subprocess.Popen"  # NEWOBJ only calls __new__: not live, still refused
    add(name, _global("subprocess", "Popen") + pickle.MARK + _list(_str("touch"), _str(str(markers / name)))
        + pickle.TUPLE + pickle.NEWOBJ, live=False)

    # -- hidden inside a torch-shaped state ------------------------------------------------------
    name = "state-field-os.system"
    add(name, _shell(_fields(round=_call(_global("os", "system"), _str(touch(name))))), live=False)
    name = "state-node-addr-eval"
    node = (_global(TORCH_MODULE, "_NodeDesc") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK
            + _str("addr") + _call(_global("builtins", "eval"), _str(pyopen(name))) + _str("pid")
            + pickle.BININT1 + b"\x01" + _str("local_id") + pickle.BININT1 + b"\x00" + pickle.SETITEMS + pickle.BUILD)
    add(name, _shell(_fields(participants=pickle.EMPTY_DICT + node + pickle.BININT1 + b"\x00" + pickle.SETITEM)),
        live=False)
    name = "state-heartbeat-subprocess"
    add(name, _shell(_fields(deadline=_call(_global("subprocess", "check_call"),
                                            _list(_str("touch"), _str(str(markers / name)))))), live=False)
    name = "state-dunder-module-name"  # a near miss of the allowed class name
    add(name, _call(_global(TORCH_MODULE + ".os", "system"), _str(touch(name))), live=False)
    name = "state-class-attribute"
    add(name, _global(TORCH_MODULE, "_RendezvousState.__reduce_ex__"), live=False)

    # -- BUILD on unexpected objects --------------------------------------------------------------
    name = "build-setstate-holder"  # BUILD calls __setstate__ when the object has one
    add(name, _call(_global("collections", "OrderedDict")) + _fields() + pickle.BUILD, live=False)
    name = "build-on-datetime"
    add(name, _call(_global("datetime", "timedelta"), pickle.BININT1 + b"\x01") + _fields() + pickle.BUILD,
        live=False)
    name = "build-class-swap"  # slot state that tries to turn the shell into another class
    add(name, _global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.NONE
        + pickle.EMPTY_DICT + _str("__class__") + _global("datetime", "timezone") + pickle.SETITEM + pickle.TUPLE2
        + pickle.BUILD, live=False)
    name = "build-dict-replaced-by-global"
    add(name, _global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        + pickle.EMPTY_DICT + _str("__dict__") + _global("os", "environ") + pickle.SETITEM + pickle.BUILD, live=False)
    name = "build-on-set-allowed-global"
    add(name, _global("builtins", "set") + _fields() + pickle.BUILD, live=False)

    # -- persistent ids and extension codes ---------------------------------------------------------
    name = "persid"
    add(name, pickle.PERSID + b"os.system\n", live=False)
    name = "binpersid"
    add(name, _str(touch(name)) + pickle.BINPERSID, live=False)
    for opcode, arg in ((pickle.EXT2, struct.pack("<H", EXTENSION_CODE)), (pickle.EXT4, struct.pack("<i", EXTENSION_CODE))):
        name = f"ext-{opcode.hex()}-os.system"
        add(name, opcode + arg + pickle.MARK + _str(touch(name)) + pickle.TUPLE + pickle.REDUCE, extension=True)

    # -- memo tricks -------------------------------------------------------------------------------------
    name = "memo-get-undefined"
    add(name, pickle.BINGET + b"\x07", live=False)
    name = "memo-long-get-huge"
    add(name, pickle.LONG_BINGET + b"\xff\xff\xff\x7f", live=False)
    name = "memo-long-put-huge"  # CPython gh-115952: a huge memo table for a few bytes
    add(name, pickle.EMPTY_LIST + pickle.LONG_BINPUT + b"\xff\xff\xff\x7f", live=False)
    name = "memo-put-huge-text"
    add(name, pickle.EMPTY_LIST + pickle.PUT + b"99999999999\n", live=False)
    name = "memo-codecs-encode-rot13"  # the allowed _codecs.encode, memoised, called beyond latin-1
    add(name, _global("_codecs", "encode") + pickle.BINPUT + b"\x00" + pickle.POP + pickle.BINGET + b"\x00"
        + pickle.MARK + _str("touch") + _str("rot13") + pickle.TUPLE + pickle.REDUCE, live=False)
    name = "memo-self-referencing-state"
    add(name, _global(TORCH_MODULE, "_RendezvousState") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.BINPUT
        + b"\x01" + _fields(participants=pickle.EMPTY_DICT + pickle.BINGET + b"\x01" + pickle.BININT1 + b"\x00"
                            + pickle.SETITEM) + pickle.BUILD, live=False)
    name = "memo-recursive-list"
    add(name, _shell(_fields(wait_list=pickle.EMPTY_LIST + pickle.BINPUT + b"\x05" + pickle.BINGET + b"\x05"
                             + pickle.APPEND)), live=False)

    # -- allowed globals misused -------------------------------------------------------------------------
    name = "datetime-huge-timedelta"
    add(name, _call(_global("datetime", "timedelta"), pickle.LONG1 + b"\x08" + b"\xff" * 7 + b"\x7f"), live=False)
    name = "datetime-timezone-out-of-range"
    add(name, _call(_global("datetime", "timezone"), _call(_global("datetime", "timedelta"),
                                                           pickle.BININT1 + b"\x02")), live=False)
    name = "set-of-unhashable"
    add(name, _call(_global("builtins", "set"), _list(pickle.EMPTY_LIST)), live=False)

    # -- protocol 5 buffers and oddities -------------------------------------------------------------------
    name = "next-buffer-without-buffers"
    add(name, pickle.NEXT_BUFFER, live=False, header=P5)
    name = "readonly-buffer-on-list"
    add(name, pickle.EMPTY_LIST + pickle.READONLY_BUFFER, live=False, header=P5)
    name = "frame-huge"
    add(name, pickle.FRAME + struct.pack("<Q", 2**62) + pickle.NONE, live=False, header=P4)
    name = "bytes8-huge"
    add(name, pickle.BINBYTES8 + struct.pack("<Q", 2**40), live=False, header=P4)
    for name, _, data in trust_payloads():
        out.append(Payload(name, data, "", False))
    return out


# -- what a plain allow-list lets through ------------------------------------------------------------------
def _real_state() -> bytes:
    """A small real state (rdzvctl's encoder), without its STOP, to append opcodes to."""
    from rdzvctl.state.codec import encode
    from rdzvctl.state.model import NodeDesc, RendezvousState

    node = NodeDesc("node-a", 1, 0)
    return encode(RendezvousState(round=1, complete=True, participants={node: 0}))[:-1]


def _node(fields: bytes) -> bytes:
    return _global(TORCH_MODULE, "_NodeDesc") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + fields + pickle.BUILD


def _dict(*items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(items) + pickle.SETITEMS


_NODE_OK = _dict(_str("addr"), _str("a"), _str("pid"), pickle.BININT1 + b"\x01", _str("local_id"), pickle.BININT1 + b"\x00")


def _on_class(target: bytes, attribute: str, value: bytes) -> bytes:
    """After a real state: BUILD ``target`` (a global) with the slot state ``(None, {attribute: value})``."""
    return (_real_state() + target + pickle.NONE + pickle.EMPTY_DICT + _str(attribute) + value + pickle.SETITEM
            + pickle.TUPLE2 + pickle.BUILD + pickle.POP + pickle.STOP)


def _long(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return (pickle.LONG1 + bytes([len(raw)]) if len(raw) < 256 else pickle.LONG4 + struct.pack("<i", len(raw))) + raw


def _surrogate(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def trust_payloads() -> List[Tuple[str, str, bytes]]:
    """(name, kind, bytes): kind is ``class-mutation``, ``unusable`` or ``edge``; each must be refused."""
    node_cls = _global(TORCH_MODULE, "_NodeDesc")
    state_cls = _global(TORCH_MODULE, "_RendezvousState")
    codecs_encode = _global("_codecs", "encode")
    out = [
        # 1. BUILD on an allowed class object: the C unpickler's slot-state path sets class attributes.
        ("class-node-hash-none", "class-mutation", _on_class(node_cls, "__hash__", pickle.NONE)),
        ("class-node-del-codecs", "class-mutation", _on_class(node_cls, "__del__", codecs_encode)),
        ("class-node-eq-none", "class-mutation", _on_class(node_cls, "__eq__", pickle.NONE)),
        ("class-state-init-none", "class-mutation", _on_class(state_cls, "__init__", pickle.NONE)),
        ("class-node-setstate-none", "class-mutation", _on_class(node_cls, "__setstate__", pickle.NONE)),
        ("class-node-dict-state", "class-mutation", _real_state() + node_cls + _dict(_str("__hash__"), pickle.NONE)
         + pickle.BUILD + pickle.POP + pickle.STOP),
        # (a tuple as the value, as __defaults__ wants, is refused before unpickling: not a call's arguments)
        ("class-codecs-defaults", "class-mutation", _on_class(codecs_encode, "__defaults__", _str("rot13"))),
        ("class-set-attribute", "class-mutation", _on_class(_global("builtins", "set"), "add", pickle.NONE)),
        ("class-datetime-attribute", "class-mutation", _on_class(_global("datetime", "datetime"), "now",
                                                                 pickle.NONE)),
        ("class-node-via-stack-global", "class-mutation", _on_class(
            _stack_global(TORCH_MODULE, "_NodeDesc"), "__hash__", pickle.NONE)),
        # 2. decodes under a plain allow-list, but torch's agents cannot use it.
        ("unusable-node-slot-state", "unusable", _shell(_fields(participants=pickle.EMPTY_DICT + node_cls
                                                                + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.NONE
                                                                + _NODE_OK + pickle.TUPLE2 + pickle.BUILD
                                                                + pickle.BININT1 + b"\x00" + pickle.SETITEM))),
        ("unusable-frozen-wait-list", "unusable", _shell(_fields(
            wait_list=pickle.MARK + _node(_NODE_OK) + pickle.FROZENSET))),
        ("unusable-frozen-redundancy-list", "unusable", _shell(_fields(
            redundancy_list=pickle.MARK + pickle.FROZENSET))),
        ("unusable-wait-list-as-list", "unusable", _shell(_fields(wait_list=pickle.EMPTY_LIST))),
        ("unusable-unbuilt-node-key", "unusable", _shell(_fields(participants=pickle.EMPTY_DICT + node_cls
                                                                 + pickle.EMPTY_TUPLE + pickle.NEWOBJ
                                                                 + pickle.BININT1 + b"\x00" + pickle.SETITEM))),
        ("unusable-node-built-twice", "unusable", _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK
                                                                 + _node(_NODE_OK) + _NODE_OK + pickle.BUILD
                                                                 + pickle.ADDITEMS))),
        ("unusable-node-reduce", "unusable", _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK + node_cls
                                                            + _str("a") + pickle.BININT1 + b"\x01"
                                                            + pickle.BININT1 + b"\x00" + pickle.TUPLE3
                                                            + pickle.REDUCE + pickle.ADDITEMS))),
        ("unusable-state-built-twice", "unusable", _shell(_fields()) + _fields() + pickle.BUILD),
        ("unusable-state-list-state", "unusable", state_cls + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_LIST
         + pickle.BUILD),
        ("unusable-state-class-itself", "unusable", state_cls),
        # 4. "internal error" material: ints beyond 64 bits, lone surrogates.
        ("edge-round-10**5000", "edge", _shell(_fields(round=_long(10**5000)))),
        ("edge-round-2**63", "edge", _shell(_fields(round=_long(2**63)))),
        ("edge-pid-10**5000", "edge", _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK + _node(_dict(
            _str("addr"), _str("a"), _str("pid"), _long(10**5000), _str("local_id"), pickle.BININT1 + b"\x00"))
            + pickle.ADDITEMS))),
        ("edge-rank-2**64", "edge", _shell(_fields(participants=pickle.EMPTY_DICT + _node(_NODE_OK) + _long(2**64)
                                                   + pickle.SETITEM))),
        ("edge-addr-lone-surrogate", "edge", _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK + _node(_dict(
            _str("addr") + _surrogate("node-\udcff"), _str("pid"), pickle.BININT1 + b"\x01", _str("local_id"),
            pickle.BININT1 + b"\x00")) + pickle.ADDITEMS))),
        ("edge-addr-high-surrogate", "edge", _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK + _node(_dict(
            _str("addr") + _surrogate("\ud800"), _str("pid"), pickle.BININT1 + b"\x01", _str("local_id"),
            pickle.BININT1 + b"\x00")) + pickle.ADDITEMS))),
    ]
    return [(name, kind, data if data.endswith(pickle.STOP) and kind == "class-mutation" else P4 + data + pickle.STOP)
            for name, kind, data in out]


def resource_payloads(size: int) -> Iterator[Tuple[str, bytes]]:
    """Floods of opcodes that are cheap to write and costly to build, each about ``size`` bytes (made one at a time)."""
    def fill(unit: bytes, head: bytes = b"") -> bytes:
        return P4 + head + unit * ((size - len(head) - 3) // len(unit)) + pickle.STOP

    set_global = _global("builtins", "set") + pickle.BINPUT + b"\x00"
    units = [
        ("flood-empty-set", lambda: fill(pickle.EMPTY_SET)),
        ("flood-empty-dict", lambda: fill(pickle.EMPTY_DICT)),
        ("flood-empty-list", lambda: fill(pickle.EMPTY_LIST)),
        ("flood-mark-frozenset", lambda: fill(pickle.MARK + pickle.FROZENSET)),
        ("flood-set-reduce", lambda: fill(pickle.BINGET + b"\x00" + pickle.EMPTY_TUPLE + pickle.REDUCE, set_global)),
        ("flood-short-strings", lambda: fill(pickle.SHORT_BINUNICODE + b"\x03abc")),
        ("flood-none", lambda: fill(pickle.NONE)),
        ("flood-memoize", lambda: fill(pickle.MEMOIZE, pickle.NONE)),
        ("flood-tuple1", lambda: fill(pickle.TUPLE1, pickle.EMPTY_TUPLE)),
        ("flood-nodes", lambda: fill(pickle.BINGET + b"\x00" + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
                             _global(TORCH_MODULE, "_NodeDesc") + pickle.BINPUT + b"\x00")),
        ("flood-datetimes", lambda: fill(pickle.BINGET + b"\x00" + pickle.SHORT_BINBYTES + b"\x0a" + b"\x07\xea\x0b\x18\x15"
                                 + b"\x3b\x3a\x01\xe2\x40" + pickle.TUPLE1 + pickle.REDUCE,
                                 _global("datetime", "datetime") + pickle.BINPUT + b"\x00")),
    ]
    for name, make in units:
        yield name, make()


def deep_tuple_payloads(depth: int) -> List[Tuple[str, bytes]]:
    """Tuples nested ``depth`` deep, hashed as a dict key, a set item, a frozenset item and via the memo."""
    deep = pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth
    memo = pickle.EMPTY_TUPLE + (pickle.TUPLE1 + pickle.MEMOIZE) * depth
    bodies = {
        "dict-key": pickle.EMPTY_DICT + deep + pickle.NONE + pickle.SETITEM,
        "set-item": pickle.EMPTY_SET + pickle.MARK + deep + pickle.ADDITEMS,
        "frozenset-item": pickle.MARK + deep + pickle.FROZENSET,
        "memoised-levels": pickle.EMPTY_DICT + memo + pickle.NONE + pickle.SETITEM,
        "marked-tuples": pickle.EMPTY_DICT + pickle.MARK * depth + pickle.TUPLE * depth + pickle.NONE + pickle.SETITEM,
        "in-a-state": _shell(_fields(participants=pickle.EMPTY_DICT + deep + pickle.NONE + pickle.SETITEM)),
    }
    return [(f"deep-tuple-{name}-{depth}", P4 + body + pickle.STOP) for name, body in bodies.items()]


# -- hash floods ------------------------------------------------------------------
# Keys whose hashes an attacker can choose collide in one dict or set, and the C
# unpickler's SETITEMS/ADDITEMS then costs O(n^2) comparisons.  int hashes are
# n mod (2^61 - 1); a tuple's hash mixes its items' hashes with an invertible
# step (CPython 3.11's xxHash variant), a frozenset's XORs shuffled item hashes.
_M61 = 2**61 - 1
_MASK = 2**64 - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl31(x: int) -> int:
    return ((x << 31) | (x >> 33)) & _MASK


def _int_for_lane(lane: int) -> "int | None":
    """An int within 64 bits whose hash, as an unsigned word, is ``lane`` (None if there is none)."""
    if lane < _M61:
        return lane
    negative = (1 << 64) - lane  # hash(-x) == -(x mod M61)
    if negative < _M61 and negative != 1:  # hash(-1) is -2
        return -negative
    return None


def _colliding_pairs(count: int) -> List[Tuple[int, int]]:
    """``count`` tuples (a, b) of ints within 64 bits, all with one hash."""
    target = 0x5EED_5EED_5EED_5EED
    out: List[Tuple[int, int]] = []
    inverse = pow(_P2, -1, 2**64)
    a = 1
    while len(out) < count:
        acc = (_rotl31((_P5 + a * _P2) & _MASK) * _P1) & _MASK
        b = _int_for_lane(((target - acc) * inverse) & _MASK)
        if b is not None:
            out.append((a, b))
        a += 1
    return out


def _unshuffle(h: int) -> int:
    """The inverse of CPython's frozenset ``_shuffle_bits``."""
    h = ((h * pow(3644798167, -1, 2**64)) & _MASK) ^ 89869747
    x = h  # undo x ^ (x << 16)
    for _ in range(4):
        x = h ^ ((x << 16) & _MASK)
    return x


def _shuffle(h: int) -> int:
    return (((h ^ 89869747) ^ (h << 16)) * 3644798167) & _MASK


def _colliding_frozen_pairs(count: int) -> List[Tuple[int, int]]:
    """``count`` pairs {a, b} of ints within 64 bits whose frozensets share one hash."""
    target = 0x0BAD_F00D_0BAD_F00D
    out: List[Tuple[int, int]] = []
    a = 3
    while len(out) < count:
        b = _int_for_lane(_unshuffle(target ^ _shuffle(a)))
        if b is not None and b != a:
            out.append((a, b))
        a += 1
    return out


def _colliding_node_ids(count: int) -> List[Tuple[int, int]]:
    """``count`` (pid, local_id) pairs within 64 bits whose ``hash((addr, pid, local_id))`` agree
    for one addr, whatever hash(addr) is: a pid lane step of 2^33/P2 passes the 31-bit rotation
    as +1 (no carry for all but a 2^-11 share of hash(addr)), which the local_id lane cancels."""
    inverse = pow(_P2, -1, 2**64)
    delta, step = (2**33 * inverse) & _MASK, (_P1 * inverse) & _MASK
    out: List[Tuple[int, int]] = []
    j = 0
    while len(out) < count:
        pid, local_id = _int_for_lane((1000 + j * delta) & _MASK), _int_for_lane((7 - j * step) & _MASK)
        if pid is not None and local_id is not None:
            out.append((pid, local_id))
        j += 1
    return out


def node_hash_flood(size: int) -> bytes:
    """A valid state of about ``size`` bytes whose wait_list nodes share one addr and, as
    ``hash((addr, pid, local_id))``, one hash: costly to whoever builds a set of them."""
    memo = b"".join(part + pickle.BINPUT + bytes([i]) + pickle.POP for i, part in enumerate(
        [_global(TORCH_MODULE, "_NodeDesc"), _str("addr"), _str("host"), _str("pid"), _str("local_id")]))

    def node(pid: int, local_id: int) -> bytes:
        get = [pickle.BINGET + bytes([i]) for i in range(5)]
        return (get[0] + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK + get[1] + get[2]
                + get[3] + _int(pid) + get[4] + _int(local_id) + pickle.SETITEMS + pickle.BUILD)

    unit = len(node(2**62, 2**62))
    nodes = b"".join(node(pid, lid) for pid, lid in _colliding_node_ids(max(1, (size - 400) // unit)))
    return P4 + memo + _shell(_fields(wait_list=pickle.EMPTY_SET + pickle.MARK + nodes + pickle.ADDITEMS)) + pickle.STOP


def _int(n: int) -> bytes:
    if -(2**31) <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    raw = pickle.encode_long(n)  # type: ignore[attr-defined]  # the pickler's own minimal form
    return pickle.LONG1 + bytes([len(raw)]) + raw


def hash_flood_payloads(size: int, names: "Iterable[str] | None" = None) -> Iterator[Tuple[str, bytes]]:
    """Dicts and sets of about ``size`` bytes whose keys all share one hash (made one at a time; only ``names``).

    Kinds: ints within 64 bits as colliding as they can be (at most about 10
    share a hash; hashes equal in their low 40 bits), which a state may hold
    and the decoder must still decide quickly; ints of 2^61 and more (one hash), floats (hash-equal groups, the
    opcode alone is never in a state), tuples and frozensets of two ints within
    64 bits (colliding by construction), 1-tuples and frozensets of big ints,
    and a mix, as dict keys (SETITEMS) and set items (ADDITEMS); and a valid state
    whose nodes collide as ``hash((addr, pid, local_id))`` (``hash-node-ids``).
    """
    def keys_until(unit_size: int) -> int:
        return max(1, (size - 16) // unit_size)

    def fitting(units: Iterable[bytes]) -> bytes:
        out, room = [], size - 8
        for unit in units:
            room -= len(unit)
            if room < 0:
                break
            out.append(unit)
        return b"".join(out)

    def as_dict(keys: Iterable[bytes]) -> bytes:
        return P4 + pickle.EMPTY_DICT + pickle.MARK + fitting(k + pickle.NONE for k in keys) + pickle.SETITEMS + pickle.STOP

    def as_set(keys: Iterable[bytes]) -> bytes:
        return P4 + pickle.EMPTY_SET + pickle.MARK + fitting(keys) + pickle.ADDITEMS + pickle.STOP

    def big_ints(n: int) -> List[bytes]:
        return [_int(k * _M61) for k in range(1, n + 1)]

    def pairs(n: int) -> List[bytes]:
        return [_int(a) + _int(b) + pickle.TUPLE2 for a, b in _colliding_pairs(n)]

    def frozen(n: int) -> List[bytes]:
        return [pickle.MARK + _int(a) + _int(b) + pickle.FROZENSET for a, b in _colliding_frozen_pairs(n)]

    def floats(n: int) -> List[bytes]:
        # i * 2^(61 j) all hash to i: groups of 16 equal hashes
        return [pickle.BINFLOAT + struct.pack(">d", float(i) * 2.0 ** (61 * j)) for i in range(1, n // 16 + 2)
                for j in range(16)][:n]

    def int64_groups(n: int) -> List[bytes]:
        # every int within 64 bits that shares a hash with 1, 2, 3, ... (about 10 each): the most a state can hold
        out: List[bytes] = []
        h = 1
        while len(out) < n:
            out += [_int(v) for v in range(h - 5 * _M61, 2**63, _M61) if v >= -(2**63) and hash(v) == h]
            out += [_int(v) for v in range(-h, -(2**63) - 1, -_M61) if hash(v) == -h and v != -1]
            h += 1
        return out[:n]

    def low_bits(n: int) -> List[bytes]:
        # distinct hashes equal in their low 40 bits: the first probes of every key collide
        return [_int(i << 40) for i in range(1, n + 1)]

    units = [
        ("hash-int64-same-hash", lambda: as_set(int64_groups(keys_until(10)))),
        ("hash-int64-low-bits", lambda: as_set(low_bits(keys_until(9)))),
        ("hash-int64-low-bits-keys", lambda: as_dict(low_bits(keys_until(10)))),
        ("hash-int-keys", lambda: as_dict(big_ints(keys_until(11)))),
        ("hash-int-items", lambda: as_set(big_ints(keys_until(10)))),
        ("hash-float-keys", lambda: as_dict(floats(keys_until(10)))),
        ("hash-tuple-keys", lambda: as_dict(pairs(keys_until(12)))),
        ("hash-tuple-items", lambda: as_set(pairs(keys_until(11)))),
        ("hash-frozenset-keys", lambda: as_dict(frozen(keys_until(13)))),
        ("hash-frozenset-items", lambda: as_set(frozen(keys_until(12)))),
        ("hash-big-1-tuples", lambda: as_set([k + pickle.TUPLE1 for k in big_ints(keys_until(11))])),
        ("hash-big-frozensets", lambda: as_set([pickle.MARK + k + pickle.FROZENSET for k in big_ints(keys_until(12))])),
        ("hash-mixed", lambda: as_set([k for trio in zip(big_ints(keys_until(36)), pairs(keys_until(36)),
                                                        [k + pickle.TUPLE1 for k in big_ints(keys_until(36))])
                                       for k in trio])),
        ("hash-node-ids", lambda: node_hash_flood(size)),
        ("hash-memo-tuple-keys", lambda: P4 + b"".join(
            _int(a) + _int(b) + pickle.TUPLE2 + pickle.MEMOIZE + pickle.POP for a, b in _colliding_pairs(keys_until(24)))
            + pickle.EMPTY_DICT + pickle.MARK + b"".join(
                pickle.LONG_BINGET + struct.pack("<I", i) + pickle.NONE for i in range(keys_until(24)))
            + pickle.SETITEMS + pickle.STOP),
    ]
    chosen = None if names is None else set(names)
    for name, make in units:
        if chosen is None or name in chosen:
            yield name, make()
