"""The run-wide figures of the reliability suite, printed as a table at the end of the run.

Tests record what they did through the ``recorder`` fixture (the
:data:`RECORDER` singleton); ``tests/reliability/conftest.py`` prints
:func:`summary_lines` from ``pytest_terminal_summary``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from tests.reliability.servers import BACKEND_IDS

__all__ = ["WriteFigures", "Recorder", "RECORDER", "summary_lines"]

@dataclass
class WriteFigures:
    """One fenced-write history: what was tried and what the checks found."""

    attempted: int = 0
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    lost: int = 0
    stale_accepted: int = 0
    seconds: float = 0.0


@dataclass
class Recorder:
    """Figures collected over the test run (thread-safe)."""

    writes: Dict[Tuple[str, str], WriteFigures] = field(default_factory=dict)
    faults: Dict[str, List[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    fault_log: List[Tuple[str, str, bool, str]] = field(default_factory=list)
    fuzz: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    malicious: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    backups: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    live: Dict[str, List[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    notes: List[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_writes(self, backend: str, mode: str, figures: WriteFigures) -> None:
        with self._lock:
            self.writes[(backend, mode)] = figures

    def record_fault(self, backend: str, kind: str, survived: bool, detail: str = "") -> None:
        """One injected fault and whether everything the test checks held."""
        with self._lock:
            counts = self.faults[backend]
            counts[0] += 1
            counts[1] += int(survived)
            self.fault_log.append((backend, kind, survived, detail))

    def add(self, table: str, key: str, amount: int = 1) -> None:
        with self._lock:
            getattr(self, table)[key] += amount

    def record_live(self, backend: str, ok: bool) -> None:
        with self._lock:
            self.live[backend][0] += 1
            self.live[backend][1] += int(ok)

    def note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)


RECORDER = Recorder()


def _table(title: str, header: List[str], rows: List[List[Any]]) -> List[str]:
    """A plain text table: numbers right-aligned, text left-aligned."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(row[i].replace(".", "").replace(" / ", "").isdigit() or not row[i] for row in cells[1:])
               for i in range(len(header))]

    def fmt(row: List[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return [title, "  " + fmt(header), "  " + "  ".join("-" * w for w in widths)] + ["  " + fmt(r) for r in cells[1:]]


def summary_lines(rec: Recorder) -> List[str]:
    """The summary table as text lines (empty sections are left out)."""
    out: List[str] = []
    if rec.writes:
        rows = []
        order = {b: i for i, b in enumerate(BACKEND_IDS)}
        total = WriteFigures()
        for (backend, mode), f in sorted(rec.writes.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
            rows.append([f"{backend} {mode}", f.attempted, f.accepted, f.refused, f.errors, f.lost,
                         f.stale_accepted, f"{f.seconds:.1f}"])
            for name in ("attempted", "accepted", "refused", "errors", "lost", "stale_accepted"):
                setattr(total, name, getattr(total, name) + getattr(f, name))
        rows.append(["total", total.attempted, total.accepted, total.refused, total.errors, total.lost,
                     total.stale_accepted, ""])
        out += _table("Fenced writes (read-modify-write of `round`)",
                      ["backend / driver", "attempted", "accepted", "refused", "errors", "lost", "stale-accepted",
                       "seconds"], rows)
    if rec.faults:
        rows = [[b, c[0], c[1]] for b, c in sorted(rec.faults.items(), key=lambda kv: kv[0])]
        rows.append(["total", sum(c[0] for c in rec.faults.values()), sum(c[1] for c in rec.faults.values())])
        out += _table("Faults injected, by backend", ["backend", "injected", "survived"], rows)
        kinds: Dict[str, List[Any]] = {}
        for backend, kind, survived, _ in rec.fault_log:
            entry = kinds.setdefault(kind, [0, 0, []])
            entry[0] += 1
            entry[1] += int(survived)
            if backend not in entry[2]:
                entry[2].append(backend)
        out += _table("Faults injected, by kind", ["fault", "injected", "survived", "backends"],
                      [[k, v[0], v[1], ", ".join(v[2])] for k, v in sorted(kinds.items())])
    if rec.fuzz:
        out += _table("Decoder fuzzing", ["source", "inputs", "crashes", "disallowed globals resolved"],
                      [[k.split(":", 1)[1], v, rec.fuzz.get(f"crashes:{k.split(':', 1)[1]}", 0),
                        rec.fuzz.get(f"disallowed:{k.split(':', 1)[1]}", 0)]
                       for k, v in sorted(rec.fuzz.items()) if k.startswith("inputs:")])
    if rec.malicious:
        rows = [["corpus: payloads / refused / executed",
                 f"{rec.malicious['total']} / {rec.malicious['refused']} / {rec.malicious['executed']}"]]
        rows += [[k, v] for k, v in sorted(rec.malicious.items()) if k not in ("total", "refused", "executed")]
        out += _table("Malicious pickles", ["what", "count"], rows)
    if rec.backups:
        out += _table("Backups", ["what", "count"], [[k, v] for k, v in sorted(rec.backups.items())])
    if rec.live:
        out += _table("Live torch jobs", ["backend / scenario", "checks", "passed"],
                      [[k, v[0], v[1]] for k, v in sorted(rec.live.items())])
    if rec.notes:
        out += ["Notes:"] + [f"  - {n}" for n in rec.notes]
    return out
