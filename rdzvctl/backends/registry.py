"""Find backends by name through the ``rdzvctl.backends`` entry-point group.

Built-in backends are registered in rdzvctl's own ``pyproject.toml`` exactly
like third-party ones, so a plugin package only has to declare::

    [project.entry-points."rdzvctl.backends"]
    my-store = "my_pkg.rdzv:MyBackend"

A name of the form ``module:factory`` instead wraps a torch
``RendezvousBackend`` built by that factory (see
:mod:`rdzvctl.backends.torch_adapter`).  Loading is lazy: nothing is imported
until a backend is asked for, and a plugin that fails to load is reported, not
fatal to the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Type

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.backends.loading import load_target
from rdzvctl.errors import BackendNotFoundError, MissingDependencyError, UsageError

__all__ = [
    "GROUP",
    "BackendInfo",
    "registered_backends",
    "get_backend_class",
    "open_backend",
    "missing_modules",
    "register",
]

GROUP = "rdzvctl.backends"

# Used only when rdzvctl runs from a source tree without installed metadata.
_BUILTIN = {
    "c10d": "rdzvctl.backends.c10d:C10dBackend",
    "etcd": "rdzvctl.backends.etcd_legacy:EtcdLegacyBackend",
    "etcd-v2": "rdzvctl.backends.etcd_v2:EtcdV2Backend",
    "etcd-v3": "rdzvctl.backends.etcd_v3:EtcdV3Backend",
    "redis": "rdzvctl.backends.redis:RedisBackend",
}


class BackendInfo(NamedTuple):
    """A registered backend: its name, ``module:attr`` target and distribution."""

    name: str
    target: str
    origin: str


def _entry_points() -> List[object]:
    from importlib import metadata

    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, ()))  # type: ignore[union-attr]  # Python 3.9


def registered_backends() -> Dict[str, BackendInfo]:
    """Every registered backend by name; built-in names always mean rdzvctl's own backend."""
    found = {name: BackendInfo(name, target, "rdzvctl (source tree)") for name, target in _BUILTIN.items()}
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        if ep.name in _BUILTIN and ep.value != _BUILTIN[ep.name]:  # type: ignore[attr-defined]
            continue  # a plugin cannot take over a built-in name
        found[ep.name] = BackendInfo(ep.name, ep.value, origin)  # type: ignore[attr-defined]
    return dict(sorted(found.items()))


@contextlib.contextmanager
def register(targets: Mapping[str, str]) -> Iterator[None]:
    """Register backends by name (``name -> "module:attr"``) for the duration of a ``with`` block.

    For tests and programs embedding rdzvctl that have no installed entry
    point: the names resolve like the built-in ones, and what they meant
    before (if anything) is back when the block ends.
    """
    before = {name: _BUILTIN.get(name) for name in targets}
    _BUILTIN.update(targets)
    try:
        yield
    finally:
        for name, target in before.items():
            if target is None:
                _BUILTIN.pop(name, None)
            else:
                _BUILTIN[name] = target


def get_backend_class(name: str) -> Type[RendezvousBackend]:
    """The backend class registered as ``name``; raises with the known names if none."""
    if ":" in name:
        from rdzvctl.backends.torch_adapter import TorchBackendAdapter

        return TorchBackendAdapter
    # Built-in names resolve without importing importlib.metadata and scanning
    # every installed distribution (~18 ms of a ~60 ms `get`); they are
    # registered in the entry-point group too, and a plugin cannot take over a
    # built-in name.
    target = _BUILTIN.get(name)
    info = BackendInfo(name, target, "rdzvctl") if target else registered_backends().get(name)
    if info is None:
        known = ", ".join(registered_backends()) or "none"
        raise BackendNotFoundError(f"unknown backend {name!r}; registered backends: {known}")
    cls = load_target(info.target)
    if not (isinstance(cls, type) and issubclass(cls, RendezvousBackend)):
        raise UsageError(f"{info.target} (backend {name!r}) is not a RendezvousBackend subclass")
    return cls


def missing_modules(cls: Type[RendezvousBackend]) -> List[str]:
    """The backend's required modules that are not importable (checked without importing)."""
    missing = []
    for module in cls.requires:
        if module in sys.modules:
            continue
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except (ImportError, ValueError):
            missing.append(module)
    return missing


def open_backend(address: Address, run_id: Optional[str] = None) -> RendezvousBackend:
    """Build the backend ``address`` names, bound to ``run_id`` (default: the address's)."""
    cls = get_backend_class(address.backend)
    missing = missing_modules(cls)
    if missing:
        hint = f"; install it with: pip install {cls.install_hint}" if cls.install_hint else ""
        raise MissingDependencyError(
            f"the {address.backend} backend needs {', '.join(missing)}, which is not installed{hint}"
        )
    if run_id is not None:
        address = address.with_run_id(run_id)
    return cls.from_address(address)
