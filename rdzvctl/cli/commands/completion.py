"""rdzvctl completion: print the shell completion script."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    """The script click generates for ``shell`` (also what completions/ holds)."""
    from click.shell_completion import get_completion_class

    from rdzvctl.cli.main import cli

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
