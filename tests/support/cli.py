"""Fixtures for CLI tests through click's test runner.

The in-memory reference backend is registered as ``memory`` for the duration
of a test, with variants ``memory-racing`` (another writer sneaks in before
our write), ``memory-broken`` (ignores tokens) and ``memory-unlisted`` (cannot
list runs nor store keys).  Each test gets its own endpoint so runs never leak between
tests.  Time is frozen at ``NOW`` so heartbeat ages and rendered output are
stable.

The fixtures (``cli_env``, ``frozen_now``, ``memory``) are registered for every
test module by ``pytest_plugins`` in ``tests/conftest.py``: name them as
arguments, import only the helpers (``invoke``, ``make_state``, ...).
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pytest
from click.testing import CliRunner, Result

import rdzvctl.backends.registry
import rdzvctl.clock
from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.cli.main import cli
from rdzvctl.state.codec import decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.testing import memory as memory_module
from rdzvctl.testing.memory import MemoryBackend
from tests.support.harness import free_port

__all__ = [
    "NOW",
    "ENV",
    "Memory",
    "RacingMemoryBackend",
    "BrokenMemoryBackend",
    "UnlistedMemoryBackend",
    "cli_env",
    "frozen_now",
    "memory",
    "invoke",
    "json_out",
    "make_state",
    "node",
    "run_rdzvctl",
    "closed_port",
]

#: The frozen "now" of every CLI test.
NOW = _dt.datetime(2026, 11, 24, 22, 0, 0, tzinfo=_dt.timezone.utc)

#: The environment every CliRunner invocation gets: plain, colourless, fixed width.
ENV = {"NO_COLOR": "1", "COLUMNS": "120", "RDZVCTL_FORCE_RICH": None, "RDZVCTL_VERBOSE": None,
       "RDZVCTL_TIMEOUT": None, "RDZVCTL_RDZV_BACKEND": None, "RDZVCTL_RDZV_ENDPOINT": None,
       "RDZVCTL_RDZV_ID": None, "RDZVCTL_RDZV_CONF": None, "PET_RDZV_BACKEND": None,
       "PET_RDZV_ENDPOINT": None, "PET_RDZV_ID": None, "PET_RDZV_CONF": None, "EDITOR": None, "VISUAL": None}

_ENDPOINTS = itertools.count(1)

#: The backends the ``memory`` fixture registers, by ``--rdzv-backend`` name.
MEMORY_BACKENDS = {
    "memory": "rdzvctl.testing.memory:MemoryBackend",
    "memory-racing": "tests.support.cli:RacingMemoryBackend",
    "memory-broken": "tests.support.cli:BrokenMemoryBackend",
    "memory-unlisted": "tests.support.cli:UnlistedMemoryBackend",
}


def node(index: int, addr: str = "trainer") -> NodeDesc:
    """A node named like a real cluster host: ``trainer-<i>.cluster.local_<4100+i>_0``."""
    return NodeDesc(f"{addr}-{index}.cluster.local", 4100 + index, 0)


def make_state(
    alive: int = 3,
    dead: int = 1,
    waiting: int = 1,
    round: int = 2,
    complete: bool = True,
    closed: bool = False,
    now: _dt.datetime = NOW,
) -> RendezvousState:
    """A realistic state at ``now``: ``alive`` + ``dead`` participants, ``waiting`` waiting nodes."""
    state = RendezvousState(round=round, complete=complete, closed=closed)
    members = [node(i) for i in range(alive + dead)]
    state.participants = {n: rank for rank, n in enumerate(sorted(members))}
    for i, n in enumerate(members):
        age = 1 + i % 10 if i < alive else 47 + i
        state.last_heartbeats[n] = now - _dt.timedelta(seconds=age)
    for j in range(waiting):
        w = node(100 + j, "spare")
        state.wait_list.add(w)
        state.last_heartbeats[w] = now - _dt.timedelta(seconds=2)
    return state


@dataclass
class Memory:
    """A registered in-memory backend endpoint and the flags that address it."""

    endpoint: str
    backend_name: str = "memory"

    def flags(self, run_id: Optional[str] = "job42", conf: Optional[str] = None,
              backend: Optional[str] = None) -> List[str]:
        """The address flags; ``backend`` picks a variant (memory-racing, memory-broken, memory-unlisted)."""
        args = ["--rdzv-backend", backend or self.backend_name, "--rdzv-endpoint", self.endpoint]
        if run_id is not None:
            args += ["--rdzv-id", run_id]
        if conf is not None:
            args += ["--rdzv-conf", conf]
        return args

    def backend(self, run_id: str = "job42") -> MemoryBackend:
        return MemoryBackend(Address("memory", self.endpoint, run_id))

    def put(self, state: Any, run_id: str = "job42") -> Any:
        """Store ``state`` (a RendezvousState or raw bytes) over whatever is there; returns the token."""
        raw = state if isinstance(state, (bytes, bytearray)) else encode(state)
        backend = self.backend(run_id)
        current = backend.peek()
        result = backend.set_state(bytes(raw), None if current is None else current[1])
        assert result is not None and result[2], "the fixture could not write"
        return result[1]

    def corrupt(self, run_id: str = "job42") -> None:
        """Make the stored value of ``run_id`` undecodable at the wrapping level (get_state raises)."""
        self.backend(run_id).corrupt()

    def raw(self, run_id: str = "job42") -> Optional[bytes]:
        current = self.backend(run_id).get_state()
        return None if current is None else current[0]

    def token(self, run_id: str = "job42") -> Any:
        current = self.backend(run_id).get_state()
        return None if current is None else current[1]

    def state(self, run_id: str = "job42") -> Optional[RendezvousState]:
        raw = self.raw(run_id)
        return None if raw is None else decode(raw)


class RacingMemoryBackend(MemoryBackend):
    """A memory backend where another writer sneaks in just before our first write.

    The intruder advances the round and adds a waiting node, fenced by the
    current token, so our own fenced write must lose.
    """

    name = "memory-racing"
    raced = 0

    def _intrude(self) -> None:
        current = MemoryBackend.get_state(self)
        if current is None:
            MemoryBackend.set_state(self, encode(make_state(round=7)), None)
        else:
            state = decode(current[0])
            state.round += 1
            state.wait_list.add(NodeDesc("intruder.cluster.local", 999, 0))
            state.last_heartbeats[NodeDesc("intruder.cluster.local", 999, 0)] = NOW
            MemoryBackend.set_state(self, encode(state), current[1])
        type(self).raced += 1

    def set_state(self, state: bytes, token: Any = None) -> Any:
        if type(self).raced == 0:
            self._intrude()
        return super().set_state(state, token)

    def clear(self, token: Any) -> bool:
        if type(self).raced == 0:
            self._intrude()
        return super().clear(token)


class UnlistedMemoryBackend(MemoryBackend):
    """A memory backend that cannot list runs (so a corrupt value comes without a token) nor store keys."""

    name = "memory-unlisted"
    capabilities = frozenset({"clear"})
    list_runs = RendezvousBackend.list_runs
    store_keys = RendezvousBackend.store_keys
    store_rounds = RendezvousBackend.store_rounds


class BrokenMemoryBackend(MemoryBackend):
    """A memory backend that breaks the contract: it writes even over a stale token."""

    name = "memory-broken"

    def set_state(self, state: bytes, token: Any = None) -> Any:
        self.drop()
        return super().set_state(state, None)


@pytest.fixture
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> _dt.datetime:
    """Freeze rdzvctl's clock (:func:`rdzvctl.clock.now_utc`, the one every caller uses) at :data:`NOW`."""
    monkeypatch.setattr(rdzvctl.clock, "now_utc", lambda: NOW)
    return NOW


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment: no address variables, backups under tmp_path/backups."""
    for key, value in ENV.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    backups = tmp_path / "backups"
    monkeypatch.setenv("RDZVCTL_BACKUP_DIR", str(backups))
    return backups


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch, cli_env: Path, frozen_now: _dt.datetime) -> Iterable[Memory]:
    """The memory backends registered, a fresh endpoint, frozen time, a clean environment."""
    monkeypatch.setattr(RacingMemoryBackend, "raced", 0)
    endpoint = f"mem-{os.getpid()}-{next(_ENDPOINTS)}"
    with rdzvctl.backends.registry.register(MEMORY_BACKENDS):
        yield Memory(endpoint)
    memory_module.forget_endpoint(endpoint)


def invoke(args: Sequence[str], input: Optional[str] = None, env: Optional[Dict[str, Optional[str]]] = None) -> Result:
    """Run ``rdzvctl ARGS`` through click's test runner (stdout and stderr kept apart)."""
    runner = CliRunner()
    return runner.invoke(cli, list(args), input=input, env={**ENV, **(env or {})}, catch_exceptions=True,
                         prog_name="rdzvctl")


def json_out(result: Result) -> Any:
    return json.loads(result.stdout)


def run_rdzvctl(args: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60,
                importtime: bool = False, text: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m rdzvctl ARGS`` as a real subprocess with a plain environment (bytes if not ``text``)."""
    base = {k: v for k, v in os.environ.items() if k not in ENV and not k.startswith(("PET_", "RDZVCTL_"))}
    base.update({"NO_COLOR": "1", "COLUMNS": "120"})
    base.update(env or {})
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "rdzvctl", *args], capture_output=True, text=text,
                          env=base, timeout=timeout)


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    return free_port()
