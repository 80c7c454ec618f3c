"""rdzvctl completion: print the shell completion script."""

from __future__ import annotations

import re
import threading
from typing import Any, List

import click
from click.shell_completion import CompletionItem, get_completion_class

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend, registered_backends

SHELLS = ("bash", "zsh", "fish")

#: Seconds a run-id completion may spend asking the backend; past that it offers nothing.
RUN_ID_TIMEOUT = 2.0
#: At most this many run ids are offered.
MAX_RUN_IDS = 1000
#: Run ids come from the store (untrusted) and the shell inserts a candidate into the command
#: line as it is: only ids made of these characters are offered (no spaces, quotes, shell
#: metacharacters or control characters), and none longer than 256 characters.
SAFE_RUN_ID = re.compile(r"[A-Za-z0-9._:@%+=,/-]{1,256}")


def complete_backend(ctx: click.Context, param: click.Parameter, incomplete: str) -> List[Any]:
    """``--rdzv-backend`` values: every registered backend name."""
    return [CompletionItem(name) for name in registered_backends() if name.startswith(incomplete)]


def complete_run_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> List[Any]:
    """``--rdzv-id`` values: the runs the backend lists, asked with a short timeout.

    Silent on any failure (no backend given, unreachable, cannot list, slow):
    a completion must never print an error into the user's command line.
    Run ids that a shell would not take literally are never offered.
    """
    found: List[str] = []

    def ask() -> None:
        timeout = min(ctx.params.get("timeout") or RUN_ID_TIMEOUT, RUN_ID_TIMEOUT)
        address = Address.from_env(ctx.params.get("rdzv_backend"), ctx.params.get("rdzv_endpoint"), None,
                                   ctx.params.get("rdzv_conf"), timeout)
        with open_backend(address, "") as backend:
            for entry in backend.list_runs():
                if entry.run_id.startswith(incomplete) and SAFE_RUN_ID.fullmatch(entry.run_id):
                    found.append(entry.run_id)
                if len(found) >= MAX_RUN_IDS:
                    break

    def quietly() -> None:
        try:
            ask()
        except BaseException:  # noqa: B036 - a completion stays silent, whatever went wrong
            found.clear()

    worker = threading.Thread(target=quietly, daemon=True)
    worker.start()
    worker.join(RUN_ID_TIMEOUT + 0.5)
    if worker.is_alive():
        return []
    return [CompletionItem(run_id) for run_id in sorted(set(found))]


def completion_script(shell: str) -> str:
    """The script click generates for ``shell`` (also what completions/ holds)."""
    from rdzvctl.cli.main import cli  # the root command imports this module lazily

    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise click.BadParameter(f"unsupported shell {shell}")
    return cls(cli, {}, "rdzvctl", "_RDZVCTL_COMPLETE").source()


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def command(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  eval "$(rdzvctl completion bash)"     (or source completions/rdzvctl.bash)
    zsh:   eval "$(rdzvctl completion zsh)"
    fish:  rdzvctl completion fish > ~/.config/fish/completions/rdzvctl.fish
    """
    click.echo(completion_script(shell), nl=False)
