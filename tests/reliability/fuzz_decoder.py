"""Bulk fuzzing of the state decoder: a fast seeded loop over mutated real states.

Run as ``python -m tests.reliability.fuzz_decoder --inputs 100000 --seed 1``
(in its own process, so even an interpreter crash is reported instead of
killing pytest).  Prints one JSON document with the counts, the first
crashing inputs (hex), every global the unpickler was asked for and whether
it was handed out, the peak-RSS growth and the slowest input.

Inputs: real states (rdzvctl's encoder, protocols 2-5, 0-64 nodes, naive and
aware datetimes) mutated by bit flips, byte stores, truncations, splices,
opcode insertions and deletions, range duplications and huge length fields;
deep nesting of tuples, lists, dicts and frames; random bytes; and truncated or
damaged base64 through ``decode_base64``.  An input passes if decoding returns
a state or raises a :class:`StateError`; anything else is a crash.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import pickle
import random
import resource
import struct
import time
from typing import Any, Callable, Dict, List, Set, Tuple

from rdzvctl.errors import StateError
from rdzvctl.state import codec
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = ["seed_states", "Fuzzer", "instrument_allow_list", "main"]

UTC = _dt.timezone.utc
#: Every opcode byte the pickle protocol defines.
OPCODES = sorted({op.code.encode("latin-1") for op in __import__("pickletools").opcodes})
#: Opcodes followed by a 4-byte or 8-byte length.
LEN4 = [pickle.BINUNICODE, pickle.BINBYTES, pickle.BINSTRING, b"\x96"]  # 0x96: BYTEARRAY8 is 8; kept harmless
LEN8 = [pickle.BINUNICODE8, pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.FRAME]
HUGE = [0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 2**31 - 2, 2**32 - 2]
HUGE8 = [2**63 - 1, 2**64 - 1, 2**40, 2**31, 2**33]


def seed_states(rng: random.Random, count: int = 40) -> List[bytes]:
    """Real pickled states of many shapes and every protocol torch could have written."""
    out: List[bytes] = []
    now = _dt.datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    for i in range(count):
        nodes = rng.choice([0, 1, 2, 3, 8, 64])
        state = RendezvousState(round=rng.randrange(0, 2**40), complete=rng.random() < 0.5,
                                closed=rng.random() < 0.2)
        members = [NodeDesc(f"node-{rng.randrange(10**6)}.cluster.local", rng.randrange(2**22), rng.randrange(8))
                   for _ in range(nodes)]
        for rank, node in enumerate(members):
            bucket = rng.random()
            if bucket < 0.6:
                state.participants[node] = rank
            elif bucket < 0.8:
                state.wait_list.add(node)
            else:
                state.redundancy_list.add(node)
            state.last_heartbeats[node] = now - _dt.timedelta(seconds=rng.randrange(100), microseconds=rng.randrange(10**6))
        if not state.complete and rng.random() < 0.5:
            state.deadline = now + _dt.timedelta(seconds=30)
        state.naive_datetimes = rng.random() < 0.2
        out.append(codec.encode(state, protocol=2 + i % 4))
    return out


class Fuzzer:
    """Seeded mutations of real states (and structure from nothing)."""

    def __init__(self, rng: random.Random, seeds: List[bytes]) -> None:
        self.rng = rng
        self.seeds = seeds
        self.mutators: List[Tuple[str, Callable[[bytes], bytes]]] = [
            ("bit flips", self.bit_flips),
            ("byte stores", self.byte_stores),
            ("truncation", self.truncate),
            ("splice", self.splice),
            ("opcode insertion", self.insert_opcode),
            ("range deletion", self.delete_range),
            ("range duplication", self.duplicate_range),
            ("huge lengths", self.huge_length),
            ("stacked mutations", self.stacked),
        ]
        self.generators: List[Tuple[str, Callable[[], bytes]]] = [
            ("random bytes", self.random_bytes),
            ("deep nesting", self.deep_nesting),
            ("opcode soup", self.opcode_soup),
        ]

    def seed(self) -> bytes:
        return self.rng.choice(self.seeds)

    def bit_flips(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            pos = self.rng.randrange(len(buf))
            buf[pos] ^= 1 << self.rng.randrange(8)
        return bytes(buf)

    def byte_stores(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            buf[self.rng.randrange(len(buf))] = self.rng.choice([0, 1, 0x7F, 0x80, 0xFF, self.rng.randrange(256)])
        return bytes(buf)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data))]

    def splice(self, data: bytes) -> bytes:
        other = self.seed()
        return data[: self.rng.randrange(len(data))] + other[self.rng.randrange(len(other)):]

    def insert_opcode(self, data: bytes) -> bytes:
        pos = self.rng.randrange(len(data) + 1)
        op = self.rng.choice(OPCODES)
        arg = bytes(self.rng.randrange(256) for _ in range(self.rng.choice([0, 1, 2, 4, 8])))
        return data[:pos] + op + arg + data[pos:]

    def delete_range(self, data: bytes) -> bytes:
        start = self.rng.randrange(len(data))
        return data[:start] + data[start + self.rng.randint(1, 16):]

    def duplicate_range(self, data: bytes) -> bytes:
        start = self.rng.randrange(len(data))
        piece = data[start:start + self.rng.randint(1, 64)]
        pos = self.rng.randrange(len(data) + 1)
        return data[:pos] + piece * self.rng.randint(1, 50) + data[pos:]

    def huge_length(self, data: bytes) -> bytes:
        """Replace the length field after a length-prefixed opcode with something enormous."""
        candidates = [i for i, byte in enumerate(data) if bytes([byte]) in (pickle.BINUNICODE, pickle.BINBYTES,
                                                                            pickle.SHORT_BINUNICODE, pickle.FRAME,
                                                                            pickle.SHORT_BINBYTES)]
        if not candidates:
            return self.insert_opcode(data)
        pos = self.rng.choice(candidates)
        op = data[pos:pos + 1]
        if op == pickle.FRAME:
            field = struct.pack("<Q", self.rng.choice(HUGE8))
        elif op in (pickle.SHORT_BINUNICODE, pickle.SHORT_BINBYTES):
            field = b"\xff"
        else:
            field = struct.pack("<I", self.rng.choice(HUGE))
        return data[:pos + 1] + field + data[pos + 1 + len(field):]

    def stacked(self, data: bytes) -> bytes:
        for _ in range(self.rng.randint(2, 5)):
            name, mutate = self.rng.choice(self.mutators[:-1])
            data = mutate(data) or b"\x80"
        return data

    def random_bytes(self) -> bytes:
        prefix = self.rng.choice([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05", b"\x80\x04\x95"])
        return prefix + bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(0, 256)))

    def deep_nesting(self) -> bytes:
        depth = self.rng.choice([10, 100, 999, 1000, 1001, 2000, 5000])
        if self.rng.random() < 0.05:
            depth = self.rng.choice([50_000, 200_000])  # rare: each costs tens of milliseconds
        kind = self.rng.randrange(6)
        head = b"\x80\x04"
        if kind == 0:  # tuples in tuples
            return head + b")" + b"\x85" * depth + b"."
        if kind == 1:  # lists in lists
            return head + b"]" * depth + b"a" * (depth - 1) + b"."
        if kind == 2:  # dicts keyed by nested tuples (hashing recurses)
            return head + b"}" + b")" + b"\x85" * depth + b"N" + b"s."
        if kind == 3:  # marks that never close
            return head + b"(" * depth + b"."
        if kind == 4:  # nested frozensets of tuples
            return head + b"(" + b")" + b"\x85" * depth + b"\x91."
        # a real state with a deep tuple hidden in a field value
        seed = self.seed()
        return seed[:-2] + b")" + b"\x85" * depth + b"0" + seed[-2:]

    def opcode_soup(self) -> bytes:
        parts = [b"\x80\x04"]
        for _ in range(self.rng.randint(1, 40)):
            parts.append(self.rng.choice(OPCODES))
            parts.append(bytes(self.rng.randrange(256) for _ in range(self.rng.choice([0, 0, 1, 2, 4, 8]))))
        return b"".join(parts) + b"."

    def one(self) -> Tuple[str, bytes]:
        if self.rng.random() < 0.8:
            name, mutate = self.rng.choice(self.mutators)
            return name, mutate(self.seed())
        name, generate = self.rng.choice(self.generators)
        return name, generate()


def instrument_allow_list() -> Tuple[List[Tuple[str, str, bool]], Callable[[], None]]:
    """Wrap the allow-list lookup; returns (log of (module, name, handed out), undo)."""
    log: List[Tuple[str, str, bool]] = []
    original = codec._AllowListUnpickler.find_class

    def find_class(self: Any, module: str, name: str) -> Any:
        try:
            found = original(self, module, name)
        except BaseException:
            log.append((str(module), str(name), False))
            raise
        log.append((str(module), str(name), True))
        return found

    codec._AllowListUnpickler.find_class = find_class  # type: ignore[method-assign]

    def undo() -> None:
        codec._AllowListUnpickler.find_class = original  # type: ignore[method-assign]

    return log, undo


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--address-space-mib", type=int, default=3072,
                        help="RLIMIT_AS of this process, so a regression cannot exhaust the machine")
    args = parser.parse_args(argv)
    limit = args.address_space_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = random.Random(args.seed)
    fuzzer = Fuzzer(rng, seed_states(rng))
    log, undo = instrument_allow_list()
    decoded = 0
    memory_refusals: List[Dict[str, str]] = []
    refused: Dict[str, int] = {}
    crashes: List[Dict[str, str]] = []
    by_source: Dict[str, int] = {}
    slowest = (0.0, "")
    for data in fuzzer.seeds:  # warm up: every seed decodes
        codec.decode(data)
    base_rss = _rss_kib()
    started = time.monotonic()
    for index in range(args.inputs):
        if index % 10 == 9:  # the backends' wrapping: damaged base64 first
            source = "damaged base64"
            text = base64.b64encode(fuzzer.seed())
            text = fuzzer.rng.choice([text[: fuzzer.rng.randrange(len(text))], fuzzer.byte_stores(text),
                                      text + b"=" * fuzzer.rng.randint(1, 3), text.replace(b"A", b"-", 1)])
            call: Callable[[], Any] = lambda t=text: codec.decode(codec.decode_base64(t))  # noqa: E731
            data = text
        else:
            source, data = fuzzer.one()
            call = lambda d=data: codec.decode(d)  # noqa: E731
        by_source[source] = by_source.get(source, 0) + 1
        t0 = time.perf_counter()
        try:
            state = call()
            if not isinstance(state, RendezvousState):
                raise TypeError(f"decode returned {type(state).__name__}")
            decoded += 1
        except StateError as exc:
            refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
            if "more memory" in str(exc):  # the unpickler hit the address-space limit
                memory_refusals.append({"source": source, "input_hex": data[:100_000].hex(), "size": str(len(data)),
                                        "index": str(index)})
        except BaseException as exc:  # noqa: BLE001 - exactly what the fuzzing looks for
            if len(crashes) < 20:
                crashes.append({"source": source, "error": f"{type(exc).__name__}: {exc}"[:300],
                                "input_hex": data[:2000].hex()})
            else:
                crashes.append({"source": source, "error": type(exc).__name__})
        spent = time.perf_counter() - t0
        if spent > slowest[0]:
            slowest = (spent, source)
    elapsed = time.monotonic() - started
    undo()
    asked: Set[Tuple[str, str]] = {(m, n) for m, n, _ in log}
    handed = {(m, n) for m, n, ok in log if ok}
    disallowed = sorted(f"{m}.{n}" for m, n in handed if (m, n) not in codec.ALLOWED_GLOBALS)
    print(json.dumps({
        "inputs": args.inputs, "decoded": decoded, "refused": refused, "memory_refusals": memory_refusals, "crashes": crashes,
        "by_source": by_source, "globals_asked": len(asked), "globals_refused": len(asked - handed),
        "globals_handed_out": sorted(f"{m}.{n}" for m, n in handed), "disallowed_handed_out": disallowed,
        "rss_growth_kib": _rss_kib() - base_rss, "seconds": elapsed,
        "slowest_input": {"seconds": slowest[0], "source": slowest[1]},
    }))


if __name__ == "__main__":
    main()
