"""The ``rdzvctl`` root command.

Subcommands are imported only when run (their help lines live here), so
``rdzvctl --help`` and ``--version`` stay as fast as importing click.  Every
error rdzvctl raises on purpose ends here as one line on stderr and its
documented exit code; ``-v`` adds the traceback.

Exit codes: 0 ok; 1 problems found; 2 usage; 3 token conflict (nothing
written); 4 backend unreachable or timed out; 5 no state for that run;
6 state corrupt or unsafe; 130 interrupted (Ctrl-C), with a line saying what
was written.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import click

from rdzvctl import __version__

# rdzvctl.errors and rdzvctl.text are imported where an error is handled, not here:
# `rdzvctl --help` / `--version` (bench P2) import nothing beyond click.

# name -> (module, short help); order is the order shown in --help.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "get": ("rdzvctl.cli.commands.get", "Show the decoded state of a run, its nodes and problems."),
    "set": ("rdzvctl.cli.commands.set", "Write a state (JSON) or change fields, fenced by the token."),
    "edit": ("rdzvctl.cli.commands.edit", "Edit the state in $EDITOR and write it back, fenced."),
    "watch": ("rdzvctl.cli.commands.watch", "Follow a run live and print what changes."),
    "history": ("rdzvctl.cli.commands.history", "Show the run's past as a timeline of events (restart storms too)."),
    "corrupt-detect": ("rdzvctl.cli.commands.detect", "Check one run or all runs for corruption and stuck states."),
    "reset": ("rdzvctl.cli.commands.reset", "Repair a run: clear, reopen or prune dead nodes (backed up)."),
    "restore": ("rdzvctl.cli.commands.restore", "Write a backup back, fenced, after showing the diff."),
    "doctor": ("rdzvctl.cli.commands.doctor", "Check the endpoint, the run and its bootstrap: ok / warn / fail."),
    "report": ("rdzvctl.cli.commands.report", "Write one Markdown incident report (state, findings, doctor, repairs)."),
    "list": ("rdzvctl.cli.commands.list_runs", "List the runs on a backend with their health."),
    "exporter": ("rdzvctl.cli.commands.exporter", "Serve /metrics for Prometheus: one run, several or every run."),
    "backends": ("rdzvctl.cli.commands.backends", "List the registered backends and their capabilities."),
    "conformance": ("rdzvctl.cli.commands.conformance", "Run the backend conformance kit against a live backend."),
    "demo": ("rdzvctl.cli.commands.demo", "Create a local rendezvous to try rdzvctl on (no server needed)."),
    "completion": ("rdzvctl.cli.commands.completion", "Print the shell completion script (bash, zsh, fish)."),
}


#: Set by :mod:`rdzvctl.cli.entry` when it paused the cyclic collector for start-up.
resume_collector_after_start = False


def _started() -> None:
    """The command's modules are loaded: resume the collector :mod:`rdzvctl.cli.entry` paused."""
    global resume_collector_after_start
    if resume_collector_after_start:
        resume_collector_after_start = False
        gc.freeze()
        gc.enable()


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(entry[0])
        _started()
        return module.command  # type: ignore[no-any-return]

    def resolve_command(
        self, ctx: click.Context, args: List[str]
    ) -> Tuple[Optional[str], Optional[click.Command], List[str]]:
        name = args[0] if args else ""
        if name and name not in COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            import difflib

            close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
            if close:
                ctx.fail(f"No such command {name!r}. Did you mean {close[0]!r}?")
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise OneLineUsageError.wrap(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        from rdzvctl.errors import RdzvctlError

        try:
            return super().invoke(ctx)
        except RdzvctlError as exc:
            raise CommandError(exc, bool((ctx.obj or {}).get("verbose"))) from exc
        except click.UsageError as exc:  # a bad flag or value of a subcommand
            raise OneLineUsageError.wrap(exc) from exc
        except click.ClickException as exc:  # e.g. click.FileError: its text may quote untrusted input
            if isinstance(exc, CommandError):
                raise
            raise CommandError(exc, bool((ctx.obj or {}).get("verbose"))) from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table: listing commands must not import them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


class CommandError(click.ClickException):
    """An rdzvctl error on its way out: one line, its documented exit code."""

    def __init__(self, error: BaseException, verbose: bool = False) -> None:
        super().__init__(error.format_message() if isinstance(error, click.ClickException) else str(error))
        self.error = error
        self.verbose = verbose
        self.exit_code = getattr(error, "exit_code", 1)  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        report_error(self.error, verbose=self.verbose, file=file, message=self.message)


#: click >= 8.2 raises this for a bare group invocation (8.1 printed the help and exited).
_HELP_ERRORS: Tuple[type, ...] = tuple(
    cls for cls in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if cls is not None)


class OneLineUsageError(click.UsageError):
    """click's usage errors (bad flags, bad values) as one line, like every other error."""

    @classmethod
    def wrap(cls, error: click.UsageError) -> click.UsageError:
        if isinstance(error, (cls, *_HELP_ERRORS)):  # bare `rdzvctl`: the help, as click shows it
            return error
        wrapped = cls(error.format_message(), error.ctx)
        wrapped.exit_code = error.exit_code  # type: ignore[misc]  # click declares it on the class
        return wrapped

    def show(self, file: Any = None) -> None:
        message = " ".join(self.format_message().split())  # click's choice lists span lines
        if self.ctx is not None and "--help" not in message:
            message += f" (see '{self.ctx.command_path} --help')"
        report_error(self, file=file, name="UsageError", message=message)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="rdzvctl", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, envvar="RDZVCTL_VERBOSE", help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Inspect and repair PyTorch elastic rendezvous state.

    Address a run the torchrun way: --rdzv-backend, --rdzv-endpoint,
    --rdzv-id and --rdzv-conf (or RDZVCTL_RDZV_* variables, then torchrun's
    PET_RDZV_*), so a command copied from a torchrun launch line just works.

    \b
    Exit codes (every command):
      0 ok                     4 backend unreachable or timed out
      1 problems found         5 no state for that run
      2 usage error            6 state corrupt or unsafe
      3 token conflict: nothing written
      130 interrupted: Ctrl-C; the message says what was written

    A write asks first on a terminal ('no' writes nothing, exit 0); with stdin
    or stderr not a terminal it needs --yes (else exit 2).
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def main(argv: Optional[List[str]] = None) -> Any:
    """Console entry point: run the CLI and turn our errors into exit codes."""
    from rdzvctl.errors import EXIT_INTERRUPTED, RdzvctlError

    obj: Dict[str, Any] = {}  # the root context's; "progress" tells how far a write got
    try:
        code = cli.main(args=argv, prog_name="rdzvctl", standalone_mode=False, obj=obj)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo(_interrupted(obj.get("progress") or {}), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except RdzvctlError as exc:  # raised outside a subcommand (LazyGroup.invoke wraps the rest)
        _report(exc, exc.exit_code, _verbose(obj, argv))
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # a bug: still one line unless -v
        _report(exc, 1, _verbose(obj, argv), prefix="internal error: ")
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted(progress: Dict[str, Any]) -> str:
    if not progress.get("writes"):
        return "Interrupted."  # a read-only command: nothing to say about writing
    from rdzvctl.cli.change import interrupted_message

    return interrupted_message(progress)  # how far the write got


def _verbose(obj: Dict[str, Any], argv: Optional[List[str]]) -> bool:
    """-v as parsed by the root command, else as found in ``argv`` (the command line when None)."""
    if "verbose" in obj:
        return bool(obj["verbose"])
    args = sys.argv[1:] if argv is None else argv
    return "-v" in args or "--verbose" in args or _env_verbose()


def _report(exc: BaseException, code: int, verbose: bool, prefix: str = "") -> None:
    report_error(exc, verbose=verbose, prefix=prefix)
    sys.exit(code)


def report_error(error: BaseException, *, verbose: bool = False, file: Any = None, prefix: str = "",
                 name: Optional[str] = None, message: Optional[str] = None) -> None:
    """The one way an error reaches the user: ``rdzvctl: Name: message`` as exactly one line.

    The message is untrusted (it may quote a store's data or a server's
    answer): secrets are masked and control characters and line breaks
    escaped (:func:`rdzvctl.text.safe`).  With ``-v`` the traceback and its
    chained causes come first, formatted and scrubbed the same way.
    """
    from rdzvctl.text import format_traceback, safe

    if verbose:
        for line in format_traceback(error):
            click.echo(line, err=True, file=file)
    text = str(error) if message is None else message
    click.echo(f"rdzvctl: {safe(prefix)}{safe(name or type(error).__name__)}: {safe(text)}", err=True, file=file)


def _env_verbose() -> bool:
    return os.environ.get("RDZVCTL_VERBOSE", "").lower() in ("1", "true", "yes")


if __name__ == "__main__":  # pragma: no cover
    main()
