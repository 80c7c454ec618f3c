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
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List

from rdzvctl.state.codec import TORCH_MODULE

__all__ = ["Payload", "build_corpus", "EXTENSION_CODE"]

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
    return out
