"""``doctor``'s checks: pure functions from data (server facts, a state, probe results) to verdicts.

Each returns :class:`Check` lines: a stable ``name``, a ``status`` (``ok``,
``warn`` or ``fail``), one line saying what was found and, unless ok, what
to do.  No I/O here: :mod:`rdzvctl.doctor.run` gathers the data.  This module
holds the run, node and bootstrap checks; the endpoint and server checks are in
:mod:`rdzvctl.doctor.server_checks` and the :class:`Check` line in
:mod:`rdzvctl.doctor.verdicts` (all re-exported here).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from rdzvctl.doctor.probes import Connection, Resolution, is_loopback_name
from rdzvctl.doctor.server_checks import LOG_SIZE_WARN, NETWORK_FILESYSTEMS, endpoint_checks, server_checks
from rdzvctl.doctor.verdicts import STATUSES, Check, worst
from rdzvctl.doctor.verdicts import ms as _ms
from rdzvctl.doctor.verdicts import show as _show
from rdzvctl.state.analysis import SUSPICIOUS_RUN_IDS, KeepAlive, node_statuses
from rdzvctl.state.findings import find_problems, master_addresses
from rdzvctl.state.model import NodeDesc, RendezvousState

__all__ = [
    "Check", "STATUSES", "worst", "endpoint_checks", "server_checks", "run_checks", "legacy_run_checks", "node_checks",
    "bootstrap_checks", "NETWORK_FILESYSTEMS", "FUTURE_TOLERANCE", "LOG_SIZE_WARN", "WRITES_PER_SECOND_WARN",
]

#: A heartbeat further than this in the future means the node's clock runs ahead of ours.
FUTURE_TOLERANCE = _dt.timedelta(seconds=2)
#: Whole-state rewrites per second (nodes / keep_alive_interval) above which contention hurts.
WRITES_PER_SECOND_WARN = 100.0
#: Codes of analysis findings that doctor reports as checks of its own.
_OWN_CODES = frozenset({"heartbeat-in-future", "shared-run-id", "over-max-nodes", "participant-and-waiting"})


# -- the run --------------------------------------------------------------------------------
def _run_id_check(run_id: str) -> Check:
    if run_id.strip() in SUSPICIOUS_RUN_IDS:
        return Check("run.id", "warn", f"the run id {run_id!r} is a common default that unrelated jobs share "
                     "(a new job then fails with RendezvousClosedError)", "give each job a unique --rdzv-id")
    return Check("run.id", "ok", f"run id {run_id!r}")


def _findings_check(findings: Sequence[Any]) -> Check:
    if not findings:
        return Check("run.findings", "ok", "no warnings or errors in the state")
    status = "fail" if any(f.severity == "error" for f in findings) else "warn"
    first = findings[0]
    outlook = getattr(first, "outlook", "")
    return Check("run.findings", status,
                 f"{len(findings)} finding(s): {', '.join(f.code for f in findings)}; first: {first.message}"
                 + (f"; torch next: {outlook}" if outlook else ""),
                 first.repair or "rdzvctl corrupt-detect", data={"codes": [f.code for f in findings]})


def legacy_run_checks(run: Any, report: Any) -> List[Check]:
    """:func:`run_checks` for torch's legacy etcd JSON state (a :class:`rdzvctl.state.legacy_etcd.LegacyRun`
    and its :class:`~rdzvctl.state.legacy_etcd.LegacyReport`): the run id, the state, its findings, and the
    pickled backends' node and bootstrap checks marked n/a (this handler keeps no heartbeats or addresses)."""
    out = [_run_id_check(run.run_id)]
    key = f"{run.run_path}/rdzv/active_version"
    corrupt = next((f for f in report.findings if f.code == "state-corrupt"), None)
    if corrupt is not None:
        out.append(Check("run.state", "fail", f"the legacy etcd state at {key} is unusable: {corrupt.message}; "
                         f"torch next: {report.next_step}", corrupt.repair or "rdzvctl corrupt-detect"))
        return out
    if report.state is None:
        out.append(Check("run.state", "warn",
                         f"no state for run {run.run_id!r} ({key}): {report.next_step}",
                         "compare --rdzv-id/--rdzv-endpoint with the job's torchrun flags; rdzvctl list"))
        return out
    state = report.state
    out.append(Check("run.state", "ok", f"legacy etcd JSON state: version {state.version or '-'}, status "
                     f"{state.status}, {len(state.participants or ())} participant(s), "
                     f"{len(state.keep_alives or ())} confirmed"))
    out.append(_findings_check([f for f in report.findings if f.code != "shared-run-id" and f.severity != "info"]))
    na = "n/a on this backend: torch's legacy etcd handler keeps no heartbeats or node addresses"
    out.append(Check("nodes", "ok", f"{na} (the keep-alive leases are judged in run.findings)"))
    out.append(Check("bootstrap", "ok", f"{na}, and no MASTER_ADDR key of a c10d store"))
    return out


def run_checks(run_id: str, state: Optional[RendezvousState], error: Optional[str],
               now: _dt.datetime, keep_alive: KeepAlive, max_nodes: Optional[int]) -> List[Check]:
    """The run id, whether the state decodes, and the analysis findings doctor has no own check for."""
    out: List[Check] = [_run_id_check(run_id)]
    if error is not None:
        out.append(Check("run.state", "fail", f"the state does not decode: {error}",
                         "rdzvctl corrupt-detect (explains why); then rdzvctl reset --mode clear (backed up)"))
        return out
    if state is None:
        out.append(Check("run.state", "warn",
                         f"no state for run {run_id!r}: the job has not started yet, or uses another run id or backend",
                         "compare --rdzv-id/--rdzv-endpoint with the job's torchrun flags; rdzvctl list"))
        return out
    participants = len(state.participants)
    out.append(Check("run.state", "ok", f"round {state.round}, {'complete' if state.complete else 'forming'}"
                     f"{', closed' if state.closed else ''}, {participants} participant(s), "
                     f"{len(state.wait_list)} waiting, {len(state.redundancy_list)} redundant"))
    findings = [f for f in find_problems(state, now, keep_alive, max_nodes=max_nodes, run_id=run_id)
                if f.code not in _OWN_CODES and f.severity != "info"]
    out.append(_findings_check(findings))
    return out


def node_checks(state: RendezvousState, now: _dt.datetime, keep_alive: KeepAlive, max_nodes: Optional[int],
                resolved: Mapping[str, Resolution], tolerance: _dt.timedelta = FUTURE_TOLERANCE) -> List[Check]:
    """Node addresses (resolve, loopback among remote hosts), duplicates, clock skew, keep-alive, max_nodes."""
    out: List[Check] = []
    nodes = sorted(state.nodes)
    addrs = sorted({n.addr for n in nodes})
    bad = [a for a in addrs if a in resolved and not resolved[a].ok and not resolved[a].timed_out]
    slow = [a for a in addrs if a in resolved and resolved[a].timed_out]
    if bad:
        shown = [f"{a} ({resolved[a].error})" for a in bad]
        out.append(Check("nodes.resolve", "fail",
                         f"{len(bad)} of {len(addrs)} node address(es) do not resolve here: {_show(shown)}",
                         "fix the nodes' host names or DNS, or give torchrun --local-addr a resolvable address",
                         data={"unresolved": bad}))
    elif not slow:
        out.append(Check("nodes.resolve", "ok", f"all {len(addrs)} node address(es) resolve"))
    if slow:
        out.append(Check("nodes.resolve", "warn",
                         f"the resolver did not answer in time for {len(slow)} of {len(addrs)} node address(es): "
                         f"{_show(slow)}", "retry with a longer --dns-timeout; a slow resolver also delays the "
                         "nodes' own lookups", data={"timed_out": slow}))
    arpa = [a for a in addrs if a.rstrip(".").lower().endswith(".arpa")]
    if arpa:
        out.append(Check("nodes.reverse-names", "warn", f"reverse-lookup names used as node addresses: {_show(arpa)}",
                         "set the hosts' names (hostname -f) or pass torchrun --local-addr"))
    loop = [a for a in addrs if is_loopback_name(a) or (a in resolved and resolved[a].loopback)]
    remote_hosts = {resolved[a].addresses for a in addrs if a not in loop and a in resolved and resolved[a].ok}
    if loop and remote_hosts:
        out.append(Check("nodes.loopback", "fail",
                         f"loopback address(es) {_show(loop)} among nodes on {len(remote_hosts)} other host(s): "
                         "peers would connect to themselves",
                         "give those nodes a routable address (torchrun --local-addr, or fix /etc/hosts)",
                         data={"loopback": loop}))
    elif loop:
        out.append(Check("nodes.loopback", "ok", "every node is on this host's loopback (a single-host run)"))
    else:
        out.append(Check("nodes.loopback", "ok", "no loopback addresses"))
    out.append(_duplicates(state))
    future = [(s.node.id, -s.age) for s in node_statuses(state, now, keep_alive)
              if s.age is not None and -s.age > tolerance.total_seconds()]
    if future:
        future.sort(key=lambda item: -item[1])
        shown = [f"{node} (+{ahead:.1f} s)" for node, ahead in future]
        out.append(Check("nodes.clock", "warn",
                         f"{len(future)} heartbeat(s) lie more than {tolerance.total_seconds():g} s in the future: "
                         f"{_show(shown)}; those nodes' clocks (or this machine's) are off, so liveness is misjudged",
                         "synchronise the clocks (NTP/chrony) on the nodes and here", data={"ahead": dict(future)}))
    else:
        out.append(Check("nodes.clock", "ok", f"no heartbeat more than {tolerance.total_seconds():g} s in the future"))
    out.append(_keep_alive(len(nodes), keep_alive))
    if max_nodes is not None:
        count = len(state.participants)
        if count > max_nodes:
            out.append(Check("nodes.max-nodes", "fail", f"{count} participants exceed max_nodes={max_nodes}",
                             "rdzvctl reset --mode prune (dead nodes) or reset --mode clear"))
        else:
            out.append(Check("nodes.max-nodes", "ok", f"{count} participant(s) within max_nodes={max_nodes}"))
    return out


def _duplicates(state: RendezvousState) -> Check:
    lists = {"participants": set(state.participants), "wait list": state.wait_list,
             "redundancy list": state.redundancy_list}
    twice = sorted(str(n) for n in state.nodes if sum(n in group for group in lists.values()) > 1)
    if twice:
        return Check("nodes.duplicates", "fail", f"node(s) in more than one list: {_show(twice)}",
                     "rdzvctl set --remove-node NODE, then let it rejoin", data={"nodes": twice})
    by_process: Dict[Tuple[str, int], List[NodeDesc]] = {}
    for node in state.participants:
        by_process.setdefault((node.addr, node.pid), []).append(node)
    again = sorted(str(n) for group in by_process.values() if len(group) > 1 for n in group)
    if again:
        return Check("nodes.duplicates", "warn",
                     f"one agent process joined the round more than once (same address and pid): {_show(again)}",
                     "a stale handler in that process? restart that agent", data={"nodes": again})
    return Check("nodes.duplicates", "ok", "no node appears twice")


def _keep_alive(count: int, keep_alive: KeepAlive) -> Check:
    rate = count / keep_alive.interval if keep_alive.interval else 0.0
    setting = f"keep_alive_interval={keep_alive.interval:g}s x keep_alive_max_attempt={keep_alive.max_attempt}"
    if keep_alive.max_attempt < 3:
        return Check("nodes.keep-alive", "warn",
                     f"{setting}: one late heartbeat (torch beats about once a second while a round forms) "
                     "can expire a live node", "use keep_alive_max_attempt >= 3 (the job's and rdzvctl's --rdzv-conf)")
    if rate > WRITES_PER_SECOND_WARN:
        suggested = -(-count // int(WRITES_PER_SECOND_WARN))
        return Check("nodes.keep-alive", "warn",
                     f"{setting} with {count} nodes: about {rate:.0f} whole-state rewrites a second, each a "
                     "compare-and-set that conflicts with the others",
                     f"raise keep_alive_interval to about {suggested} s for this many nodes (torch #145228)")
    return Check("nodes.keep-alive", "ok", f"{setting}; {count} node(s), about {rate:.1f} state writes a second")


# -- the round's bootstrap ----------------------------------------------------------------------
def bootstrap_checks(state: Optional[RendezvousState], keys: Optional[Mapping[str, bytes]],
                     resolved: Mapping[str, Resolution], connected: Mapping[Tuple[str, int], Connection],
                     note: Optional[str] = None) -> List[Check]:
    """MASTER_ADDR/MASTER_PORT of the latest round that has them: they resolve and something listens."""
    if keys is None:
        return [Check("bootstrap.master", "ok", note or "the backend cannot list the round's store keys (not checked)")]
    found = bootstrap_target(keys, None if state is None else state.round)
    if found is None:
        return [Check("bootstrap.master", "ok", "no MASTER_ADDR/MASTER_PORT stored for this run (nothing to check)")]
    round_, host, port = found
    current = state is not None and round_ == state.round
    label = f"round {round_}" + ("" if current else f" (the state is at round {state.round})" if state else "")
    where = f"{host}:{port}"
    res = resolved.get(host)
    if res is not None and not res.ok:
        return [Check("bootstrap.master", "fail", f"{label}: MASTER_ADDR {host} does not resolve: {res.error}",
                      "fix DNS for rank 0's host, or give torchrun --local-addr a resolvable address")]
    conn = connected.get((host, port))
    if conn is not None and not conn.ok:
        status = "fail" if current and state is not None and state.complete else "warn"
        return [Check("bootstrap.master", status,
                      f"{label}: nothing accepts connections at MASTER_ADDR:MASTER_PORT {where} ({conn.error}); "
                      "workers of this round cannot reach their store",
                      "is rank 0's agent alive? if it died, rdzvctl reset --mode prune or --mode clear starts a new round")]
    took = "" if conn is None else f" ({_ms(conn.seconds)})"
    return [Check("bootstrap.master", "ok", f"{label}: MASTER_ADDR:MASTER_PORT {where} accepts connections{took}")]


def bootstrap_target(keys: Mapping[str, bytes], current_round: Optional[int]) -> Optional[Tuple[int, str, int]]:
    """``(round, MASTER_ADDR, MASTER_PORT)`` of the latest round (not after the current one) that published both."""
    published = [p for p in master_addresses(keys) if current_round is None or p[0] <= current_round]
    return published[-1] if published else None
