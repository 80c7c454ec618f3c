"""Torchrun-like rendezvous nodes: real torch ``DynamicRendezvousHandler`` processes.

A handler is built the way torchrun builds it, through torch's handler registry
(``c10d``, ``etcd-v2``, and rdzvctl's ``redis``/``etcd-v3`` plugins from the
``torchrun.handlers`` entry points).  A node reads one command per line and
answers with one JSON object per line::

    next      next_rendezvous()     -> {"event": "round", "round", "rank", "world_size"}
    waiting   num_nodes_waiting()   -> {"event": "waiting", "count"}
    closed    is_closed()           -> {"event": "closed", "closed"}
    shutdown  shutdown() (closes)   -> {"event": "shutdown", "result"}
    exit      leave without shutdown() (also at end of input)

A failing call answers ``{"event": "error", "command", "type", "message"}``.
After a round the handler's keep-alive thread heartbeats on its own.

Importing torch costs seconds of CPU, so the tests start one *zygote* that
imports it once and forks a node per connection on a Unix socket::

    python tests/e2e_cli/rdzv_node.py --zygote /tmp/nodes.sock

A client connects, sends the node's options as one JSON line (``backend``,
``endpoint``, ``run_id``, ``min_nodes``, ``max_nodes``, ``conf``) and then
talks to the node over the same connection; the first answer is
``{"event": "ready", "node": "<addr>_<pid>_<local_id>", "pid"}``.  A node
also runs stand-alone on stdin/stdout::

    python tests/e2e_cli/rdzv_node.py '{"backend": "c10d", "endpoint": "127.0.0.1:29400", "run_id": "job42"}'
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from typing import IO, Any, Dict

# Short liveness so scenarios take seconds; a node's "conf" overrides any of these.
# Not 1 s x 2: torch's join loop polls once a second, so heartbeats reach ~2 s of age
# while a round forms, and with a 2 s expiry live nodes evict each other.
DEFAULT_CONF: Dict[str, Any] = {
    "join_timeout": 30,
    "last_call_timeout": 1,
    "close_timeout": 10,
    "heartbeat_timeout": 10,
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
    "read_timeout": 10,
}


def _preload() -> None:
    """Import what every node needs (torch's registry also loads the rdzvctl plugins)."""
    import importlib

    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401
    import torch.distributed.elastic.rendezvous.registry  # noqa: F401

    for optional in (
        "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend",  # needs python-etcd
        "redis",
        "rdzvctl.backends.redis_backend",
        "rdzvctl.backends.etcd_v3",
        "rdzvctl.backends.etcd_gateway",
        "rdzvctl.torchrun.backend",
        "rdzvctl.torchrun.stores",
    ):
        try:
            importlib.import_module(optional)
        except ImportError:  # that backend's nodes fail when created, with the reason
            pass


def make_handler(options: Dict[str, Any]) -> Any:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    conf = dict(DEFAULT_CONF)
    if options["backend"] == "c10d":
        conf["is_host"] = "false"  # the tests host the TCPStore themselves
    conf.update(options.get("conf") or {})
    params = RendezvousParameters(
        backend=options["backend"],
        endpoint=options["endpoint"],
        run_id=options["run_id"],
        min_nodes=int(options.get("min_nodes", 2)),
        max_nodes=int(options.get("max_nodes", 3)),
        local_addr=options.get("local_addr", "127.0.0.1"),
        **conf,
    )
    return get_rendezvous_handler(params)


class Node:
    """One handler answering commands on a line stream."""

    def __init__(self, infile: IO[str], outfile: IO[str]) -> None:
        self.infile = infile
        self.outfile = outfile

    def emit(self, event: str, **fields: Any) -> None:
        self.outfile.write(json.dumps({"event": event, **fields}) + "\n")
        self.outfile.flush()

    def run(self, options: Dict[str, Any]) -> None:
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # rank 0 need not host a store
        try:
            handler = make_handler(options)
        except Exception as exc:  # reported to the test
            self.emit("error", command="create", type=type(exc).__name__, message=str(exc))
            return
        node = handler._this_node
        self.emit("ready", node=f"{node.addr}_{node.pid}_{node.local_id}", pid=os.getpid())
        for line in self.infile:
            command = line.strip()
            if command == "exit":
                return
            if command:
                self.answer(handler, command)

    def answer(self, handler: Any, command: str) -> None:
        try:
            if command == "next":
                info = handler.next_rendezvous()
                state = handler._state_holder.state
                self.emit("round", round=state.round, rank=info.rank, world_size=info.world_size)
            elif command == "waiting":
                self.emit("waiting", count=handler.num_nodes_waiting())
            elif command == "closed":
                self.emit("closed", closed=handler.is_closed())
            elif command == "shutdown":
                self.emit("shutdown", result=handler.shutdown())
            else:
                self.emit("error", command=command, type="UnknownCommand", message=command)
        except Exception as exc:  # reported to the test, which decides
            self.emit("error", command=command, type=type(exc).__name__, message=str(exc))


def _leave(code: int = 0) -> None:
    """Exit without destructors or atexit: leaving must not touch the rendezvous."""
    sys.stdout.flush()
    os._exit(code)


def serve_zygote(path: str) -> None:
    """Fork one node per connection on the Unix socket ``path``."""
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the nodes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            random.seed()  # torch's join jitter must differ between nodes
            infile = conn.makefile("r", encoding="utf-8")
            outfile = conn.makefile("w", encoding="utf-8")
            try:
                options = json.loads(infile.readline() or "null")
                if isinstance(options, dict):
                    Node(infile, outfile).run(options)
            finally:
                _leave()
        conn.close()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--zygote":
        serve_zygote(sys.argv[2])
    elif len(sys.argv) == 2:
        _preload()
        Node(sys.stdin, sys.stdout).run(json.loads(sys.argv[1]))
        _leave()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
