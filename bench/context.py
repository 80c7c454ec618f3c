"""What every benchmark gets: settings, the running backends, a clean environment, a log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from bench.measure import Process, Row, Settings, median
from bench.servers import Fleet, Target

__all__ = ["Context", "ms", "cpu_ratio", "skip_row"]


@dataclass
class Context:
    """One suite run: how hard to measure, the servers, the children's environment."""

    settings: Settings
    fleet: Fleet
    env: Dict[str, str]
    #: Results one benchmark leaves for another (P3's processes give P7 its memory figures).
    shared: Dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def targets(self) -> List[Target]:
        """The backends whose servers are up, in table order."""
        return list(self.fleet.targets.values())

    def skipped_rows(self, bench_id: str, what: str, labels: List[str]) -> List[Row]:
        """A 'skip' row for each wanted backend whose server did not start."""
        return [skip_row(bench_id, what, label, reason) for label, reason in self.fleet.skipped.items()
                if label in labels]


def ms(processes: List[Process]) -> float:
    """Median wall time in milliseconds."""
    return median([p.seconds for p in processes]) * 1000


def cpu_ratio(ours: List[Process], base: List[Process]) -> Optional[float]:
    """Median CPU time (user + system) of ours over the baseline's: steadier than wall time on a busy machine."""
    theirs = median([p.cpu for p in base])
    return median([p.cpu for p in ours]) / theirs if theirs else None


def skip_row(bench_id: str, what: str, backend: str, reason: str) -> Row:
    return Row(bench_id, what, backend, None, None, "", "-", verdict="skip", note=reason)
