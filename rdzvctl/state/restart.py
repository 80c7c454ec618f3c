"""Where a run starts again after ``reset``: past every round whose store keys survive.

Why the round matters (torch 2.13, ``dynamic_rendezvous.py``):

* ``DynamicRendezvousHandler._get_store``/``_wrap_store`` hand the agents of a
  round ``PrefixStore("torch.rendezvous.<run_id>.<round>", store)`` on the
  handler's store, and ``next_rendezvous`` has rank 0 publish
  ``MASTER_ADDR``/``MASTER_PORT`` there (``RendezvousStoreInfo.build``: rank 0
  ``set``s, every rank ``get``s); torchrun's agent keeps that store
  (``SimpleElasticAgent._rendezvous``) for its rank assignment
  (``_assign_worker_ranks``: ``torchelastic/role_info/``,
  ``torchelastic/assigned_ranks/``) and exit barrier (``_exit_barrier``:
  ``torchelastic/agent/terminal_state``), under the same prefix.
* Nothing deletes those keys (on Redis/etcd-v3 they expire with the store's
  TTL, 7200 s; on c10d and etcd-v2 never).  torch does not need to: a
  ``_RendezvousState`` round only grows (``_remove_participant_epilogue`` is the
  only place that changes it: ``round += 1`` once a complete round has lost
  every participant), so within one state no round is used twice.
* A run whose state is removed restarts at round 0 (``_RendezvousState.__init__``,
  which ``_BackendRendezvousStateHolder.sync`` uses when ``get_state`` returns
  None).  If the store still holds round 0's keys, a rank that reaches
  ``RendezvousStoreInfo.build`` before the new rank 0 rewrote them reads the
  old job's ``MASTER_ADDR``/``MASTER_PORT`` (and the agents the old rank and
  barrier counters): the job hangs.

The design: ``reset --mode clear`` does not make torch start at round 0 over
old keys.  When the store holds per-round keys, it writes a fresh, empty,
open state whose round is past every round with keys and past the old state's
round (torch treats it exactly as a new run: ``_RendezvousJoinOp`` adds the
first agents to the participants of that round, since it is not complete and
not closed; ``next_rendezvous`` only uses the round for the store prefix and
for the start-up jitter at round 0).  The old keys stay where they are, so
nothing but the state is replaced and the backup (the state's exact bytes) is
complete.  This is right for a corrupt state too, whose round is unknown: the
keys themselves say which rounds were used.  When the store provably holds no
keys of the run, the state is simply removed (a new job at round 0 reads
nothing old).  Deleting the keys instead would need a listing and a fenced
multi-key delete on every store, and torch's agents of a job still exiting may
be reading them.
"""

from __future__ import annotations

from typing import Iterable, Optional

from rdzvctl.state.model import RendezvousState

__all__ = ["restart_round", "fresh_state", "join_round", "describe_rounds"]


def restart_round(key_rounds: Iterable[int], old_round: Optional[int]) -> int:
    """The first round a restarted run may use: past every round with store keys and past
    ``old_round`` (the old state's round; None when the state is unreadable)."""
    candidates = [r + 1 for r in key_rounds]
    if old_round is not None:
        candidates.append(old_round + 1)
    return max(candidates, default=0)


def fresh_state(round_: int, naive_datetimes: bool = False) -> RendezvousState:
    """torch's ``_RendezvousState()`` (open, incomplete, nobody in it) at ``round_``."""
    return RendezvousState(round=round_, naive_datetimes=naive_datetimes)


def join_round(state: RendezvousState) -> int:
    """The round new agents of a reopened ``state`` will rendezvous in.

    torch's ``_RendezvousJoinOp``: while the round is incomplete, new agents
    join it as participants; once it is complete they wait (wait or
    redundancy list) until ``_BackendRendezvousStateHolder._sanitize`` has
    removed its dead participants, and ``_remove_participant_epilogue`` moves
    on to ``round + 1`` when the last one is gone.
    """
    return state.round + 1 if state.complete else state.round


def describe_rounds(rounds: Iterable[int], limit: int = 6) -> str:
    """``"0, 1, 2"`` or ``"0-5"`` or ``"0, 3, 7-9 ..."``: short text for a set of rounds."""
    ordered = sorted(set(rounds))
    if not ordered:
        return "none"
    spans = []
    start = prev = ordered[0]
    for value in ordered[1:]:
        if value == prev + 1:
            prev = value
            continue
        spans.append((start, prev))
        start = prev = value
    spans.append((start, prev))
    parts = [f"{a}" if a == b else (f"{a}, {b}" if b == a + 1 else f"{a}-{b}") for a, b in spans]
    text = ", ".join(parts[:limit])
    return text + (", ..." if len(parts) > limit else "")
