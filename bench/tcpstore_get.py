"""P6: GET latency of rdzvctl's TCPStore client vs torch's own ``TCPStore.get``.

Starts a torch TCPStore server (libuv, and the legacy one with ``--legacy``) in
a subprocess on a free loopback port, stores a realistic rendezvous value
(~1.5 KB of base64), then times single GETs through both clients on the same
server, interleaved in rounds so machine noise hits both alike.  Prints the
median latencies and the ratio (target: ours <= 1.2x torch's).

    python bench/tcpstore_get.py [--samples 20000] [--legacy] [--size 1500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rdzvctl.backends.tcpstore import TcpStoreClient  # noqa: E402

TARGET = 1.2

_SERVER = r"""
import sys
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                      use_libuv=sys.argv[1] == "1", timeout=timedelta(seconds=30))
print(store.port, flush=True)
sys.stdin.read()
"""


def _timed(op: Callable[[], object], n: int) -> List[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        start = clock()
        op()
        out.append(clock() - start)
    return out


def bench(use_libuv: bool, samples: int, size: int, rounds: int = 10) -> float:
    import torch.distributed as dist

    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, "1" if use_libuv else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        theirs = dist.TCPStore("127.0.0.1", port, is_master=False, use_libuv=use_libuv,
                               timeout=timedelta(seconds=10))
        ours = TcpStoreClient("127.0.0.1", port, timeout=10).connect()
        key, value = "torch.rendezvous.bench", b"A" * size
        theirs.set(key, value)
        wire = b"/" + key.encode()
        assert ours.get(wire) == theirs.get(key) == value

        def torch_get() -> object:
            return theirs.get(key)

        def our_get() -> object:
            return ours.get(wire)

        _timed(torch_get, 500)
        _timed(our_get, 500)
        per = max(1, samples // rounds)
        t_torch: List[float] = []
        t_ours: List[float] = []
        for _ in range(rounds):
            t_torch += _timed(torch_get, per)
            t_ours += _timed(our_get, per)
        ours.close()
        m_torch = statistics.median(t_torch) * 1e6
        m_ours = statistics.median(t_ours) * 1e6
        ratio = m_ours / m_torch
        flavour = "libuv" if use_libuv else "legacy"
        verdict = "OK" if ratio <= TARGET else "MISSED"
        print(f"P6 TCPStore GET ({flavour} server, {size} B value, {len(t_ours)} samples each): "
              f"rdzvctl {m_ours:.1f} us, torch {m_torch:.1f} us, ratio {ratio:.2f}x "
              f"(target <= {TARGET}x) {verdict}")
        return ratio
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1500, help="value size in bytes")
    parser.add_argument("--legacy", action="store_true", help="also bench the legacy server")
    args = parser.parse_args()
    ratios = [bench(True, args.samples, args.size)]
    if args.legacy:
        ratios.append(bench(False, args.samples, args.size))
    return 0 if all(r <= TARGET for r in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
