"""Small network probes for ``doctor``: forward DNS and TCP connect, each with a timeout.

Many probes run at once on a pool of daemon threads (:func:`run_all`) under
one deadline, so a 1,000-node run is checked in seconds, and a lookup the
resolver never answers (``getaddrinfo`` cannot be cancelled) is reported as
timed out without holding up the process: daemon threads do not delay its exit.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Tuple, TypeVar

__all__ = ["Resolution", "Connection", "resolve", "connect", "run_all", "resolve_all", "connect_all",
           "is_loopback_name", "DNS_TIMEOUT", "CONNECT_TIMEOUT"]

DNS_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
MAX_WORKERS = 256

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


@dataclass(frozen=True)
class Resolution:
    """The forward lookup of one host name (or an IP literal, which needs none)."""

    host: str
    addresses: Tuple[str, ...] = ()
    error: Optional[str] = None
    seconds: Optional[float] = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.addresses)

    @property
    def loopback(self) -> bool:
        """Every address is a loopback one (or the name is ``localhost``)."""
        if is_loopback_name(self.host):
            return True
        return self.ok and all(_is_loopback_ip(a) for a in self.addresses)


@dataclass(frozen=True)
class Connection:
    """One TCP connect attempt."""

    host: str
    port: int
    ok: bool
    seconds: Optional[float] = None
    error: Optional[str] = None
    peer: Optional[str] = field(default=None)


def _is_loopback_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return bool(address.is_loopback or address.is_unspecified)  # 0.0.0.0 / :: reach only the host itself


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` (RFC 6761), a loopback or unspecified (``0.0.0.0``) IP literal."""
    name = host.strip().rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_ip(name.strip("[]"))


def resolve(host: str) -> Resolution:
    """Forward DNS of ``host`` (blocking; :func:`resolve_all` bounds it)."""
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
        return Resolution(host, (literal,), None, 0.0)
    except ValueError:
        pass
    start = time.perf_counter()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Resolution(host, (), reason, time.perf_counter() - start)
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    return Resolution(host, addresses, None if addresses else "no address", time.perf_counter() - start)


def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> Connection:
    """Open (and close at once) a TCP connection to ``host:port``."""
    start = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        return Connection(host, port, False, time.perf_counter() - start, f"no answer within {timeout:g} s")
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Connection(host, port, False, time.perf_counter() - start, reason)
    seconds = time.perf_counter() - start
    try:
        peer = str(sock.getpeername()[0])
    except OSError:
        peer = None
    sock.close()
    return Connection(host, port, True, seconds, None, peer)


def run_all(func: Callable[[K], R], items: Iterable[K], timeout: float,
            on_timeout: Callable[[K], R], workers: int = MAX_WORKERS) -> Dict[K, R]:
    """``func`` of every distinct item on up to ``workers`` daemon threads, within ``timeout`` overall.

    Items not done when ``timeout`` runs out (also those never started) get
    ``on_timeout(item)``; their threads finish (or hang) unseen.  So the call
    takes at most ``timeout`` however many items there are: a slow or
    rate-limiting resolver shows up as timeouts, not as a long wait.
    """
    todo: List[K] = list(dict.fromkeys(items))
    if not todo:
        return {}
    jobs: "queue.Queue[K]" = queue.Queue()
    for item in todo:
        jobs.put(item)
    results: Dict[K, R] = {}
    done = threading.Condition()
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                item = jobs.get_nowait()
            except queue.Empty:
                return
            result = func(item)
            with done:
                results.setdefault(item, result)
                done.notify_all()

    for _ in range(max(1, min(workers, len(todo)))):
        threading.Thread(target=worker, name="rdzvctl-probe", daemon=True).start()
    with done:
        while len(results) < len(todo):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done.wait(left)
        out = dict(results)
    return {item: out[item] if item in out else on_timeout(item) for item in todo}


def resolve_all(hosts: Iterable[str], timeout: float = DNS_TIMEOUT) -> Dict[str, Resolution]:
    """Forward DNS of every distinct host, concurrently, each bounded by ``timeout``."""
    return run_all(resolve, hosts, timeout,
                   lambda host: Resolution(host, (), f"no answer from the resolver within {timeout:g} s", timeout, True))


def connect_all(targets: Iterable[Tuple[str, int]], timeout: float = CONNECT_TIMEOUT) -> Dict[Tuple[str, int], Connection]:
    """A TCP connect to every distinct ``(host, port)``, concurrently."""
    return run_all(lambda target: connect(target[0], target[1], timeout), targets, timeout + 0.25,
                   lambda target: Connection(target[0], target[1], False, timeout,
                                             f"no answer within {timeout:g} s"))
