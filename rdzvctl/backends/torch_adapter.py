"""Inspect a rendezvous through any torch ``RendezvousBackend`` (``--rdzv-backend module:factory``).

The factory is called like torch's own backend creators: with a torch
``RendezvousParameters`` built from the address (``--rdzv-conf`` entries become
its config), and may return a backend or a ``(backend, store)`` pair, as
``c10d_rendezvous_backend.create_backend`` does.  So a company's in-house torch
backend can be read and repaired with no code in rdzvctl.  torch is imported
only here, when such a backend is asked for.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

from rdzvctl.backends.base import Address, RendezvousBackend, SetResult, StateAndToken, Token
from rdzvctl.errors import (
    BackendConfigError,
    BackendUnavailableError,
    MissingDependencyError,
    RdzvctlError,
    StateCorruptError,
)

__all__ = ["TorchBackendAdapter"]


class TorchBackendAdapter(RendezvousBackend):
    """Adapts an object with torch's ``get_state``/``set_state``/``name``."""

    name = "module:factory"
    summary = "any torch RendezvousBackend, built by a module:factory you name"
    requires = ("torch",)
    install_hint = "torch"
    # The wrapped backend's fencing is unknown; be conservative.
    strict_fencing = False

    def __init__(self, address: Address, backend: Any = None) -> None:
        super().__init__(address)
        self._backend = backend if backend is not None else self._build(address)
        self.name = f"{address.backend}"  # type: ignore[misc]

    @staticmethod
    def _build(address: Address) -> Any:
        from rdzvctl.backends.loading import load_target

        factory = load_target(address.backend)
        if not callable(factory):
            raise BackendConfigError(f"{address.backend} is not callable")
        try:
            from torch.distributed.elastic.rendezvous import RendezvousParameters
        except ImportError as exc:
            raise MissingDependencyError(f"a module:factory backend needs torch: {exc}") from exc
        conf = dict(address.conf)
        # torch's c10d and etcd creators bound their store operations by read_timeout
        # (60 s by default): make it rdzvctl's timeout unless the user chose one.
        conf.setdefault("read_timeout", str(max(1, math.ceil(address.timeout))))
        params = RendezvousParameters(
            backend=address.backend.rsplit(":", 1)[-1],
            endpoint=address.endpoint,
            run_id=address.run_id,
            min_nodes=1,
            max_nodes=1,
            **conf,
        )
        with _mapped_errors(address):
            built = factory(params)
        backend = built[0] if isinstance(built, tuple) else built
        for attr in ("get_state", "set_state"):
            if not callable(getattr(backend, attr, None)):
                raise BackendConfigError(f"{address.backend} did not return a RendezvousBackend (no {attr})")
        return backend

    @property
    def wrapped(self) -> Any:
        return self._backend

    def get_state(self) -> Optional[StateAndToken]:
        with _mapped_errors(self.address):
            return self._backend.get_state()

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        with _mapped_errors(self.address):
            return self._backend.set_state(state, token)


@contextlib.contextmanager
def _mapped_errors(address: Address) -> Iterator[None]:
    """torch's rendezvous errors become ours; anything else from the backend is 'unavailable'."""
    try:
        yield
    except RdzvctlError:  # already ours (config errors, or a wrapped rdzvctl backend)
        raise
    except Exception as exc:
        kind = type(exc).__name__
        if kind == "RendezvousStateError":
            raise StateCorruptError(f"{address.backend}: {exc}") from exc
        if kind in ("RendezvousTimeoutError", "TimeoutError"):
            from rdzvctl.errors import BackendTimeoutError

            raise BackendTimeoutError(f"{address.backend} at {address.endpoint}: timed out: {exc}") from exc
        raise BackendUnavailableError(f"{address.backend} at {address.endpoint}: {kind}: {exc}") from exc
