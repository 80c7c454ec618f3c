"""Serve ``/metrics`` (text or OpenMetrics as the scraper asks, gzip) and ``/healthz``.

``/healthz`` says the exporter process answers; whether the backend does is
``rdzvctl_backend_up`` on ``/metrics``.  SIGINT and SIGTERM stop the server
cleanly (:func:`serve` returns the signal number).
"""

from __future__ import annotations

import gzip
import signal
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Callable, List, Optional, Tuple, Type

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler, choose_encoder, gzip_accepted

from rdzvctl.errors import UsageError
from rdzvctl.monitor.exposition import render_as
from rdzvctl.state.model import collector_paused

__all__ = ["DEFAULT_LISTEN", "parse_listen", "make_server", "serve"]

#: Loopback only by default: exposing the page is a decision.
DEFAULT_LISTEN = "127.0.0.1:9469"

#: Fast gzip: a page of 10,000 runs (~15 MB) shrinks ~20x at level 1 in a tenth of level 9's time.
GZIP_LEVEL = 1


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all interfaces); port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _handler(registry: CollectorRegistry) -> Type[MetricsHandler]:
    class Handler(MetricsHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path in ("/metrics", "/"):
                self._metrics()
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n")

        def _metrics(self) -> None:
            # prometheus_client's own handler gzips at level 9: seconds of CPU for a 10,000-run page.
            encoder, content_type = choose_encoder(self.headers.get("Accept") or "")
            # encoder(registry)'s bytes, in a third of its time.  No cyclic collection meanwhile: a page
            # of 10,000 runs holds ~170,000 samples and label dicts until it is written, which set
            # off one or two full collections of the whole cache per scrape (250-500 ms).
            with collector_paused():
                body = render_as(registry, encoder)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if gzip_accepted(self.headers.get("Accept-Encoding") or ""):
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    Handler.registry = registry
    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def make_server(listen: str, registry: CollectorRegistry) -> ThreadingHTTPServer:
    """Bind ``listen``; a busy port or a bad host is a usage error naming it."""
    host, port = parse_listen(listen)
    server_class: Type[ThreadingHTTPServer] = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        return server_class((host, port), _handler(registry))
    except OSError as exc:
        raise UsageError(f"--listen {listen}: cannot listen there: {exc.strerror or exc}") from None


def serve(server: ThreadingHTTPServer, on_ready: Optional[Callable[[str], None]] = None) -> int:
    """Serve until SIGINT or SIGTERM; returns the signal that stopped it."""
    received: List[int] = []

    def stop(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_ready is not None:
            host, port = (str(part) for part in server.server_address[:2])
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{port}/metrics")
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else signal.SIGTERM
