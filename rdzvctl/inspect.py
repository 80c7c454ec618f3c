"""Read a run once and describe it: the data every command renders.

:func:`take_snapshot` does the I/O (one ``get_state``); :func:`describe`
turns a snapshot into the documented ``get -o json`` document, which the
renderers show as text.  No printing here.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from rdzvctl.backends.base import RendezvousBackend, Token
from rdzvctl.errors import RdzvctlError, StateError
from rdzvctl.state.analysis import (
    DEFAULT_KEEP_ALIVE,
    KeepAlive,
    NodeStatus,
    deadline_remaining,
    find_problems,
    node_statuses,
)
from rdzvctl.state.codec import decode
from rdzvctl.state.jsonform import format_time, state_to_json
from rdzvctl.state.model import RendezvousState

__all__ = ["Snapshot", "take_snapshot", "describe", "summarize", "SCHEMA", "now_utc"]

SCHEMA = "rdzvctl.get/v1"


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass
class Snapshot:
    """One read of a run: raw bytes and token, and the decoded state or why not."""

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


def snapshot_from(backend: RendezvousBackend, current: Optional[tuple], error: Optional[StateError] = None,
                  run_id: Optional[str] = None) -> Snapshot:
    """Build a snapshot from an already-read ``(bytes, token)`` (or None)."""
    raw, token = current if current is not None else (None, None)
    state = None
    if raw is not None and error is None:
        try:
            state = decode(raw)
        except StateError as exc:
            error = exc
    return Snapshot(
        backend=backend.address.backend,
        endpoint=backend.describe(),
        run_id=backend.run_id if run_id is None else run_id,
        raw=raw,
        token=token,
        token_text=None if token is None else backend.format_token(token),
        state=state,
        error=error,
        fetched_at=now_utc(),
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
        return snapshot_from(backend, _stored_despite(backend, exc), exc)
    return snapshot_from(backend, current)


def _stored_despite(backend: RendezvousBackend, error: StateError) -> Optional[tuple]:
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


def describe(
    snap: Snapshot,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    store_keys: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The ``get -o json`` document (schema ``rdzvctl.get/v1``)."""
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
    doc["state"] = state_to_json(state)
    beats = doc["state"]["last_heartbeats"]  # formatted once, reused per node below
    remaining = deadline_remaining(state, now)
    doc["summary"] = summarize(state, statuses, remaining)
    doc["nodes"] = [
        {
            "node": s.node.id,
            "role": s.role,
            "rank": s.rank,
            "last_heartbeat": beats.get(s.node.id),
            "age": None if s.age is None else round(s.age, 3),
            "alive": s.alive,
        }
        for s in statuses
    ]
    doc["problems"] = [
        {"code": f.code, "severity": f.severity, "message": f.message, "repair": f.repair, "nodes": list(f.nodes)}
        for f in find_problems(state, now, keep_alive, max_nodes=max_nodes, run_id=snap.run_id)
    ]
    if store_keys is not None:
        doc["store_keys"] = store_keys
    return doc


def summarize(state: RendezvousState, statuses: List[NodeStatus], remaining: Optional[float]) -> Dict[str, Any]:
    """The ``summary`` of ``get -o json``: participant, liveness and list counts (also the exporter's gauges)."""
    participants = [s for s in statuses if s.role == "participant"]
    return {
        "participants": len(participants),
        "alive": sum(1 for s in participants if s.alive),
        "dead": sum(1 for s in participants if s.alive is False),
        "waiting": len(state.wait_list),
        "redundant": len(state.redundancy_list),
        "deadline_remaining": None if remaining is None else round(remaining, 3),
    }


def problem_for_error(error: StateError) -> Dict[str, Any]:
    """A state that cannot be decoded, as a finding."""
    return {
        "code": f"state-{error.kind}",
        "severity": "error",
        "message": str(error),
        "repair": "rdzvctl reset --mode clear (a backup of the bytes is kept)",
        "nodes": [],
    }


def worst_severity(problems: List[Dict[str, Any]]) -> Optional[str]:
    order = ["info", "warning", "error"]
    found = [order.index(p["severity"]) for p in problems]
    return order[max(found)] if found else None
