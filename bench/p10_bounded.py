"""P10: the bounded-cost promise of the decoder: worst-case inputs at the size cap.

Each input (``MAX_STATE_BYTES`` of a flood from the hostile corpus, hash
floods among them (dict keys and set items sharing hashes), and a valid state
just under the cap) is written to a file; a fresh process reads
it and decodes it (``rdzvctl.state.codec.decode``), refused or not.  The row
is that process's wall time and its own peak RSS (interpreter included),
against 2 s and 256 MiB.  The baseline column is the same process reading
the file and exiting, so the decoder's own share is the difference.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import List, Tuple

from bench.context import Context, ms
from bench.measure import Row, median, time_interleaved

ID = "P10"
SECONDS = 2.0
MIB = 256

_DECIDE = ("import sys\nfrom rdzvctl.errors import StateError\nfrom rdzvctl.state.codec import decode\n"
           "data = open(sys.argv[1], 'rb').read()\n"
           "try:\n    decode(data)\nexcept StateError:\n    pass\n")
_READ = "import sys\nimport rdzvctl.state.codec\ndata = open(sys.argv[1], 'rb').read()\n"


def _inputs(quick: bool) -> List[Tuple[str, bytes]]:
    from bench.states import state_bytes
    from rdzvctl.state.codec import MAX_STATE_BYTES
    from tests.reliability.malicious.corpus import hash_flood_payloads, resource_payloads

    wanted = {"flood-empty-set", "flood-empty-dict", "flood-set-reduce", "flood-short-strings", "flood-none",
              "flood-memoize", "flood-tuple1", "flood-nodes"}
    # Hash floods: the int ones a state may hold reach the unpickler (as colliding as
    # 64-bit ints get); the tuple and frozenset ones are refused by the prescan;
    # hash-node-ids is a valid state whose nodes collide as hash((addr, pid, local_id)).
    floods = {"hash-int64-low-bits", "hash-int64-same-hash", "hash-tuple-items", "hash-memo-tuple-keys",
              "hash-frozenset-items", "hash-node-ids"}
    if quick:
        wanted = {"flood-empty-set", "flood-none"}
        floods = {"hash-int64-low-bits"}
    out = [(name, data) for name, data in resource_payloads(MAX_STATE_BYTES) if name in wanted]
    out += list(hash_flood_payloads(MAX_STATE_BYTES, floods))
    nodes = 180_000 if not quick else 20_000
    real = state_bytes(nodes)
    while len(real) > MAX_STATE_BYTES:
        nodes -= 5_000
        real = state_bytes(nodes)
    out.append((f"valid state, {nodes:,} nodes", real))
    return out


def run(ctx: Context) -> List[Row]:
    rows: List[Row] = []
    repeats = 1 if ctx.settings.quick else 3
    with tempfile.TemporaryDirectory(prefix="rdzvctl-p8-") as tmp:
        for name, data in _inputs(ctx.settings.quick):
            path = os.path.join(tmp, "input.bin")
            with open(path, "wb") as f:
                f.write(data)
            size = len(data) >> 20
            del data
            ctx.log(f"P10 {name} ({size} MiB)")
            timed = time_interleaved({"decide": [sys.executable, "-c", _DECIDE, path],
                                      "read": [sys.executable, "-c", _READ, path]}, ctx.env, 1, repeats)
            rss = median([p.max_rss_kib for p in timed["decide"]]) / 1024
            base_rss = median([p.max_rss_kib for p in timed["read"]]) / 1024
            cpu = median([p.cpu for p in timed["decide"]])
            rows.append(Row(ID, f"decide {name} ({size} MiB)", "-", ms(timed["decide"]), ms(timed["read"]), "ms",
                            f"<= {SECONDS:g} s", SECONDS * 1000, check="at_most", note=f"cpu {cpu:.2f} s"))
            rows.append(Row(ID, f"peak RSS, {name}", "-", rss, base_rss, "MiB", f"<= {MIB} MiB", MIB,
                            check="at_most"))
    return rows
