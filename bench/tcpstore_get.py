"""P6 on its own: rdzvctl's TCPStore GET vs torch's ``TCPStore.get`` (see :mod:`bench.p6_tcpstore`).

    python bench/tcpstore_get.py [--samples 20000] [--legacy] [--size 1500]

The same measurement runs inside the suite: ``python -m bench --only P6``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.p6_tcpstore import LIMIT, measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1500, help="value size in bytes")
    parser.add_argument("--legacy", action="store_true", help="also bench the legacy server")
    args = parser.parse_args()
    ok = True
    for use_libuv in [True, False] if args.legacy else [True]:
        ours, theirs = measure(use_libuv, args.samples, args.size)
        ratio = ours / theirs
        ok = ok and ratio <= LIMIT
        print(f"P6 TCPStore GET ({'libuv' if use_libuv else 'legacy'} server, {args.size} B value, "
              f"{args.samples} samples each): rdzvctl {ours:.1f} us, torch {theirs:.1f} us, "
              f"ratio {ratio:.2f}x (target <= {LIMIT}x) {'OK' if ratio <= LIMIT else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
