"""The backend contract: torch's ``RendezvousBackend`` fencing, plus capabilities.

A backend is bound to one run id, like torch's.  ``get_state`` and
``set_state`` have torch's exact signatures and semantics:

* ``get_state() -> (bytes, token) | None`` — ``None`` when no state exists.
* ``set_state(bytes, token=None) -> (bytes, token, has_set) | None`` — the
  write happens only if ``token`` is the current one, or, with no token, only
  if no state exists.  Otherwise nothing changes and the current state and
  token come back with ``has_set=False``.  A token of the wrong type or a
  garbage token is simply stale.

Optional capabilities (advertised in :attr:`RendezvousBackend.capabilities`):
``clear`` (fenced removal, the backend-correct way), ``list_runs`` (every run
on the backend with its raw state, batched), ``native_watch`` (``watch`` is
pushed by the server instead of polled) and ``store_keys`` (the per-round
store keys of the run, and :meth:`RendezvousBackend.store_rounds`).

Per-round store keys: torch's handler hands each round's agents a
``PrefixStore("torch.rendezvous.<run_id>.<round>", store)``
(``DynamicRendezvousHandler._get_store``/``_wrap_store``) on the store torchrun
built next to the backend; rank 0 writes ``MASTER_ADDR``/``MASTER_PORT`` there
(``RendezvousStoreInfo.build``) and the agents their rank and barrier keys.
torch never deletes them: it relies on the round only growing
(``_remove_participant_epilogue``), so a state that restarts at an old round
makes the next job read the old job's keys.  ``store_keys``/``store_rounds``
let ``reset --mode clear`` start a run past them.  Where the keys live:
c10d (TCPStore, FileStore) next to the state; etcd-v2 torch's ``EtcdStore``
under ``/torch/elastic/store`` (base64 key names, no TTL); Redis and etcd-v3
rdzvctl's torchrun handlers (``rdzvctl.torchrun.stores``).

``watch`` is the same for every backend (:mod:`rdzvctl.backends.watching`):
a backend supplies ``watch_read`` (the state now, and where to wait from) and
``watch_wait`` (the next changes, pushed or polled; the default polls).

Backends raise only :mod:`rdzvctl.errors` errors (each transport maps its
library's exceptions in one table), never print, and import their client
library lazily so ``rdzvctl --help`` stays fast.  Shared helpers:
:mod:`~rdzvctl.backends.address` (``Address``, ``--rdzv-conf`` parsing, re-exported here),
:mod:`~rdzvctl.backends.endpoints`, :mod:`~rdzvctl.backends.tls`,
:mod:`rdzvctl.state.store_keys`, the codec's ``decode_base64``/``encode_base64``.
"""

from __future__ import annotations

import datetime as _dt
import threading
from abc import ABC, abstractmethod
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    FrozenSet,
    Generator,
    Iterator,
    NamedTuple,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

from rdzvctl.backends.address import (  # re-exported: callers import Address with the contract
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    SHARED_CONF_KEYS,
    Address,
    check_conf_keys,
    parse_conf,
)
from rdzvctl.errors import StateCorruptError, UnsupportedOperationError
from rdzvctl.state.store_keys import round_of_store_key, split_round_key

__all__ = [
    "round_of_store_key",
    "Token",
    "StateAndToken",
    "SetResult",
    "RunEntry",
    "HistoryVersion",
    "HistoryWindow",
    "Address",
    "RendezvousBackend",
    "parse_conf",
    "CAPABILITIES",
    "SHARED_CONF_KEYS",
    "check_conf_keys",
    "DEFAULT_TIMEOUT",
    "MAX_TIMEOUT",
]

Token = Any
StateAndToken = Tuple[bytes, Token]
SetResult = Tuple[bytes, Token, bool]
_Backend = TypeVar("_Backend", bound="RendezvousBackend")  # from_address builds the class it is called on

CAPABILITIES = ("clear", "list_runs", "native_watch", "store_keys", "history")


class RunEntry(NamedTuple):
    """One run found by :meth:`RendezvousBackend.list_runs`: its id and raw state.

    ``error`` is set when the stored value of that run cannot even be
    unwrapped (e.g. bad base64), so one bad run never hides the others and is
    reported for what it is; ``state`` is then None, or the raw value and its
    token where the backend has a token for it (c10d), so a fenced ``clear``
    can still remove it.
    """

    run_id: str
    state: Optional[StateAndToken]
    error: Optional[Exception] = None


class HistoryVersion(NamedTuple):
    """One past version of the run's state key, as the backend kept it (see :meth:`RendezvousBackend.history`).

    ``value`` is the raw state (``None``: the key was deleted then);
    ``written_at`` when the backend says it was written (aware, UTC; ``None``
    when the backend does not record it: the reader then infers it from the
    newest heartbeat in the state); ``revision`` the backend's own counter for
    it (etcd's modification revision or index, the Redis history entry's
    sequence number, the FileStore record number), increasing.  ``error``:
    why a value the backend could not hand over is unusable (too large to
    read, not base64; ``value`` is then None and the version is a
    ``state-corrupt`` event saying so).
    """

    value: Optional[bytes]
    written_at: Optional[_dt.datetime]
    revision: Optional[int]
    error: Optional[str] = None

    @classmethod
    def unwrapped(cls, unwrap: Callable[[Any], bytes], stored: Any, written_at: Optional[_dt.datetime],
                  revision: Optional[int]) -> "HistoryVersion":
        """The version whose ``stored`` form ``unwrap(stored)`` turns into the state's bytes (base64 and the like).

        A stored value it cannot unwrap (``StateCorruptError``) keeps the
        backend's reason, what ``get`` says of that value, instead of handing
        the raw bytes to the codec, which would call them a bad pickle.
        """
        try:
            return cls(unwrap(stored), written_at, revision)
        except StateCorruptError as exc:
            return cls(None, written_at, revision, str(exc))


class HistoryWindow(NamedTuple):
    """What a backend still holds of the run's past: the versions, oldest first, and how far back they go.

    ``versions`` is a lazy iterator (a 100,000-version FileStore log is
    streamed, never held); ``notice`` is one line saying what is missing
    (``"etcd compacted revisions before 812: older versions are gone"``,
    ``"etcd v2 keeps the last 1000 events"``), or ``None`` when the window
    reaches back to the run's first write.
    """

    versions: Iterator[HistoryVersion]
    notice: Optional[str]


class RendezvousBackend(ABC):
    """Base class of every backend; see the module docstring for the contract."""

    #: The registry name (``--rdzv-backend``); also torch's ``RendezvousBackend.name``.
    name: ClassVar[str] = ""
    #: One-line description for ``rdzvctl backends``.
    summary: ClassVar[str] = ""
    #: Top-level modules the backend needs at run time (checked without importing).
    requires: ClassVar[Tuple[str, ...]] = ()
    #: What to ``pip install`` when a required module is missing.
    install_hint: ClassVar[str] = ""
    #: Optional capabilities, a subset of :data:`CAPABILITIES`.
    capabilities: ClassVar[FrozenSet[str]] = frozenset()
    #: True when every successful write yields a new token, even for equal bytes
    #: (no ABA).  torch's c10d design uses the value as the token, so it is not.
    strict_fencing: ClassVar[bool] = True
    #: The ``--rdzv-conf`` keys the backend reads, besides :data:`SHARED_CONF_KEYS`;
    #: any other key is refused.  None (a plugin that does not say) accepts every key.
    conf_keys: ClassVar[Optional[FrozenSet[str]]] = None

    def __init__(self, address: Address) -> None:
        self.address = address

    @classmethod
    def from_address(cls: Type[_Backend], address: Address) -> _Backend:
        """Build a backend for ``address``; validates the endpoint and options."""
        check_conf_keys(cls.name or address.backend, address.conf, cls.conf_keys)
        return cls(address)

    @property
    def run_id(self) -> str:
        return self.address.run_id

    # -- torch's contract -----------------------------------------------------
    @abstractmethod
    def get_state(self) -> Optional[StateAndToken]:
        """Return ``(state bytes, token)`` or ``None`` when no state exists."""

    @abstractmethod
    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        """Write ``state`` if ``token`` is current; see the module docstring."""

    # -- optional capabilities -------------------------------------------------
    def clear(self, token: Token) -> bool:
        """Remove the state if ``token`` is current; True if removed."""
        raise UnsupportedOperationError(f"the {self.name} backend cannot clear a state")

    def discard_cleared_run(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Remove what a fenced :meth:`clear` keeps to protect a *reused* run id (optional; this default
        removes nothing).  Only for a run id that is never used again: the conformance kit calls it
        on its scratch runs.  Best effort; never removes a state."""

    def list_runs(self) -> Iterator[RunEntry]:
        """Every run on the backend with its raw state, sorted by run id, read in as few requests as possible.

        Every run is yielded, an unreadable one with its ``error`` set: a
        listing never hides a run that ``get`` would show.
        """
        raise UnsupportedOperationError(f"the {self.name} backend cannot list runs")

    def store_keys(self) -> Dict[str, bytes]:
        """The run's per-round store keys as ``"<round>/<name>"`` (e.g. ``"3/MASTER_ADDR"``),
        sorted by round then name; raises ``UnsupportedOperationError`` when the keys
        cannot be listed (no ``store_keys`` capability, or a server too old)."""
        raise UnsupportedOperationError(f"the {self.name} backend has no per-round store keys")

    def history(self) -> HistoryWindow:
        """The past versions of the run's state that the backend keeps (the ``history`` capability).

        Read-only and streaming.  Backends that keep none (TCPStore) raise
        ``UnsupportedOperationError``; ``rdzvctl watch --record FILE`` then
        records a history that ``rdzvctl history --from FILE`` reads.
        """
        raise UnsupportedOperationError(
            f"the {self.name} backend keeps no history of the state; record one with "
            "'rdzvctl watch --record FILE' and read it with 'rdzvctl history --from FILE'")

    def server_info(self) -> Dict[str, Any]:
        """What the server says about itself, for ``rdzvctl doctor`` (optional).

        A JSON-able dict with ``kind`` (``tcpstore``, ``filestore``, ``etcd``,
        ``redis``, ...), ``endpoints`` (``[{"host", "port"}]`` to resolve and
        connect to) and the settings that matter for rendezvous; the server's
        answer failing becomes ``error`` (one line) instead of an exception, so
        the endpoints are always there to probe.  Read-only.
        """
        raise UnsupportedOperationError(f"the {self.name} backend cannot describe its server")

    def store_rounds(self) -> FrozenSet[int]:
        """The rounds that have at least one per-round store key (empty: none).

        Raises like :meth:`store_keys`.  This default derives the rounds from
        :meth:`store_keys`; backends override it to list key names only.
        """
        return frozenset(parsed[0] for parsed in map(split_round_key, self.store_keys()) if parsed is not None)

    def watch(
        self,
        interval: float = 1.0,
        stop: Optional[threading.Event] = None,
        since: Optional[StateAndToken] = None,
    ) -> Iterator[Optional[StateAndToken]]:
        """Yield the state (or ``None`` when absent) each time its token changes.

        The first item is the current state (unless ``since`` is it).  One
        driver (:func:`rdzvctl.backends.watching.drive_watch`) serves every
        backend: it de-duplicates by token, rides out an outage for up to
        ``address.timeout`` seconds once the first read worked, and stops
        promptly when ``stop`` is set.  Backends supply :meth:`watch_read`
        and :meth:`watch_wait`; this default polls every ``interval`` seconds.
        """
        from rdzvctl.backends.watching import drive_watch

        return drive_watch(self.watch_read, self.watch_wait, timeout=self.address.timeout,
                           interval=interval, stop=stop, since=since)

    def watch_read(self) -> Tuple[Optional[StateAndToken], Any]:
        """The state now and the cursor :meth:`watch_wait` resumes from (None: polling)."""
        return self.get_state(), None

    def watch_wait(self, cursor: Any, stop: threading.Event, interval: float) -> Generator[Any, None, None]:
        """Yield ``(state, cursor)`` for each change after ``cursor`` (or ``RESYNC``); this default polls."""
        from rdzvctl.backends.watching import poll_changes

        return poll_changes(self.get_state, stop, interval)

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections; the backend is unusable afterwards."""

    # -- presentation helpers (no printing) ------------------------------------
    def describe(self) -> str:
        """The endpoint as shown to users, without secrets."""
        from rdzvctl.text import scrub

        return scrub(self.address.endpoint)

    def format_token(self, token: Token) -> str:
        """A short, stable text form of ``token`` for ``get`` and ``set --token``.

        Tokens that are whole values (c10d) are shown as a digest: a fenced
        write re-reads the state and proceeds only if the digest still matches.
        """
        if isinstance(token, (bytes, bytearray)):
            if len(token) <= 40:
                try:
                    return bytes(token).decode("ascii")
                except UnicodeDecodeError:
                    pass
            return "sha256:" + _sha256_hex(bytes(token))[:20]
        return str(token)

    def __enter__(self) -> "RendezvousBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.describe()!r} run_id={self.run_id!r}>"


def _sha256_hex(data: bytes) -> str:
    """SHA-256 of a token; ``hashlib`` is imported on first use (it loads OpenSSL), not with every command."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def is_counter_token(token: Any) -> bool:
    """A token that is a revision/index/version counter: a positive int, and never a bool."""
    return type(token) is int and token > 0

