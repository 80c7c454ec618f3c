"""torch's ``Store`` on etcd v3, through the JSON gateway client of rdzvctl's etcd backends.

Keys live under the run's store prefix; every write carries the store's lease.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

from rdzvctl.backends.etcd_gateway import b64, prefix_range_end, unb64
from rdzvctl.errors import BackendUnavailableError
from rdzvctl.torchrun.stores.common import (
    DEFAULT_TTL,
    POLL_MAX,
    Data,
    ServerStore,
    etcd_store_prefix,
    to_bytes,
)

__all__ = ["EtcdV3Store"]

# Through the v3 JSON gateway client of rdzvctl's etcd backends: keys and values
# travel base64-encoded; every write carries the store's lease.

_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class EtcdV3Store(ServerStore):
    """A torch ``Store`` on etcd v3: keys ``/torch/elastic/store/<run_id>/<key>`` under a lease.

    ``gateway`` is an :class:`rdzvctl.backends.etcd_gateway.EtcdGateway`.  The
    lease (``ttl`` seconds) is granted on the first write and renewed as the
    store is used, so keys outlive the run by at most ``ttl``.  Blocking reads
    watch the first missing key from the revision they read at, so no write is
    missed between the read and the watch.
    """

    def __init__(
        self,
        gateway: Any,
        run_id: str,
        ttl: int = DEFAULT_TTL,
        timeout: Optional[timedelta] = None,
        endpoint: str = "etcd",
        prefix: Optional[str] = None,
    ) -> None:
        super().__init__(etcd_store_prefix(run_id) if prefix is None else prefix, timeout, endpoint)
        self.gateway = gateway
        self.run_id = run_id
        self.ttl = int(ttl)
        self._lease: Optional[int] = None
        self._lease_renewed = 0.0
        self._lease_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def _lease_id(self, renew: bool = False) -> int:
        """The store's lease: granted lazily, renewed when a quarter of its TTL has passed."""
        with self._lease_lock:
            now = time.monotonic()
            if self._lease is not None and not renew and now - self._lease_renewed > self.ttl / 4:
                renew = self.gateway.lease_keepalive(self._lease) <= 0
                self._lease_renewed = now
            if self._lease is None or renew:
                self._lease = self.gateway.lease_grant(self.ttl)
                self._lease_renewed = now
            return self._lease

    def _put_op(self, key: bytes, value: bytes, lease: int) -> Dict[str, Any]:
        return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}

    def _txn(self, compare: List[Dict[str, Any]], success: List[Dict[str, Any]],
             failure: List[Dict[str, Any]]) -> Dict[str, Any]:
        """A transaction whose writes carry the lease; if etcd refuses it because the lease
        is gone (expired or revoked), a new lease is granted and the transaction sent again."""
        for attempt in range(2):
            lease = self._lease_id(renew=attempt > 0)
            ops = [self._with_lease(op, lease) for op in success]
            try:
                return self.gateway.txn(compare, ops, failure)
            except BackendUnavailableError:
                if attempt or self.gateway.lease_keepalive(lease) > 0:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _with_lease(op: Dict[str, Any], lease: int) -> Dict[str, Any]:
        if "request_put" in op:
            return {"request_put": {**op["request_put"], "lease": str(lease)}}
        return op

    def _put(self, pairs: Sequence["tuple[bytes, bytes]"]) -> None:
        for start in range(0, len(pairs), _MAX_TXN_OPS):
            chunk = pairs[start:start + _MAX_TXN_OPS]
            self._txn([], [self._put_op(k, v, 0) for k, v in chunk], [])

    @staticmethod
    def _range_op(key: bytes) -> Dict[str, Any]:
        return {"request_range": {"key": b64(key)}}

    @staticmethod
    def _first_value(response: Dict[str, Any]) -> Optional[bytes]:
        kvs = response.get("response_range", response).get("kvs") or []
        return unb64(kvs[0].get("value", "") or "") if kvs else None

    def _read(self, keys: Sequence[bytes]) -> "tuple[List[Optional[bytes]], Any]":
        values: List[Optional[bytes]] = []
        revision = 0
        for start in range(0, len(keys), _MAX_TXN_OPS):
            chunk = keys[start:start + _MAX_TXN_OPS]
            if len(chunk) == 1:
                answer = self.gateway.range(chunk[0])
                values.append(self._first_value(answer))
            else:
                answer = self.gateway.txn([], [self._range_op(k) for k in chunk], [])
                values += [self._first_value(r) for r in answer.get("responses", [])]
            if not revision:
                revision = int(answer.get("header", {}).get("revision", 0))
        return values, revision

    def _block(self, key: bytes, marker: Any, deadline: float, attempt: int) -> None:
        """Watch ``key`` from the revision after ``marker`` until a put, or ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        started = time.monotonic()
        stop = threading.Event()
        timer = threading.Timer(remaining, stop.set)
        timer.daemon = True
        timer.start()
        try:
            results = self.gateway.watch(key, int(marker) + 1, stop, idle=remaining + 1.0)
            try:
                for result in results:
                    if result.get("events") or result.get("canceled"):
                        break
            finally:
                results.close()
        finally:
            timer.cancel()
        if time.monotonic() - started < 0.01 and not stop.is_set():
            time.sleep(min(POLL_MAX, max(0.0, deadline - time.monotonic())))  # never spin

    # -- torch's Store API ------------------------------------------------------------------
    def set(self, key: str, value: Data) -> None:
        with self._errors():
            self._put([(self._key(key), to_bytes(value))])

    def multi_set(self, keys: List[str], values: List[Data]) -> None:
        if len(keys) != len(values):
            raise ValueError("multi_set needs as many values as keys")
        with self._errors():
            self._put([(self._key(k), to_bytes(v)) for k, v in zip(keys, values)])

    def compare_set(self, key: str, expected_value: Data, desired_value: Data) -> bytes:
        wire = self._key(key)
        expected, desired = to_bytes(expected_value), to_bytes(desired_value)
        put = [self._put_op(wire, desired, 0)]
        read = [self._range_op(wire)]
        with self._errors():
            if not expected:
                created = {"key": b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                answer = self._txn([created], put, read)
                if answer.get("succeeded"):
                    return desired
                current = self._first_value(answer["responses"][0])
                if current:
                    return current
            same = {"key": b64(wire), "target": "VALUE", "result": "EQUAL", "value": b64(expected)}
            answer = self._txn([same], put, read)
            if answer.get("succeeded"):
                return desired
            current = self._first_value(answer["responses"][0])
        return expected if current is None else current

    def add(self, key: str, value: int) -> int:
        wire = self._key(key)
        with self._errors():
            while True:
                answer = self.gateway.range(wire)
                kvs = answer.get("kvs") or []
                if kvs:
                    current = unb64(kvs[0].get("value", "") or "")
                    try:
                        total = int(current or b"0") + int(value)
                    except ValueError:
                        raise ValueError(f"store key {key!r} does not hold an integer") from None
                    guard = {"key": b64(wire), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(kvs[0]["mod_revision"])}
                else:
                    total = int(value)
                    guard = {"key": b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                if self._txn([guard], [self._put_op(wire, str(total).encode(), 0)], []).get("succeeded"):
                    return total

    def append(self, key: str, value: Data) -> None:
        wire = self._key(key)
        with self._errors():
            while True:
                kvs = self.gateway.range(wire).get("kvs") or []
                if kvs:
                    new = unb64(kvs[0].get("value", "") or "") + to_bytes(value)
                    guard = {"key": b64(wire), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(kvs[0]["mod_revision"])}
                else:
                    new = to_bytes(value)
                    guard = {"key": b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                if self._txn([guard], [self._put_op(wire, new, 0)], []).get("succeeded"):
                    return

    def delete_key(self, key: str) -> bool:
        with self._errors():
            answer = self.gateway.call("kv/deleterange", {"key": b64(self._key(key))})
        return int(answer.get("deleted", 0)) > 0

    def num_keys(self) -> int:
        """How many keys the run's store holds (one counting range over its prefix)."""
        prefix = self.prefix.encode()
        with self._errors():
            answer = self.gateway.range(prefix, prefix_range_end(prefix), count_only=True)
        return int(answer.get("count", 0))

    def clone(self) -> "EtcdV3Store":
        twin = EtcdV3Store(self.gateway, self.run_id, self.ttl, self.timeout, self.endpoint, self.prefix)
        twin._lease, twin._lease_renewed = self._lease, self._lease_renewed
        return twin
