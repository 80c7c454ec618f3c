"""torch's legacy etcd JSON: what is wrong with a run and what torch's handler does next
(:func:`analyse`, the participants' leases, :class:`LegacyReport`).  No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from rdzvctl.errors import StateCorruptError
from rdzvctl.state.analysis import SEVERITIES, SUSPICIOUS_RUN_IDS, Finding
from rdzvctl.state.legacy_etcd.parser import (
    DEFAULT_LAST_CALL_TIMEOUT,
    DIGITS,
    FROZEN_TTL,
    JOINABLE_TTL,
    KEEPALIVE_TTL,
    RECENT_RENEWAL,
    RUN_TTL,
    LegacyRun,
    LegacyState,
    parse_state,
)
from rdzvctl.state.lifecycle import TORCH_NEXT


class LegacyNode(NamedTuple):
    """One participant: its rank, its keep-alive key and the lease's state."""

    rank: int
    keep_alive: Optional[str]
    lease: str  # alive | expired | unconfirmed
    ttl: Optional[int]


@dataclass
class LegacyReport:
    """The analysis of one run: the state (or why not), participants, findings, torch's next step."""

    state: Optional[LegacyState]
    error: Optional[StateCorruptError]
    nodes: List[LegacyNode]
    findings: List[Finding]
    next_step: str

    @property
    def worst(self) -> Optional[str]:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default=None)


def _nodes(run: LegacyRun, state: LegacyState) -> List[LegacyNode]:
    nodes = []
    confirmed = set(state.keep_alives or ())
    for rank in state.participants or ():
        key = run.lease_key(state.version or "?", rank)
        if key not in confirmed:
            nodes.append(LegacyNode(rank, None, "unconfirmed", None))
            continue
        info = run.version_keys.get(f"rank_{rank}")
        nodes.append(LegacyNode(rank, key, "alive" if info is not None else "expired",
                                None if info is None else info.ttl))
    return nodes


#: What torch does next about each finding (:data:`rdzvctl.state.lifecycle.TORCH_NEXT` keys).
_TORCH_NEXT = {
    "shared-run-id": "unaffected", "state-corrupt": "agents-fail", "closed": "new-job-fails",
    "closed-run-in-use": "new-job-fails", "stuck-setup": "stays", "stuck-joinable": "stays",
    "stuck-frozen": "stays", "joinable-below-min": "stays", "frozen-keep-alive-expired": "recovers",
    "dead-participant": "stays", "workers-waiting": "recovers", "over-max-nodes": "unaffected",
    "unknown-fields": "unaffected", "version-counter-missing": "agents-fail",
    "version-counter-corrupt": "agents-fail", "version-ahead-of-counter": "recovers",
    "version-dir-missing": "stays", "keep-alive-key-foreign": "stays", "final-unconfirmed": "stays",
}


def _with_torch_next(finding: Finding, torch_next: Optional[str] = None) -> Finding:
    """The finding with what torch does next; a repair only where torch does not fix it itself."""
    key = torch_next or _TORCH_NEXT.get(finding.code, "stays")
    repair = "" if key in ("recovers", "unaffected") and finding.code != "shared-run-id" else finding.repair
    return finding._replace(torch_next=key, outlook=TORCH_NEXT[key], repair=repair)


_REOPEN = "rdzvctl reset --mode reopen (deletes active_version, fenced, as torch's own destroy does)"
_CLEAR = ("rdzvctl reset --mode clear (removes the run's directory, as its TTL would; only when no agent of this "
          "run id runs: a handler created before it dies with RendezvousError 'worker needs to die')")


def analyse(
    run: LegacyRun,
    now: float,
    *,
    min_nodes: Optional[int] = None,
    max_nodes: Optional[int] = None,
    last_call_timeout: float = DEFAULT_LAST_CALL_TIMEOUT,
    status_age: Optional[float] = None,
) -> LegacyReport:
    """Findings and torch's next step for ``run``.

    ``now`` is a Unix time; ``status_age`` is how long the same status and
    version have been seen (``watch`` knows it; a single read does not:
    etcd v2 keeps no write times, only the TTLs torch sets).
    """
    findings: List[Finding] = []
    if run.run_id in SUSPICIOUS_RUN_IDS:
        findings.append(Finding(
            "shared-run-id", "warning",
            f"run id {run.run_id!r} is a default many jobs share (torchrun's --rdzv-id defaults to 'none'; "
            "pytorch#82160): a finished job's closed state stops the next one",
            "give every job its own --rdzv-id"))
    if run.raw is None:
        next_step = ("no rendezvous: the next handler's init_phase creates one (version "
                     f"{next_version(run)}) and agents join it")
        if run.active is not None:  # a directory where the state belongs
            findings.append(Finding("state-corrupt", "error", "active_version is a directory, not torch's JSON",
                                    _CLEAR))
        return LegacyReport(None, None, [], [_with_torch_next(f) for f in findings], next_step)
    try:
        state = parse_state(run.raw)
    except StateCorruptError as exc:
        findings.append(Finding(
            "state-corrupt", "error", str(exc), _REOPEN + "; the bytes are backed up"))
        return LegacyReport(None, exc, [], [_with_torch_next(f) for f in findings],
                            "every handler's json.loads fails: init_phase retries every second until its timeout "
                            "(600 s by default), then RendezvousTimeoutError")
    nodes = _nodes(run, state)
    ttl = None if run.active is None else run.active.ttl
    findings += _check_fields(run, state)
    status = state.status
    count = len(state.participants or ())
    if status == "closed":
        renewed = _renewed_ago(run, now)
        if renewed is not None and renewed <= RECENT_RENEWAL:
            findings.append(Finding(
                "closed-run-in-use", "error",
                f"run closed, and a handler renewed the run's lease {renewed:.0f} s ago (handlers renew it when "
                "created, then hourly): a job is using this run id, and a new job's next_rendezvous() raises "
                "RendezvousClosedError",
                _REOPEN + ": the waiting agents join at once"))
        else:
            findings.append(Finding(
                "closed", "warning",
                "run closed (set_closed by a finished or stopped job): a new job with this run id fails at once "
                "with RendezvousClosedError (pytorch/elastic#151)",
                _REOPEN + " (or --mode clear)"))
        next_step = ("every next_rendezvous() for this run id raises RendezvousClosedError (init_phase) and "
                     "is_closed() is True, so agents stop; nothing reopens it (no TTL)")
    elif status == "setup":
        if ttl is None:
            findings.append(_no_ttl(status))
        next_step = (f"a handler is creating version {next_version(run)}; if it died, the key expires in "
                     f"{_secs(ttl)} and the next handler starts over")
    elif status == "joinable":
        wanted = f" of min_nodes {min_nodes}" if min_nodes else ""
        if min_nodes and count >= min_nodes and ttl is None:
            findings.append(_no_ttl(status))
        if status_age is not None and ttl is not None and status_age > last_call_timeout + JOINABLE_TTL:
            findings.append(Finding(
                "stuck-joinable", "warning",
                f"joinable for {status_age:.0f} s, past the last-call timeout ({last_call_timeout:g} s) with "
                "min_nodes reached: the last-call holder keeps renewing it without freezing",
                _REOPEN))
        if min_nodes and count < min_nodes and ttl is None and status_age is not None \
                and status_age > last_call_timeout:
            findings.append(Finding(
                "joinable-below-min", "info",
                f"{count}{wanted} joined for {status_age:.0f} s; ranks of agents that timed out stay listed and "
                "count for the next joiners", _REOPEN))
        next_step = (f"{count} participant(s){wanted} joined; a new agent joins as rank {count}; at min_nodes "
                     "the last-call holder waits last_call_timeout, then freezes (at max_nodes: at once)")
        if ttl is not None:
            next_step += f"; the state expires in {_secs(ttl)} unless the last-call holder renews it"
    elif status == "frozen":
        confirmed = len(state.keep_alives or ())
        if ttl is None:
            findings.append(_no_ttl(status))
        expired = [n for n in nodes if n.lease == "expired"]
        if expired:
            findings.append(Finding(
                "frozen-keep-alive-expired", "warning",
                f"rank(s) {', '.join(str(n.rank) for n in expired)} confirmed, then their keep-alive expired: "
                "this version cannot become final; it expires with its TTL and everyone re-enters",
                _REOPEN, tuple(f"rank_{n.rank}" for n in expired)))
        if status_age is not None and status_age > last_call_timeout + FROZEN_TTL:
            findings.append(Finding(
                "stuck-frozen", "warning",
                f"frozen for {status_age:.0f} s, past the last-call timeout ({last_call_timeout:g} s): a "
                "participant never confirms and the waiting agents only leave at their timeout", _REOPEN))
        next_step = (f"{confirmed} of {count} participant(s) confirmed; final when all confirmed; if one never "
                     f"does, the state expires in {_secs(ttl)} and all agents re-enter the rendezvous")
    elif status == "final":
        expired = [n for n in nodes if n.lease == "expired"]
        waiting = state.num_workers_waiting or 0
        if expired:
            findings.append(Finding(
                "dead-participant", "warning" if waiting else "error",
                f"rank(s) {', '.join(str(n.rank) for n in expired)} of final version {state.version} stopped "
                f"renewing their keep-alive ({KEEPALIVE_TTL} s lease): the others may hang; nothing notices "
                "until an agent arrives and its wait_for_rendezvous_to_free destroys the version",
                _REOPEN, tuple(f"rank_{n.rank}" for n in expired),
                # the waiting agents' wait_for_rendezvous_to_free destroys the version
                torch_next="recovers" if waiting else "stays"))
        if waiting:
            findings.append(Finding(
                "workers-waiting", "info",
                f"{waiting} agent(s) wait for the next rendezvous (num_workers_waiting): the running agents "
                "restart their workers when their monitor loop sees it", ""))
        if max_nodes is not None and count > max_nodes:
            findings.append(Finding("over-max-nodes", "warning",
                                    f"{count} participants, more than max_nodes {max_nodes}", ""))
        next_step = (f"the job runs with {count} worker(s); a new agent counts itself in num_workers_waiting "
                     "and waits; an agent re-entering destroys the version if a keep-alive key is gone")
        if expired and waiting:
            next_step = ("the waiting agent(s) watch rdzv/ and see the lease expire: their "
                         "wait_for_rendezvous_to_free deletes active_version and a new version forms")
        elif expired:
            next_step = ("nobody re-rendezvouses: the dead rank's peers wait in their collectives; the first "
                         "agent that joins (or re-enters) deletes active_version and a new version forms")
    else:  # pragma: no cover - parse_state admits only STATUSES
        next_step = ""
    return LegacyReport(state, None, nodes, [_with_torch_next(f, f.torch_next or None) for f in findings],
                        next_step)


def _no_ttl(status: str) -> Finding:
    return Finding(
        f"stuck-{status}", "error",
        f"{status} without the TTL torch gives it: nothing expires it, so agents wait for a change until their "
        "timeout (600 s by default) and then fail with RendezvousTimeoutError", _REOPEN)


def _check_fields(run: LegacyRun, state: LegacyState) -> List[Finding]:
    findings: List[Finding] = []
    if state.unknown_fields:
        findings.append(Finding("unknown-fields", "info",
                                f"fields torch does not write: {', '.join(state.unknown_fields)} (torch keeps them)",
                                ""))
    if state.version is not None:
        counter = _counter(run)
        if run.counter is None:
            findings.append(Finding(
                "version-counter-missing", "error",
                "rdzv/version_counter is gone: a handler created before that dies with RendezvousError ('worker "
                "needs to die') at its next rendezvous; new handlers recreate it", _CLEAR))
        elif counter is None:
            findings.append(Finding("version-counter-corrupt", "error",
                                    "rdzv/version_counter is not a decimal number: try_create_rendezvous fails with "
                                    "ValueError and retries until its timeout", _CLEAR))
        elif int(state.version) > counter:
            findings.append(Finding(
                "version-ahead-of-counter", "warning",
                f"version {state.version} is ahead of version_counter {counter}: the next rendezvous reuses a "
                "version number and its directory", _CLEAR))
        if state.status in ("frozen", "final") and state.version not in run.versions:
            findings.append(Finding("version-dir-missing", "warning",
                                    f"rdzv/v_{state.version} does not exist: no keep-alive can be found", _REOPEN))
        expected = {run.lease_key(state.version, r) for r in state.participants or ()}
        strays = [k for k in state.keep_alives or () if k not in expected]
        if strays:
            findings.append(Finding(
                "keep-alive-key-foreign", "error",
                f"keep_alives names {len(strays)} key(s) outside rdzv/v_{state.version}/rank_<r>: "
                "wait_for_rendezvous_to_free never finds them and destroys every final version", _REOPEN))
        if state.status == "final" and state.keep_alives is not None and state.participants is not None \
                and len(state.keep_alives) != len(state.participants):
            findings.append(Finding("final-unconfirmed", "error",
                                    f"final with {len(state.keep_alives)} keep-alive(s) for "
                                    f"{len(state.participants)} participants (confirm_membership finalises only "
                                    "when all confirmed)", _REOPEN))
    return findings


def _counter(run: LegacyRun) -> Optional[int]:
    if run.counter is None or run.counter.value is None or not DIGITS.match(run.counter.value):
        return None
    return int(run.counter.value)


def next_version(run: LegacyRun) -> str:
    """The version torch's next ``try_create_rendezvous`` makes (``?`` if the counter is unreadable)."""
    counter = _counter(run)
    return "1" if run.counter is None else ("?" if counter is None else str(counter + 1))


def _renewed_ago(run: LegacyRun, now: float) -> Optional[float]:
    if run.run_dir is None or run.run_dir.ttl is None:
        return None
    return max(0.0, RUN_TTL - run.run_dir.ttl)


def _secs(ttl: Optional[int]) -> str:
    return "never (no TTL)" if ttl is None else f"{ttl} s"
