"""The HTTP transport of the etcd backends: members, keep-alive, failover, TLS and error mapping.

Both etcd APIs rdzvctl speaks are plain HTTP/1.1 + JSON (the v2 keys API in
:mod:`rdzvctl.backends.etcd_v2`, the v3 JSON gateway in
:mod:`rdzvctl.backends.etcd_gateway`); this module is what they share, with
the standard library only, so importing it is cheap and it works next to any
protobuf (see docs/etcd-client-choice.md).  Public API:

* :class:`Endpoint` ``(host, port)``, one member; the endpoint text, the
  credentials in it and the TLS options are parsed by :mod:`rdzvctl.backends.etcd_members`.
* :class:`EtcdHttp` ``(endpoints, timeout, ssl_context=None, api="etcd")``:
  ``request(method, path, body=None, headers=None, timeout=None) -> HttpAnswer``
  (fails over between members, rides out a leader election, bounded by
  ``timeout``), ``stream(method, path, body, headers, stop, idle) -> Stream``
  (a long-lived request such as a watch; ``Stream.response()``, ``Stream.lines()``,
  ``Stream.close()``; setting ``stop`` wakes a blocking read), ``describe()``,
  ``close()``.
* :class:`HttpAnswer` ``(endpoint, status, headers, body)`` and ``.json(api)``.
* The one error mapping: every socket, TLS and ``http.client`` failure a member
  gives (:data:`rdzvctl.backends.etcd_errors.TRANSPORT_ERRORS`) is described
  through the table in :mod:`rdzvctl.backends.etcd_errors`, and the call
  raises one :class:`~rdzvctl.errors.BackendTimeoutError` or
  :class:`~rdzvctl.errors.BackendUnavailableError` naming the endpoint(s),
  chained to the last original exception.

A backend over this transport is built like :class:`~rdzvctl.backends.etcd_v2.EtcdV2Backend`::

    endpoints, scheme = etcd_members.parse_endpoints(address.endpoint)
    protocol = etcd_members.choose_protocol(address.get("protocol"), scheme, "http")
    context = etcd_members.make_ssl_context(ca_cert, ssl_cert, ssl_cert_key) if protocol == "https" else None
    http = EtcdHttp(endpoints, address.timeout, context, api="etcd")
    answer = http.request("GET", "/v2/keys/...")   # -> HttpAnswer; answer.json("the etcd v2 API")
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from rdzvctl.backends.etcd_errors import (
    STALE_CONNECTION_ERRORS,
    TRANSPORT_ERRORS,
    ServerError,
    failure_reason,
    is_timeout,
)
from rdzvctl.errors import BackendTimeoutError, BackendUnavailableError

__all__ = [
    "WATCH_IDLE_SECONDS",
    "Endpoint",
    "HttpAnswer",
    "EtcdHttp",
    "Stream",
]

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

    def _members(self, deadline: float) -> Iterator[Tuple[int, Endpoint, float]]:
        """``(index, endpoint, connect budget)`` of each member in failover order, the last one that
        answered first, while time is left before ``deadline``.  The budget leaves later members a
        share of the time if this one black-holes connects."""
        start = self._preferred
        count = len(self.endpoints)
        for position in range(count):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            index = (start + position) % count
            yield index, self.endpoints[index], remaining / (count - position)

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
            for index, endpoint, connect_budget in self._members(deadline):
                try:
                    answer = self._request_one(endpoint, method, path, body, headers, deadline, connect_budget)
                except TRANSPORT_ERRORS as exc:
                    failures.append((endpoint, exc))
                    continue
                if answer.status >= 500:
                    answered_5xx = answer
                    failures.append((endpoint, ServerError(f"answered HTTP {answer.status}")))
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
            except STALE_CONNECTION_ERRORS:
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
        timed_out = time.monotonic() >= deadline or (failures and all(is_timeout(e) for _, e in failures))
        if not failures:
            error: Exception = BackendTimeoutError(
                f"{self.api} at {self.describe()} did not answer within {self.timeout:g} s"
            )
        elif len(failures) == 1 and len(self.endpoints) == 1:
            endpoint, exc = failures[0]
            if is_timeout(exc) or timed_out:
                error = BackendTimeoutError(f"{self.api} at {endpoint} did not answer within {self.timeout:g} s")
            else:
                error = BackendUnavailableError(f"cannot talk to {self.api} at {endpoint}: {failure_reason(exc, tls)}")
        else:
            detail = "; ".join(f"{ep}: {failure_reason(exc, tls)}" for ep, exc in failures)
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
        for index, endpoint, connect_budget in self._members(deadline):
            try:
                conn = self._connect(endpoint, connect_budget)
                assert conn.sock is not None
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.request(method, path, body=body, headers=headers)
            except TRANSPORT_ERRORS as exc:
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


