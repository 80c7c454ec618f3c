"""The ``etcd`` backend: torch's original etcd rendezvous (``etcd_rendezvous.py``) over the v2 API.

Layout (torch 2.13's ``EtcdRendezvous``; ``etcd_prefix`` defaults to
``/torchelastic/p2p``), under the run's directory ``<prefix>/run_<run_id>``
(TTL 7200 s, renewed by every live handler):

* ``rdzv/active_version`` — the JSON state (see :mod:`rdzvctl.state.legacy_etcd`);
* ``rdzv/version_counter`` — the last version number, a decimal string;
* ``rdzv/v_<version>/rank_<r>`` — each confirmed participant's keep-alive (TTL 10 s);
  ``rdzv/v_<version>/kv/...`` the round's store, ``rdzv/v_<version>/extra_data``.

Token = the ``modifiedIndex`` of ``active_version``; every write is a
compare-and-swap on it (``prevIndex``; ``prevExist=false`` to create), with the
TTL torch gives that status.  Two removals: :meth:`reopen` deletes
``active_version`` (compare on the index), after which torch's next
``init_phase`` creates a new version; :meth:`clear` removes the whole run
directory, as its TTL would.  torch's options ``etcd_prefix``, ``protocol``,
``cacert``, ``cert`` and ``key`` are honoured (``_create_etcd_client``).
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

from rdzvctl.backends.base import (
    Address,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
    is_counter_token,
)
from rdzvctl.backends.etcd_v2 import _KEY_NOT_FOUND, EtcdV2Backend
from rdzvctl.errors import StateCorruptError, StateError, TokenConflictError, UnsupportedOperationError
from rdzvctl.state.legacy_etcd import STATE_FORMAT, KeyInfo, LegacyRun, normalise_prefix, parse_state, ttl_for

__all__ = ["EtcdLegacyBackend"]

_DIR_NOT_EMPTY = 108


class EtcdLegacyBackend(EtcdV2Backend):
    """torch's legacy ``etcd`` rendezvous handler's state, read and repaired without torch or python-etcd."""

    name = "etcd"
    summary = "torch's legacy etcd rendezvous (JSON under /torchelastic/p2p; etcd <= 3.5 with --enable-v2)"
    capabilities = frozenset({"clear", "list_runs", "native_watch"})
    conf_keys = frozenset({"etcd_prefix", "protocol", "cacert", "cert", "key"})
    strict_fencing = True
    #: The stored value is torch's JSON text, not a pickle: the CLI dispatches on this.
    state_format = STATE_FORMAT
    #: Values are text (etcd v2 strings holding torch's ASCII JSON): arbitrary bytes cannot be stored.
    text_values = True

    def __init__(self, address: Address) -> None:  # noqa: D107 - the options are torch's, not etcd-v2's
        RendezvousBackend.__init__(self, address)
        from rdzvctl.backends.etcd_http import EtcdHttp
        from rdzvctl.backends.etcd_members import choose_protocol, parse_endpoints
        from rdzvctl.backends.tls import check_tls_files

        endpoints, scheme = parse_endpoints(address.endpoint)
        protocol = choose_protocol(address.get("protocol"), scheme, "http")
        context = None
        if protocol == "https":
            from rdzvctl.backends.etcd_members import make_ssl_context

            # named as the user (and torch's handler) named them: cacert, cert, key
            check_tls_files({o: address.get(o) for o in ("cacert", "cert", "key")}, "cert", "key")
            context = make_ssl_context(address.get("cacert"), address.get("cert"), address.get("key"))
        self.prefix = normalise_prefix(address.get("etcd_prefix"))
        if not self.prefix.startswith("/"):
            self.prefix = "/" + self.prefix  # etcd keys are absolute, as torch's client makes them
        self.min_nodes = address.get_int("min_nodes")
        self._http = EtcdHttp(endpoints, address.timeout, context, api="etcd")

    # -- paths ----------------------------------------------------------------------
    @property
    def run_path(self) -> str:
        """``EtcdRendezvous.get_path("")``: the run's directory."""
        return f"{self.prefix}run_{self.run_id}"

    @property
    def key(self) -> str:
        return f"{self.run_path}/rdzv/active_version"

    # -- decoding -------------------------------------------------------------------
    def _decode_node(self, node: Dict[str, Any]) -> StateAndToken:
        if node.get("dir"):
            raise StateCorruptError(f"etcd key {node.get('key', self.key)} is a directory, not torch's JSON state")
        value = node.get("value")
        if not isinstance(value, str):
            raise StateCorruptError(f"etcd key {node.get('key', self.key)} has no value")
        return value.encode("utf-8", "surrogatepass"), int(node["modifiedIndex"])

    @staticmethod
    def _info(node: Dict[str, Any]) -> KeyInfo:
        ttl = node.get("ttl")
        value = node.get("value")
        return KeyInfo(str(node.get("key", "")), ttl if type(ttl) is int else None, node.get("expiration"),
                       int(node.get("modifiedIndex", 0)), value if isinstance(value, str) else None)

    # -- torch's contract -------------------------------------------------------------
    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        """Write ``state`` (text) fenced on ``prevIndex``, with the TTL torch gives its status."""
        if token is not None and not is_counter_token(token):
            return self._current_refused()
        try:
            text = state.decode("utf-8")
        except UnicodeDecodeError:
            raise StateCorruptError("the etcd backend stores torch's JSON text: these bytes are not UTF-8") from None
        form: Dict[str, Any] = {"value": text}
        try:
            ttl = ttl_for(parse_state(state), self.min_nodes)
        except StateError:
            ttl = None
        if ttl is not None:
            form["ttl"] = ttl  # without one, etcd v2 makes the key permanent, as torch's writes without ttl do
        return self._fenced_put(form, token)

    # -- removals -----------------------------------------------------------------------
    def reopen(self, token: Token) -> bool:
        """Compare-and-delete ``active_version`` on ``prevIndex``: what ``wait_for_rendezvous_to_free`` does
        (on the value) to a dead version.  torch's next ``init_phase`` then creates version counter+1."""
        return self._fenced_delete(token)

    def clear(self, token: Token) -> bool:
        """Remove the run's directory, as its 7200 s TTL would, fenced by ``token``.

        etcd v2 cannot compare-and-delete a directory, so: delete
        ``active_version`` on ``prevIndex`` (nothing happens if it changed),
        then ``version_counter`` on its index, then the version directories,
        then the run directory only if it is empty.  A handler that starts a
        rendezvous in between makes a later step fail: it stops there and
        raises :class:`TokenConflictError`, leaving that handler's keys alone.
        """
        run = self.read_run()
        if run.token != token or not self.reopen(token):
            return False
        if run.counter is not None:
            status, doc, _ = self._call("DELETE", run.counter.key, prevIndex=run.counter.modified_index)
            if doc.get("errorCode") not in (None, _KEY_NOT_FOUND):
                raise TokenConflictError(
                    f"run {self.run_id!r}: active_version was removed, then a handler started a new rendezvous "
                    "(version_counter changed); its keys were left alone")
        for version in run.versions:
            self._call("DELETE", f"{self.run_path}/rdzv/v_{version}", dir="true", recursive="true")
        for directory in (f"{self.run_path}/rdzv", self.run_path):
            status, doc, _ = self._call("DELETE", directory, dir="true")
            if doc.get("errorCode") == _DIR_NOT_EMPTY:
                raise TokenConflictError(
                    f"run {self.run_id!r}: active_version was removed, then a handler wrote into {directory}; "
                    "its keys were left alone")
        return True

    def dump_run(self) -> bytes:
        """Every key of the run directory (values, TTLs) as JSON, from one recursive read: what ``clear``
        removes besides ``active_version``, saved for forensics before it does."""
        import json

        top = self._get(self.run_path, recursive="true", sorted="true")
        keys: Dict[str, Any] = {}
        stack = [] if top is None else [top]
        while stack:
            node = stack.pop()
            if node.get("dir"):
                stack.extend(reversed(node.get("nodes", [])))
            keys[str(node.get("key", ""))] = {"dir": bool(node.get("dir")), "value": node.get("value"),
                                               "ttl": node.get("ttl"), "modifiedIndex": node.get("modifiedIndex")}
        return json.dumps({"run_path": self.run_path, "keys": dict(sorted(keys.items()))}).encode("utf-8")

    # -- the whole run --------------------------------------------------------------------
    def _get(self, key: str, **query: Any) -> Optional[Dict[str, Any]]:
        status, doc, _ = self._call("GET", key, quorum="true", **query)
        if doc.get("errorCode") == _KEY_NOT_FOUND:
            return None
        self._raise_unexpected(status, doc)
        return doc["node"]

    def read_run(self) -> LegacyRun:
        """The run as torch's handler sees it, in two or three reads: the run directory, ``rdzv`` (the
        state, the counter and the version directories) and the state's version directory (keep-alives)."""
        run = LegacyRun(self.prefix, self.run_id)
        top = self._get(self.run_path)
        if top is None:
            return run
        run.run_dir = self._info(top)
        rdzv = self._get(f"{self.run_path}/rdzv")
        children: List[Dict[str, Any]] = [] if rdzv is None else rdzv.get("nodes", [])
        versions = []
        for node in children:
            name = str(node.get("key", "")).rsplit("/", 1)[-1]
            if name == "active_version":
                run.active = self._info(node)
                if not node.get("dir"):
                    run.raw = self._decode_node(node)[0]
            elif name == "version_counter" and not node.get("dir"):
                run.counter = self._info(node)
            elif name.startswith("v_") and node.get("dir"):
                versions.append(name[2:])
        run.versions = tuple(sorted(versions, key=lambda v: (len(v), v)))
        version = self._state_version(run.raw)
        if version is not None and version in run.versions:
            listing = self._get(f"{self.run_path}/rdzv/v_{version}")
            for node in [] if listing is None else listing.get("nodes", []):
                info = self._info(node)
                run.version_keys[info.key.rsplit("/", 1)[-1]] = info
        return run

    @staticmethod
    def _state_version(raw: Optional[bytes]) -> Optional[str]:
        if raw is None:
            return None
        try:
            return parse_state(raw).version
        except StateError:
            return None

    def list_runs(self) -> Iterator[RunEntry]:
        """Every ``run_<id>`` directory under the prefix with its ``active_version`` (one read per run:
        a recursive read would carry every round's store)."""
        listing = self._get(self.prefix.rstrip("/") or "/")
        names: List[Tuple[str, str]] = []
        for node in [] if listing is None else listing.get("nodes", []):
            name = str(node.get("key", "")).rsplit("/", 1)[-1]
            if node.get("dir") and name.startswith("run_"):
                names.append((name[4:], str(node["key"])))
        for run_id, path in sorted(names):
            try:
                node = self._get(f"{path}/rdzv/active_version")
                yield RunEntry(run_id, None if node is None else self._decode_node(node))
            except StateCorruptError as exc:
                yield RunEntry(run_id, None, exc)

    def history(self) -> HistoryWindow:
        """None here: the v2 event window holds torch's JSON values, which the history replay (pickled
        states) does not read; ``watch`` follows this backend's changes live."""
        raise UnsupportedOperationError(
            "rdzvctl history does not read torch's legacy etcd JSON state; follow its changes live with "
            "'rdzvctl watch --rdzv-backend etcd ...'")

    def store_keys(self) -> Dict[str, bytes]:
        """Not offered: each version's store lives in its own ``rdzv/v_<version>/kv`` and versions never
        repeat (``version_counter``), so no old job's keys can be read by a new one."""
        return RendezvousBackend.store_keys(self)

    def store_rounds(self) -> FrozenSet[int]:
        return RendezvousBackend.store_rounds(self)

    def with_run(self, run_id: str) -> "EtcdLegacyBackend":
        """The same backend bound to another run id (for ``list``/``corrupt-detect --all``)."""
        return EtcdLegacyBackend(self.address.with_run_id(run_id))
