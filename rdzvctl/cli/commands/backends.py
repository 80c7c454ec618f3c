"""rdzvctl backends: what is registered, from where, and whether it can run here."""

from __future__ import annotations

from typing import Any, Dict, List

import click

from rdzvctl.backends.base import CAPABILITIES
from rdzvctl.backends.registry import get_backend_class, missing_modules, registered_backends
from rdzvctl.cli.app import App, output_option
from rdzvctl.cli.render import Table, render_tables
from rdzvctl.errors import RdzvctlError


@click.command("backends")
@output_option("text", "json")
@click.pass_context
def command(ctx: click.Context, output: str) -> None:
    """List the registered backends: origin, client library, capabilities, fencing.

    Backends come from the `rdzvctl.backends` entry-point group (built-ins
    included); any torch RendezvousBackend can also be used as module:factory.
    """
    rows: List[Dict[str, Any]] = []
    for name, info in registered_backends().items():
        row = {"name": name, "target": info.target, "origin": info.origin, "summary": "", "usable": False,
               "missing": [], "capabilities": [], "strict_fencing": None, "error": None}
        try:
            cls = get_backend_class(name)
        except RdzvctlError as exc:
            row["error"] = str(exc)
        else:
            missing = missing_modules(cls)
            row.update(summary=cls.summary, usable=not missing, missing=missing,
                       capabilities=[c for c in CAPABILITIES if c in cls.capabilities] or ["polling watch"],
                       strict_fencing=cls.strict_fencing, install_hint=cls.install_hint)
        rows.append(row)
    app = App(ctx, None, None, None, None, None)
    if output == "json":
        app.json({"schema": "rdzvctl.backends/v1", "backends": rows})
        return

    def client(row: dict) -> str:
        if row["error"]:
            return f"failed to load: {row['error']}"
        if row["missing"]:
            return f"missing {', '.join(row['missing'])} (pip install {row.get('install_hint') or row['missing'][0]})"
        return "ok"

    table = Table("", ["name", "origin", "client library", "capabilities", "strict fencing", "summary"],
                  [[r["name"], r["origin"], client(r), ", ".join(r["capabilities"]) or "-",
                    {True: "yes", False: "no (value is the token)", None: "-"}[r["strict_fencing"]], r["summary"]]
                   for r in rows],
                  note="Also: any torch RendezvousBackend as --rdzv-backend module:factory.")
    render_tables(app, [], [table])
