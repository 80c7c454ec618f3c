"""--rdzv-conf keys: a key neither the backend nor torch knows is refused (exit 2, with a suggestion)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rdzvctl.backends.base import SHARED_CONF_KEYS, Address
from rdzvctl.backends.registry import get_backend_class, open_backend
from rdzvctl.errors import BackendConfigError
from tests.support.cli import run_rdzvctl

BUILTINS = ("c10d", "etcd-v2", "etcd-v3", "redis")
ENDPOINTS = {"c10d": "127.0.0.1:1", "etcd-v2": "127.0.0.1:1", "etcd-v3": "127.0.0.1:1", "redis": "127.0.0.1:1"}


@pytest.fixture
def filestore(tmp_path) -> dict:
    store = tmp_path / "store"
    store.write_bytes(b"")
    return {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(store), "PET_RDZV_ID": "job"}


def test_a_mistyped_key_exits_2_with_a_suggestion(filestore):
    done = run_rdzvctl(["reset", "--mode", "prune", "--dry-run", "--rdzv-conf",
                        "store_type=file,keep_alive_intervall=30"], env=filestore)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("rdzvctl: BackendConfigError: --rdzv-conf: unknown key 'keep_alive_intervall'")
    assert "did you mean keep_alive_interval?" in line


def test_a_mistyped_key_from_the_environment_is_refused_too(filestore):
    done = run_rdzvctl(["get"], env={**filestore, "PET_RDZV_CONF": "store_typ=file"})
    assert done.returncode == 2 and "did you mean store_type?" in done.stderr


def test_torchrun_keys_are_accepted(filestore):
    conf = ("store_type=file,join_timeout=600,last_call_timeout=30,close_timeout=30,heartbeat_timeout=5,"
            "timeout=900,read_timeout=60,is_host=false,keep_alive_interval=5,keep_alive_max_attempt=3,"
            "min_nodes=1,max_nodes=4")
    done = run_rdzvctl(["get", "--rdzv-conf", conf], env=filestore)
    assert done.returncode == 5, done.stderr  # no state: the keys were all accepted


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_declares_its_keys_and_refuses_others(name):
    cls = get_backend_class(name)
    assert cls.conf_keys is not None
    with pytest.raises(BackendConfigError, match="unknown key 'keep_alive_intervall'.*did you mean keep_alive_interval"):
        open_backend(Address(name, ENDPOINTS[name], "job", {"keep_alive_intervall": "30"}, 1.0))
    with pytest.raises(BackendConfigError, match="unknown key 'no_such_option'") as info:
        open_backend(Address(name, ENDPOINTS[name], "job", {"no_such_option": "1"}, 1.0))
    assert "did you mean" not in str(info.value)


def test_a_backend_that_declares_no_keys_accepts_any():
    from rdzvctl.testing.memory import MemoryBackend

    assert MemoryBackend.conf_keys is None
    MemoryBackend.from_address(Address("memory", "conf-keys", "job", {"anything": "1"})).close()


def _torch_source(module: str) -> str:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:  # pragma: no cover - torch is in the test extra
        pytest.skip("torch is not installed")
    return (Path(spec.origin).parent / "distributed" / "elastic" / "rendezvous" / f"{module}.py").read_text()


def _keys_read(source: str) -> set:
    keys = set(re.findall(r'params\.get(?:_as_\w+)?\(\s*"(\w+)"', source))
    keys |= {f"{k}_timeout" for k in re.findall(r'_get_timeout\(params,\s*"(\w+)"\)', source)}
    return keys


@pytest.mark.torch
@pytest.mark.parametrize(("module", "backends"), [
    ("dynamic_rendezvous", BUILTINS),
    ("c10d_rendezvous_backend", ("c10d",)),
    ("etcd_rendezvous_backend", ("etcd-v2", "etcd-v3")),
])
def test_every_key_torch_reads_is_accepted(module, backends):
    """The keys torch's create_handler and its c10d/etcd backends read from rdzv_conf."""
    keys = _keys_read(_torch_source(module))
    assert keys, f"found no rdzv_conf keys in torch's {module}"
    for name in backends:
        assert keys <= (get_backend_class(name).conf_keys | SHARED_CONF_KEYS), (name, keys)
