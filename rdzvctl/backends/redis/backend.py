"""The Redis backend class: connection, torch's contract and the capabilities.

The layout, the Lua scripts and the hash decoding are in :mod:`.layout`, the
endpoint and options in :mod:`.settings`, the error mapping in :mod:`.errors`
and the watch in :mod:`.watch`.  redis-py is imported only when a server is
first contacted (or a URL endpoint is parsed).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, ContextManager, Dict, FrozenSet, Generator, Iterator, List, Optional, Tuple

from rdzvctl.backends.base import (
    Address,
    HistoryWindow,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
)
from rdzvctl.backends.redis.errors import redis_errors, translate_error
from rdzvctl.backends.redis.history import history_key, read_history, semantic_digest
from rdzvctl.backends.redis.layout import (
    CLEAR_SCRIPT,
    LIST_BATCH,
    SET_SCRIPT,
    counter_key,
    decode_hash,
    glob_escape,
    token_argument,
)
from rdzvctl.backends.redis.settings import parse_settings
from rdzvctl.backends.redis.watch import keyspace_changes, notifications_enabled
from rdzvctl.errors import BackendConfigError, RdzvctlError, StateCorruptError
from rdzvctl.state.codec import encode_base64
from rdzvctl.state.store_keys import store_keys_by_round

__all__ = ["RedisBackend"]


def _side_key(name: str) -> bool:
    """True if ``name`` is the version counter or history list of a state key (a prefix with a ``{tag}``
    puts them under the prefix too)."""
    base, sep, suffix = name.rpartition(":")
    return bool(sep) and ((suffix == "version" and counter_key(base) == name)
                          or (suffix == "history" and history_key(base) == name))


class RedisBackend(RendezvousBackend):
    """Strictly fenced: the token is the run's version number, bumped by every write."""

    name = "redis"
    summary = "Redis hash per run, fenced by a Lua script (TLS, ACL, Sentinel, Cluster)"
    requires = ("redis",)
    install_hint = "redis"
    capabilities = frozenset({"clear", "list_runs", "native_watch", "store_keys", "history"})
    conf_keys = frozenset({"username", "password", "db", "ttl", "history", "key_prefix", "cluster", "sentinel_master",
                           "sentinel_username", "sentinel_password", "ssl", "ssl_ca_certs", "ssl_certfile",
                           "ssl_keyfile", "ssl_password", "ssl_cert_reqs", "ssl_check_hostname"})
    strict_fencing = True

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        self.settings = parse_settings(address)
        self.key = self.settings.key_prefix + address.run_id
        counter = counter_key(self.key)
        if counter is None:
            if self.settings.mode == "cluster":
                raise BackendConfigError(
                    f"redis: the key {self.key!r} contains '}}', which cannot be hash-tagged on a cluster"
                )
            counter = self.key + ":version"
        self.counter_key = counter
        self.history_key = history_key(self.key)
        self._lock = threading.Lock()
        self._client_obj: Any = None
        self._scripts: Dict[str, Any] = {}

    # -- connection -------------------------------------------------------------
    def errors(self) -> ContextManager[None]:
        """The context every redis-py call runs in: its exceptions leave as rdzvctl errors."""
        return redis_errors(self.describe(), self.address.timeout, self.settings.secrets)

    def translate_error(self, exc: BaseException) -> RdzvctlError:
        """The rdzvctl error for a redis-py exception raised on this backend's server (see :mod:`.errors`)."""
        return translate_error(exc, self.describe(), self.address.timeout, self.settings.secrets)

    @property
    def ttl(self) -> int:
        """Seconds every write keeps the run's keys (0: never expire)."""
        return self.settings.ttl

    def _no_retry(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return Retry(NoBackoff(), 0)

    @property
    def client(self) -> Any:
        """The redis-py client, made on first use (this is where redis is imported)."""
        with self._lock:
            if self._client_obj is None:
                with self.errors():
                    self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        import redis

        s = self.settings
        kwargs = dict(s.connection, retry=self._no_retry())
        if s.mode == "single":
            if "unix_socket_path" not in kwargs:
                kwargs["host"], kwargs["port"] = s.nodes[0]
            return redis.Redis(**kwargs)
        if s.mode == "sentinel":
            from redis.sentinel import Sentinel

            sentinel_kwargs = {
                key: value
                for key, value in kwargs.items()
                if key.startswith("socket_") or key.startswith("ssl") or key == "retry"
            }
            sentinel_kwargs.update(s.sentinel_auth)
            sentinel = Sentinel(s.nodes, sentinel_kwargs=sentinel_kwargs, **kwargs)
            return sentinel.master_for(s.sentinel_master)
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in s.nodes],
            **kwargs,
        )

    def _script(self, name: str, source: str) -> Any:
        client = self.client
        with self._lock:
            if name not in self._scripts:
                self._scripts[name] = client.register_script(source)
            return self._scripts[name]

    def close(self) -> None:
        with self._lock:
            client, self._client_obj = self._client_obj, None
            self._scripts.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def describe(self) -> str:
        return self.settings.display

    # -- torch's contract -----------------------------------------------------
    def get_state(self) -> Optional[StateAndToken]:
        with self.errors():
            state, version = self.client.hmget(self.key, ["state", "version"])
        return decode_hash(self.key, state, version)

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        encoded = encode_base64(bytes(state))
        keep = self.settings.history
        digest = semantic_digest(bytes(state)) if keep else ""
        script = self._script("set", SET_SCRIPT)
        with self.errors():
            reply = script(
                keys=[self.key, self.counter_key, self.history_key],
                args=[encoded, token_argument(token), self.settings.ttl, digest, keep],
            )
        if reply[0] == 1:
            return bytes(state), int(reply[1]), True
        if len(reply) < 2:
            return None
        current = decode_hash(self.key, reply[1], reply[2] or None)
        assert current is not None
        return current[0], current[1], False

    # -- capabilities ---------------------------------------------------------
    def clear(self, token: Token) -> bool:
        script = self._script("clear", CLEAR_SCRIPT)
        with self.errors():
            removed = script(
                keys=[self.key, self.counter_key, self.history_key],
                args=[token_argument(token), self.settings.ttl, self.settings.history],
            )
        return removed == 1

    def discard_cleared_run(self) -> None:
        """Delete the run's version counter and history list, which ``clear`` keeps (a new state never
        reuses a token; the history explains the incident) until the run's TTL."""
        with self.errors():
            if not self.client.exists(self.key):
                self.client.delete(self.counter_key, self.history_key)

    def history(self) -> HistoryWindow:
        """The last semantic versions the write script kept (see :mod:`.history`), oldest first."""
        return read_history(self)

    def list_runs(self) -> Iterator[RunEntry]:
        """Every run under the key prefix, sorted by run id: found by SCAN, read by pipelined HMGETs.

        The torchrun store's STRING keys (``<key>.store/...``) are not runs and
        are skipped.  Every other key is a run: a key of another type, a hash
        without a ``state`` or ``version`` field comes with its ``error`` set;
        a state whose base64 is corrupt is yielded undecoded (with its
        version as the token), so the state layer reports it as corrupt and a
        fenced ``clear`` can remove it.
        """
        from redis import exceptions as rx

        prefix = self.settings.key_prefix.encode()
        pattern = glob_escape(self.settings.key_prefix) + "*"
        client = self.client
        cut = len(prefix)
        # SCAN returns keys in hash order (a key may come twice): sort the names only, then
        # read the values a batch at a time, so memory holds one batch of states, not all.
        with self.errors():
            keys = sorted(set(client.scan_iter(match=pattern, count=LIST_BATCH)),
                          key=lambda key: key[cut:].decode("utf-8", "replace"))
        for start in range(0, len(keys), LIST_BATCH):
            batch = keys[start:start + LIST_BATCH]
            with self.errors():
                pipe = client.pipeline(transaction=False)
                for key in batch:
                    pipe.hmget(key, ["state", "version"])
                rows = pipe.execute(raise_on_error=False)
            for key, row in zip(batch, rows):
                name = key.decode("utf-8", "replace")
                run_id = key[cut:].decode("utf-8", "replace")
                if isinstance(row, rx.ResponseError):
                    if b".store/" in key[cut:] or _side_key(name):
                        continue  # a torchrun store key, a version counter or a history list of some run
                    if "WRONGTYPE" not in str(row).upper():
                        raise self.translate_error(row)
                    yield RunEntry(run_id, None, StateCorruptError(
                        f"the Redis key {name!r} is a key of another type where a rendezvous hash belongs"))
                    continue
                if isinstance(row, Exception):
                    raise self.translate_error(row)
                state, version = row
                if state is None:
                    yield RunEntry(run_id, None, StateCorruptError(
                        f"the Redis hash {name!r} has no state field (not a rendezvous hash)"))
                    continue
                try:
                    yield RunEntry(run_id, decode_hash(name, state, version))
                except StateCorruptError as exc:
                    text = (version or b"").decode("ascii", "replace")
                    if text.isdigit():
                        yield RunEntry(run_id, (bytes(state), int(text)))
                    else:
                        yield RunEntry(run_id, None, exc)

    @property
    def store_prefix(self) -> str:
        """Where the torchrun plugin's store keeps the run's store keys (STRING keys)."""
        return self.key + ".store/"

    def _store_key_names(self) -> List[Tuple[int, bytes, bytes]]:
        """``(round, name, key)`` of each per-round key of the run, sorted (SCAN, names only)."""
        text = self.store_prefix + f"torch.rendezvous.{self.run_id}."
        with self.errors():
            return store_keys_by_round(self.client.scan_iter(match=glob_escape(text) + "*", count=LIST_BATCH),
                                       text.encode())

    def store_keys(self) -> Dict[str, bytes]:
        """The run's per-round store keys as ``"<round>/<name>"``, sorted by round then name.

        torch's handler writes them through a ``PrefixStore`` named
        ``torch.rendezvous.<run_id>.<round>``, inside :attr:`store_prefix`.
        """
        found = self._store_key_names()
        client = self.client
        out: Dict[str, bytes] = {}
        with self.errors():
            for start in range(0, len(found), LIST_BATCH):
                batch = found[start:start + LIST_BATCH]
                pipe = client.pipeline(transaction=False)
                for _, _, key in batch:
                    pipe.get(key)
                for (round_, name, _), value in zip(batch, pipe.execute(raise_on_error=False)):
                    if isinstance(value, bytes):
                        out[f"{round_}/{name.decode(errors='replace')}"] = value
        return out

    def store_rounds(self) -> FrozenSet[int]:
        """The rounds with per-round keys, from one SCAN of the key names (no values fetched)."""
        return frozenset(round_ for round_, _, _ in self._store_key_names())

    def server_info(self) -> Dict[str, Any]:
        """Version, role, cluster state and the settings rendezvous depends on (see ``server_info``)."""
        from rdzvctl.backends.server_info import redis_info

        return redis_info(self)

    # -- watch (driven by rdzvctl.backends.watching) ---------------------------------
    def node_client(self) -> Any:
        """A client of the server that owns the key (the cluster node, or the server itself)."""
        client = self.client
        if self.settings.mode == "cluster":
            with self.errors():
                return client.get_redis_connection(client.get_node_from_key(self.key))
        return client

    def notifications_enabled(self) -> bool:
        """True if the server publishes the keyspace events ``watch`` needs (see :mod:`.watch`)."""
        return notifications_enabled(self)

    def watch_wait(self, cursor: Any, stop: threading.Event, interval: float) -> Generator[Any, None, None]:
        """Pushed through keyspace notifications when the server has them on, else polled with backoff."""
        return keyspace_changes(self, stop, interval)
