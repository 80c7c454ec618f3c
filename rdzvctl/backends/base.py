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
:mod:`~rdzvctl.backends.endpoints`, :mod:`~rdzvctl.backends.tls`,
:mod:`rdzvctl.state.store_keys`, the codec's ``decode_base64``/``encode_base64``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (
    Any,
    ClassVar,
    Dict,
    FrozenSet,
    Generator,
    Iterator,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

from rdzvctl.errors import BackendConfigError, UnsupportedOperationError
from rdzvctl.state.store_keys import round_of_store_key, split_round_key
from rdzvctl.text import excerpt

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
]

Token = Any
StateAndToken = Tuple[bytes, Token]
SetResult = Tuple[bytes, Token, bool]
_Backend = TypeVar("_Backend", bound="RendezvousBackend")  # from_address builds the class it is called on

CAPABILITIES = ("clear", "list_runs", "native_watch", "store_keys", "history")

DEFAULT_TIMEOUT = 10.0
#: The largest RDZVCTL_TIMEOUT (a year, as the CLI's SECONDS options); a larger one overflows.
MAX_TIMEOUT = 365 * 86_400.0


class RunEntry(NamedTuple):
    """One run found by :meth:`RendezvousBackend.list_runs`: its id and raw state.

    ``error`` is set (and ``state`` None) when the stored value of that run
    cannot even be unwrapped (e.g. bad base64), so one bad run never hides the
    others.
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
    sequence number, the FileStore record number), increasing.
    """

    value: Optional[bytes]
    written_at: Optional[_dt.datetime]
    revision: Optional[int]


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


def parse_conf(text: str) -> Dict[str, str]:
    """Parse torchrun's ``--rdzv-conf`` form ``k1=v1,k2=v2`` (empty values allowed)."""
    conf: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BackendConfigError(f"--rdzv-conf: expected key=value, got {item!r}")
        conf[key.strip()] = value.strip()
    return conf


#: ``--rdzv-conf`` keys every backend accepts: rdzvctl's liveness and size settings, and
#: what torch's dynamic rendezvous and torchrun read from rdzv_conf in torch 2.13:
#: ``dynamic_rendezvous.create_handler`` (``join``/``last_call``/``close``/``heartbeat_timeout``
#: via ``_get_timeout``, ``keep_alive_interval``, ``keep_alive_max_attempt``),
#: ``launcher.api.LaunchConfig`` (``timeout``, always set by torchrun), ``run.py`` (``rank``
#: for the static backend) and the c10d/etcd backends' ``read_timeout``.  torch's
#: ``heartbeat_timeout`` only bounds the keep-alive write (``_keep_alive``); liveness is
#: ``keep_alive_interval x keep_alive_max_attempt`` (``_sanitize``), so rdzvctl judges the same.
SHARED_CONF_KEYS: FrozenSet[str] = frozenset({
    "keep_alive_interval", "keep_alive_max_attempt", "min_nodes", "max_nodes",
    "join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
    "timeout", "rank", "read_timeout",
})


def check_conf_keys(backend: str, conf: Mapping[str, str], accepted: Optional[FrozenSet[str]]) -> None:
    """Refuse a ``--rdzv-conf`` key neither the backend nor torch/rdzvctl knows (a typo would be ignored
    silently otherwise, e.g. leaving liveness at its default); ``accepted=None`` accepts any key."""
    if accepted is None:
        return
    known = sorted(accepted | SHARED_CONF_KEYS)
    for key in sorted(conf):
        if key in accepted or key in SHARED_CONF_KEYS:
            continue
        import difflib

        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise BackendConfigError(
            f"--rdzv-conf: unknown key {key!r} for the {backend} backend{hint} (known keys: {', '.join(known)})"
        )


#: The spellings of a boolean ``--rdzv-conf`` value.
#: torch's numeric ``--rdzv-conf`` options with the largest value rdzvctl accepts (torch reads each
#: with ``RendezvousParameters.get_as_int``: ``create_handler`` and ``_get_timeout`` in
#: dynamic_rendezvous.py, ``create_backend`` in c10d_/etcd_rendezvous_backend.py, ``create_rdzv_handler``
#: in etcd_rendezvous.py).  rdzvctl also takes a fraction of a second; every value must be positive.
#: The caps only keep the arithmetic finite: a keep-alive interval up to a day, timeouts up to a
#: year, up to a million keep-alive attempts, node counts up to 2**31 - 1.
NUMERIC_OPTIONS: Mapping[str, float] = {
    "keep_alive_interval": 86_400,
    "keep_alive_max_attempt": 10**6,
    "join_timeout": 365 * 86_400,
    "last_call_timeout": 365 * 86_400,
    "close_timeout": 365 * 86_400,
    "heartbeat_timeout": 365 * 86_400,
    "read_timeout": 365 * 86_400,
    "timeout": 365 * 86_400,
    "min_nodes": 2**31 - 1,
    "max_nodes": 2**31 - 1,
}
#: Those of :data:`NUMERIC_OPTIONS` that are counts (whole numbers).
INTEGER_OPTIONS = frozenset({"keep_alive_max_attempt", "min_nodes", "max_nodes"})


def _check_range(key: str, value: float, minimum: Optional[float], maximum: Optional[float]) -> None:
    if minimum is not None and value < minimum:
        raise BackendConfigError(f"--rdzv-conf {key}: {excerpt(value)} is below {_number(minimum)}")
    if maximum is not None and value > maximum:
        raise BackendConfigError(f"--rdzv-conf {key}: {excerpt(value)} is above {_number(maximum)}")


def _number(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else f"{bound:g}"


TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class Address:
    """Where a rendezvous lives, the torchrun way.

    ``backend``/``endpoint``/``run_id``/``conf`` are torchrun's
    ``--rdzv-backend``/``--rdzv-endpoint``/``--rdzv-id``/``--rdzv-conf``;
    ``timeout`` bounds every network operation (seconds).
    """

    backend: str
    endpoint: str = ""
    run_id: str = ""
    conf: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        # The passwords of this invocation, so nothing rdzvctl prints can show them (rdzvctl.text.scrub).
        from rdzvctl.text import register_address_secrets

        register_address_secrets(self.endpoint, self.conf, os.environ)

    @classmethod
    def from_env(
        cls,
        backend: Optional[str] = None,
        endpoint: Optional[str] = None,
        run_id: Optional[str] = None,
        conf: Optional[str] = None,
        timeout: Optional[float] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> "Address":
        """Explicit values first, then ``RDZVCTL_RDZV_*``, then torchrun's ``PET_RDZV_*``."""
        env = os.environ if environ is None else environ

        def pick(value: Optional[str], name: str) -> Optional[str]:
            if value is not None:
                return value
            return env.get(f"RDZVCTL_RDZV_{name}") or env.get(f"PET_RDZV_{name}")

        backend = pick(backend, "BACKEND")
        if not backend:
            raise BackendConfigError(
                "no backend given: pass --rdzv-backend or set RDZVCTL_RDZV_BACKEND / PET_RDZV_BACKEND"
            )
        if timeout is None:
            raw = env.get("RDZVCTL_TIMEOUT")
            try:
                timeout = float(raw) if raw else DEFAULT_TIMEOUT
            except ValueError:
                raise BackendConfigError(f"RDZVCTL_TIMEOUT: not a number: {excerpt(raw)}") from None
            if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
                raise BackendConfigError(f"RDZVCTL_TIMEOUT: {excerpt(raw)} is not a number of seconds "
                                         f"above 0 and up to {MAX_TIMEOUT:.0f}")
        return cls(
            backend=backend,
            endpoint=pick(endpoint, "ENDPOINT") or "",
            run_id=pick(run_id, "ID") or "",
            conf=parse_conf(pick(conf, "CONF") or ""),
            timeout=timeout,
        )

    def with_run_id(self, run_id: str) -> "Address":
        return Address(self.backend, self.endpoint, run_id, dict(self.conf), self.timeout)

    # torch's RendezvousParameters.get* helpers, with errors that name the option.
    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return self.conf.get(key, default)

    def get_int(self, key: str, default: Optional[int] = None, *, minimum: Optional[int] = None,
                maximum: Optional[int] = None) -> Optional[int]:
        """``key`` as an integer, or ``default``; a value that is not one, or is outside
        ``[minimum, maximum]``, raises :class:`BackendConfigError` naming the option."""
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:  # also a string of more digits than int() accepts
            raise BackendConfigError(f"--rdzv-conf {key}: not an integer: {excerpt(raw)}") from None
        _check_range(key, value, minimum, maximum)
        return value

    def get_float(self, key: str, default: Optional[float] = None, *, minimum: Optional[float] = None,
                  maximum: Optional[float] = None) -> Optional[float]:
        """``key`` as a finite number, or ``default``; NaN, infinity or a value outside
        ``[minimum, maximum]`` raises :class:`BackendConfigError` naming the option."""
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BackendConfigError(f"--rdzv-conf {key}: not a number: {excerpt(raw)}") from None
        if not math.isfinite(value):
            raise BackendConfigError(f"--rdzv-conf {key}: not a finite number: {excerpt(raw)}")
        _check_range(key, value, minimum, maximum)
        return value

    def check_conf(self) -> None:
        """Reject what torch's handler would reject in ``--rdzv-conf`` before anything is read:
        a non-numeric, non-finite, non-positive or absurd value of one of torch's numeric options
        (:data:`NUMERIC_OPTIONS`), and ``min_nodes`` above ``max_nodes``
        (torch's ``RendezvousParameters.__init__``)."""
        for key, maximum in NUMERIC_OPTIONS.items():
            if key in INTEGER_OPTIONS:
                self.get_int(key, minimum=1, maximum=int(maximum))
            else:
                value = self.get_float(key, maximum=maximum)
                if value is not None and value <= 0:
                    raise BackendConfigError(f"--rdzv-conf {key}: must be positive, got {value:g}")
        lowest, highest = self.get_int("min_nodes"), self.get_int("max_nodes")
        if lowest is not None and highest is not None and lowest > highest:
            raise BackendConfigError(f"--rdzv-conf min_nodes ({lowest}) is greater than max_nodes ({highest})")

    def get_bool(self, key: str, default: Optional[bool] = None) -> Optional[bool]:
        raw = self.conf.get(key)
        if raw is None or raw == "":
            return default
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise BackendConfigError(f"--rdzv-conf {key}: not a boolean: {raw!r}")


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

