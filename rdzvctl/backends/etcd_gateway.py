"""HTTP plumbing of the etcd backends: endpoints, TLS, failover, and the v3 JSON gateway.

Both etcd APIs rdzvctl speaks are plain HTTP/1.1 + JSON: the v2 keys API and
the v3 gRPC-gateway (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/watch``, ...).
:class:`EtcdHttp` keeps a few keep-alive connections per member, fails over to
the next member when one is refused, times out or answers 5xx, and turns
every socket, TLS and HTTP failure into one :mod:`rdzvctl.errors` error that
names the endpoint.  :class:`EtcdGateway` adds the v3 calls, the auth token
and the watch stream on top.  Only the standard library is used, so importing
it is cheap and it works next to any protobuf (see docs/etcd-client-choice.md).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
)

__all__ = [
    "Endpoint",
    "HttpAnswer",
    "EtcdHttp",
    "EtcdGateway",
    "parse_endpoints",
    "split_credentials",
    "make_ssl_context",
    "b64",
    "unb64",
    "prefix_range_end",
]

DEFAULT_PORT = 2379
#: A watch connection idle this long is re-opened (and resumed) to notice dead members.
WATCH_IDLE_SECONDS = 60.0


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class HttpAnswer:
    """A complete HTTP answer and the member that gave it."""

    endpoint: Endpoint
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self, api: str) -> Any:
        """The body as JSON; a non-JSON body means the server is not etcd."""
        try:
            return json.loads(self.body)
        except ValueError:
            ctype = self.headers.get("content-type", "no content type").split(";")[0]
            raise BackendUnavailableError(
                f"{self.endpoint} did not answer like {api} (HTTP {self.status}, {ctype}): wrong "
                "endpoint or protocol?"
            ) from None


def split_credentials(text: str) -> Tuple[str, Optional[str], Optional[str]]:
    """Take ``user:password@`` out of ``http://user:password@host:2379`` endpoints.

    Returns the endpoints without userinfo and the (URL-decoded) user and
    password they named, ``None`` when none did.  Several members must name
    the same user.
    """
    from urllib.parse import unquote

    if "@" not in text:
        return text, None, None
    items: List[str] = []
    users = set()
    for item in text.split(","):
        scheme, sep, rest = item.strip().rpartition("://")
        userinfo, at, hostport = rest.rpartition("@")
        if at:
            user, _, password = userinfo.partition(":")
            users.add((unquote(user), unquote(password)))
        items.append(f"{scheme}{sep}{hostport}")
    if len(users) > 1:
        raise BackendConfigError("etcd endpoints name different users in their URLs")
    user, password = users.pop()
    return ",".join(items), user or None, password or None


def parse_endpoints(text: str, default_port: int = DEFAULT_PORT) -> Tuple[List[Endpoint], Optional[str]]:
    """Parse ``host[:port][,host[:port]...]``, optionally with ``http://``/``https://``.

    Returns the endpoints and the scheme they named (``None`` if none did).
    An empty text means ``localhost``, as torch's ``parse_rendezvous_endpoint``.
    """
    endpoints: List[Endpoint] = []
    schemes = set()
    for item in (part.strip() for part in (text or "localhost").split(",")):
        if not item:
            continue
        raw = item
        if "://" in item:
            scheme, _, item = item.partition("://")
            if scheme.lower() not in ("http", "https"):
                raise BackendConfigError(f"etcd endpoint {raw!r}: the scheme must be http or https")
            schemes.add(scheme.lower())
            item = item.rstrip("/")
        host, port = item, default_port
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise BackendConfigError(f"etcd endpoint {raw!r}: malformed IPv6 address")
            port_text = rest[1:] if rest else ""
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            port_text = ""
        if port_text:
            try:
                port = int(port_text)
            except ValueError:
                raise BackendConfigError(f"etcd endpoint {raw!r}: the port is not a number") from None
            if not 0 < port < 65536:
                raise BackendConfigError(f"etcd endpoint {raw!r}: the port is out of range")
        if "@" in item:
            raise BackendConfigError("etcd endpoint: credentials in the URL are not supported here; pass "
                                     "--rdzv-conf username=...,password=... (etcd-v3)")
        if not host or "/" in host:
            raise BackendConfigError(f"etcd endpoint {raw!r}: expected host:port")
        endpoints.append(Endpoint(host, port))
    if not endpoints:
        raise BackendConfigError(f"no etcd endpoint in {text!r}")
    if len(schemes) > 1:
        raise BackendConfigError("etcd endpoints mix http:// and https://")
    return endpoints, (schemes.pop() if schemes else None)


def make_ssl_context(
    ca_cert: Optional[str] = None,
    ssl_cert: Optional[str] = None,
    ssl_cert_key: Optional[str] = None,
) -> ssl.SSLContext:
    """A client TLS context from torch's options; unreadable files are config errors."""
    for option, path in (("ca_cert", ca_cert), ("ssl_cert", ssl_cert), ("ssl_cert_key", ssl_cert_key)):
        if path and not os.path.isfile(path):
            raise BackendConfigError(f"--rdzv-conf {option}: no such file: {path}")
    if ssl_cert_key and not ssl_cert:
        raise BackendConfigError("--rdzv-conf ssl_cert_key needs ssl_cert")
    try:
        context = ssl.create_default_context(cafile=ca_cert or None)
        if ssl_cert:
            context.load_cert_chain(ssl_cert, ssl_cert_key or None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BackendConfigError(f"cannot load the TLS files: {_reason(exc)}") from exc
    return context


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_range_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


class _ServerError(http.client.HTTPException):
    """A member answered 5xx (no leader, shutting down); its text is the reason."""


def _reason(exc: BaseException, tls: bool = False) -> str:
    """A short, secret-free description of a socket/TLS/HTTP failure.

    With ``tls``, a peer that hangs up is most likely a plain-http member
    answering our TLS handshake (it may reset or send an HTTP 400 that the TLS
    layer rejects, depending on timing): say so either way.
    """
    if tls and isinstance(exc, _STALE):
        return (f"the connection closed during the TLS handshake ({_reason(exc)}); "
                "is the member serving https (--rdzv-conf protocol)?")
    if isinstance(exc, _ServerError):
        return str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        hint = ""
        if "VERSION" in reason or "EOF" in reason or "RECORD" in reason:
            hint = "; is the member serving https (--rdzv-conf protocol)?"
        elif "CERTIFICATE" in reason:
            hint = "; the member wants a client certificate (ssl_cert, ssl_cert_key)"
        return f"TLS failed ({reason}){hint}"
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return "closed the connection without an HTTP answer (wrong protocol?)"
    if isinstance(exc, http.client.HTTPException):
        return f"broken HTTP answer ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError))


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _Watchdog:
    """Shuts a socket down when ``stop`` is set, to wake a blocking read promptly."""

    def __init__(self, stop: threading.Event, conn: http.client.HTTPConnection) -> None:
        self._stop = stop
        self._conn = conn
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rdzvctl-etcd-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            if self._stop.wait(0.05):
                sock = self._conn.sock
                if sock is not None and not self._done.is_set():
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return

    def cancel(self) -> None:
        self._done.set()


class EtcdHttp:
    """Keep-alive HTTP/1.1 to several etcd members, failing over between them.

    ``timeout`` bounds each call as a whole (connect, send, answer) across all
    members tried.  The member that last answered is tried first.
    """

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        timeout: float,
        ssl_context: Optional[ssl.SSLContext] = None,
        api: str = "etcd",
    ) -> None:
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.api = api
        self._preferred = 0
        self._lock = threading.Lock()
        self._idle: Dict[Endpoint, List[http.client.HTTPConnection]] = {}
        self._closed = False

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def describe(self) -> str:
        return ",".join(f"{self.scheme}://{ep}" for ep in self.endpoints)

    # -- connections ------------------------------------------------------------
    def _connect(self, endpoint: Endpoint, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.ssl_context is not None:
            conn = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=timeout, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
        conn.connect()
        return conn

    def _take(self, endpoint: Endpoint) -> Optional[http.client.HTTPConnection]:
        with self._lock:
            idle = self._idle.get(endpoint)
            return idle.pop() if idle else None

    def _give(self, endpoint: Endpoint, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                idle = self._idle.setdefault(endpoint, [])
                if len(idle) < 4:
                    idle.append(conn)
                    return
        conn.close()

    def _order(self) -> List[int]:
        start = self._preferred
        count = len(self.endpoints)
        return [(start + i) % count for i in range(count)]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()

    # -- one request ------------------------------------------------------------
    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        deadline: float,
    ) -> Tuple[http.client.HTTPResponse, bytes]:
        assert conn.sock is not None
        conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        conn.request(method, path, body=body, headers=dict(headers))
        response = conn.getresponse()
        if conn.sock is not None:
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = response.read()
        return response, data

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> HttpAnswer:
        """Send one request, failing over between members.

        A 5xx answer (no leader yet, a proposal dropped by a dead leader) also
        moves on to the next member, and whole rounds repeat with a short
        backoff while time is left, so a leader election is ridden out.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        failures: List[Tuple[Endpoint, BaseException]] = []
        pause = 0.1
        while True:
            answered_5xx: Optional[HttpAnswer] = None
            order = self._order()
            for position, index in enumerate(order):
                endpoint = self.endpoints[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Leave later members a share of the time if this one black-holes connects.
                connect_budget = remaining / (len(order) - position)
                try:
                    answer = self._request_one(endpoint, method, path, body, headers, deadline, connect_budget)
                except (OSError, http.client.HTTPException) as exc:
                    failures.append((endpoint, exc))
                    continue
                if answer.status >= 500:
                    answered_5xx = answer
                    failures.append((endpoint, _ServerError(f"answered HTTP {answer.status}")))
                    continue
                self._preferred = index
                return answer
            if answered_5xx is None or deadline - time.monotonic() <= pause:
                break
            time.sleep(pause)
            pause = min(2 * pause, 1.0)
        if answered_5xx is not None:
            return answered_5xx
        raise self._failure(failures, deadline)

    def _request_one(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        deadline: float,
        connect_budget: float,
    ) -> HttpAnswer:
        conn = self._take(endpoint)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(endpoint, min(connect_budget, max(0.001, deadline - time.monotonic())))
            try:
                response, data = self._exchange(conn, method, path, body, headers, deadline)
            except _STALE:
                conn.close()
                conn = None
                if reused:  # a pooled connection the member closed meanwhile: retry fresh once
                    reused = False
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._give(endpoint, conn)
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
            return HttpAnswer(endpoint, response.status, answer_headers, data)

    def _failure(self, failures: List[Tuple[Endpoint, BaseException]], deadline: float) -> Exception:
        failures = list(dict(failures).items())  # the last failure of each member, in order
        tls = self.ssl_context is not None
        timed_out = time.monotonic() >= deadline or (failures and all(_is_timeout(e) for _, e in failures))
        if not failures:
            error: Exception = BackendTimeoutError(
                f"{self.api} at {self.describe()} did not answer within {self.timeout:g} s"
            )
        elif len(failures) == 1 and len(self.endpoints) == 1:
            endpoint, exc = failures[0]
            if _is_timeout(exc) or timed_out:
                error = BackendTimeoutError(f"{self.api} at {endpoint} did not answer within {self.timeout:g} s")
            else:
                error = BackendUnavailableError(f"cannot talk to {self.api} at {endpoint}: {_reason(exc, tls)}")
        else:
            detail = "; ".join(f"{ep}: {_reason(exc, tls)}" for ep, exc in failures)
            if timed_out:
                error = BackendTimeoutError(
                    f"no {self.api} member answered within {self.timeout:g} s ({detail})"
                )
            else:
                error = BackendUnavailableError(f"no {self.api} member is reachable ({detail})")
        if failures:
            error.__cause__ = failures[-1][1]
        return error

    # -- streams (watch) ----------------------------------------------------------
    def stream(
        self,
        method: str,
        path: str,
        body: Optional[bytes],
        headers: Mapping[str, str],
        stop: threading.Event,
        idle: float = WATCH_IDLE_SECONDS,
    ) -> "Stream":
        """Open a long-lived request (a watch) on the first member that accepts it.

        The connect honours the call timeout; the answer may take up to
        ``idle`` seconds.  Setting ``stop`` wakes any blocking read at once.
        """
        deadline = time.monotonic() + self.timeout
        headers = dict(headers)
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        failures: List[Tuple[Endpoint, BaseException]] = []
        order = self._order()
        for position, index in enumerate(order):
            endpoint = self.endpoints[index]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                conn = self._connect(endpoint, remaining / (len(order) - position))
                assert conn.sock is not None
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.request(method, path, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as exc:
                failures.append((endpoint, exc))
                continue
            self._preferred = index
            return Stream(endpoint, conn, stop, idle)
        raise self._failure(failures, deadline)


class Stream:
    """An open streaming request; read its answer with :meth:`response`."""

    def __init__(self, endpoint: Endpoint, conn: http.client.HTTPConnection, stop: threading.Event, idle: float):
        self.endpoint = endpoint
        self._conn = conn
        self._idle = idle
        self._watchdog = _Watchdog(stop, conn)
        self._response: Optional[http.client.HTTPResponse] = None

    def response(self) -> http.client.HTTPResponse:
        """The answer's status and headers (waits up to ``idle``)."""
        if self._response is None:
            if self._conn.sock is not None:
                self._conn.sock.settimeout(self._idle)
            self._response = self._conn.getresponse()
        return self._response

    def lines(self) -> Iterator[bytes]:
        """The answer body, line by line, until the server or ``stop`` ends it."""
        response = self.response()
        while True:
            line = response.readline()
            if not line:
                return
            if line.strip():
                yield line

    def close(self) -> None:
        self._watchdog.cancel()
        self._conn.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the v3 JSON gateway -----------------------------------------------------------
_GRPC_UNAUTHENTICATED = 16
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE = 4
_GRPC_OUT_OF_RANGE = 11


class EtcdGateway:
    """The etcd v3 API through its JSON gateway (``/v3/...``), with optional user auth.

    Keys and values travel base64-encoded; 64-bit integers come back as
    strings.  With a user and password, an auth token is fetched on first use
    and again whenever the server says it expired.
    """

    api = "the etcd v3 API"

    def __init__(self, http: EtcdHttp, username: Optional[str] = None, password: Optional[str] = None):
        self.http = http
        self.username = username or None
        self._password = password or ""
        self._token: Optional[str] = None
        self._token_lock = threading.Lock()

    def describe(self) -> str:
        """The members, and the user if any; never the password."""
        user = f" (user {self.username})" if self.username else ""
        return self.http.describe() + user

    # -- plumbing ---------------------------------------------------------------
    def _headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.username:
            headers["Authorization"] = self._auth_token()
        return headers

    def _auth_token(self, renew: bool = False) -> str:
        with self._token_lock:
            if self._token is None or renew:
                body = json.dumps({"name": self.username, "password": self._password}).encode()
                answer = self.http.request("POST", "/v3/auth/authenticate", body, {"Content-Type": "application/json"})
                doc = answer.json(self.api)
                if answer.status != 200 or "token" not in doc:
                    message = str(doc.get("message") or doc.get("error") or f"HTTP {answer.status}")
                    raise BackendUnavailableError(
                        f"authentication as {self.username!r} to etcd at {answer.endpoint} failed: {message}"
                    )
                self._token = str(doc["token"])
            return self._token

    def call(self, path: str, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """POST ``payload`` to ``/v3/<path>`` and return the decoded answer."""
        body = json.dumps(payload).encode()
        for attempt in range(2):
            answer = self.http.request("POST", "/v3/" + path, body, self._headers())
            doc = answer.json(self.api)
            if answer.status == 200 and isinstance(doc, dict):
                if path == "lease/keepalive" and "result" in doc:
                    return dict(doc["result"])
                return doc
            if not isinstance(doc, dict):
                raise BackendUnavailableError(f"etcd at {answer.endpoint} sent an unexpected answer to /v3/{path}")
            code = doc.get("code")
            message = str(doc.get("message") or doc.get("error") or f"HTTP {answer.status}")
            if self.username and attempt == 0 and (code == _GRPC_UNAUTHENTICATED or "auth token" in message):
                self._auth_token(renew=True)
                continue
            raise self._error(answer, code, message, path)
        raise AssertionError("unreachable")

    def _error(self, answer: HttpAnswer, code: Any, message: str, path: str) -> Exception:
        where = f"etcd at {answer.endpoint}"
        if code in (_GRPC_UNAUTHENTICATED, _GRPC_PERMISSION_DENIED) or "user name is empty" in message:
            user = f" for user {self.username!r}" if self.username else " (no --rdzv-conf username given)"
            return BackendUnavailableError(f"{where} refused /v3/{path}{user}: {message}")
        if code == _GRPC_DEADLINE or answer.status == 504:
            return BackendTimeoutError(f"{where} timed out on /v3/{path}: {message}")
        if code == _GRPC_UNAVAILABLE or answer.status >= 500:
            return BackendUnavailableError(f"{where} cannot serve /v3/{path}: {message}")
        if answer.status == 404 and code is None:  # etcd itself answers 404 with a gRPC code (e.g. lease not found)
            return BackendUnavailableError(f"{where} does not serve the v3 JSON gateway (/v3/{path}: HTTP 404)")
        return BackendUnavailableError(f"{where} rejected /v3/{path}: {message}")

    # -- KV, leases -------------------------------------------------------------------
    def range(self, key: bytes, range_end: Optional[bytes] = None, **options: Any) -> Dict[str, Any]:
        payload: Dict[str, Any] = {"key": b64(key), **options}
        if range_end is not None:
            payload["range_end"] = b64(range_end)
        return self.call("kv/range", payload)

    def txn(self, compare: List[Dict[str, Any]], success: List[Dict[str, Any]],
            failure: List[Dict[str, Any]]) -> Dict[str, Any]:
        return self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})

    def lease_grant(self, ttl: int) -> int:
        doc = self.call("lease/grant", {"TTL": ttl})
        if doc.get("error"):
            raise BackendUnavailableError(f"etcd refused a lease: {doc['error']}")
        return int(doc["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Renew ``lease``; returns its TTL, 0 when the lease no longer exists."""
        return int(self.call("lease/keepalive", {"ID": str(lease)}).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        try:
            self.call("lease/revoke", {"ID": str(lease)})
        except BackendUnavailableError as exc:
            if "not found" not in str(exc):
                raise

    # -- watch ------------------------------------------------------------------------
    def watch(self, key: bytes, start_revision: int, stop: threading.Event,
              idle: float = WATCH_IDLE_SECONDS) -> Iterator[Dict[str, Any]]:
        """Yield the ``result`` messages of a watch on ``key`` from ``start_revision``.

        Ends (without error) when the server closes the stream, it stays idle
        for ``idle`` seconds, or ``stop`` is set: the caller resumes from the
        last revision it saw.
        """
        request = {"create_request": {"key": b64(key), "start_revision": str(start_revision)}}
        body = json.dumps(request).encode()
        with self.http.stream("POST", "/v3/watch", body, self._headers(), stop, idle) as stream:
            try:
                response = stream.response()
                if response.status != 200:
                    answer = HttpAnswer(stream.endpoint, response.status, {}, response.read())
                    doc = answer.json(self.api)
                    message = str(doc.get("message") or doc.get("error") or f"HTTP {response.status}")
                    if self.username and (doc.get("code") == _GRPC_UNAUTHENTICATED or "auth token" in message):
                        self._auth_token(renew=True)
                        return
                    raise self._error(answer, doc.get("code"), message, "watch")
                for line in stream.lines():
                    doc = json.loads(line)
                    if "error" in doc and "result" not in doc:
                        return  # e.g. the member is shutting down: resume elsewhere
                    yield doc.get("result", {})
            except (OSError, http.client.HTTPException, ValueError):
                if stop.is_set():
                    return
                return  # a broken stream: the caller re-reads and resumes
