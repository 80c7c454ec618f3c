"""The findings of a state: each says what torch does next, and offers a repair only when torch will not.

Every finding is judged with :func:`rdzvctl.state.lifecycle.lifecycle` (the
model of torch 2.13's ``dynamic_rendezvous.py``): ``torch_next`` is one of
:data:`rdzvctl.state.lifecycle.TORCH_NEXT`, ``outlook`` the sentence that says
it, and ``repair`` is empty whenever torch's own agents (or the next job's
first sync) fix the state themselves -- a repair never fights a recovery in
progress.  Linear in the number of nodes, whatever the values (ranks included).
"""

from __future__ import annotations

import datetime as _dt
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from rdzvctl.state.lifecycle import Lifecycle, Liveness, _first_missing_ranks, lifecycle, liveness, show_nodes
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.state.nodes import DEFAULT_KEEP_ALIVE, FUTURE_TOLERANCE, KeepAlive
from rdzvctl.state.repairs import RESTART_NODE
from rdzvctl.state.store_keys import split_round_key

#: ``add(code, severity, message, torch_next, outlook, repair="", nodes=())``: record one finding.
_Add = Callable[..., None]

__all__ = ["Finding", "SEVERITIES", "SUSPICIOUS_RUN_IDS", "find_problems", "master_address_findings", "MAX_RANK",
           "master_addresses"]

SEVERITIES = ("info", "warning", "error")

#: Run ids that many unrelated jobs end up sharing (pytorch#82160: "none").
SUSPICIOUS_RUN_IDS = frozenset({"", "none", "None", "default", "test", "job", "run", "0", "1"})


class Finding(NamedTuple):
    """One problem: a stable code, a severity, one line of explanation and the repair.

    ``torch_next`` says what torch does next about it (a key of
    :data:`rdzvctl.state.lifecycle.TORCH_NEXT`) and ``outlook`` says it in a
    sentence; ``repair`` is empty when torch fixes it itself.
    """

    code: str
    severity: str
    message: str
    repair: str = ""
    nodes: Tuple[str, ...] = ()
    torch_next: str = ""
    outlook: str = ""

    def to_json(self) -> Dict[str, object]:
        """The finding as documented in ``get -o json`` (``problems``) and ``corrupt-detect -o json``."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "repair": self.repair,
                "nodes": list(self.nodes), "torch_next": self.torch_next, "outlook": self.outlook}

    def at_least(self, severity: str) -> bool:
        return SEVERITIES.index(self.severity) >= SEVERITIES.index(severity)


#: torch passes ranks and world sizes to c10d as C ``int``: a rank at or above this is never torch's.
MAX_RANK = 2**31 - 1

_REPAIR_RESTART = (f"rdzvctl set --add-waiting {RESTART_NODE} (a waiting node makes the live agents restart the "
                   "round: `num_nodes_waiting`; it expires after one keep-alive window)")


def _ids(nodes: Iterable[NodeDesc]) -> Tuple[str, ...]:
    return tuple(sorted([n.id for n in nodes]))  # n.id is str(n), without a call of NodeDesc.__str__


def find_problems(
    state: RendezvousState,
    now: _dt.datetime,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
    max_nodes: Optional[int] = None,
    run_id: Optional[str] = None,
    closed_since: Optional[_dt.datetime] = None,
    life: Optional[Lifecycle] = None,
    live: Optional[Liveness] = None,
) -> List[Finding]:
    """torch's invariants and the field incidents, most severe first, each with torch's next step.

    ``live`` is ``liveness(state, now, keep_alive.expiry)`` when the caller has it already.
    """
    if live is None:
        live = liveness(state, now, keep_alive.expiry)
    if life is None:
        life = lifecycle(state, now, keep_alive.interval, keep_alive.max_attempt, closed_since, live=live)
    anyone = bool(live.live)
    # What torch does with something its live agents drop at their next sync (`_sanitize`).
    dropped = ("recovers", "the next sync of a live agent drops it (`_sanitize`)") if anyone else \
        ("next-join-fixes", "no agent is alive: the first sync of a new job's agent drops it (`_sanitize`)")
    out: List[Finding] = []

    def add(code: str, severity: str, message: str, torch_next: str, outlook: str, repair: str = "",
            nodes: Tuple[str, ...] = ()) -> None:
        out.append(Finding(code, severity, message, repair, nodes, torch_next, outlook))

    # Sets built from the state's dicts and sets reuse the hashes stored with their keys (no
    # NodeDesc.__hash__ call); each check below builds its node ids only when it has nodes.
    participants = set(state.participants)
    beats = state.last_heartbeats
    beating = set(beats)
    wait_list, redundancy_list = state.wait_list, state.redundancy_list
    if state.complete:
        _complete_round(state, max_nodes, life, live, add)
    elif live.dead_participants:
        dead = _ids(live.dead_participants)
        add("dead-participants", "warning" if not anyone else "info",
            f"{len(dead)} participant(s) of the forming round {state.round} stopped heartbeating: "
            f"{show_nodes(dead)}", *dropped, nodes=dead)
    for label, group in (("participant", participants), ("waiting node", wait_list),
                         ("redundant node", redundancy_list)):
        unbeating = group - beating
        if unbeating:
            missing = _ids(unbeating)
            add("missing-heartbeat", "error",
                f"{len(missing)} {label}(s) without a heartbeat: {show_nodes(missing)}",
                "stays", "torch never drops a node without a heartbeat (`_sanitize` looks only at heartbeats) "
                "and its agent never heartbeats again (`_should_keep_alive`)",
                "rdzvctl set --remove-node NODE", missing)
    if wait_list and not participants.isdisjoint(wait_list):
        both = _ids(participants & wait_list)
        add("participant-and-waiting", "error", f"node(s) both participating and waiting: {show_nodes(both)}",
            "stays", "the wait list counts them (`num_nodes_waiting`), so the agents keep restarting their "
            "workers; torch removes a node from the wait list only when it joins (`_add_to_participants`)",
            "rdzvctl set --remove-node NODE, then let it rejoin", both)
    if live.dead and not live.dead <= participants:
        dead_others = _ids(live.dead - participants)
        add("dead-nodes", "info",
            f"{len(dead_others)} waiting/redundant node(s) stopped heartbeating: {show_nodes(dead_others)}",
            *dropped, nodes=dead_others)
    # No heartbeat is later than the newest one (``live.newest``): the nodes are looked at only when it is.
    if live.newest is not None and live.newest - now > FUTURE_TOLERANCE:
        future = _ids(n for n, when in beats.items() if when - now > FUTURE_TOLERANCE)
        add("heartbeat-in-future", "warning",
            f"{len(future)} heartbeat(s) lie in the future (clock skew between nodes and this machine?): "
            f"{show_nodes(future)}", "stays",
            "each agent judges liveness with its own clock (`_sanitize`): a node ahead of its peers is judged "
            "dead too late", "fix the clocks (NTP)", future)
    if state.closed:
        _closed(state, life, add)
    if max_nodes is not None and len(participants) > max_nodes:
        message = f"{len(participants)} participants exceed max_nodes={max_nodes}"
        if len(live.live_participants) > max_nodes:
            add("over-max-nodes", "error", message, "stays",
                "torch never completes a forming round above max_nodes (`_RendezvousJoinOp`)",
                "rdzvctl reset --mode clear", _ids(participants))
        else:
            add("over-max-nodes", "info", message + f" ({len(live.dead_participants)} of them dead)", dropped[0],
                "torch drops the dead ones at the next live sync (`_sanitize`), which brings the round within "
                "max_nodes", "", _ids(live.dead_participants))
    if run_id is not None and run_id.strip() in SUSPICIOUS_RUN_IDS:
        add("shared-run-id", "warning", f"the run id {run_id!r} is a common default that unrelated jobs share",
            "unaffected", "torch joins whatever job uses the same id: two jobs with it rendezvous together",
            "give each job a unique --rdzv-id")
    if not state.complete and not state.closed and state.deadline is not None and state.deadline < now:
        add("deadline-passed", "info",
            f"the last-call deadline passed {(now - state.deadline).total_seconds():.0f} s ago",
            "recovers" if live.live_participants else dropped[0],
            "the next sync of a live participant completes the round (`_RendezvousJoinOp`)"
            if live.live_participants else "no live participant is left to complete the round")
    unlisted = beating - participants
    if unlisted:
        unlisted -= wait_list
        unlisted -= redundancy_list
    if unlisted:
        orphans = _ids(unlisted)
        add("orphan-heartbeats", "info", f"{len(orphans)} heartbeat(s) of nodes in no list: {show_nodes(orphans)}",
            "recovers" if anyone else "next-join-fixes",
            "a live agent's sync drops them once they expire (`_sanitize`)", nodes=orphans)
    if state.naive_datetimes:
        add("naive-datetimes", "info",
            "datetimes are naive UTC (written by torch older than ~2.6); rdzvctl writes them back the same way",
            "unaffected", "torch of the same version reads and writes them unchanged")
    if len(out) > 1:
        out.sort(key=lambda f: _MOST_SEVERE_FIRST[f.severity])  # stable: same severity, order found
    return out


_MOST_SEVERE_FIRST = {s: i for i, s in enumerate(reversed(SEVERITIES))}


def _complete_round(state: RendezvousState, max_nodes: Optional[int], life: Lifecycle, live: Liveness,
                    add: "_Add") -> None:
    ranks = state.participants.values()
    # Above max_nodes, over-max-nodes speaks; otherwise a rank at or above max_nodes was never torch's.
    limit = MAX_RANK if max_nodes is None or len(state.participants) > max_nodes else max_nodes
    distinct = set(ranks)
    bad = sorted(r for r in distinct if r < 0 or r >= limit) \
        if distinct and (min(distinct) < 0 or max(distinct) >= limit) else []
    repeated = len(distinct) != len(state.participants)
    if bad or repeated:
        what = ("repeat" if repeated else "") + (" and " if repeated and bad else "") + \
            (f"lie outside 0..{limit - 1}: {bad[:8]}{'...' if len(bad) > 8 else ''}" if bad else "")
        add("ranks-invalid", "error", f"the round is complete but its ranks {what}; torch never assigns those "
            "(`_mark_rendezvous_complete` numbers participants 0..n-1)", "agents-fail",
            "the agents get these ranks as they are (`_get_world`) and their process group cannot form",
            "rdzvctl reset --mode clear (the agents re-rendezvous from scratch)", _ids(state.participants))
    elif not live.dead_participants:
        missing = _first_missing_ranks(distinct, 8)
        if missing:
            stuck = life.torch_next == "stays"
            add("participant-left", "error" if stuck else "info",
                f"a participant left the complete round {state.round}: rank(s) {missing}"
                f"{'...' if len(missing) >= 8 else ''} are free", life.torch_next, life.outlook,
                _REPAIR_RESTART if stuck else "", life.nodes)
    if not state.participants:
        add("complete-without-participants", "error", "the round is marked complete but has no participants",
            "stays", "a joining agent waits for the next round (`_RendezvousJoinOp`), which only starts when a "
            "participant leaves (`_remove_participant_epilogue`): it waits forever",
            f"rdzvctl set --no-complete --round {state.round + 1} (what torch does when the last participant "
            "leaves)")
    if state.deadline is not None:
        add("deadline-on-complete", "info",
            "the round is complete but still has a last-call deadline (torch clears it on completion)",
            "unaffected", "torch ignores the deadline of a complete round and sets a new one when the next round "
            "reaches min_nodes (`_add_to_participants`)")
    if live.dead_participants:
        dead = _ids(live.dead_participants)
        expiry = "stopped heartbeating"
        if life.phase == "stuck" and life.torch_next == "stays":
            add("dead-participants", "error", f"{len(dead)} participant(s) of the complete round {state.round} "
                f"{expiry}: {show_nodes(dead)}", "stays", life.outlook,
                "rdzvctl reset --mode prune (drops them as torch's `_sanitize` will); if the survivors' workers do "
                f"not fail and restart by themselves, then {_REPAIR_RESTART}", dead)
        else:
            add("dead-participants", "warning" if life.torch_next == "next-join-fixes" else "info",
                f"{len(dead)} participant(s) of the complete round {state.round} {expiry}: {show_nodes(dead)}",
                life.torch_next, life.outlook, "", dead)


def _closed(state: RendezvousState, life: Lifecycle, add: "_Add") -> None:
    waiting = f" ({len(state.wait_list)} waiting node(s) fail at their next sync)" if state.wait_list else ""
    if life.phase == "closing":
        add("closed", "error", f"the rendezvous is closed{waiting}; a normal end is not certain yet (no repair "
            "while agents may be shutting down: one still closing would close it again, `_RendezvousCloseOp`)",
            "new-job-fails", life.outlook, "", life.nodes)
    elif life.phase == "closed-under-live-agents":
        add("closed-while-alive", "error", f"the rendezvous was closed under live agents{waiting}",
            "new-job-fails", life.outlook, "rdzvctl reset --mode reopen", life.nodes)
    else:
        add("closed", "error", f"closed: a new job with this id fails{waiting}", "new-job-fails", life.outlook,
            "rdzvctl reset --mode reopen (before reusing the run id)", life.nodes)


# -- the round's published rank-0 address -------------------------------------------------
def master_addresses(store_keys: Mapping[str, object]) -> List[Tuple[int, str, int]]:
    """``(round, MASTER_ADDR, MASTER_PORT)`` of every round that published both, by round.

    ``store_keys`` is ``"<round>/<name>" -> bytes or str`` (backend ``store_keys()``, ``get --keys``).
    """
    found: Dict[int, Dict[str, str]] = {}
    for key, value in store_keys.items():
        parsed = split_round_key(key)
        if parsed is not None and parsed[1] in ("MASTER_ADDR", "MASTER_PORT"):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            found.setdefault(parsed[0], {})[parsed[1]] = text.strip()
    out = []
    for number, pair in sorted(found.items()):
        port = pair.get("MASTER_PORT", "")
        if "MASTER_ADDR" in pair and port.isdigit() and 0 < int(port) < 65536:
            out.append((number, pair["MASTER_ADDR"], int(port)))
    return out


#: At most this many published addresses (the newest rounds first) are judged and probed.
MAX_PROBES = 4


def addresses_to_probe(store_keys: Mapping[str, object]) -> List[Tuple[str, int]]:
    """The distinct published ``(MASTER_ADDR, MASTER_PORT)`` of the newest rounds (at most :data:`MAX_PROBES`)."""
    seen: List[Tuple[str, int]] = []
    for _, addr, port in reversed(master_addresses(store_keys)):
        if (addr, port) not in seen:
            seen.append((addr, port))
        if len(seen) == MAX_PROBES:
            break
    return seen


def master_address_findings(
    state: RendezvousState,
    now: _dt.datetime,
    store_keys: Mapping[str, object],
    probe: Optional[Mapping[Tuple[str, int], str]] = None,
    keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE,
) -> List[Finding]:
    """A published MASTER_ADDR:PORT the live agents keep, of a dead node (and, probed, where nothing listens).

    With torch's default shared agent store the agents keep the bootstrap
    address of the first round they joined (``DynamicRendezvousHandler.
    next_rendezvous`` rebuilds it only for a new rank 0 without a store
    server, which then publishes its own): when the node behind a kept
    address is gone, those agents' next rounds fail connecting to it (the
    workers' ``init_process_group`` times out) however often they restart.
    The keys show the sharing: a completed round after a published one that
    published nothing (rounds below ``state.round`` were all complete).
    Without sharing every round publishes afresh and torch recovers by itself.
    ``probe`` maps ``(addr, port)`` to ``"listening"``, ``"refused"`` or
    ``"unreachable"`` (the CLI's bounded TCP connect; absent: not probed).
    """
    published = master_addresses(store_keys)
    if not published or state.closed:
        return []
    live = liveness(state, now, keep_alive.expiry)
    if not live.live:
        return []  # no agent left to use an address; a new job publishes its own
    last_completed = state.round if state.complete else state.round - 1
    rounds = {r for r, _, _ in published}
    out: List[Finding] = []
    judged: List[Tuple[str, int]] = []
    for round_, addr, port in reversed(published):
        if (addr, port) in judged or len(judged) == MAX_PROBES:
            continue
        judged.append((addr, port))
        # A completed round after round_ without keys (counted, never enumerated: rounds are values).
        later_published = sum(1 for r in rounds if round_ < r <= last_completed)
        if later_published >= last_completed - round_:
            continue  # every later round published its own: no sign the agents keep this one
        result = (probe or {}).get((addr, port))
        at_addr = [n for n in state.nodes if n.addr == addr]
        alive_there = [n for n in at_addr if n in live.live]
        if result == "listening" or (result is None and alive_there):
            continue
        why = (f"nothing listens there ({result})" if result in ("refused", "unreachable")
               else f"no live node has address {addr}")
        dead_there = _ids(n for n in at_addr if n not in live.live)
        out.append(Finding(
            "master-addr-dead", "error",
            f"round {round_} published MASTER_ADDR:PORT {addr}:{port} and {why}; "
            + (f"the node(s) there stopped heartbeating: {show_nodes(dead_there)}" if dead_there else
               "the node that published it is no longer in the state")
            + f"; the agents share rank 0's store (round(s) after {round_} published none)",
            "restart every agent of the job (or launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): the agents keep "
            "this address in memory, no write to the store changes it",
            dead_there, "agents-fail",
            f"agents that joined in round {round_} keep this address "
            "(`DynamicRendezvousHandler.next_rendezvous`): their next rounds fail connecting to it (Gloo "
            "connectFullMesh ... Connection refused, DistStoreError: wait timeout) however often they restart"))
    return out
