"""One torch legacy ``etcd`` rendezvous handler (``EtcdRendezvousHandler``) driven over stdin/stdout.

Built the way torchrun builds it: torch's handler registry with
``--rdzv-backend=etcd`` (``create_rdzv_handler``).  Options are one JSON
argument (``endpoint``, ``run_id``, ``min_nodes``, ``max_nodes``, ``conf``);
commands, one per line, answer one JSON line each::

    next      next_rendezvous()   -> {"event": "round", "rank", "world_size", "version"}
    closed    is_closed()         -> {"event": "closed", "closed"}
    waiting   num_nodes_waiting() -> {"event": "waiting", "count"}
    shutdown  shutdown()          -> {"event": "shutdown", "result"}
    exit      leave without shutdown() (also at end of input)

A failing call answers ``{"event": "error", "command", "type", "message"}``.
After a round the handler's lease thread renews its keep-alive key on its own.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict


def main(options: Dict[str, Any]) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    conf = {"timeout": 60, "last_call_timeout": 1, **(options.get("conf") or {})}
    try:
        params = RendezvousParameters(backend="etcd", endpoint=options["endpoint"], run_id=options["run_id"],
                                      min_nodes=int(options.get("min_nodes", 2)),
                                      max_nodes=int(options.get("max_nodes", 2)), local_addr="127.0.0.1", **conf)
        handler = get_rendezvous_handler(params)
    except Exception as exc:  # reported to the test
        emit("error", command="create", type=type(exc).__name__, message=str(exc))
        return
    emit("ready")
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "exit":
                break
            if command == "next":
                info = handler.next_rendezvous()
                emit("round", rank=info.rank, world_size=info.world_size,
                     version=handler._rdzv_impl.get_rdzv_state()[1].get("version"))
            elif command == "closed":
                emit("closed", closed=handler.is_closed())
            elif command == "waiting":
                emit("waiting", count=handler.num_nodes_waiting())
            elif command == "shutdown":
                emit("shutdown", result=handler.shutdown())
            else:
                emit("error", command=command, type="UnknownCommand", message=command)
        except Exception as exc:
            emit("error", command=command, type=type(exc).__name__, message=str(exc))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
