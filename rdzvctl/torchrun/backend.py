"""torch's ``RendezvousBackend`` over an rdzvctl backend, speaking torch's errors.

torch's ``DynamicRendezvousHandler`` expects ``name``/``get_state``/``set_state``
and the rendezvous errors of ``torch.distributed.elastic.rendezvous.api``;
rdzvctl's backends have the same fencing contract and their own errors, so the
wrapper only renames failures.  This module imports torch's elastic package:
import it only while building a handler (never while torchrun registers
plugins, which would be a circular import).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

from rdzvctl.backends.base import RendezvousBackend as RdzvctlBackend
from rdzvctl.backends.base import SetResult, StateAndToken, Token
from rdzvctl.errors import BackendUnavailableError, RdzvctlError, StateError, UsageError

__all__ = ["TorchRendezvousBackend", "torch_errors"]


@contextlib.contextmanager
def torch_errors() -> Iterator[None]:
    """Raise rdzvctl's errors as torch's: unreachable → ``RendezvousConnectionError``,
    unusable state → ``RendezvousStateError``, bad options → ``ValueError``."""
    try:
        yield
    except BackendUnavailableError as exc:
        raise RendezvousConnectionError(str(exc)) from exc
    except StateError as exc:
        raise RendezvousStateError(str(exc)) from exc
    except UsageError as exc:
        raise ValueError(str(exc)) from exc
    except RdzvctlError as exc:
        raise RendezvousError(str(exc)) from exc


class TorchRendezvousBackend(RendezvousBackend):
    """An rdzvctl backend seen through torch's ``RendezvousBackend`` ABC."""

    def __init__(self, backend: RdzvctlBackend) -> None:
        self.backend = backend

    @property
    def name(self) -> str:
        """The backend's registry name, which torch reports as ``get_backend()``."""
        return self.backend.name

    def get_state(self) -> Optional[StateAndToken]:
        with torch_errors():
            return self.backend.get_state()

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        with torch_errors():
            return self.backend.set_state(state, token)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend!r}>"
