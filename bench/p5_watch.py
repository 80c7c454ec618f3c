"""P5: ``watch`` latency, from a write to the event line printed, p50 and p99.

``rdzvctl watch -o json`` runs as a subprocess; a reader thread timestamps
each stdout line as it arrives.  The write is a raw one (one HSET, one etcd
put, one TCPStore SET, one FileStore append), sent right after the clock
starts, and changes the round so rdzvctl prints a ``round-advanced`` event.
The reference is the server's own watch client on the same key (``etcdctl
watch``, ``redis-cli`` keyspace SUBSCRIBE), measured the same way in
alternating blocks.  The target (p50 <= 10 ms) applies to the backends with a
native watch; c10d is polled (``--interval 0.1``), shown for information.
"""

from __future__ import annotations

import base64
import http.client
import json
import queue
import random
import subprocess
import threading
import time
from typing import Any, List, Optional, Tuple
from urllib.parse import urlencode

from bench.context import Context
from bench.measure import REPO, Row, median, percentile, rdzvctl_argv
from bench.servers import BACKENDS, Target
from bench.states import make_state

ID = "P5"
RUN_ID = "bench-watch"
P50_LIMIT_MS = 10.0
NATIVE = ("redis", "etcd-v2", "etcd-v3")
POLL_INTERVAL = 0.1


class RawWriter:
    """Writes the run's stored value with one request, the cheapest way each backend allows."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.version = 0
        self.conn: Any = None
        label = target.label
        if label == "redis":
            self.conn = target.server.client()
        elif label.startswith("etcd"):
            self.conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
        elif label == "c10d-tcp":
            from rdzvctl.backends.tcpstore import TcpStoreClient

            self.conn = TcpStoreClient(target.host, target.port, timeout=10).connect()
        else:
            from rdzvctl.backends.filestore import FileStore

            self.conn = FileStore(target.endpoint, timeout=10)

    def write(self, value: bytes) -> None:
        """Store ``value`` (the base64 text) as the run's state."""
        label = self.target.label
        self.version += 1
        if label == "redis":
            self.conn.hset(f"torch.rendezvous.{RUN_ID}", mapping={"state": value, "version": self.version})
        elif label == "etcd-v3":
            key = base64.b64encode(f"/torch/elastic/rendezvous/{RUN_ID}".encode()).decode()
            self._http("POST", "/v3/kv/put", json.dumps({"key": key, "value": base64.b64encode(value).decode()}),
                       "application/json")
        elif label == "etcd-v2":
            self._http("PUT", f"/v2/keys/torch/elastic/rendezvous/{RUN_ID}", urlencode({"value": value}),
                       "application/x-www-form-urlencoded")
        else:
            self.conn.set(f"/torch.rendezvous.{RUN_ID}".encode(), value)

    def _http(self, method: str, path: str, body: str, content_type: str) -> None:
        self.conn.request(method, path, body, {"Content-Type": content_type})
        answer = self.conn.getresponse()
        answer.read()
        if answer.status not in (200, 201):
            raise RuntimeError(f"{self.target.label} {method} {path}: HTTP {answer.status}")

    def close(self) -> None:
        self.conn.close()


class Follower:
    """A watching subprocess whose stdout lines are timestamped on arrival."""

    def __init__(self, argv: List[str], env: dict) -> None:
        self.lines: "queue.Queue[Tuple[float, bytes]]" = queue.Queue()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=REPO, bufsize=0)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        clock = time.perf_counter
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put((clock(), line))

    def next_line(self, timeout: float) -> Optional[Tuple[float, bytes]]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self, quiet: float) -> None:
        """Consume lines until none arrived for ``quiet`` seconds."""
        while self.next_line(quiet) is not None:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.thread.join(5)


class Rounds:
    """Precomputed stored values (base64), each one round further."""

    def __init__(self, count: int) -> None:
        from rdzvctl.state.codec import encode

        state = make_state(8)
        self.values = []
        for round_ in range(1, count + 1):
            state.round = round_
            self.values.append(base64.b64encode(encode(state)))
        self.next = 0

    def take(self) -> bytes:
        value = self.values[self.next]
        self.next += 1
        return value


def _block(follower: Follower, writer: RawWriter, rounds: Rounds, events: int, warmup: int = 2) -> List[float]:
    """Latencies (s) of ``events`` writes, after making sure the follower is live."""
    for _ in range(50):  # the watcher is live once a write shows up
        writer.write(rounds.take())
        if follower.next_line(1.0) is not None:
            break
    else:
        raise RuntimeError("the watcher printed nothing after 50 writes")
    follower.drain(0.2)
    latencies = []
    for i in range(warmup + events):
        time.sleep(0.02 + random.random() * 0.02)
        follower.drain(0)
        value = rounds.take()
        start = time.perf_counter()
        writer.write(value)
        got = follower.next_line(10.0)
        if got is None:
            raise RuntimeError("no event line within 10 s of a write")
        if i >= warmup:
            latencies.append(got[0] - start)
        follower.drain(0.03)
    return latencies


def run(ctx: Context) -> List[Row]:
    s = ctx.settings
    what = "watch: write -> event line"
    rows = ctx.skipped_rows(ID, what, list(BACKENDS))
    blocks = 2
    per_block = max(1, s.watch_events // blocks)
    for target in ctx.targets():
        ctx.log(f"P5 {target.label}")
        native = target.label in NATIVE
        reference = target.reference_watch(RUN_ID)
        ours_argv = rdzvctl_argv() + ["watch", "-o", "json", "--interval", str(POLL_INTERVAL)] + target.flags(
            RUN_ID, "keep_alive_interval=3600")
        rounds = Rounds((per_block + 60) * blocks * 2)
        writer = RawWriter(target)
        ours: List[float] = []
        theirs: List[float] = []
        try:
            for _ in range(blocks):
                for argv, env, sink in ((ours_argv, ctx.env, ours),
                                        (reference.argv if reference else None,
                                         dict(ctx.env, **reference.env) if reference else None, theirs)):
                    if argv is None:
                        continue
                    follower = Follower(argv, env)
                    try:
                        sink += _block(follower, writer, rounds, per_block)
                    finally:
                        follower.close()
        finally:
            writer.close()
            target.clear(RUN_ID)
        ref_name = reference.name if reference else ""
        how = "native" if native else f"polled every {POLL_INTERVAL:g}s"
        base50 = median(theirs) * 1000 if theirs else None
        base99 = percentile(theirs, 99) * 1000 if theirs else None
        rows.append(Row(ID, f"{what} p50 ({how})", target.label, median(ours) * 1000, base50, "ms",
                        f"p50 <= {P50_LIMIT_MS:g} ms" if native else "-", P50_LIMIT_MS if native else None,
                        check="at_most", note=f"baseline: {ref_name}" if ref_name else ""))
        rows.append(Row(ID, f"{what} p99 ({how})", target.label, percentile(ours, 99) * 1000, base99, "ms", "-"))
    return rows
