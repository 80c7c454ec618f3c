"""Shell completion, exercised in the real shells: bash, zsh and fish run the scripts in completions/.

Each shell sources the committed script and completes a command line the way it does for a
user (bash: COMP_WORDS/COMP_CWORD and the completion function; zsh: ``words``/``CURRENT``
with ``compadd``/``_describe`` recording what would be offered; fish: ``complete -C``),
which runs rdzvctl as a real process; the tests assert the candidates offered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import List

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.registry import open_backend, registered_backends
from rdzvctl.cli.commands.completion import SHELLS, completion_script
from rdzvctl.state.codec import encode
from rdzvctl.state.model import RendezvousState
from tests.support.cli import ENV, closed_port

ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS = ROOT / "completions"


def pinned_version(package: str) -> str:
    for line in (ROOT / "constraints" / "test.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints/test.txt does not pin {package}")


# -- the committed scripts ---------------------------------------------------------------
@pytest.mark.parametrize("shell", SHELLS)
def test_completion_file_is_current(shell):
    """completions/ holds what `rdzvctl completion SHELL` prints with the pinned click (byte-exact only then)."""
    installed, pinned = metadata.version("click"), pinned_version("click")
    if installed != pinned:
        pytest.skip(f"click {installed} is installed; completions/ is generated with the pinned click {pinned}")
    path = COMPLETIONS / f"rdzvctl.{shell}"
    assert path.exists(), f"missing {path}: regenerate with `rdzvctl completion {shell} > completions/rdzvctl.{shell}`"
    assert path.read_text() == completion_script(shell), (
        f"{path} is stale: regenerate with `rdzvctl completion {shell} > completions/rdzvctl.{shell}`"
    )


def test_every_shell_has_a_file():
    assert sorted(p.suffix.lstrip(".") for p in COMPLETIONS.glob("rdzvctl.*")) == sorted(SHELLS)


# -- the real shells -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell_env(tmp_path_factory) -> dict:
    """An environment whose PATH runs this rdzvctl, with shell configuration kept out."""
    home = tmp_path_factory.mktemp("home")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    script = bin_dir / "rdzvctl"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rdzvctl "$@"\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ENV and not k.startswith(("PET_", "RDZVCTL_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / "config"), "XDG_DATA_HOME": str(home / "data"),
                "XDG_CACHE_HOME": str(home / "cache"), "NO_COLOR": "1"})
    return env


BASH = """
source "$SCRIPT"
read -r -a COMP_WORDS <<< "$LINE"
[ "${LINE: -1}" = " " ] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMPREPLY=()
_rdzvctl_completion rdzvctl
printf '%s\\n' "${COMPREPLY[@]}"
"""

# compdef needs compinit; compadd/_describe only work inside a completion widget, so they
# print what they were given to offer.
ZSH = """
compdef() { : }
compadd() { print -rl -- "${(@P)${@[-1]}}" }
_describe() { local entry; for entry in "${(@P)3}"; do print -r -- "${entry%%:*}"; done }
source "$SCRIPT"
words=(${(z)LINE})
[[ "$LINE" == *" " ]] && words+=("")
CURRENT=${#words}
_rdzvctl_completion
"""

FISH = """
source $SCRIPT
complete -C "$LINE"
"""


def complete(shell: str, line: str, env: dict) -> List[str]:
    program = {"bash": ["bash", "--norc", "--noprofile", "-c", BASH], "zsh": ["zsh", "-f", "-c", ZSH],
               "fish": ["fish", "--no-config", "-c", FISH]}[shell]
    if shutil.which(program[0]) is None:  # pragma: no cover - .ci/run installs all three
        pytest.skip(f"{shell} is not installed")
    done = subprocess.run(program, env={**env, "SCRIPT": str(COMPLETIONS / f"rdzvctl.{shell}"), "LINE": line},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (shell, line, done.stderr)
    assert done.stderr == "", (shell, line, done.stderr)
    return sorted(candidate.split("\t")[0] for candidate in done.stdout.splitlines() if candidate)


@pytest.fixture(scope="module")
def filestore(tmp_path_factory) -> Path:
    """A FileStore holding two runs, job-a and job-b."""
    store = tmp_path_factory.mktemp("completion") / "rendezvous.store"
    store.write_bytes(b"")
    for run_id in ("job-a", "job-b"):
        with open_backend(Address("c10d", str(store), run_id, {"store_type": "file"})) as backend:
            assert backend.set_state(encode(RendezvousState(round=1)))[2]
    return store


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("rdzvctl ge", ["get"]),
        ("rdzvctl co", ["completion", "conformance", "corrupt-detect"]),
        ("rdzvctl get --rdzv-b", ["--rdzv-backend"]),
        ("rdzvctl reset --mode ", ["clear", "prune", "reopen"]),
        ("rdzvctl completion ", sorted(SHELLS)),
        ("rdzvctl get --rdzv-backend ", sorted(registered_backends())),
        ("rdzvctl list --rdzv-backend etcd", ["etcd", "etcd-v2", "etcd-v3"]),
    ],
)
def test_shell_offers(shell, line, expected, shell_env):
    assert complete(shell, line, shell_env) == expected


@pytest.mark.parametrize("shell", SHELLS)
def test_run_ids_come_from_the_backend(shell, shell_env, filestore):
    line = f"rdzvctl get --rdzv-backend c10d --rdzv-endpoint {filestore} --rdzv-conf store_type=file --rdzv-id "
    assert complete(shell, line, shell_env) == ["job-a", "job-b"]
    assert complete(shell, line + "job-b", shell_env) == ["job-b"]


HOSTILE_RUN_IDS = ("evil;touch pwned", "two words", "line\nbreak", "\x1b[31mred", "$(touch pwned)", "quote'd")


@pytest.mark.parametrize("shell", SHELLS)
def test_run_ids_a_shell_would_not_take_literally_are_never_offered(shell, shell_env, tmp_path):
    store = tmp_path / "hostile.store"
    store.write_bytes(b"")
    for run_id in ("job-ok", *HOSTILE_RUN_IDS):
        with open_backend(Address("c10d", str(store), run_id, {"store_type": "file"})) as backend:
            assert backend.set_state(encode(RendezvousState(round=1)))[2]
    line = f"rdzvctl get --rdzv-backend c10d --rdzv-endpoint {store} --rdzv-conf store_type=file --rdzv-id "
    assert complete(shell, line, {**shell_env, "PWD": str(tmp_path)}) == ["job-ok"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_run_ids_use_the_environment_address(shell, shell_env, filestore):
    env = {**shell_env, "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(filestore),
           "RDZVCTL_RDZV_CONF": "store_type=file"}
    assert complete(shell, "rdzvctl reset --rdzv-id job-", env) == ["job-a", "job-b"]


@pytest.mark.parametrize("shell", SHELLS)
def test_run_id_completion_is_silent_when_the_backend_fails(shell, shell_env):
    unreachable = f"rdzvctl get --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{closed_port()} --rdzv-id "
    assert complete(shell, unreachable, shell_env) == []
    assert complete(shell, "rdzvctl get --rdzv-backend zookeeper --rdzv-id ", shell_env) == []
    assert complete(shell, "rdzvctl get --rdzv-id ", shell_env) == []  # no backend given anywhere
