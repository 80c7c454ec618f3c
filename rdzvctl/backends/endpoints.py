"""Endpoint parsing shared by the backends: ``host[:port]`` items and torch's rendezvous endpoint.

:func:`split_host_port` reads one ``host``, ``host:port``, ``[v6]`` or
``[v6]:port`` item (a bare IPv6 address without brackets is a host); the etcd
and Redis backends use it for each member of a comma-separated list, and say
what went wrong in their own words from :attr:`EndpointSyntaxError.problem`.
:func:`parse_rendezvous_endpoint` is torch's ``parse_rendezvous_endpoint``
(``rdzv_backends.utils``) for the c10d backend: an empty endpoint is
``localhost``, and the port is what follows the last ``:``.
"""

from __future__ import annotations

import re
from typing import Tuple

__all__ = ["EndpointSyntaxError", "split_host_port", "parse_rendezvous_endpoint"]

_HOST = re.compile(r"^[\w.:-]+$")


class EndpointSyntaxError(ValueError):
    """An item that is not ``host[:port]``; ``problem`` is ``"ipv6"``, ``"port"``, ``"range"`` or ``"host"``."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def split_host_port(item: str, default_port: int) -> Tuple[str, int]:
    """``(host, port)`` of one ``host[:port]`` / ``[v6][:port]`` item; raises :class:`EndpointSyntaxError`."""
    item = item.strip()
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EndpointSyntaxError("ipv6")
        port_text = rest[1:]
    elif item.count(":") == 1:
        host, _, port_text = item.partition(":")
    else:
        host, port_text = item, ""
    if not host:
        raise EndpointSyntaxError("host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise EndpointSyntaxError("port") from None
    if not 0 < port < 65536:
        raise EndpointSyntaxError("range")
    return host, port


def parse_rendezvous_endpoint(endpoint: str, default_port: int) -> Tuple[str, int]:
    """torch's ``parse_rendezvous_endpoint``: ``host[:port]``, ``[v6]:port``, default port, ``localhost``.

    Raises :class:`EndpointSyntaxError` (``"port"`` for a port that is not 1-65535, ``"host"``).
    """
    endpoint = (endpoint or "").strip()
    if not endpoint:
        return "localhost", default_port
    if endpoint[0] == "[" and endpoint[-1] == "]":
        host, rest = endpoint, None
    else:
        host, sep, rest = endpoint.rpartition(":")
        if not sep:
            host, rest = rest, None
    if len(host) > 1 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    port = default_port
    if rest is not None:
        if not rest.isdigit() or not 0 < int(rest) < 65536:
            raise EndpointSyntaxError("port")
        port = int(rest)
    if not host or not _HOST.match(host):
        raise EndpointSyntaxError("host")
    return host, port
