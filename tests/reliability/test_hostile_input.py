"""Hostile input: the decoder fuzzed, malicious pickles refused, bad files and bad addresses refused clearly.

* ≥ 100,000 fuzzed inputs (a seeded loop in its own process, see
  fuzz_decoder.py) plus hypothesis for structure: only ``StateError`` ever
  escapes, the allow-list lookup (instrumented) never hands out a global
  outside ``ALLOWED_GLOBALS``, memory stays bounded;
* a corpus of malicious pickles (malicious/corpus.py), proven live against
  plain ``pickle.loads``, refused by the decoder and by every command on
  every backend, with nothing executed (marker files);
* malformed, mistyped and huge files for ``set -f`` and ``restore``: one
  clear line, exit 2, nothing written;
* bad endpoints, URLs, TLS material and passwords: one clear line, and the
  password never printed, not even with ``-v``.
"""

from __future__ import annotations

import base64
import copyreg
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdzvctl.errors import StateError
from rdzvctl.state import codec
from rdzvctl.state.codec import ALLOWED_GLOBALS, decode, encode
from tests.reliability.common import REPO_ROOT, assert_one_line_error, cli_env, put_state, rdzvctl, sample_state
from tests.reliability.fuzz_decoder import instrument_allow_list
from tests.reliability.malicious.corpus import EXTENSION_CODE, Payload, build_corpus
from tests.reliability.recorder import Recorder
from tests.reliability.servers import Target
from tests.support.cli import invoke
from tests.support.etcd_server import ROOT_PASSWORD
from tests.support.redis_server import (
    ACL_USER,
    DEFAULT_PASSWORD,
    make_tls_files,
)

FUZZ_INPUTS = int(os.environ.get("RDZVCTL_FUZZ_INPUTS", "100000"))
#: Growth of the fuzzing process's peak RSS allowed over its warm-up (deep nesting needs some).
RSS_BOUND_KIB = 96 * 1024


# -- 1. fuzzing the decoder ---------------------------------------------------------------------------
@pytest.mark.slow
def test_fuzz_decoder_bulk(recorder: Recorder) -> None:
    """100,000 mutated and generated inputs; run in a child so even an interpreter crash is caught."""
    env = cli_env({"PYTHONHASHSEED": "0"})
    done = subprocess.run([sys.executable, "-m", "tests.reliability.fuzz_decoder", "--inputs", str(FUZZ_INPUTS),
                           "--seed", "20261124"], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert done.returncode == 0, f"the fuzzing process died (exit {done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    crashes = report["crashes"]
    recorder.add("fuzz", "inputs:seeded mutations (child process)", report["inputs"])
    recorder.add("fuzz", "crashes:seeded mutations (child process)", len(crashes))
    recorder.add("fuzz", "disallowed:seeded mutations (child process)", len(report["disallowed_handed_out"]))
    print(json.dumps({k: v for k, v in report.items() if k not in ("crashes", "memory_refusals")}))
    assert not crashes, crashes[:3]
    assert report["disallowed_handed_out"] == []
    assert set(report["globals_handed_out"]) <= {f"{m}.{n}" for m, n in ALLOWED_GLOBALS}
    assert report["globals_refused"] > 0, "the fuzzing never reached the allow-list"
    assert report["decoded"] > 0 and sum(report["refused"].values()) > 0
    assert report["rss_growth_kib"] < RSS_BOUND_KIB, f"peak RSS grew by {report['rss_growth_kib']} KiB"
    assert report["slowest_input"]["seconds"] < 2.0, report["slowest_input"]


@pytest.fixture
def allow_list_log() -> Iterator[List[Tuple[str, str, bool]]]:
    log, undo = instrument_allow_list()
    try:
        yield log
    finally:
        undo()


def _assert_allowed_only(log: List[Tuple[str, str, bool]]) -> None:
    handed = {(m, n) for m, n, ok in log if ok}
    assert handed <= set(ALLOWED_GLOBALS), sorted(handed - set(ALLOWED_GLOBALS))


# Field values of any picklable shape: what a broken or hostile writer could put in a state.
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
    st.datetimes(timezones=st.sampled_from([None, _dt.timezone.utc, _dt.timezone(_dt.timedelta(hours=5))])),
    st.timedeltas(), st.builds(lambda: codec._TorchNode({"addr": "n", "pid": 1, "local_id": 0})),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)),
    max_leaves=8,
)
_node_fields = st.dictionaries(st.sampled_from(["addr", "pid", "local_id", "fqdn", "extra", ""]), _values, max_size=5)
_nodes = _node_fields.map(codec._TorchNode)
_state_fields = st.fixed_dictionaries(
    {},
    optional={name: st.one_of(_values, st.dictionaries(_nodes, _values, max_size=3), st.frozensets(_nodes, max_size=3))
              for name in ["round", "complete", "deadline", "closed", "participants", "wait_list", "redundancy_list",
                           "last_heartbeats", "last_keep_alives", "unknown_field"]},
)


def _dump(fields: Any, protocol: int) -> bytes:
    import io

    buffer = io.BytesIO()
    codec._TorchNamePickler(buffer, protocol).dump(codec._TorchState(fields))
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=_state_fields, protocol=st.integers(2, 5))
def test_fuzz_decoder_structure(fields: Any, protocol: int, allow_list_log: Any, recorder: Recorder) -> None:
    """torch-shaped states whose fields hold anything: a valid state or a StateError, never a crash
    (protocol 2 pickles some values through globals outside the allow-list: refused as unsafe)."""
    recorder.add("fuzz", "inputs:hypothesis (shaped states)")
    try:
        data = _dump(fields, protocol)
    except Exception:  # the pure-Python pickler refuses some drawn shapes
        return
    try:
        decode(data)
    except StateError:
        pass
    except BaseException:
        recorder.add("fuzz", "crashes:hypothesis (shaped states)")
        raise
    _assert_allowed_only(allow_list_log)


_FIXED_NOW = _dt.datetime(2026, 11, 24, 22, 0, tzinfo=_dt.timezone.utc)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), protocol=st.integers(2, 5))
def test_fuzz_decoder_spliced_opcodes(data: Any, protocol: int, allow_list_log: Any, recorder: Recorder) -> None:
    """A real state with hypothesis-chosen opcodes (and arguments) spliced in anywhere."""
    recorder.add("fuzz", "inputs:hypothesis (spliced opcodes)")
    state = encode(sample_state(nodes=2, now=_FIXED_NOW), protocol=protocol)
    pos = data.draw(st.integers(0, len(state)))
    codes = sorted({op.code.encode("latin-1") for op in __import__("pickletools").opcodes})
    insert = b"".join(data.draw(st.lists(st.tuples(st.sampled_from(codes), st.binary(max_size=9)), max_size=6)
                                .map(lambda items: [c + a for c, a in items])))
    try:
        decode(state[:pos] + insert + state[pos:])
    except StateError:
        pass
    except BaseException:
        recorder.add("fuzz", "crashes:hypothesis (spliced opcodes)")
        raise
    _assert_allowed_only(allow_list_log)


# -- 2. malicious pickles ---------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path: Path) -> List[Payload]:
    return build_corpus(tmp_path / "markers")


def _markers_created(corpus: List[Payload]) -> List[str]:
    return [p.name for p in corpus if p.marker and os.path.exists(p.marker)]


def test_the_corpus_is_live(corpus: List[Payload], tmp_path: Path) -> None:
    """Plain pickle.loads runs every live payload (in a child): the corpus is not harmless bytes."""
    (tmp_path / "markers").mkdir()
    live = [p for p in corpus if p.live]
    script = (f"import copyreg, json, pickle, sys\ncopyreg.add_extension('os', 'system', {EXTENSION_CODE})\n"
              "for item in json.load(sys.stdin):\n"
              "    try:\n        pickle.loads(bytes.fromhex(item))\n    except BaseException:\n        pass\n")
    subprocess.run([sys.executable, "-c", script], input=json.dumps([p.data.hex() for p in live]), text=True,
                   capture_output=True, timeout=120, cwd=tmp_path)
    assert len(live) >= 25
    assert sorted(_markers_created(live)) == sorted(p.name for p in live)


def test_malicious_pickles_are_refused(corpus: List[Payload], tmp_path: Path, allow_list_log: Any,
                                       recorder: Recorder) -> None:
    """Each payload refused with a StateError (unsafe where it names code), nothing executed; with a
    copyreg extension registered and already cached, EXT opcodes are still refused."""
    (tmp_path / "markers").mkdir()
    copyreg.add_extension("os", "system", EXTENSION_CODE)
    copyreg._extension_cache[EXTENSION_CODE] = os.system  # type: ignore[attr-defined]
    outcomes = {}
    try:
        for payload in corpus:
            try:
                decode(payload.data)
                outcomes[payload.name] = "decoded"
            except StateError as exc:
                outcomes[payload.name] = type(exc).__name__
            except BaseException as exc:  # noqa: BLE001 - recorded, then failed below
                outcomes[payload.name] = f"crash {type(exc).__name__}: {exc}"
    finally:
        copyreg.remove_extension("os", "system", EXTENSION_CODE)
    executed = _markers_created(corpus)
    refused = [name for name, outcome in outcomes.items() if outcome.startswith("State")]
    recorder.add("malicious", "total", len(corpus))
    recorder.add("malicious", "refused", len(refused))
    recorder.add("malicious", "executed", len(executed))
    assert not executed, executed
    assert len(refused) == len(corpus), {n: o for n, o in outcomes.items() if not o.startswith("State")}
    for payload in corpus:  # everything that reaches for code is refused as unsafe, not merely corrupt
        if payload.live:
            assert outcomes[payload.name] == "StateUnsafeError", (payload.name, outcomes[payload.name])
    _assert_allowed_only(allow_list_log)


def _invoke(target: Target, args: List[str], run_id: str, *, verbose: bool = False,
            env: Optional[dict] = None) -> Any:
    command, rest = args[0], args[1:]
    return invoke([*(["-v"] if verbose else []), command, *target.flags(run_id), *rest], env=env)


def test_malicious_state_through_every_command(target: Target, corpus: List[Payload], tmp_path: Path,
                                               recorder: Recorder) -> None:
    """A payload stored in a real backend: get, corrupt-detect, reset --mode prune, edit, watch and
    restore refuse it (exit 6, one line), nothing is executed, nothing is written."""
    (tmp_path / "markers").mkdir()
    payload = next(p for p in corpus if p.name == "state-node-addr-eval")
    run_id = f"evil-{os.getpid()}-{tmp_path.name[-6:]}"
    backend = target.open(run_id)
    token = put_state(backend, payload.data)
    backups = tmp_path / "backups"
    env = {"RDZVCTL_BACKUP_DIR": str(backups), "EDITOR": "true"}
    checked = 0
    for args in (["get"], ["get", "-o", "json"], ["corrupt-detect"], ["reset", "--mode", "prune", "--yes"],
                 ["reset", "--mode", "reopen", "--yes"], ["edit", "--yes"]):
        result = _invoke(target, args, run_id, env=env)
        assert result.exit_code == 6, (args, result.exit_code, result.stderr)
        assert "unsafe" in (result.stdout + result.stderr).lower(), (args, result.stdout, result.stderr)
        checked += 1
    watch = _invoke(target, ["watch", "-o", "json", "--until", "complete", "--for", "1"], run_id, env=env)
    assert any(json.loads(line)["kind"] == "state-corrupt" for line in watch.stdout.splitlines() if line.strip())
    assert backend.get_state()[1] == token, "a refused command wrote"

    # The repair: clear removes it, keeping the bytes in a backup...
    result = _invoke(target, ["reset", "--mode", "clear", "--yes"], run_id, env=env)
    assert result.exit_code == 0, result.stderr
    assert backend.get_state() is None
    (saved,) = backups.iterdir()
    # ...which restore then refuses to plant again for torch to unpickle.
    result = invoke(["restore", str(saved), "--yes"], env=env)
    assert result.exit_code == 6, result.stderr
    assert "nothing was written" in assert_one_line_error(result.stderr)
    assert backend.get_state() is None
    checked += 3
    executed = _markers_created(corpus)
    recorder.add("malicious", f"stored in {target.id}: commands run, all refused/repaired safely",
                 checked if not executed else 0)
    assert not executed


# -- 3. bad files for set -f and restore -------------------------------------------------------------------
def _valid_doc() -> dict:
    from rdzvctl.state.jsonform import state_to_json

    return state_to_json(sample_state(round=7))


def _with(**changes: Any) -> str:
    doc = _valid_doc()
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc)


_DROP = object()
NODE = "trainer-0.cluster.local_4100_0"

BAD_STATE_FILES = {
    "empty": b"",
    "not json": b"{round: 1",
    "truncated": _with().encode()[:-7],
    "binary garbage": bytes(range(256)) * 4,
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
    "top-level list": b"[]",
    "top-level string": b'"state"',
    "top-level null": b"null",
    "round as text": _with(round="7").encode(),
    "round negative": _with(round=-1).encode(),
    "round float": _with(round=7.5).encode(),
    "round true": _with(round=True).encode(),
    "round NaN": _with().replace('"round": 7', '"round": NaN').encode(),
    "round with 5000 digits": _with().replace('"round": 7', '"round": ' + "9" * 5000).encode(),
    "complete as text": _with(complete="yes").encode(),
    "participants list": _with(participants=[NODE]).encode(),
    "participant id malformed": _with(participants={"no-underscores": 0}).encode(),
    "rank as text": _with(participants={NODE: "0"}).encode(),
    "heartbeat not a time": _with(last_heartbeats={NODE: "yesterday"}).encode(),
    "deadline a number": _with(deadline=12).encode(),
    "wait list a dict": _with(wait_list={NODE: 1}).encode(),
    "unknown field": _with(favourite_colour="blue").encode(),
    "missing field": _with(participants=_DROP).encode(),
}


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSON-looking file just over 64 MiB (sparse: no disk cost)."""
    path = tmp_path_factory.mktemp("huge") / "state.json"
    with open(path, "wb") as handle:
        handle.write(b'{"round": 1, "pad": "')
        handle.truncate(64 * 1024 * 1024 + 4096)
    return path


def _snapshot(target: Target, run_id: str) -> Any:
    backend = target.open(run_id)
    try:
        return backend.get_state()
    finally:
        backend.close()


def test_bad_state_files_for_set(target: Target, tmp_path: Path, huge_file: Path) -> None:
    run_id = f"badfile-{tmp_path.name[-8:]}"
    put_state(target.open(run_id), sample_state(round=3))
    before = _snapshot(target, run_id)
    backups = tmp_path / "backups"
    cases = dict(BAD_STATE_FILES)
    for name, content in cases.items():
        path = tmp_path / f"{len(os.listdir(tmp_path))}.json"
        path.write_bytes(content)
        result = _invoke(target, ["set", "-f", str(path), "--yes", "--backup-dir", str(backups)], run_id)
        assert result.exit_code == 2, (name, result.exit_code, result.stderr, result.exception)
        assert_one_line_error(result.stderr)
    result = _invoke(target, ["set", "-f", str(huge_file), "--yes", "--backup-dir", str(backups)], run_id)
    assert result.exit_code == 2 and "larger than" in assert_one_line_error(result.stderr)
    assert _snapshot(target, run_id) == before, "a refused file changed the state"
    assert not backups.exists(), "a refused file made a backup (it is validated before anything else)"


def _backup_doc(target: Target, run: str, **changes: Any) -> dict:
    doc = {"format": "rdzvctl.backup/v1", "backend": target.backend, "endpoint": target.endpoint, "run_id": run,
           "conf": target.conf, "token": None, "time": "2026-11-24T22:00:00Z", "command": "set",
           "state_base64": base64.b64encode(encode(sample_state(round=9))).decode()}
    for key, value in changes.items():
        if value is _DROP:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


def test_bad_backup_files_for_restore(target: Target, tmp_path: Path) -> None:
    run_id = f"badbackup-{tmp_path.name[-8:]}"
    put_state(target.open(run_id), sample_state(round=3))
    before = _snapshot(target, run_id)
    cases = {
        "empty": b"",
        "not json": b"{",
        "nested too deep": b"[" * 100_000 + b"]" * 100_000,
        "a state, not a backup": _with().encode(),
        "wrong format": json.dumps(_backup_doc(target, run_id, format="rdzvctl.backup/v0")).encode(),
        "run id not text": json.dumps(_backup_doc(target, run_id, run_id=42)).encode(),
        "state not base64": json.dumps(_backup_doc(target, run_id, state_base64="%%%")).encode(),
        "state a number": json.dumps(_backup_doc(target, run_id, state_base64=7)).encode(),
        "conf not a map": json.dumps(_backup_doc(target, run_id, conf=["a"])).encode(),
        "missing backend": json.dumps(_backup_doc(target, run_id, backend=_DROP)).encode(),
    }
    for name, content in cases.items():
        path = tmp_path / f"{len(os.listdir(tmp_path))}.json"
        path.write_bytes(content)
        result = invoke(["restore", str(path), "--yes", "--backup-dir", str(tmp_path / "b")])
        assert result.exit_code == 2, (name, result.exit_code, result.stderr, result.exception)
        assert_one_line_error(result.stderr)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(257 * 1024 * 1024)
    result = invoke(["restore", str(huge), "--yes"])
    assert result.exit_code == 2 and "larger than" in assert_one_line_error(result.stderr)
    # A backup of bytes that are not a state (corrupt, not only unsafe) is not written either.
    path = tmp_path / "corrupt.json"
    path.write_text(json.dumps(_backup_doc(target, run_id, state_base64=base64.b64encode(b"\x80\x04K").decode())))
    result = invoke(["restore", str(path), "--yes", "--backup-dir", str(tmp_path / "b")])
    assert result.exit_code == 6, result.stderr
    assert _snapshot(target, run_id) == before


# -- 4. bad addresses and secrets ---------------------------------------------------------------------------
BAD_ADDRESSES = [
    # (backend, endpoint, conf, expected exit)
    ("c10d", "127.0.0.1:notaport", "", 2),
    ("c10d", "127.0.0.1:0", "", 2),
    ("c10d", "127.0.0.1:70000", "", 2),
    ("c10d", "[::1", "", 2),
    ("c10d", "bad host name!:29400", "", 2),
    ("c10d", "127.0.0.1:29400", "store_type=carrier-pigeon", 2),
    ("c10d", "127.0.0.1:29400", "read_timeout=-1", 2),
    ("c10d", "/definitely/not/here", "store_type=file", 5),  # a missing FileStore reads as "no state"
    ("redis", "ftp://127.0.0.1:6379", "", 2),
    ("redis", "redis://127.0.0.1:notaport/0", "", 2),
    ("redis", "redis://127.0.0.1:6379/notadb", "", 2),
    ("redis", "127.0.0.1:6379", "ssl_ca_certs=/no/such/ca.pem", 2),
    ("redis", "127.0.0.1:6379", "cluster=maybe", 2),
    ("etcd-v2", "ftp://127.0.0.1:2379", "", 2),
    ("etcd-v2", "127.0.0.1:2379:1", "", 4),  # read as an IPv6 host: "cannot resolve the host name"
    ("etcd-v3", "http://", "", 2),
    ("etcd-v3", "127.0.0.1:99999", "", 2),
    ("etcd-v3", "127.0.0.1:2379", "protocol=gopher", 2),
    ("etcd-v3", "127.0.0.1:2379", "ca_cert=/no/such/ca.pem", 2),
]


@pytest.mark.parametrize("backend,endpoint,conf,code", BAD_ADDRESSES)
def test_bad_endpoints_and_options(backend: str, endpoint: str, conf: str, code: int) -> None:
    args = ["get", "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--timeout", "2"]
    result = invoke(args + (["--rdzv-conf", conf] if conf else []))
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert_one_line_error(result.stderr)


def test_unreachable_servers_are_one_clear_line(tmp_path: Path) -> None:
    from tests.support.torch_peer import blackhole_server, refused_port

    port = refused_port()
    for backend in ("c10d", "redis", "etcd-v2", "etcd-v3"):
        result = invoke(["get", "--rdzv-backend", backend, "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "j",
                         "--timeout", "2"])
        line = assert_one_line_error(result.stderr)
        assert result.exit_code == 4 and f"127.0.0.1:{port}" in line, (backend, line)
    with blackhole_server() as port:
        for backend in ("c10d", "redis", "etcd-v3"):
            result = invoke(["get", "--rdzv-backend", backend, "--rdzv-endpoint", f"127.0.0.1:{port}",
                             "--rdzv-id", "j", "--timeout", "1"])
            assert result.exit_code == 4 and "Timeout" in assert_one_line_error(result.stderr), (backend, result.stderr)


WRONG_PASSWORD = "Wr0ng-pa55word-Xyzzy"


def _secret_free(result: Any, *secrets: str) -> None:
    text = (result.stdout or "") + (result.stderr or "")
    for secret in secrets:
        assert secret not in text, f"{secret!r} was printed:\n{text}"


def _redis_auth_cases(server: Any) -> List[Tuple[str, List[str], dict, int]]:
    host = f"127.0.0.1:{server.port}"
    return [
        ("wrong password in --rdzv-conf", [host, f"password={WRONG_PASSWORD}"], {}, 4),
        ("wrong password in the URL", [f"redis://:{WRONG_PASSWORD}@{host}/0", ""], {}, 4),
        ("wrong ACL password", [f"redis://{ACL_USER}:{WRONG_PASSWORD}@{host}/0", ""], {}, 4),
        ("wrong password from REDIS_PASSWORD", [host, ""], {"REDIS_PASSWORD": WRONG_PASSWORD}, 4),
        ("no password", [host, ""], {}, 4),
        ("password in a URL with a bad port", [f"redis://:{WRONG_PASSWORD}@127.0.0.1:bad/0", ""], {}, 2),
        ("right password, refused port", [f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:1/0", ""], {}, 4),
    ]


@pytest.mark.parametrize("verbose", [False, True])
def test_redis_wrong_passwords_are_clear_and_never_printed(redis_server_auth: Any, verbose: bool) -> None:
    for name, (endpoint, conf), env, code in [(c[0], c[1], c[2], c[3]) for c in _redis_auth_cases(redis_server_auth)]:
        args = ["get", "--rdzv-backend", "redis", "--rdzv-endpoint", endpoint, "--rdzv-id", "j", "--timeout", "3"]
        result = invoke((["-v"] if verbose else []) + args + (["--rdzv-conf", conf] if conf else []), env=env)
        assert result.exit_code == code, (name, result.exit_code, result.stderr)
        _secret_free(result, WRONG_PASSWORD, DEFAULT_PASSWORD)
        if not verbose:
            assert_one_line_error(result.stderr)


@pytest.mark.parametrize("verbose", [False, True])
def test_etcd_wrong_passwords_are_clear_and_never_printed(etcd_auth_server: Any, verbose: bool) -> None:
    endpoint = etcd_auth_server.endpoint
    cases = [
        ("etcd-v3", f"username=root,password={WRONG_PASSWORD}", {}),
        ("etcd-v3", "username=root", {"ETCD_PASSWORD": WRONG_PASSWORD}),
        ("etcd-v3", f"username=nobody,password={ROOT_PASSWORD}", {}),
    ]
    for backend, conf, env in cases:
        args = ["get", "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", "j", "--timeout", "3",
                "--rdzv-conf", conf]
        result = invoke((["-v"] if verbose else []) + args, env=env)
        assert result.exit_code == 4, (conf, result.exit_code, result.stderr)
        _secret_free(result, WRONG_PASSWORD, ROOT_PASSWORD)
        if not verbose:
            assert "authentication" in assert_one_line_error(result.stderr) or "refused" in result.stderr


def test_secrets_never_printed_by_the_real_process_with_verbose(redis_server_auth: Any,
                                                               etcd_auth_server: Any) -> None:
    """The installed entry point (main(), not click's runner), -v and RDZVCTL_VERBOSE: no password anywhere."""
    runs = [
        rdzvctl(["-v", "get", "--rdzv-backend", "redis", "--rdzv-endpoint",
                 f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis_server_auth.port}/0", "--rdzv-id", "j", "--timeout", "3"]),
        rdzvctl(["get", "--rdzv-backend", "etcd-v3", "--rdzv-endpoint", etcd_auth_server.endpoint, "--rdzv-id", "j",
                 "--rdzv-conf", f"username=root,password={WRONG_PASSWORD}", "--timeout", "3"],
                env={"RDZVCTL_VERBOSE": "1"}),
        rdzvctl(["-v", "set", "--rdzv-backend", "redis", "--rdzv-endpoint",
                 f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{redis_server_auth.port}/0", "--rdzv-id", "j", "--round", "1",
                 "--yes", "--timeout", "3"]),
    ]
    for run in runs:
        assert run.returncode in (4, 5), run.stderr
        assert WRONG_PASSWORD not in run.stdout + run.stderr and DEFAULT_PASSWORD not in run.stdout + run.stderr
    assert "Traceback" in runs[0].stderr  # -v really was verbose


def test_bad_tls_material(redis_server_tls: Any, etcd_tls_server: Any, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    other = make_tls_files(tmp_path / "other-ca")  # a CA that did not sign the servers' certificates
    redis_tls = f"rediss://127.0.0.1:{redis_server_tls.port}/0"
    etcd = etcd_tls_server
    cases = [
        ("redis", redis_tls, f"ssl_ca_certs={garbage}", 2),
        ("redis", redis_tls, "ssl_ca_certs=/no/such/ca.pem", 2),
        ("redis", redis_tls, f"ssl_ca_certs={other.ca}", 4),
        ("redis", f"redis://127.0.0.1:{redis_server_tls.port}/0", "", 4),  # plain text to a TLS port
        ("etcd-v3", etcd.endpoint, f"protocol=https,ca_cert={garbage}", 2),
        ("etcd-v3", etcd.endpoint, f"protocol=https,ca_cert={other.ca}", 4),
        ("etcd-v3", etcd.endpoint, f"protocol=https,ca_cert={etcd.tls.ca_cert}", 4),  # no client certificate
        ("etcd-v3", etcd.endpoint, f"protocol=https,ca_cert={etcd.tls.ca_cert},ssl_cert={garbage}", 2),
        ("etcd-v3", etcd.endpoint, "protocol=http", 4),  # plain HTTP to an HTTPS member
        ("etcd-v2", etcd.endpoint, f"protocol=https,ca_cert={other.ca}", 4),
    ]
    for backend, endpoint, conf, code in cases:
        args = ["get", "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", "j", "--timeout", "3"]
        result = invoke(args + (["--rdzv-conf", conf] if conf else []))
        assert result.exit_code == code, (backend, conf, result.exit_code, result.stderr)
        assert_one_line_error(result.stderr)
