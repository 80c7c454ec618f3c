"""Each transport maps every upstream exception class it can raise (as httpx's tests do).

The etcd HTTP transport uses the standard library: every socket, TLS,
``http.client`` and ``urllib`` failure class must be caught by the transport
and described by a row of its table, never by the fallback.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error

import pytest

from rdzvctl.backends.etcd_errors import FAILURE_REASONS, TRANSPORT_ERRORS, ServerError, failure_reason


def _upstream_classes() -> list:
    found = set()
    for module in (socket, ssl, http.client, urllib.error):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, (OSError, http.client.HTTPException)):
                found.add(obj)
    found |= {ConnectionRefusedError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError}
    return sorted(found, key=lambda cls: (cls.__module__, cls.__qualname__))


def _instance(cls: type) -> BaseException:
    for args in (("boom",), (), (1, "boom"), ("http://member:2379/v3/kv/range", 500, "boom", {}, None)):
        try:
            return cls(*args)
        except TypeError:
            continue
    raise AssertionError(f"cannot build {cls}")


def test_the_stdlib_has_the_classes_we_expect() -> None:
    classes = _upstream_classes()
    assert ssl.SSLCertVerificationError in classes and http.client.RemoteDisconnected in classes
    assert len(classes) > 20


@pytest.mark.parametrize("cls", _upstream_classes(), ids=lambda cls: f"{cls.__module__}.{cls.__qualname__}")
def test_every_upstream_exception_is_caught_and_has_a_row(cls: type) -> None:
    exc = _instance(cls)
    assert isinstance(exc, TRANSPORT_ERRORS)
    assert any(isinstance(exc, classes) for classes, _ in FAILURE_REASONS)
    reason = failure_reason(exc)
    assert reason and "\n" not in reason


def test_rows_are_specific_before_general() -> None:
    assert failure_reason(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert failure_reason(socket.timeout("timed out")) == "timed out"
    assert failure_reason(socket.gaierror(-2, "Name or service not known")) == "cannot resolve the host name"
    assert "wrong protocol" in failure_reason(http.client.RemoteDisconnected("closed"))
    assert failure_reason(ServerError("answered HTTP 503")) == "answered HTTP 503"
    assert failure_reason(OSError(99, "Cannot assign requested address")) == "cannot assign requested address"
