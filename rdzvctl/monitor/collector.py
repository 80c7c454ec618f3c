"""The Prometheus collector: one backend's runs as metric families, read at scrape time.

Every run series carries ``backend``, ``endpoint`` (as ``describe()`` shows
it: no password) and ``run_id``; backend-wide series carry ``backend`` and
``endpoint``.  A run that is gone from the backend is gone from the next
page.  Run ids are untrusted: they only ever travel as label values, which
``prometheus_client`` escapes.  Findings are exported generically, one series
per ``code``, ``severity`` and ``torch_next`` that the run has now.  The
lifecycle phase is one series per run, ``rdzvctl_phase{phase} 1``: a state
set without its zeros (the full set would be 7 series per run, half the page
again at 10,000 runs, for phases that change a few times in a run's life).
It is not an ``_info`` metric, which OpenMetrics keeps for what does not
change during the process lifetime.
"""

from __future__ import annotations

import datetime as _dt
import sys
import threading
import time
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, TextIO

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.samples import Sample

from rdzvctl import __version__, clock
from rdzvctl.errors import RdzvctlError
from rdzvctl.inspection import problem_for_error
from rdzvctl.monitor.runs import (
    ERROR_KINDS,
    RunReader,
    RunRecord,
    Scrape,
    analyze,
    describe_error,
    error_kind,
)
from rdzvctl.state.analysis import DEFAULT_KEEP_ALIVE, KeepAlive
from rdzvctl.state.lifecycle import PHASES

__all__ = ["RendezvousCollector", "RUN_LABELS", "BACKEND_LABELS", "METRIC_NAMES", "DEFAULT_JOIN_TIMEOUT"]

BACKEND_LABELS = ["backend", "endpoint"]
RUN_LABELS = BACKEND_LABELS + ["run_id"]

#: torch's default ``join_timeout`` (``RendezvousTimeout._DEFAULT_TIMEOUTS["join"]``).
DEFAULT_JOIN_TIMEOUT = 600.0

# name (as exposed) -> help; the one list the dashboard and alert tests check against.
_RUN_GAUGES = {
    "rdzvctl_round": "The rendezvous round (torch's state.round).",
    "rdzvctl_complete": "1 when the current round is complete.",
    "rdzvctl_closed": "1 when the rendezvous is closed (new agents fail with RendezvousClosedError).",
    "rdzvctl_participants": "Participants of the current round.",
    "rdzvctl_participants_alive": "Participants whose heartbeat is within keep_alive_interval x keep_alive_max_attempt.",
    "rdzvctl_participants_dead": "Participants whose heartbeat is older than keep_alive_interval x keep_alive_max_attempt.",
    "rdzvctl_waiting_nodes": "Nodes in the wait list (waiting for the next round).",
    "rdzvctl_redundant_nodes": "Nodes in the redundancy list (beyond max_nodes).",
    "rdzvctl_deadline_remaining_seconds": "Seconds until the last-call deadline (negative once passed); absent without one.",
    "rdzvctl_heartbeat_newest_age_seconds": "Age of the newest heartbeat of the run.",
    "rdzvctl_heartbeat_oldest_age_seconds": "Age of the oldest heartbeat of the run.",
    "rdzvctl_round_incomplete_seconds": "Seconds since this exporter first saw the current round incomplete; absent when complete.",
    "rdzvctl_state_size_bytes": "Size of the stored state (the pickle).",
    "rdzvctl_state_decoded": "1 when the stored state decodes; 0 when it is corrupt or unsafe (never executed).",
}
METRIC_NAMES = frozenset({
    *_RUN_GAUGES,
    "rdzvctl_phase",
    "rdzvctl_findings",
    "rdzvctl_rounds_advanced_total",
    "rdzvctl_state_decode_failures_total",
    "rdzvctl_backend_up",
    "rdzvctl_backend_errors_total",
    "rdzvctl_scrape_duration_seconds",
    "rdzvctl_runs",
    "rdzvctl_runs_over_limit",
    "rdzvctl_max_runs",
    "rdzvctl_state_decodes_total",
    "rdzvctl_join_timeout_seconds",
    "rdzvctl_keep_alive_expiry_seconds",
    "rdzvctl_exporter_info",
})


def _flag(value: Optional[bool]) -> float:
    return 1.0 if value else 0.0


class RendezvousCollector:
    """A ``prometheus_client`` collector over a :class:`RunReader`; one scrape at a time."""

    def __init__(self, reader: RunReader, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
                 max_nodes: Optional[int] = None, join_timeout: float = DEFAULT_JOIN_TIMEOUT,
                 clock: Optional[Callable[[], _dt.datetime]] = None, log: Optional[TextIO] = None,
                 verbose: bool = False) -> None:
        self.reader = reader
        self.keep_alive = keep_alive
        self.max_nodes = max_nodes
        self.join_timeout = join_timeout
        self._clock = clock
        self._log = log if log is not None else sys.stderr
        self.verbose = verbose  # log the traceback of a failure that is not an rdzvctl error (a bug)
        self._lock = threading.Lock()
        self._errors: Counter = Counter(dict.fromkeys(ERROR_KINDS, 0))  # every kind from 0, for increase()
        self._last_error: Optional[str] = None
        self._last_over_limit = 0
        self.last: Optional[Scrape] = None

    def _now(self) -> _dt.datetime:
        return self._clock() if self._clock is not None else clock.now_utc()

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # concurrent scrapes (an HA pair of Prometheus servers) take turns
            return iter(self._collect())

    def _collect(self) -> List[Metric]:
        started = time.perf_counter()
        now = self._now()
        scrape = self.reader.scrape(now.timestamp())
        self.last = scrape
        self._note(scrape)
        base = [self.reader.backend_name, self.reader.endpoint]
        out: List[Metric] = []
        if scrape.ok:
            out += self._run_metrics(scrape.runs, now, base)
        up = GaugeMetricFamily("rdzvctl_backend_up", "1 when the last read of the backend succeeded.",
                               labels=BACKEND_LABELS)
        up.add_metric(base, _flag(scrape.ok))
        errors = CounterMetricFamily("rdzvctl_backend_errors", "Failed reads of the backend, by kind "
                                     "(unavailable, timeout, config, corrupt, internal).", labels=BACKEND_LABELS + ["kind"])
        for kind, count in sorted(self._errors.items()):
            errors.add_metric(base + [kind], count)
        duration = GaugeMetricFamily("rdzvctl_scrape_duration_seconds", "Time this scrape took to read, decode and "
                                     "analyse the runs (the page's formatting not included).", labels=BACKEND_LABELS)
        duration.add_metric(base, time.perf_counter() - started)
        out += [up, errors, duration]
        out += self._backend_gauges(base, scrape)
        return out

    def _note(self, scrape: Scrape) -> None:
        """Count failures by kind; log a failure (or the recovery) once, not at every scrape."""
        if scrape.error is not None:
            self._errors[error_kind(scrape.error)] += 1
            line = describe_error(scrape.error)
            if line != self._last_error:
                self._write(f"rdzvctl exporter: backend down: {line}")
                if self.verbose and not isinstance(scrape.error, RdzvctlError):
                    import traceback

                    for text in traceback.format_exception(type(scrape.error), scrape.error,
                                                           scrape.error.__traceback__):
                        for part in text.rstrip("\n").splitlines():
                            self._write(part)
            self._last_error = line
        elif self._last_error is not None:
            self._write("rdzvctl exporter: backend up again")
            self._last_error = None
        if scrape.ok and scrape.over_limit != self._last_over_limit:
            self._last_over_limit = scrape.over_limit
            self._write(f"rdzvctl exporter: {scrape.over_limit} run(s) beyond --max-runs "
                        f"{self.reader.max_runs} are not exported (rdzvctl_runs_over_limit)")

    def _write(self, line: str) -> None:
        # Messages may quote store strings (a key, a run id): control characters are shown escaped.
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
        try:
            self._log.write(line + "\n")
            self._log.flush()
        except (OSError, ValueError):
            pass

    def _backend_gauges(self, base: List[str], scrape: Scrape) -> List[Metric]:
        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=BACKEND_LABELS)
            family.add_metric(base, value)
            return family

        out: List[Metric] = []
        if scrape.ok:
            out.append(gauge("rdzvctl_runs", "Runs exported from the last read.", len(scrape.runs)))
            out.append(gauge("rdzvctl_runs_over_limit", "Runs found beyond --max-runs in the last read "
                             "(not exported).", scrape.over_limit))
        out.append(gauge("rdzvctl_max_runs", "The exporter's --max-runs.", self.reader.max_runs))
        decodes = CounterMetricFamily("rdzvctl_state_decodes", "States decoded (only runs whose token changed).",
                                      labels=BACKEND_LABELS)
        decodes.add_metric(base, self.reader.decodes_total)
        out.append(decodes)
        out.append(gauge("rdzvctl_join_timeout_seconds", "torch's join_timeout the alerts compare with "
                         "(--rdzv-conf join_timeout).", self.join_timeout))
        out.append(gauge("rdzvctl_keep_alive_expiry_seconds", "A node is dead after this long without a heartbeat "
                         "(keep_alive_interval x keep_alive_max_attempt).", self.keep_alive.expiry.total_seconds()))
        info = InfoMetricFamily("rdzvctl_exporter", "The rdzvctl exporter.", labels=BACKEND_LABELS)
        info.add_metric(base, {"version": __version__})
        out.append(info)
        return out

    def _run_metrics(self, runs: List[RunRecord], now: _dt.datetime, base: List[str]) -> List[Metric]:
        """The run families, samples in run order.

        A run has ~15 samples and a page 10,000 runs: the samples are built as ``add_sample``
        builds them (a ``Sample`` with no timestamp, exemplar or histogram) without its call
        and ``Sample``'s Python ``__new__`` per sample, appended to each family's list.  Flags
        are the ints 0 and 1 (written ``0.0`` and ``1.0`` as the floats: the page writer keeps
        the text of each int it has written).
        """
        gauges: Dict[str, GaugeMetricFamily] = {
            name: GaugeMetricFamily(name, text, labels=RUN_LABELS) for name, text in _RUN_GAUGES.items()
        }
        phases = GaugeMetricFamily("rdzvctl_phase", "1 for the run's lifecycle phase (one of " + ", ".join(PHASES)
                                   + "; the other phases have no series).", labels=RUN_LABELS + ["phase"])
        findings = GaugeMetricFamily("rdzvctl_findings", "Findings of corrupt-detect the run has now, by code, "
                                     "severity and what torch does next (torch_next).",
                                     labels=RUN_LABELS + ["code", "severity", "torch_next"])
        advanced = CounterMetricFamily("rdzvctl_rounds_advanced", "Rounds the run advanced while this exporter "
                                       "watched it (restarts).", labels=RUN_LABELS)
        failures = CounterMetricFamily("rdzvctl_state_decode_failures", "Stored values of the run that did not "
                                       "decode (corrupt or unsafe).", labels=RUN_LABELS)
        new, sample = tuple.__new__, Sample
        add = {name: family.samples.append for name, family in gauges.items()}
        add_round, add_complete, add_closed = add["rdzvctl_round"], add["rdzvctl_complete"], add["rdzvctl_closed"]
        add_participants, add_alive = add["rdzvctl_participants"], add["rdzvctl_participants_alive"]
        add_dead, add_waiting = add["rdzvctl_participants_dead"], add["rdzvctl_waiting_nodes"]
        add_redundant, add_deadline = add["rdzvctl_redundant_nodes"], add["rdzvctl_deadline_remaining_seconds"]
        add_newest, add_oldest = add["rdzvctl_heartbeat_newest_age_seconds"], add["rdzvctl_heartbeat_oldest_age_seconds"]
        add_incomplete, add_size = add["rdzvctl_round_incomplete_seconds"], add["rdzvctl_state_size_bytes"]
        add_decoded, add_phase, add_finding = add["rdzvctl_state_decoded"], phases.samples.append, findings.samples.append
        add_advanced, add_failures = advanced.samples.append, failures.samples.append
        keep_alive, max_nodes, timestamp = self.keep_alive, self.max_nodes, now.timestamp()
        utc = _dt.timezone.utc
        backend, endpoint = base
        for record in runs:
            # One label dict per run, shared by its samples.
            labels = {"backend": backend, "endpoint": endpoint, "run_id": record.run_id}
            add_advanced(new(sample, ("rdzvctl_rounds_advanced_total", labels, record.rounds_advanced, None, None, None)))
            add_failures(new(sample, ("rdzvctl_state_decode_failures_total", labels, record.decode_failures,
                                      None, None, None)))
            state = record.state
            if state is None:
                add_decoded(new(sample, ("rdzvctl_state_decoded", labels, 0, None, None, None)))
                if record.error is not None:
                    problem = problem_for_error(record.error)
                    add_finding(new(sample, ("rdzvctl_findings", {
                        **labels, "code": problem["code"], "severity": problem["severity"],
                        "torch_next": problem["torch_next"]}, 1, None, None, None)))
                continue
            add_decoded(new(sample, ("rdzvctl_state_decoded", labels, 1, None, None, None)))
            add_size(new(sample, ("rdzvctl_state_size_bytes", labels, record.size, None, None, None)))
            closed_since = None if record.closed_since is None else \
                _dt.datetime.fromtimestamp(record.closed_since, utc)
            result = analyze(state, now, keep_alive, max_nodes, record.run_id, closed_since)
            add_phase(new(sample, ("rdzvctl_phase", {**labels, "phase": result.lifecycle.phase}, 1, None, None, None)))
            add_round(new(sample, ("rdzvctl_round", labels, state.round, None, None, None)))
            add_complete(new(sample, ("rdzvctl_complete", labels, 1 if state.complete else 0, None, None, None)))
            add_closed(new(sample, ("rdzvctl_closed", labels, 1 if state.closed else 0, None, None, None)))
            add_participants(new(sample, ("rdzvctl_participants", labels, result.participants, None, None, None)))
            add_alive(new(sample, ("rdzvctl_participants_alive", labels, result.alive, None, None, None)))
            add_dead(new(sample, ("rdzvctl_participants_dead", labels, result.dead, None, None, None)))
            add_waiting(new(sample, ("rdzvctl_waiting_nodes", labels, len(state.wait_list), None, None, None)))
            add_redundant(new(sample, ("rdzvctl_redundant_nodes", labels, len(state.redundancy_list),
                                       None, None, None)))
            if result.deadline_remaining is not None:
                add_deadline(new(sample, ("rdzvctl_deadline_remaining_seconds", labels, result.deadline_remaining,
                                          None, None, None)))
            if result.newest_heartbeat_age is not None:
                add_newest(new(sample, ("rdzvctl_heartbeat_newest_age_seconds", labels, result.newest_heartbeat_age,
                                        None, None, None)))
            if result.oldest_heartbeat_age is not None:
                add_oldest(new(sample, ("rdzvctl_heartbeat_oldest_age_seconds", labels, result.oldest_heartbeat_age,
                                        None, None, None)))
            if record.incomplete_since is not None:
                add_incomplete(new(sample, ("rdzvctl_round_incomplete_seconds", labels,
                                            max(0.0, timestamp - record.incomplete_since), None, None, None)))
            if result.findings:
                counts = Counter((f.code, f.severity, f.torch_next) for f in result.findings)
                for (code, severity, torch_next), count in sorted(counts.items()):
                    add_finding(new(sample, ("rdzvctl_findings", {**labels, "code": code, "severity": severity,
                                                                  "torch_next": torch_next}, count, None, None, None)))
        return [*gauges.values(), phases, findings, advanced, failures]
