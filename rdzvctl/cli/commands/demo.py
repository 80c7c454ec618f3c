"""rdzvctl demo: a realistic rendezvous in a local FileStore, no server needed."""

from __future__ import annotations

import datetime as _dt
import os
import random
import tempfile
import time
from typing import Optional

import click

from rdzvctl.cli.app import App

RUN_ID = "demo-job"


def demo_state(now: _dt.datetime):
    """Round 2 complete: three healthy participants, one dead one, nobody waiting (stuck)."""
    from rdzvctl.state.model import NodeDesc, RendezvousState

    alive = [NodeDesc(f"trainer-{i}.cluster.local", 4100 + i, 0) for i in range(3)]
    dead = NodeDesc("trainer-3.cluster.local", 4103, 0)
    members = sorted(alive + [dead])
    state = RendezvousState(round=2, complete=True, closed=False)
    state.participants = {node: rank for rank, node in enumerate(members)}
    state.last_heartbeats = {node: now - _dt.timedelta(seconds=1 + i) for i, node in enumerate(alive)}
    state.last_heartbeats[dead] = now - _dt.timedelta(seconds=47)
    return state


@click.command("demo")
@click.option("--path", type=click.Path(file_okay=False), help="Directory for the FileStore (default: a new temp dir).")
@click.option("--live", is_flag=True, help="Keep nodes heartbeating and joining until interrupted (for watch).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between simulated heartbeats with --live.")
@click.pass_context
def command(ctx: click.Context, path: Optional[str], live: bool, interval: float) -> None:
    """Create a FileStore holding a realistic rendezvous and print commands to try.

    The state has three healthy participants and one whose heartbeat is
    stale, and nobody waits: torch's survivors stay in the round (stuck).  It is a
    real torch FileStore: torch's own C10dRendezvousBackend reads it too.
    """
    from rdzvctl.backends.base import Address
    from rdzvctl.backends.registry import open_backend
    from rdzvctl.fence import write_fenced
    from rdzvctl.inspect import now_utc
    from rdzvctl.state.codec import encode

    app = App(ctx, None, None, None, None, None)
    directory = path or tempfile.mkdtemp(prefix="rdzvctl-demo-")
    os.makedirs(directory, exist_ok=True)
    store = os.path.join(directory, "rendezvous.store")
    with open(store, "ab"):
        pass  # the FileStore file must exist; rdzvctl never creates one behind torch's back
    address = Address("c10d", store, RUN_ID, {"store_type": "file"})
    with open_backend(address) as backend:
        current = backend.get_state()
        write_fenced(backend, None if current is None else current[1], encode(demo_state(now_utc())))
    env = f"export PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT={store} PET_RDZV_ID={RUN_ID} PET_RDZV_CONF=store_type=file"
    app.out(f"A rendezvous for run {RUN_ID!r} is in the FileStore {store}.\n")
    app.out("Address it the torchrun way (flags or these variables):\n")
    app.out(f"  {env}\n")
    app.out("Then try:")
    for line, why in (
        ("rdzvctl get", "decoded state: ranks, heartbeat ages, a dead participant"),
        ("rdzvctl corrupt-detect", "names the dead node and the repair (exit 1)"),
        ("rdzvctl reset --mode prune --dry-run", "the repair as a diff, nothing written"),
        ("rdzvctl reset --mode prune --yes", "prune it, fenced, with a backup"),
        ("rdzvctl restore BACKUP --yes", "put the exact prior bytes back"),
        ("rdzvctl watch", "follow changes live (run `rdzvctl demo --live --path DIR` for activity)"),
        ("rdzvctl get -o json", "the documented JSON form"),
    ):
        app.out(f"  {line:<40} # {why}")
    if live:
        app.err(f"\nSimulating live nodes every {interval:g}s; Ctrl-C to stop.")
        _run_live(address, interval)


def _run_live(address, interval: float) -> None:
    """Heartbeat the healthy nodes and let a node join or leave now and then."""
    from rdzvctl.backends.registry import open_backend
    from rdzvctl.errors import TokenConflictError
    from rdzvctl.fence import write_fenced
    from rdzvctl.inspect import now_utc
    from rdzvctl.state.codec import decode, encode
    from rdzvctl.state.model import NodeDesc

    rng = random.Random(7)
    extra = 10
    with open_backend(address) as backend:
        try:
            while True:
                time.sleep(interval)
                current = backend.get_state()
                if current is None:
                    continue
                state = decode(current[0])
                now = now_utc()
                for node in list(state.last_heartbeats):
                    if (now - state.last_heartbeats[node]).total_seconds() < 20:
                        state.last_heartbeats[node] = now
                roll = rng.random()
                if roll < 0.3:
                    node = NodeDesc(f"trainer-{extra}.cluster.local", 6000 + extra, 0)
                    extra += 1
                    state.wait_list.add(node)
                    state.last_heartbeats[node] = now
                elif roll < 0.45 and state.wait_list:
                    node = sorted(state.wait_list)[0]
                    state.wait_list.discard(node)
                    state.last_heartbeats.pop(node, None)
                try:
                    write_fenced(backend, current[1], encode(state))
                except TokenConflictError:
                    continue
        except KeyboardInterrupt:
            return
