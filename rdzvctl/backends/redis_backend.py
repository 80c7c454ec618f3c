"""The ``redis`` backend: one Redis hash per run, fenced by a Lua script.

Layout (see ``docs/redis-layout.md`` for a redis-cli walk-through):

* State key ``torch.rendezvous.<run_id>`` (prefix set by ``key_prefix``), a
  HASH with two fields:

  - ``state``: padded standard base64 of ``pickle.dumps(_RendezvousState)``,
    exactly the value torch's c10d and etcd-v2 backends store, so
    ``redis-cli HGET <key> state | base64 -d`` gives the pickle;
  - ``version``: the token, a decimal integer.

* Counter key ``{torch.rendezvous.<run_id>}:version``, a STRING holding the
  last version handed out for the run.  The hash tag puts it in the same
  cluster slot as the state key, and ``clear`` keeps it, so a token from
  before a clear never becomes valid again.

* Store keys of the torchrun plugin's store: STRING keys under
  ``torch.rendezvous.<run_id>.store/`` (:attr:`RedisBackend.store_prefix`);
  torch's handler puts its per-round keys under
  ``torch.rendezvous.<run_id>.<round>/`` inside it.

* Every write runs one Lua script (EVALSHA, EVAL on NOSCRIPT): it compares
  the token with ``version``, and on success stores the new state with
  ``version = max(last version + 1, server time in ms)``.  Versions thus
  increase strictly, also across a clear, and even after the counter
  expired (unless the server clock goes back).  Both keys get the TTL
  (``ttl``, default 7200 s, 0 = never expire) again on every write.

Endpoints: ``host[:port]``, ``redis://[user:password@]host[:port][/db]``,
``rediss://...`` (TLS), ``unix:///path/to/redis.sock[?db=N]``; with
``sentinel_master=<name>`` a list of sentinels ``h1:26379,h2:26379``; with
``cluster=true`` one or more cluster nodes.  Options (``--rdzv-conf``):
``key_prefix``, ``ttl``, ``username``, ``password`` (else the URL's, else
``$REDIS_PASSWORD``), ``db``, ``ssl``, ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs`` (none/optional/required),
``ssl_check_hostname``, ``sentinel_master``, ``sentinel_username``,
``sentinel_password``, ``cluster``.  Other options are ignored: they belong
to torch's rendezvous handler.

``watch`` is pushed through keyspace notifications when the server has them
on (``notify-keyspace-events`` with ``K`` and ``A`` or ``g`` + ``h``), and
polls with backoff otherwise.  redis-py is imported only when a server is
first contacted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from rdzvctl.backends.base import (
    Address,
    RendezvousBackend,
    RunEntry,
    SetResult,
    StateAndToken,
    Token,
    round_of_store_key,
)
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    RdzvctlError,
    StateCorruptError,
)

__all__ = ["RedisBackend", "DEFAULT_KEY_PREFIX", "DEFAULT_TTL", "counter_key"]

DEFAULT_KEY_PREFIX = "torch.rendezvous."
DEFAULT_TTL = 7200
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
LIST_BATCH = 1000
STOP_CHECK = 0.1  # seconds between checks of ``stop`` while waiting for a notification

# KEYS[1] state hash, KEYS[2] version counter;
# ARGV[1] new state (base64), ARGV[2] token ("" = none), ARGV[3] ttl seconds (0 = none).
# Returns {1, version} when written, {0, state, version} when refused, {0} when
# refused and no state exists.
_SET_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'version')
local ok
if cur[1] then
  ok = ARGV[2] ~= '' and ARGV[2] == cur[2]
else
  ok = ARGV[2] == ''
end
if not ok then
  if cur[1] then return {0, cur[1], cur[2] or ''} end
  return {0}
end
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local last = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(cur[2]) or 0)
local version = string.format('%d', math.max(last + 1,
  tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)))
if not cur[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', version)
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('SET', KEYS[2], version, 'EX', ttl)
else
  redis.call('SET', KEYS[2], version)
end
return {1, version}
"""

# Same KEYS; ARGV[1] token, ARGV[2] ttl.  Deletes the hash if the token is
# current and keeps the counter (with a fresh TTL).  Returns 1 if removed.
_CLEAR_SCRIPT = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'version')
if not cur[1] or not cur[2] or ARGV[1] == '' or ARGV[1] ~= cur[2] then return 0 end
redis.call('DEL', KEYS[1])
local last = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(cur[2]) or 0)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[2], string.format('%d', last), 'EX', ttl)
else
  redis.call('SET', KEYS[2], string.format('%d', last))
end
return 1
"""

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_CERT_REQS = {"none", "optional", "required"}


def _hash_tag(key: str) -> Optional[str]:
    """The part of ``key`` Redis Cluster hashes, if the key has a non-empty ``{tag}``."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return None


def counter_key(key: str) -> Optional[str]:
    """The version counter key for state key ``key``, in the same cluster slot.

    ``None`` when no such name exists (a key with a ``}`` but no valid tag).
    """
    if _hash_tag(key) is not None:
        return key + ":version"
    if "}" in key:
        return None
    return "{" + key + "}:version"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass
class _Settings:
    """A parsed endpoint and options; ``connection`` holds redis-py keyword arguments."""

    mode: str  # "single", "sentinel" or "cluster"
    display: str
    connection: Dict[str, Any] = field(default_factory=dict)
    nodes: List[Tuple[str, int]] = field(default_factory=list)
    sentinel_master: str = ""
    sentinel_auth: Dict[str, Any] = field(default_factory=dict)
    key_prefix: str = DEFAULT_KEY_PREFIX
    ttl: int = DEFAULT_TTL
    db: int = 0
    secrets: Tuple[str, ...] = ()


def _split_host_port(item: str, default_port: int, endpoint: str) -> Tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [v6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            host = ""
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not host:
        raise BackendConfigError(f"redis endpoint {endpoint!r}: expected host:port, got {item!r}")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise BackendConfigError(f"redis endpoint {endpoint!r}: bad port {port_text!r}")
    return host, port


def _mask_url(parts: Any, has_password: bool, username: str) -> str:
    """The URL without its query and with any password shown as ``***``."""
    netloc = parts.netloc.rpartition("@")[2]
    if has_password or username:
        netloc = f"{username}{':***' if has_password else ''}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _parse_settings(address: Address) -> _Settings:
    """Validate the endpoint and options; nothing is contacted or imported here."""
    conf: Dict[str, str] = dict(address.conf)
    endpoint = address.endpoint.strip()
    url_options: Dict[str, Any] = {}
    is_url = "://" in endpoint
    if is_url:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise BackendConfigError(
                f"redis endpoint: unsupported scheme {parts.scheme!r} (use redis://, rediss:// or unix://)"
            )
        for name, values in parse_qs(parts.query).items():
            conf.setdefault(name, values[-1])
        if parts.username:
            url_options["username"] = unquote(parts.username)
        if parts.password:
            url_options["password"] = unquote(parts.password)
    options = Address(address.backend, address.endpoint, address.run_id, conf, address.timeout)

    username = options.get("username") or url_options.get("username")
    password = options.get("password") or url_options.get("password") or os.environ.get("REDIS_PASSWORD") or None
    cluster = bool(options.get_bool("cluster", False))
    sentinel_master = options.get("sentinel_master") or ""
    if cluster and sentinel_master:
        raise BackendConfigError("redis: cluster=true and sentinel_master cannot be combined")
    ttl = options.get_int("ttl", DEFAULT_TTL)
    db = options.get_int("db", None)

    tls_files = {name: options.get(name) for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")}
    use_tls = bool(options.get_bool("ssl", False)) or any(tls_files.values())
    connection: Dict[str, Any] = {
        "socket_timeout": address.timeout,
        "socket_connect_timeout": address.timeout,
    }
    nodes: List[Tuple[str, int]] = []
    mode = "cluster" if cluster else "sentinel" if sentinel_master else "single"

    if is_url:
        if mode == "sentinel":
            raise BackendConfigError(
                "redis: with sentinel_master the endpoint lists sentinels as host:port,host:port"
            )
        if parts.scheme == "unix":
            if not parts.path:
                raise BackendConfigError(f"redis endpoint {parts.scheme}://: no socket path")
            if mode == "cluster":
                raise BackendConfigError("redis: a unix socket cannot address a cluster")
            connection["unix_socket_path"] = unquote(parts.path)
        else:
            try:
                host, port = parts.hostname, parts.port or DEFAULT_PORT
            except ValueError:
                raise BackendConfigError(f"redis endpoint {_mask_url(parts, False, '')!r}: bad port") from None
            if not host:
                raise BackendConfigError(f"redis endpoint {_mask_url(parts, False, '')!r}: no host")
            nodes.append((host, port))
            use_tls = use_tls or parts.scheme == "rediss"
            path = parts.path.strip("/")
            if db is None and path:
                try:
                    db = int(path)
                except ValueError:
                    raise BackendConfigError(f"redis endpoint: the path {path!r} is not a db number") from None
        display = _mask_url(parts, bool(password), username or "")
    else:
        default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
        items = [item for item in (endpoint or "127.0.0.1").split(",") if item.strip()]
        nodes = [_split_host_port(item, default_port, endpoint) for item in items]
        if len(nodes) > 1 and mode == "single":
            raise BackendConfigError(
                f"redis endpoint {endpoint!r} names several servers: set sentinel_master=<name> "
                "for sentinels or cluster=true for cluster nodes"
            )
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in nodes)
        auth = f"{username or ''}{':***' if password else ''}@" if (username or password) else ""
        display = f"{'rediss' if use_tls else 'redis'}://{auth}{hosts}"
    db = db or 0
    if db < 0:
        raise BackendConfigError(f"redis: db must be 0 or more, got {db}")
    if mode == "cluster" and db != 0:
        raise BackendConfigError("redis: a Redis Cluster has only db 0")
    if mode != "cluster" and not is_url:
        display += f"/{db}"
    if mode == "sentinel":
        display += f" (sentinel master {sentinel_master})"
    elif mode == "cluster":
        display += " (cluster)"

    if mode != "cluster":
        connection["db"] = db
    if username:
        connection["username"] = username
    if password:
        connection["password"] = password
    if use_tls:
        if "unix_socket_path" in connection:
            raise BackendConfigError("redis: TLS options do not apply to a unix socket")
        connection.update(_tls_options(options, tls_files))

    sentinel_auth: Dict[str, Any] = {}
    if options.get("sentinel_username"):
        sentinel_auth["username"] = options.get("sentinel_username")
    if options.get("sentinel_password"):
        sentinel_auth["password"] = options.get("sentinel_password")

    key_prefix = options.get("key_prefix", DEFAULT_KEY_PREFIX)
    secrets = tuple(s for s in (password, options.get("sentinel_password"), options.get("ssl_password")) if s)
    return _Settings(
        mode=mode,
        display=display,
        connection=connection,
        nodes=nodes,
        sentinel_master=sentinel_master,
        sentinel_auth=sentinel_auth,
        key_prefix=DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix,
        ttl=max(0, ttl if ttl is not None else DEFAULT_TTL),
        db=db,
        secrets=secrets,
    )


def _tls_options(options: Address, files: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """redis-py's ``ssl_*`` arguments, after checking that the files exist and load."""
    import ssl

    for name, path in files.items():
        if path and not os.path.isfile(path):
            raise BackendConfigError(f"--rdzv-conf {name}: no such file: {path}")
    cert_reqs = (options.get("ssl_cert_reqs") or "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise BackendConfigError(f"--rdzv-conf ssl_cert_reqs: expected none, optional or required, got {cert_reqs!r}")
    if files["ssl_keyfile"] and not files["ssl_certfile"]:
        raise BackendConfigError("--rdzv-conf ssl_keyfile needs ssl_certfile")
    key_password = options.get("ssl_password") or ""
    context = ssl.create_default_context()
    try:
        if files["ssl_ca_certs"]:
            context.load_verify_locations(cafile=files["ssl_ca_certs"])
    except (ssl.SSLError, OSError) as exc:
        raise BackendConfigError(f"--rdzv-conf ssl_ca_certs: cannot load {files['ssl_ca_certs']}: {exc}") from exc
    try:
        if files["ssl_certfile"]:
            # A callable password: an encrypted key fails instead of prompting on the terminal.
            context.load_cert_chain(files["ssl_certfile"], files["ssl_keyfile"], password=lambda: key_password)
    except (ssl.SSLError, OSError) as exc:
        raise BackendConfigError(
            f"--rdzv-conf ssl_certfile/ssl_keyfile: cannot load the client certificate: {exc}"
        ) from exc
    return {
        "ssl": True,
        "ssl_ca_certs": files["ssl_ca_certs"],
        "ssl_certfile": files["ssl_certfile"],
        "ssl_keyfile": files["ssl_keyfile"],
        "ssl_password": key_password,
        "ssl_cert_reqs": cert_reqs,
        "ssl_check_hostname": bool(options.get_bool("ssl_check_hostname", cert_reqs == "required")),
    }


def translate_error(exc: BaseException, endpoint: str, timeout: float, secrets: Sequence[str] = ()) -> RdzvctlError:
    """The rdzvctl error for a redis-py (or socket/TLS) exception: the one place they are mapped."""
    from redis import exceptions as rx

    from rdzvctl.text import scrub

    text = scrub(str(exc), secrets).strip().rstrip(".") or type(exc).__name__
    upper = text.upper()
    where = f"Redis at {endpoint}"
    if isinstance(exc, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)) or upper.startswith(
        ("NOAUTH", "WRONGPASS", "INVALID USERNAME-PASSWORD")
    ):
        # Never echo the server's text here: it is about the credentials.
        return BackendUnavailableError(f"{where} refused the credentials (authentication failed)")
    if isinstance(exc, (rx.AuthorizationError, rx.NoPermissionError)) or upper.startswith("NOPERM"):
        return BackendUnavailableError(f"{where} denied a command to this user: {text}")
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):
        return BackendTimeoutError(f"{where} did not answer within {timeout:g} s")
    if "WRONGTYPE" in upper:
        return StateCorruptError(f"{where} holds a key of another type where a rendezvous hash belongs")
    if isinstance(exc, rx.DataError):
        return BackendConfigError(f"{where}: invalid request: {text}")
    if isinstance(exc, rx.ReadOnlyError):
        return BackendUnavailableError(f"{where} is a read-only replica: {text}")
    if "CROSSSLOT" in upper or "SAME KEY SLOT" in upper:
        return BackendConfigError(f"{where}: the keys of one run fall in different cluster slots: {text}")
    if isinstance(exc, rx.ResponseError):
        return BackendUnavailableError(f"{where} answered with an error: {text}")
    if isinstance(exc, (rx.RedisError, rx.RedisClusterException)):
        return BackendUnavailableError(f"cannot reach {where}: {text}")
    if isinstance(exc, OSError):
        return BackendUnavailableError(f"cannot reach {where}: {text}")
    return BackendUnavailableError(f"unexpected error talking to {where}: {type(exc).__name__}: {text}")


def _decode(key: str, state: Optional[bytes], version: Optional[bytes]) -> Optional[StateAndToken]:
    """Turn the hash fields into ``(state bytes, token)``; ``None`` when there is no state."""
    if state is None:
        return None
    if not version:
        raise StateCorruptError(f"the Redis hash {key!r} has a state but no version field")
    try:
        token = int(version)
    except ValueError:
        raise StateCorruptError(f"the Redis hash {key!r} has a non-integer version {version[:40]!r}") from None
    try:
        return base64.b64decode(state, validate=True), token
    except (binascii.Error, ValueError) as exc:
        raise StateCorruptError(f"the state in the Redis hash {key!r} is not valid base64: {exc}") from exc


def _token_argument(token: Token) -> str:
    """The token as the script compares it: "" for none, a value no version equals if invalid."""
    if token is None:
        return ""
    if type(token) is int:  # bool is an int subclass: True must not pass for version 1
        return str(token)
    return "-"


class RedisBackend(RendezvousBackend):
    """Strictly fenced: the token is the run's version number, bumped by every write."""

    name = "redis"
    summary = "Redis hash per run, fenced by a Lua script (TLS, ACL, Sentinel, Cluster)"
    requires = ("redis",)
    install_hint = "redis"
    capabilities = frozenset({"clear", "list_runs", "native_watch", "store_keys"})
    conf_keys = frozenset({"username", "password", "db", "ttl", "key_prefix", "cluster", "sentinel_master",
                           "sentinel_username", "sentinel_password", "ssl", "ssl_ca_certs", "ssl_certfile",
                           "ssl_keyfile", "ssl_password", "ssl_cert_reqs", "ssl_check_hostname"})
    strict_fencing = True

    def __init__(self, address: Address) -> None:
        super().__init__(address)
        self.settings = _parse_settings(address)
        self.key = self.settings.key_prefix + address.run_id
        counter = counter_key(self.key)
        if counter is None:
            if self.settings.mode == "cluster":
                raise BackendConfigError(
                    f"redis: the key {self.key!r} contains '}}', which cannot be hash-tagged on a cluster"
                )
            counter = self.key + ":version"
        self.counter_key = counter
        self._lock = threading.Lock()
        self._client_obj: Any = None
        self._scripts: Dict[str, Any] = {}

    # -- connection -------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from redis import exceptions as rx

        try:
            yield
        except RdzvctlError:
            raise
        except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
            raise translate_error(exc, self.describe(), self.address.timeout, self.settings.secrets) from exc

    def _no_retry(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return Retry(NoBackoff(), 0)

    @property
    def client(self) -> Any:
        """The redis-py client, made on first use (this is where redis is imported)."""
        with self._lock:
            if self._client_obj is None:
                with self._errors():
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
        with self._errors():
            state, version = self.client.hmget(self.key, ["state", "version"])
        return _decode(self.key, state, version)

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        encoded = base64.b64encode(bytes(state))
        script = self._script("set", _SET_SCRIPT)
        with self._errors():
            reply = script(
                keys=[self.key, self.counter_key],
                args=[encoded, _token_argument(token), self.settings.ttl],
            )
        if reply[0] == 1:
            return bytes(state), int(reply[1]), True
        if len(reply) < 2:
            return None
        current = _decode(self.key, reply[1], reply[2] or None)
        assert current is not None
        return current[0], current[1], False

    # -- capabilities ---------------------------------------------------------
    def clear(self, token: Token) -> bool:
        script = self._script("clear", _CLEAR_SCRIPT)
        with self._errors():
            removed = script(
                keys=[self.key, self.counter_key],
                args=[_token_argument(token), self.settings.ttl],
            )
        return removed == 1

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
        pattern = _glob_escape(self.settings.key_prefix) + "*"
        client = self.client
        keys = iter(())
        entries: List[RunEntry] = []
        with self._errors():
            keys = client.scan_iter(match=pattern, count=LIST_BATCH)
        while True:
            with self._errors():
                batch = [key for _, key in zip(range(LIST_BATCH), keys)]
                if not batch:
                    break
                pipe = client.pipeline(transaction=False)
                for key in batch:
                    pipe.hmget(key, ["state", "version"])
                rows = pipe.execute(raise_on_error=False)
            for key, row in zip(batch, rows):
                name = key.decode("utf-8", "replace")
                run_id = key[len(prefix):].decode("utf-8", "replace")
                if isinstance(row, rx.ResponseError):
                    if b".store/" in key[len(prefix):]:
                        continue  # a torchrun store key of some run
                    if "WRONGTYPE" not in str(row).upper():
                        raise translate_error(row, self.describe(), self.address.timeout, self.settings.secrets)
                    entries.append(RunEntry(run_id, None, StateCorruptError(
                        f"the Redis key {name!r} is a key of another type where a rendezvous hash belongs")))
                    continue
                if isinstance(row, Exception):
                    raise translate_error(row, self.describe(), self.address.timeout, self.settings.secrets)
                state, version = row
                if state is None:
                    entries.append(RunEntry(run_id, None, StateCorruptError(
                        f"the Redis hash {name!r} has no state field (not a rendezvous hash)")))
                    continue
                try:
                    entries.append(RunEntry(run_id, _decode(name, state, version)))
                except StateCorruptError as exc:
                    text = (version or b"").decode("ascii", "replace")
                    if text.isdigit():
                        entries.append(RunEntry(run_id, (bytes(state), int(text))))
                    else:
                        entries.append(RunEntry(run_id, None, exc))
        entries.sort(key=lambda entry: entry.run_id)
        yield from entries

    @property
    def store_prefix(self) -> str:
        """Where the torchrun plugin's store keeps the run's store keys (STRING keys)."""
        return self.key + ".store/"

    def _store_key_names(self) -> List[Tuple[int, bytes, bytes]]:
        """``(round, name, key)`` of each per-round key of the run, sorted (SCAN, names only)."""
        text = self.store_prefix + f"torch.rendezvous.{self.run_id}."
        prefix = text.encode()
        found: List[Tuple[int, bytes, bytes]] = []
        with self._errors():
            for key in self.client.scan_iter(match=_glob_escape(text) + "*", count=LIST_BATCH):
                parsed = round_of_store_key(key, prefix)
                if parsed is not None:
                    found.append((parsed[0], parsed[1], key))
        found.sort()
        return found

    def store_keys(self) -> Dict[str, bytes]:
        """The run's per-round store keys as ``"<round>/<name>"``, sorted by round then name.

        torch's handler writes them through a ``PrefixStore`` named
        ``torch.rendezvous.<run_id>.<round>``, inside :attr:`store_prefix`.
        """
        found = self._store_key_names()
        client = self.client
        out: Dict[str, bytes] = {}
        with self._errors():
            for start in range(0, len(found), LIST_BATCH):
                batch = found[start:start + LIST_BATCH]
                pipe = client.pipeline(transaction=False)
                for _, _, key in batch:
                    pipe.get(key)
                for (round_, name, _), value in zip(batch, pipe.execute(raise_on_error=False)):
                    if isinstance(value, bytes):
                        out[f"{round_}/{name.decode(errors='replace')}"] = value
        return out

    def server_info(self) -> Dict[str, Any]:
        """Version, role, cluster state and the settings rendezvous depends on (see ``server_info``)."""
        from rdzvctl.backends.server_info import redis_info

        return redis_info(self)

    def store_rounds(self) -> FrozenSet[int]:
        """The rounds with per-round keys, from one SCAN of the key names (no values fetched)."""
        return frozenset(round_ for round_, _, _ in self._store_key_names())

    # -- watch ----------------------------------------------------------------
    def _node_client(self) -> Any:
        """A client of the server that owns the key (the cluster node, or the server itself)."""
        client = self.client
        if self.settings.mode == "cluster":
            with self._errors():
                return client.get_redis_connection(client.get_node_from_key(self.key))
        return client

    def notifications_enabled(self) -> bool:
        """True if the server publishes the keyspace events ``watch`` needs.

        Needs ``K`` plus ``A`` (or both ``g`` and ``h``) in ``notify-keyspace-events``;
        a server that forbids or renamed CONFIG counts as off.
        """
        from redis import exceptions as rx

        node = self._node_client()
        with self._errors():
            try:
                reply = node.config_get("notify-keyspace-events")
            except rx.ResponseError:
                return False
        raw = reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b""))
        flags = raw.decode() if isinstance(raw, bytes) else str(raw)
        return "K" in flags and ("A" in flags or ("g" in flags and "h" in flags))

    def watch(
        self,
        interval: float = 1.0,
        stop: Optional[threading.Event] = None,
        since: Optional[StateAndToken] = None,
    ) -> Iterator[Optional[StateAndToken]]:
        """Yield the current state, then each change: pushed by keyspace events, else polled.

        A notification only triggers a fresh ``get_state``; the state is
        also re-read every few seconds in case a notification was lost.  An
        outage (a restarted server, a failover) is ridden out for up to
        ``address.timeout`` seconds: the watch reconnects, re-subscribes and
        re-reads, so the first state after it is reported once.  Redis keeps
        no history, so intermediate states written during the outage are not
        replayed.  A longer outage raises.
        """
        stop = stop or threading.Event()
        # [first item still owed, last token seen, monotonic time of the last good read],
        # shared by the attempts below so a reconnect neither repeats nor skips a state.
        seen: List[Any] = [since is None, object() if since is None else since[1], 0.0]
        outage: Optional[float] = None
        while not stop.is_set():
            try:
                if self.notifications_enabled():
                    yield from self._watch_notified(interval, stop, seen)
                else:
                    yield from self._watch_polled(interval, stop, seen)
                return
            except BackendTimeoutError:
                raise  # a silent server already used the whole timeout
            except BackendUnavailableError:
                now = time.monotonic()
                if outage is None or seen[2] > outage:  # a new outage: reads worked since the last one
                    outage = now
                if now - outage >= self.address.timeout:
                    raise
                stop.wait(min(0.2, self.address.timeout))

    def _changed(self, seen: List[Any]) -> Tuple[bool, Optional[StateAndToken]]:
        """Read the state; whether it is new to the watcher (updates ``seen``)."""
        current = self.get_state()
        seen[2] = time.monotonic()
        token = None if current is None else current[1]
        if seen[0] or token != seen[1]:
            seen[0], seen[1] = False, token
            return True, current
        return False, current

    def _watch_polled(
        self, interval: float, stop: threading.Event, seen: List[Any]
    ) -> Iterator[Optional[StateAndToken]]:
        cap = max(interval, min(interval * 8, 5.0))
        delay = interval
        while not stop.is_set():
            changed, current = self._changed(seen)
            if changed:
                delay = interval
                yield current
            else:
                delay = min(delay * 1.5, cap)
            stop.wait(delay)

    def _watch_notified(
        self, interval: float, stop: threading.Event, seen: List[Any]
    ) -> Iterator[Optional[StateAndToken]]:
        channel = f"__keyspace@{self.settings.db}__:{self.key}"
        resync = max(interval, 5.0)
        pubsub = self._node_client().pubsub(ignore_subscribe_messages=True)
        try:
            with self._errors():
                pubsub.subscribe(channel)
            while not stop.is_set():
                # Subscribed before this read, so no change between read and wait is missed.
                changed, current = self._changed(seen)
                if changed:
                    yield current
                deadline = time.monotonic() + resync
                while not stop.is_set() and time.monotonic() < deadline:
                    with self._errors():
                        message = pubsub.get_message(timeout=STOP_CHECK)
                        if message is not None:
                            while pubsub.get_message(timeout=0) is not None:
                                pass  # one re-read covers a burst (hset + expire)
                    if message is not None:
                        break
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
