"""The etcd members an endpoint names, and how to reach them: parsing and TLS for both etcd backends.

* :func:`parse_endpoints` (``host[:port][,host[:port]...]``, optionally with
  ``http://``/``https://``) -> ``([Endpoint], scheme or None)``;
* :func:`split_credentials` takes ``user:password@`` out of URL endpoints;
* :func:`choose_protocol` reconciles torch's ``protocol`` option with the endpoints' scheme;
* :func:`make_ssl_context` builds the client TLS context from torch's
  ``ca_cert``/``ssl_cert``/``ssl_cert_key`` options (bad files are config errors).

The result feeds :class:`rdzvctl.backends.etcd_http.EtcdHttp`.
"""

from __future__ import annotations

import ssl
from typing import List, Optional, Tuple

from rdzvctl.backends.endpoints import EndpointSyntaxError, split_host_port
from rdzvctl.backends.etcd_errors import failure_reason
from rdzvctl.backends.etcd_http import Endpoint
from rdzvctl.backends.tls import check_tls_files, client_context
from rdzvctl.errors import BackendConfigError

__all__ = ["DEFAULT_PORT", "parse_endpoints", "split_credentials", "make_ssl_context", "choose_protocol"]

DEFAULT_PORT = 2379


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


_ENDPOINT_PROBLEMS = {
    "ipv6": "malformed IPv6 address",
    "port": "the port is not a number",
    "range": "the port is out of range",
    "host": "expected host:port",
}


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
        try:
            host, port = split_host_port(item, default_port)
        except EndpointSyntaxError as exc:
            if "@" in item:
                host, port = "", 0
            else:
                raise BackendConfigError(f"etcd endpoint {raw!r}: {_ENDPOINT_PROBLEMS[exc.problem]}") from None
        if "@" in item:
            raise BackendConfigError("etcd endpoint: credentials in the URL are not supported here; pass "
                                     "--rdzv-conf username=...,password=... (etcd-v3)")
        if "/" in host:
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
    check_tls_files({"ca_cert": ca_cert, "ssl_cert": ssl_cert, "ssl_cert_key": ssl_cert_key}, "ssl_cert", "ssl_cert_key")
    try:
        return client_context(ca_cert, ssl_cert, ssl_cert_key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise BackendConfigError(f"cannot load the TLS files: {failure_reason(exc)}") from exc


def choose_protocol(option: Optional[str], scheme: Optional[str], default: str) -> str:
    """``http`` or ``https``: the ``protocol`` option, else the endpoints' scheme, else ``default``."""
    protocol = (option or scheme or default).strip().lower()
    if protocol not in ("http", "https"):
        raise BackendConfigError("--rdzv-conf protocol: must be http or https")
    if scheme and scheme != protocol:
        raise BackendConfigError(f"the endpoint says {scheme}:// but --rdzv-conf protocol is {protocol}")
    return protocol
