"""The Redis endpoint and ``--rdzv-conf`` options, parsed into :class:`RedisSettings`.

Endpoints: ``host[:port]``, ``redis://[user:password@]host[:port][/db]``,
``rediss://...`` (TLS), ``unix:///path/to/redis.sock[?db=N]``; with
``sentinel_master=<name>`` a list of sentinels ``h1:26379,h2:26379``; with
``cluster=true`` one or more cluster nodes.  URLs are read by redis-py's own
``redis.connection.parse_url`` (user, password, host, port, socket path); a
URL's query arguments count as ``--rdzv-conf`` options.  Nothing is contacted
here; TLS files are checked and loaded once so a bad file is a config error.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import SplitResult, parse_qs, urlsplit

from rdzvctl.backends.base import Address
from rdzvctl.backends.endpoints import EndpointSyntaxError, split_host_port
from rdzvctl.backends.redis.history import DEFAULT_HISTORY, MAX_HISTORY
from rdzvctl.backends.redis.layout import DEFAULT_KEY_PREFIX, DEFAULT_TTL
from rdzvctl.backends.tls import check_tls_files, client_context
from rdzvctl.errors import BackendConfigError

__all__ = ["RedisSettings", "parse_settings", "DEFAULT_PORT", "DEFAULT_SENTINEL_PORT", "TLS_FILE_OPTIONS"]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {"none", "optional", "required"}


@dataclass
class RedisSettings:
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
    history: int = DEFAULT_HISTORY
    secrets: Tuple[str, ...] = ()


@dataclass
class _Target:
    """Where the endpoint points: socket path or nodes, plus what the URL said."""

    nodes: List[Tuple[str, int]] = field(default_factory=list)
    unix_path: str = ""
    tls: bool = False
    db: Optional[int] = None
    display: str = ""


def _mask_url(parts: SplitResult, has_password: bool, username: str) -> str:
    """The URL without its query and with any password shown as ``***``."""
    netloc = parts.netloc.rpartition("@")[2]
    if has_password or username:
        netloc = f"{username}{':***' if has_password else ''}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _split_url(endpoint: str, conf: Dict[str, str]) -> Tuple[SplitResult, Dict[str, Any]]:
    """The URL's parts and redis-py's reading of it (``parse_url``); its query goes into ``conf``."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BackendConfigError(
            f"redis endpoint: unsupported scheme {parts.scheme!r} (use redis://, rediss:// or unix://)"
        )
    for name, values in parse_qs(parts.query).items():
        conf.setdefault(name, values[-1])
    from redis.connection import parse_url

    try:
        url = parse_url(endpoint.partition("?")[0])
    except ValueError:  # the only check left without a query: the port
        raise BackendConfigError(f"redis endpoint {_mask_url(parts, False, '')!r}: bad port") from None
    return parts, url


def _url_target(parts: SplitResult, url: Mapping[str, Any], mode: str, read_db: bool) -> _Target:
    """The URL's target; its path is the db number unless ``read_db`` is off (a ``db`` option wins)."""
    if mode == "sentinel":
        raise BackendConfigError("redis: with sentinel_master the endpoint lists sentinels as host:port,host:port")
    if parts.scheme == "unix":
        if not url.get("path"):
            raise BackendConfigError(f"redis endpoint {parts.scheme}://: no socket path")
        if mode == "cluster":
            raise BackendConfigError("redis: a unix socket cannot address a cluster")
        return _Target(unix_path=url["path"])
    if not url.get("host"):
        raise BackendConfigError(f"redis endpoint {_mask_url(parts, False, '')!r}: no host")
    target = _Target(nodes=[(url["host"], url.get("port") or DEFAULT_PORT)], tls=parts.scheme == "rediss")
    path = parts.path.strip("/")
    if read_db and path:
        try:
            target.db = int(path)
        except ValueError:
            raise BackendConfigError(f"redis endpoint: the path {path!r} is not a db number") from None
    return target


def _node(item: str, default_port: int, endpoint: str) -> Tuple[str, int]:
    try:
        return split_host_port(item, default_port)
    except EndpointSyntaxError as exc:
        if exc.problem in ("port", "range"):
            raise BackendConfigError(f"redis endpoint {endpoint!r}: bad port {item.rpartition(':')[2]!r}") from None
        raise BackendConfigError(f"redis endpoint {endpoint!r}: expected host:port, got {item.strip()!r}") from None


def _list_target(endpoint: str, mode: str) -> _Target:
    default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
    items = [item for item in (endpoint or "127.0.0.1").split(",") if item.strip()]
    nodes = [_node(item, default_port, endpoint) for item in items]
    if len(nodes) > 1 and mode == "single":
        raise BackendConfigError(
            f"redis endpoint {endpoint!r} names several servers: set sentinel_master=<name> "
            "for sentinels or cluster=true for cluster nodes"
        )
    return _Target(nodes=nodes)


def parse_settings(address: Address) -> RedisSettings:
    """Validate the endpoint and options; nothing is contacted here."""
    conf: Dict[str, str] = dict(address.conf)
    endpoint = address.endpoint.strip()
    is_url = "://" in endpoint
    url: Mapping[str, Any] = {}
    if is_url:
        parts, url = _split_url(endpoint, conf)
    options = Address(address.backend, address.endpoint, address.run_id, conf, address.timeout)

    username = options.get("username") or url.get("username")
    password = options.get("password") or url.get("password") or os.environ.get("REDIS_PASSWORD") or None
    cluster = bool(options.get_bool("cluster", False))
    sentinel_master = options.get("sentinel_master") or ""
    if cluster and sentinel_master:
        raise BackendConfigError("redis: cluster=true and sentinel_master cannot be combined")
    ttl = options.get_int("ttl", DEFAULT_TTL)
    history = options.get_int("history", DEFAULT_HISTORY, minimum=0, maximum=MAX_HISTORY)
    db = options.get_int("db", None)
    tls_files = {name: options.get(name) for name in TLS_FILE_OPTIONS}
    mode = "cluster" if cluster else "sentinel" if sentinel_master else "single"

    target = _url_target(parts, url, mode, db is None) if is_url else _list_target(endpoint, mode)
    use_tls = bool(options.get_bool("ssl", False)) or any(tls_files.values()) or target.tls
    if db is None:
        db = target.db
    if is_url:
        display = _mask_url(parts, bool(password), username or "")
    else:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in target.nodes)
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

    connection: Dict[str, Any] = {"socket_timeout": address.timeout, "socket_connect_timeout": address.timeout}
    if target.unix_path:
        connection["unix_socket_path"] = target.unix_path
    if mode != "cluster":
        connection["db"] = db
    if username:
        connection["username"] = username
    if password:
        connection["password"] = password
    if use_tls:
        if target.unix_path:
            raise BackendConfigError("redis: TLS options do not apply to a unix socket")
        connection.update(_tls_options(options, tls_files))

    sentinel_auth: Dict[str, Any] = {}
    if options.get("sentinel_username"):
        sentinel_auth["username"] = options.get("sentinel_username")
    if options.get("sentinel_password"):
        sentinel_auth["password"] = options.get("sentinel_password")

    key_prefix = options.get("key_prefix", DEFAULT_KEY_PREFIX)
    secrets = tuple(s for s in (password, options.get("sentinel_password"), options.get("ssl_password")) if s)
    return RedisSettings(
        mode=mode,
        display=display,
        connection=connection,
        nodes=target.nodes,
        sentinel_master=sentinel_master,
        sentinel_auth=sentinel_auth,
        key_prefix=DEFAULT_KEY_PREFIX if key_prefix is None else key_prefix,
        ttl=max(0, ttl if ttl is not None else DEFAULT_TTL),
        db=db,
        history=DEFAULT_HISTORY if history is None else history,
        secrets=secrets,
    )


def _tls_options(options: Address, files: Mapping[str, Optional[str]]) -> Dict[str, Any]:
    """redis-py's ``ssl_*`` arguments, after checking that the files exist and load."""
    check_tls_files(files, "ssl_certfile", "ssl_keyfile")
    cert_reqs = (options.get("ssl_cert_reqs") or "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise BackendConfigError(f"--rdzv-conf ssl_cert_reqs: expected none, optional or required, got {cert_reqs!r}")
    key_password = options.get("ssl_password") or ""
    if files["ssl_ca_certs"]:
        try:
            client_context(ca_file=files["ssl_ca_certs"])
        except (ssl.SSLError, OSError) as exc:
            raise BackendConfigError(
                f"--rdzv-conf ssl_ca_certs: cannot load {files['ssl_ca_certs']}: {exc}"
            ) from exc
    if files["ssl_certfile"]:
        try:
            client_context(cert_file=files["ssl_certfile"], key_file=files["ssl_keyfile"], key_password=key_password)
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
