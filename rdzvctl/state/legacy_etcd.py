"""torch's legacy ``etcd`` rendezvous (``etcd_rendezvous.py``): its JSON state, parsed and explained.

No I/O here.  The backend (:mod:`rdzvctl.backends.etcd_legacy`) reads a run
into a :class:`LegacyRun`; :func:`parse_state` decodes the untrusted JSON of
``<prefix>/run_<run_id>/rdzv/active_version`` strictly and boundedly, and
:func:`analyse` says what is wrong and what torch's handler will do next.

The life cycle, from torch 2.13's ``EtcdRendezvous`` (function names cited):

* ``setup``    — ``try_create_rendezvous`` wrote ``{"status": "setup"}`` with
  ``prevExist=false`` and TTL 5 s, then bumps ``rdzv/version_counter`` and
  creates the directory ``rdzv/v_<version>``;
* ``joinable`` — ``{"status", "version", "participants": [0, 1, ...]}``;
  ``join_rendezvous`` appends rank ``len(participants)``; at ``min_workers``
  the state gets TTL 10 s, which the last-call holder (rank ``min - 1``,
  ``handle_join_last_call``) refreshes until ``last_call_timeout``;
* ``frozen``   — at ``max_workers`` or after the last call, with
  ``keep_alives: []`` and TTL 10 s; ``confirm_membership`` writes each rank's
  lease key ``rdzv/v_<version>/rank_<r>`` (TTL 10 s, renewed every 5 s) and
  appends it to ``keep_alives``;
* ``final``    — when every participant confirmed; ``num_workers_waiting: 0``,
  no TTL; ``announce_self_waiting`` increments the counter, and
  ``wait_for_rendezvous_to_free`` deletes ``active_version`` (compare on the
  value) when a listed lease key is gone;
* ``closed``   — ``set_closed`` (``shutdown()``) keeps the other fields, no TTL;
  every ``init_phase`` then raises ``RendezvousClosedError``.

The run's directory has TTL 7200 s, renewed by every live handler (at
construction, then every hour).  Every write of torch's is a compare-and-swap
on the previous *value*; rdzvctl's are stricter, on the ``modifiedIndex``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from rdzvctl.errors import StateCorruptError
from rdzvctl.state.analysis import SEVERITIES, SUSPICIOUS_RUN_IDS, Finding
from rdzvctl.state.lifecycle import TORCH_NEXT, LaunchVerdict
from rdzvctl.text import excerpt

__all__ = [
    "STATE_FORMAT",
    "DEFAULT_PREFIX",
    "STATUSES",
    "MAX_STATE_BYTES",
    "LegacyState",
    "KeyInfo",
    "LegacyRun",
    "LegacyNode",
    "LegacyReport",
    "parse_state",
    "encode_state",
    "ttl_for",
    "normalise_prefix",
    "analyse",
    "describe",
    "diff_runs",
    "phase_of",
    "lifecycle_json",
    "check_json",
    "list_row",
    "launch_of",
    "next_version",
]

STATE_FORMAT = "legacy-etcd-json"
SCHEMA = "rdzvctl.get.legacy-etcd/v1"

DEFAULT_PREFIX = "/torchelastic/p2p"  # create_rdzv_handler's etcd_prefix default
STATUSES = ("setup", "joinable", "frozen", "final", "closed")

# torch 2.13 etcd_rendezvous.py constants.
SETUP_TTL = 5  # CONST_ETCD_SETUP_TTL
FROZEN_TTL = 10  # CONST_ETCD_FROZEN_TTL
JOINABLE_TTL = 10  # CONST_ETCD_JOINABLE_EPHEMERAL_TTL
KEEPALIVE_TTL = 10  # CONST_WORKER_KEEPALIVE_TTL
RUN_TTL = 7200  # CONST_RUNID_SUBROOT_TTL
DEFAULT_TIMEOUT = 600  # _DEFAULT_TIMEOUT
DEFAULT_LAST_CALL_TIMEOUT = 30  # _DEFAULT_LAST_CALL_TIMEOUT

#: etcd refuses requests over 1.5 MiB by default; anything larger is not torch's.
MAX_STATE_BYTES = 4 << 20
MAX_LIST = 1 << 17  # participants / keep_alives entries
MAX_KEY_CHARS = 4096
MAX_INT = (1 << 31) - 1
MAX_VERSION_DIGITS = 18
#: A run lease renewed this recently means a handler was (re)created for the run id.
RECENT_RENEWAL = 300.0

# The fields torch's code reads at each status (KeyError otherwise, retried until the timeout).
_REQUIRED = {
    "setup": (),
    "joinable": ("version", "participants"),
    "frozen": ("version", "participants", "keep_alives"),
    "final": ("version", "participants", "keep_alives", "num_workers_waiting"),
    "closed": (),
}
_KNOWN_FIELDS = ("status", "version", "participants", "keep_alives", "num_workers_waiting")
_DIGITS = re.compile(r"[0-9]{1,%d}\Z" % MAX_VERSION_DIGITS)


# -- the state ------------------------------------------------------------------------
@dataclass(frozen=True)
class LegacyState:
    """The decoded ``active_version`` document; fields absent in the JSON are None."""

    status: str
    version: Optional[str] = None
    participants: Optional[Tuple[int, ...]] = None
    keep_alives: Optional[Tuple[str, ...]] = None
    num_workers_waiting: Optional[int] = None
    unknown_fields: Tuple[str, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        """The document as torch writes it (field order of ``json.dumps(state)``), absent fields left out."""
        doc: Dict[str, Any] = {"status": self.status}
        if self.version is not None:
            doc["version"] = self.version
        if self.participants is not None:
            doc["participants"] = list(self.participants)
        if self.keep_alives is not None:
            doc["keep_alives"] = list(self.keep_alives)
        if self.num_workers_waiting is not None:
            doc["num_workers_waiting"] = self.num_workers_waiting
        return doc


def _corrupt(message: str) -> StateCorruptError:
    return StateCorruptError(f"active_version: {message}")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _corrupt(f"field {excerpt(key)} appears twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _corrupt(f"{name} is not JSON torch writes")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_VERSION_DIGITS:
        raise _corrupt("an integer with more than 18 digits")
    return int(text)


def _int_field(doc: Mapping[str, Any], name: str, *, lowest: int = 0) -> Optional[int]:
    value = doc.get(name)
    if value is None and name not in doc:
        return None
    if type(value) is not int:
        raise _corrupt(f"{name} must be an integer, got {type(value).__name__}")
    if not lowest <= value <= MAX_INT:
        raise _corrupt(f"{name} = {value} is out of range {lowest}..{MAX_INT}")
    return value


def parse_state(raw: bytes) -> LegacyState:
    """Decode ``active_version`` strictly: size cap, UTF-8, JSON without duplicate keys or NaN,
    an object of torch's fields with torch's types, integers in range, ranks ``0..n-1``.

    Raises :class:`StateCorruptError` naming the field; never anything else.
    """
    if len(raw) > MAX_STATE_BYTES:
        raise _corrupt(f"{len(raw)} bytes, over the {MAX_STATE_BYTES >> 20} MiB cap (torch never writes that much)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt("not UTF-8 text (torch writes JSON)") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_int=_bounded_int)
    except StateCorruptError:
        raise
    except RecursionError:
        raise _corrupt("JSON nested too deeply") from None
    except ValueError as exc:
        raise _corrupt(f"not JSON ({str(exc)[:120]}); torch's json.loads fails and its handler retries "
                       "every second until its timeout") from None
    if not isinstance(doc, dict):
        raise _corrupt(f"a JSON {type(doc).__name__}, not an object")
    status = doc.get("status")
    if "status" not in doc:
        raise _corrupt("no status field (torch's init_phase fails with KeyError and retries until its timeout)")
    if not isinstance(status, str) or status not in STATUSES:
        shown = excerpt(status) if isinstance(status, str) else type(status).__name__
        raise _corrupt(f"status {shown} is none of {', '.join(STATUSES)}")
    for name in _REQUIRED[status]:
        if name not in doc:
            raise _corrupt(f"status {status} without the {name} field (torch's handler fails with KeyError)")
    version = doc.get("version")
    if "version" in doc:
        if not isinstance(version, str) or not _DIGITS.match(version):
            raise _corrupt("version must be a decimal string, as torch writes version_counter's value")
    participants: Optional[Tuple[int, ...]] = None
    if "participants" in doc:
        items = doc["participants"]
        if not isinstance(items, list) or len(items) > MAX_LIST:
            raise _corrupt("participants must be a list of ranks")
        for position, rank in enumerate(items):
            if type(rank) is not int or rank != position:
                raise _corrupt(f"participants[{position}] is {excerpt(rank)}: torch appends ranks 0, 1, ... in order")
        participants = tuple(items)
    keep_alives: Optional[Tuple[str, ...]] = None
    if "keep_alives" in doc:
        items = doc["keep_alives"]
        if not isinstance(items, list) or len(items) > MAX_LIST:
            raise _corrupt("keep_alives must be a list of etcd keys")
        for position, key in enumerate(items):
            if not isinstance(key, str) or not key.startswith("/") or len(key) > MAX_KEY_CHARS:
                raise _corrupt(f"keep_alives[{position}] is not an etcd key")
        if participants is not None and len(items) > len(participants):
            raise _corrupt(f"{len(items)} keep-alive keys for {len(participants)} participants")
        if len(set(items)) != len(items):
            raise _corrupt("keep_alives lists a key twice")
        keep_alives = tuple(items)
    waiting = _int_field(doc, "num_workers_waiting")
    unknown = tuple(sorted(k for k in doc if k not in _KNOWN_FIELDS))
    return LegacyState(status, version, participants, keep_alives, waiting, unknown)


def encode_state(state: LegacyState) -> bytes:
    """The bytes torch's ``json.dumps(state)`` would store (ASCII, ``", "``/``": "`` separators)."""
    return json.dumps(state.to_json()).encode("ascii")


def ttl_for(state: LegacyState, min_nodes: Optional[int] = None) -> Optional[int]:
    """The TTL torch gives ``active_version`` at this status (None: permanent).

    setup 5 s (``try_create_rendezvous``), frozen 10 s (``join_rendezvous``,
    ``handle_join_last_call``, ``confirm_membership``), joinable 10 s once
    ``min_nodes`` joined (``join_rendezvous``); final and closed have none.
    """
    if state.status == "setup":
        return SETUP_TTL
    if state.status == "frozen":
        return FROZEN_TTL
    if state.status == "joinable" and min_nodes and state.participants is not None \
            and len(state.participants) >= min_nodes:
        return JOINABLE_TTL
    return None


def normalise_prefix(prefix: Optional[str]) -> str:
    """torch's prefix handling: ``EtcdRendezvous.__init__`` appends a ``/`` when missing."""
    prefix = DEFAULT_PREFIX if prefix is None else prefix
    return prefix if prefix.endswith("/") else prefix + "/"


# -- a read of the run ---------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    """One etcd v2 node: its key, remaining TTL (None: permanent) and modifiedIndex."""

    key: str
    ttl: Optional[int] = None
    expiration: Optional[str] = None
    modified_index: int = 0
    value: Optional[str] = None


@dataclass
class LegacyRun:
    """Everything of one run the handler uses, from one read (see the backend's ``read_run``)."""

    prefix: str
    run_id: str
    run_dir: Optional[KeyInfo] = None
    active: Optional[KeyInfo] = None
    raw: Optional[bytes] = None
    counter: Optional[KeyInfo] = None
    versions: Tuple[str, ...] = ()
    #: children of ``rdzv/v_<version of the state>`` by name (``rank_0``, ``kv``, ``extra_data``)
    version_keys: Dict[str, KeyInfo] = field(default_factory=dict)

    @property
    def run_path(self) -> str:
        return f"{self.prefix}run_{self.run_id}"

    @property
    def token(self) -> Optional[int]:
        return None if self.active is None else self.active.modified_index

    def lease_key(self, version: str, rank: int) -> str:
        """The keep-alive key ``confirm_membership`` writes for ``rank``."""
        return f"{self.run_path}/rdzv/v_{version}/rank_{rank}"


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
    if run.counter is None or run.counter.value is None or not _DIGITS.match(run.counter.value):
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


# -- documents ------------------------------------------------------------------------------
def describe(run: LegacyRun, report: LegacyReport, *, backend: str, endpoint: str, token: Optional[str],
             fetched_at: str) -> Dict[str, Any]:
    """The ``get -o json`` document for this handler (schema ``rdzvctl.get.legacy-etcd/v1``)."""
    state = report.state
    doc: Dict[str, Any] = {
        "schema": SCHEMA,
        "state_format": STATE_FORMAT,
        "backend": backend,
        "endpoint": endpoint,
        "run_id": run.run_id,
        "key": f"{run.run_path}/rdzv/active_version",
        "token": token,
        "fetched_at": fetched_at,
        "ttl": None if run.active is None else run.active.ttl,
        "state": None if state is None else state.to_json(),
        "version_counter": None if run.counter is None else run.counter.value,
        "versions": list(run.versions),
        "run_lease_ttl": None if run.run_dir is None else run.run_dir.ttl,
    }
    if state is not None:
        doc["summary"] = {
            "status": state.status,
            "version": state.version,
            "participants": len(state.participants or ()),
            "confirmed": len(state.keep_alives or ()),
            "alive": sum(1 for n in report.nodes if n.lease == "alive"),
            "expired": sum(1 for n in report.nodes if n.lease == "expired"),
            "waiting": state.num_workers_waiting,
        }
        doc["nodes"] = [{"rank": n.rank, "keep_alive": n.keep_alive, "lease": n.lease, "ttl": n.ttl}
                        for n in report.nodes]
        doc["version_keys"] = sorted(run.version_keys)
    doc["next"] = report.next_step
    doc["lifecycle"] = lifecycle_json(run, report)
    doc["problems"] = [f.to_json() for f in report.findings]
    return doc


def phase_of(run: LegacyRun, report: LegacyReport) -> Optional[str]:
    """The run's phase in rdzvctl's vocabulary (:data:`rdzvctl.state.lifecycle.PHASES`)."""
    state = report.state
    if state is None:
        return None
    codes = {f.code for f in report.findings}
    if codes & {"stuck-setup", "stuck-joinable", "stuck-frozen", "final-unconfirmed"}:
        return "stuck"
    if state.status in ("setup", "joinable", "frozen"):
        return "forming"
    if state.status == "final":
        if "dead-participant" in codes:
            return "recovering" if state.num_workers_waiting else "stuck"
        return "complete"
    return "closing" if any(n.lease == "alive" for n in report.nodes) else "finished"


def lifecycle_json(run: LegacyRun, report: LegacyReport) -> Optional[Dict[str, Any]]:
    """The ``lifecycle`` member of the pickled backends' documents: phase, torch_next, outlook."""
    phase = phase_of(run, report)
    if phase is None:
        return None
    torch_next = {"forming": "proceeds", "complete": "proceeds", "recovering": "recovers", "stuck": "stays",
                  "closing": "new-job-fails", "finished": "new-job-fails"}[phase]
    nodes = [f"rank_{n.rank}" for n in report.nodes if n.lease == "expired"]
    return {"phase": phase, "torch_next": torch_next, "outlook": report.next_step, "nodes": nodes,
            "known_at": None}


def check_json(run: LegacyRun, report: LegacyReport) -> Dict[str, Any]:
    """A run's ``corrupt-detect`` report (the pickled backends' shape, ``state_format`` added; ``round`` is
    the version, ``legacy_status`` torch's status); its ``status`` is also ``list``'s health."""
    if report.error is not None or (run.raw is None and run.active is not None):
        status = "corrupt"
    elif run.raw is None:
        status = "absent"
    else:
        status = max((f.severity for f in report.findings), key=SEVERITIES.index, default="ok")
    life = lifecycle_json(run, report)
    state = report.state
    return {
        "run_id": run.run_id,
        "status": status,
        "state_format": STATE_FORMAT,
        "round": None if state is None or state.version is None else int(state.version),
        "phase": None if life is None else life["phase"],
        "lifecycle": life,
        "legacy_status": None if state is None else state.status,
        "next": report.next_step,
        "problems": [f.to_json() for f in report.findings],
    }


def list_row(run: LegacyRun, report: LegacyReport, token: Optional[str]) -> Dict[str, Any]:
    """A run's row of ``list`` (``token`` as the backend formats it)."""
    checked = check_json(run, report)
    state = report.state
    return {
        "run_id": run.run_id, "health": checked["status"], "status": None if state is None else state.status,
        "round": checked["round"],
        "complete": None if state is None else state.status == "final",
        "participants": None if state is None else len(state.participants or ()),
        "waiting": None if state is None else state.num_workers_waiting,
        "closed": None if state is None else state.status == "closed",
        "phase": checked["phase"],
        "token": token,
        "error": None if report.error is None else str(report.error),
    }


def launch_of(run: LegacyRun, report: LegacyReport) -> LaunchVerdict:
    """Will a job started now with this run id rendezvous? (``corrupt-detect --for-launch``).

    torch's ``init_phase``: no state → it creates one; ``closed`` → RendezvousClosedError;
    ``final`` → it waits (``num_workers_waiting``) until the running job re-rendezvouses, unless a
    keep-alive is gone (then it destroys the version and starts the next); ``joinable`` → it
    joins whoever is forming; ``setup``/``frozen`` → it waits for the state to change.
    """
    state = report.state
    upcoming = next_version(run)
    if state is None:
        return LaunchVerdict(True, f"no rendezvous: the job creates version {upcoming}",
                             None if not upcoming.isdigit() else int(upcoming))
    version = None if state.version is None else int(state.version)
    if state.status == "closed":
        return LaunchVerdict(False, "the run is closed: every agent fails with RendezvousClosedError "
                                    "(rdzvctl reset --mode reopen)", version)
    if state.status == "final":
        expired = [n.rank for n in report.nodes if n.lease == "expired"]
        if expired:
            return LaunchVerdict(True, f"version {state.version} has a dead rank ({expired[0]}): the job's first "
                                       "agent destroys it and a new version forms", version)
        return LaunchVerdict(False, f"a running job holds version {state.version} ({len(report.nodes)} live "
                                    "rank(s)): new agents only wait in num_workers_waiting", version)
    if state.status == "joinable":
        return LaunchVerdict(False, f"version {state.version} is forming with {len(state.participants or ())} "
                                    "participant(s): new agents would join it (if they are left from another job, "
                                    "rdzvctl reset --mode reopen)", version)
    return LaunchVerdict(False, f"version {state.version or upcoming} is {state.status}: agents wait for it "
                                "to finish or expire", version)


def diff_runs(before: Optional[LegacyReport], after: Optional[LegacyReport]) -> List[Tuple[str, str]]:
    """Semantic events between two reports: ``(kind, message)`` for ``watch``."""
    events: List[Tuple[str, str]] = []
    old = None if before is None else before.state
    new = None if after is None else after.state
    if after is not None and after.error is not None and (before is None or before.error is None):
        return [("corrupt", f"state corrupt: {after.error}")]
    if old is None and new is not None:
        events.append(("created", f"state {new.status} (version {new.version or '-'})"))
    elif old is not None and new is None:
        events.append(("removed", "active_version removed (deleted or expired)"))
    if old is None or new is None:
        return events
    if (old.status, old.version) != (new.status, new.version):
        events.append(("status", f"{old.status} v{old.version or '-'} -> {new.status} v{new.version or '-'}"))
    if old.version == new.version:
        before_ranks = set(old.participants or ())
        for rank in sorted(set(new.participants or ()) - before_ranks):
            events.append(("joined", f"rank {rank} joined version {new.version}"))
        for key in sorted(set(new.keep_alives or ()) - set(old.keep_alives or ())):
            events.append(("confirmed", f"{key.rsplit('/', 1)[-1]} confirmed (keep-alive key written)"))
    assert before is not None and after is not None
    was = {n.rank: n.lease for n in before.nodes}
    for node in after.nodes:
        if node.lease == "expired" and was.get(node.rank) == "alive":
            events.append(("keep-alive-expired", f"rank {node.rank}'s keep-alive expired ({node.keep_alive})"))
    if (old.num_workers_waiting or 0) != (new.num_workers_waiting or 0) and old.version == new.version:
        events.append(("waiting", f"num_workers_waiting {old.num_workers_waiting or 0} -> "
                                  f"{new.num_workers_waiting or 0}"))
    return events
