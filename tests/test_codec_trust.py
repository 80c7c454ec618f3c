"""Hostile bytes that a plain allow-list decoder accepts or chokes on (corpus: ``trust_payloads`` and friends).

* BUILDs that would change the allowed classes (``_NodeDesc.__hash__ = None``,
  ``__del__ = _codecs.encode``): refused, the classes unchanged afterwards, no
  "Exception ignored" on stderr, later decodes unaffected;
* states torch's agents cannot use: refused by decode, and by the write gate;
* floods of cheap opcodes at the size cap: refused under a 256 MiB address
  space (in a child process);
* tuple nests under a 1 MiB stack (``ulimit -s 1024``): no crash, in a child;
* hash floods (dict keys and set items sharing one hash): refused before
  unpickling, or (ints within 64 bits, which a state may hold) decided; at the
  cap in a child under 256 MiB and a kill timeout that only guards the run.
"""

from __future__ import annotations

import json
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from rdzvctl.errors import StateCorruptError, StateError, StateUnsafeError
from rdzvctl.state import codec
from rdzvctl.state.codec import check_writable, decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.malicious.corpus import hash_flood_payloads, trust_payloads

REPO = Path(__file__).resolve().parents[1]
A = NodeDesc("node-a", 1, 0)


def _child(script: str, *, address_space: int = 0, stack: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter with the given RLIMIT_AS / RLIMIT_STACK (bytes)."""

    def limits() -> None:
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if stack:
            resource.setrlimit(resource.RLIMIT_STACK, (stack, stack))

    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=limits, timeout=timeout)


@pytest.mark.parametrize("name, kind, data", trust_payloads(), ids=[name for name, _, _ in trust_payloads()])
def test_trust_payloads_are_refused(name: str, kind: str, data: bytes) -> None:
    expected = StateUnsafeError if kind == "class-mutation" and "class-set" not in name \
        and "class-datetime" not in name else StateError
    with pytest.raises(expected):
        decode(data)
    with pytest.raises(StateError):
        check_writable(data)


_CLASSES_SCRIPT = r"""
import gc, json, sys
from rdzvctl.errors import StateError
from rdzvctl.state import codec, convert
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.malicious.corpus import trust_payloads

def snapshot():
    classes = [convert._Shell, convert._Built, convert._BuiltNode, convert._BuiltState, convert._NodeShell,
               convert._StateShell, codec._Narrow]
    classes += sorted({type(v) for v in codec.ALLOWED_GLOBALS.values() if not isinstance(v, type)}, key=repr)
    return {f"{c.__module__}.{c.__qualname__}": sorted((k, repr(v)) for k, v in vars(c).items()) for c in classes}

before = snapshot()
real = codec.encode(RendezvousState(round=1, participants={NodeDesc("a", 1, 0): 0}))
outcomes = {}
for name, kind, data in trust_payloads():
    try:
        codec.decode(data)
        outcomes[name] = "decoded"
    except StateError as exc:
        outcomes[name] = type(exc).__name__
    gc.collect()  # a __del__ planted on a class would run here
after = snapshot()
print(json.dumps({"outcomes": outcomes, "unchanged": before == after,
                  "still_decodes": codec.decode(real).participants == {NodeDesc("a", 1, 0): 0},
                  "encode_still_works": codec.ALLOWED_GLOBALS[("_codecs", "encode")]("x") == b"x"}))
"""


def test_class_mutations_leave_the_allowed_classes_alone_in_a_fresh_process() -> None:
    done = _child(_CLASSES_SCRIPT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["unchanged"] and report["still_decodes"] and report["encode_still_works"], report
    assert all(outcome.startswith("State") for outcome in report["outcomes"].values()), report["outcomes"]


_RESOURCE_SCRIPT = r"""
import json, sys
from rdzvctl.errors import StateError
from rdzvctl.state import codec
from tests.reliability.malicious.corpus import resource_payloads
size = int(sys.argv[1]) if len(sys.argv) > 1 else codec.MAX_STATE_BYTES
outcomes = {}
for name, data in resource_payloads(size):
    try:
        codec.decode(data)
        outcomes[name] = "decoded"
    except StateError as exc:
        outcomes[name] = type(exc).__name__ + ": " + str(exc)[:80]
    del data
print(json.dumps(outcomes))
"""


@pytest.mark.parametrize("size", [8 << 20, codec.MAX_STATE_BYTES], ids=["8MiB", "cap"])
def test_floods_at_the_cap_are_refused_within_256_mib(size: int) -> None:
    """8 MiB of EMPTY_SET once took 2 GB; each flood now ends in one StateError under RLIMIT_AS."""
    done = _child(_RESOURCE_SCRIPT.replace("sys.argv[1]", str(size)).replace("len(sys.argv) > 1", "True"),
                  address_space=256 << 20)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = json.loads(done.stdout)
    assert all(o.startswith("StateCorruptError") for o in outcomes.values()), outcomes
    assert "MemoryError" not in done.stdout
    # Container floods hit the metered budget (tuple and frozenset floods are refused by the prescan).
    assert sum("builds more than" in o for o in outcomes.values()) >= 4


def test_size_limit_is_named_in_the_error() -> None:
    with pytest.raises(StateCorruptError, match="16 MiB"):
        decode(b"\x80\x04" + b"N" * codec.MAX_STATE_BYTES)


_STACK_SCRIPT = r"""
import sys
from rdzvctl.errors import StateError
from rdzvctl.state import codec
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.malicious.corpus import deep_tuple_payloads
for depth in (5_000, 19_999, 100_000):  # 19,999: just under the old fixed guard
    for name, data in deep_tuple_payloads(depth):
        try:
            codec.decode(data)
            print("decoded", name)
        except StateError as exc:
            print("refused", name)
nodes = [NodeDesc(f"n{i}", i, 0) for i in range(4096)]
import datetime as dt
now = dt.datetime.now(dt.timezone.utc)
state = RendezvousState(round=1, complete=True, participants={n: i for i, n in enumerate(nodes)},
                        last_heartbeats={n: now for n in nodes})
assert codec.decode(codec.encode(state)) == state
print("real state decoded")
"""


def test_tuple_nests_do_not_crash_a_1_mib_stack() -> None:
    done = _child(_STACK_SCRIPT, stack=1 << 20)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert lines[-1] == "real state decoded"
    assert len(lines) == 19 and all(line.startswith("refused") for line in lines[:-1]), lines


def test_restoring_legacy_bytes_is_refused_by_the_write_gate() -> None:
    """What restore/set/edit/reset hand to the backend passes check_writable; legacy layouts do not."""
    legacy = encode(RendezvousState(round=1, participants={A: 0}, last_heartbeats={}))
    legacy = legacy.replace(b"\x8c\x0flast_heartbeats", b"\x8c\x10last_keep_alives")
    assert decode(legacy).round == 1
    with pytest.raises(StateCorruptError, match="older torch"):
        check_writable(legacy)


@pytest.mark.parametrize("name", ["class-node-hash-none", "class-node-del-codecs", "unusable-frozen-wait-list",
                                  "edge-round-10**5000", "legacy-last-keep-alives"])
def test_restore_of_a_tampered_backup_writes_nothing(tmp_path: Path, name: str) -> None:
    """A backup whose bytes were swapped for hostile or legacy ones: restore exits 6, the store is untouched."""
    import base64

    from tests.support.cli import run_rdzvctl

    assert run_rdzvctl(["demo", "--no-live", "--path", str(tmp_path / "demo")]).returncode == 0
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(tmp_path / "demo" / "rendezvous.store"),
           "PET_RDZV_ID": "demo-job", "PET_RDZV_CONF": "store_type=file", "RDZVCTL_BACKUP_DIR": str(tmp_path / "bk")}
    prune = run_rdzvctl(["reset", "--mode", "prune", "--yes"], env=env)
    assert prune.returncode == 0, prune.stderr
    backup = Path(next(line.split(": ", 1)[1] for line in prune.stderr.splitlines() if line.startswith("Backup")))
    before = run_rdzvctl(["get", "-o", "raw"], env=env, text=False).stdout
    if name.startswith("legacy"):
        data = before.replace(b"\x8c\x0flast_heartbeats", b"\x8c\x10last_keep_alives")
        assert decode(data).round == decode(before).round
    else:
        data = dict((n, d) for n, _, d in trust_payloads())[name]
    doc = json.loads(backup.read_text())
    doc["state_base64"] = base64.b64encode(data).decode("ascii")
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    done = run_rdzvctl(["restore", str(tampered), "--yes"], env=env)
    assert done.returncode == 6, done.stderr
    assert "nothing was written" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert run_rdzvctl(["get", "-o", "raw"], env=env, text=False).stdout == before


# -- hash floods --------------------------------------------------------------------
def _flood_outcome(name: str, data: bytes) -> str:
    try:
        decode(data)
    except StateError as exc:
        return type(exc).__name__ + ": " + str(exc)
    return "decoded"


def _expected_flood(name: str, outcome: str) -> bool:
    if name == "hash-node-ids":  # a valid state: decoded (at the cap: more nodes than decoded, or over the budget)
        return outcome == "decoded" or "more than 262,144 nodes" in outcome or "builds more than" in outcome
    if name.startswith("hash-int64"):  # ints a state may hold reach the unpickler: no state, or over the budget
        return outcome.startswith("StateCorruptError") and ("not a _RendezvousState" in outcome
                                                            or "builds more than" in outcome)
    return outcome.startswith("StateCorruptError") and "refused before unpickling" in outcome


@pytest.mark.parametrize("name, data", list(hash_flood_payloads(220_000)),
                         ids=[name for name, _ in hash_flood_payloads(2_000)])
def test_hash_floods_are_refused(name: str, data: bytes) -> None:
    outcome = _flood_outcome(name, data)
    assert _expected_flood(name, outcome), outcome


_HASH_SCRIPT = r"""
import json, os, sys
from rdzvctl.errors import StateError
from rdzvctl.state import codec
outcomes = {}
for name in sorted(os.listdir(FOLDER)):
    with open(os.path.join(FOLDER, name), "rb") as f:
        data = f.read()
    try:
        codec.decode(data)
        outcomes[name] = "decoded"
    except StateError as exc:
        outcomes[name] = type(exc).__name__ + ": " + str(exc)
    del data
print(json.dumps(outcomes))
"""


def test_hash_floods_at_the_cap_are_refused(tmp_path: Path) -> None:
    """Before the fix one 16 MiB flood would run for hours; the kill timeout only keeps a regression from hanging.

    The floods are written here (building them takes more memory than decoding them) and decoded in
    a child under a 256 MiB address space."""
    # The ones the prescan refuses stop at their first opcode whatever their size: one of them suffices here.
    wanted = {"hash-int64-same-hash", "hash-int64-low-bits", "hash-int64-low-bits-keys", "hash-node-ids",
              "hash-tuple-items"}
    for name, data in hash_flood_payloads(codec.MAX_STATE_BYTES, wanted):
        (tmp_path / name).write_bytes(data)
    done = _child(_HASH_SCRIPT.replace("FOLDER", repr(str(tmp_path))), address_space=256 << 20, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = json.loads(done.stdout)
    assert set(outcomes) == wanted
    unexpected = {name: outcome for name, outcome in outcomes.items() if not _expected_flood(name, outcome)}
    assert not unexpected, unexpected


def _p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + pickle.STOP


_TD = b"cdatetime\ntimedelta\n"
_DT = b"cdatetime\ndatetime\n"
_SET = b"c__builtin__\nset\n"


@pytest.mark.parametrize("body, reason", [
    (pickle.BINFLOAT + b"\x3f\xf0" + b"\x00" * 6, "float"),
    (pickle.FLOAT + b"1.5\n", "float"),
    (pickle.LONG1 + b"\x09" + b"\x00" * 8 + b"\x01", "beyond 64 bits"),
    (pickle.LONG4 + b"\x01\x00\x00\x00\x01", "beyond 64 bits"),
    (pickle.INT + b"12345678901234567890\n", "beyond 64 bits"),
    (pickle.LONG + b"12345678901234567890L\n", "beyond 64 bits"),
    (pickle.MARK + pickle.FROZENSET, "frozenset"),
    (pickle.NONE + pickle.TUPLE1, "tuple that is not a call's arguments"),
    (pickle.NONE + pickle.TUPLE1 + pickle.MEMOIZE + pickle.POP, "tuple that is not a call's arguments"),
    (pickle.EMPTY_DICT + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x02" + pickle.TUPLE2 + pickle.NONE
     + pickle.SETITEM, "tuple that is not a call's arguments"),
])
def test_opcodes_no_state_holds_are_refused_before_unpickling(body: bytes, reason: str) -> None:
    with pytest.raises(StateCorruptError, match=reason):
        decode(_p4(body))


@pytest.mark.parametrize("body", [
    pickle.INT + b"-9223372036854775808\n",
    pickle.INT + b"01\n",
    pickle.LONG + b"9223372036854775807L\n",
    pickle.LONG1 + b"\x08" + b"\xff" * 7 + b"\x7f",
])
def test_ints_within_64_bits_pass_the_prescan(body: bytes) -> None:
    from rdzvctl.state import prescan

    prescan.scan(_p4(body))
    with pytest.raises(StateCorruptError, match="not a _RendezvousState"):
        decode(_p4(body))


@pytest.mark.parametrize("body", [
    # the argument tuple survives in the memo only if the call accepted it
    _TD + pickle.BININT1 + b"\x02" + pickle.BININT1 + b"\x00" + pickle.BININT1 + b"\x00" + pickle.TUPLE3
    + pickle.MEMOIZE + pickle.REDUCE,  # a two-day offset
    _TD + pickle.BININT1 + b"\x00" + pickle.BININT1 + b"\x00" + pickle.TUPLE2 + pickle.REDUCE,
    _DT + pickle.BININT2 + b"\xea\x07" + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x01" + pickle.TUPLE3
    + pickle.REDUCE,  # datetime(2026, 1, 1): not how a datetime pickles
    _SET + pickle.EMPTY_LIST + pickle.BININT1 + b"\x01" + pickle.APPEND + pickle.TUPLE1 + pickle.REDUCE,
    _SET + pickle.EMPTY_TUPLE + pickle.REDUCE,
])
def test_allowed_calls_take_only_what_their_pickles_pass(body: bytes) -> None:
    with pytest.raises(StateCorruptError, match="never does|other than a built _NodeDesc"):
        decode(_p4(body))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torchs_own_pickles_pass_the_narrow_calls(protocol: int) -> None:
    """torch's pickle of a state with a deadline, heartbeats and sets, at every protocol, still decodes."""
    import datetime as dt

    state = RendezvousState(round=2, complete=True, deadline=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    state.participants[A] = 0
    state.wait_list.add(NodeDesc("node-b", 2, 0))
    state.last_heartbeats[A] = dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.timezone.utc)
    raw = encode(state)
    torch_bytes = pickle.dumps(_torch_object(raw), protocol=protocol)
    assert decode(torch_bytes) == state


def _torch_object(raw: bytes) -> object:
    pytest.importorskip("torch")
    return pickle.loads(raw)  # noqa: S301 - our own encode() output, loaded by torch's classes


def test_states_with_more_nodes_than_decoded_are_refused() -> None:
    from bench.states import state_bytes
    from tests.reliability.malicious.corpus import node_hash_flood

    assert len(decode(node_hash_flood(200_000)).wait_list) > 5_000
    with pytest.raises(StateCorruptError, match="more than 262,144 nodes"):
        decode(node_hash_flood(10_000_000))  # about 277,000 nodes
    # a real state at the cap has fewer
    assert len(decode(state_bytes(180_000)).participants) == 180_000


def test_the_prescan_run_stops_at_a_failed_opcode_on_this_python() -> None:
    """Python 3.11.0-3.11.4's possessive quantifiers leave the position advanced after a failed
    partial opcode (CPython gh-106052): the run must stop at the opcode itself on any 3.11."""
    from rdzvctl.state import prescan

    for body, stop in [(pickle.INT + b"12345678901234567890\n", 0), (pickle.NONE + pickle.TUPLE1, 1),
                       (pickle.EMPTY_DICT + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x02" + pickle.TUPLE2, 5)]:
        assert prescan._RUN.match(body).end() == stop  # type: ignore[union-attr]
    ordinary = pickle.BININT1 + b"\x01" + pickle.POP
    # one match covers RUN_CHUNK opcodes with an argument (a repetition: one of them and the opcodes
    # without one after it); scan() matches again from there
    assert prescan._RUN.match(ordinary * 2 * prescan.RUN_CHUNK).end() == len(ordinary) * prescan.RUN_CHUNK
    plain = pickle.NONE + pickle.POP + pickle.MEMOIZE
    assert prescan._RUN.match(plain * prescan.RUN_CHUNK).end() == len(plain) * prescan.RUN_CHUNK
    assert prescan._RUN.match(plain + ordinary * (prescan.RUN_CHUNK + 1)).end() == \
        len(plain + ordinary * prescan.RUN_CHUNK)



def test_the_prescan_run_covers_arguments_of_any_bytes() -> None:
    """An argument's bytes are matched as any byte (``.`` under re.DOTALL): newlines and NULs too."""
    from rdzvctl.state import prescan

    for payload in (b"\n", b"\n\n\x00", bytes(range(256))[:prescan.RUN_LENGTH]):
        body = pickle.SHORT_BINBYTES + bytes([len(payload)]) + payload + pickle.POP
        assert prescan._RUN.match(body).end() == len(body)  # type: ignore[union-attr]
    body = pickle.BININT1 + b"\n" + pickle.BININT2 + b"\n\n" + pickle.BINGET + b"\n" + pickle.POP
    assert prescan._RUN.match(body).end() == len(body)  # type: ignore[union-attr]

_HUGE_PUT = pickle.LONG_BINPUT + b"\xff\xff\xff\x7f"  # a 2^31-entry memo


@pytest.mark.parametrize("opcode, width", [
    (pickle.SHORT_BINUNICODE, 1), (pickle.SHORT_BINBYTES, 1), (pickle.SHORT_BINSTRING, 1),
    (pickle.BINUNICODE, 4), (pickle.BINBYTES, 4), (pickle.BINUNICODE8, 8),
])
@pytest.mark.parametrize("length", [5, 63, 64, 255])  # either side of prescan.RUN_LENGTH
def test_the_prescan_skips_counted_arguments_in_step(opcode: bytes, width: int, length: int) -> None:
    """Short arguments are skipped by the run, longer ones (and every 4- and 8-byte length) by scan()
    itself: either way an opcode hidden in the data is data, and the opcode after it is checked."""
    from rdzvctl.state import prescan

    data = (_HUGE_PUT * length)[:length]
    arg = opcode + length.to_bytes(width, "little") + data
    prescan.scan(_p4(arg + pickle.POP))
    with pytest.raises(StateCorruptError, match="memo index"):
        decode(_p4(arg + _HUGE_PUT))
    with pytest.raises(StateCorruptError, match="claims more bytes"):
        prescan.scan(b"\x80\x04" + arg[:-1 - length // 2])  # truncated: the length claims more than is left


def test_the_prescan_opcode_table_is_pickletools_own() -> None:
    """prescan's written-out table of opcodes by argument (so it need not import pickletools) is
    exactly what ``pickletools.opcodes`` says, for every opcode of this Python's pickle."""
    import pickletools

    from rdzvctl.state import prescan

    widths = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
              pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
    expected: dict = {}
    for op in pickletools.opcodes:
        assert getattr(pickle, op.name) == op.code.encode("latin-1")
        if op.arg is None:
            kind: object = ("fixed", 0)
        elif op.arg.n >= 0:
            kind = ("fixed", op.arg.n)
        elif op.arg.n == pickletools.UP_TO_NEWLINE:
            kind = "line"
        else:
            kind = ("counted", widths[op.arg.n])
        expected.setdefault(kind, set()).add(op.name)
    table = {("fixed", n): set(names) for n, names in prescan.FIXED_WIDTH.items()}
    table["line"] = set(prescan.TO_NEWLINE)
    table.update({("counted", n): set(names) for n, names in prescan.COUNTED.items()})
    assert table == expected
