"""A tiny gloo all-reduce for torchrun end-to-end tests.

Each worker adds ``rank + 1`` across the world and checks the sum.  With
``RDZV_E2E_DIR`` set, a worker first writes what torchrun gave it
(``<dir>/env.<restart>.<rank>.<pid>.json``: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``, ...), then after the all-reduce writes
``<dir>/rank<N>.done`` and waits for ``<dir>/release``:

* ``RDZV_E2E_HOLD`` seconds at most (default 60; ``0``: do not wait, exit at once);
* ``RDZV_E2E_LOOP=1``: all-reduce again every 0.1 s while waiting, so a dead
  peer fails the worker (as training would); the release is agreed in the
  all-reduce, so every rank stops at the same step;
* the wait also ends (exit 1) when torchrun is gone.

Unless torchrun shares its agent store with the workers
(``TORCHELASTIC_USE_AGENT_STORE=True``), rank 0 hosts the process group's
TCPStore on an IPv4 socket of its own: torch's default dual-stack server
reverse-resolves each peer (``::ffff:127.0.0.1``), which can stall for seconds.
``RDZV_E2E_PG_TIMEOUT`` bounds the process group setup (seconds, default 60).
"""

import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def _record_env(directory: str) -> None:
    record = {key: os.environ.get(key) for key in ENV_KEYS}
    record["pid"] = os.getpid()
    name = f"env.{record['TORCHELASTIC_RESTART_COUNT']}.{record['RANK']}.{os.getpid()}.json"
    with open(os.path.join(directory, name + ".tmp"), "w") as out:
        json.dump(record, out)
    os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))


def _init(timeout: timedelta) -> None:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group("gloo", timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        store = dist.TCPStore(host, port, world, is_master=True, wait_for_workers=False,
                              timeout=timeout, master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)


def _hold(directory: str, loop: bool) -> int:
    deadline = time.monotonic() + float(os.environ.get("RDZV_E2E_HOLD", "60"))
    parent = os.getppid()
    release = os.path.join(directory, "release")
    while True:
        if time.monotonic() > deadline or os.getppid() != parent:  # torchrun is gone: stop
            return 1
        if loop:
            flag = torch.tensor([1.0 if os.path.exists(release) else 0.0])
            dist.all_reduce(flag)
            if flag.item() > 0:
                return 0
        elif os.path.exists(release):
            return 0
        time.sleep(0.1 if loop else 0.05)


def main() -> int:
    directory = os.environ.get("RDZV_E2E_DIR")
    if directory:
        _record_env(directory)
    _init(timedelta(seconds=float(os.environ.get("RDZV_E2E_PG_TIMEOUT", "60"))))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    print(f"rank {rank}/{world}: all-reduce {value.item()} (expected {expected})", flush=True)
    if value.item() != expected:
        return 1
    if directory:
        with open(os.path.join(directory, f"rank{rank}.done"), "w") as done:
            done.write(f"{value.item()}\n")
        if float(os.environ.get("RDZV_E2E_HOLD", "60")) > 0:
            code = _hold(directory, os.environ.get("RDZV_E2E_LOOP") == "1")
            if code:
                return code
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
