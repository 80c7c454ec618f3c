"""P6: GET latency of rdzvctl's TCPStore client vs torch's own ``TCPStore.get``.

A torch TCPStore server (libuv, and the legacy one) runs in its own process
on a free loopback port and holds a realistic rendezvous value (~1.5 KB of
base64).  Both clients live in this process and time single GETs on the same
server, interleaved in rounds so machine noise hits both alike.  Both do two
round trips: torch's ``get`` is WAIT + GET, ours is CHECK + GET (a raw GET on
a missing key would not block).  Target: ours <= 1.2x torch's.

Imports torch (seconds), so the suite runs it last.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Tuple

from bench.context import Context
from bench.measure import Row

ID = "P6"
LIMIT = 1.2


def _timed(op: Callable[[], object], n: int) -> List[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        start = clock()
        op()
        out.append(clock() - start)
    return out


def measure(use_libuv: bool, samples: int, size: int = 1500, rounds: int = 10) -> Tuple[float, float]:
    """Median GET latency in microseconds: (rdzvctl's client, torch's client)."""
    from rdzvctl.backends.tcpstore import TcpStoreClient
    from tests.support.torch_peer import start_tcpstore, torch_tcpstore

    server = start_tcpstore(use_libuv=use_libuv)
    try:
        theirs = torch_tcpstore(server)
        ours = TcpStoreClient(server.host, server.port, timeout=10).connect()
        key, value = "torch.rendezvous.bench", b"A" * size
        theirs.set(key, value)
        wire = b"/" + key.encode()
        # torch's SET has no reply: its own GET (same connection, FIFO) proves it landed.
        if theirs.get(key) != value or ours.get(wire) != value:
            raise RuntimeError("the two clients read different values")

        def torch_get() -> object:
            return theirs.get(key)

        def our_get() -> object:
            return ours.get(wire)

        _timed(torch_get, 500)
        _timed(our_get, 500)
        # Short blocks, in alternating order: a burst of other work on the machine lands on
        # both clients alike (blocks of 2,000 once let one burst skew a whole row).
        rounds = max(rounds, samples // 100)
        per = max(1, samples // rounds)
        t_torch: List[float] = []
        t_ours: List[float] = []
        for i in range(rounds):
            first, second = (torch_get, our_get) if i % 2 else (our_get, torch_get)
            a, b = _timed(first, per), _timed(second, per)
            t_torch += a if first is torch_get else b
            t_ours += b if first is torch_get else a
        ours.close()
        return statistics.median(t_ours) * 1e6, statistics.median(t_torch) * 1e6
    finally:
        server.stop()


def run(ctx: Context) -> List[Row]:
    rows = []
    flavours = [True] if ctx.settings.quick else [True, False]
    for use_libuv in flavours:
        flavour = "libuv" if use_libuv else "legacy"
        ctx.log(f"P6 TCPStore GET ({flavour} server)")
        what = f"TCPStore GET, 1.5 KB value ({flavour} server)"
        try:
            ours, theirs = measure(use_libuv, ctx.settings.tcp_samples)
        except BaseException as exc:  # pytest.importorskip raises Skipped when torch is missing
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            rows.append(Row(ID, what, "c10d-tcp", None, None, "", "-", verdict="skip",
                            note=f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(Row(ID, what, "c10d-tcp", ours, theirs, "us", f"<= {LIMIT}x", LIMIT,
                        note="baseline: torch.distributed.TCPStore.get"))
    return rows
