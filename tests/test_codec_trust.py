"""Hostile bytes that a plain allow-list decoder accepts or chokes on (corpus: ``trust_payloads`` and friends).

* BUILDs that would change the allowed classes (``_NodeDesc.__hash__ = None``,
  ``__del__ = _codecs.encode``): refused, the classes unchanged afterwards, no
  "Exception ignored" on stderr, later decodes unaffected;
* states torch's agents cannot use: refused by decode, and by the write gate;
* floods of cheap opcodes at the size cap: refused under a 256 MiB address
  space (in a child process);
* tuple nests under a 1 MiB stack (``ulimit -s 1024``): no crash, in a child.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from rdzvctl.errors import StateCorruptError, StateError, StateUnsafeError
from rdzvctl.state import codec
from rdzvctl.state.codec import check_writable, decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.malicious.corpus import trust_payloads

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
               convert._StateShell, type(codec.ALLOWED_GLOBALS[("_codecs", "encode")])]
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
    assert sum("builds more than" in o for o in outcomes.values()) >= 5  # container floods hit the metered budget


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
