"""The one error mapping of the Redis backend: redis-py (and socket/TLS) exceptions -> :mod:`rdzvctl.errors`.

:func:`redis_errors` is the context manager every call to redis-py runs in;
it raises the error :func:`translate_error` picks from :func:`mapping` (a
table, first match wins: by ``isinstance`` on the exception, or by the reply
code the server put at the start of its text, e.g. ``NOAUTH``), chained to
the original.  :data:`UPSTREAM` (see :func:`upstream_errors`) is what it
catches.  redis-py is imported only when an exception is translated.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, NamedTuple, Sequence, Tuple, Type

from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    RdzvctlError,
    StateCorruptError,
)

__all__ = ["Rule", "mapping", "upstream_errors", "translate_error", "redis_errors"]


class Rule(NamedTuple):
    """One row of the mapping: the exception classes, or reply codes in the server's text, and the error."""

    classes: Tuple[Type[BaseException], ...]
    starts: Tuple[str, ...]  # the upper-cased text starts with one of these
    contains: Tuple[str, ...]  # the upper-cased text contains one of these
    make: Callable[[str, str, float], RdzvctlError]  # (where, text, timeout) -> error


@functools.lru_cache(maxsize=1)
def upstream_errors() -> Tuple[Type[BaseException], ...]:
    """Every exception a redis-py call can raise."""
    from redis import exceptions as rx

    return (rx.RedisError, rx.RedisClusterException, OSError)


@functools.lru_cache(maxsize=1)
def mapping() -> Tuple[Rule, ...]:
    """The table, built on first use (it names redis-py's classes)."""
    from redis import exceptions as rx

    return (
        # Never echo the server's text here: it is about the credentials.
        Rule((rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError),
             ("NOAUTH", "WRONGPASS", "INVALID USERNAME-PASSWORD"), (),
             lambda where, text, timeout: BackendUnavailableError(
                 f"{where} refused the credentials (authentication failed)")),
        Rule((rx.AuthorizationError, rx.NoPermissionError), ("NOPERM",), (),
             lambda where, text, timeout: BackendUnavailableError(f"{where} denied a command to this user: {text}")),
        Rule((rx.TimeoutError, TimeoutError), (), (),
             lambda where, text, timeout: BackendTimeoutError(f"{where} did not answer within {timeout:g} s")),
        Rule((), (), ("WRONGTYPE",),
             lambda where, text, timeout: StateCorruptError(
                 f"{where} holds a key of another type where a rendezvous hash belongs")),
        Rule((rx.DataError,), (), (),
             lambda where, text, timeout: BackendConfigError(f"{where}: invalid request: {text}")),
        Rule((rx.ReadOnlyError,), (), (),
             lambda where, text, timeout: BackendUnavailableError(f"{where} is a read-only replica: {text}")),
        Rule((), (), ("CROSSSLOT", "SAME KEY SLOT"),
             lambda where, text, timeout: BackendConfigError(
                 f"{where}: the keys of one run fall in different cluster slots: {text}")),
        Rule((rx.ResponseError,), (), (),
             lambda where, text, timeout: BackendUnavailableError(f"{where} answered with an error: {text}")),
        Rule((rx.RedisError, rx.RedisClusterException, OSError), (), (),
             lambda where, text, timeout: BackendUnavailableError(f"cannot reach {where}: {text}")),
    )


def matching_rule(exc: BaseException, text: str) -> "Rule | None":
    """The first rule of :func:`mapping` for ``exc`` (whose scrubbed text is ``text``), else None."""
    upper = text.upper()
    for rule in mapping():
        if (isinstance(exc, rule.classes) or (rule.starts and upper.startswith(rule.starts))
                or any(marker in upper for marker in rule.contains)):
            return rule
    return None


def translate_error(exc: BaseException, endpoint: str, timeout: float, secrets: Sequence[str] = ()) -> RdzvctlError:
    """The rdzvctl error for a redis-py (or socket/TLS) exception: the one place they are mapped."""
    from rdzvctl.text import scrub

    text = scrub(str(exc), secrets).strip().rstrip(".") or type(exc).__name__
    where = f"Redis at {endpoint}"
    rule = matching_rule(exc, text)
    if rule is None:
        return BackendUnavailableError(f"unexpected error talking to {where}: {type(exc).__name__}: {text}")
    return rule.make(where, text, timeout)


@contextlib.contextmanager
def redis_errors(endpoint: str, timeout: float, secrets: Sequence[str] = ()) -> Iterator[None]:
    """Run redis-py calls; their exceptions leave as :mod:`rdzvctl.errors` errors, chained to the original."""
    try:
        yield
    except RdzvctlError:
        raise
    except Exception as exc:
        if not isinstance(exc, upstream_errors()):
            raise
        raise translate_error(exc, endpoint, timeout, secrets) from exc
