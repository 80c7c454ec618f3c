"""README, .ci/run, --help and the code agree: commands, exit codes, the test command."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import rdzvctl.errors
from rdzvctl.cli.main import COMMANDS, cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

#: What each exit code must be described as, in README and in --help.
EXIT_MEANINGS = {
    "EXIT_OK": "ok",
    "EXIT_PROBLEMS": "problems found",
    "EXIT_USAGE": "usage",
    "EXIT_CONFLICT": "token conflict",
    "EXIT_UNAVAILABLE": "unreachable",
    "EXIT_NO_STATE": "no state",
    "EXIT_CORRUPT": "corrupt or unsafe",
    "EXIT_INTERRUPTED": "interrupted",
}


def exit_constants() -> dict:
    return {name: value for name, value in vars(rdzvctl.errors).items() if name.startswith("EXIT_")}


def readme_section(heading: str) -> str:
    match = re.search(rf"^#+ {re.escape(heading)}.*?$(.*?)(?=^#+ |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {heading!r}"
    return match.group(1)


def commands_of(script: str) -> list:
    """The commands of a shell script: non-empty lines that are not comments, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", script)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def ci_test_command() -> list:
    """The one pytest invocation of .ci/run, without the shell's exit-status handling."""
    runs = [line for line in commands_of((ROOT / ".ci" / "run").read_text()) if re.match(r"(\S*python3?\S* -m )?pytest\b", line)]
    assert len(runs) == 1, f".ci/run should run pytest once, found {runs}"
    return shlex.split(runs[0].split("||")[0])


def test_readme_test_command_is_what_ci_runs():
    match = re.search(r"The test command itself.*?```(?:bash|sh|console)?\n(.*?)```", README, re.DOTALL)
    assert match, "README lost the fenced block after 'The test command itself'"
    (readme_command,) = commands_of(match.group(1))
    assert shlex.split(readme_command) == ci_test_command()


def test_ci_fails_when_pytest_runs_no_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'"\$status" -eq 5 \]; then.*?exit 1', script, re.DOTALL), "pytest's exit 5 must fail CI"


def test_ci_type_checks_with_the_pyproject_configuration():
    runs = [line for line in commands_of((ROOT / ".ci" / "run").read_text()) if re.match(r"python -m mypy\b", line)]
    assert runs == ["python -m mypy || types=$?"], "CI runs mypy once, configured only by pyproject.toml"
    config = (ROOT / "pyproject.toml").read_text()
    assert "[tool.mypy]" in config and '"rdzvctl.state.*"' in config and '"rdzvctl.backends.base"' in config


def test_ci_installs_what_a_user_gets_at_pinned_versions():
    installs = [line for line in commands_of((ROOT / ".ci" / "run").read_text()) if "pip install" in line]
    assert installs, ".ci/run installs nothing with pip"
    assert not any(" -e " in line or "--editable" in line for line in installs), "CI must not install editable"
    assert all("-c constraints/test.txt" in line for line in installs), "every install is constrained to the pins"
    pins = dict(line.split("==", 1) for line in commands_of((ROOT / "constraints" / "test.txt").read_text()))
    assert pins.get("torch") == "2.13.0"
    assert not [name for name in pins if name.startswith("nvidia")], "the CPU torch pulls no nvidia-* wheel"
    assert {"click", "pytest", "redis", "rich"} <= set(pins)


def test_every_command_has_help_text():
    for name, (module, short) in COMMANDS.items():
        assert short.strip(), f"{name}: no short help in COMMANDS"
        command = importlib.import_module(module).command
        assert isinstance(command, click.Command) and command.name == name
        assert (command.help or "").strip(), f"{name}: the command has no help text"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert (param.help or "").strip(), f"{name} {param.opts[0]}: no help text"


def test_every_command_is_in_the_readme():
    table = readme_section("Commands")
    for name in COMMANDS:
        assert re.search(rf"^\| `{re.escape(name)}[` ]", table, re.MULTILINE), f"README's command table lacks {name}"


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    listed = re.findall(r"^  (\S+)\s", result.output.split("Commands:")[1], re.MULTILINE)
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_works(name):
    result = CliRunner().invoke(cli, [name, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {name}" in result.output or f"Usage: rdzvctl {name}" in result.output


def test_readme_exit_codes_match_the_constants():
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme_section("Exit codes"), re.MULTILINE))
    constants = exit_constants()
    assert sorted(int(code) for code in rows) == sorted(constants.values())
    assert set(constants) == set(EXIT_MEANINGS), "a new EXIT_* constant needs a meaning here and in README"
    for name, value in constants.items():
        assert EXIT_MEANINGS[name] in rows[str(value)], f"README row {value} should describe {name}"


def test_help_exit_codes_match_the_constants():
    result = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "120"})
    codes = dict(re.findall(r"(\d+) ([a-z][a-z ]+?)(?=\s{2,}|\n|:)", result.output.split("Exit codes")[1]))
    for name, value in exit_constants().items():
        assert EXIT_MEANINGS[name].split()[0] in codes.get(str(value), ""), (name, codes)


def test_every_error_class_maps_to_a_documented_exit_code():
    documented = set(exit_constants().values())
    for obj in vars(rdzvctl.errors).values():
        if isinstance(obj, type) and issubclass(obj, rdzvctl.errors.RdzvctlError):
            assert obj.exit_code in documented, obj
