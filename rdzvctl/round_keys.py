"""The run's per-round store keys and what ``reset`` does about them.

``plan_clear`` decides what ``reset --mode clear`` writes (see
:mod:`rdzvctl.state.restart` for why, with torch's functions): a fresh state
past every round that has keys, or, when the store provably holds none, the
removal of the state.  ``check_reopen`` tells whether the round a reopened run
will use next is free of old keys.  Both only read; the write goes through the
usual fenced flow (``rdzvctl.cli.change.apply_change``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.errors import RdzvctlError, UnsupportedOperationError
from rdzvctl.inspection import Snapshot
from rdzvctl.state.codec import encode
from rdzvctl.state.model import RendezvousState
from rdzvctl.state.restart import describe_rounds, fresh_state, join_round, restart_round

__all__ = ["RoundKeys", "ClearPlan", "read_round_keys", "plan_clear", "check_reopen", "RoundKeysInUseError"]


class RoundKeysInUseError(RdzvctlError):
    """The round a repaired run would use next already has an old job's store keys (exit 1)."""


@dataclass(frozen=True)
class RoundKeys:
    """The rounds that have per-round store keys, or why they could not be listed."""

    rounds: Optional[FrozenSet[int]]
    reason: str = ""

    @property
    def known(self) -> bool:
        return self.rounds is not None

    def text(self) -> str:
        if self.rounds is None:
            return f"cannot be listed ({self.reason})"
        if not self.rounds:
            return "none"
        return f"rounds {describe_rounds(self.rounds)}"


def read_round_keys(backend: RendezvousBackend) -> RoundKeys:
    """The rounds with store keys of the backend's run (``store_rounds``), or why unknown."""
    if "store_keys" not in backend.capabilities:
        return RoundKeys(None, f"the {backend.name} backend cannot list the run's store keys")
    try:
        return RoundKeys(backend.store_rounds())
    except UnsupportedOperationError as exc:
        return RoundKeys(None, str(exc).rstrip("."))


@dataclass(frozen=True)
class ClearPlan:
    """What ``reset --mode clear`` writes: ``new`` bytes (a fresh state at ``next_round``),
    or None to remove the state (the next job then starts at round 0)."""

    keys: RoundKeys
    next_round: int
    new: Optional[bytes]
    notes: List[str]

    def to_json(self) -> Dict[str, Any]:
        return {
            "action": "remove" if self.new is None else "fresh-state",
            "next_round": self.next_round,
            "store_key_rounds": None if self.keys.rounds is None else sorted(self.keys.rounds),
        }


def plan_clear(backend: RendezvousBackend, snap: Snapshot) -> Optional[ClearPlan]:
    """The clear of ``snap``'s run; None when there is nothing to clear (no state, no keys)."""
    keys = read_round_keys(backend)
    old: Optional[RendezvousState] = snap.state
    old_round = None if old is None else old.round
    if keys.rounds:
        next_round = restart_round(keys.rounds, old_round)
        what = "is replaced by" if snap.exists else "is created as"
        note = (f"Round keys: the store holds keys of {keys.text()}; torch never deletes them and a job "
                f"restarting at round 0 would read them. They stay; the state {what} a fresh, empty state at "
                f"round {next_round}, so the next job uses new keys.")
    elif keys.known:
        if not snap.exists:
            return None
        return ClearPlan(keys, 0, None, ["Round keys: the store holds none for this run; the state is removed "
                                         "and the next job starts at round 0."])
    elif old_round is not None:
        next_round = restart_round((), old_round)
        note = (f"Round keys: {keys.text()}; the state is replaced by a fresh, empty state at round "
                f"{next_round}, past the old round {old_round} (torch never reuses a round).")
    else:
        if not snap.exists:
            return None
        return ClearPlan(keys, 0, None, [
            f"Round keys: {keys.text()} and the state's round is unreadable; the state is removed and the next "
            "job starts at round 0, where an old job's keys may be left: if it hangs, use a new run id."])
    naive = bool(old is not None and old.naive_datetimes)
    return ClearPlan(keys, next_round, encode(fresh_state(next_round, naive)), [note])


def check_reopen(backend: RendezvousBackend, state: RendezvousState) -> str:
    """A note on the round the reopened run will use; raises :class:`RoundKeysInUseError`
    if that round (or a later one) already has store keys (the run was rewound before)."""
    next_round = join_round(state)
    note = _unexpiring(state)
    keys = read_round_keys(backend)
    if keys.rounds is None:
        return f"Round keys: {keys.text()}; new agents will rendezvous in round {next_round}." + note
    later = sorted(r for r in keys.rounds if r >= next_round)
    if later:
        raise RoundKeysInUseError(
            f"reopening run {backend.run_id!r} would make new agents rendezvous in round {next_round}, but the "
            f"store already holds keys of {describe_rounds(later)} from an earlier job (the round went back): "
            "they would read its MASTER_ADDR; use reset --mode clear instead; nothing was written")
    if not keys.rounds:
        return (f"Round keys: the store holds none for this run; new agents will rendezvous in round "
                f"{next_round}." + note)
    return (f"Round keys: the store holds keys of {keys.text()}; new agents will rendezvous in round "
            f"{next_round}, which has none." + note)


def _unexpiring(state: RendezvousState) -> str:
    """A warning when a complete round has participants torch can never expire.

    torch's ``_BackendRendezvousStateHolder._sanitize`` removes only nodes found
    in ``last_heartbeats``; a participant without one stays, and the round never
    moves on for the new agents (they wait until their join timeout).
    """
    if not state.complete:
        return ""
    missing = [node for node in state.participants if node not in state.last_heartbeats]
    if not missing:
        return ""
    return (f" Warning: {len(missing)} participant(s) have no heartbeat, which torch never expires: new agents "
            "wait for them until join_timeout (remove them with `rdzvctl set --remove-node`).")
