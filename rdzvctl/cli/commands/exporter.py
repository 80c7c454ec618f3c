"""rdzvctl exporter: serve the runs of a backend as Prometheus metrics."""

from __future__ import annotations

from typing import Optional

import click

from rdzvctl.cli.app import App, with_app
from rdzvctl.errors import MissingDependencyError, UsageError

INSTALL_HINT = "pip install 'rdzvctl[exporter]' (or: pip install prometheus_client)"


@click.command("exporter")
@with_app(many_run_ids=True)
@click.option("--all", "all_runs", is_flag=True, help="Export every run on the backend (where it can list runs).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Where to serve /metrics and /healthz (default 127.0.0.1:9469; port 0 picks a free one).")
@click.option("--max-runs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Export at most N runs; more are counted in rdzvctl_runs_over_limit (default 10000).")
def command(app: App, all_runs: bool, listen: Optional[str], max_runs: Optional[int]) -> None:
    """Serve /metrics for Prometheus: one run, several (--rdzv-id repeated) or --all.

    The backend is read at each scrape (one batched read where the backend
    can list runs) and only runs whose token changed are decoded.  A backend
    outage is rdzvctl_backend_up 0 and the exporter keeps serving.  Liveness
    follows --rdzv-conf keep_alive_interval/keep_alive_max_attempt, the join
    timeout alert --rdzv-conf join_timeout (torch's default 600 s).  Each run's
    lifecycle phase is rdzvctl_phase{phase}; a close is settled by watching it
    for one keep-alive window, as corrupt-detect --settle does.

    \b
    Examples:
      rdzvctl exporter --rdzv-backend redis --rdzv-endpoint redis-host:6379 --all --listen 0.0.0.0:9469
      rdzvctl exporter --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job42 --rdzv-id job43

    Stops cleanly on SIGTERM (exit 0) and SIGINT (exit 130).
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"the exporter needs prometheus_client, which is not installed; "
                                     f"install it with: {INSTALL_HINT}") from None
    import signal
    import sys

    from rdzvctl.monitor.collector import DEFAULT_JOIN_TIMEOUT, RendezvousCollector
    from rdzvctl.monitor.runs import DEFAULT_MAX_RUNS, RunReader
    from rdzvctl.monitor.server import DEFAULT_LISTEN, make_server, serve

    if all_runs and app.run_ids:
        raise UsageError("give --rdzv-id or --all, not both")
    address = app.address
    run_ids = None if all_runs else (app.run_ids or ((address.run_id,) if address.run_id else ()))
    if run_ids == ():
        raise UsageError("no run to export: pass --rdzv-id (repeatable), --all, or set PET_RDZV_ID")
    join_timeout = address.get_float("join_timeout", DEFAULT_JOIN_TIMEOUT)
    if join_timeout is None or join_timeout <= 0:
        raise UsageError("--rdzv-conf join_timeout must be positive")
    reader = RunReader(address, run_ids, max_runs or DEFAULT_MAX_RUNS)
    collector = RendezvousCollector(reader, app.keep_alive, app.max_nodes, join_timeout, verbose=app.verbose)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server = make_server(listen or DEFAULT_LISTEN, registry)
    what = "every run" if run_ids is None else f"{len(run_ids)} run(s)"
    try:
        stopped = serve(server, lambda url: app.err(
            f"rdzvctl exporter: serving {what} of {address.backend} {reader.endpoint} on {url}"))
    finally:
        reader.close()
    app.err("rdzvctl exporter: stopped")
    sys.stdout.flush()
    app.exit(130 if stopped == signal.SIGINT else 0)
