"""The one error hierarchy of rdzvctl.

Every error carries the CLI exit code it maps to, so the command line needs a
single ``except RdzvctlError`` and the library never has to know about click::

    RdzvctlError                    (1)
    ├── ConditionNotMetError        (1)  watch --until: the condition did not hold in time
    ├── UsageError                  (2)  bad flags, bad addresses, bad files
    │   ├── StateValidationError         a JSON state with a wrong field (names it)
    │   ├── BackendNotFoundError         unknown --rdzv-backend (lists the known ones)
    │   ├── BackendConfigError           bad endpoint / --rdzv-conf / TLS material
    │   ├── MissingDependencyError       the backend's client library is not installed
    │   ├── UnsupportedOperationError    the backend lacks a capability (list, clear, ...)
    │   └── BackupError                  the backup directory is unsafe or the backup cannot be written
    ├── TokenConflictError          (3)  a fenced write lost: nothing was written
    ├── BackendUnavailableError     (4)  refused, unreachable, wrong protocol, auth failed
    │   └── BackendTimeoutError          no answer within the timeout
    ├── NoStateError                (5)  no rendezvous state for that run id
    └── StateError                  (6)  the stored state cannot be used
        ├── StateCorruptError            malformed base64 / pickle / types
        └── StateUnsafeError             the pickle names a global outside the allow-list

An interrupted command (Ctrl-C) exits ``EXIT_INTERRUPTED`` (130, the shell's
128 + SIGINT), with a line saying what was written.

Messages are one sentence and never contain secrets (passwords, tokens of auth).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "EXIT_CONFLICT",
    "EXIT_UNAVAILABLE",
    "EXIT_NO_STATE",
    "EXIT_CORRUPT",
    "EXIT_INTERRUPTED",
    "RdzvctlError",
    "ConditionNotMetError",
    "UsageError",
    "StateValidationError",
    "BackendNotFoundError",
    "BackendConfigError",
    "MissingDependencyError",
    "UnsupportedOperationError",
    "BackupError",
    "TokenConflictError",
    "BackendUnavailableError",
    "BackendTimeoutError",
    "NoStateError",
    "StateError",
    "StateCorruptError",
    "StateUnsafeError",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_UNAVAILABLE = 4
EXIT_NO_STATE = 5
EXIT_CORRUPT = 6
EXIT_INTERRUPTED = 130


class RdzvctlError(Exception):
    """Base class of every error rdzvctl raises on purpose."""

    exit_code: ClassVar[int] = EXIT_PROBLEMS


class ConditionNotMetError(RdzvctlError):
    """``watch --until``: the condition did not hold within ``--for``."""


class UsageError(RdzvctlError):
    """The caller asked for something malformed."""

    exit_code = EXIT_USAGE


class StateValidationError(UsageError):
    """A JSON state document is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)


class BackendNotFoundError(UsageError):
    """No backend is registered under that name."""


class BackendConfigError(UsageError):
    """The endpoint, the ``--rdzv-conf`` options or the TLS material are invalid."""


class MissingDependencyError(UsageError):
    """A backend's client library is not importable; the message says what to install."""


class UnsupportedOperationError(UsageError):
    """The backend does not offer the capability a command asked for."""


class BackupError(UsageError):
    """The backup cannot be written safely (unsafe directory, disk full, read-only); the backend was not touched."""


class TokenConflictError(RdzvctlError):
    """A fenced write lost against a concurrent writer; nothing was written.

    ``current`` holds the ``(bytes, token)`` pair now stored (or ``None``) so a
    caller can show what changed meanwhile.
    """

    exit_code = EXIT_CONFLICT

    def __init__(self, message: str, current: Any = None) -> None:
        self.current = current
        super().__init__(message)


class BackendUnavailableError(RdzvctlError):
    """The backend cannot be reached or refused to talk to us."""

    exit_code = EXIT_UNAVAILABLE


class BackendTimeoutError(BackendUnavailableError):
    """The backend did not answer within the configured timeout."""


class NoStateError(RdzvctlError):
    """There is no rendezvous state for the run id."""

    exit_code = EXIT_NO_STATE

    @classmethod
    def for_run(cls, run_id: str, where: str = "", consequence: str = "") -> "NoStateError":
        """The one wording: ``no rendezvous state for run 'id'[ on <where>][: <consequence>]``."""
        message = f"no rendezvous state for run {run_id!r}"
        if where:
            message += f" on {where}"
        if consequence:
            message += f": {consequence}"
        return cls(message)


class StateError(RdzvctlError):
    """The stored state cannot be used (torch's ``RendezvousStateError``)."""

    exit_code = EXIT_CORRUPT
    kind: ClassVar[str] = "corrupt"


class StateCorruptError(StateError):
    """Malformed data: bad base64, a truncated pickle, wrong types or shapes."""


class StateUnsafeError(StateError):
    """The pickle asks for something outside the allow-list; nothing was executed."""

    kind = "unsafe"
