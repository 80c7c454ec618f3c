"""What torch will do next with a state: the lifecycle model every finding uses.

torch's agents act on the shared state only through a few operations of
``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py`` (2.13):

* every sync of a live agent drops nodes whose heartbeat expired
  (``_BackendRendezvousStateHolder.sync`` -> ``_sanitize``), and when that
  empties a complete round it moves to the next one
  (``_remove_participant_epilogue``);
* a live agent heartbeats every ``keep_alive_interval``
  (``_RendezvousKeepAliveOp``, ``_should_keep_alive``), also into a closed state;
* a participant's agent restarts its round when a node waits
  (the elastic agent polls ``num_nodes_waiting``), leaving it through
  ``_RendezvousExitOp`` and waiting for the next round through
  ``_RendezvousJoinOp``;
* a forming round completes at the first sync of a live participant after
  its deadline (``_RendezvousJoinOp``);
* ``shutdown`` stops the heartbeats and closes the run
  (``_RendezvousCloseOp``); a join of a closed run raises
  ``RendezvousClosedError`` (``_RendezvousJoinOp``).

torch 2.13 does *not* add a node to the wait list when a participant of a
complete round dies (the change proposed in pytorch PR #151220 is not in its
``_sanitize``): a dead participant is only dropped, without renumbering, and the
survivors restart only when a node waits or their workers fail.

Everything is a pure function of the state, ``now`` and the keep-alive
settings; nothing here does I/O.
"""

from __future__ import annotations

import datetime as _dt
from itertools import compress
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from rdzvctl.state.jsonform import format_time
from rdzvctl.state.model import NodeDesc, RendezvousState, node_order
from rdzvctl.state.nodes import KeepAlive
from rdzvctl.state.repairs import prune_dead_nodes
from rdzvctl.state.store_keys import split_round_key

__all__ = ["PHASES", "TORCH_NEXT", "Lifecycle", "Liveness", "LaunchVerdict", "liveness", "lifecycle", "launch_verdict",
           "show_nodes"]

#: Lifecycle phases, as users think of a run.
PHASES = ("forming", "complete", "recovering", "stuck", "closing", "finished", "closed-under-live-agents")

#: What torch does next about a finding (the ``torch_next`` field).
TORCH_NEXT = {
    "recovers": "torch's live agents fix this themselves; nothing to do",
    "next-join-fixes": "no agent is alive; the first agent of a new job with this run id fixes it itself",
    "stays": "nothing in torch changes this: it stays until repaired",
    "new-job-fails": "a new rendezvous with this run id fails with RendezvousClosedError",
    "agents-fail": "torch's agents fail on this",
    "unaffected": "torch behaves the same either way",
}


class Liveness(NamedTuple):
    """Who is alive and who is dead, by role (node ids sorted)."""

    live: FrozenSet[NodeDesc]
    dead: FrozenSet[NodeDesc]
    live_participants: Tuple[NodeDesc, ...]
    dead_participants: Tuple[NodeDesc, ...]
    live_waiting: Tuple[NodeDesc, ...]
    newest: Optional[_dt.datetime]  # the freshest heartbeat of any node


def liveness(state: RendezvousState, now: _dt.datetime, expiry: _dt.timedelta) -> Liveness:
    """torch's rule (``_sanitize``): a node is dead iff its heartbeat is older than ``now - expiry``."""
    expire = now - expiry
    # Set operations between sets and dicts reuse the hashes stored with the keys; a lookup
    # (``n in live``) calls NodeDesc.__hash__, in Python, so a healthy state is not looked up
    # node by node. The participants are sorted in their dict's order (torch's, already
    # sorted: linear), never in a set's (random: ~60 ms for 65,536 nodes).
    beats = state.last_heartbeats
    dead = frozenset(compress(beats, map(expire.__gt__, beats.values())))  # when < expire, compared in C
    live = frozenset(beats) - dead if dead else frozenset(beats)
    members = frozenset(state.participants)
    ordered = sorted(state.participants, key=node_order)
    return Liveness(
        live, dead,
        tuple(ordered) if members <= live else tuple(n for n in ordered if n in live),
        tuple(sorted(dead & members, key=node_order)) if dead else (),  # usually few
        tuple(sorted(live & state.wait_list, key=node_order)) if state.wait_list else (),
        max(beats.values(), default=None),
    )


def show_nodes(nodes: Sequence[object], limit: int = 5) -> str:
    """``a, b and 3 more``."""
    names = [str(n) for n in nodes]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Lifecycle(NamedTuple):
    """The phase of a run and what torch does next (the ``lifecycle`` object of ``get -o json``)."""

    phase: str
    torch_next: str  # a key of TORCH_NEXT, or "proceeds" (a healthy run carries on)
    outlook: str  # one sentence: what torch will do next
    nodes: Tuple[str, ...] = ()  # the nodes the outlook is about (dead ones included)
    known_at: Optional[_dt.datetime] = None  # "closing": when a normal end would be certain

    def to_json(self) -> Dict[str, Any]:
        return {"phase": self.phase, "torch_next": self.torch_next, "outlook": self.outlook,
                "nodes": list(self.nodes), "known_at": None if self.known_at is None else format_time(self.known_at)}


def _ids(*groups: Iterable[NodeDesc]) -> Tuple[str, ...]:
    return tuple(sorted({str(n) for group in groups for n in group}))


def lifecycle(
    state: RendezvousState,
    now: _dt.datetime,
    interval: float = 5.0,
    max_attempt: int = 3,
    closed_since: Optional[_dt.datetime] = None,
    min_nodes: Optional[int] = None,
    live: Optional[Liveness] = None,
) -> Lifecycle:
    """The phase of ``state`` at ``now`` and what torch's agents do next.

    ``closed_since`` is when this state was first seen closed (an earlier
    read); with it a close under live agents can be told from a normal end.
    ``live`` is ``liveness(state, now, expiry)`` when the caller has it already.
    """
    expiry = _dt.timedelta(seconds=interval * max_attempt)
    life = live if live is not None else liveness(state, now, expiry)
    if state.closed:
        return _closed(state, now, life, expiry, _dt.timedelta(seconds=interval), closed_since)
    if not life.live:
        nodes = _ids(state.participants, state.wait_list)
        if not state.nodes:
            return Lifecycle("forming", "proceeds", "no node has joined round "
                             f"{state.round} yet; the first agent to join starts it (`_RendezvousJoinOp`)")
        return Lifecycle(
            "stuck", "next-join-fixes",
            f"no agent is alive ({show_nodes(nodes) or 'no node'} stopped heartbeating): nothing changes until a "
            "new job with this run id joins, whose first sync drops the dead nodes (`_sanitize`) and "
            + ("starts the next round (`_remove_participant_epilogue`)" if state.complete else
               f"joins round {state.round} (`_RendezvousJoinOp`)"),
            nodes)
    if state.complete:
        return _complete(state, life)
    return _forming(state, now, life, min_nodes)


def _complete(state: RendezvousState, life: Liveness) -> Lifecycle:
    participants = state.participants  # (named through _ids, which sorts them)
    if life.live_waiting:
        gone = (f"; {show_nodes(life.dead_participants)} stopped heartbeating and the next live sync drops "
                "them (`_sanitize`)" if life.dead_participants else "")
        return Lifecycle(
            "recovering", "recovers",
            f"{len(life.live_waiting)} node(s) wait for round {state.round + 1} ({show_nodes(life.live_waiting)}): "
            "the participants' agents restart their workers when a node waits (`num_nodes_waiting`) and leave "
            f"round {state.round} (`_RendezvousExitOp`){gone}; once no participant is left the next round forms "
            "(`_remove_participant_epilogue`)",
            _ids(life.live_waiting, participants))
    if life.dead_participants:
        return Lifecycle(
            "stuck", "stays",
            f"{show_nodes(life.dead_participants)} of complete round {state.round} stopped heartbeating and nobody "
            f"waits: the live agents drop it at their next sync without renumbering (`_sanitize`) and keep round "
            f"{state.round}; they restart only when a node waits (`num_nodes_waiting`) or their workers fail",
            _ids(participants))
    hole = _first_missing_ranks(state.participants.values(), 1)
    if hole:
        return Lifecycle(
            "stuck", "stays",
            f"a participant left complete round {state.round} (rank {hole[0]} is free) and nobody waits: the "
            "survivors keep the round and restart only when a node waits (`num_nodes_waiting`) or their workers "
            "fail", _ids(participants))
    return Lifecycle("complete", "proceeds",
                     f"round {state.round} is complete with {len(participants)} participant(s): training; "
                     "a node that joins now waits and the agents restart for it (`num_nodes_waiting`)")


def _forming(state: RendezvousState, now: _dt.datetime, life: Liveness, min_nodes: Optional[int]) -> Lifecycle:
    live = life.live_participants
    parts = [f"round {state.round} is forming with {len(state.participants)} participant(s) "
             f"({len(live)} alive)"]
    if life.dead_participants:
        parts.append(f"the next live sync drops {show_nodes(life.dead_participants)} (`_sanitize`)")
    if state.deadline is not None and live:
        if state.deadline <= now:
            parts.append("the last-call deadline has passed: the next sync of a live participant completes the "
                         "round (`_RendezvousJoinOp`)")
        else:
            parts.append(f"the last call ends at {format_time(state.deadline)} and the round completes then, or "
                         "earlier at max_nodes (`_RendezvousJoinOp`)")
    elif min_nodes is not None and len(live) < min_nodes:
        parts.append(f"it waits for min_nodes={min_nodes}")
    else:
        parts.append("it completes when enough nodes join and the last call ends (`_RendezvousJoinOp`)")
    return Lifecycle("forming", "recovers" if life.dead_participants else "proceeds", "; ".join(parts),
                     _ids(state.participants))


def _closed(state: RendezvousState, now: _dt.datetime, life: Liveness, expiry: _dt.timedelta,
            interval: _dt.timedelta, closed_since: Optional[_dt.datetime]) -> Lifecycle:
    fails = "a new job with this run id fails with RendezvousClosedError (`_RendezvousJoinOp`)"
    if not life.live:
        return Lifecycle("finished", "new-job-fails",
                         f"the run is closed and no agent is alive: it has ended; {fails}",
                         _ids(state.participants, state.wait_list))
    live = _ids(life.live)
    if closed_since is not None and now - closed_since >= expiry and life.newest is not None \
            and life.newest > closed_since + interval:
        return Lifecycle(
            "closed-under-live-agents", "new-job-fails",
            f"the run was closed at least {(now - closed_since).total_seconds():.0f} s ago and {len(live)} agent(s) "
            f"still heartbeat ({show_nodes(live)}): an agent closed it while the others run on (they heartbeat "
            "into a closed run: `_RendezvousKeepAliveOp`); their next rendezvous and any new job fail with "
            "RendezvousClosedError (`_RendezvousJoinOp`)", live)
    known_at = (life.newest or now) + expiry
    return Lifecycle(
        "closing", "new-job-fails",
        f"the run is closed while {len(live)} agent(s) still heartbeat ({show_nodes(live)}): this cannot yet tell "
        "a normal end (agents stop heartbeating when they shut down: `shutdown`) from a close under live agents; "
        f"it is known at {format_time(known_at)} (corrupt-detect --settle waits for it); {fails}",
        live, known_at)


def _first_missing_ranks(ranks: Iterable[int], limit: int) -> List[int]:
    """The lowest ``limit`` ranks missing from 0..max(ranks): linear in the ranks, not their values."""
    unique = set(ranks)
    if not unique or (min(unique) == 0 and max(unique) == len(unique) - 1):  # 0..n-1, the usual case
        return []  # (what the walk below finds for them, without sorting 65,536 ranks in Python)
    missing: List[int] = []
    expected = 0
    for rank in sorted(unique):
        while expected < rank and len(missing) < limit:
            missing.append(expected)
            expected += 1
        if len(missing) >= limit:
            break
        expected = rank + 1
    return missing


# -- the launch gate ----------------------------------------------------------------------
class LaunchVerdict(NamedTuple):
    """Will a job started now with this run id rendezvous? (``corrupt-detect --for-launch``)."""

    ok: bool
    reason: str
    round: Optional[int] = None  # the round a new job would form


def launch_verdict(
    state: Optional[RendezvousState],
    now: _dt.datetime,
    interval: float = 5.0,
    max_attempt: int = 3,
    store_keys: Optional[Mapping[str, object]] = None,
) -> LaunchVerdict:
    """Judge the state a new job's first agent sees (after its first sync, ``_sanitize``).

    No: the run is closed (``_RendezvousJoinOp`` raises RendezvousClosedError);
    agents of a running job still heartbeat (the new agents would join it);
    the round stays complete after the dead nodes are dropped (the new agents
    wait for a next round nobody starts); or the store already holds keys of
    the round the new job forms (stale MASTER_ADDR/PORT from an earlier life
    of the run id).  ``store_keys`` is None where the backend cannot list them.
    """
    if state is None:
        first = RendezvousState()
    else:
        if state.closed:
            return LaunchVerdict(False, "the run is closed: a new job fails with RendezvousClosedError "
                                        "(rdzvctl reset --mode reopen)")
        life = liveness(state, now, _dt.timedelta(seconds=interval * max_attempt))
        if life.live:
            return LaunchVerdict(False, f"{len(life.live)} agent(s) of a running job still heartbeat "
                                        f"({show_nodes(sorted(life.live))}): a new job would join them")
        first, _ = prune_dead_nodes(state, now, KeepAlive(interval, max_attempt))
        if first.complete:
            return LaunchVerdict(False, f"round {first.round} stays complete ({len(first.participants)} "
                                        "participant(s) without an expiring heartbeat): new agents wait for a "
                                        "round nobody starts")
    if store_keys:
        rounds = {parsed[0] for parsed in map(split_round_key, store_keys) if parsed is not None}
        stale = sorted(round_ for round_ in rounds if round_ >= first.round)
        if stale:
            return LaunchVerdict(False, f"the store already holds keys of round(s) {stale[:8]}: the new round "
                                        f"{first.round} reads a stale MASTER_ADDR/PORT", first.round)
    note = "" if store_keys is not None else " (this backend cannot list the run's store keys: not checked)"
    return LaunchVerdict(True, f"a new job forms round {first.round}{note}", first.round)
