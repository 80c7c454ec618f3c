"""completions/ holds exactly what `rdzvctl completion <shell>` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdzvctl.cli.commands.completion import SHELLS, completion_script

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_file_is_current(shell):
    path = COMPLETIONS / f"rdzvctl.{shell}"
    assert path.exists(), f"missing {path}: regenerate with `rdzvctl completion {shell} > completions/rdzvctl.{shell}`"
    assert path.read_text() == completion_script(shell), (
        f"{path} is stale: regenerate with `rdzvctl completion {shell} > completions/rdzvctl.{shell}`"
    )


def test_every_shell_has_a_file():
    assert sorted(p.suffix.lstrip(".") for p in COMPLETIONS.glob("rdzvctl.*")) == sorted(SHELLS)


@pytest.mark.parametrize(
    ("words", "cword", "expected"),
    [
        ("rdzvctl ge", 1, ["get"]),
        ("rdzvctl reset --mode ", 3, ["clear", "reopen", "prune"]),
        ("rdzvctl get --rdzv-b", 2, ["--rdzv-backend"]),
        ("rdzvctl completion ", 2, list(SHELLS)),
    ],
)
def test_completion_completes_lazy_commands_and_options(words, cword, expected):
    from click.testing import CliRunner

    from rdzvctl.cli.main import cli

    env = {"_RDZVCTL_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = CliRunner().invoke(cli, [], env=env, prog_name="rdzvctl")
    assert result.exit_code == 0
    assert [line.split(",", 1)[1] for line in result.output.splitlines()] == expected
