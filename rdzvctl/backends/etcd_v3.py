"""The ``etcd-v3`` backend: torch's rendezvous layout on the etcd v3 API.

torch only ships an ``etcd-v2`` backend, and etcd 3.6 removed the v2 API.
This backend keeps the same key and value, ``/torch/elastic/rendezvous/<run_id>``
holding the base64 of the pickled state, so ``etcdctl get --prefix
/torch/elastic/rendezvous/`` finds it.  The token is the key's
``mod_revision``; a write is one transaction: create only if the key is absent
(``create_revision == 0``), replace only if ``mod_revision`` equals the token.
The state is attached to a lease of ``ttl`` seconds (default 7200, torch's v2
TTL) that every write renews, so abandoned runs expire.

It talks to etcd's JSON gateway with the standard library (see
:mod:`rdzvctl.backends.etcd_gateway`, over :mod:`rdzvctl.backends.etcd_http`): no grpc, no protobuf.  Options in
``--rdzv-conf``: ``protocol`` (http/https), ``ca_cert``, ``ssl_cert``,
``ssl_cert_key``, ``username``/``password`` (or ``ETCD_USERNAME``/
``ETCD_PASSWORD``, or ``http://user:password@host:2379``), ``ttl``,
``key_prefix``; the endpoint may list several members (``host1:2379,host2:2379``).
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from contextlib import closing
from typing import Any, Dict, FrozenSet, Generator, Iterator, Optional

from rdzvctl.backends.base import (
    Address,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
    is_counter_token,
    round_of_store_key,
)
from rdzvctl.errors import BackendConfigError, StateCorruptError
from rdzvctl.state.codec import decode_base64, encode_base64

__all__ = ["EtcdV3Backend", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL"]

DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_TTL = 7200


def _stored_state(kv: Dict[str, Any]) -> bytes:
    """The state bytes of a key-value from the gateway: its value (base64 on the wire) is the state's base64."""
    try:
        stored = base64.b64decode(kv.get("value", ""))
    except (binascii.Error, ValueError) as exc:
        raise StateCorruptError("the gateway sent a value that is not base64") from exc
    return decode_base64(stored)


#: Keys per range request of ``list_runs``: bounds memory when there are many runs or large states.
LIST_PAGE = 500


class EtcdV3Backend(RendezvousBackend):
    """Rendezvous state in etcd v3, fenced by the key's ``mod_revision``."""

    name = "etcd-v3"
    summary = "etcd v3 API through its JSON gateway (torch's key layout, leased)"
    requires = ()
    install_hint = ""
    capabilities = frozenset({"clear", "list_runs", "native_watch", "store_keys", "history"})
    conf_keys = frozenset({"protocol", "ca_cert", "ssl_cert", "ssl_cert_key", "ttl", "key_prefix", "username",
                           "password"})
    strict_fencing = True

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        from rdzvctl.backends.etcd_gateway import EtcdGateway
        from rdzvctl.backends.etcd_http import EtcdHttp
        from rdzvctl.backends.etcd_members import (
            choose_protocol,
            make_ssl_context,
            parse_endpoints,
            split_credentials,
        )

        members, url_user, url_password = split_credentials(address.endpoint)
        endpoints, scheme = parse_endpoints(members)
        tls_files = [address.get(k) for k in ("ca_cert", "ssl_cert", "ssl_cert_key")]
        protocol = choose_protocol(address.get("protocol"), scheme, "https" if any(tls_files) else "http")
        context = make_ssl_context(*tls_files) if protocol == "https" else None
        ttl = address.get_int("ttl")
        self.ttl = ttl if ttl and ttl > 0 else DEFAULT_TTL
        prefix = (address.get("key_prefix", DEFAULT_KEY_PREFIX) or "").strip("/")
        self.key_prefix = "/" + prefix if prefix else ""
        username = address.get("username") or url_user or os.environ.get("ETCD_USERNAME") or None
        password = address.get("password") or url_password or os.environ.get("ETCD_PASSWORD") or ""
        if password and not username:
            raise BackendConfigError("an etcd password was given without a username")
        self._gw = EtcdGateway(EtcdHttp(endpoints, address.timeout, context, api="etcd"), username, password)
        self._renewed: Dict[int, float] = {}

    @property
    def gateway(self) -> Any:
        """The v3 gateway client (shared by the torchrun plugin's store on the same cluster)."""
        return self._gw

    @property
    def key(self) -> str:
        """The etcd key of this run's state."""
        return f"{self.key_prefix}/{self.run_id}"

    @property
    def _key(self) -> bytes:
        return self.key.encode()

    # -- decoding -----------------------------------------------------------------------
    def _decode(self, kv: Dict[str, Any]) -> StateAndToken:
        try:
            state = _stored_state(kv)
        except StateCorruptError as exc:
            raise StateCorruptError(f"the value of etcd key {self.key} is not base64 (not rendezvous state)") from exc
        return state, int(kv["mod_revision"])

    def _first(self, doc: Dict[str, Any]) -> Optional[StateAndToken]:
        kvs = doc.get("kvs") or []
        return self._decode(kvs[0]) if kvs else None

    def _refused(self, txn: Dict[str, Any]) -> Optional[SetResult]:
        """The current state from a failed transaction's range branch."""
        responses = txn.get("responses") or [{}]
        current = self._first(responses[0].get("response_range", {}))
        return None if current is None else (*current, False)

    # -- torch's contract -----------------------------------------------------------------
    def get_state(self) -> Optional[StateAndToken]:
        return self._first(self._gw.range(self._key))

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        from rdzvctl.backends.etcd_gateway import b64

        key = b64(self._key)
        value = b64(encode_base64(state))
        read_back = [{"request_range": {"key": key}}]
        if token is not None and not is_counter_token(token):
            current = self.get_state()
            return None if current is None else (*current, False)
        if token is None:
            lease = self._gw.lease_grant(self.ttl)
            put = {"key": key, "value": value, "lease": str(lease)}
            txn = self._gw.txn(
                [{"key": key, "target": "CREATE", "create_revision": "0"}],
                [{"request_put": put}],
                read_back,
            )
            if not txn.get("succeeded"):
                self._gw.lease_revoke(lease)
                return self._refused(txn)
            self._renewed[lease] = time.monotonic()
            return state, int(txn["header"]["revision"]), True
        txn = self._gw.txn(
            [{"key": key, "target": "MOD", "mod_revision": str(token)}],
            [{"request_put": {"key": key, "value": value, "ignore_lease": True, "prev_kv": True}}],
            read_back,
        )
        if not txn.get("succeeded"):
            return self._refused(txn)
        revision = int(txn["header"]["revision"])
        prev_kv = (txn.get("responses") or [{}])[0].get("response_put", {}).get("prev_kv", {})
        lease = int(prev_kv.get("lease", 0))
        if lease:
            self._renew(lease)
            return state, revision, True
        return state, self._attach_lease(key, value, revision), True

    def _renew(self, lease: int) -> None:
        """Renew the state's lease, as torch's v2 backend resets the TTL on each write.

        Skipped when this client renewed it recently: the TTL left is then
        still close to the full ``ttl``.
        """
        now = time.monotonic()
        if now - self._renewed.get(lease, float("-inf")) < min(60.0, self.ttl / 10):
            return
        self._gw.lease_keepalive(lease)
        self._renewed = {lease: now}

    def _attach_lease(self, key: str, value: str, revision: int) -> int:
        """Put a lease on a state someone stored without one (fenced on ``revision``)."""
        lease = self._gw.lease_grant(self.ttl)
        txn = self._gw.txn(
            [{"key": key, "target": "MOD", "mod_revision": str(revision)}],
            [{"request_put": {"key": key, "value": value, "lease": str(lease)}}],
            [],
        )
        if not txn.get("succeeded"):
            self._gw.lease_revoke(lease)
            return revision  # someone wrote meanwhile; our token is already stale
        self._renewed = {lease: time.monotonic()}
        return int(txn["header"]["revision"])

    # -- capabilities ------------------------------------------------------------------
    def clear(self, token: Token) -> bool:
        """Delete the state in a transaction guarded by ``mod_revision == token``."""
        from rdzvctl.backends.etcd_gateway import b64

        if not is_counter_token(token):
            return False
        key = b64(self._key)
        txn = self._gw.txn(
            [{"key": key, "target": "MOD", "mod_revision": str(token)}],
            [{"request_delete_range": {"key": key}}],
            [],
        )
        return bool(txn.get("succeeded"))

    def discard_cleared_run(self) -> None:
        """Revoke the leases of the run's writes, which ``clear`` leaves to expire (TTL), once no state is left."""
        if self.get_state() is None:  # revoking a lease deletes the keys on it
            for lease in list(self._renewed):
                self._gw.lease_revoke(lease)
            self._renewed = {}

    def history(self) -> HistoryWindow:
        """The state key's revisions since the last compaction, streamed from a watch
        (:mod:`rdzvctl.backends.etcd_v3_history`); ``written_at`` is None (etcd records no time)."""
        from rdzvctl.backends.etcd_v3_history import read_history

        return read_history(self)

    def list_runs(self) -> Iterator[RunEntry]:
        """Every run under the key prefix, sorted by run id, read in pages of ``LIST_PAGE`` keys.

        etcd returns a range sorted by key; each page starts after the last key
        of the one before, so memory holds one page of states, not all of them.
        A run whose value is not base64 is listed with its ``error`` set.
        """
        from rdzvctl.backends.etcd_gateway import prefix_range_end

        prefix = (self.key_prefix + "/").encode()
        end = prefix_range_end(prefix)
        b64decode = base64.b64decode
        cut = len(prefix)
        start = prefix
        while True:
            doc = self._gw.range(start, end, limit=LIST_PAGE)
            kvs = doc.get("kvs") or ()
            for kv in kvs:
                run_id = b64decode(kv["key"])[cut:].decode("utf-8", "replace")
                try:
                    state = _stored_state(kv)
                except StateCorruptError as exc:
                    error = StateCorruptError(f"the value of etcd key {self.key_prefix}/{run_id} is not base64")
                    error.__cause__ = exc
                    yield RunEntry(run_id, None, error)
                    continue
                yield RunEntry(run_id, (state, int(kv["mod_revision"])))
            if not kvs or not doc.get("more"):
                return
            start = b64decode(kvs[-1]["key"]) + b"\x00"  # the next key after the last one read

    @property
    def store_prefix(self) -> str:
        """Where the torchrun plugin's store keeps the run's store keys (torch's etcd-v2 store
        directory, one per run); the plugin hands it to ``rdzvctl.torchrun.stores.EtcdV3Store``."""
        return f"/torch/elastic/store/{self.run_id}/"

    @property
    def _round_prefix(self) -> bytes:
        """Where torch's per-round keys of the run start: the store prefix plus torch's round prefix."""
        return f"{self.store_prefix}torch.rendezvous.{self.run_id}.".encode()

    def store_keys(self) -> Dict[str, bytes]:
        """torchrun's per-round keys (``rdzvctl.torchrun`` store) as ``"<round>/<name>"``.

        They live under ``/torch/elastic/store/<run_id>/`` with torch's round
        prefix ``torch.rendezvous.<run_id>.<round>/``; one range request.
        """
        from rdzvctl.backends.etcd_gateway import prefix_range_end

        prefix = self._round_prefix
        doc = self._gw.range(prefix, prefix_range_end(prefix))
        found = []
        for kv in doc.get("kvs") or ():
            parsed = round_of_store_key(base64.b64decode(kv["key"]), prefix)
            if parsed is not None:
                found.append((parsed[0], parsed[1].decode("utf-8", "replace"),
                              base64.b64decode(kv.get("value", ""))))
        return {f"{r}/{n}": v for r, n, v in sorted(found)}

    def store_rounds(self) -> FrozenSet[int]:
        """The rounds with per-round keys: one keys-only range request."""
        from rdzvctl.backends.etcd_gateway import prefix_range_end

        prefix = self._round_prefix
        doc = self._gw.range(prefix, prefix_range_end(prefix), keys_only=True)
        rounds = set()
        for kv in doc.get("kvs") or ():
            parsed = round_of_store_key(base64.b64decode(kv["key"]), prefix)
            if parsed is not None:
                rounds.add(parsed[0])
        return frozenset(rounds)

    # -- watch (driven by rdzvctl.backends.watching) -------------------------------------
    def watch_read(self) -> "tuple[Optional[StateAndToken], int]":
        """The state and the revision to watch from (the one after the store revision of the read)."""
        doc = self._gw.range(self._key)
        return self._first(doc), int(doc["header"]["revision"]) + 1

    def watch_wait(self, cursor: Any, stop: threading.Event, interval: float) -> Generator[Any, None, None]:
        """etcd's own watch from revision ``cursor``; after a broken stream the driver resumes from
        the revision after the last one seen, so no change is missed or repeated."""
        from rdzvctl.backends.watching import RESYNC

        with closing(self._gw.watch(self._key, cursor, stop)) as results:
            for result in results:
                if result.get("canceled") or result.get("compact_revision"):
                    yield RESYNC  # history compacted away: re-read
                    return
                for event in result.get("events") or ():
                    kv = event.get("kv", {})
                    current = None if event.get("type") == "DELETE" else self._decode(kv)
                    yield current, int(kv["mod_revision"]) + 1

    # -- presentation ------------------------------------------------------------------
    def server_info(self) -> Dict[str, Any]:
        """Version, health, members, leader and whether v2 is on (see ``server_info``)."""
        from rdzvctl.backends.server_info import etcd_info

        return etcd_info(self._gw.http, self._gw)

    def describe(self) -> str:
        return self._gw.describe()

    def close(self) -> None:
        self._gw.http.close()
