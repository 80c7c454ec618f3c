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
