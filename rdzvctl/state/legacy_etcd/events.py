"""torch's legacy etcd JSON: the semantic events between two reads of a run (``watch``, ``follow()``).  No I/O."""

from __future__ import annotations

from typing import List, Optional, Tuple

from rdzvctl.state.legacy_etcd.analysis import LegacyReport


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
