"""Shared pieces of the reliability tests: realistic states and rdzvctl subprocesses."""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.state.codec import decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = [
    "REPO_ROOT",
    "CliRun",
    "sample_state",
    "put_state",
    "read_round",
    "cli_env",
    "rdzvctl",
    "spawn_rdzvctl",
    "assert_one_line_error",
    "assert_error_line",
    "wait_connected",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def sample_state(round: int = 0, nodes: int = 3, now: Optional[_dt.datetime] = None,
                 dead: int = 0) -> RendezvousState:
    """A complete round of ``nodes`` participants heartbeating now, ``dead`` of them a minute ago."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    state = RendezvousState(round=round, complete=True, closed=False)
    members = [NodeDesc(f"trainer-{i}.cluster.local", 4100 + i, 0) for i in range(nodes)]
    state.participants = {node: rank for rank, node in enumerate(members)}
    for i, node in enumerate(members):
        age = 60 if i >= nodes - dead else 1
        state.last_heartbeats[node] = now - _dt.timedelta(seconds=age)
    return state


def put_state(backend: RendezvousBackend, state: Union[RendezvousState, bytes]) -> Any:
    """Store ``state`` over whatever is there (fenced on the current token); returns the new token."""
    raw = state if isinstance(state, bytes) else encode(state)
    for _ in range(20):
        current = backend.get_state()
        result = backend.set_state(raw, None if current is None else current[1])
        if result is not None and result[2]:
            return result[1]
    raise AssertionError("could not store the fixture state (someone keeps writing)")


def read_round(backend: RendezvousBackend) -> Optional[int]:
    current = backend.get_state()
    return None if current is None else decode(current[0]).round


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A plain environment for ``python -m rdzvctl``: no address variables, no colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RDZVCTL_"))}
    env.update({"NO_COLOR": "1", "COLUMNS": "120", "PYTHONPATH": str(REPO_ROOT)})
    env.pop("EDITOR", None)
    env.pop("VISUAL", None)
    env.update(extra or {})
    return env


@dataclass
class CliRun:
    """A finished rdzvctl process: exit code, output and wall time."""

    args: List[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


def rdzvctl(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60,
            input: Optional[str] = None, python_args: Sequence[str] = ()) -> CliRun:
    """Run ``python -m rdzvctl ARGS`` to completion (``timeout``: the test's own hang guard)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, *python_args, "-m", "rdzvctl", *args], capture_output=True, text=True,
                          env=cli_env(env), timeout=timeout, input=input, stdin=None if input else subprocess.DEVNULL)
    return CliRun(list(args), done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def spawn_rdzvctl(args: Sequence[str], env: Optional[Dict[str, str]] = None,
                  python_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``python -m rdzvctl ARGS`` without waiting (stdout/stderr piped, text)."""
    return subprocess.Popen([sys.executable, *python_args, "-m", "rdzvctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=cli_env(env))


def assert_one_line_error(stderr: str, *, secrets: Sequence[str] = ()) -> str:
    """stderr is one ``rdzvctl: Error: message`` line, without a traceback or any secret."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith("rdzvctl: "), lines[0]
    assert "Traceback" not in stderr
    for secret in secrets:
        assert secret not in stderr, f"the secret {secret!r} was printed"
    return lines[0]


def assert_error_line(stderr: str, *, secrets: Sequence[str] = ()) -> str:
    """stderr ends with the one ``rdzvctl: Error: message`` line (a write's plan may precede it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rdzvctl: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final error line, got:\n{stderr}"
    assert "Traceback" not in stderr
    for secret in secrets:
        assert secret not in stderr, f"the secret {secret!r} was printed"
    return errors[0]


def _socket_inodes(pid: int) -> set:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def wait_connected(pid: int, port: int, timeout: float = 30.0) -> bool:
    """Wait until process ``pid`` has an established TCP connection to 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    remote = f"0100007F:{port:04X}"
    while time.monotonic() < deadline:
        inodes = _socket_inodes(pid)
        if inodes:
            with open("/proc/net/tcp") as table:
                for line in table.readlines()[1:]:
                    cols = line.split()
                    if cols[2] == remote and cols[3] == "01" and cols[9] in inodes:
                        return True
        time.sleep(0.01)
    return False
