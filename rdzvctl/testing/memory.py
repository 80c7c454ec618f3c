"""An in-memory reference backend: the contract in its plainest form.

Used by the tests of pure logic and as the conformance kit's known-good
reference.  Runs live in a process-wide table keyed by (endpoint, run id), so
several instances with the same address share a state, like real clients.
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import threading
from typing import Deque, Dict, FrozenSet, Iterator, Optional, Set, Tuple

from rdzvctl.backends.base import (
    HistoryVersion,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
)
from rdzvctl.errors import StateCorruptError

__all__ = ["MemoryBackend", "forget_endpoint"]

_LOCK = threading.Lock()
_TABLE: Dict[Tuple[str, str], Tuple[bytes, int]] = {}
_CORRUPT: Set[Tuple[str, str]] = set()
#: Per-round store keys, as torch's handler store would hold them: (endpoint, run id) -> {(round, name): value}.
_STORE: Dict[Tuple[str, str], Dict[Tuple[int, str], bytes]] = {}
_VERSIONS = itertools.count(1)
#: Every write and clear of a run, the last :data:`HISTORY_LENGTH` of them: (endpoint, run id) -> versions.
_HISTORY: Dict[Tuple[str, str], Deque[HistoryVersion]] = {}
HISTORY_LENGTH = 1000


def _record(key: Tuple[str, str], value: Optional[bytes], revision: int) -> None:
    """Append a version to the run's history (the caller holds ``_LOCK``)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    _HISTORY.setdefault(key, collections.deque(maxlen=HISTORY_LENGTH)).append(HistoryVersion(value, now, revision))


class MemoryBackend(RendezvousBackend):
    """Strictly fenced: the token is a process-wide counter bumped on every write."""

    name = "memory"
    summary = "in-process reference backend (tests only)"
    capabilities = frozenset({"clear", "list_runs", "store_keys", "history"})
    strict_fencing = True

    @property
    def _key(self) -> Tuple[str, str]:
        return (self.address.endpoint, self.run_id)

    def get_state(self) -> Optional[StateAndToken]:
        with _LOCK:
            if self._key in _CORRUPT:
                raise StateCorruptError(f"the state of run {self.run_id!r} is corrupt")
            return _TABLE.get(self._key)

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        with _LOCK:
            current = _TABLE.get(self._key)
            current_token = None if current is None else current[1]
            # bool is an int subclass: True must not pass for token 1.
            valid = token is None or (type(token) is int and token == current_token)
            if valid and (token is not None or current is None):
                _TABLE[self._key] = (bytes(state), next(_VERSIONS))
                _CORRUPT.discard(self._key)
                _record(self._key, *_TABLE[self._key])
                return (*_TABLE[self._key], True)
            if current is None:
                return None
            return (*current, False)

    def clear(self, token: Token) -> bool:
        with _LOCK:
            current = _TABLE.get(self._key)
            if current is None or type(token) is not int or token != current[1]:
                return False
            del _TABLE[self._key]
            _CORRUPT.discard(self._key)
            _record(self._key, None, next(_VERSIONS))
            return True

    def history(self) -> HistoryWindow:
        """Every write and clear of the run in this process, the last :data:`HISTORY_LENGTH`."""
        with _LOCK:
            versions = list(_HISTORY.get(self._key, ()))
        held = versions[0].revision if len(versions) == HISTORY_LENGTH else None
        notice = None if held is None else f"the memory backend keeps the last {HISTORY_LENGTH} versions"
        return HistoryWindow(iter(versions), notice)

    def list_runs(self) -> Iterator[RunEntry]:
        with _LOCK:
            rows = sorted((run, value) for (endpoint, run), value in _TABLE.items()
                          if endpoint == self.address.endpoint)
        for run, value in rows:
            yield RunEntry(run, value)

    def peek(self) -> Optional[Tuple[bytes, int]]:
        """The stored value and token as they are, corrupt or not (no contract call)."""
        with _LOCK:
            return _TABLE.get(self._key)

    def drop(self) -> None:
        """Remove the run's value unfenced, as another process deleting the key would."""
        with _LOCK:
            _TABLE.pop(self._key, None)
            _CORRUPT.discard(self._key)

    def corrupt(self) -> None:
        """Make the next ``get_state`` fail as a corrupt stored value would."""
        with _LOCK:
            _TABLE[self._key] = (b"\x00corrupt", next(_VERSIONS))
            _CORRUPT.add(self._key)

    def store_keys(self) -> Dict[str, bytes]:
        with _LOCK:
            keys = dict(_STORE.get(self._key, {}))
        return {f"{r}/{n}": v for (r, n), v in sorted(keys.items())}

    def store_rounds(self) -> FrozenSet[int]:
        with _LOCK:
            return frozenset(r for r, _ in _STORE.get(self._key, {}))

    def put_store_key(self, round_: int, name: str, value: bytes) -> None:
        """Store a per-round key as torch's handler would (``torch.rendezvous.<run_id>.<round>/<name>``)."""
        with _LOCK:
            _STORE.setdefault(self._key, {})[(round_, name)] = bytes(value)


def forget_endpoint(endpoint: str) -> None:
    """Remove every run and store key of ``endpoint`` (a test's clean-up)."""
    with _LOCK:
        for table in (_TABLE, _STORE, _HISTORY):
            for key in [k for k in table if k[0] == endpoint]:
                del table[key]
        _CORRUPT.difference_update({k for k in _CORRUPT if k[0] == endpoint})
