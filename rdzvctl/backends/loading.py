"""Resolve a ``module:attribute`` reference, the form entry points and torch factories are named in.

Used by the registry (:mod:`rdzvctl.backends.registry`, for backend classes)
and the torch adapter (:mod:`rdzvctl.backends.torch_adapter`, for torch
backend factories); it imports the module only when called.
"""

from __future__ import annotations

import importlib

from rdzvctl.errors import MissingDependencyError, UsageError

__all__ = ["load_target"]


def load_target(target: str) -> object:
    """The object ``module:attr`` (``attr`` may be dotted) names; a missing module is a MissingDependencyError."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"not a module:attribute reference: {target!r}")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingDependencyError(f"cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_name} has no attribute {attr!r}") from None
    return obj
