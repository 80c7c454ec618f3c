"""The rendezvous state, mirroring torch's ``_RendezvousState`` and ``_NodeDesc``.

Field names, defaults and node ordering are torch's own
(``torch/distributed/elastic/rendezvous/dynamic_rendezvous.py``), so the
vocabulary is the one torch users already know.  Nothing here does I/O.
"""

from __future__ import annotations

import gc
import re
from datetime import datetime
from functools import cached_property, total_ordering
from operator import attrgetter, itemgetter
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, TypeVar

from rdzvctl.text import excerpt

__all__ = ["NodeDesc", "RendezvousState", "STATE_FIELDS", "node_order", "by_rank", "in_node_order", "collector_paused"]

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


@total_ordering
class NodeDesc:
    """A node of the rendezvous: torch's ``_NodeDesc``.  Immutable.

    Ordering is (addr, pid, local_id), which is how torch assigns ranks when a
    round completes.  ``str(node)`` is torch's ``repr``: ``addr_pid_localid``.

    Written out rather than a ``dataclass(frozen=True, order=True)``: every command
    imports this module at start-up, and a dataclass compiles its generated methods
    there (a fifth of what rdzvctl adds to a ``get``'s start-up with the other
    dataclasses of that path).  The methods are the dataclass's: equality and order
    on (addr, pid, local_id) between nodes only, and no attribute can be set.
    """

    addr: str
    pid: int
    local_id: int

    def __init__(self, addr: str, pid: int, local_id: int) -> None:
        # One dict update (assignment is refused, and three object.__setattr__ calls cost more), with
        # the id computed up front: every node is a dict key or a set item at least once (decoding
        # builds 65,536 of them for a 65,536-node state).  The id string keeps its own hash.
        self.__dict__.update(addr=addr, pid=pid, local_id=local_id, id=f"{addr}_{pid}_{local_id}")

    def _key(self) -> Any:
        return (self.addr, self.pid, self.local_id)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._key() == other._key())

    def __lt__(self, other: "NodeDesc") -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._key() < other._key())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a NodeDesc is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a NodeDesc is immutable")

    def __repr__(self) -> str:
        return f"NodeDesc(addr={self.addr!r}, pid={self.pid!r}, local_id={self.local_id!r})"

    def __reduce__(self) -> Any:
        # Copies and pickles go through __init__ (the id's hash is this process's: SipHash key).
        return (type(self), (self.addr, self.pid, self.local_id))

    def __str__(self) -> str:
        return self.id

    def __hash__(self) -> int:
        # Not the dataclass's hash((addr, pid, local_id)): its int lanes let a state hold
        # thousands of same-addr nodes with one hash whatever the str hash key is (a set of
        # them costs O(n^2)); the id string hashes with the per-process SipHash key, and
        # equal nodes have equal ids.  A str computes its hash once and keeps it.
        return hash(self.id)

    @cached_property
    def id(self) -> str:
        """The node id as torch prints it (``addr_pid_localid``); set by ``__init__``."""
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


class collector_paused:
    """No cyclic garbage collection inside (reference counting goes on): for building a state,
    or its descriptions, from tens of thousands of nodes.

    Each collection walks every container built so far, again and again: half the time
    of describing a 65,536-node state, a third of decoding one.  What is built there
    holds no reference cycles; collection resumes (if it was on) when the block ends.
    A class rather than a ``contextlib`` generator: it is entered once per decode, and a
    fleet is decoded 100,000 times (about 1 us each saved).
    """

    __slots__ = ("_collecting",)

    def __enter__(self) -> None:
        self._collecting = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._collecting:
            gc.enable()


#: ``sorted(nodes, key=node_order)`` is ``sorted(nodes)`` (torch's rank order), compared in C:
#: ``NodeDesc.__lt__`` builds two tuples per comparison (a third of sorting 65,536 nodes).
node_order: Callable[[NodeDesc], Any] = attrgetter("addr", "pid", "local_id")

V = TypeVar("V")


def by_rank(participants: Mapping[NodeDesc, int]) -> List[Tuple[NodeDesc, int]]:
    """The participants' items by rank, equal ranks by node: ``sorted(items, key=(rank, node))``,
    compared in C (a key function in Python costs more than the sort of 65,536 of them)."""
    items = sorted(participants.items(), key=itemgetter(1))  # stable, so only equal ranks need more
    if len(set(participants.values())) != len(items):  # equal ranks (never in torch's own states)
        items.sort(key=lambda item: (item[1], node_order(item[0])))
    return items


def in_node_order(mapping: Mapping[NodeDesc, V]) -> List[Tuple[NodeDesc, V]]:
    """``mapping``'s items sorted by node (``sorted(items)`` by key), compared in C: distinct nodes
    have distinct ``node_order`` keys, so the values are never compared."""
    return list(map(itemgetter(1), sorted(zip(map(node_order, mapping), mapping.items()))))


class RendezvousState:
    """torch's ``_RendezvousState``; datetimes are always timezone-aware UTC here.

    ``naive_datetimes`` records that the state was read from a torch older than
    ~2.6, which wrote naive UTC datetimes: :func:`rdzvctl.state.codec.encode`
    writes such a state back naive, because torch cannot compare the two kinds.

    Written out rather than a ``dataclass``, for the start-up reason given on
    :class:`NodeDesc`; the methods are the dataclass's (equality on torch's fields,
    ``naive_datetimes`` left out; unhashable; the same ``repr``).
    """

    round: int
    complete: bool
    deadline: Optional[datetime]
    closed: bool
    participants: Dict[NodeDesc, int]
    wait_list: Set[NodeDesc]
    redundancy_list: Set[NodeDesc]
    last_heartbeats: Dict[NodeDesc, datetime]
    naive_datetimes: bool

    def __init__(
        self,
        round: int = 0,
        complete: bool = False,
        deadline: Optional[datetime] = None,
        closed: bool = False,
        participants: Optional[Dict[NodeDesc, int]] = None,
        wait_list: Optional[Set[NodeDesc]] = None,
        redundancy_list: Optional[Set[NodeDesc]] = None,
        last_heartbeats: Optional[Dict[NodeDesc, datetime]] = None,
        naive_datetimes: bool = False,
    ) -> None:
        self.round = round
        self.complete = complete
        self.deadline = deadline
        self.closed = closed
        self.participants = {} if participants is None else participants
        self.wait_list = set() if wait_list is None else wait_list
        self.redundancy_list = set() if redundancy_list is None else redundancy_list
        self.last_heartbeats = {} if last_heartbeats is None else last_heartbeats
        self.naive_datetimes = naive_datetimes

    def _fields(self) -> Any:
        return (self.round, self.complete, self.deadline, self.closed, self.participants, self.wait_list,
                self.redundancy_list, self.last_heartbeats)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._fields() == other._fields())

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in (*STATE_FIELDS, "naive_datetimes"))
        return f"RendezvousState({shown})"

    def copy(self) -> "RendezvousState":
        """A deep-enough copy: containers are new, nodes and datetimes are immutable."""
        return RendezvousState(
            self.round,
            self.complete,
            self.deadline,
            self.closed,
            dict(self.participants),
            set(self.wait_list),
            set(self.redundancy_list),
            dict(self.last_heartbeats),
            self.naive_datetimes,
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
