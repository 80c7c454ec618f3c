"""rdzvctl report: one Markdown incident report (state, findings, doctor, repair commands)."""

from __future__ import annotations

from typing import Optional

import click

from rdzvctl.cli.app import App, Seconds, with_app


@click.command("report")
@with_app
@click.option("-o", "--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True,
              help="markdown (the report), or json (the same bundle: schema rdzvctl.report/v1).")
@click.option("--output", "output_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the report to FILE (mode 0600) instead of stdout; an existing FILE needs --force.")
@click.option("--force", is_flag=True, help="With --output: overwrite an existing FILE.")
@click.option("--dns-timeout", type=Seconds(min=0.01), default=2.0, show_default=True, metavar="SECONDS",
              help="Bound of each DNS lookup of doctor's checks.")
@click.option("--connect-timeout", type=Seconds(min=0.01), default=2.0, show_default=True, metavar="SECONDS",
              help="Bound of each TCP connect of doctor's checks.")
def command(app: App, fmt: str, output_file: Optional[str], force: bool, dns_timeout: float,
            connect_timeout: float) -> None:
    """Write one incident report of a run: header, decoded summary, findings, doctor, last events, repairs.

    Secrets are masked and every value from the store is escaped, so the
    report can be pasted into a ticket as it is.  Reading only: nothing is
    written to the backend.  "Last events" are the newest 20 events of
    'rdzvctl history' where the backend keeps a history (else it says why).

    \b
    Examples:
      rdzvctl report --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id job42 --output incident.md
      rdzvctl report ... -o json | jq .repairs
    """
    from rdzvctl.clock import now_utc
    from rdzvctl.doctor import diagnose
    from rdzvctl.inspection import describe, describe_legacy
    from rdzvctl.report import build_bundle, render_markdown, write_private_file
    from rdzvctl.text import json_text, safe_lines
    from rdzvctl.timeline import last_events

    app.require_run_id()
    keep_alive, max_nodes = app.keep_alive, app.max_nodes
    with app.open() as backend:
        diag = diagnose(backend, keep_alive, max_nodes, dns_timeout=dns_timeout, connect_timeout=connect_timeout)
        get_doc = None
        if diag.legacy is not None:  # torch's legacy etcd JSON: that reader's document, not a pickle's
            get_doc = describe_legacy(backend, *diag.legacy)
        elif diag.snapshot is not None:
            get_doc = describe(diag.snapshot, keep_alive, max_nodes, diag.store_keys)
        if diag.legacy is not None:
            events, events_note = None, "torch's legacy etcd JSON: rdzvctl reads no history of it"
        else:
            events, events_note = last_events(backend)
    bundle = build_bundle(app.address, get_doc, diag.to_json(), now_utc(), events, events_note)
    if output_file is None:
        if fmt == "json":
            app.json(bundle)
        else:
            app.out(render_markdown(bundle).rstrip("\n"))
        return
    text = json_text(bundle, indent=2) + "\n" if fmt == "json" else safe_lines(render_markdown(bundle))
    store_file = (diag.server or {}).get("path")  # a FileStore's file: never overwritten by its own report
    write_private_file(output_file, text, force, keep=[str(store_file)] if store_file else [])
    app.err(f"report written to {output_file}")
