"""Importing rdzvctl (and asking the CLI for help) never imports torch or a backend client."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List

import pytest

if TYPE_CHECKING:  # pragma: no cover
    import ast

HEAVY = ["torch", "redis", "etcd3", "etcd3gw", "etcd", "grpc", "google.protobuf", "numpy"]

_PROBE = r"""
import json, sys
heavy = json.loads(sys.argv[1])
code = sys.argv[2]
exit_code = 0
try:
    exec(code, {"__name__": "__probe__"})
except SystemExit as exc:
    exit_code = exc.code or 0
loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
sys.stderr.write("\n" + json.dumps({"loaded": loaded, "exit": exit_code}) + "\n")
"""


def _probe(code: str, heavy: List[str] = HEAVY) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RDZVCTL_"))}
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(heavy), code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stderr.strip().splitlines()[-1])


LIBRARY_MODULES: List[str] = [
    "rdzvctl",
    "rdzvctl.errors",
    "rdzvctl.state",
    "rdzvctl.state.model",
    "rdzvctl.state.codec",
    "rdzvctl.state.jsonform",
    "rdzvctl.state.analysis",
    "rdzvctl.state.nodes",
    "rdzvctl.state.repairs",
    "rdzvctl.state.findings",
    "rdzvctl.state.history",
    "rdzvctl.timeline",
    "rdzvctl.recording",
    "rdzvctl.history_spans",
    "rdzvctl.history_svg",
    "rdzvctl.backends",
    "rdzvctl.backends.base",
    "rdzvctl.backends.registry",
    "rdzvctl.backends.torch_adapter",
    "rdzvctl.testing",
    "rdzvctl.testing.conformance",
    "rdzvctl.testing.memory",
]


def test_library_imports_nothing_heavy() -> None:
    result = _probe("import " + ", ".join(LIBRARY_MODULES))
    assert result["loaded"] == []


def test_decoding_and_encoding_import_nothing_heavy() -> None:
    code = (
        "from rdzvctl.state.codec import decode, encode\n"
        "from rdzvctl.state.jsonform import state_to_json\n"
        "from rdzvctl.state.model import RendezvousState\n"
        "state_to_json(decode(encode(RendezvousState(round=1))))\n"
        "from rdzvctl.backends.registry import registered_backends, get_backend_class\n"
        "registered_backends()\n"
    )
    assert _probe(code)["loaded"] == []


@pytest.mark.parametrize("name", ["c10d", "etcd-v2", "etcd-v3", "redis"])
def test_backend_modules_import_their_client_lazily(name: str) -> None:
    code = f"from rdzvctl.backends.registry import get_backend_class\nget_backend_class({name!r})\n"
    assert _probe(code)["loaded"] == []


def test_cli_help_imports_nothing_heavy() -> None:
    if importlib.util.find_spec("rdzvctl.cli.main") is None:
        pytest.skip("the command line is not there yet")
    result = _probe("import runpy, sys\nsys.argv = ['rdzvctl', '--help']\nrunpy.run_module('rdzvctl', run_name='__main__')\n")
    assert result == {"loaded": [], "exit": 0}


def test_python_m_rdzvctl_help_works() -> None:
    if importlib.util.find_spec("rdzvctl.cli.main") is None:
        pytest.skip("the command line is not there yet")
    done = subprocess.run([sys.executable, "-m", "rdzvctl", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


#: What ``get`` on a FileStore has no use for: each is milliseconds of start-up (P1 in bench/).
#: ``dataclasses``: the classes on get's path are written out (bench P1: a dataclass compiles
#: its generated methods at import); ``pickletools``: the prescan's opcode table is written out.
NOT_FOR_A_FILESTORE_GET = HEAVY + ["socket", "rdzvctl.state.legacy_etcd", "rdzvctl.backends.tcpstore", "rich",
                                   "dataclasses", "pickletools"]


def test_get_on_a_filestore_loads_no_socket_legacy_code_rich_or_dataclasses(tmp_path: Path) -> None:
    from rdzvctl.backends.base import Address
    from rdzvctl.backends.registry import open_backend
    from rdzvctl.state.codec import encode
    from rdzvctl.state.model import NodeDesc, RendezvousState

    store = tmp_path / "filestore"
    store.write_bytes(b"")
    state = RendezvousState(round=1, complete=True)
    state.participants[NodeDesc("node-a", 1, 0)] = 0
    with open_backend(Address("c10d", str(store), "r", {"store_type": "file"}, 10.0)) as backend:
        assert backend.set_state(encode(state), None) is not None
    for output in (["-o", "json"], []):
        argv = ["rdzvctl", "get", *output, "--rdzv-backend", "c10d", "--rdzv-endpoint", str(store), "--rdzv-id", "r",
                "--rdzv-conf", "store_type=file"]
        code = f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_module('rdzvctl', run_name='__main__')\n"
        assert _probe(code, NOT_FOR_A_FILESTORE_GET) == {"loaded": [], "exit": 0}


#: Runs ``rdzvctl.cli.entry.main`` in one process as a host program would (runpy, an embedding
#: tool), printing whether the collector is on after each call and while the command ran.
_COLLECTOR_PROBE = """
import gc, json, sys
import rdzvctl.cli.main as cli_main
from rdzvctl.cli import entry

during = []
get_command = cli_main.LazyGroup.get_command
def spy(self, ctx, name):
    command = get_command(self, ctx, name)
    if command is not None:
        during.append(gc.isenabled())  # what the command runs with
    return command
cli_main.LazyGroup.get_command = spy
after = {}
for argv in (["--version"], ["--help"], [], ["no-such-command"], ["backends", "-o", "json"]):
    try:
        entry.main(argv)
    except SystemExit:
        pass
    after[" ".join(argv)] = gc.isenabled()
sys.stderr.write(json.dumps({"after": after, "during": during, "frozen": gc.get_freeze_count() > 0}) + "\\n")
"""


def test_the_entry_point_gives_the_collector_back_whatever_the_command_line() -> None:
    """The collector paused for start-up is on again once the command's module is in, and also when no
    command loads (--help, --version, a usage error): a host calling the entry point twice does not
    run the second command, or the rest of its life, without the cyclic collector."""
    done = subprocess.run([sys.executable, "-c", _COLLECTOR_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stderr.strip().splitlines()[-1])
    assert seen["after"] == {"--version": True, "--help": True, "": True, "no-such-command": True,
                             "backends -o json": True}
    assert seen["during"] == [True]  # the command itself (a watch, an exporter) runs with the collector on
    assert seen["frozen"]  # the start-up objects are out of its way


def test_the_probe_sees_a_heavy_import() -> None:
    """Positive control: the probe would notice a client library being imported."""
    assert "redis" in _probe("import redis")["loaded"]


# -- no import cycle ------------------------------------------------------------------------
def _module_level_imports(tree: "ast.Module") -> List["ast.stmt"]:
    """The import statements that run when the module is imported (not in functions or TYPE_CHECKING)."""
    import ast

    found: List[ast.stmt] = []
    pending: List[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.ClassDef):
            pending.extend(node.body)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, (ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                pending.extend(getattr(node, block, []))
            pending.extend(s for h in getattr(node, "handlers", []) for s in h.body)
    return found


def test_no_cycle_of_module_level_imports() -> None:
    """No rdzvctl module imports (at import time) one that imports it back, directly or not."""
    import ast
    import graphlib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    modules = {}
    for path in (root / "rdzvctl").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(prefix + ([base] if base else []))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        deps = set()
        ancestors = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        for target in filter(None, map(owner, filter(lambda t: t.startswith("rdzvctl"), targets))):
            deps.add(target)
            # importing a.b.c first imports a.b: an edge, except to the importer's own packages
            deps.update(target.rsplit(".", d)[0] for d in range(1, target.count(".") + 1))
        graph[name] = {d for d in deps if d != name and (d in targets or d not in ancestors) and d in modules}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
