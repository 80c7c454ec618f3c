"""A tiny gloo all-reduce for torchrun end-to-end tests.

Each worker adds ``rank + 1`` across the world and checks the sum.  With
``RDZV_E2E_DIR`` set, it then writes ``<dir>/rank<N>.done`` and waits (up to
``RDZV_E2E_HOLD`` seconds, default 60, or until torchrun is gone) for
``<dir>/release``, so a test can inspect the rendezvous while the job is
still running.
"""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    print(f"rank {rank}/{world}: all-reduce {value.item()} (expected {expected})", flush=True)
    if value.item() != expected:
        return 1
    directory = os.environ.get("RDZV_E2E_DIR")
    if directory:
        with open(os.path.join(directory, f"rank{rank}.done"), "w") as done:
            done.write(f"{value.item()}\n")
        deadline = time.monotonic() + float(os.environ.get("RDZV_E2E_HOLD", "60"))
        parent = os.getppid()
        while not os.path.exists(os.path.join(directory, "release")):
            if time.monotonic() > deadline or os.getppid() != parent:  # torchrun is gone: stop
                return 1
            time.sleep(0.05)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
