"""What every conformance case runs in: a scratch run id, the backends opened on it, checks and outcomes.

Shared by the cases of :mod:`rdzvctl.testing.conformance` and
:mod:`rdzvctl.testing.watch_cases`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

from rdzvctl.backends.base import RendezvousBackend, SetResult, StateAndToken

__all__ = [
    "BackendFactory", "Corrupter", "StoreWriter", "ConformanceFailure", "ConformanceLimitation",
    "Limitation", "Skip", "CaseResult", "CaseContext", "discard_scratch_run",
]

BackendFactory = Callable[[str], RendezvousBackend]
Corrupter = Callable[[RendezvousBackend], None]
#: Writes a per-round store key of the backend's run the way torch's handler does:
#: ``PrefixStore("torch.rendezvous.<run_id>.<round>", <the handler's store>).set(name, value)``.
StoreWriter = Callable[[RendezvousBackend, int, str, bytes], None]


class ConformanceFailure(AssertionError):
    """A backend broke the contract."""


class ConformanceLimitation(UserWarning):
    """A backend has a limitation it declared (e.g. non-strict fencing)."""


class Limitation(Exception):
    """A case hit a limitation the backend declared (outcome ``limitation``)."""


class Skip(Exception):
    """A case does not apply to the backend (outcome ``skip``, with the reason)."""


@dataclass
class CaseResult:
    """The outcome of one case: ``pass``, ``fail``, ``limitation`` or ``skip``."""

    name: str
    description: str
    outcome: str
    detail: str = ""


class CaseContext:
    """What a case gets: a fresh run id, backends on it, and assertions."""

    def __init__(self, factory: BackendFactory, corrupter: Optional[Corrupter], racers: int,
                 store_writer: Optional[StoreWriter] = None):
        self.factory = factory
        self.corrupter = corrupter
        self.store_writer = store_writer
        self.racers = racers
        self.run_id = f"rdzvctl-conformance-{uuid.uuid4().hex[:12]}"
        self.opened: List[RendezvousBackend] = []
        self.backend = self.open()

    def open(self, run_id: Optional[str] = None) -> RendezvousBackend:
        backend = self.factory(run_id or self.run_id)
        self.opened.append(backend)
        return backend

    def set(self, state: bytes, token: object = None, backend: Optional[RendezvousBackend] = None) -> SetResult:
        result = (backend or self.backend).set_state(state, token)
        if result is None:
            raise ConformanceFailure(f"set_state({state[:16]!r}..., {token!r}) returned None")
        return result

    def get(self, after: str) -> StateAndToken:
        """The run's state and token, which must exist (``after`` says why, for the failure)."""
        result = self.backend.get_state()
        if result is None:
            raise ConformanceFailure(f"get_state() returned None after {after}")
        return result

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConformanceFailure(message)

    def failure(self, message: str) -> ConformanceFailure:
        """The failure to raise (for a ``raise ... from`` the check cannot express)."""
        return ConformanceFailure(message)

    def close(self) -> None:
        """Remove everything the case's scratch runs left on the backend, then close."""
        for backend in self.opened:
            try:
                if "clear" in backend.capabilities:
                    current = backend.get_state()
                    if current is not None:
                        backend.clear(current[1])
                discard_scratch_run(backend)
            except Exception:  # cleanup is best effort; the case result stands
                pass
            try:
                backend.close()
            except Exception:
                pass


def discard_scratch_run(backend: RendezvousBackend) -> None:
    """Remove what a cleared scratch run still leaves on the backend (:meth:`RendezvousBackend.discard_cleared_run`).

    A fenced ``clear`` keeps what protects a *reused* run id: c10d puts torch's
    "no state" sentinel back (torch's own backend would recreate it anyway), Redis
    keeps the run's version counter so a new state never reuses a token (and its history list), etcd v2
    keeps the directories it created under the key prefix, and etcd v3 leaves the
    state's lease to expire (TTL).  Scratch run ids are never reused, so the kit
    asks the backend to remove these too; a backend without the hook is left as
    ``clear`` left it.
    """
    backend.discard_cleared_run()
