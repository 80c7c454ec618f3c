"""What every command shares: the address, output mode, streams and confirmation.

Data goes to stdout, status and errors to stderr.  Text output is rich on a
terminal (without colours under ``NO_COLOR``) and plain (colourless, stable,
rich not even imported) otherwise.  Everything printed passes :mod:`rdzvctl.text` here
(secrets masked, control characters escaped; JSON with ``\\u`` escapes),
except ``-o raw``, which is the exact bytes and refuses a terminal without
``--force``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional

import click

from rdzvctl.backends.base import Address, RendezvousBackend
from rdzvctl.errors import UsageError
from rdzvctl.state.analysis import KeepAlive
from rdzvctl.text import json_text, safe, safe_lines

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
        """Rich output (tables, panels): stdout is a terminal (or RDZVCTL_FORCE_RICH=1), TERM is not dumb.

        ``NO_COLOR`` only drops the colours (see :meth:`console`); the layout stays.
        """
        if os.environ.get("TERM") == "dumb":
            return False
        return sys.stdout.isatty() or os.environ.get("RDZVCTL_FORCE_RICH") == "1"

    @property
    def full_diff(self) -> bool:
        """--full-diff: a write's plan shows every diff line, however long."""
        return bool(self.ctx.meta.get("rdzvctl.full_diff"))

    @property
    def interactive(self) -> bool:
        return sys.stdin.isatty() and sys.stderr.isatty()

    def out(self, text: str = "") -> None:
        """Lines of rendered text on stdout (renderers already made each value safe; this is the guard)."""
        click.echo(safe_lines(text))

    def err(self, text: str) -> None:
        """One status line on stderr: secrets masked, control characters and line breaks escaped."""
        click.echo(safe(text), err=True)

    def json(self, obj: Any) -> None:
        """Indented for a person on a terminal; compact (C encoder, ~3x faster) for pipes and files."""
        click.echo(json_text(obj, indent=2 if sys.stdout.isatty() else None))

    def json_line(self, obj: Any) -> None:
        click.echo(json_text(obj))

    def raw(self, data: bytes) -> None:
        """The exact bytes on stdout (never on a terminal unless --force: checked by output_option)."""
        stream = click.get_binary_stream("stdout")
        stream.write(data)
        stream.flush()

    def console(self, stderr: bool = False) -> Any:
        from rich.console import Console

        return Console(stderr=stderr, highlight=False, soft_wrap=False, no_color=bool(os.environ.get("NO_COLOR")))

    def confirm(self, question: str, yes: bool) -> None:
        """Ask on a terminal unless ``--yes``; raises click.Abort on 'no'."""
        if yes or not self.interactive:
            return
        if not click.confirm(safe(question), default=False, err=True):
            raise click.Abort()

    def exit(self, code: int) -> None:
        self.ctx.exit(code)


def with_app(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the torchrun-style address options and pass an :class:`App` first."""

    @click.option("--rdzv-backend", "rdzv_backend", metavar="NAME",
                  help="Backend name (c10d, etcd-v2, etcd-v3, redis, or module:factory). [env: PET_RDZV_BACKEND]")
    @click.option("--rdzv-endpoint", "rdzv_endpoint", metavar="HOST:PORT",
                  help="Backend endpoint, as given to torchrun. [env: PET_RDZV_ENDPOINT]")
    @click.option("--rdzv-id", "rdzv_id", metavar="RUN_ID", help="The run id (torchrun --rdzv-id). [env: PET_RDZV_ID]")
    @click.option("--rdzv-conf", "rdzv_conf", metavar="K=V,...",
                  help="Backend options and keep-alive settings, as for torchrun. [env: PET_RDZV_CONF]")
    @click.option("--timeout", type=float, metavar="SECONDS",
                  help="Timeout of each backend operation (default 10). [env: RDZVCTL_TIMEOUT]")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, rdzv_backend: Optional[str], rdzv_endpoint: Optional[str],
                rdzv_id: Optional[str], rdzv_conf: Optional[str], timeout: Optional[float],
                *args: Any, **kwargs: Any) -> Any:
        if timeout is not None and timeout <= 0:
            raise click.BadParameter("must be positive", param_hint="--timeout")
        app = App(ctx, rdzv_backend, rdzv_endpoint, rdzv_id, rdzv_conf, timeout)
        return func(app, *args, **kwargs)

    return wrapper


def output_option(*choices: str, default: str = "text") -> Callable[..., Any]:
    """-o/--output; with ``raw`` among the choices also --force, since raw bytes never go to a terminal.

    Stacked under :func:`with_app`.  Raw state bytes hold whatever a writer
    put there (escape sequences included), so ``-o raw`` on a terminal is a
    usage error (exit 2) unless --force.
    """
    option = click.option(
        "-o", "--output", type=click.Choice(list(choices)), default=default, show_default=True,
        help="Output format: text (rich on a terminal, plain otherwise), json (documented schema)"
        + (", raw (the exact stored bytes)" if "raw" in choices else "") + ".",
    )
    if "raw" not in choices:
        return option

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(app: App, *args: Any, force: bool, **kwargs: Any) -> Any:
            if kwargs.get("output") == "raw" and not force and sys.stdout.isatty():
                raise UsageError("-o raw writes the stored bytes as they are, which a terminal would "
                                 "interpret: pipe it (e.g. > state.pickle) or add --force")
            return func(app, *args, **kwargs)

        return option(click.option("--force", is_flag=True,
                                   help="With -o raw: write the bytes even to a terminal.")(wrapper))

    return decorate


def _remember_full_diff(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta["rdzvctl.full_diff"] = value


def write_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--yes, --dry-run, --backup-dir and --full-diff, shared by every command that writes."""
    func = click.option("--full-diff", is_flag=True, expose_value=False, callback=_remember_full_diff,
                        help="Show the plan's whole diff (long ones are summarised by default).")(func)
    func = click.option("--backup-dir", type=click.Path(file_okay=False), envvar="RDZVCTL_BACKUP_DIR",
                        help="Where backups are written (default ~/.local/state/rdzvctl/backups).")(func)
    func = click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")(func)
    func = click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")(func)
    return func
