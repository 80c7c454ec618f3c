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
Tests drive it with :class:`Agent` / :func:`agents` (``python`` runs this file).
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

SCRIPT = Path(__file__).resolve()


class Agent:
    """One ``EtcdRendezvousHandler`` in its own process (tests/support/legacy_etcd_agent.py)."""

    def __init__(self, endpoint: str, run_id: str, min_nodes: int = 2, max_nodes: int = 2, **conf: Any):
        options = {"endpoint": endpoint, "run_id": run_id, "min_nodes": min_nodes, "max_nodes": max_nodes,
                   "conf": conf}
        self.process = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(options)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, kind: str, timeout: float = 90.0) -> Dict[str, Any]:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the agent did not answer {kind!r} within {timeout:g} s") from None
        assert event is not None, "the agent exited"
        assert event["event"] == kind, event
        return event

    def call(self, command: str, kind: str, timeout: float = 90.0) -> Dict[str, Any]:
        self.send(command)
        return self.expect(kind, timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("exit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.kill()


@contextlib.contextmanager
def agents(endpoint: str, run_id: str, count: int, **options: Any) -> Iterator[List[Agent]]:
    started = [Agent(endpoint, run_id, **options) for _ in range(count)]
    try:
        for agent in started:
            agent.expect("ready")
        yield started
    finally:
        for agent in started:
            agent.close()


def rendezvous(group: List[Agent]) -> List[Dict[str, Any]]:
    for agent in group:
        agent.send("next")
    return [agent.expect("round") for agent in group]


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
