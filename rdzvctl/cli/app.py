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
import math
import os
import sys
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import click

from rdzvctl.backends.base import MAX_TIMEOUT, Address, RendezvousBackend
from rdzvctl.backends.registry import open_backend
from rdzvctl.errors import UsageError
from rdzvctl.state.analysis import KeepAlive
from rdzvctl.text import json_pieces, json_text, safe, safe_lines

__all__ = ["App", "AddressFlags", "with_app", "output_option", "write_options", "storm_options"]

_END = object()  # the end of an item iterator (items may be None)
_WRITE_SIZE = 1 << 18  # App.json writes pieces of about this many characters


class AddressFlags(NamedTuple):
    """The address options as given on the command line (None where not given)."""

    backend: Optional[str]
    endpoint: Optional[str]
    run_id: Optional[str]
    conf: Optional[str]
    timeout: Optional[float]


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
        self._flags = AddressFlags(backend, endpoint, run_id, conf, timeout)
        self._address: Optional[Address] = None
        self.verbose = bool((ctx.find_root().obj or {}).get("verbose"))
        self.run_ids: Tuple[str, ...] = ()  # every --rdzv-id given, for commands that take several

    # -- addressing -----------------------------------------------------------
    @property
    def flags(self) -> AddressFlags:
        """The address options given (before the environment and defaults fill them in)."""
        return self._flags

    @property
    def address(self) -> Address:
        if self._address is None:
            address = Address.from_env(*self._flags)
            address.check_conf()  # raises every time it is asked, not only the first time
            self._address = address
        return self._address

    def require_run_id(self) -> str:
        if not self.address.run_id:
            raise UsageError("no run id given: pass --rdzv-id or set PET_RDZV_ID / RDZVCTL_RDZV_ID")
        return self.address.run_id

    def open(self, run_id: Optional[str] = None, need_run_id: bool = True) -> RendezvousBackend:
        if need_run_id and run_id is None:
            self.require_run_id()
        return open_backend(self.address, run_id)

    @property
    def timeout_given(self) -> bool:
        """True when --timeout (or RDZVCTL_TIMEOUT) was given explicitly."""
        return self._flags.timeout is not None or bool(os.environ.get("RDZVCTL_TIMEOUT"))

    @property
    def keep_alive(self) -> KeepAlive:
        """torch's keep-alive settings from --rdzv-conf (keep_alive_interval, keep_alive_max_attempt)."""
        # self.address has checked both: positive, finite and bounded (NUMERIC_OPTIONS)
        interval = self.address.get_float("keep_alive_interval", 5.0)
        attempts = self.address.get_int("keep_alive_max_attempt", 3)
        assert interval is not None and attempts is not None
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
        """Both stdin (to answer) and stderr (where the question goes) are terminals."""
        return _isatty(sys.stdin) and _isatty(sys.stderr)

    @property
    def progress(self) -> Dict[str, Any]:
        """How far this invocation's write flow got (read by main's Ctrl-C message)."""
        return _progress(self.ctx)

    def out(self, text: str = "") -> None:
        """Lines of rendered text on stdout (renderers already made each value safe; this is the guard)."""
        click.echo(safe_lines(text))

    def err(self, text: str) -> None:
        """One status line on stderr: secrets masked, control characters and line breaks escaped."""
        click.echo(safe(text), err=True)

    def json(self, obj: Any) -> None:
        """Indented for a person on a terminal; compact (C encoder, ~3x faster) for pipes and files,
        written a quarter MiB at a time (a large document is never whole in memory as text)."""
        from rdzvctl.state.model import collector_paused

        with collector_paused():  # a third of encoding a 65,536-node document otherwise
            if sys.stdout.isatty():
                click.echo(json_text(obj, indent=2))
                return
            pending, size = [""], 0
            for piece in json_pieces(obj):
                pending.append(piece)
                size += len(piece)
                if size >= _WRITE_SIZE:
                    click.echo("".join(pending), nl=False)
                    pending, size = [], 0
            click.echo("".join(pending))

    def json_stream(self, head: Dict[str, Any], key: str, items: Iterable[Any],
                    tail: Callable[[], Dict[str, Any]]) -> None:
        """One JSON document written while it is built: ``head``'s fields, then ``key``'s list, one
        item per line as ``items`` yields it, then ``tail()``'s fields (called after the last item).

        The document equals ``json({**head, key: list(items), **tail()})``, and indented on a
        terminal the same layout, but memory holds one item at a time.  Nothing is written
        before the first item is there (or ``items`` is found empty), so an error reading the
        first one leaves stdout empty.
        """
        indent = 2 if sys.stdout.isatty() else None
        it = iter(items)
        first = next(it, _END)
        opening = json_text({**head, key: []}, indent=indent)
        cut = opening.rfind("[]")  # ``key`` is the last field: its "[]" is the last one
        write = click.echo
        if first is _END:
            closing = json_text({key: [], **tail()}, indent=indent)
            write(opening[:cut + 2] + closing[closing.find("[]") + 2:])
            return
        pad = "\n    " if indent else "\n"
        chunk = [opening[:cut + 1]]
        item: Any = first
        while item is not _END:
            text = json_text(item, indent=indent)
            chunk.append(pad + (text.replace("\n", pad) if indent else text))
            item = next(it, _END)
            if item is not _END:
                chunk.append(",")
            if len(chunk) >= 64 or item is _END:
                write("".join(chunk), nl=False)
                chunk = []
        closing = json_text({key: [], **tail()}, indent=indent)
        write(("\n  " if indent else "\n") + closing[closing.find("[]") + 1:])

    def json_line(self, obj: Any) -> None:
        click.echo(json_text(obj))

    def raw(self, data: bytes) -> None:
        """The exact bytes on stdout (never on a terminal unless --force: checked by output_option)."""
        stream = sys.stdout.buffer  # click.get_binary_stream is deprecated (click 8.3)
        stream.write(data)
        stream.flush()

    def console(self, stderr: bool = False) -> Any:
        from rich.console import Console

        return Console(stderr=stderr, highlight=False, soft_wrap=False, no_color=bool(os.environ.get("NO_COLOR")))

    def require_consent_possible(self, yes: bool) -> None:
        """Refuse (exit 2) a write that could neither be asked about nor has ``--yes``."""
        if yes or self.interactive:
            return
        which = "stdin" if not _isatty(sys.stdin) else "stderr"
        raise UsageError(f"not a terminal ({which} is not a tty), so rdzvctl cannot ask: add --yes to write, "
                         "or --dry-run to only show the plan; nothing was written")

    def confirm(self, question: str, yes: bool) -> bool:
        """Consent to a write: ``--yes``, or 'y' at a terminal prompt; False on 'no' (or Ctrl-D).

        Off a terminal without ``--yes`` nothing can answer (and with stderr
        piped, ``... 2>&1 | tail -1``, nobody would see the question), so the
        write is refused with exit 2, like terraform apply without
        -auto-approve.  Ctrl-C at the prompt raises KeyboardInterrupt.
        """
        if yes:
            return True
        self.require_consent_possible(yes)
        try:
            return click.confirm(safe(question), default=False, err=True)
        except click.Abort as exc:  # click turns both Ctrl-C and Ctrl-D into Abort
            if isinstance(exc.__context__, EOFError):
                click.echo(err=True)
                return False
            raise KeyboardInterrupt from None

    def exit(self, code: int) -> None:
        self.ctx.exit(code)


#: The longest duration any SECONDS option takes (a year): beyond it sleep() and timeouts overflow.
MAX_SECONDS = MAX_TIMEOUT


class Seconds(click.FloatRange):
    """A SECONDS option: a finite number in ``[min, MAX_SECONDS]`` (click's FloatRange lets NaN and
    infinity through, and ``--for nan`` would never end)."""

    name = "seconds"

    def __init__(self, min: float = 0.0, min_open: bool = False) -> None:  # noqa: A002 (click's name)
        super().__init__(min=min, max=MAX_SECONDS, min_open=min_open)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds.", param, ctx)
        return super().convert(number, param, ctx)


def _progress(ctx: click.Context) -> Dict[str, Any]:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    return root.obj.setdefault("progress", {})  # type: ignore[no-any-return]


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except ValueError:  # closed
        return False


def _completer(name: str) -> Callable[..., Any]:
    """A shell_complete callback that imports rdzvctl.cli.commands.completion only when completing."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> Any:
        from rdzvctl.cli.commands import completion

        return getattr(completion, name)(ctx, param, incomplete)

    return complete


def with_app(func: Optional[Callable[..., Any]] = None, *, many_run_ids: bool = False) -> Any:
    """Add the torchrun-style address options and pass an :class:`App` first.

    With ``many_run_ids``, ``--rdzv-id`` may be repeated: the ids given are
    ``app.run_ids`` (the address keeps the last one, or the environment's).
    """
    if func is None:
        return functools.partial(with_app, many_run_ids=many_run_ids)

    @click.option("--rdzv-backend", "rdzv_backend", metavar="NAME", shell_complete=_completer("complete_backend"),
                  help="Backend name (c10d, etcd, etcd-v2, etcd-v3, redis, or module:factory). [env: RDZVCTL_RDZV_BACKEND, then PET_RDZV_BACKEND]")
    @click.option("--rdzv-endpoint", "rdzv_endpoint", metavar="HOST:PORT",
                  help="Backend endpoint, as given to torchrun. [env: RDZVCTL_RDZV_ENDPOINT, then PET_RDZV_ENDPOINT]")
    @click.option("--rdzv-id", "rdzv_id", metavar="RUN_ID", multiple=many_run_ids,
                  shell_complete=_completer("complete_run_id"),
                  help="The run id (torchrun --rdzv-id)" + ("; repeat for several" if many_run_ids else "")
                  + ". [env: RDZVCTL_RDZV_ID, then PET_RDZV_ID]")
    @click.option("--rdzv-conf", "rdzv_conf", metavar="K=V,...",
                  help="Backend options and keep-alive settings, as for torchrun. [env: RDZVCTL_RDZV_CONF, then PET_RDZV_CONF]")
    @click.option("--timeout", type=float, metavar="SECONDS",
                  help="Timeout of each backend operation (default 10). [env: RDZVCTL_TIMEOUT]")
    @click.pass_context
    @functools.wraps(func)
    def wrapper(ctx: click.Context, rdzv_backend: Optional[str], rdzv_endpoint: Optional[str],
                rdzv_id: Any, rdzv_conf: Optional[str], timeout: Optional[float],
                *args: Any, **kwargs: Any) -> Any:
        if timeout is not None and not (math.isfinite(timeout) and 0 < timeout <= MAX_SECONDS):
            raise click.BadParameter(f"must be positive and finite, at most {MAX_SECONDS:.0f}", param_hint="--timeout")
        run_ids: Tuple[str, ...] = tuple(rdzv_id) if many_run_ids else ()
        run_id = (run_ids[-1] if run_ids else None) if many_run_ids else rdzv_id
        app = App(ctx, rdzv_backend, rdzv_endpoint, run_id, rdzv_conf, timeout)
        app.run_ids = run_ids
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


def jobs_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--jobs for the commands that check every run (``rdzvctl.workers``): 0 is one per CPU, at most 4."""
    from rdzvctl.workers import MAX_JOBS, SERIAL_FIRST

    return click.option(
        "--jobs", "-j", type=click.IntRange(0, 64), default=0, show_default=True, metavar="N",
        help=f"Check the runs in N processes (0: one per CPU, at most {MAX_JOBS}; 1: in this process only). "
             f"The first {SERIAL_FIRST:,} runs are always checked here; output and order are the same.",
    )(func)


def _remember_full_diff(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta["rdzvctl.full_diff"] = value


def write_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--yes, --dry-run, --backup-dir and --full-diff, shared by every command that writes."""

    command = func

    @functools.wraps(command)
    def marked(*args: Any, **kwargs: Any) -> Any:
        # A write command: an interruption must say what was (not) written.
        _progress(click.get_current_context())["writes"] = True
        return command(*args, **kwargs)

    func = marked
    func = click.option("--full-diff", is_flag=True, expose_value=False, callback=_remember_full_diff,
                        help="Show the plan's whole diff (long ones are summarised by default).")(func)
    func = click.option("--backup-dir", type=click.Path(file_okay=False), envvar="RDZVCTL_BACKUP_DIR",
                        help="Where backups are written (default ~/.local/state/rdzvctl/backups); it must be "
                             "owned by you or root and not writable by group or others.")(func)
    func = click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")(func)
    func = click.option("-y", "--yes", is_flag=True,
                        help="Write without asking (required when stdin or stderr is not a terminal).")(func)
    return func


def storm_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--storm-rounds, --storm-window, --storm-stable and --no-storm, passed as ``storm``
    (a :class:`rdzvctl.state.history.StormSettings`, or None when off)."""

    @functools.wraps(func)
    def wrapper(*args: Any, storm_rounds: int, storm_window: float, storm_stable: float, no_storm: bool,
                **kwargs: Any) -> Any:
        from rdzvctl.state.history import StormSettings

        storm = None if no_storm else StormSettings(storm_rounds, storm_window, storm_stable)
        return func(*args, storm=storm, **kwargs)

    wrapper = click.option("--no-storm", is_flag=True, help="Do not look for restart storms.")(wrapper)
    wrapper = click.option("--storm-stable", type=Seconds(min=0), default=60.0, show_default=True,
                           metavar="SECONDS",
                           help="A round complete this long is progress: it ends a restart storm.")(wrapper)
    wrapper = click.option("--storm-window", type=Seconds(min=0, min_open=True), default=600.0, show_default=True,
                           metavar="SECONDS", help="Restart storm: the advances happen within this time.")(wrapper)
    wrapper = click.option("--storm-rounds", type=click.IntRange(min=1, max=1_000_000), default=3,
                           show_default=True, metavar="K",
                           help="Restart storm: the round advanced K times (within --storm-window, "
                                "no round complete for --storm-stable).")(wrapper)
    return wrapper
