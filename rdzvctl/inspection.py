"""Read a run once and describe it: the data every command renders.

:func:`take_snapshot` does the I/O (one ``get_state``); :func:`describe`
turns a snapshot into the documented ``get -o json`` document and
:func:`check_run` a stored value into a ``corrupt-detect`` report (also the
health column of ``list``), which the renderers show as text.  Time comes
from :func:`rdzvctl.clock.now_utc`.  No printing here.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar, Union

from rdzvctl import clock
from rdzvctl.backends.base import RendezvousBackend, StateAndToken, Token
from rdzvctl.errors import RdzvctlError, StateError
from rdzvctl.state.analysis import (
    DEFAULT_KEEP_ALIVE,
    SEVERITIES,
    Finding,
    KeepAlive,
    NodeStatus,
    deadline_remaining,
    node_statuses,
)
from rdzvctl.state.codec import decode
from rdzvctl.state.findings import addresses_to_probe, find_problems, master_address_findings
from rdzvctl.state.jsonform import format_time, state_header, state_to_json
from rdzvctl.state.lifecycle import Lifecycle, lifecycle, liveness
from rdzvctl.state.model import RendezvousState, collector_paused

if TYPE_CHECKING:  # loaded by the legacy etcd commands only
    from rdzvctl.state.legacy_etcd import LegacyReport, LegacyRun

__all__ = ["Snapshot", "take_snapshot", "describe", "summarize", "assess", "probe_tcp", "read_store_keys",
           "reread_while", "check_run", "is_legacy_etcd", "legacy_options", "read_legacy", "describe_legacy", "CONFIRM_SECONDS",
           "SCHEMA"]

#: Bound of one TCP connect probe of a published MASTER_ADDR:PORT.
PROBE_TIMEOUT = 0.5

SCHEMA = "rdzvctl.get/v1"

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


class Snapshot(NamedTuple):
    """One read of a run: raw bytes and token, and the decoded state or why not (immutable)."""

    backend: str
    endpoint: str
    run_id: str
    raw: Optional[bytes]
    token: Optional[Token]
    token_text: Optional[str]
    state: Optional[RendezvousState]
    error: Optional[StateError]
    fetched_at: _dt.datetime

    @property
    def exists(self) -> bool:
        return self.raw is not None or self.error is not None


def _decoded(raw: Optional[bytes], error: Optional[E]) -> Tuple[Optional[RendezvousState], Union[E, StateError, None]]:
    """The state in ``raw`` (None when absent or already unreadable) and why it cannot be read, if so."""
    if raw is None or error is not None:
        return None, error
    try:
        return decode(raw), None
    except StateError as exc:
        return None, exc


def snapshot_from(backend: RendezvousBackend, current: Optional[StateAndToken], error: Optional[StateError] = None,
                  run_id: Optional[str] = None) -> Snapshot:
    """Build a snapshot from an already-read ``(bytes, token)`` (or None)."""
    raw, token = current if current is not None else (None, None)
    state, error = _decoded(raw, error)
    return Snapshot(
        backend=backend.address.backend,
        endpoint=backend.describe(),
        run_id=backend.run_id if run_id is None else run_id,
        raw=raw,
        token=token,
        token_text=None if token is None else backend.format_token(token),
        state=state,
        error=error,
        fetched_at=clock.now_utc(),
    )


def take_snapshot(backend: RendezvousBackend) -> Snapshot:
    """Read the run once; a corrupt stored value becomes ``snapshot.error``.

    When the stored wrapping itself is corrupt (``get_state`` raises), the raw
    value and its token are looked up through ``list_runs`` where the backend
    offers them, so ``reset --mode clear`` can still remove it fenced.
    """
    try:
        current = backend.get_state()
    except StateError as exc:
        return snapshot_from(backend, _stored_despite(backend), exc)
    return snapshot_from(backend, current)


def _stored_despite(backend: RendezvousBackend) -> Optional[StateAndToken]:
    """The run's raw ``(value, token)`` from ``list_runs`` after ``get_state`` failed, if listed."""
    if "list_runs" not in backend.capabilities:
        return None
    try:
        for entry in backend.list_runs():
            if entry.run_id == backend.run_id:
                return entry.state
    except RdzvctlError:
        return None
    return None


def probe_tcp(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str:
    """One bounded TCP connect: ``listening``, ``refused`` or ``unreachable`` (timeout, no route, no name)."""
    import socket  # 2 ms of start-up that only a probe needs

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return "unreachable"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "unreachable"
    return "listening"


#: How long a "stuck" verdict with live agents is re-checked before it is reported: a restarting
#: agent leaves its round (``_RendezvousExitOp``) one write before it waits (``_RendezvousJoinOp``),
#: and in between a snapshot shows a free rank and nobody waiting.
CONFIRM_SECONDS = 2.0


def reread_while(read: Callable[[], T], again: Callable[[T], bool], seconds: float, pause: float = 0.25,
                 first: Optional[T] = None) -> T:
    """``first`` (else ``read()``), then ``read()`` every ``pause`` s while ``again(result)`` holds,
    for at most ``seconds``."""
    result = read() if first is None else first
    give_up = time.monotonic() + seconds
    while again(result) and time.monotonic() < give_up:
        time.sleep(pause)
        result = read()
    return result


def read_store_keys(backend: RendezvousBackend) -> Optional[Dict[str, bytes]]:
    """The run's per-round store keys, or None where the backend cannot list them."""
    if "store_keys" not in backend.capabilities:
        return None
    return backend.store_keys()


def assess(
    state: RendezvousState,
    now: _dt.datetime,
    run_id: Optional[str],
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    store_keys: Optional[Dict[str, bytes]] = None,
    closed_since: Optional[_dt.datetime] = None,
    probe: bool = True,
) -> Tuple[Lifecycle, List[Finding]]:
    """The lifecycle and findings of a state; with store keys, the published rank-0 address is probed."""
    live = liveness(state, now, keep_alive.expiry)  # once, for the phase and the findings
    life = lifecycle(state, now, keep_alive.interval, keep_alive.max_attempt, closed_since, live=live)
    findings = find_problems(state, now, keep_alive, max_nodes=max_nodes, run_id=run_id, life=life, live=live)
    if store_keys:
        probes = {}
        if probe and not state.closed and live.live:
            probes = {(addr, port): probe_tcp(addr, port) for addr, port in addresses_to_probe(store_keys)}
        findings = master_address_findings(state, now, store_keys, probes, keep_alive) + findings
    return life, findings


def describe(
    snap: Snapshot,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    store_keys: Optional[Dict[str, bytes]] = None,
    *,
    heartbeats: bool = True,
) -> Dict[str, Any]:
    """The ``get -o json`` document (schema ``rdzvctl.get/v1``).

    ``heartbeats=False`` leaves out what only the document prints, for ``get``'s table (which
    shows ranks, ages and liveness): the state's node lists and every heartbeat's time, in
    ``state`` and in each row of ``nodes`` (None there).  A third of describing a large state.
    """
    with collector_paused():  # a row per node, and nothing cyclic: see collector_paused
        return _describe(snap, keep_alive, max_nodes, store_keys, heartbeats)


def _describe(snap: Snapshot, keep_alive: KeepAlive, max_nodes: Optional[int],
              store_keys: Optional[Dict[str, bytes]], heartbeats: bool = True) -> Dict[str, Any]:
    doc: Dict[str, Any] = {
        "schema": SCHEMA,
        "backend": snap.backend,
        "endpoint": snap.endpoint,
        "run_id": snap.run_id,
        "token": snap.token_text,
        "fetched_at": format_time(snap.fetched_at),
        "keep_alive": {"interval": keep_alive.interval, "max_attempt": keep_alive.max_attempt},
    }
    if snap.state is None:
        doc["state"] = None
        doc["problems"] = [] if snap.error is None else [problem_for_error(snap.error)]
        return doc
    state, now = snap.state, snap.fetched_at
    statuses = node_statuses(state, now, keep_alive)
    doc["state"] = state_to_json(state) if heartbeats else state_header(state)
    # The heartbeats are formatted once, for the state, and reused per node below.
    formatted = doc["state"]["last_heartbeats"].get if heartbeats else {}.get
    remaining = deadline_remaining(state, now)
    doc["summary"] = summarize(state, statuses, remaining)
    doc["nodes"] = [
        {
            "node": node.id,
            "role": role,
            "rank": rank,
            "last_heartbeat": formatted(node.id),
            "age": None if age is None else round(age, 3),
            "alive": alive,
        }
        for node, role, rank, _, age, alive in statuses
    ]
    life, findings = assess(state, now, snap.run_id, keep_alive, max_nodes, store_keys)
    doc["lifecycle"] = life.to_json()
    doc["problems"] = [f.to_json() for f in findings]
    if store_keys is not None:
        doc["store_keys"] = {k: printable(v) for k, v in store_keys.items()}
    return doc


def printable(value: bytes) -> str:
    """A store value as text: UTF-8, else ``0x`` and hex."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()


def summarize(state: RendezvousState, statuses: List[NodeStatus], remaining: Optional[float]) -> Dict[str, Any]:
    """The ``summary`` of ``get -o json``: participant, liveness and list counts (also the exporter's gauges)."""
    alive = [s.alive for s in statuses if s.role == "participant"]  # True, False or None (no heartbeat)
    return {
        "participants": len(alive),
        "alive": alive.count(True),
        "dead": alive.count(False),
        "waiting": len(state.wait_list),
        "redundant": len(state.redundancy_list),
        "deadline_remaining": None if remaining is None else round(remaining, 3),
    }


def finding_for_error(error: StateError) -> Finding:
    """A state that cannot be decoded, as a finding."""
    return Finding(
        code=f"state-{error.kind}",
        severity="error",
        message=str(error),
        repair="rdzvctl reset --mode clear (a backup of the bytes is kept)",
        torch_next="agents-fail",
        outlook=("every agent unpickles it unchecked at its next sync (`_BackendRendezvousStateHolder.sync`): "
                 "what it names runs there" if error.kind == "unsafe" else
                 "every agent's next sync fails to load it (`_BackendRendezvousStateHolder.sync`)"),
    )


def problem_for_error(error: StateError) -> Dict[str, Any]:
    """:func:`finding_for_error` as a ``problems`` entry of the JSON documents."""
    return dict(finding_for_error(error).to_json())


def stays(doc: Dict[str, Any]) -> bool:
    """The document's run is judged stuck with nothing in torch to change it (``torch_next`` "stays")."""
    return (doc.get("lifecycle") or {}).get("torch_next") == "stays"



def check_run(
    run_id: str,
    raw: Optional[bytes],
    error: Optional[BaseException],
    now: _dt.datetime,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    store_keys: Optional[Dict[str, bytes]] = None,
    closed_since: Optional[_dt.datetime] = None,
) -> Tuple[Dict[str, Any], Optional[RendezvousState]]:
    """One run's ``corrupt-detect`` report and its decoded state (None unless it decodes).

    The report has ``status`` (ok, info, warning, error, corrupt, unsafe or
    absent), ``phase`` and ``problems``; a readable state adds ``round`` and
    ``lifecycle``.  ``error`` is why the stored value could not be read, if it
    could not.
    """
    state, error = _decoded(raw, error)
    if error is not None:
        kind = getattr(error, "kind", "corrupt")
        err = error if isinstance(error, StateError) else StateError(str(error))
        return {"run_id": run_id, "status": kind, "phase": None, "problems": [problem_for_error(err)]}, None
    if raw is None or state is None:
        return {"run_id": run_id, "status": "absent", "phase": None, "problems": []}, None
    life, findings = assess(state, now, run_id, keep_alive, max_nodes, store_keys, closed_since)
    return {
        "run_id": run_id,
        "status": "ok" if not findings else max((f.severity for f in findings), key=SEVERITIES.index),
        "round": state.round,
        "phase": life.phase,
        "lifecycle": life.to_json(),
        "problems": [f.to_json() for f in findings],
    }, state


# -- torch's legacy etcd rendezvous (a JSON state, not a pickle) ------------------------------------------
def is_legacy_etcd(backend: Any) -> bool:
    """True when the backend (or its class) keeps torch's legacy etcd JSON (``state_format``), not a pickle."""
    state_format = getattr(backend, "state_format", None)
    if state_format is None:  # every pickled backend: no need to load the legacy module
        return False
    from rdzvctl.state.legacy_etcd import STATE_FORMAT

    return bool(state_format == STATE_FORMAT)


def legacy_options(backend: Any) -> Dict[str, Any]:
    """The job's sizes and last-call timeout from ``--rdzv-conf`` (torch's handler options), for
    :func:`rdzvctl.state.legacy_etcd.analyse`."""
    address = backend.address
    last_call = address.get_float("last_call_timeout")
    return {"min_nodes": address.get_int("min_nodes"), "max_nodes": address.get_int("max_nodes"),
            **({"last_call_timeout": last_call} if last_call is not None else {})}


def read_legacy(backend: Any) -> Tuple[LegacyRun, LegacyReport]:
    """Read a legacy etcd run once (state, counter, keep-alive leases) and analyse it now."""
    from rdzvctl.state.legacy_etcd import analyse as analyse_legacy

    run: LegacyRun = backend.read_run()
    return run, analyse_legacy(run, time.time(), **legacy_options(backend))


def describe_legacy(backend: Any, run: LegacyRun, report: LegacyReport) -> Dict[str, Any]:
    """The ``get -o json`` document of a legacy etcd run (:func:`rdzvctl.state.legacy_etcd.describe`)."""
    from rdzvctl.state.legacy_etcd import describe as describe_run

    return describe_run(run, report, backend=backend.address.backend, endpoint=backend.describe(),
                        token=None if run.token is None else backend.format_token(run.token),
                        fetched_at=format_time(clock.now_utc()) or "")
