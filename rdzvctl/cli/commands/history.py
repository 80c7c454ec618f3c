"""rdzvctl history: the run's past as a timeline of semantic events, oldest first.

The events come from :mod:`rdzvctl.timeline` (the backend's history, or a
``watch --record`` file); this command parses the options and renders them.
"""

from __future__ import annotations

from typing import Any, Optional

import click

from rdzvctl.cli.app import App, output_option, storm_options, with_app
from rdzvctl.cli.render import render_event


@click.command("history")
@with_app
@output_option("text", "json")
@click.option("--since", metavar="WHEN",
              help="Only events from WHEN on: a duration back from now (90s, 10m, 2h, 1d) or an ISO time "
                   "(2026-11-24T22:00:00Z).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N events.")
@click.option("--from", "record_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Read a 'rdzvctl watch --record FILE' file instead of the backend (no backend options needed).")
@click.option("--svg", "svg_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also draw the history (nodes against time, rounds) into FILE; an existing FILE needs --force.")
@click.option("--force", is_flag=True, help="With --svg: overwrite an existing FILE.")
@storm_options
def command(app: App, output: str, since: Optional[str], limit: Optional[int], record_file: Optional[str],
            svg_file: Optional[str], force: bool, storm: Any) -> None:
    """Show the run's past: joined, left, rank changed, round advanced, completed, closed, removed.

    Oldest first, with the time each version was written (the backend's, or
    the newest heartbeat in the version when the backend keeps none: FileStore).
    Heartbeat-only versions are folded into the change before them (-o json:
    "collapsed").  A restart storm (the round advanced --storm-rounds times
    within --storm-window, no round complete for --storm-stable) is an event
    of kind restart-storm and makes the exit code 1.  What the backend no
    longer holds (compacted etcd revisions) is said on stderr, and with -o json
    as a first line {"kind": "notice", ...}.  A TCPStore keeps no history:
    record one with 'rdzvctl watch --record FILE' and read it with --from FILE.

    \b
    Examples:
      rdzvctl history --rdzv-backend c10d --rdzv-endpoint /tmp/store --rdzv-conf store_type=file --rdzv-id job42
      rdzvctl history ... --since 30m -o json | jq -c 'select(.kind=="round-advanced")'
      rdzvctl history --from job42.history --svg job42.svg
    """
    from rdzvctl import timeline
    from rdzvctl.clock import now_utc

    since_time = None
    if since is not None:
        try:
            since_time = timeline.parse_since(since, now_utc())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    if svg_file is not None:
        from rdzvctl.report import check_output_file

        check_output_file(svg_file, force, ())  # refuse before replaying anything
    backend = None
    if record_file is None:
        app.require_run_id()
        backend = app.open()
    try:
        if backend is not None:
            first = timeline.from_backend(backend)
        else:
            assert record_file is not None
            first = timeline.from_record(record_file)
        collector = None
        if svg_file is not None:  # drawn from the same replay as the events printed
            from rdzvctl.history_spans import Collector

            collector = Collector()
            first = timeline.handing_on(first, collector.add, since_time)
        if first.notice:
            app.err(f"rdzvctl: notice: {first.notice}")
            if output == "json":
                app.json_line({"kind": "notice", "message": first.notice, "run_id": first.run_id})
        storms = 0
        for event in timeline.events_of(first, storm=storm, since=since_time, last=limit, require=True):
            storms += event["kind"] == "restart-storm"
            if output == "json":
                app.json_line(event)
            else:
                render_event(app, {**event, "time": event["time"] or "-"})
        if svg_file is not None and collector is not None:
            from rdzvctl.history_svg import draw_svg
            from rdzvctl.report import write_private_file

            write_private_file(svg_file, draw_svg(collector, run_id=first.run_id), force)
            app.err(f"history drawn in {svg_file}")
        if storms:
            app.exit(1)
    finally:
        if backend is not None:
            backend.close()
