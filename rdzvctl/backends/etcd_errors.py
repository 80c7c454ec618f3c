"""The error mapping of the etcd HTTP transport (:mod:`rdzvctl.backends.etcd_http`), in one table.

:data:`TRANSPORT_ERRORS` is what a member's failure can raise (sockets, TLS:
``ssl.SSLError`` is an ``OSError``, and ``http.client``); :data:`FAILURE_REASONS`
maps each upstream exception class to a short, secret-free reason
(``isinstance``, first match wins), which :meth:`EtcdHttp._failure
<rdzvctl.backends.etcd_http.EtcdHttp>` puts in the one
:class:`~rdzvctl.errors.BackendUnavailableError`/``BackendTimeoutError`` it
raises, chained to the original.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from typing import Callable, Tuple, Type, Union

__all__ = [
    "TRANSPORT_ERRORS", "STALE_CONNECTION_ERRORS", "FAILURE_REASONS", "ServerError", "failure_reason", "is_timeout",
]

#: What a member's failure can raise: sockets, TLS (``ssl.SSLError`` is an ``OSError``) and ``http.client``.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


class ServerError(http.client.HTTPException):
    """A member answered 5xx (no leader, shutting down); its text is the reason."""


def _tls_reason(exc: BaseException) -> str:
    reason = str(getattr(exc, "reason", None) or exc or type(exc).__name__)
    hint = ""
    if "VERSION" in reason or "EOF" in reason or "RECORD" in reason:
        hint = "; is the member serving https (--rdzv-conf protocol)?"
    elif "CERTIFICATE" in reason:
        hint = "; the member wants a client certificate (ssl_cert, ssl_cert_key)"
    return f"TLS failed ({reason}){hint}"


def _os_reason(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    return exc.strerror.lower() if exc.strerror else str(exc) or type(exc).__name__


Reason = Callable[[BaseException], str]
#: upstream exception class(es) -> a short, secret-free reason; ``isinstance``, first match wins.
FAILURE_REASONS: Tuple[Tuple[Union[Type[BaseException], Tuple[Type[BaseException], ...]], Reason], ...] = (
    (ServerError, str),
    ((socket.timeout, TimeoutError), lambda exc: "timed out"),
    (ConnectionRefusedError, lambda exc: "connection refused"),
    (ssl.SSLCertVerificationError,
     lambda exc: "TLS certificate verification failed "
                 f"({getattr(exc, 'verify_message', None) or getattr(exc, 'reason', None) or exc})"),
    (ssl.SSLError, _tls_reason),
    (socket.gaierror, lambda exc: "cannot resolve the host name"),
    ((http.client.RemoteDisconnected, http.client.BadStatusLine),
     lambda exc: "closed the connection without an HTTP answer (wrong protocol?)"),
    (http.client.HTTPException, lambda exc: f"broken HTTP answer ({type(exc).__name__})"),
    (OSError, _os_reason),
)

#: A peer that hung up: a pooled connection the member closed, or plain http answering TLS.
STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def failure_reason(exc: BaseException, tls: bool = False) -> str:
    """A short, secret-free description of a socket/TLS/HTTP failure, from :data:`FAILURE_REASONS`.

    With ``tls``, a peer that hangs up is most likely a plain-http member
    answering our TLS handshake (it may reset or send an HTTP 400 that the TLS
    layer rejects, depending on timing): say so either way.
    """
    if tls and isinstance(exc, STALE_CONNECTION_ERRORS):
        return (f"the connection closed during the TLS handshake ({failure_reason(exc)}); "
                "is the member serving https (--rdzv-conf protocol)?")
    for classes, reason in FAILURE_REASONS:
        if isinstance(exc, classes):
            return reason(exc)
    return str(exc) or type(exc).__name__


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError))
