"""Run rdzvctl as a real subprocess, the way a shell or a CI job does.

Plain output (``NO_COLOR=1``, no terminal), backups in a directory of the
test's own, every process in its own process group and killed if it outlives
its time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

__all__ = ["Result", "Rdzvctl", "Running", "WatchProcess"]


@dataclass
class Result:
    """One finished rdzvctl run."""

    args: List[str]
    code: int
    stdout: bytes
    stderr: str
    elapsed: float

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (f"rdzvctl {' '.join(self.args)} -> exit {self.code} in {self.elapsed:.2f}s\n"
                f"stdout: {self.out[-3000:]}\nstderr: {self.stderr[-3000:]}")


class Rdzvctl:
    """``rdzvctl ...`` subprocesses sharing an environment (backup dir, no colour)."""

    def __init__(self, backup_dir: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.backup_dir = backup_dir
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PET_RDZV_", "RDZVCTL_")) and k not in ("FORCE_COLOR", "TERM")}
        self.env.update(NO_COLOR="1", RDZVCTL_BACKUP_DIR=str(backup_dir), COLUMNS="200")
        self.env.update(env or {})

    def command(self, args: Sequence[str]) -> List[str]:
        return [sys.executable, "-m", "rdzvctl", *args]

    def start(self, *args: str) -> "Running":
        """Start ``rdzvctl args`` in the background (stdin closed); ``finish()`` waits for it."""
        proc = subprocess.Popen(self.command(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        return Running(list(args), proc, time.monotonic())

    def __call__(self, *args: str, input: Union[bytes, str, None] = None, timeout: float = 60.0) -> Result:
        """Run to completion; a run outliving ``timeout`` is killed and fails the test."""
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.Popen(self.command(args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        return Running(list(args), proc, time.monotonic()).finish(timeout, data)

    def all(self, *commands: Sequence[str], timeout: float = 60.0) -> List[Result]:
        """Run independent commands at the same time; results in order."""
        running = [self.start(*args) for args in commands]
        return [run.finish(timeout) for run in running]

    @contextlib.contextmanager
    def watch(self, *args: str) -> Iterator["WatchProcess"]:
        """``rdzvctl watch -o json ...`` running in the background; killed when the block ends."""
        proc = subprocess.Popen(self.command(["watch", "-o", "json", *args]), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                start_new_session=True)
        watch = WatchProcess(proc)
        try:
            yield watch
        finally:
            _kill_group(proc)
            proc.wait(timeout=10)
            watch.join()


class Running:
    """An rdzvctl process started in the background."""

    def __init__(self, args: List[str], proc: subprocess.Popen, started: float) -> None:
        self.args = args
        self.proc = proc
        self.started = started

    def finish(self, timeout: float = 60.0, input: Optional[bytes] = None) -> Result:
        """Wait for the exit; a run outliving ``timeout`` is killed and fails the test."""
        try:
            out, err = self.proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            out, err = self.proc.communicate()
            raise AssertionError(f"rdzvctl {' '.join(self.args)} still ran after {timeout:g}s: "
                                 f"{err.decode(errors='replace')[-2000:]}") from None
        finally:
            _kill_group(self.proc)
        return Result(self.args, self.proc.returncode, out, err.decode("utf-8", errors="replace"),
                      time.monotonic() - self.started)

    def kill(self) -> None:
        _kill_group(self.proc)
        self.proc.wait(timeout=10)


class WatchProcess:
    """A background ``watch -o json``: its events as they arrive."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import queue
        import threading

        self.proc = proc
        self.events: List[Dict[str, Any]] = []
        self._queue: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self.stderr = ""
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def _read_err(self) -> None:
        self.stderr = self.proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]

    def wait_for(self, kind: str, timeout: float = 30.0, **match: Any) -> Dict[str, Any]:
        """The first event of ``kind`` (with fields equal to ``match``) not yet consumed."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("kind") == kind and all(event.get(k) == v for k, v in match.items()) \
                        and not event.get("_seen"):
                    event["_seen"] = True
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind!r} event {match or ''} within {timeout:g}s; got "
                                     f"{[e.get('kind') for e in self.events]}; stderr: {self.stderr[-1000:]}")
            try:
                event = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self._queue.put(None)
                if not any(e.get("kind") == kind for e in self.events if not e.get("_seen")):
                    time.sleep(0.05)
                    raise AssertionError(f"watch exited ({self.proc.poll()}) before a {kind!r} event; got "
                                         f"{[e.get('kind') for e in self.events]}; stderr: {self.stderr[-1000:]}")
                continue
            self.events.append(event)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
