"""Fenced writes: every write rdzvctl makes goes through here.

``write_fenced`` writes only over the token it was given (``None``: only if no
state exists) and raises :class:`TokenConflictError` — with what is stored now
— when another writer got there first.  Nothing is ever written blind.
"""

from __future__ import annotations

from typing import Optional

from rdzvctl.backends.base import RendezvousBackend, SetResult, StateAndToken, Token
from rdzvctl.errors import StateError, TokenConflictError

__all__ = ["write_fenced", "current_or_none"]


def current_or_none(backend: RendezvousBackend) -> Optional[StateAndToken]:
    """The stored state, tolerating a corrupt one (for conflict reports)."""
    try:
        return backend.get_state()
    except StateError:
        return None


def write_fenced(backend: RendezvousBackend, token: Optional[Token], new: Optional[bytes]) -> Optional[SetResult]:
    """Write ``new`` (or remove the state if None) only over ``token``.

    Returns the backend's ``(bytes, token, True)`` on success (None after a
    removal); raises TokenConflictError, having written nothing, otherwise.
    """
    if new is None:
        if token is None:
            return None  # nothing stored, nothing to remove
        if not backend.clear(token):
            raise TokenConflictError(
                f"run {backend.run_id!r} changed since it was read (token {backend.format_token(token)}); "
                "nothing was removed", current_or_none(backend))
        return None
    result = backend.set_state(new, token)
    if result is None or not result[2]:
        current = None if result is None else (result[0], result[1])
        what = "a state appeared" if token is None else f"the token {backend.format_token(token)} is no longer current"
        raise TokenConflictError(f"run {backend.run_id!r} changed since it was read ({what}); nothing was written",
                                 current)
    return result
