"""Bounds checked before and while the C unpickler runs, so hostile bytes cost little.

The C unpickler is fast but trusts its input in three ways that matter here
(CPython 3.11):

* a single opcode can allocate far beyond the input: a huge memo index
  (``LONG_BINPUT``, ``PUT``; CPython gh-115952) allocates and zeroes a memo
  table of that size, and a length field (``BINBYTES8``, ``BYTEARRAY8``, ...)
  is allocated before its bytes are read;
* hashing tuples nested very deep (as a dict key or set item) recurses in C
  without a guard and overflows the C stack (about 64 bytes per level);
* cheap opcodes build costly objects: one ``EMPTY_SET`` byte is a 200-byte set.

:func:`scan` walks the opcodes at regular-expression speed (one greedy
match covers every run of ordinary opcodes; Python only looks at the rare
opcodes whose argument needs a decision) and refuses the first kind.
:func:`tuple_depth_bound` bounds the nesting with ``bytes.count``: each level
needs its own tuple opcode.  :func:`call_sized` runs the unpickler on the
current thread when its stack holds as many levels as the input has bytes
(the bound is then not needed), else :func:`call_with_stack` runs it on a
thread whose stack is sized for the bound when the current one is too small
(the stack limit is read from ``RLIMIT_STACK`` or ``threading.stack_size()``).
:class:`MeteredInput` is the file the unpickler reads from: every 16 KiB it
consumes, the memory grown since the start is compared with a budget derived
from the input size, so a flood of cheap objects is refused after a bounded
amount of memory.  Nothing here builds an object from the pickle.

Hash floods.  The C unpickler hashes at ``SETITEM``/``SETITEMS``,
``ADDITEMS``, ``FROZENSET`` and inside ``set()``; n keys that share a hash cost
O(n^2) comparisons there, inside one opcode (no read in between, so the
metered input cannot stop it; 10,000 colliding keys took 3-12 s).  Hashes an
attacker can choose come only from ints, floats, tuples, frozensets and what
hashes like a tuple of ints (timedelta, timezone, an aware datetime); str,
bytes and naive datetimes hash with SipHash under a per-process key, built
shells by identity, and lists, dicts, sets and bytearrays not at all.  Each
is closed by what real states never contain (torch writes protocol 2-5 with
BININT*/LONG1 ints, bytes payloads and tuples only as call arguments):

* floats: ``FLOAT`` and ``BINFLOAT`` are refused;
* ints: only within 64 bits (``LONG1`` of at most 8 bytes, ``INT``/``LONG``
  text of at most 19 digits; ``LONG4`` refused).  ``hash(n)`` is
  ``n mod (2^61 - 1)`` (negated for negative n), so at most 9 distinct ints
  in that range share a hash value, and equal ints are one key;
* frozensets: ``FROZENSET`` is refused and ``frozenset`` is not an allowed global;
* tuples: every tuple opcode must be followed, after at most one memo put,
  by ``REDUCE`` or ``BUILD`` (checked in the run), so no other opcode sees a
  tuple before a call took it.  ``BUILD`` with a tuple always fails (the
  shells and the allowed calls refuse it; nothing else has settable
  attributes), and ``REDUCE`` succeeds only on an allowed global that takes
  exactly what its own pickles pass (``rdzvctl.state.codec``): ``datetime``
  (bytes or latin-1 text, a timezone), ``timedelta`` (an offset under a day:
  1.7e11 values), ``timezone`` (validates its own: a timedelta, a str),
  ``set`` (a list of built nodes), ``_codecs.encode`` (a str, "latin1"); a
  shell class refuses arguments.  So every tuple that survives (in the
  memo) holds a SipHash-keyed item, an unhashable list or three ints from
  the offset range, and the objects returned hash the same way.  An aware
  datetime hashes as (days, seconds, microseconds): at most 2^61 values,
  where each key sharing a chosen hash costs about 2^44 hash evaluations
  to find.

After unpickling, the converter hashes :class:`~rdzvctl.state.model.NodeDesc`
objects, which hash their id string (SipHash-keyed): the dataclass default,
``hash((addr, pid, local_id))``, let same-addr nodes share one hash whatever
the str hash key is (its int lanes pass the mixing linearly).

What remains is CPython's probing of distinct hashes: keys equal in their
low bits share their first slots until the perturbation (5 more hash bits
per probe) separates them, within about 13 probes; the worst shape measured
(16 MiB of ints equal in their low 40 bits, ``hash-int64-low-bits`` in the
hostile corpus and bench P8) costs about 3x a set of ordinary ints.
"""

from __future__ import annotations

import copyreg
import pickle
import re
from typing import Callable, Dict, List, Set, Tuple, TypeVar

from rdzvctl.errors import StateCorruptError, StateUnsafeError
from rdzvctl.state.unpickle_limits import (  # the limits the unpickler runs under, re-exported
    BYTES_PER_LEVEL,
    MAX_HELPER_STACK,
    MeteredInput,
    call_with_stack,
    stack_available,
    stack_needed,
)

__all__ = [
    "MAX_MEMO_INDEX",
    "BYTES_PER_LEVEL",
    "MAX_HELPER_STACK",
    "MeteredInput",
    "scan",
    "tuple_depth_bound",
    "stack_needed",
    "stack_available",
    "call_with_stack",
    "call_sized",
]

#: Highest memo index accepted (a memo table of this size is 32 MiB).  Real
#: states memoise about six objects per node: a 16 MiB state needs about 1.1M.
MAX_MEMO_INDEX = 2**21 - 1

# -- the opcode walk ------------------------------------------------------------


def _cls(codes: List[str]) -> bytes:
    return b"[" + b"".join(re.escape(c.encode("latin-1")) for c in codes) + b"]"


#: Longest one-byte-counted argument (``SHORT_BINUNICODE``, ``SHORT_BINBYTES``, ``SHORT_BINSTRING``)
#: the run covers; longer ones, and every 4- and 8-byte-counted one (protocol 2-3 strings,
#: anything of 256 bytes or more), are skipped by :func:`scan` itself.  Compiling the run
#: costs about 9 us per covered length and width, paid by every process that decodes:
#: all 256 lengths of all three widths were 10 ms, more than a whole ``get`` spends on
#: its 8 nodes.  Node addresses (host names) and datetime payloads (10 bytes) fit.
RUN_LENGTH = 63


#: Any one byte: the run is compiled with ``re.DOTALL``, so ``.`` is the engine's ANY_ALL, which a
#: counted repeat (``.{30}``) skips in one step; ``[\s\S]`` (the same bytes) is a two-category
#: class tested byte by byte, which made the payloads of a state's strings 40 % of the scan.
ANY = b"."


def _counted() -> bytes:
    """A one-byte length field up to :data:`RUN_LENGTH` and that many bytes of data."""
    return b"(?:" + b"|".join(b"\\x%02x" % n + (ANY + b"{%d}" % n if n else b"") for n in range(RUN_LENGTH + 1)) + b")"


#: Opcodes no state has: floats, LONG4 ints (the pickler's form for 256 bytes and more), frozensets.
_NEVER = {"FLOAT", "BINFLOAT", "LONG4", "FROZENSET"}
#: Opcodes the run admits only in the narrow forms states use (see :func:`_build_run`).
_NARROW = {"LONG1", "INT", "LONG", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}


#: Opcodes with an argument one match of the run covers at most (with the runs of opcodes
#: without one between them); :func:`scan` matches again until a run is empty.
RUN_CHUNK = 4096


#: pickle's opcodes (protocols 0-5) by their argument, as ``pickletools.opcodes`` describes them: a
#: fixed width in bytes (0: none), a line, or a length field of 1, 4 or 8 bytes and that many bytes.
#: Written out rather than read from pickletools at import (a millisecond of every process that
#: decodes); tests/test_codec_trust.py checks it against pickletools.
FIXED_WIDTH: Dict[int, Tuple[str, ...]] = {
    0: ("NEXT_BUFFER", "READONLY_BUFFER", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
        "EMPTY_SET", "ADDITEMS", "FROZENSET", "POP", "DUP", "MARK", "POP_MARK", "MEMOIZE", "STACK_GLOBAL",
        "REDUCE", "BUILD", "OBJ", "NEWOBJ", "NEWOBJ_EX", "STOP", "BINPERSID"),
    1: ("BININT1", "BINGET", "BINPUT", "EXT1", "PROTO"),
    2: ("BININT2", "EXT2"),
    4: ("BININT", "LONG_BINGET", "LONG_BINPUT", "EXT4"),
    8: ("BINFLOAT", "FRAME"),
}
TO_NEWLINE = ("INT", "LONG", "STRING", "UNICODE", "FLOAT", "GET", "PUT", "GLOBAL", "INST", "PERSID")
COUNTED: Dict[int, Tuple[str, ...]] = {
    1: ("LONG1", "SHORT_BINSTRING", "SHORT_BINBYTES", "SHORT_BINUNICODE"),
    4: ("LONG4", "BINSTRING", "BINBYTES", "BINUNICODE"),
    8: ("BINBYTES8", "BYTEARRAY8", "BINUNICODE8"),
}


def _codes(names: Tuple[str, ...], special: Set[str]) -> List[str]:
    return [getattr(pickle, name).decode("latin-1") for name in names if name not in special]


def _build_run() -> "re.Pattern[bytes]":
    """A run of opcodes that need no decision (STOP and the rare ones excluded)."""
    special = {"STOP", "LONG_BINPUT", "PUT", "FRAME", "EXT1", "EXT2", "EXT4", "GLOBAL", "INST"} | _NEVER | _NARROW
    plain = _codes(FIXED_WIDTH[0], special)
    fixed = {n: codes for n, names in FIXED_WIDTH.items() if n and (codes := _codes(names, special))}
    lines = _codes(TO_NEWLINE, special)
    counted = {n: _codes(names, special) for n, names in COUNTED.items()}
    # The opcodes a state holds most (after the plain ones): one-byte arguments (BINGET, BININT1),
    # then short strings and bytes.  The alternatives start with distinct opcodes, so their order
    # changes what is tried first, never what matches.  The one-byte ones are an alternative each:
    # the engine rejects an alternative that starts with a literal byte by one comparison, one
    # that starts with a class by a call (8-node state: 138,000 -> 120,000 instructions).
    parts = [re.escape(code.encode("latin-1")) + ANY for code in fixed[1]]
    parts.append(_cls(counted[1]) + _counted())
    parts += [_cls(codes) + ANY + b"{%d}" % n for n, codes in sorted(fixed.items()) if n != 1]
    # A tuple goes straight to REDUCE or BUILD (memoised or not; a FRAME may start between,
    # which torch's C pickler never writes there): it only ever holds a call's arguments.
    frame = b"(?:\\x95" + ANY + b"{3}\\x00{5})?"
    parts.append(b"[\\x85\\x86\\x87t]" + frame + b"(?:\\x94|q" + ANY + b"|r" + ANY + b"{2}[\\x00-\\x1f]\\x00|p[0-9]{1,6}\\n)?"
                 + frame + b"[Rb]")
    parts.append(_cls(lines) + b"[^\\n]*\\n")
    parts.append(b"[ci][^\\n]*\\n[^\\n]*\\n")  # GLOBAL, INST: module and name lines
    parts.append(b"r" + ANY + b"{2}[\\x00-\\x1f]\\x00")  # LONG_BINPUT up to MAX_MEMO_INDEX
    parts.append(b"p[0-9]{1,6}\\n")  # PUT below a million
    parts.append(b"\\x95" + ANY + b"{3}\\x00{5}")  # FRAME below 16 MiB
    # Integers within 64 bits (at most 19 digits: below 2^63.2), the only ones a state holds.
    parts.append(b"\\x8a(?:" + b"|".join(b"\\x%02x" % n + ANY + b"{%d}" % n for n in range(9)) + b")")  # LONG1
    parts.append(b"I[-+]?[0-9]{1,19}\\n")  # INT
    parts.append(b"L[-+]?[0-9]{1,19}L?\\n")  # LONG
    # Opcodes without an argument (half of a state's) are matched a run at a time by a character
    # class (the engine's fast single-character loop), the others one per repetition, each
    # followed by such a run: ``P*(?:A P*){0,n}``.  Every alternative starts with an opcode the
    # class does not hold, so a run never gives back a byte: no backtracking, the same greedy
    # walk as one repetition per opcode.  Greedy and bounded, not possessive (``*+``): the
    # possessive quantifiers of Python 3.11.0-3.11.4 can match what the greedy form does not
    # (CPython gh-106052, gh-100061: a failed partial opcode leaves the position advanced), and
    # Debian 12's python3 is 3.11.2.  Nothing follows the group, so the greedy match never
    # backtracks into an earlier opcode; the bound keeps the engine's per-repetition bookkeeping
    # small (an unbounded greedy ``*`` costs ~100 bytes per repetition).
    run = _cls(plain) + b"*"
    return re.compile(run + b"(?:(?:" + b"|".join(parts) + b")" + run + b"){0,%d}" % RUN_CHUNK, re.DOTALL)


_RUN = _build_run()
_STOP = pickle.STOP[0]
_LENGTHS = {pickle.SHORT_BINSTRING[0]: (1, False), pickle.SHORT_BINUNICODE[0]: (1, False),
            pickle.SHORT_BINBYTES[0]: (1, False), pickle.BINSTRING[0]: (4, True), pickle.BINUNICODE[0]: (4, False),
            pickle.BINBYTES[0]: (4, False), pickle.BINUNICODE8[0]: (8, False), pickle.BINBYTES8[0]: (8, False),
            pickle.BYTEARRAY8[0]: (8, False), pickle.FRAME[0]: (8, False)}
_EXTENSIONS = {pickle.EXT1[0]: 1, pickle.EXT2[0]: 2, pickle.EXT4[0]: 4}
_MEMO = "not a valid pickle: a memo index beyond any object the state holds"
_NOT_A_STATE = {
    **{pickle.FLOAT[0]: "a float", pickle.BINFLOAT[0]: "a float", pickle.FROZENSET[0]: "a frozenset",
       pickle.LONG4[0]: "an integer beyond 64 bits", pickle.LONG1[0]: "an integer beyond 64 bits",
       pickle.INT[0]: "an integer beyond 64 bits", pickle.LONG[0]: "an integer beyond 64 bits"},
    **dict.fromkeys(pickle.TUPLE + pickle.TUPLE1 + pickle.TUPLE2 + pickle.TUPLE3,
                    "a tuple that is not a call's arguments"),
}


def scan(data: bytes) -> None:
    """Refuse what one opcode would turn into a huge allocation, and cached extension codes.

    Stops at ``STOP`` or at the first malformed opcode: the unpickler refuses
    the latter itself and never reads past either.
    """
    end = len(data)
    pos = 0
    match = _RUN.match
    while True:
        after = match(data, pos).end()  # type: ignore[union-attr]  # {0,n} always matches
        while after != pos:  # a run ends at RUN_CHUNK opcodes or at one that needs a decision
            pos = after
            if pos < end and data[pos] == _STOP:  # where every state ends (never in a run): done
                return
            after = match(data, pos).end()  # type: ignore[union-attr]
        if pos >= end:
            return
        op = data[pos]
        if op in _LENGTHS:  # a length the run does not cover (see RUN_LENGTH)
            width, signed = _LENGTHS[op]
            if pos + 1 + width > end:
                return
            size = int.from_bytes(data[pos + 1:pos + 1 + width], "little", signed=signed)
            if size < 0 or pos + 1 + width + size > end:
                raise StateCorruptError("not a valid pickle: a length field claims more bytes than the state holds")
            pos += 1 + width + (0 if op == pickle.FRAME[0] else size)
        elif op == pickle.LONG_BINPUT[0]:
            if pos + 5 > end:
                return
            raise StateCorruptError(_MEMO)
        elif op == pickle.PUT[0]:
            newline = data.find(b"\n", pos)
            digits = data[pos + 1:newline] if newline > 0 else b""
            if not digits.isdigit():
                return  # the unpickler refuses it
            raise StateCorruptError(_MEMO)
        elif op in _EXTENSIONS:
            if copyreg._extension_cache or copyreg._inverted_registry:  # type: ignore[attr-defined]
                # Extension codes in copyreg's cache skip find_class (and the allow-list) entirely.
                raise StateUnsafeError("the pickle uses an extension code, which a rendezvous state never does")
            pos += 1 + _EXTENSIONS[op]
        elif op in _NOT_A_STATE:
            raise StateCorruptError(f"the pickle holds {_NOT_A_STATE[op]}, which a rendezvous state never does; "
                                    "refused before unpickling")
        elif op in (pickle.GLOBAL[0], pickle.INST[0]):
            return  # only a truncated GLOBAL/INST is left out of the run: the unpickler refuses it
        else:  # STOP, an unknown opcode or a truncated argument: the unpickler stops here
            return


def tuple_depth_bound(data: bytes) -> int:
    """The deepest tuple nesting ``data`` could build: each level needs its own tuple opcode
    (a ``TUPLE`` also its own ``MARK``).  Counts bytes, so it errs high, never low."""
    bound = data.count(pickle.TUPLE1) + data.count(pickle.TUPLE2) + data.count(pickle.TUPLE3)
    return bound + min(data.count(pickle.TUPLE), data.count(pickle.MARK))


T = TypeVar("T")


def call_sized(func: Callable[[], T], data: bytes) -> T:
    """``func()`` on a stack that holds the deepest tuple nesting ``data`` can build.

    :func:`tuple_depth_bound` is at most ``len(data)`` (it counts bytes of four distinct
    values), so when a stack for ``len(data)`` levels fits the current thread the tighter
    bound fits too and is not counted: the decision :func:`call_with_stack` makes with it.
    """
    if stack_needed(len(data)) <= stack_available():
        return func()
    return call_with_stack(func, stack_needed(tuple_depth_bound(data)))
