"""rdzvctl demo: a realistic rendezvous in a local FileStore, no server needed.

By default the demo stays in the foreground and keeps its healthy nodes
heartbeating (as torch's agents do), so the story it tells stays true for as
long as somebody reads it: three participants alive, one dead, nobody waiting, so
torch's survivors stay in the round: stuck until someone repairs it.
When it stops (Ctrl-C, SIGTERM or ``--duration``) it removes the temporary
directory it made.  ``--no-live`` writes the state once and exits; its
heartbeats are then a snapshot that decays (every node looks dead after
keep_alive_interval x keep_alive_max_attempt = 15 s).
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Iterable, List, Optional

import click

from rdzvctl import clock
from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend
from rdzvctl.cli.app import App, Seconds
from rdzvctl.errors import TokenConflictError
from rdzvctl.fence import write_fenced
from rdzvctl.state.codec import decode, encode
from rdzvctl.state.model import NodeDesc, RendezvousState

RUN_ID = "demo-job"


def _dead_node():
    return NodeDesc("trainer-3.cluster.local", 4103, 0)


def demo_state(now: _dt.datetime):
    """Round 2 complete: three healthy participants, one dead one, nobody waiting (stuck)."""
    alive = [NodeDesc(f"trainer-{i}.cluster.local", 4100 + i, 0) for i in range(3)]
    dead = _dead_node()
    members = sorted(alive + [dead])
    state = RendezvousState(round=2, complete=True, closed=False)
    state.participants = {node: rank for rank, node in enumerate(members)}
    state.last_heartbeats = {node: now - _dt.timedelta(seconds=1 + i) for i, node in enumerate(alive)}
    state.last_heartbeats[dead] = now - _dt.timedelta(seconds=47)
    return state


def demo_story(now: _dt.datetime) -> List[RendezvousState]:
    """The versions the demo's run went through, oldest first, ending in :func:`demo_state`.

    Three trainers form round 0; trainer-3 arrives ten minutes later, waits,
    and the scale-up restarts the others into round 1 with four; a worker
    failure restarts everyone into round 2; then trainer-3 stops heartbeating.
    The FileStore log keeps every version, so ``rdzvctl history`` tells it.
    Each version's heartbeats are as old as that moment (history infers a
    FileStore version's time from its newest heartbeat).
    """
    nodes = sorted(NodeDesc(f"trainer-{i}.cluster.local", 4100 + i, 0) for i in range(3))
    late = _dead_node()

    def version(round_: int, members: List[NodeDesc], ago: float, *, complete: bool,
                waiting: Iterable[NodeDesc] = ()) -> RendezvousState:
        state = RendezvousState(round=round_, complete=complete, closed=False)
        # torch's joins hold rank 0 until the round completes and ranks are handed out in order
        state.participants = {node: rank if complete else 0 for rank, node in enumerate(sorted(members))}
        state.wait_list = set(waiting)
        at = now - _dt.timedelta(seconds=ago)
        state.last_heartbeats = {node: at for node in [*members, *waiting]}
        return state

    return [
        version(0, nodes[:2], 1500, complete=False),
        version(0, nodes, 1490, complete=False),
        version(0, nodes, 1480, complete=True),
        version(0, nodes, 900, complete=True, waiting=[late]),
        version(1, [late], 890, complete=False),
        version(1, [*nodes, late], 880, complete=True),
        version(2, [*nodes, late], 300, complete=False),
        version(2, [*nodes, late], 290, complete=True),
        demo_state(now),
    ]


def heartbeat(state: Any, now: _dt.datetime) -> None:
    """One tick of the simulated agents: every node but the dead one heartbeats.

    Nothing else changes: a node joining the wait list would make torch's
    agents re-rendezvous by themselves, and the demo's story (a stuck round
    that needs a repair) would no longer be true.
    """
    dead = _dead_node()
    for node in state.last_heartbeats:
        if node != dead:
            state.last_heartbeats[node] = now


@click.command("demo")
@click.option("--path", type=click.Path(file_okay=False),
              help="Directory for the FileStore (default: a new temp dir, removed when the demo stops).")
@click.option("--live/--no-live", default=True, show_default=True,
              help="Keep the nodes heartbeating until stopped (--no-live: write once and exit; "
                   "the heartbeats then age and every node looks dead after 15 s).")
@click.option("--interval", type=Seconds(min=0.1), default=2.0, show_default=True,
              help="Seconds between simulated heartbeats.")
@click.option("--duration", type=Seconds(min=0), default=3600.0, show_default=True,
              help="Stop the live demo after this many seconds.")
@click.pass_context
def command(ctx: click.Context, path: Optional[str], live: bool, interval: float, duration: float) -> None:
    """Create a FileStore holding a realistic rendezvous and print commands to try.

    The state has three healthy participants and one whose heartbeat is
    stale, and nobody waits: torch's survivors stay in the round (stuck).  It is a
    real torch FileStore: torch's own C10dRendezvousBackend reads it too.

    The demo keeps running and heartbeating the healthy nodes, like torch's
    agents, so the state stays true while you try the commands in another
    terminal; Ctrl-C stops it and removes the temporary directory.
    """
    app = App(ctx, None, None, None, None, None)
    directory = path or tempfile.mkdtemp(prefix="rdzvctl-demo-")
    os.makedirs(directory, exist_ok=True)
    store = os.path.join(directory, "rendezvous.store")
    backups = os.path.join(directory, "backups")
    with open(store, "ab"):
        pass  # the FileStore file must exist; rdzvctl never creates one behind torch's back
    address = Address("c10d", store, RUN_ID, {"store_type": "file"})
    with open_backend(address) as backend:
        current = backend.get_state()
        token = None if current is None else current[1]
        now = clock.now_utc()
        # A new store gets the run's past too (for `rdzvctl history`); an existing one only the stuck state.
        for state in demo_story(now) if current is None else [demo_state(now)]:
            written = write_fenced(backend, token, encode(state))
            token = None if written is None else written[1]
    env = (f"export PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT={store} PET_RDZV_ID={RUN_ID} "
           f"PET_RDZV_CONF=store_type=file RDZVCTL_BACKUP_DIR={backups}")
    app.out(f"A rendezvous for run {RUN_ID!r} is in the FileStore {store}.\n")
    app.out("Address it the torchrun way (flags or these variables)" + (", in another terminal" if live else "")
            + ":\n")
    app.out(f"  {env}\n")
    app.out("Then try:")
    for line, why in (
        ("rdzvctl doctor", "the checklist: store, DNS of the nodes, clock, bootstrap (exit 1)"),
        ("rdzvctl get", "decoded state: ranks, heartbeat ages, a dead participant"),
        ("rdzvctl history", "how the run got here: joins, a scale-up, restarts (the FileStore log)"),
        ("rdzvctl corrupt-detect", "names the dead node and the repair (exit 1)"),
        ("rdzvctl reset --mode prune --dry-run", "the repair as a diff, nothing written"),
        ("rdzvctl reset --mode prune --yes", "prune it, fenced, with a backup (exit 3: a heartbeat won; rerun)"),
        ("rdzvctl restore BACKUP --yes", "put the exact prior bytes back"),
        ("rdzvctl watch", "follow the heartbeats and nodes joining and leaving live"),
        ("rdzvctl get -o json", "the documented JSON form"),
        ("rdzvctl report --output incident.md", "everything above as one Markdown report for the ticket"),
    ):
        app.out(f"  {line:<40} # {why}")
    if not live:
        app.out(f"\nThis is a snapshot: its heartbeats age, so after 15 s every node looks dead "
                f"(`rdzvctl demo` keeps them alive).\nRemove it with: rm -r {directory}")
        return
    removal = "and removes " + directory if path is None else "(" + directory + " is kept)"
    app.err("")
    app.err(f"Nodes heartbeat every {interval:g}s for up to {duration:g}s; Ctrl-C stops them {removal}.")
    try:
        _run_live(address, interval, duration)
    finally:
        if path is None:
            shutil.rmtree(directory, ignore_errors=True)
            app.err(f"Stopped; removed {directory}.")
        else:
            app.err("Stopped.")


def _run_live(address: Any, interval: float, duration: float) -> None:
    """Heartbeat the healthy nodes until interrupted, SIGTERM or ``duration`` seconds."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    end = time.monotonic() + duration
    try:
        with open_backend(address) as backend:
            while time.monotonic() + interval < end:
                time.sleep(interval)
                current = backend.get_state()
                if current is None:  # cleared by the user: the demo's nodes are gone
                    continue
                state = decode(current[0])
                heartbeat(state, clock.now_utc())
                try:
                    write_fenced(backend, current[1], encode(state))
                except TokenConflictError:
                    continue  # the user wrote meanwhile; beat again next tick
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
