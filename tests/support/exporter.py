"""``rdzvctl exporter`` as a real subprocess on a free loopback port, and its page parsed.

    with ExporterProcess(["--rdzv-backend", "redis", "--rdzv-endpoint", ep, "--all"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 1
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from tests.support.harness import stop_process

__all__ = ["ExporterProcess", "Page", "parse_page"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_SERVING = re.compile(r"serving .* on (http://\S+/metrics)$")

SampleKey = Tuple[str, FrozenSet[Tuple[str, str]]]


class Page:
    """One /metrics page: its text and its samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = parse_page(text)

    def series(self, name: str, **labels: str) -> Dict[FrozenSet[Tuple[str, str]], float]:
        """Samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return {key: value for (n, key), value in self.samples.items() if n == name and want <= key}

    def value(self, name: str, **labels: str) -> Optional[float]:
        found = self.series(name, **labels)
        if len(found) > 1:
            raise AssertionError(f"{len(found)} series of {name} match {labels}")
        return next(iter(found.values()), None)

    def run_ids(self) -> List[str]:
        return sorted(dict(key)["run_id"] for (name, key) in self.samples if name == "rdzvctl_round")


def parse_page(text: str) -> Dict[SampleKey, float]:
    """The exposition text parsed by prometheus_client's own parser (fails on a malformed page)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


class ExporterProcess:
    """``python -m rdzvctl exporter ARGS --listen 127.0.0.1:0``; stopped (SIGTERM) on exit."""

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, start_timeout: float = 30.0) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RDZVCTL_"))}
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        base.update(env or {})
        self.args = list(args)
        self.process = subprocess.Popen([sys.executable, "-m", "rdzvctl", "exporter", *args,
                                         "--listen", "127.0.0.1:0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base)
        self.stderr_lines: List[str] = []
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_url(start_timeout)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.process.wait(10)
                raise AssertionError(f"the exporter exited ({self.process.returncode}): {self.stderr}")
            match = _SERVING.search(line)
            if match:
                return match.group(1)
        self.stop()
        raise AssertionError(f"the exporter did not start: {self.stderr}")

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait_stderr(self, text: str, timeout: float = 30.0) -> bool:
        """Whether ``text`` shows up in what the exporter logged within ``timeout`` (its log is read by a thread)."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        return text in self.stderr

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def get(self, path: str = "/metrics", timeout: float = 60.0) -> Tuple[int, str]:
        url = self.url.rsplit("/", 1)[0] + path
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return answer.status, answer.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8")

    def scrape(self) -> Page:
        status, text = self.get("/metrics")
        assert status == 200, text
        return Page(text)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        stop_process(self.process, signum, timeout)
        return self.process.returncode

    def __enter__(self) -> "ExporterProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
