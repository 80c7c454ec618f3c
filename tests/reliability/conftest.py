"""Fixtures of the reliability suite and the figures it prints at the end of the run.

Every test records what it did in the run-wide :data:`RECORDER` (through
the ``recorder`` fixture); ``pytest_terminal_summary`` prints the table:
writes attempted/accepted/refused and lost updates per backend, faults
injected/survived, fuzz inputs/crashes, malicious pickles refused, backups
written and restored byte-identical, live-job checks.

Servers: ``target`` is one healthy server per backend for the whole test run
(tests use their own run ids on it); ``fault_target`` is a separate one per
module that fault tests kill, restart and pause.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from tests.reliability.recorder import RECORDER, Recorder, summary_lines
from tests.reliability.servers import BACKEND_IDS, Target, TcpStoreZygote, make_target


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    return RECORDER


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    lines = summary_lines(RECORDER)
    if not lines:
        return
    terminalreporter.write_sep("=", "rdzvctl reliability summary")
    for line in lines:
        terminalreporter.write_line(line)
    if config.getoption("verbose") > 0 and RECORDER.fault_log:
        terminalreporter.write_line("Fault log (backend, fault, survived, outcome):")
        for backend, kind, survived, detail in RECORDER.fault_log:
            terminalreporter.write_line(f"  {backend:18} {kind:42} {'yes' if survived else 'NO':3}  {detail}")


# -- servers ------------------------------------------------------------------------------------
_ZYGOTE: Optional[TcpStoreZygote] = None
_ZYGOTE_LOCK = threading.Lock()


def tcpstore_zygote() -> TcpStoreZygote:
    """The TCPStore zygote of this test run (torch imported once), started on first use."""
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        if _ZYGOTE is None:
            pytest.importorskip("torch")
            _ZYGOTE = TcpStoreZygote()
        return _ZYGOTE


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if _ZYGOTE is not None:
        _ZYGOTE.close()


def _start(backend_id: str, root: Path) -> Target:
    zygote = tcpstore_zygote() if backend_id == "c10d-tcp" else None
    return make_target(backend_id, root, zygote)


def _stop(target: Target) -> None:
    if target.server is not None:
        target.server.stop()


@pytest.fixture(scope="session", params=BACKEND_IDS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A healthy server of each backend, shared by the whole test run (use your own run ids)."""
    root = Path(tempfile.mkdtemp(prefix=f"rdzvctl-rel-{request.param}-"))
    started = _start(request.param, root)
    try:
        yield started
    finally:
        _stop(started)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=[b for b in BACKEND_IDS if b != "c10d-file"])
def fault_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A server of each networked backend that the module's tests may kill, restart and pause."""
    root = Path(tempfile.mkdtemp(prefix=f"rdzvctl-fault-{request.param}-"))
    started = _start(request.param, root)
    try:
        yield started
    finally:
        _stop(started)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def filestore_target(tmp_path: Path) -> Target:
    """A FileStore file of its own (no server: its faults are peers holding torch's lock)."""
    return make_target("c10d-file", tmp_path)
