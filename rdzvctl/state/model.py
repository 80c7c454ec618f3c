"""The rendezvous state, mirroring torch's ``_RendezvousState`` and ``_NodeDesc``.

Field names, defaults and node ordering are torch's own
(``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py``), so the
vocabulary is the one torch users already know.  Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Dict, Optional, Set

from rdzvctl.text import excerpt

__all__ = ["NodeDesc", "RendezvousState", "STATE_FIELDS"]

#: torch's ``_RendezvousState`` attributes, in torch's order (pickle, JSON and model agree on these).
STATE_FIELDS = (
    "round",
    "complete",
    "deadline",
    "closed",
    "participants",
    "wait_list",
    "redundancy_list",
    "last_heartbeats",
)

# How str() writes an int: ASCII digits, no leading zeros, "-" only.
_INTEGER = re.compile(r"0|-?[1-9][0-9]{0,19}")  # at most 20 digits: 64 bits, and int() takes it


@dataclass(eq=True, order=True, frozen=True)
class NodeDesc:
    """A node of the rendezvous: torch's ``_NodeDesc``.

    Ordering is (addr, pid, local_id), which is how torch assigns ranks when a
    round completes.  ``str(node)`` is torch's ``repr``: ``addr_pid_localid``.
    """

    addr: str
    pid: int
    local_id: int

    def __str__(self) -> str:
        return self.id

    def __hash__(self) -> int:
        # Not the dataclass's hash((addr, pid, local_id)): its int lanes let a state hold
        # thousands of same-addr nodes with one hash whatever the str hash key is (a set of
        # them costs O(n^2)); the id string hashes with the per-process SipHash key, and
        # equal nodes have equal ids.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = self.__dict__["_hash"] = hash(f"{self.addr}_{self.pid}_{self.local_id}")
        return cached

    @cached_property
    def id(self) -> str:
        """The node id as torch prints it (``addr_pid_localid``); computed once per node."""
        return f"{self.addr}_{self.pid}_{self.local_id}"

    @classmethod
    def parse(cls, node_id: str) -> "NodeDesc":
        """Parse ``addr_pid_localid`` exactly as ``str`` writes it (the inverse of ``str``).

        The address itself may contain ``_``; pid and local id must be plain
        decimal integers (no sign but ``-``, no leading zeros, no spaces), so
        two different ids never name the same node.
        """
        parts = node_id.rsplit("_", 2)
        if len(parts) != 3 or not all(_INTEGER.fullmatch(p) for p in parts[1:]):
            raise ValueError(f"not a node id (addr_pid_localid): {excerpt(node_id)}")
        addr, pid, local_id = parts
        return cls(addr, int(pid), int(local_id))


@dataclass
class RendezvousState:
    """torch's ``_RendezvousState``; datetimes are always timezone-aware UTC here.

    ``naive_datetimes`` records that the state was read from a torch older than
    ~2.6, which wrote naive UTC datetimes: :func:`rdzvctl.state.codec.encode`
    writes such a state back naive, because torch cannot compare the two kinds.
    """

    round: int = 0
    complete: bool = False
    deadline: Optional[datetime] = None
    closed: bool = False
    participants: Dict[NodeDesc, int] = field(default_factory=dict)
    wait_list: Set[NodeDesc] = field(default_factory=set)
    redundancy_list: Set[NodeDesc] = field(default_factory=set)
    last_heartbeats: Dict[NodeDesc, datetime] = field(default_factory=dict)
    naive_datetimes: bool = field(default=False, compare=False)

    def copy(self) -> "RendezvousState":
        """A deep-enough copy: containers are new, nodes and datetimes are immutable."""
        return dataclasses.replace(
            self,
            participants=dict(self.participants),
            wait_list=set(self.wait_list),
            redundancy_list=set(self.redundancy_list),
            last_heartbeats=dict(self.last_heartbeats),
        )

    @property
    def nodes(self) -> Set[NodeDesc]:
        """Every node the state mentions anywhere."""
        return (
            set(self.participants)
            | self.wait_list
            | self.redundancy_list
            | set(self.last_heartbeats)
        )
