"""Hostile strings in a store never drive the terminal or forge a line, and secrets are never printed.

States whose node addresses, run ids and store keys hold every class of
terminal-interpreted character (OSC titles and hyperlinks, CSI clear and
colours, the C1 CSI U+009B, bidi overrides, CR/LF, TAB, DEL, zero-width
and separator characters) are written to real servers; every reading
command runs as a real process, piped (plain), piped with rich forced, and
on a pseudo-terminal (rich with colours).  The exact bytes may hold rich's
own colour sequences on the terminal and nothing else: no data-derived
control character, every one shown escaped, and no forged line.  ``-o json``
parses back to the exact strings, with the characters as ``\\u`` escapes.

Secrets: a redis server that echoes the AUTH/HELLO arguments in its error
(the commands renamed away) with ``-v``, and etcd with ``user:password@`` in
the endpoint URL: no password in stdout, stderr or a backup file.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import threading
import tty
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest

from rdzvctl.backup import Backup, write_backup
from rdzvctl.state.codec import encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from tests.reliability.common import REPO_ROOT, assert_one_line_error, cli_env, put_state
from tests.reliability.servers import Target
from tests.support.etcd_server import ROOT_PASSWORD
from tests.support.redis_server import RedisServer

#: Node addresses holding each class of dangerous character (the pid/local id follow as usual).
HOSTILE_ADDRS = [
    "osc\x1b]0;owned-title\x07",
    "clear\x1b[2J\x1b[H",
    "blink\x1b[5m",
    "link\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    "c1csi\x9b2J",
    "bidi\u202etxt.exe",
    "cr\rrdzvctl: all good",
    "lf\nrdzvctl: all good",
    "tab\tx",
    "del\x7fx",
    "zw\u200bx",
    "ls\u2028x",
    "nel\x85x",
]
#: Dead (an hour without a heartbeat): they show up in problems, prune plans and watch's stale events.
#: The commands judge liveness with a 30-minute expiry (LIVENESS), so the others stay alive while tests run.
DEAD = {"osc\x1b]0;owned-title\x07", "lf\nrdzvctl: all good", "bidi\u202etxt.exe"}
RUN_ID = "job\x1b]0;run-title\x07\u202e\x9b\nforged-run  1  yes  4  0  no  ok"
STORE_KEY = "MASTER_ADDR\x1b]0;key\x07\u202e\nforged-key"
STORE_VALUE = "10.0.0.1\x1b[2J\x9b\r"
UNSAFE_RUN = "unsafe-run"
LIVENESS = {"keep_alive_interval": "600", "keep_alive_max_attempt": "3"}
ADD_WAITING = "spare\x1b]0;arg\x07\u202e\rrdzvctl: all good_9_0"

#: Raw characters that must never appear in output (they can only come from the data).
FORBIDDEN = ["\x07", "\x9b", "\x9d", "\u202e", "\r", "\x7f", "\u200b", "\u2028", "\x85", "\t"]
FORGED = ("rdzvctl: all good", "forged-run", "forged-key")
#: rich's own styling on a terminal: SGR sequences.  The data's blink (5) is none rich uses.
_SGR = re.compile(rb"\x1b\[[0-9;]*m")


def hostile_state(round: int = 3) -> RendezvousState:
    now = _dt.datetime.now(_dt.timezone.utc)
    state = RendezvousState(round=round, complete=True, closed=False)
    nodes = [NodeDesc(addr, 4100 + i, 0) for i, addr in enumerate(HOSTILE_ADDRS)]
    state.participants = {node: rank for rank, node in enumerate(nodes)}
    for node in nodes:
        state.last_heartbeats[node] = now - _dt.timedelta(seconds=3600 if node.addr in DEAD else 1)
    waiting = NodeDesc("wait\x1b]0;w\x07\u202e", 77, 0)
    state.wait_list.add(waiting)
    state.last_heartbeats[waiting] = now
    return state


def unsafe_pickle() -> bytes:
    """A pickle naming a global whose module and name are hostile (refused, never executed)."""
    def short(text: str) -> bytes:
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    return b"\x80\x04" + short("os\x1b]0;mod\x07\u202e") + short("system\nrdzvctl: all good") + b"\x93)R."


def put_store_key(target: Target, backend: Any, run_id: str, name: str, value: bytes) -> None:
    """A per-round store key of ``run_id``, where torchrun's store puts it on that backend."""
    if target.backend == "c10d":
        backend.store.set(backend.key + f".1/{name}".encode(), value)
    elif target.backend == "etcd-v3":
        key = f"/torch/elastic/store/{run_id}/torch.rendezvous.{run_id}.1/{name}".encode()
        backend.gateway.call("kv/put", {"key": base64.b64encode(key).decode(),
                                        "value": base64.b64encode(value).decode()})


@pytest.fixture(scope="module", params=["c10d-file", "etcd-v3", "redis"])
def hostile(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    """A real server holding the hostile run, an unsafe run, a hostile store key and a backup to restore."""
    from tests.reliability.conftest import _start, _stop

    root = tmp_path_factory.mktemp(f"hostile-{request.param}")
    target = _start(request.param, root)
    try:
        with target.open(RUN_ID) as backend:
            put_state(backend, hostile_state())
            put_store_key(target, backend, RUN_ID, STORE_KEY, STORE_VALUE.encode())
        with target.open(UNSAFE_RUN) as backend:
            put_state(backend, unsafe_pickle())
        backup = write_backup(Backup(target.backend, target.endpoint, RUN_ID, {}, None, "2026-01-01T00:00:00Z",
                                     "reset", encode(hostile_state(round=1))), root / "backups")
        yield {"target": target, "backup": backup, "backups": root / "more-backups"}
    finally:
        _stop(target)


def _commands(h: Dict[str, Any]) -> List[Tuple[str, List[str], Sequence[int]]]:
    t: Target = h["target"]
    run, unsafe, none = t.flags(RUN_ID, **LIVENESS), t.flags(UNSAFE_RUN, **LIVENESS), t.flags(None, **LIVENESS)
    write = ["--backup-dir", str(h["backups"])]
    cases = [
        ("get", ["get", *run], (0,)),
        ("get json", ["get", "-o", "json", *run], (0,)),
        ("get unsafe", ["get", *unsafe], (6,)),
        ("list", ["list", *none], (0,)),
        ("list json", ["list", "-o", "json", *none], (0,)),
        ("watch", ["watch", "--until", "complete", "--timeout", "20", "--interval", "0.2", *run], (0,)),
        ("watch json", ["watch", "-o", "json", "--until", "complete", "--timeout", "20", "--interval", "0.2", *run],
         (0,)),
        ("corrupt-detect", ["corrupt-detect", "--fail-on", "info", *run], (1,)),  # torch recovers: info findings
        ("corrupt-detect unsafe", ["corrupt-detect", *unsafe], (6,)),
        ("corrupt-detect all", ["corrupt-detect", "--all", *none], (6,)),
        ("reset prune", ["reset", "--mode", "prune", "--dry-run", *write, *run], (0,)),
        ("reset clear", ["reset", "--mode", "clear", "--dry-run", *write, *run], (0,)),
        ("set", ["set", "--add-waiting", ADD_WAITING, "--dry-run", *write, *run], (0,)),
        ("restore", ["restore", str(h["backup"]), "--dry-run", *write, *run], (0,)),
        ("bad run id", ["get", *t.flags("missing\x1b]0;x\x07\u202e\nrdzvctl: all good")], (5,)),
    ]
    if t.backend != "redis":
        cases.append(("get keys", ["get", "--keys", *run], (0,)))
    return cases


def _run_piped(args: List[str], env: Dict[str, str]) -> Tuple[int, bytes, bytes]:
    done = subprocess.run([sys.executable, "-m", "rdzvctl", *args], capture_output=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=60, cwd=REPO_ROOT)
    return done.returncode, done.stdout, done.stderr


def _run_on_tty(args: List[str], env: Dict[str, str]) -> Tuple[int, bytes, bytes]:
    """stdout on a pseudo-terminal (raw mode: no CR added to line ends), stderr piped."""
    master, slave = os.openpty()
    tty.setraw(slave)
    chunks: List[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "rdzvctl", *args], stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        os.close(slave)
        slave = -1
        _, err = proc.communicate(timeout=60)
        reader.join(10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return proc.returncode, b"".join(chunks), err


MODES = {
    "piped": ({}, _run_piped),
    "piped-rich": ({"RDZVCTL_FORCE_RICH": "1"}, _run_piped),
    "tty": ({"TERM": "xterm-256color", "COLUMNS": "250"}, _run_on_tty),
}


def assert_inert(name: str, out: bytes, err: bytes, on_tty: bool) -> str:
    """No data-derived control character, nothing forged; returns the decoded text."""
    assert b"\x1b[5m" not in out + err, f"{name}: the data's own colour sequence reached the output"
    if on_tty:
        out = _SGR.sub(b"", out)
    text = (out + err).decode("utf-8")  # strict: lone surrogates or broken UTF-8 would fail here
    assert "\x1b" not in text, f"{name}: a raw ESC in the output:\n{text!r}"
    for ch in FORBIDDEN:
        assert ch not in text, f"{name}: raw {ch!r} in the output:\n{text!r}"
    for line in text.split("\n"):
        assert not line.startswith(FORGED), f"{name}: a forged line: {line!r}\n{text}"
    assert "Traceback" not in text and "internal error" not in text, text
    return text


@pytest.mark.parametrize("mode", list(MODES))
def test_hostile_strings_are_shown_escaped(hostile: Dict[str, Any], mode: str) -> None:
    extra, runner = MODES[mode]
    env = cli_env(extra)
    if mode == "tty":
        env.pop("NO_COLOR", None)
    for name, args, codes in _commands(hostile):
        code, out, err = runner(args, env)
        if mode == "tty" and name == "get":
            assert _SGR.search(out), "expected rich's colours on the terminal"
        text = assert_inert(f"{mode}/{name}", out, err, mode == "tty")
        assert code in codes, (name, code, text)
        if "json" in name:
            continue
        escaped = ["\\x1b]0;", "\\u202e"] if name not in ("watch",) else ["\\x1b]0;"]
        for form in escaped:
            assert form in text, f"{mode}/{name}: {form!r} not shown:\n{text}"
        if name in ("get keys",):
            assert "MASTER_ADDR\\x1b]0;key\\x07\\u202e\\nforged-key" in text and "10.0.0.1\\x1b[2J\\x9b\\r" in text
        if name == "list":
            assert sum("forged-run" in line for line in text.splitlines()) == 1  # inside the one real row


def test_json_keeps_the_exact_strings_as_u_escapes(hostile: Dict[str, Any]) -> None:
    t: Target = hostile["target"]
    code, out, err = _run_piped(["get", "-o", "json", *t.flags(RUN_ID)], cli_env())
    assert code == 0, err
    text = out.decode("utf-8")
    for escaped in ("\\u001b]0;owned-title\\u0007", "\\u009b2J", "\\u202etxt.exe", "\\u2028", "\\u200b", "\\u0085",
                    "\\u007f", "\\r", "\\n"):
        assert escaped in text, escaped
    doc = json.loads(text)
    assert doc["run_id"] == RUN_ID
    assert {n.rsplit("_", 2)[0] for n in doc["state"]["participants"]} == set(HOSTILE_ADDRS)
    code, out, _ = _run_piped(["watch", "-o", "json", "--until", "complete", "--timeout", "20",
                               *t.flags(RUN_ID, **LIVENESS)], cli_env())
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert events and all(e["run_id"] == RUN_ID for e in events)
    stale = {n.rsplit("_", 2)[0] for e in events if e["kind"] == "heartbeat-stale" for n in e.get("nodes", [e.get("node")])}
    assert stale == DEAD


def test_raw_output_refuses_a_terminal_without_force(hostile: Dict[str, Any]) -> None:
    t: Target = hostile["target"]
    env = cli_env({"TERM": "xterm-256color"})
    code, out, err = _run_on_tty(["get", "-o", "raw", *t.flags(RUN_ID)], env)
    assert code == 2 and out == b""
    line = assert_one_line_error(err.decode())
    assert "--force" in line and "pipe" in line
    code, out, _ = _run_on_tty(["get", "-o", "raw", "--force", *t.flags(RUN_ID)], env)
    assert code == 0 and b"owned-title" in out  # the exact bytes, as asked
    code, out, _ = _run_piped(["get", "-o", "raw", *t.flags(RUN_ID)], env)
    assert code == 0 and out.startswith(b"\x80")  # piped: the exact pickle bytes


# -- secrets --------------------------------------------------------------------------------------
ECHOED_PASSWORD = "Echo3d-s3cret-pw"
WRONG_PASSWORD = "Wr0ng-etcd-pa55"


@pytest.fixture(scope="module")
def redis_echoing_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """requirepass, with AUTH and HELLO renamed away: the server's error echoes the password it was sent."""
    args = ["--requirepass", ECHOED_PASSWORD, "--rename-command", "AUTH", "", "--rename-command", "HELLO", ""]
    server = RedisServer(tmp_path_factory.mktemp("redis-echo"), args)
    try:
        yield server
    finally:
        server.stop()


def _no_secret(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text, f"{secret!r} printed:\n{text}"


@pytest.mark.parametrize("where", ["url", "conf", "env"])
def test_redis_password_echoed_by_the_server_is_never_printed(redis_echoing_auth: RedisServer, where: str,
                                                              tmp_path: Path) -> None:
    host = f"127.0.0.1:{redis_echoing_auth.port}"
    endpoint = {"url": f"redis://user:{ECHOED_PASSWORD}@{host}/0", "conf": host, "env": host}[where]
    flags = ["--rdzv-backend", "redis", "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--timeout", "3"]
    if where == "conf":
        flags += ["--rdzv-conf", f"username=user,password={ECHOED_PASSWORD}"]
    env = cli_env({"REDIS_PASSWORD": ECHOED_PASSWORD} if where == "env" else {})
    for args in (["-v", "get", *flags], ["get", *flags], ["-v", "set", "--round", "1", "--yes",
                                                          "--backup-dir", str(tmp_path), *flags]):
        code, out, err = _run_piped(args, env)
        assert code == 4, err
        assert b"with args beginning with" in err  # the server's text is still shown, password masked
        _no_secret(ECHOED_PASSWORD, out.decode(), err.decode())
        if "-v" in args:
            assert b"Traceback" in err and b"redis.exceptions" in err
        else:
            assert_one_line_error(err.decode())
    assert not list(tmp_path.iterdir())  # nothing was reachable, so nothing was backed up


def test_etcd_credentials_in_the_url_are_used_and_never_printed(etcd_auth_server: Any,
                                                                tmp_path: Path) -> None:
    port = etcd_auth_server.endpoint.rpartition(":")[2]
    wrong = f"http://root:{WRONG_PASSWORD}@127.0.0.1:{port}"
    right = f"http://root:{ROOT_PASSWORD}@127.0.0.1:{port}"
    base = ["--rdzv-backend", "etcd-v3", "--rdzv-id", "job", "--timeout", "5"]
    for verbose in ([], ["-v"]):
        code, out, err = _run_piped([*verbose, "get", "--rdzv-endpoint", wrong, *base], cli_env())
        assert code == 4, err
        assert b"authentication" in err
        _no_secret(WRONG_PASSWORD, out.decode(), err.decode())
        if not verbose:
            assert_one_line_error(err.decode())
    from rdzvctl.state.jsonform import state_to_json

    backups = tmp_path / "backups"
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state_to_json(hostile_state())))
    code, out, err = _run_piped(["-v", "set", "-f", str(state_file), "--create", "--yes", "--backup-dir",
                                 str(backups), "--rdzv-endpoint", right, *base], cli_env())
    assert code == 0, err
    code, out2, err2 = _run_piped(["-v", "reset", "--mode", "clear", "--yes", "-o", "json", "--backup-dir",
                                   str(backups), "--rdzv-endpoint", right, *base], cli_env())
    assert code == 0, err2
    files = list(backups.iterdir())
    assert files
    for path in files:
        saved = path.read_text()
        _no_secret(ROOT_PASSWORD, saved)
        assert json.loads(saved)["endpoint"] == f"http://127.0.0.1:{port} (user root)"
    _no_secret(ROOT_PASSWORD, out.decode(), err.decode(), out2.decode(), err2.decode())


def test_secret_options_never_reach_a_backup(tmp_path: Path) -> None:
    """A password under any secret-like option or in the endpoint is dropped from a backup file."""
    from rdzvctl.backends.base import Address
    from rdzvctl.backup import read_backup

    Address("redis", "redis://u:in-the-url@h:1/0", "job", {"password": "in-the-conf"})
    path = write_backup(Backup("redis", "redis://u:in-the-url@h:1/0", "job",
                               {"password": "in-the-conf", "sentinel_password": "x-secret", "ttl": "5",
                                "note": "in-the-conf"}, None, "t", "set in-the-url", b"\x80\x04."), tmp_path)
    text = path.read_text()
    for secret in ("in-the-url", "in-the-conf", "x-secret"):
        _no_secret(secret, text)
    saved = read_backup(path)
    assert saved.conf == {"ttl": "5", "note": "***"} and saved.state == b"\x80\x04."


def test_verbose_traceback_stays_scrubbed_on_an_unexpected_error(tmp_path: Path) -> None:
    """Even a bug's traceback (-v) goes through the scrubber: the echo of a password is masked."""
    script = (
        "import sys\n"
        "from rdzvctl.backends.base import Address\n"
        "from rdzvctl.cli.main import report_error\n"
        "Address('etcd-v3', 'http://root:Tr4ceback-pw@127.0.0.1:1', 'job')\n"
        "try:\n"
        "    raise RuntimeError('echo: Tr4ceback-pw\\nrdzvctl: all good\\x1b]0;t\\x07')\n"
        "except RuntimeError as exc:\n"
        "    report_error(exc, verbose=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(),
                          timeout=60, cwd=REPO_ROOT)
    assert "Tr4ceback-pw" not in done.stderr and "\x1b" not in done.stderr
    assert not any(line.startswith("rdzvctl: all good") for line in done.stderr.splitlines())
    assert done.stderr.splitlines()[-1].startswith("rdzvctl: RuntimeError: echo: ***\\nrdzvctl: all good\\x1b]0;t")



@pytest.mark.parametrize("backend,endpoint", [
    ("etcd-v2", "http://root:V2-url-s3cret@127.0.0.1:1"),
    ("etcd-v3", "http://root:V3-url-s3cret@127.0.0.1:1,http://other:V3-url-s3cret@127.0.0.1:2"),
    ("c10d", "root:C10d-url-s3cret@127.0.0.1:1"),
    ("redis", "redis://root:Redis-url-s3cret@127.0.0.1:bad/0"),
])
def test_credentials_in_a_bad_endpoint_are_never_printed(backend: str, endpoint: str) -> None:
    code, out, err = _run_piped(["-v", "get", "--rdzv-backend", backend, "--rdzv-endpoint", endpoint,
                                 "--rdzv-id", "job", "--timeout", "2"], cli_env())
    assert code == 2, err
    _no_secret(endpoint.split(":")[2 if "://" in endpoint else 1].partition("@")[0], out.decode(), err.decode())
