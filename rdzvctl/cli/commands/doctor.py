"""rdzvctl doctor: a checklist of the endpoint, the run and its bootstrap (ok / warn / fail)."""

from __future__ import annotations

import click

from rdzvctl.cli.app import App, Seconds, output_option, with_app
from rdzvctl.errors import EXIT_OK, EXIT_PROBLEMS


@click.command("doctor")
@with_app
@output_option("text", "json")
@click.option("--dns-timeout", type=Seconds(min=0.01), default=2.0, show_default=True, metavar="SECONDS",
              help="Bound of each DNS lookup (they run concurrently).")
@click.option("--connect-timeout", type=Seconds(min=0.01), default=2.0, show_default=True, metavar="SECONDS",
              help="Bound of each TCP connect (they run concurrently).")
def command(app: App, output: str, dns_timeout: float, connect_timeout: float) -> None:
    """Check the endpoint, the run and the round's bootstrap; one line per check.

    \b
    The endpoint: resolves, connects, speaks the protocol, and the server's
    settings that matter (etcd health, leader and v2 API; Redis role, eviction
    policy and keyspace events; TCPStore flavour; FileStore permissions,
    filesystem and size).  The run: decodes, node addresses resolve, no
    loopback among remote nodes, no duplicates, no clock skew, keep-alive
    settings, max_nodes.  The bootstrap: the round's MASTER_ADDR:MASTER_PORT
    resolves and accepts connections.  Exit 0 when nothing fails, 1 otherwise.

    \b
    Examples:
      rdzvctl doctor --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job42
      rdzvctl doctor ... --rdzv-conf max_nodes=64 -o json | jq '.checks[] | select(.status != "ok")'
    """
    from rdzvctl.doctor import diagnose

    keep_alive, max_nodes = app.keep_alive, app.max_nodes
    with app.open(need_run_id=False) as backend:
        diag = diagnose(backend, keep_alive, max_nodes, dns_timeout=dns_timeout, connect_timeout=connect_timeout)
    doc = diag.to_json()
    if output == "json":
        app.json(doc)
    else:
        from rdzvctl.cli.render import render_doctor

        render_doctor(app, doc)
    app.exit(EXIT_PROBLEMS if diag.failed else EXIT_OK)
