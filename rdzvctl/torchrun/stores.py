"""torch ``Store`` implementations on Redis and etcd v3, the way torch's ``EtcdStore`` is built.

The rendezvous handler hands this store to torchrun, which uses it to share
``MASTER_ADDR``/``MASTER_PORT``, assign worker ranks and run its exit barrier;
a process group can also be built on it (gloo).  Semantics are TCPStore's:

* ``get``/``wait``/``multi_get`` block until every key exists, for at most the
  store timeout (or the explicit one) and then raise ``DistStoreError``
  ("wait timeout after ...ms, keys: ..."); a zero timeout does not wait.
* ``compare_set`` answers the value current after the call: ``desired`` on
  success; on a missing key an empty ``expected`` creates it and a non-empty
  one creates nothing and answers ``expected`` (exactly as TCPStore does, so
  torch's ``C10dRendezvousBackend`` works on these stores too).
* ``add`` keeps the counter as ASCII decimal.

Every key lives under a per-run prefix with the backend's TTL, so an abandoned
run leaves nothing behind.  Server failures raise ``DistNetworkError``.  Both
classes are also reachable from C++ (``PrefixStore``, gloo): torch's Python
store trampoline looks up ``deleteKey``/``getNumKeys`` under their C++ names,
hence the aliases.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from torch.distributed import DistNetworkError, DistStoreError, Store

from rdzvctl.errors import BackendUnavailableError, RdzvctlError

__all__ = [
    "DEFAULT_TTL",
    "RedisStore",
    "EtcdV3Store",
    "redis_store_prefix",
    "etcd_store_prefix",
]

DEFAULT_TTL = 7200
DEFAULT_READ_TIMEOUT = timedelta(seconds=60)

#: How long a Redis waiter sleeps between polls: it starts short and backs off.
_POLL_FIRST = 0.002
_POLL_MAX = 0.05

Data = Union[str, bytes]
#: Turns a client library's exception into an rdzvctl error (whose text is safe to show).
Translator = Callable[[BaseException], Exception]


def redis_store_prefix(run_id: str) -> str:
    """Where the store keys of ``run_id`` live on Redis (next to ``torch.rendezvous.<run_id>``)."""
    return f"torch.rendezvous.{run_id}.store/"


def etcd_store_prefix(run_id: str) -> str:
    """Where the store keys of ``run_id`` live on etcd (torch's v2 store directory, per run)."""
    return f"/torch/elastic/store/{run_id}/"


def _to_bytes(value: Data) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ValueError("a store value must be str or bytes")


def _seconds(timeout: Optional[timedelta], default: timedelta) -> float:
    chosen = default if timeout is None else timeout
    return max(0.0, chosen.total_seconds())


class _ServerStore(Store):
    """What both stores share: key prefixing, timeouts and the blocking-read loop."""

    def __init__(
        self,
        prefix: str,
        timeout: Optional[timedelta],
        endpoint: str,
        translate: Optional[Translator] = None,
    ) -> None:
        super().__init__()  # required by torch's pybind trampoline
        self.prefix = prefix
        self.endpoint = endpoint
        self.translate = translate
        self.set_timeout(DEFAULT_READ_TIMEOUT if timeout is None else timeout)

    # -- what a server has to provide ------------------------------------------------
    def _read(self, keys: Sequence[bytes]) -> "tuple[List[Optional[bytes]], Any]":
        """The values of ``keys`` (``None`` when absent) and a marker for :meth:`_block`."""
        raise NotImplementedError

    def _block(self, key: bytes, marker: Any, deadline: float, attempt: int) -> None:
        """Return when ``key`` may have appeared since ``marker``, or at ``deadline``."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------
    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn the client's failures into torch's store errors (RuntimeErrors)."""
        try:
            yield
        except (DistStoreError, DistNetworkError, ValueError):
            raise
        except RdzvctlError as exc:
            raise DistNetworkError(str(exc)) from exc
        except Exception as exc:
            if self.translate is not None:
                raise DistNetworkError(str(self.translate(exc))) from exc
            raise DistNetworkError(f"the store at {self.endpoint} failed: {type(exc).__name__}") from exc

    def _wait_for(self, keys: Sequence[str], timeout: Optional[timedelta]) -> List[bytes]:
        wire = [self._key(k) for k in keys]
        seconds = _seconds(timeout, self.timeout)
        deadline = time.monotonic() + seconds
        attempt = 0
        with self._errors():
            while True:
                values, marker = self._read(wire)
                missing = [k for k, v in zip(wire, values) if v is None]
                if not missing:
                    return [v for v in values if v is not None]
                if time.monotonic() >= deadline:
                    names = ", ".join(k for k, v in zip(keys, values) if v is None)
                    raise DistStoreError(f"wait timeout after {int(seconds * 1000)}ms, keys: {names}")
                self._block(missing[0], marker, deadline, attempt)
                attempt += 1

    # -- torch's Store API ------------------------------------------------------------
    def get(self, key: str) -> bytes:
        """The value of ``key``, waiting up to the store timeout for it to be set."""
        return self._wait_for([key], None)[0]

    def multi_get(self, keys: List[str]) -> List[bytes]:
        """The values of ``keys``, waiting for all of them as ``get`` does."""
        return self._wait_for(keys, None) if keys else []

    def wait(self, keys: List[str], timeout: Optional[timedelta] = None) -> None:
        """Block until all ``keys`` exist (store timeout unless ``timeout`` is given)."""
        self._wait_for(keys, timeout)

    def check(self, keys: List[str]) -> bool:
        """True if every key exists now (never waits)."""
        with self._errors():
            values, _ = self._read([self._key(k) for k in keys])
        return all(v is not None for v in values)

    # torch's trampoline calls these two by their C++ names.
    def deleteKey(self, key: str) -> bool:  # noqa: N802
        return self.delete_key(key)

    def getNumKeys(self) -> int:  # noqa: N802
        return self.num_keys()


# -- Redis -------------------------------------------------------------------------------
# Keys are plain strings with a TTL; the scripts keep every read-modify-write atomic.

_COMPARE_SET = """
local current = redis.call('GET', KEYS[1])
if current == false then
  if ARGV[1] ~= '' then return ARGV[1] end
elseif current ~= ARGV[1] then
  return current
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return ARGV[2]
"""

_ADD = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return total
"""

_APPEND = """
local size = redis.call('APPEND', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return size
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(_ServerStore):
    """A torch ``Store`` on Redis: keys ``torch.rendezvous.<run_id>.store/<key>`` with a TTL.

    ``client`` is a redis-py client (plain, Sentinel master or Cluster); blocking
    reads poll with a short backoff, which works on every deployment.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        ttl: int = DEFAULT_TTL,
        timeout: Optional[timedelta] = None,
        endpoint: str = "redis",
        prefix: Optional[str] = None,
        translate: Optional[Translator] = None,
    ) -> None:
        super().__init__(redis_store_prefix(run_id) if prefix is None else prefix, timeout, endpoint, translate)
        self.client = client
        self.run_id = run_id
        self.ttl = int(ttl)
        self._scripts: Dict[str, Any] = {}

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def _read(self, keys: Sequence[bytes]) -> "tuple[List[Optional[bytes]], Any]":
        if len(keys) == 1:
            return [self.client.get(keys[0])], None
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(pipe.execute()), None

    def _block(self, key: bytes, marker: Any, deadline: float, attempt: int) -> None:
        pause = min(_POLL_MAX, _POLL_FIRST * (2 ** min(attempt, 10)))
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))

    def set(self, key: str, value: Data) -> None:
        with self._errors():
            self.client.set(self._key(key), _to_bytes(value), ex=self.ttl or None)

    def multi_set(self, keys: List[str], values: List[Data]) -> None:
        if len(keys) != len(values):
            raise ValueError("multi_set needs as many values as keys")
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for key, value in zip(keys, values):
                pipe.set(self._key(key), _to_bytes(value), ex=self.ttl or None)
            pipe.execute()

    def compare_set(self, key: str, expected_value: Data, desired_value: Data) -> bytes:
        with self._errors():
            answer = self._script(_COMPARE_SET)(
                keys=[self._key(key)], args=[_to_bytes(expected_value), _to_bytes(desired_value), self.ttl]
            )
        return _to_bytes(answer)

    def add(self, key: str, value: int) -> int:
        with self._errors():
            return int(self._script(_ADD)(keys=[self._key(key)], args=[int(value), self.ttl]))

    def append(self, key: str, value: Data) -> None:
        with self._errors():
            self._script(_APPEND)(keys=[self._key(key)], args=[_to_bytes(value), self.ttl])

    def delete_key(self, key: str) -> bool:
        with self._errors():
            return int(self.client.delete(self._key(key))) > 0

    def num_keys(self) -> int:
        """How many keys the run's store holds (a SCAN of its prefix)."""
        with self._errors():
            return sum(1 for _ in self.client.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000))

    def clone(self) -> "RedisStore":
        return RedisStore(self.client, self.run_id, self.ttl, self.timeout, self.endpoint, self.prefix, self.translate)


# -- etcd v3 -------------------------------------------------------------------------------
# Through the v3 JSON gateway client of rdzvctl's etcd backends: keys and values
# travel base64-encoded; every write carries the store's lease.

_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text or "")


class EtcdV3Store(_ServerStore):
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
        return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}

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
        return {"request_range": {"key": _b64(key)}}

    @staticmethod
    def _first_value(response: Dict[str, Any]) -> Optional[bytes]:
        kvs = response.get("response_range", response).get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None

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
            time.sleep(min(_POLL_MAX, max(0.0, deadline - time.monotonic())))  # never spin

    # -- torch's Store API ------------------------------------------------------------------
    def set(self, key: str, value: Data) -> None:
        with self._errors():
            self._put([(self._key(key), _to_bytes(value))])

    def multi_set(self, keys: List[str], values: List[Data]) -> None:
        if len(keys) != len(values):
            raise ValueError("multi_set needs as many values as keys")
        with self._errors():
            self._put([(self._key(k), _to_bytes(v)) for k, v in zip(keys, values)])

    def compare_set(self, key: str, expected_value: Data, desired_value: Data) -> bytes:
        wire = self._key(key)
        expected, desired = _to_bytes(expected_value), _to_bytes(desired_value)
        put = [self._put_op(wire, desired, 0)]
        read = [self._range_op(wire)]
        with self._errors():
            if not expected:
                created = {"key": _b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                answer = self._txn([created], put, read)
                if answer.get("succeeded"):
                    return desired
                current = self._first_value(answer["responses"][0])
                if current:
                    return current
            same = {"key": _b64(wire), "target": "VALUE", "result": "EQUAL", "value": _b64(expected)}
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
                    current = _unb64(kvs[0].get("value", ""))
                    try:
                        total = int(current or b"0") + int(value)
                    except ValueError:
                        raise ValueError(f"store key {key!r} does not hold an integer") from None
                    guard = {"key": _b64(wire), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(kvs[0]["mod_revision"])}
                else:
                    total = int(value)
                    guard = {"key": _b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                if self._txn([guard], [self._put_op(wire, str(total).encode(), 0)], []).get("succeeded"):
                    return total

    def append(self, key: str, value: Data) -> None:
        wire = self._key(key)
        with self._errors():
            while True:
                kvs = self.gateway.range(wire).get("kvs") or []
                if kvs:
                    new = _unb64(kvs[0].get("value", "")) + _to_bytes(value)
                    guard = {"key": _b64(wire), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(kvs[0]["mod_revision"])}
                else:
                    new = _to_bytes(value)
                    guard = {"key": _b64(wire), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                if self._txn([guard], [self._put_op(wire, new, 0)], []).get("succeeded"):
                    return

    def delete_key(self, key: str) -> bool:
        with self._errors():
            answer = self.gateway.call("kv/deleterange", {"key": _b64(self._key(key))})
        return int(answer.get("deleted", 0)) > 0

    def num_keys(self) -> int:
        """How many keys the run's store holds (one counting range over its prefix)."""
        from rdzvctl.backends.etcd_gateway import prefix_range_end

        prefix = self.prefix.encode()
        with self._errors():
            answer = self.gateway.range(prefix, prefix_range_end(prefix), count_only=True)
        return int(answer.get("count", 0))

    def clone(self) -> "EtcdV3Store":
        twin = EtcdV3Store(self.gateway, self.run_id, self.ttl, self.timeout, self.endpoint, self.prefix)
        twin._lease, twin._lease_renewed = self._lease, self._lease_renewed
        return twin
