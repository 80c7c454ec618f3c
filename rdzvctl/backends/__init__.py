"""The backend layer: one contract, one registry, one module per backend."""

from rdzvctl.backends.base import Address, RendezvousBackend, RunEntry, parse_conf
from rdzvctl.backends.registry import get_backend_class, open_backend, registered_backends

__all__ = [
    "Address",
    "RendezvousBackend",
    "RunEntry",
    "parse_conf",
    "get_backend_class",
    "open_backend",
    "registered_backends",
]
