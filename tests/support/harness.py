"""The one server harness: free loopback ports, bounded readiness waits, bounded stops.

Every launcher of a real server is built on these three helpers: the pytest
fixtures in ``tests/support`` (redis-server, etcd, torch TCPStore, the
exporter), the restartable servers of ``tests/reliability/servers.py`` and
the benchmark fleet of ``bench/servers.py`` (which runs as ``python -m bench``
from the repository root, without pytest: nothing here imports it).

* :func:`free_port` -- a loopback port nobody listens on right now (bound to
  port 0, then released; the server binds it next);
* :func:`wait_ready` -- poll a readiness check until it holds, failing at once
  (with the server's log) if the process exits, and after ``timeout`` seconds;
* :func:`stop_process` -- SIGCONT (a paused server must be able to exit), then
  SIGTERM (or another signal), then SIGKILL after ``timeout``, always reaped;
  a SIGKILL is sent without SIGCONT, so a paused server dies without running
  again (what the fault tests mean by a crash).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["free_port", "wait_ready", "port_accepts", "stop_process", "log_tail"]

#: How long a readiness check waits by default (a cold etcd on a busy 2-core machine).
START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` nobody listens on right now (connecting to it is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Union[str, Path, None], limit: int = 2000) -> str:
    """The last ``limit`` characters of a server's log file ('' if it has none)."""
    if not path:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def wait_ready(ready: Callable[[], bool], process: Optional[subprocess.Popen] = None, *,
               timeout: float = START_TIMEOUT, what: str = "the server", log: Union[str, Path, None] = None,
               interval: float = 0.02) -> None:
    """Return once ``ready()`` is true; raise RuntimeError if ``process`` exits first or ``timeout`` passes.

    ``ready`` may raise OSError or ValueError (not listening yet, a half-written
    answer): that counts as not ready.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}) while starting: {log_tail(log)}")
        try:
            if ready():
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout} s: {log_tail(log)}")
        time.sleep(interval)


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a readiness check)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def stop_process(process: Optional[subprocess.Popen], signum: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop ``process`` for good, bounded: resume it, send ``signum``, SIGKILL after ``timeout``, reap."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if signum != signal.SIGKILL:
            os.kill(process.pid, signal.SIGCONT)
        process.send_signal(signum)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
