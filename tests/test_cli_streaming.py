"""``list`` and ``corrupt-detect --all`` stream their ``-o json`` document: the same document, one run per line.

Fresh processes on a real FileStore file: piped (compact, one run a line), on a terminal
(a pty: byte for byte ``json.dumps(indent=2)``), and with no run at all.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import subprocess
import sys

import pytest

from rdzvctl.backends.filestore import FileStore
from rdzvctl.state.codec import encode
from rdzvctl.state.model import NodeDesc, RendezvousState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = (["list", "-o", "json"], ["corrupt-detect", "--all", "-o", "json"])


def _state(nodes: int) -> bytes:
    now = _dt.datetime.now(_dt.timezone.utc)
    state = RendezvousState(round=1, complete=True, closed=False)
    for rank in range(nodes):
        node = NodeDesc(f"node{rank}", 100 + rank, 0)
        state.participants[node] = rank
        state.last_heartbeats[node] = now
    return encode(state)


@pytest.fixture
def store(tmp_path) -> str:
    path = str(tmp_path / "store")
    files = FileStore(path, create=True)
    for i in (3, 1, 2):
        files.set(f"/torch.rendezvous.job-{i}", base64.b64encode(_state(i)))
    files.set("/torch.rendezvous.bad", b"not base64!")
    return path


def _argv(command, path):
    return [sys.executable, "-m", "rdzvctl", *command, "--rdzv-backend", "c10d", "--rdzv-endpoint", path,
            "--rdzv-conf", "store_type=file"]


def _env():
    return {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1"}


@pytest.mark.parametrize("command", COMMANDS, ids=["list", "corrupt-detect"])
def test_piped_json_is_one_document_with_a_run_per_line(store, command):
    done = subprocess.run(_argv(command, store), capture_output=True, text=True, env=_env(), timeout=60)
    assert done.returncode in (0, 6), done.stderr
    doc = json.loads(done.stdout)
    assert [r["run_id"] for r in doc["runs"]] == ["bad", "job-1", "job-2", "job-3"]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 + len(doc["runs"])  # the opening, one line per run, the closing
    assert all(json.loads(line.rstrip(","))["run_id"] for line in lines[1:-1])
    if command[0] == "corrupt-detect":
        assert doc["summary"] == {"runs": 4, "corrupt": 1, "ok": 3}
        assert list(doc) == ["schema", "fail_on", "runs", "summary", "exit_code"]
        assert doc["exit_code"] == done.returncode == 6


@pytest.mark.parametrize("command", COMMANDS, ids=["list", "corrupt-detect"])
@pytest.mark.parametrize("empty", [False, True], ids=["runs", "empty"])
def test_terminal_json_keeps_the_indented_layout(store, tmp_path, command, empty):
    path = store
    if empty:
        path = str(tmp_path / "empty")
        open(path, "wb").close()
    main, sub = os.openpty()
    proc = subprocess.Popen(_argv(command, path), stdout=sub, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=_env())
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    proc.communicate(timeout=60)
    text = out.decode().replace("\r\n", "\n").strip()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, ensure_ascii=False)
    assert len(doc["runs"]) == (0 if empty else 4)
