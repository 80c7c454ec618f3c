"""Importing rdzvctl (and asking the CLI for help) never imports torch or a backend client."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

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
NOT_FOR_A_FILESTORE_GET = HEAVY + ["socket", "rdzvctl.state.legacy_etcd", "rdzvctl.backends.tcpstore", "rich"]


def test_get_on_a_filestore_loads_no_socket_legacy_code_or_rich(tmp_path: Path) -> None:
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


def test_the_probe_sees_a_heavy_import() -> None:
    """Positive control: the probe would notice a client library being imported."""
    assert "redis" in _probe("import redis")["loaded"]
