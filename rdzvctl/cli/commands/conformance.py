"""rdzvctl conformance: run the backend contract kit against a live backend."""

from __future__ import annotations

import click

from rdzvctl.backends.registry import open_backend
from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.cli.render import Table, render_tables
from rdzvctl.testing.conformance import run_conformance


@click.command("conformance")
@with_app
@output_option("text", "json")
@click.option("--racers", type=click.IntRange(min=2, max=64), default=8, show_default=True,
              help="Concurrent writers in the racing case.")
def command(app: App, output: str, racers: int) -> None:
    """Check a live backend against torch's backend contract and rdzvctl's stricter one.

    Each case uses a fresh scratch run id (rdzvctl-conformance-*) and removes
    its state afterwards where the backend can clear; on the built-in backends
    also what a clear keeps (c10d's sentinel, Redis's version counter, etcd v2's
    empty directories, etcd v3's lease), so the backend is left as it was.
    --rdzv-id is not needed.
    Exit 0 when every case passes (declared limitations included), 1 otherwise.
    """
    address = app.address

    def factory(run_id: str):
        return open_backend(address, run_id)

    with open_backend(address, "rdzvctl-conformance") as probe:
        endpoint = probe.describe()  # never the raw endpoint: it may hold a password
        probe.get_state()  # unreachable: one line and exit 4, not every case failing alike
    results = run_conformance(factory, racers=racers)
    failed = [r for r in results if r.outcome == "fail"]
    if output == "json":
        app.json({"schema": "rdzvctl.conformance/v1", "backend": address.backend, "endpoint": endpoint,
                  "cases": [r.__dict__ for r in results], "passed": not failed})
    else:
        render_tables(app, [("backend", f"{address.backend}  {endpoint}"),
                            ("result", "fail" if failed else "ok")],
                      [Table("Cases", ["case", "outcome", "description", "detail"],
                             [[r.name, r.outcome, r.description, r.detail] for r in results])])
    if failed:
        app.exit(1)
