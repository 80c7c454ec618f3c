"""Acceptance of "trust under hostile and odd input": every hostile class, every command, every backend.

The corpus is generated here (class 5 reuses test_hostile_output's strings,
classes 1, 2 and 4 the trust payloads of malicious/corpus.py):

1. BUILDs that mutate the allowed classes (slot state on ``_NodeDesc``,
   ``__hash__ = None``, ``__del__ = _codecs.encode``, ...);
2. states torch's agents cannot use (slot-state node fields, frozensets,
   lists) and legacy field names (``fqdn``, ``last_keep_alives``);
3. resource bombs: ranks {0, 10**12} in a complete round, 8 MiB of
   EMPTY_SET, a flood exactly at ``MAX_STATE_BYTES``;
4. odd values: round and pid of 10**5000, lone surrogates, a tuple nest just
   under the hash-depth guard decoded under ``ulimit -s 1024``;
5. terminal escapes in node addresses and the run id;
6. the invocation's secret inside the data, and URL passwords in addresses.

The bytes are written by torch itself where torch has a backend
(``C10dRendezvousBackend`` over a real TCPStore and FileStore,
``EtcdRendezvousBackend`` over etcd v2) and by rdzvctl's backend elsewhere
(redis, etcd v3).  Every rdzvctl run is a real process under ``ulimit -v``
(:data:`ADDRESS_SPACE`) whose peak RSS must stay under :data:`MAX_RSS`: the
``VmHWM`` of the rdzvctl image itself, read at its exit (``ru_maxrss`` would
also count the pages of the test process it was forked from, which holds the
corpus).  Text output goes to a pseudo-terminal and its exact bytes are
checked; a refused write leaves the backend's bytes and token as they were.
"""

from __future__ import annotations

import base64
import datetime as _dt
import itertools
import json
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import threading
import tty
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from rdzvctl.backup import Backup, read_backup, write_backup
from rdzvctl.state import codec
from rdzvctl.state.codec import TORCH_MODULE, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.common import REPO_ROOT, cli_env, put_state, sample_state
from tests.reliability.malicious.corpus import (
    _fields,
    _global,
    _shell,
    _str,
    deep_tuple_payloads,
    resource_payloads,
    trust_payloads,
)
from tests.reliability.servers import Target, TcpStoreServer
from tests.reliability.test_hostile_output import FORBIDDEN, FORGED, HOSTILE_ADDRS, RUN_ID, hostile_state

# -- bounds ------------------------------------------------------------------------------------------
#: Address space of every rdzvctl process.  Measured (VmPeak): ~100 MiB for ``get`` of a small state over
#: a FileStore, ~280 MiB refusing a flood at the size cap; threads add their stacks and malloc arenas.
ADDRESS_SPACE = 1024 * 1024 * 1024
#: Peak resident memory of every rdzvctl process, whatever the store holds.
MAX_RSS = 256 * 1024 * 1024
#: The stack the deep-tuple state is decoded under (``ulimit -s 1024``).
SMALL_STACK = 1024 * 1024
#: The largest state each store can hold (base64 makes 4/3 of it): etcd refuses requests over 1.5 MiB
#: (``--max-request-bytes``); torch's libuv TCPStore server drops a connection that sends a value over
#: 8 MiB (``Connection reset by peer``).  FileStore and redis hold the size cap.
STORE_LIMIT = {"etcd-v2": 1100 * 1024, "etcd-v3": 1100 * 1024, "c10d-tcp": 6 * 1024 * 1024}
SMALL_FLOOD = 1024 * 1024
FLOOD = 8 * 1024 * 1024

#: The invocation's secret (a variable every backend registers and none uses), planted in the data.
SECRET = "Pl4nted-s3cret-value"
#: A password in a URL inside a node address: masked by the scrubber's patterns in text output.
URL_SECRET = "Url-pa55word-in-data"
SECRET_ENV = {"REDISCLI_AUTH": SECRET}

WORKERS = 4
#: Judge liveness over half an hour, so no node of a test state dies while the tests run.
LIVENESS = {"keep_alive_interval": "600", "keep_alive_max_attempt": "3"}


# -- the corpus --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hostile:
    """One hostile value: its class, the exact bytes, and how rdzvctl must treat it."""

    name: str
    cls: str
    data: bytes
    #: ``refused``: decoding fails (corrupt/unsafe, exit 6); ``legacy``: decodes, never written back
    #: as is; ``valid``: a usable state whose strings are hostile.
    kind: str = "refused"
    run_id: str = ""
    #: Findings corrupt-detect must report (valid states): exit 1 instead of 0.
    findings: bool = False
    small_stack: bool = False

    def rid(self, label: str) -> str:
        return f"{self.run_id or self.name}@{label}"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _legacy_state() -> bytes:
    """What older torch wrote: ``fqdn`` for the address, ``last_keep_alives`` for the heartbeats."""
    node = (_global(TORCH_MODULE, "_NodeDesc") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK
            + _str("fqdn") + _str("old-node") + _str("pid") + pickle.BININT1 + b"\x07" + _str("local_id")
            + pickle.BININT1 + b"\x00" + pickle.SETITEMS + pickle.BUILD)
    fields = _fields(complete=pickle.NEWTRUE, participants=pickle.EMPTY_DICT + node + pickle.BININT1 + b"\x00"
                     + pickle.SETITEM)
    fields = fields.replace(_str("last_heartbeats"), _str("last_keep_alives"))
    return pickle.PROTO + b"\x04" + _shell(fields) + pickle.STOP


def _huge_ranks() -> bytes:
    now = _now()
    state = RendezvousState(round=4, complete=True)
    nodes = [NodeDesc("rank-a", 1, 0), NodeDesc("rank-b", 2, 0)]
    state.participants = {nodes[0]: 0, nodes[1]: 10**12}
    state.last_heartbeats = {n: now for n in nodes}
    return encode(state)


def _secret_state() -> bytes:
    now = _now()
    state = RendezvousState(round=2, complete=True)
    nodes = [NodeDesc(f"node-{SECRET}", 1, 0), NodeDesc(f"redis://admin:{URL_SECRET}@db", 2, 0)]
    state.participants = {n: i for i, n in enumerate(nodes)}
    state.last_heartbeats = {n: now for n in nodes}
    return encode(state)


def _deep_tuple_depth() -> int:
    """Just under the deepest tuple nest decode agrees to hash (before the codec's prescan: the old guard)."""
    try:
        from rdzvctl.state import prescan
    except ImportError:
        return codec.SAFE_HASH_DEPTH - 1
    return prescan.MAX_HELPER_STACK // prescan.BYTES_PER_LEVEL - 1


def corpus() -> List[Hostile]:
    """Every hostile value of the six classes, several of each."""
    classes = {"class-mutation": "1-mutate", "unusable": "2-unusable", "edge": "4-odd"}
    out = [Hostile(name, classes[kind], data) for name, kind, data in trust_payloads()]
    out.append(Hostile("legacy-field-names", "2-unusable", _legacy_state(), kind="legacy"))
    out.append(Hostile("ranks-0-and-10**12", "3-bomb", _huge_ranks(), kind="valid", findings=True))
    floods = dict(resource_payloads(FLOOD))
    small = dict(resource_payloads(SMALL_FLOOD))
    out.append(Hostile("flood-empty-set-8MiB", "3-bomb", floods["flood-empty-set"]))
    for name in ("flood-empty-set", "flood-nodes"):
        out.append(Hostile(f"{name}-1MiB", "3-bomb", small[name]))
    cap = dict(resource_payloads(codec.MAX_STATE_BYTES))["flood-empty-list"]
    cap += b"." * (codec.MAX_STATE_BYTES - len(cap))  # exactly at the cap (the STOPs after the first are never read)
    out.append(Hostile("at-the-size-cap", "3-bomb", cap))
    depth = _deep_tuple_depth()
    deep = dict(deep_tuple_payloads(depth))
    out.append(Hostile(f"deep-tuple-{depth}-small-stack", "4-odd", deep[f"deep-tuple-in-a-state-{depth}"],
                       small_stack=True))
    out.append(Hostile("escapes", "5-escapes", encode(hostile_state()), kind="valid", run_id=RUN_ID, findings=True))
    out.append(Hostile("secrets", "6-secrets", _secret_state(), kind="valid"))
    return out


CORPUS = corpus()
BY_NAME = {h.name: h for h in CORPUS}
DEEP = next(h.name for h in CORPUS if h.small_stack)
#: One of each class, through every command on every backend.
REPRESENTATIVES = ["class-node-del-codecs", "unusable-frozen-wait-list", "flood-empty-set-8MiB", "edge-round-10**5000",
                   "escapes", "secrets"]
#: More of each class, through every command on the store without any authentication (TCPStore).
MORE = ["class-node-hash-none", "legacy-field-names", "ranks-0-and-10**12", "edge-addr-lone-surrogate", DEEP]


def fits(target: Target, h: Hostile) -> bool:
    return len(h.data) <= STORE_LIMIT.get(target.id, codec.MAX_STATE_BYTES)


def on(target: Target, items: Sequence[Hostile]) -> List[Hostile]:
    return [h for h in items if fits(target, h)]


def stand_in(target: Target, h: Hostile) -> Hostile:
    """``h``, or the same flood at 1 MiB where the store cannot hold it, or (FileStore) not once per command.

    A FileStore is one log that rdzvctl replays whole, keeping every key's value: a dozen 8 MiB floods
    beside each other are what :func:`test_filestore_memory_does_not_grow_with_the_other_keys` is about.
    """
    if fits(target, h) and not (target.id == "c10d-file" and len(h.data) > SMALL_FLOOD + 4096):
        return h
    return BY_NAME[h.name.replace("-8MiB", "-1MiB")]


# -- writing the bytes (torch where torch has a backend) ----------------------------------------------
_TORCH_WRITER = r"""
import base64, json, sys
from datetime import timedelta
import etcd
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

print("ready", flush=True)
for line in sys.stdin:  # one request a line: where, and the runs to write there
    spec = json.loads(line)
    host, _, port = spec["endpoint"].rpartition(":")
    if spec["kind"] == "etcd-v2":
        client = etcd.Client(host=host, port=int(port), protocol="http", read_timeout=30)
        make = lambda run_id: EtcdRendezvousBackend(client, run_id, key_prefix=spec["prefix"], ttl=7200)
    else:
        if spec["kind"] == "file":
            store = dist.FileStore(spec["endpoint"], -1)
        else:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60), use_libuv=True)
        make = lambda run_id: C10dRendezvousBackend(store, run_id)
    for run_id, data in spec["runs"]:
        result = make(run_id).set_state(base64.b64decode(data))
        assert result is not None and result[2], run_id
    print("written", flush=True)
"""


class TorchWriter:
    """One process that imported torch once and writes states through torch's own rendezvous backends."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _TORCH_WRITER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
        assert self.process.stdout.readline().strip() == "ready", "the torch writer did not start"
        self.lock = threading.Lock()

    def write(self, spec: Dict[str, Any]) -> None:
        with self.lock:
            self.process.stdin.write(json.dumps(spec) + "\n")
            self.process.stdin.flush()
            answer = self.process.stdout.readline().strip()
        assert answer == "written", f"torch could not write the states (exit {self.process.poll()})"

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


_WRITER: List[TorchWriter] = []


@pytest.fixture(scope="module", autouse=True)
def torch_writer() -> Iterator[None]:
    pytest.importorskip("torch")
    try:
        yield
    finally:
        while _WRITER:
            _WRITER.pop().close()


def write_runs(target: Target, runs: Dict[str, bytes]) -> None:
    """Store each run's exact bytes: through torch's own backend where it has one, else rdzvctl's."""
    if target.backend in ("c10d", "etcd-v2"):
        if not _WRITER:
            _WRITER.append(TorchWriter())
        kind = "etcd-v2" if target.backend == "etcd-v2" else ("file" if target.conf.get("store_type") else "tcp")
        _WRITER[0].write({"kind": kind, "endpoint": target.endpoint.rpartition("//")[2],
                          "prefix": target.conf.get("key_prefix") or "/torch/elastic/rendezvous",
                          "runs": [(run_id, base64.b64encode(data).decode()) for run_id, data in runs.items()]})
        return
    for run_id, data in runs.items():
        with target.open(run_id) as backend:
            put_state(backend, data)


_namespaces = itertools.count(1)


@pytest.fixture()
def namespace(target: Target, tmp_path: Path) -> Iterator[Target]:
    """A part of the shared server no other test sees: its own TCPStore, file, redis db or etcd prefix."""
    number = next(_namespaces)
    server: Optional[TcpStoreServer] = None
    if target.id == "c10d-tcp":
        from tests.reliability.conftest import tcpstore_zygote

        server = TcpStoreServer(tcpstore_zygote())
        ns = Target(target.id, "c10d", server.endpoint, {}, server)
    elif target.id == "c10d-file":
        path = tmp_path / "filestore"
        path.write_bytes(b"")
        ns = Target(target.id, "c10d", str(path), {"store_type": "file"}, None)
    elif target.id == "redis":
        db = 1 + number % 15  # never db 0, where the other modules keep their runs
        ns = Target(target.id, "redis", f"redis://{target.endpoint}/{db}", {}, target.server)
        with ns.open("flush") as backend:
            backend.client.flushdb()  # the db may hold an earlier run's data
    else:
        ns = Target(target.id, target.backend, target.endpoint,
                    {"key_prefix": f"/hostile-{os.getpid()}-{number}"}, target.server)
    try:
        yield ns
    finally:
        if server is not None:
            server.stop()


# -- running rdzvctl -----------------------------------------------------------------------------------
@dataclass
class Run:
    label: str
    args: List[str]
    code: int
    out: bytes
    err: bytes
    maxrss: int  # bytes

    @property
    def text(self) -> str:
        return (self.out + self.err).decode("utf-8", "backslashreplace")


#: Runs rdzvctl in this process and, at exit, records its peak RSS (VmHWM of this image, not the forking parent's).
_MEASURED = r"""
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["HOSTILE_TEST_PEAK_FILE"], "w") as out:
        out.write(peak)
atexit.register(report)
sys.argv[0] = "rdzvctl"
runpy.run_module("rdzvctl", run_name="__main__", alter_sys=True)
"""


def run_cli(label: str, args: Sequence[str], *, tty_out: bool = False, env: Optional[Dict[str, str]] = None,
            stack: Optional[int] = None, timeout: float = 120) -> Run:
    """``python -m rdzvctl ARGS`` under ``ulimit -v`` (and ``-s``); stdout on a pseudo-terminal if ``tty_out``."""
    limits = f"ulimit -v {ADDRESS_SPACE // 1024}" + (f" -s {stack // 1024}" if stack else "")
    peak_file = tempfile.NamedTemporaryFile(prefix="rdzvctl-peak-", delete=False)
    peak_file.close()
    environ = cli_env({**SECRET_ENV, **(env or {}), "HOSTILE_TEST_PEAK_FILE": peak_file.name})
    master = slave = -1
    if tty_out:
        master, slave = os.openpty()
        tty.setraw(slave)  # no CR added to line ends: the bytes are exactly what rdzvctl wrote
        environ.pop("NO_COLOR", None)
        environ.update({"TERM": "xterm-256color", "COLUMNS": "200"})
    command = ["/bin/bash", "-c", f'{limits} && exec "$@"', "bash", sys.executable, "-c", _MEASURED, *args]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave if tty_out else subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environ, cwd=REPO_ROOT)
    if tty_out:
        os.close(slave)
    chunks: Dict[str, List[bytes]] = {"out": [], "err": []}

    def drain(key: str, read: Callable[[], bytes]) -> None:
        while True:
            try:
                data = read()
            except OSError:  # EIO: the pty's last writer is gone
                return
            if not data:
                return
            chunks[key].append(data)

    readers = [threading.Thread(target=drain, args=("err", lambda: proc.stderr.read1(65536)), daemon=True),
               threading.Thread(target=drain, args=("out", (lambda: os.read(master, 65536)) if tty_out
                                                     else (lambda: proc.stdout.read1(65536))), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for reader in readers:
        reader.join(30)
    if tty_out:
        os.close(master)
    proc.stderr.close()
    if proc.stdout:
        proc.stdout.close()
    peak = Path(peak_file.name).read_text()
    os.unlink(peak_file.name)
    return Run(label, list(args), proc.returncode, b"".join(chunks["out"]), b"".join(chunks["err"]),
               int(peak) * 1024 if peak else -1)


def run_all(jobs: List[Tuple[str, List[str], Dict[str, Any]]]) -> Dict[str, Run]:
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {label: pool.submit(run_cli, label, args, **kw) for label, args, kw in jobs}
        return {label: future.result() for label, future in futures.items()}


# -- what every run must show ---------------------------------------------------------------------------
_SGR = __import__("re").compile(rb"\x1b\[[0-9;]*m")


def check_run(run: Run, code: int, stderr: str, *, on_tty: bool = False, raw: bool = False) -> str:
    """Exit code, stderr (``empty``, one error ``line``, a ``plan`` then one error line, or ``info``),
    no traceback, bounded memory, inert output, no secret."""
    err = run.err.decode("utf-8", "backslashreplace")
    assert run.code == code, f"{run.label}: exit {run.code}, expected {code}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err and "internal error" not in run.text.lower(), f"{run.label}:\n{err[-3000:]}"
    assert run.maxrss > 0, f"{run.label}: the process died before reporting its peak RSS (exit {run.code})"
    assert run.maxrss <= MAX_RSS, f"{run.label}: peak RSS {run.maxrss >> 20} MiB"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rdzvctl: ")]
    if stderr == "empty":
        assert not lines, f"{run.label}: expected nothing on stderr:\n{err}"
    elif stderr == "line":
        assert len(lines) == 1 and len(errors) == 1, f"{run.label}: expected exactly one error line:\n{err}"
    elif stderr == "plan":
        assert len(errors) == 1 and lines[-1] == errors[0], f"{run.label}: expected a plan and one error line:\n{err}"
    else:
        assert not errors, f"{run.label}: an error line on success:\n{err}"
    out = run.out
    if on_tty:
        out = _SGR.sub(b"", out)
    text = run.err.decode("utf-8") + ("" if raw else out.decode("utf-8"))  # strict: no lone surrogate, valid UTF-8
    assert "\x1b" not in text and "\x1b[5m" not in text, f"{run.label}: raw ESC in the output:\n{text[:3000]!r}"
    for ch in FORBIDDEN:
        assert ch not in text, f"{run.label}: raw {ch!r} in the output:\n{text[:3000]!r}"
    for line in text.split("\n"):
        assert not line.startswith(FORGED), f"{run.label}: a forged line {line!r}"
    assert SECRET not in text, f"{run.label}: the secret was printed:\n{text[:3000]}"
    if "json" not in run.args and not raw:
        assert URL_SECRET not in text, f"{run.label}: a URL password from the data was printed"
    return text


def snapshot(target: Target, run_id: str) -> Any:
    with target.open(run_id) as backend:
        return backend.get_state()


def assert_no_secret_in_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert SECRET not in text and URL_SECRET not in text, path


# -- 1. every hostile value through get, on every backend --------------------------------------------
def test_every_hostile_value_through_get(namespace: Target) -> None:
    items = on(namespace, CORPUS)
    write_runs(namespace, {h.rid("read"): h.data for h in items})
    runs = run_all([(h.name, ["get", *namespace.flags(h.rid("read"), **LIVENESS)],
                     {"stack": SMALL_STACK if h.small_stack else None, "tty_out": True}) for h in items])
    failures = []
    for h in items:
        try:  # the report names the reason on stdout; a refused state is exit 6
            text = check_run(runs[h.name], 6 if h.kind == "refused" else 0, "empty", on_tty=True)
            if h.kind == "refused":
                assert "state-unsafe" in text or "state-corrupt" in text, f"{h.name}: no reason shown:\n{text}"
        except AssertionError as exc:
            failures.append(str(exc)[:1200])
    for h in items:  # reading wrote nothing
        current = snapshot(namespace, h.rid("read"))
        assert current is not None and current[0] == h.data, h.name
    assert not failures, "\n".join(failures)


# -- 2. a representative of each class through every command --------------------------------------------
def _matrix(ns: Target, h: Hostile, backups: Path, backup_file: Path) -> List[Tuple[Any, ...]]:
    """(label, args, run options, exit code, stderr form, what it writes: none/clear/write) for each command."""
    refused, legacy = h.kind == "refused", h.kind == "legacy"
    kw: Dict[str, Any] = {"stack": SMALL_STACK if h.small_stack else None}
    tty_kw = {**kw, "tty_out": True}

    def flags(command: str) -> List[str]:
        return ns.flags(h.rid(command), **LIVENESS)

    bdir = ["--backup-dir", str(backups)]
    decode_code = 6 if refused else 0
    detect_code = 6 if refused else (1 if h.findings or legacy else 0)
    prunable = h.name == "escapes"  # its dead nodes (an hour without a heartbeat)
    w = "none"
    rows = [
        # reports: the reason is in the report on stdout (or the one JSON document), stderr stays empty
        ("get", ["get", *flags("get")], tty_kw, decode_code, "empty", w),
        ("get-json", ["get", "-o", "json", *flags("get-json")], kw, decode_code, "empty", w),
        ("get-raw", ["get", "-o", "raw", *flags("get-raw")], kw, 0, "empty", w),
        ("corrupt-detect", ["corrupt-detect", "--fail-on", "info", *flags("corrupt-detect")], tty_kw, detect_code,
         "empty", w),
        # refused bytes are a state-corrupt event, never "complete": --until times out (exit 1, one line)
        ("watch", ["watch", "--until", "complete", "--for", "3", "--interval", "0.2", *flags("watch")], tty_kw,
         1 if refused else 0, "line" if refused else "empty", w),
        # clear plans over any bytes: off a terminal it needs --yes; with it, it saves the bytes and removes them
        ("clear", ["reset", "--mode", "clear", *bdir, *flags("clear")], tty_kw, 2, "plan", w),
        ("clear-yes", ["reset", "--mode", "clear", "--yes", *bdir, *flags("clear-yes")], tty_kw, 0, "info", "clear"),
        # the other repairs start from the decoded state: refused bytes are refused before any question
        ("reopen", ["reset", "--mode", "reopen", *bdir, *flags("reopen")], tty_kw, 6 if refused else 0,
         "line" if refused else "info", w),
        ("reopen-yes", ["reset", "--mode", "reopen", "--yes", *bdir, *flags("reopen-yes")], tty_kw,
         6 if refused else 0, "line" if refused else "info", w),
        ("prune", ["reset", "--mode", "prune", *bdir, *flags("prune")], tty_kw,
         6 if refused else (2 if prunable else 0), "line" if refused else ("plan" if prunable else "info"), w),
        ("prune-yes", ["reset", "--mode", "prune", "--yes", *bdir, *flags("prune-yes")], tty_kw,
         6 if refused else 0, "line" if refused else "info", "write" if prunable else w),
        ("set-closed", ["set", "--closed", *bdir, *flags("set-closed")], tty_kw, 6 if refused else 2,
         "line" if refused else "plan", w),
        ("set-closed-yes", ["set", "--closed", "--yes", *bdir, *flags("set-closed-yes")], tty_kw,
         6 if refused else 0, "line" if refused else "info", w if refused else "write"),
        # EDITOR=true leaves the document unchanged: nothing to write
        ("edit-yes", ["edit", "--yes", *bdir, *flags("edit-yes")], {**tty_kw, "env": {"EDITOR": "true"}},
         6 if refused else 0, "line" if refused else "info", w),
        # a backup holding the hostile bytes, restored over a healthy run: refused unless torch can use them
        ("restore-yes", ["restore", str(backup_file), "--yes", *bdir, *flags("restore-yes")], tty_kw,
         6 if refused or legacy else 0, "line" if refused or legacy else "info", w if refused or legacy else "write"),
    ]
    return rows


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_every_command_on_a_representative_of_each_class(namespace: Target, name: str, tmp_path: Path) -> None:
    every_command(namespace, stand_in(namespace, BY_NAME[name]), tmp_path)


@pytest.mark.parametrize("target", ["c10d-tcp"], indirect=True)
@pytest.mark.parametrize("name", MORE)
def test_every_command_on_more_of_each_class_over_a_tcpstore(namespace: Target, name: str, tmp_path: Path) -> None:
    every_command(namespace, BY_NAME[name], tmp_path)


def every_command(namespace: Target, h: Hostile, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backup_file = write_backup(Backup(namespace.backend, namespace.endpoint, h.rid("restore-yes"), namespace.conf,
                                      None, "2026-01-01T00:00:00Z", "reset", h.data), tmp_path / "saved")
    rows = _matrix(namespace, h, backups, backup_file)
    healthy = encode(sample_state(round=7))
    runs_data = {h.rid(row[0]): h.data for row in rows if row[0] != "restore-yes"}
    runs_data[h.rid("restore-yes")] = healthy
    write_runs(namespace, runs_data)
    before = {row[0]: snapshot(namespace, h.rid(row[0])) for row in rows}
    results = run_all([(label, args, kw) for label, args, kw, *_ in rows])
    failures = []
    for label, _args, kw, code, stderr, writes in rows:
        run = results[label]
        try:
            check_run(run, code, stderr, on_tty=bool(kw.get("tty_out")), raw=label == "get-raw")
            after = snapshot(namespace, h.rid(label))
            if label == "get-raw":
                assert run.out == h.data, f"{label}: not the exact bytes"
            if label == "get-json" and code == 0:
                assert json.loads(run.out)["run_id"] == h.rid("get-json")
            if writes == "none":
                assert after == before[label], f"{label}: the backend changed"
            elif writes == "clear":
                assert after is None, f"{label}: the state is still there"
            else:
                assert after is not None and after[0] != before[label][0], f"{label}: nothing was written"
                codec.check_writable(after[0]) if hasattr(codec, "check_writable") else codec.decode(after[0])
        except AssertionError as exc:
            failures.append(str(exc)[:1500])
    for path in backups.rglob("*"):  # every backup is private and holds exactly what was replaced
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent
            assert read_backup(path).state in (h.data, healthy), path
    assert_no_secret_in_files(backups)
    assert not failures, "\n".join(failures)


# -- 3. a hostile run never hides the healthy ones ------------------------------------------------------
def test_a_hostile_run_never_hides_the_others(namespace: Target) -> None:
    items = [h for h in CORPUS if len(h.data) <= SMALL_FLOOD + 4096]
    runs: Dict[str, bytes] = {}
    healthy: List[str] = []
    for i, h in enumerate(items):
        runs[h.rid("list")] = h.data
        for side in ("a", "b"):
            run_id = f"healthy-{i}-{side}"
            runs[run_id] = encode(sample_state(round=i))
            healthy.append(run_id)
    write_runs(namespace, runs)
    flags = namespace.flags(None, **LIVENESS)
    results = run_all([
        ("list", ["list", *flags], {"tty_out": True, "stack": SMALL_STACK}),
        ("list-json", ["list", "-o", "json", *flags], {"stack": SMALL_STACK}),
        ("detect-all", ["corrupt-detect", "--all", *flags], {"tty_out": True, "stack": SMALL_STACK}),
        ("detect-all-json", ["corrupt-detect", "--all", "-o", "json", *flags], {"stack": SMALL_STACK}),
    ])
    text = check_run(results["list"], 0, "empty", on_tty=True)
    for run_id in healthy:
        assert sum(run_id in line for line in text.splitlines()) == 1, f"{run_id} missing from list:\n{text}"
    check_run(results["list-json"], 0, "empty")
    by_id = {row["run_id"]: row for row in json.loads(results["list-json"].out)["runs"]}
    assert set(runs) <= set(by_id), set(runs) - set(by_id)
    for h in items:  # its row says what is wrong with it
        if h.kind == "refused":
            assert by_id[h.rid("list")]["health"] in ("unsafe", "corrupt"), by_id[h.rid("list")]
    for run_id in healthy:
        assert by_id[run_id]["health"] == "ok", by_id[run_id]
    # --all: a finding with its reason for each hostile run, every healthy run judged ok; exit 6 (some are unsafe)
    text = check_run(results["detect-all"], 6, "empty", on_tty=True)
    for run_id in healthy:
        assert sum(run_id in line for line in text.splitlines()) == 1, f"{run_id} missing from --all:\n{text}"
    check_run(results["detect-all-json"], 6, "empty")
    judged = {run["run_id"]: run for run in json.loads(results["detect-all-json"].out)["runs"]}
    assert set(runs) <= set(judged), set(runs) - set(judged)
    for h in items:
        run = judged[h.rid("list")]
        if h.kind == "refused":
            assert run["status"] in ("unsafe", "corrupt"), run
            assert [p["code"] for p in run["problems"]] == [f"state-{run['status']}"] and run["problems"][0]["message"]
    for run_id in healthy:
        assert judged[run_id]["status"] == "ok" and judged[run_id]["problems"] == [], judged[run_id]


# -- the security document names only real tests --------------------------------------------------------
def test_docs_security_cites_only_tests_that_exist() -> None:
    import re

    text = (REPO_ROOT / "docs" / "security.md").read_text()
    cited = 0
    for cell in re.findall(r"`((?:reliability/)?test_\w+\.py)::(\w+)`((?:, `::\w+`)*)", text):
        path, first, more = cell
        source = (REPO_ROOT / "tests" / path).read_text()
        for name in [first, *re.findall(r"`::(\w+)`", more)]:
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), f"docs/security.md cites {path}::{name}"
            cited += 1
    assert cited >= 20, cited
    assert "docs/security.md" in (REPO_ROOT / "README.md").read_text()


# -- a FileStore full of other keys ---------------------------------------------------------------------
def test_filestore_memory_does_not_grow_with_the_other_keys(tmp_path: Path) -> None:
    """Anyone who can write the file can append other keys: reading one run must not hold them all."""
    path = tmp_path / "filestore"
    path.write_bytes(b"")
    store = Target("c10d-file", "c10d", str(path), {"store_type": "file"}, None)
    flood = BY_NAME["flood-empty-set-8MiB"].data
    write_runs(store, {**{f"filler-{i}": flood for i in range(24)}, "healthy": encode(sample_state())})
    run = run_cli("get healthy", ["get", *store.flags("healthy", **LIVENESS)], tty_out=True)
    check_run(run, 0, "empty", on_tty=True)


def test_the_corpus_holds_every_class_and_each_has_a_representative() -> None:
    counts: Dict[str, int] = {}
    for h in CORPUS:
        counts[h.cls] = counts.get(h.cls, 0) + 1
    assert sorted(counts) == ["1-mutate", "2-unusable", "3-bomb", "4-odd", "5-escapes", "6-secrets"], counts
    assert all(counts[c] >= 3 for c in ("1-mutate", "2-unusable", "3-bomb", "4-odd")), counts
    assert len(HOSTILE_ADDRS) >= 10 and "\x1b" in RUN_ID  # class 5: one state, every kind of escape
    assert {BY_NAME[n].cls for n in REPRESENTATIVES} == set(counts)
    assert len(BY_NAME["at-the-size-cap"].data) == codec.MAX_STATE_BYTES
