"""What every command shares: the address, output mode, streams and confirmation.

Data goes to stdout, status and errors to stderr.  Text output is rich on a
terminal and plain (colourless, stable, rich not even imported) otherwise or
with ``NO_COLOR``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, Optional, Tuple

import click

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.errors import UsageError
from rdzvctl.state.analysis import KeepAlive

__all__ = ["App", "with_app", "output_option", "write_options"]


class App:
    """One command invocation: address flags, output mode, and I/O helpers."""

    def __init__(
        self,
        ctx: click.Context,
        backend: Optional[str],
        endpoint: Optional[str],
        run_id: Optional[str],
        conf: Optional[str],
        timeout: Optional[float],
    ) -> None:
        self.ctx = ctx
        self._flags = (backend, endpoint, run_id, conf, timeout)
        self._address: Optional[Address] = None
        self.verbose = bool((ctx.find_root().obj or {}).get("verbose"))
        self.run_ids: Tuple[str, ...] = ()  # every --rdzv-id given, for commands that take several

    # -- addressing -----------------------------------------------------------
    @property
    def address(self) -> Address:
        if self._address is None:
            backend, endpoint, run_id, conf, timeout = self._flags
            self._address = Address.from_env(backend, endpoint, run_id, conf, timeout)
        return self._address

    def require_run_id(self) -> str:
        if not self.address.run_id:
            raise UsageError("no run id given: pass --rdzv-id or set PET_RDZV_ID / RDZVCTL_RDZV_ID")
        return self.address.run_id

    def open(self, run_id: Optional[str] = None, need_run_id: bool = True) -> RendezvousBackend:
        from rdzvctl.backends.registry import open_backend

        if need_run_id and run_id is None:
            self.require_run_id()
        return open_backend(self.address, run_id)

    @property
    def timeout_given(self) -> bool:
        """True when --timeout (or RDZVCTL_TIMEOUT) was given explicitly."""
        return self._flags[4] is not None or bool(os.environ.get("RDZVCTL_TIMEOUT"))

    @property
    def keep_alive(self) -> KeepAlive:
        """torch's keep-alive settings from --rdzv-conf (keep_alive_interval, keep_alive_max_attempt)."""
        interval = self.address.get_float("keep_alive_interval", 5.0)
        attempts = self.address.get_int("keep_alive_max_attempt", 3)
        if interval is None or interval <= 0 or attempts is None or attempts <= 0:
            raise UsageError("keep_alive_interval and keep_alive_max_attempt must be positive")
        return KeepAlive(interval, attempts)

    @property
    def max_nodes(self) -> Optional[int]:
        return self.address.get_int("max_nodes")

    @property
    def min_nodes(self) -> Optional[int]:
        return self.address.get_int("min_nodes")

    # -- output ---------------------------------------------------------------
    @property
    def rich(self) -> bool:
        """Rich output: stdout is a terminal and NO_COLOR is not set."""
        if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
            return False
        return sys.stdout.isatty() or os.environ.get("RDZVCTL_FORCE_RICH") == "1"

    @property
    def interactive(self) -> bool:
        return sys.stdin.isatty() and sys.stderr.isatty()

    def out(self, text: str = "") -> None:
        click.echo(text)

    def err(self, text: str) -> None:
        click.echo(text, err=True)

    def json(self, obj: Any) -> None:
        """Indented for a person on a terminal; compact (C encoder, ~3x faster) for pipes and files."""
        if sys.stdout.isatty():
            click.echo(json.dumps(obj, indent=2, ensure_ascii=False))
        else:
            click.echo(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    def json_line(self, obj: Any) -> None:
        click.echo(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    def raw(self, data: bytes) -> None:
        stream = click.get_binary_stream("stdout")
        stream.write(data)
        stream.flush()

    def console(self, stderr: bool = False) -> Any:
        from rich.console import Console

        return Console(stderr=stderr, highlight=False, soft_wrap=False)

    def confirm(self, question: str, yes: bool) -> None:
        """Ask on a terminal unless ``--yes``; raises click.Abort on 'no'."""
        if yes or not self.interactive:
            return
        if not click.confirm(question, default=False, err=True):
            raise click.Abort()

    def exit(self, code: int) -> None:
        self.ctx.exit(code)


def with_app(func: Optional[Callable[..., Any]] = None, *, many_run_ids: bool = False) -> Any:
    """Add the torchrun-style address options and pass an :class:`App` first.

    With ``many_run_ids``, ``--rdzv-id`` may be repeated: the ids given are
    ``app.run_ids`` (the address keeps the last one, or the environment's).
    """
    if func is None:
        return functools.partial(with_app, many_run_ids=many_run_ids)

    @click.option("--rdzv-backend", "rdzv_backend", metavar="NAME",
                  help="Backend name (c10d, etcd-v2, etcd-v3, redis, or module:factory). [env: PET_RDZV_BACKEND]")
    @click.option("--rdzv-endpoint", "rdzv_endpoint", metavar="HOST:PORT",
                  help="Backend endpoint, as given to torchrun. [env: PET_RDZV_ENDPOINT]")
    @click.option("--rdzv-id", "rdzv_id", metavar="RUN_ID", multiple=many_run_ids,
                  help="The run id (torchrun --rdzv-id)" + ("; repeat for several" if many_run_ids else "")
                  + ". [env: PET_RDZV_ID]")
    @click.option("--rdzv-conf", "rdzv_conf", metavar="K=V,...",
                  help="Backend options and keep-alive settings, as for torchrun. [env: PET_RDZV_CONF]")
    @click.option("--timeout", type=float, metavar="SECONDS",
                  help="Timeout of each backend operation (default 10). [env: RDZVCTL_TIMEOUT]")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, rdzv_backend: Optional[str], rdzv_endpoint: Optional[str],
                rdzv_id: Any, rdzv_conf: Optional[str], timeout: Optional[float],
                *args: Any, **kwargs: Any) -> Any:
        if timeout is not None and timeout <= 0:
            raise click.BadParameter("must be positive", param_hint="--timeout")
        run_ids: Tuple[str, ...] = tuple(rdzv_id) if many_run_ids else ()
        run_id = (run_ids[-1] if run_ids else None) if many_run_ids else rdzv_id
        app = App(ctx, rdzv_backend, rdzv_endpoint, run_id, rdzv_conf, timeout)
        app.run_ids = run_ids
        return func(app, *args, **kwargs)

    return wrapper


def output_option(*choices: str, default: str = "text") -> Callable[..., Any]:
    return click.option(
        "-o", "--output", type=click.Choice(list(choices)), default=default, show_default=True,
        help="Output format: text (rich on a terminal, plain otherwise), json (documented schema)"
        + (", raw (the exact stored bytes)" if "raw" in choices else "") + ".",
    )


def write_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--yes, --dry-run and --backup-dir, shared by every command that writes."""
    func = click.option("--backup-dir", type=click.Path(file_okay=False), envvar="RDZVCTL_BACKUP_DIR",
                        help="Where backups are written (default ~/.local/state/rdzvctl/backups).")(func)
    func = click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")(func)
    func = click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")(func)
    return func
