"""Gather what ``doctor`` checks (server facts, one snapshot, store keys, DNS and TCP probes), then judge it.

:func:`diagnose` does the I/O, all of it bounded: the backend's own timeout
for the server and the state, short per-probe timeouts for DNS and connects,
which run concurrently (:mod:`rdzvctl.doctor.probes`).  The verdicts are the
pure functions of :mod:`rdzvctl.doctor.checks`.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.doctor import checks as C
from rdzvctl.doctor.probes import CONNECT_TIMEOUT, DNS_TIMEOUT, connect_all, resolve_all
from rdzvctl.errors import RdzvctlError, UnsupportedOperationError
from rdzvctl.state.analysis import DEFAULT_KEEP_ALIVE, KeepAlive
from rdzvctl.state.jsonform import format_time

__all__ = ["Diagnosis", "diagnose", "SCHEMA"]

SCHEMA = "rdzvctl.doctor/v1"


@dataclass
class Diagnosis:
    """Everything doctor found: the checklist and the data behind it."""

    backend: str
    endpoint: str
    run_id: str
    checked_at: _dt.datetime
    checks: List[C.Check] = field(default_factory=list)
    server: Optional[Dict[str, Any]] = None
    snapshot: Any = None  # rdzvctl.inspection.Snapshot, when the run was read
    #: (LegacyRun, LegacyReport) of rdzvctl.state.legacy_etcd, when the run was read on a backend that keeps
    #: torch's legacy etcd JSON (then ``snapshot`` is None: there is no pickle to decode)
    legacy: Optional[Tuple[Any, Any]] = None
    store_keys: Optional[Dict[str, bytes]] = None

    @property
    def status(self) -> str:
        return C.worst(self.checks)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_json(self) -> Dict[str, Any]:
        """The ``doctor -o json`` document (schema ``rdzvctl.doctor/v1``)."""
        counts = {s: sum(1 for c in self.checks if c.status == s) for s in C.STATUSES}
        return {
            "schema": SCHEMA,
            "backend": self.backend,
            "endpoint": self.endpoint,
            "run_id": self.run_id,
            "checked_at": format_time(self.checked_at),
            "status": self.status,
            "counts": counts,
            "checks": [c.to_json() for c in self.checks],
            "server": self.server,
        }


def diagnose(
    backend: RendezvousBackend,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    dns_timeout: float = DNS_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Diagnosis:
    """Check the endpoint, the run and its bootstrap; never raises for what it diagnoses."""
    from rdzvctl.clock import now_utc
    from rdzvctl.inspection import is_legacy_etcd, read_legacy, take_snapshot

    diag = Diagnosis(backend.address.backend, backend.describe(), backend.run_id, now_utc())
    try:
        diag.server = backend.server_info()
    except UnsupportedOperationError:
        diag.server = None
    endpoints: List[Tuple[str, int]] = [(str(e["host"]), int(e["port"])) for e in (diag.server or {}).get("endpoints", [])]
    reachable = not (diag.server or {}).get("error")

    run_checks: List[C.Check] = []
    state = None
    if not backend.run_id:
        run_checks.append(C.Check("run.id", "warn", "no run id given: only the endpoint was checked",
                                  "pass --rdzv-id (or PET_RDZV_ID) to check the run too"))
    elif not reachable:
        run_checks.append(C.Check("run.state", "fail", "not read: the server did not answer (see above)"))
    elif is_legacy_etcd(backend):  # torch's legacy etcd JSON: its own reader and analysis, no pickle checks
        try:
            diag.legacy = read_legacy(backend)
        except RdzvctlError as exc:
            run_checks.append(C.Check("run.state", "fail", f"cannot read the run: {type(exc).__name__}: {exc}",
                                      "check the endpoint checks above and --timeout"))
        else:
            run_checks += C.legacy_run_checks(*diag.legacy)
    else:
        try:
            snap = take_snapshot(backend)
        except RdzvctlError as exc:
            run_checks.append(C.Check("run.state", "fail", f"cannot read the run: {type(exc).__name__}: {exc}",
                                      "check the endpoint checks above and --timeout"))
        else:
            diag.snapshot = snap
            state = snap.state
            error = None if snap.error is None else str(snap.error)
            run_checks += C.run_checks(backend.run_id, state, error, snap.fetched_at, keep_alive, max_nodes)

    keys_note: Optional[str] = None
    if state is not None:
        try:
            diag.store_keys = backend.store_keys()
        except UnsupportedOperationError as exc:
            keys_note = f"not checked: {exc}"
        except RdzvctlError as exc:
            keys_note = f"not checked: cannot read the store keys ({type(exc).__name__}: {exc})"
    target = None if diag.store_keys is None else C.bootstrap_target(diag.store_keys, state.round if state else None)

    hosts = [host for host, _ in endpoints]
    if state is not None:
        hosts += sorted({node.addr for node in state.nodes})
    if target is not None:
        hosts.append(target[1])
    resolved = resolve_all(hosts, dns_timeout)
    targets = [(h, p) for h, p in endpoints if resolved.get(h) is not None and resolved[h].ok]
    if target is not None and resolved.get(target[1]) is not None and resolved[target[1]].ok:
        targets.append((target[1], target[2]))
    connected = connect_all(targets, connect_timeout)

    diag.checks += C.endpoint_checks(endpoints, resolved, connected)
    if diag.server is None:
        diag.checks.append(C.Check("endpoint.server", "ok",
                                   f"the {backend.name or diag.backend} backend cannot describe its server (not checked)"))
    else:
        diag.checks += C.server_checks(diag.server, backend.name or diag.backend)
    diag.checks += run_checks
    if state is not None:
        now = diag.snapshot.fetched_at
        diag.checks += C.node_checks(state, now, keep_alive, max_nodes, resolved)
        diag.checks += C.bootstrap_checks(state, diag.store_keys, resolved, connected, keys_note)
    return diag
