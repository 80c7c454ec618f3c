"""Read the runs of one backend at each scrape, decoding only those whose token changed.

A :class:`RunReader` reads every wanted run with the backend's batched
``list_runs`` (one request or a few per backend; ``get_state`` per run only
for a backend without it), compares each run's token with the one it decoded
last time and decodes only the changed ones.  So a scrape of N unchanged runs
costs one batched read plus N token comparisons, and D changed runs add D
decodes.  The analysis that depends on the clock (liveness, deadline,
findings) runs at every scrape on the cached decoded state
(:func:`analyze`), with the library's own functions, so the figures equal
what ``rdzvctl get -o json`` reports at the same moment.  The exporter
watches, so it settles a close the way ``corrupt-detect --settle`` does: the
time it first saw a run closed is the lifecycle's ``closed_since``.

Memory is bounded by ``max_runs``: runs beyond it (in listing order) are
counted, not cached.  A backend failure leaves the cache alone and is
reported in the :class:`Scrape`; the next scrape reopens the backend.  No
Prometheus here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from rdzvctl.backends.base import Address, RendezvousBackend, RunEntry
from rdzvctl.errors import BackendTimeoutError, BackendUnavailableError, RdzvctlError, StateError, UsageError
from rdzvctl.state.analysis import DEFAULT_KEEP_ALIVE, Finding, KeepAlive, deadline_remaining
from rdzvctl.state.codec import decode
from rdzvctl.state.findings import find_problems
from rdzvctl.state.lifecycle import Lifecycle, lifecycle, liveness
from rdzvctl.state.model import RendezvousState

__all__ = [
    "DEFAULT_MAX_RUNS",
    "RunRecord",
    "RunAnalysis",
    "Scrape",
    "RunReader",
    "analyze",
    "error_kind",
    "ERROR_KINDS",
]

#: Runs one exporter keeps at most (decoded states of a few nodes: a few KiB each).
DEFAULT_MAX_RUNS = 10_000

#: Tokens longer than this (c10d's: the whole stored value) are kept as a digest.
_TOKEN_DIGEST_OVER = 64


def _token_key(token: Any) -> Any:
    if isinstance(token, (bytes, bytearray)) and len(token) > _TOKEN_DIGEST_OVER:
        return (len(token), hashlib.blake2b(token, digest_size=16).digest())
    return token


#: The ``kind`` label values of ``rdzvctl_backend_errors_total``.
ERROR_KINDS = ("unavailable", "timeout", "config", "corrupt", "internal")


def error_kind(error: BaseException) -> str:
    """A short, stable label for a backend failure (``rdzvctl_backend_errors_total{kind}``)."""
    if isinstance(error, BackendTimeoutError):
        return "timeout"
    if isinstance(error, BackendUnavailableError):
        return "unavailable"
    if isinstance(error, UsageError):
        return "config"
    if isinstance(error, StateError):
        return "corrupt"
    return "internal"


@dataclass
class RunRecord:
    """One run as this exporter knows it: the decoded state of its last token and what it has seen."""

    run_id: str
    token_key: Any
    size: int
    state: Optional[RendezvousState]
    error: Optional[StateError]
    last_round: Optional[int] = None
    rounds_advanced: int = 0
    decode_failures: int = 0
    incomplete_round: Optional[int] = None
    incomplete_since: Optional[float] = None  # POSIX time this exporter first saw the current round incomplete
    closed_since: Optional[float] = None  # POSIX time this exporter first saw the run closed

    def observe(self, now: float) -> None:
        """Count rounds advanced; note since when the current round is incomplete and the run closed."""
        state = self.state
        if state is None:
            return
        if self.last_round is not None and state.round > self.last_round:
            self.rounds_advanced += state.round - self.last_round
        self.last_round = state.round  # a lower round (state recreated) is the new baseline
        if state.complete:
            self.incomplete_round = self.incomplete_since = None
        elif self.incomplete_round != state.round or self.incomplete_since is None:
            self.incomplete_round, self.incomplete_since = state.round, now
        if not state.closed:
            self.closed_since = None
        elif self.closed_since is None:
            self.closed_since = now


class RunAnalysis(NamedTuple):
    """What the clock-dependent analysis says about a run at one moment."""

    participants: int  # ``get -o json``'s summary: participants, alive, dead (no heartbeat: neither)
    alive: int
    dead: int
    deadline_remaining: Optional[float]  # rounded to ms, as the summary's
    lifecycle: Lifecycle  # the phase and what torch does next
    findings: List[Finding]
    newest_heartbeat_age: Optional[float]
    oldest_heartbeat_age: Optional[float]


def analyze(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
            max_nodes: Optional[int] = None, run_id: Optional[str] = None,
            closed_since: Optional[_dt.datetime] = None) -> RunAnalysis:
    """Liveness, counts, lifecycle and findings of ``state`` at ``now``, as ``get -o json`` computes them.

    ``closed_since`` is when the run was first seen closed (``RunRecord.closed_since``): with it
    the lifecycle tells a close under live agents from a normal end, as ``corrupt-detect --settle``.
    The liveness is computed once, for the counts, the phase and the findings (``inspection.assess``
    without store keys: the same three calls).  The counts are ``summarize``'s over
    ``node_statuses``, taken from it: both apply torch's rule (dead iff the heartbeat is older than
    ``now - expiry``) to the same heartbeats, and a participant without one is neither alive nor dead.
    """
    live = liveness(state, now, keep_alive.expiry)
    life = lifecycle(state, now, keep_alive.interval, keep_alive.max_attempt, closed_since, live=live)
    findings = find_problems(state, now, keep_alive, max_nodes=max_nodes, run_id=run_id, life=life, live=live)
    remaining = deadline_remaining(state, now)
    beats = state.last_heartbeats
    newest = None if live.newest is None else (now - live.newest).total_seconds()
    oldest = (now - min(beats.values())).total_seconds() if beats else None
    return RunAnalysis(len(state.participants), len(live.live_participants), len(live.dead_participants),
                       None if remaining is None else round(remaining, 3), life, findings, newest, oldest)


@dataclass
class Scrape:
    """The outcome of one read of the backend."""

    ok: bool
    runs: List[RunRecord] = field(default_factory=list)
    error: Optional[BaseException] = None
    over_limit: int = 0  # runs found beyond max_runs (not cached, not exported)
    decodes: int = 0  # states decoded by this scrape (changed tokens)
    seconds: float = 0.0


Opener = Callable[[Address, Optional[str]], RendezvousBackend]


def _open(address: Address, run_id: Optional[str]) -> RendezvousBackend:
    from rdzvctl.backends.registry import open_backend

    return open_backend(address, run_id)


class RunReader:
    """The runs of one backend (all of them, or ``run_ids``), re-read at each :meth:`scrape`."""

    def __init__(self, address: Address, run_ids: Optional[Sequence[str]] = None,
                 max_runs: int = DEFAULT_MAX_RUNS, opener: Opener = _open) -> None:
        if max_runs <= 0:
            raise UsageError("max_runs must be positive")
        self.address = address
        self.run_ids: Optional[Tuple[str, ...]] = None if run_ids is None else tuple(dict.fromkeys(run_ids))
        self.max_runs = max_runs
        self._opener = opener
        self._backends: Dict[str, RendezvousBackend] = {}
        self.records: Dict[str, RunRecord] = {}
        self.decodes_total = 0
        self.backend_name = address.backend
        self.endpoint = self.open().describe()  # validates the address: a usage error surfaces now

    # -- backends ---------------------------------------------------------------------
    def open(self, run_id: Optional[str] = None) -> RendezvousBackend:
        key = self.address.run_id if run_id is None else run_id
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = self._opener(self.address, key)
        return backend

    def close(self) -> None:
        backends, self._backends = self._backends, {}
        for backend in backends.values():
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not fail a scrape
                pass

    @property
    def batched(self) -> bool:
        """Whether runs are read with one ``list_runs`` (else ``get_state`` per run id)."""
        return "list_runs" in self.open().capabilities

    # -- reading ------------------------------------------------------------------------
    def _entries(self) -> Iterator[RunEntry]:
        if self.batched:
            wanted = None if self.run_ids is None else set(self.run_ids)
            for entry in self.open().list_runs():
                if wanted is None or entry.run_id in wanted:
                    yield entry
            return
        if self.run_ids is None:
            self.open().list_runs()  # raises the backend's "cannot list runs"
            return
        for run_id in self.run_ids:
            backend = self.open(run_id)
            try:
                yield RunEntry(run_id, backend.get_state())
            except StateError as exc:
                yield RunEntry(run_id, None, exc)

    def scrape(self, now: Optional[float] = None) -> Scrape:
        """Read the runs, decode the changed ones, update the records; never raises."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        result = Scrape(ok=True)
        seen: Dict[str, RunRecord] = {}
        try:
            for entry in self._entries():
                if entry.state is None and entry.error is None:
                    continue  # no state (c10d's sentinel, a missing run id)
                if entry.run_id in seen:
                    continue
                if len(seen) >= self.max_runs:
                    result.over_limit += 1
                    continue
                record = self._update(entry, result)
                record.observe(now)
                seen[entry.run_id] = record
        except Exception as exc:  # noqa: BLE001 - an outage (or a broken plugin) must not stop the exporter
            self.close()  # reconnect on the next scrape
            result.ok, result.error = False, exc
            result.seconds = time.perf_counter() - started
            return result
        self.records = seen  # runs that disappeared go away
        result.runs = list(seen.values())
        result.seconds = time.perf_counter() - started
        return result

    def _update(self, entry: RunEntry, result: Scrape) -> RunRecord:
        if entry.state is None or entry.error is not None:
            error = entry.error if isinstance(entry.error, StateError) else StateError(str(entry.error))
            key: Any = ("error", type(entry.error).__name__, str(entry.error))
            raw: Optional[bytes] = None
        else:
            raw, token = entry.state
            key, error = _token_key(token), None
        record = self.records.get(entry.run_id)
        if record is not None and record.token_key == key:
            return record
        state = None
        if raw is not None:
            result.decodes += 1
            self.decodes_total += 1
            try:
                state = decode(raw)
            except StateError as exc:
                error = exc
        if record is None:
            record = RunRecord(entry.run_id, key, 0, None, None)
        record.token_key, record.size, record.state, record.error = key, len(raw or b""), state, error
        if error is not None:
            record.decode_failures += 1
        return record


def describe_error(error: BaseException) -> str:
    """One line for the log: the error's class and message (rdzvctl errors never hold secrets)."""
    if isinstance(error, RdzvctlError):
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__} (internal error)"
