"""torchrun's ``--rdzv-backend=redis`` and ``--rdzv-backend=etcd-v3``.

rdzvctl declares these functions in torch's ``torchrun.handlers`` entry-point
group; torch calls each with no arguments when
``torch.distributed.elastic.rendezvous`` is imported and registers the
returned creator under the entry-point name, which equals the handler's
``get_backend()`` (the backend's ``name``).  A creator builds rdzvctl's backend
and a torch ``Store`` on the same server from torchrun's
``RendezvousParameters`` and hands both to torch's
``dynamic_rendezvous.create_handler``::

    torchrun --nnodes=2 --rdzv-backend=redis --rdzv-endpoint=redis-host:6379 \\
             --rdzv-id=job42 --rdzv-conf=ttl=3600,read_timeout=60 train.py

Options (``--rdzv-conf``): every option of the backend (see its module),
``read_timeout`` (seconds a store read blocks, and each network operation's
bound; default 60, as torch's c10d and etcd-v2 backends), plus torch's own
handler options (``join_timeout``, ``last_call_timeout``, ``close_timeout``,
``heartbeat_timeout``, ``keep_alive_interval``, ``keep_alive_max_attempt``).

Importing this module is cheap: torch, redis-py and the etcd client are
imported only when a handler is created.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Tuple

from rdzvctl.backends.base import Address

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

    from rdzvctl.torchrun.backend import TorchRendezvousBackend
    from rdzvctl.torchrun.stores import EtcdV3Store, RedisStore

__all__ = [
    "DEFAULT_READ_TIMEOUT",
    "redis_handler",
    "etcd_v3_handler",
    "create_redis_handler",
    "create_etcd_v3_handler",
    "create_redis_backend",
    "create_etcd_v3_backend",
    "address_from_params",
]

HandlerCreator = Callable[["RendezvousParameters"], "RendezvousHandler"]

DEFAULT_READ_TIMEOUT = 60


def redis_handler() -> HandlerCreator:
    """Entry point ``redis``: the creator torchrun registers for ``--rdzv-backend=redis``."""
    return create_redis_handler


def etcd_v3_handler() -> HandlerCreator:
    """Entry point ``etcd-v3``: the creator torchrun registers for ``--rdzv-backend=etcd-v3``."""
    return create_etcd_v3_handler


def create_redis_handler(params: "RendezvousParameters") -> "RendezvousHandler":
    """A ``DynamicRendezvousHandler`` whose state and store live on Redis."""
    return _create_handler(params, create_redis_backend)


def create_etcd_v3_handler(params: "RendezvousParameters") -> "RendezvousHandler":
    """A ``DynamicRendezvousHandler`` whose state and store live on etcd (v3 API)."""
    return _create_handler(params, create_etcd_v3_backend)


def _create_handler(params: "RendezvousParameters", create_backend: Callable[..., Tuple[Any, Any]]) -> Any:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    backend, store = create_backend(params)
    return create_handler(store, backend, params)


def _conf_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def address_from_params(params: "RendezvousParameters", backend: str) -> Address:
    """rdzvctl's address for torchrun's parameters; ``read_timeout`` bounds network calls."""
    read_timeout = params.get_as_int("read_timeout", DEFAULT_READ_TIMEOUT)
    if read_timeout is None or read_timeout <= 0:
        raise ValueError("The read timeout must be a positive integer.")
    conf = {key: _conf_text(value) for key, value in params.config.items() if value is not None}
    return Address(backend, params.endpoint or "", params.run_id, conf, float(read_timeout))


def create_redis_backend(params: "RendezvousParameters") -> Tuple["TorchRendezvousBackend", "RedisStore"]:
    """torch's (backend, store) pair on the Redis server ``params`` names."""
    from rdzvctl.backends.redis import RedisBackend
    from rdzvctl.torchrun.stores import RedisStore

    return _create_pair(params, RedisBackend, lambda backend, **common: RedisStore(
        backend.client, translate=backend.translate_error, **common))


def create_etcd_v3_backend(params: "RendezvousParameters") -> Tuple["TorchRendezvousBackend", "EtcdV3Store"]:
    """torch's (backend, store) pair on the etcd cluster ``params`` names."""
    from rdzvctl.backends.etcd_v3 import EtcdV3Backend
    from rdzvctl.torchrun.stores import EtcdV3Store

    return _create_pair(params, EtcdV3Backend, lambda backend, **common: EtcdV3Store(backend.gateway, **common))


def _create_pair(params: "RendezvousParameters", backend_class: Any, make_store: Callable[..., Any]) -> Any:
    """rdzvctl's backend for ``params`` wrapped as torch's, and the run's store on the same server:
    ``make_store(backend, run_id=, ttl=, timeout=, endpoint=, prefix=)`` (torch errors for both)."""
    from rdzvctl.torchrun.backend import TorchRendezvousBackend, torch_errors

    address = address_from_params(params, backend_class.name)
    with torch_errors():
        backend = backend_class.from_address(address)
        store = make_store(backend, run_id=params.run_id, ttl=backend.ttl, timeout=timedelta(seconds=address.timeout),
                           endpoint=backend.describe(), prefix=backend.store_prefix)
    return TorchRendezvousBackend(backend), store
