"""The ``c10d`` backend: torch's ``C10dRendezvousBackend`` layout, without torch.

The state lives in a c10d store (a ``TCPStore`` by default, ``store_type=file``
for a ``FileStore``) under ``torch.rendezvous.<run_id>`` as base64 of the
pickled ``_RendezvousState``; ``Y2FuaW1hZGFt`` is torch's "no state" sentinel
and the token is the exact base64 value.  Differences from torch's backend,
all on purpose:

* reading never writes: torch's constructor creates the sentinel, we do not;
  ``get_state`` checks the key exists before fetching it;
* ``compare_set`` on a missing key with a non-empty ``expected`` replies
  ``expected`` without writing (a "lie"); we detect it instead of reporting a
  success or decoding the token as the state;
* ``clear`` writes the sentinel back (fenced) instead of deleting, so torch
  agents blocked in a ``get`` of the key keep working.

``--rdzv-conf`` options are torch's: ``store_type`` (tcp|file) and
``read_timeout`` (seconds, lowers ``--timeout``); ``is_host`` is ignored (we
never host a store).  A FileStore backend has the ``history`` capability (its
log holds every value ever written); a TCPStore keeps only the current value.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple, Union

from rdzvctl.backends.base import (
    Address,
    HistoryVersion,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
)
from rdzvctl.backends.endpoints import EndpointSyntaxError, parse_rendezvous_endpoint
from rdzvctl.backends.filestore import FileStore
from rdzvctl.errors import BackendConfigError, StateCorruptError
from rdzvctl.state.codec import MAX_STATE_BYTES, decode_base64, encode_base64
from rdzvctl.state.store_keys import store_keys_by_round

__all__ = ["C10dBackend", "NULL_SENTINEL", "KEY_PREFIX", "parse_endpoint"]

NULL_SENTINEL = b"Y2FuaW1hZGFt"
KEY_PREFIX = "torch.rendezvous."
_WIRE_PREFIX = b"/" + KEY_PREFIX.encode()
_MULTI_GET_BATCH = 256  # values per TCPStore MULTI_GET: bounds memory when states are large
_FILE_BATCH_BYTES = 4 << 20  # bytes of values per FileStore multi_get (one lock, one replay)
_SIZE_BATCH = 4096  # keys whose value sizes are looked up at a time (FileStore)

if TYPE_CHECKING:  # the TCPStore client (and ``socket``, 2 ms of start-up) is loaded for store_type=tcp only
    from rdzvctl.backends.tcpstore import TcpStoreClient

Store = Union["TcpStoreClient", FileStore]


def parse_endpoint(endpoint: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """torch's ``parse_rendezvous_endpoint``: ``host[:port]``, ``[v6]:port``, default port (the TCPStore's)."""
    if default_port is None:
        from rdzvctl.backends.tcpstore import DEFAULT_PORT

        default_port = DEFAULT_PORT
    try:
        return parse_rendezvous_endpoint(endpoint, default_port)
    except EndpointSyntaxError as exc:
        if exc.problem == "port":
            raise BackendConfigError(
                f"the port of the c10d endpoint {endpoint.strip()!r} must be an integer between 1 and 65535"
            ) from None
        raise BackendConfigError(
            f"the host of the c10d endpoint {endpoint.strip()!r} must be a host name, an IPv4 or an IPv6 address"
        ) from None


class C10dBackend(RendezvousBackend):
    """torch's c10d rendezvous backend over a TCPStore or a FileStore, spoken natively."""

    name = "c10d"
    summary = "torch's c10d store: TCPStore (default) or FileStore (store_type=file), no torch needed"
    requires = ()
    capabilities = frozenset({"clear", "list_runs", "store_keys"})
    conf_keys = frozenset({"store_type", "is_host"})  # torch's c10d options (is_host: ignored by a client)
    strict_fencing = False

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        self.store_type = (address.get("store_type") or "tcp").strip().lower()
        timeout = address.timeout
        read_timeout = address.get_int("read_timeout")
        if read_timeout is not None:
            if read_timeout <= 0:
                raise BackendConfigError("--rdzv-conf read_timeout must be a positive integer")
            timeout = min(timeout, float(read_timeout))
        if timeout <= 0:
            raise BackendConfigError(f"the timeout must be positive, got {timeout:g}")
        self.store: Store
        # A FileStore read costs no round trip but holds each value asked for, and
        # anyone who can write the file can make every value large: one at a time.
        self._batch = 1 if self.store_type == "file" else _MULTI_GET_BATCH
        if self.store_type == "tcp":
            from rdzvctl.backends.tcpstore import TcpStoreClient

            host, port = parse_endpoint(address.endpoint)
            self.store = TcpStoreClient(host, port, timeout=timeout)
        elif self.store_type == "file":
            if not address.endpoint.strip():
                raise BackendConfigError("store_type=file needs the FileStore path as the endpoint")
            self.store = FileStore(address.endpoint.strip(), timeout=timeout)
            # The log keeps every value ever written: this instance has a history.
            self.capabilities = type(self).capabilities | {"history"}  # type: ignore[misc]
        else:
            raise BackendConfigError(
                f"--rdzv-conf store_type must be tcp or file, got {self.store_type!r}"
            )

    # -- keys and values -----------------------------------------------------------
    @property
    def key(self) -> bytes:
        """The run's wire key: ``/torch.rendezvous.<run_id>``."""
        if not self.run_id:
            raise BackendConfigError("the c10d backend needs a run id (--rdzv-id)")
        return _WIRE_PREFIX + self.run_id.encode()

    def _state_bytes(self, value: bytes) -> bytes:
        """A stored value (not the sentinel) as state bytes; not base64 raises what ``get`` says of it."""
        current = self._decode(value)
        assert current is not None  # the sentinel is told apart before
        return current[0]

    def _decode(self, value: bytes, run_id: Optional[str] = None) -> Optional[StateAndToken]:
        """torch's ``_decode_state``: ``None`` for the sentinel, else ``(state, token)``."""
        if value == NULL_SENTINEL:
            return None
        try:
            return decode_base64(value), value
        except StateCorruptError as exc:
            raise StateCorruptError(
                f"the c10d value of run {run_id or self.run_id!r} at {self.describe()} is not "
                "base64, so it is not rendezvous state"
            ) from exc

    def _current(self) -> Optional[StateAndToken]:
        value = self.store.get(self.key)
        return None if value is None else self._decode(value)

    # -- torch's contract ---------------------------------------------------------
    def get_state(self) -> Optional[StateAndToken]:
        return self._current()

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        key = self.key
        desired = encode_base64(state)
        if token is None:
            return self._create(key, state, desired)
        if not isinstance(token, bytes) or not token:
            return self._refused()
        reply = self.store.compare_set(key, token, desired)
        if reply == token:
            # Either a success that rewrote equal bytes, or the "lie": the key
            # was missing, the server echoed ``expected`` and wrote nothing.
            if reply == desired and self.store.get(key) == desired:
                return state, desired, True
            return self._refused()
        if reply == desired:
            return state, desired, True
        return self._refused(reply)

    def _create(self, key: bytes, state: bytes, desired: bytes) -> Optional[SetResult]:
        """A tokenless write: only over torch's sentinel or a missing key."""
        for _ in range(8):
            reply = self.store.compare_set(key, NULL_SENTINEL, desired)
            if reply == desired:
                return state, desired, True
            if reply != NULL_SENTINEL:
                return self._refused(reply)
            # The key is missing (the server echoed ``expected``): create it.
            reply = self.store.compare_set(key, b"", desired)
            if reply == desired:
                return state, desired, True
            if reply != NULL_SENTINEL:
                return self._refused(reply)
            # torch's constructor wrote the sentinel in between: go again.
        return self._refused()

    def _refused(self, value: Optional[bytes] = None) -> Optional[SetResult]:
        current = self._current() if value is None else self._decode(value)
        return None if current is None else (current[0], current[1], False)

    # -- capabilities ----------------------------------------------------------------
    def clear(self, token: Token) -> bool:
        """Restore torch's sentinel if ``token`` is current (never deletes the key)."""
        if not isinstance(token, bytes) or not token or token == NULL_SENTINEL:
            return False
        # A mismatch replies the current value, which after an earlier clear is
        # the sentinel too: only a current token may report a removal.
        if self.store.get(self.key) != token:
            return False
        return self.store.compare_set(self.key, token, NULL_SENTINEL) == NULL_SENTINEL

    def discard_cleared_run(self) -> None:
        """Delete torch's "no state" sentinel that ``clear`` puts back (torch's backend would recreate it)."""
        if self.store.get(self.key) == NULL_SENTINEL:
            self.store.delete_key(self.key)

    def list_runs(self) -> Iterator[RunEntry]:
        """Every ``torch.rendezvous.<run_id>`` key with its state (``None`` for the sentinel), sorted by run id.

        A run id may hold ``/``; a key is a round's store key
        (``torch.rendezvous.<run_id>.<round>/<name>``) rather than a run only
        when that ``<run_id>`` is a run too.  A value that is not base64 comes
        with its error (what ``get`` says of it) and raw, as its own token, so a
        fenced ``clear`` can repair it.
        """
        names = {k[len(_WIRE_PREFIX):] for k in self.store.list_keys() if k.startswith(_WIRE_PREFIX)}
        keys = sorted(_WIRE_PREFIX + name for name in names if not _is_round_key(name, names))
        for batch in self._batches(keys):
            for key, value in zip(batch, self.store.multi_get(batch)):
                run_id = key[len(_WIRE_PREFIX):].decode("utf-8", "replace")
                if value is None:
                    continue  # deleted since the listing
                try:
                    yield RunEntry(run_id, self._decode(value, run_id))
                except StateCorruptError as exc:
                    yield RunEntry(run_id, (value, value), exc)

    def _batches(self, keys: List[bytes]) -> Iterator[List[bytes]]:
        """``keys`` in runs for one ``multi_get`` each: ``_MULTI_GET_BATCH`` keys on a TCPStore; on a
        FileStore, whose reads cost no round trip, as many as ``_FILE_BATCH_BYTES`` of values allow
        (a larger value alone), since anyone who can write the file can make every value large."""
        if not isinstance(self.store, FileStore):
            for start in range(0, len(keys), _MULTI_GET_BATCH):
                yield keys[start:start + _MULTI_GET_BATCH]
            return
        for start in range(0, len(keys), _SIZE_BATCH):
            part = keys[start:start + _SIZE_BATCH]
            batch: List[bytes] = []
            total = 0
            for key, size in zip(part, self.store.value_sizes(part)):
                size = size or 0
                if batch and total + size > _FILE_BATCH_BYTES:
                    yield batch
                    batch, total = [], 0
                batch.append(key)
                total += size
            if batch:
                yield batch

    def _store_key_names(self) -> List[Tuple[int, bytes, bytes]]:
        """``(round, name, wire key)`` of each per-round key of the run, sorted (LIST_KEYS /
        one FileStore replay); the state key ``torch.rendezvous.<run_id>`` itself has no ``/``."""
        return store_keys_by_round(self.store.list_keys(), self.key + b".")

    def store_keys(self) -> Dict[str, bytes]:
        """The run's per-round store keys (``torch.rendezvous.<run_id>.<round>/<name>``)
        of every round found, as ``"<round>/<name>"`` sorted by round then name."""
        found = self._store_key_names()
        out: Dict[str, bytes] = {}
        for start in range(0, len(found), self._batch):
            batch = found[start:start + self._batch]
            values = self.store.multi_get([key for _, _, key in batch])
            for (round_, name, _), value in zip(batch, values):
                if value is not None:
                    out[f"{round_}/{name.decode(errors='replace')}"] = value
        return out

    def history(self) -> HistoryWindow:
        """A FileStore's log replayed: every value torch ever wrote to the run's key, oldest first.

        ``revision`` is the record's number in the log, ``written_at`` None (the
        log keeps no times); torch's "no state" sentinel and a deletion are
        ``value=None``.  Streamed (:meth:`FileStore.versions`).  A TCPStore keeps
        only the current value: no history (``watch --record`` records one).
        """
        if not isinstance(self.store, FileStore):
            return super().history()
        store, key = self.store, self.key
        limit = 4 * (MAX_STATE_BYTES // 3) + 4  # base64 of the largest state the codec reads

        def versions() -> Iterator[HistoryVersion]:
            for number, value, length in store.versions(key, limit):
                if value is None or value == NULL_SENTINEL:
                    yield HistoryVersion(None, None, number)
                    continue
                if length > limit:  # only its start was read: say its real size, not the cut's
                    yield HistoryVersion(None, None, number, error=(
                        f"the value is {length:,} bytes, over the {limit:,}-byte base64 of the "
                        f"{MAX_STATE_BYTES >> 20} MiB state limit"))
                    continue
                yield HistoryVersion.unwrapped(self._state_bytes, value, None, number)

        return HistoryWindow(versions(), None)

    def server_info(self) -> Dict[str, Any]:
        """The TCPStore server (protocol, flavour) or the FileStore file (see ``server_info``)."""
        from rdzvctl.backends.server_info import filestore_info, tcpstore_info

        if isinstance(self.store, FileStore):
            return filestore_info(self.store.path)
        return tcpstore_info(self.store)

    def store_rounds(self) -> FrozenSet[int]:
        """The rounds with per-round keys, from the key names alone (no values fetched)."""
        return frozenset(round_ for round_, _, _ in self._store_key_names())

    def close(self) -> None:
        self.store.close()

    def describe(self) -> str:
        return self.store.endpoint


_ROUND_PREFIX = re.compile(rb"(.+)\.[0-9]+", re.DOTALL)  # run ids may hold any byte, line breaks too


def _is_round_key(name: bytes, names: Set[bytes]) -> bool:
    """``<run_id>.<round>/<key>`` of a run in ``names``: a per-round store key, not a run."""
    cut = name.find(b"/")
    while cut != -1:
        match = _ROUND_PREFIX.fullmatch(name, 0, cut)
        if match and match.group(1) in names:
            return True
        cut = name.find(b"/", cut + 1)
    return False
