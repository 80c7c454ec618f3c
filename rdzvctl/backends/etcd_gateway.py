"""The etcd v3 API through its JSON gateway (``/v3/...``), over :mod:`rdzvctl.backends.etcd_http`.

:class:`EtcdGateway` ``(http, username=None, password=None)`` adds to an
:class:`~rdzvctl.backends.etcd_http.EtcdHttp` the v3 calls (``call(path,
payload)``, ``range``, ``txn``, ``lease_grant``, ``lease_keepalive``,
``lease_revoke``), the auth token (fetched on first use and again when it
expired), the mapping of gRPC status codes to :mod:`rdzvctl.errors`, and the
watch stream (``watch(key, start_revision, stop)``).  :func:`b64`/:func:`unb64`
are the gateway's encoding of keys and values; :func:`prefix_range_end` the
``range_end`` of a prefix.  Used by :mod:`rdzvctl.backends.etcd_v3` and the
torchrun store (:mod:`rdzvctl.torchrun.stores`).
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any, Dict, Generator, List, Mapping, Optional

from rdzvctl.backends.etcd_errors import TRANSPORT_ERRORS
from rdzvctl.backends.etcd_errors import failure_reason as _reason  # noqa: F401 - the name older callers import
from rdzvctl.backends.etcd_http import WATCH_IDLE_SECONDS, EtcdHttp, HttpAnswer
from rdzvctl.errors import BackendTimeoutError, BackendUnavailableError

__all__ = ["EtcdGateway", "RevisionCompactedError", "b64", "unb64", "prefix_range_end"]


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



_GRPC_UNAUTHENTICATED = 16
_GRPC_PERMISSION_DENIED = 7
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE = 4
_GRPC_OUT_OF_RANGE = 11


class RevisionCompactedError(BackendUnavailableError):
    """A read at a revision etcd has compacted away (gRPC OUT_OF_RANGE, "required revision has been compacted")."""


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
        if code == _GRPC_OUT_OF_RANGE and "compacted" in message:
            return RevisionCompactedError(f"{where} no longer holds that revision (/v3/{path}): {message}")
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
              idle: float = WATCH_IDLE_SECONDS, **options: Any) -> Generator[Dict[str, Any], None, None]:
        """Yield the ``result`` messages of a watch on ``key`` from ``start_revision``.

        Ends (without error) when the server closes the stream, it stays idle
        for ``idle`` seconds, or ``stop`` is set: the caller resumes from the
        last revision it saw.  ``options`` go into the create request as they
        are (e.g. ``fragment=True``: etcd splits a large response into several).
        """
        request = {"create_request": {"key": b64(key), "start_revision": str(start_revision), **options}}
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
            except (*TRANSPORT_ERRORS, ValueError):
                if stop.is_set():
                    return
                return  # a broken stream: the caller re-reads and resumes
