"""What rdzvctl's torch stores share: the blocking reads, error translation, key prefixes.

See :mod:`rdzvctl.torchrun.stores` for the semantics (TCPStore's).
"""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

from torch.distributed import DistNetworkError, DistStoreError, Store

from rdzvctl.errors import RdzvctlError

DEFAULT_TTL = 7200
DEFAULT_READ_TIMEOUT = timedelta(seconds=60)

#: How long a Redis waiter sleeps between polls: it starts short and backs off.
POLL_FIRST = 0.002
POLL_MAX = 0.05

Data = Union[str, bytes]
#: Turns a client library's exception into an rdzvctl error (whose text is safe to show).
Translator = Callable[[BaseException], Exception]


def redis_store_prefix(run_id: str) -> str:
    """Where the store keys of ``run_id`` live on Redis (next to ``torch.rendezvous.<run_id>``)."""
    return f"torch.rendezvous.{run_id}.store/"


def etcd_store_prefix(run_id: str) -> str:
    """Where the store keys of ``run_id`` live on etcd (torch's v2 store directory, per run)."""
    return f"/torch/elastic/store/{run_id}/"


def to_bytes(value: Data) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ValueError("a store value must be str or bytes")


def timeout_seconds(timeout: Optional[timedelta], default: timedelta) -> float:
    chosen = default if timeout is None else timeout
    return max(0.0, chosen.total_seconds())


class ServerStore(Store):
    """What both stores share: key prefixing, timeouts and the blocking-read loop."""

    # torch's Store has this property (set by set_timeout) but its type stub omits it;
    # an annotation only, so the property itself is untouched.
    timeout: timedelta

    def __init__(
        self,
        prefix: str,
        timeout: Optional[timedelta],
        endpoint: str,
        translate: Optional[Translator] = None,
    ) -> None:
        super().__init__()  # required by torch's pybind trampoline
        self.prefix = prefix
        self.endpoint = endpoint
        self.translate = translate
        self.set_timeout(DEFAULT_READ_TIMEOUT if timeout is None else timeout)

    # -- what a server has to provide ------------------------------------------------
    def _read(self, keys: Sequence[bytes]) -> "tuple[List[Optional[bytes]], Any]":
        """The values of ``keys`` (``None`` when absent) and a marker for :meth:`_block`."""
        raise NotImplementedError

    def _block(self, key: bytes, marker: Any, deadline: float, attempt: int) -> None:
        """Return when ``key`` may have appeared since ``marker``, or at ``deadline``."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------
    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn the client's failures into torch's store errors (RuntimeErrors)."""
        try:
            yield
        except (DistStoreError, DistNetworkError, ValueError):
            raise
        except RdzvctlError as exc:
            raise DistNetworkError(str(exc)) from exc
        except Exception as exc:
            if self.translate is not None:
                raise DistNetworkError(str(self.translate(exc))) from exc
            raise DistNetworkError(f"the store at {self.endpoint} failed: {type(exc).__name__}") from exc

    def _wait_for(self, keys: Sequence[str], timeout: Optional[timedelta]) -> List[bytes]:
        wire = [self._key(k) for k in keys]
        seconds = timeout_seconds(timeout, self.timeout)
        deadline = time.monotonic() + seconds
        attempt = 0
        with self._errors():
            while True:
                values, marker = self._read(wire)
                missing = [k for k, v in zip(wire, values) if v is None]
                if not missing:
                    return [v for v in values if v is not None]
                if time.monotonic() >= deadline:
                    names = ", ".join(k for k, v in zip(keys, values) if v is None)
                    raise DistStoreError(f"wait timeout after {int(seconds * 1000)}ms, keys: {names}")
                self._block(missing[0], marker, deadline, attempt)
                attempt += 1

    # -- torch's Store API ------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """The value of ``key``, waiting up to the store timeout for it to be set."""
        return self._wait_for([key], None)[0]

    def multi_get(self, keys: List[str]) -> List[bytes]:
        """The values of ``keys``, waiting for all of them as ``get`` does."""
        return self._wait_for(keys, None) if keys else []

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        """Block until all ``keys`` exist (store timeout unless ``timeout`` is given)."""
        self._wait_for(keys, timeout)

    def check(self, keys: List[str]) -> bool:
        """True if every key exists now (never waits)."""
        with self._errors():
            values, _ = self._read([self._key(k) for k in keys])
        return all(v is not None for v in values)

    # torch's trampoline calls these two by their C++ names.
    def deleteKey(self, key: str) -> bool:  # noqa: N802
        return self.delete_key(key)

    def getNumKeys(self) -> int:  # noqa: N802
        return self.num_keys()
