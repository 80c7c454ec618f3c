"""One writer of the fencing-under-load test: fenced read-modify-write increments of ``round``.

Run as ``python -m tests.reliability.fencing_worker '<json options>'`` with
``backend``, ``endpoint``, ``run_id``, ``conf``, ``attempts`` and
``seconds`` (a time cap) and ``writer`` (this worker's number).  The worker imports everything, prints ``ready``,
waits for a line on stdin (the start signal shared by all workers), then per
attempt reads ``(state, token)``, decodes the state, writes it back with
``round + 1`` fenced by the token read, and logs the outcome.  Each write
also stamps the writer and attempt into the state (a heartbeat of node
``fencing-writer-<writer>_<attempt>_0``): c10d's tokens are the stored bytes,
so two writers storing identical bytes would be indistinguishable (torch's
own c10d backend then reports both as set).  At the end it
prints one JSON document: ``{"history": [[outcome, token_read, token_written,
round_written], ...]}`` with tokens in ``format_token`` form.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, List


def main(options: dict) -> None:
    from rdzvctl.backends.base import Address
    from rdzvctl.backends.registry import open_backend
    from rdzvctl.errors import RdzvctlError
    from rdzvctl.state.codec import decode, encode
    from rdzvctl.state.model import NodeDesc

    address = Address(options["backend"], options["endpoint"], options["run_id"], options.get("conf") or {},
                      float(options.get("timeout", 10)))
    backend = open_backend(address)
    history: List[List[Any]] = []
    print("ready", flush=True)
    sys.stdin.readline()
    stop_at = time.monotonic() + float(options["seconds"])
    writer = int(options.get("writer", 0))
    for attempt in range(int(options["attempts"])):
        if time.monotonic() > stop_at:
            break
        try:
            current = backend.get_state()
            assert current is not None, "the counter state vanished"
            raw, token = current
            state = decode(raw)
            state.round += 1
            stamp = {n: t for n, t in state.last_heartbeats.items() if not n.addr.startswith("fencing-writer")}
            stamp[NodeDesc(f"fencing-writer-{writer}", attempt, 0)] = datetime.now(timezone.utc)
            state.last_heartbeats = stamp
            result = backend.set_state(encode(state), token)
        except RdzvctlError as exc:
            history.append(["error", None, None, type(exc).__name__])
            continue
        read = backend.format_token(token)
        if result is not None and result[2]:
            history.append(["accepted", read, backend.format_token(result[1]), state.round])
        else:
            history.append(["refused", read, None, state.round - 1])
    backend.close()
    print(json.dumps({"history": history}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
