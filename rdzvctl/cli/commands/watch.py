"""rdzvctl watch: follow a run live and print semantic events as they happen.

The events come from :func:`rdzvctl.follow.follow`; this command parses the
options and renders each event (a line of text, or one JSON object a line).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import click

from rdzvctl.cli.app import App, Seconds, output_option, storm_options, with_app
from rdzvctl.cli.render import render_event
from rdzvctl.follow import UNTIL_HELP, follow, parse_until


@click.command("watch")
@with_app
@output_option("text", "json")
@click.option("--interval", type=Seconds(min=0.01), default=1.0, show_default=True,
              help="Polling interval where the backend has no native watch; also how often liveness is checked.")
@click.option("--until", "until", metavar="CONDITION",
              help="Exit 0 once complete, closed, absent or round>=N holds (with --for: exit 1 if it never does).")
@click.option("--for", "duration", type=Seconds(min=0, min_open=True), metavar="SECONDS",
              help="Stop after SECONDS; with --until exit 1 if the condition did not hold by then. "
                   "(--timeout bounds each backend operation, as everywhere.)")
@click.option("--record", "record_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write every version observed to FILE (JSON lines, mode 0600) for 'rdzvctl history "
                   "--from FILE'; an existing FILE needs --force.")
@click.option("--force", is_flag=True, help="With --record: overwrite an existing FILE.")
@storm_options
def command(app: App, output: str, interval: float, until: Optional[str], duration: Optional[float],
            record_file: Optional[str], force: bool, storm: Any) -> None:
    """Follow a run live and print what changes, with timestamps.

    Events: node joined/left participants, wait list or redundancy list, rank
    changed, round advanced, completed, closed/reopened, deadline set/cleared,
    heartbeat went stale, state created/removed/corrupt, restart storm (the
    round advanced --storm-rounds times within --storm-window).  Many nodes of one
    kind at once are one event with a count (-o json: "count", and the first
    node ids in "nodes").  A corrupt value is reported and watching goes
    on.  The backend's native watch is used where it has one; otherwise the
    state is polled.  On the etcd backend (torch's legacy JSON) the run is
    polled and the events are its versions': status, joined, confirmed,
    keep-alive-expired, waiting, stuck-* (see docs/etcd-layout.md).

    \b
    Examples:
      rdzvctl watch --rdzv-backend etcd-v3 --rdzv-endpoint 10.0.0.5:2379 --rdzv-id job42
      rdzvctl watch ... --until complete --for 600 -o json   # gate a CI step on a rendezvous
      rdzvctl watch ... --record job42.history   # a history where the store keeps none (TCPStore)
    """
    if until is not None:
        try:
            parse_until(until)
        except ValueError:
            raise click.BadParameter(UNTIL_HELP, param_hint="--until") from None
    if until is not None and duration is None and app.timeout_given:
        # Before --for existed, --timeout also bounded --until: a CI gate written that way
        # must stay bounded rather than wait forever.
        duration = app.address.timeout
        app.err(f"rdzvctl: warning: --until with --timeout and no --for waits at most {duration:g}s, as before; "
                "write --for SECONDS (--timeout now bounds each backend operation only)")
    keep_alive = app.keep_alive
    backend = app.open()
    recorder = None
    try:
        if record_file is not None:
            from rdzvctl.clock import now_utc
            from rdzvctl.errors import UsageError
            from rdzvctl.inspection import is_legacy_etcd
            from rdzvctl.recording import Recorder

            if is_legacy_etcd(backend):
                raise UsageError("--record records pickled states; this run holds torch's legacy etcd JSON "
                                 "(its history: etcdctl, or the etcd v2 event window)")

            recorder = Recorder(record_file, run_id=backend.run_id, backend=app.address.backend,
                                endpoint=backend.describe(), started=now_utc(), force=force,
                                keep=[app.address.endpoint] if app.address.get("store_type") == "file" else [])
        events = follow(backend, interval=interval, keep_alive=keep_alive, until=until, duration=duration,
                        storm=storm, on_version=None if recorder is None else recorder.version)
        with contextlib.closing(events):  # stops the background read before the backend closes
            for event in events:
                if output == "json":
                    app.json_line(event)
                else:
                    render_event(app, event)
    finally:
        if recorder is not None:
            recorder.close()
        with contextlib.suppress(Exception):  # closing must not mask the result
            backend.close()
