"""Finding backends by name, torchrun-style addresses and ``--rdzv-conf`` parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest

from rdzvctl.backends import registry
from rdzvctl.backends.base import DEFAULT_TIMEOUT, Address, RendezvousBackend, parse_conf
from rdzvctl.backends.registry import get_backend_class, missing_modules, open_backend, registered_backends
from rdzvctl.backends.torch_adapter import TorchBackendAdapter
from rdzvctl.errors import (
    BackendConfigError,
    BackendNotFoundError,
    MissingDependencyError,
    UsageError,
)
from rdzvctl.testing.memory import MemoryBackend

BUILT_IN = ["c10d", "etcd-v2", "etcd-v3", "redis"]


class NeedsMissingModule(MemoryBackend):
    """A backend whose client library is not installed."""

    name = "needs-missing"
    requires = ("rdzvctl_test_no_such_client", "json")
    install_hint = "rdzvctl-test-client>=2"


class NotABackend:
    pass


def not_a_torch_backend(params: Any) -> object:
    return object()


@pytest.fixture()
def extra_builtins() -> Iterator[Dict[str, str]]:
    """Register test backends for the test (through the public ``registry.register``)."""
    entries = {
        "needs-missing": f"{__name__}:NeedsMissingModule",
        "not-a-backend": f"{__name__}:NotABackend",
        "unimportable": "rdzvctl_test_no_such_package.backend:Backend",
        "reference": "rdzvctl.testing.memory:MemoryBackend",
    }
    with registry.register(entries):
        yield entries


# -- registry -------------------------------------------------------------------------------
def test_register_lasts_for_its_block_and_restores_what_a_name_meant() -> None:
    with registry.register({"reference": "rdzvctl.testing.memory:MemoryBackend"}):
        assert get_backend_class("reference") is MemoryBackend
        assert registered_backends()["reference"].target == "rdzvctl.testing.memory:MemoryBackend"
        with registry.register({"reference": f"{__name__}:NeedsMissingModule"}):
            assert get_backend_class("reference") is NeedsMissingModule
        assert get_backend_class("reference") is MemoryBackend
    assert "reference" not in registered_backends()
    with pytest.raises(BackendNotFoundError):
        get_backend_class("reference")


def test_built_in_backends_are_registered_and_load() -> None:
    found = registered_backends()
    assert set(BUILT_IN) <= set(found)
    for name in BUILT_IN:
        cls = get_backend_class(name)
        assert issubclass(cls, RendezvousBackend)
        assert cls.name == name
        assert cls.summary
        assert found[name].target.startswith("rdzvctl.backends.")


def test_registered_backends_are_sorted_by_name() -> None:
    names = list(registered_backends())
    assert names == sorted(names)


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(BackendNotFoundError) as info:
        get_backend_class("etcd-v4")
    message = str(info.value)
    assert "etcd-v4" in message
    for name in BUILT_IN:
        assert name in message
    assert info.value.exit_code == 2
    with pytest.raises(BackendNotFoundError):
        open_backend(Address("nope", "127.0.0.1:1", "job"))


def test_module_factory_goes_to_the_torch_adapter() -> None:
    assert get_backend_class("torch.distributed.elastic.rendezvous.c10d_rendezvous_backend:create_backend") \
        is TorchBackendAdapter
    assert get_backend_class("my_company.rdzv:make") is TorchBackendAdapter


def test_module_factory_that_cannot_be_imported() -> None:
    pytest.importorskip("torch")
    with pytest.raises(MissingDependencyError, match="rdzvctl_test_no_such_package"):
        open_backend(Address("rdzvctl_test_no_such_package.x:factory", "127.0.0.1:1", "job"))
    with pytest.raises(UsageError, match="no attribute"):
        open_backend(Address(f"{__name__}:no_such_factory", "127.0.0.1:1", "job"))
    with pytest.raises(BackendConfigError, match="RendezvousBackend"):
        open_backend(Address(f"{__name__}:not_a_torch_backend", "127.0.0.1:1", "job"))


def test_missing_required_module_gives_the_install_hint(extra_builtins: Dict[str, str]) -> None:
    assert missing_modules(NeedsMissingModule) == ["rdzvctl_test_no_such_client"]
    with pytest.raises(MissingDependencyError) as info:
        open_backend(Address("needs-missing", "127.0.0.1:1", "job"))
    message = str(info.value)
    assert "rdzvctl_test_no_such_client" in message and "json" not in message
    assert "pip install rdzvctl-test-client>=2" in message
    assert info.value.exit_code == 2


def test_registered_target_problems(extra_builtins: Dict[str, str]) -> None:
    with pytest.raises(UsageError, match="not a RendezvousBackend"):
        get_backend_class("not-a-backend")
    with pytest.raises(MissingDependencyError, match="rdzvctl_test_no_such_package"):
        get_backend_class("unimportable")
    # A broken registration does not hide the others.
    assert set(BUILT_IN) | set(extra_builtins) <= set(registered_backends())
    assert get_backend_class("redis").name == "redis"


def test_open_backend_binds_the_run_id(extra_builtins: Dict[str, str]) -> None:
    with open_backend(Address("reference", "registry-test", "job-a", {"k": "v"}, 1.0), run_id="job-b") as backend:
        assert isinstance(backend, MemoryBackend)
        assert backend.address == Address("reference", "registry-test", "job-b", {"k": "v"}, 1.0)


def _install_plugin(root: Path, name: str, entry_points: str) -> None:
    """A distribution's metadata on sys.path, as ``pip install`` would leave it."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[rdzvctl.backends]\n{entry_points}\n")


def test_third_party_backend_through_the_entry_point_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, "rdzvctl-plugin-demo",
                    "demo-store = rdzvctl.testing.memory:MemoryBackend\n"
                    "demo-broken = rdzvctl_test_no_such_package:Backend")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = registered_backends()
    assert found["demo-store"].target == "rdzvctl.testing.memory:MemoryBackend"
    assert found["demo-store"].origin == "rdzvctl-plugin-demo 1.0"
    backend = open_backend(Address("demo-store", "plugin-test", "job"))
    assert isinstance(backend, MemoryBackend) and backend.run_id == "job"
    with pytest.raises(MissingDependencyError):
        open_backend(Address("demo-broken", "", "job"))
    assert set(BUILT_IN) <= set(found)


# -- Address.from_env -------------------------------------------------------------------------
FIELDS = {"BACKEND": "backend", "ENDPOINT": "endpoint", "ID": "run_id", "CONF": "conf"}


def _from_env(environ: Dict[str, str], **explicit: Optional[str]) -> Address:
    return Address.from_env(environ=environ, **explicit)  # type: ignore[arg-type]


@pytest.mark.parametrize("var, field", FIELDS.items())
def test_from_env_precedence(var: str, field: str) -> None:
    base = {"PET_RDZV_BACKEND": "c10d"}
    value = {"BACKEND": "{}", "ENDPOINT": "host-{}:1", "ID": "job-{}", "CONF": "k={}"}[var]

    def read(address: Address) -> Any:
        got = getattr(address, field)
        return got["k"] if field == "conf" else got

    def expect(tag: str) -> str:
        return tag if var == "CONF" else value.format(tag)

    env = dict(base, **{f"PET_RDZV_{var}": value.format("pet")})
    assert read(_from_env(env)) == expect("pet")
    env[f"RDZVCTL_RDZV_{var}"] = value.format("rdzvctl")
    assert read(_from_env(env)) == expect("rdzvctl")
    assert read(_from_env(env, **{field: value.format("explicit")})) == expect("explicit")
    env[f"RDZVCTL_RDZV_{var}"] = ""  # empty counts as unset
    assert read(_from_env(env)) == expect("pet")


def test_from_env_as_torchrun_sets_it() -> None:
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "10.0.0.1:29400", "PET_RDZV_ID": "job42",
           "PET_RDZV_CONF": "is_host=false,read_timeout=30", "RDZVCTL_TIMEOUT": "2.5"}
    address = _from_env(env)
    assert address == Address("c10d", "10.0.0.1:29400", "job42", {"is_host": "false", "read_timeout": "30"}, 2.5)
    assert address.get_bool("is_host") is False and address.get_int("read_timeout") == 30


def test_from_env_defaults_and_errors() -> None:
    address = _from_env({}, backend="redis")
    assert (address.endpoint, address.run_id, dict(address.conf), address.timeout) == ("", "", {}, DEFAULT_TIMEOUT)
    assert Address.from_env(backend="redis", timeout=1.0, environ={"RDZVCTL_TIMEOUT": "9"}).timeout == 1.0
    with pytest.raises(BackendConfigError, match="PET_RDZV_BACKEND"):
        _from_env({"PET_RDZV_ENDPOINT": "x:1"})
    with pytest.raises(BackendConfigError, match="RDZVCTL_TIMEOUT"):
        _from_env({"RDZVCTL_TIMEOUT": "soon"}, backend="redis")
    with pytest.raises(BackendConfigError, match="--rdzv-conf"):
        _from_env({"PET_RDZV_CONF": "novalue"}, backend="redis")


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_RDZV_BACKEND", "etcd-v3")
    monkeypatch.setenv("PET_RDZV_ID", "from-os")
    monkeypatch.delenv("RDZVCTL_RDZV_BACKEND", raising=False)
    monkeypatch.delenv("RDZVCTL_RDZV_ID", raising=False)
    address = Address.from_env()
    assert (address.backend, address.run_id) == ("etcd-v3", "from-os")


def test_with_run_id_keeps_everything_else() -> None:
    address = Address("redis", "h:1", "a", {"k": "v"}, 3.0)
    assert address.with_run_id("b") == Address("redis", "h:1", "b", {"k": "v"}, 3.0)


# -- parse_conf and typed getters ---------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("   ", {}),
    (",,", {}),
    ("a=1", {"a": "1"}),
    ("a=1,b=2", {"a": "1", "b": "2"}),
    (" a = 1 , b=2 ,", {"a": "1", "b": "2"}),
    ("a=", {"a": ""}),
    ("a=b=c", {"a": "b=c"}),
    ("a=1,a=2", {"a": "2"}),
    ("store_type=file,path=/tmp/x y", {"store_type": "file", "path": "/tmp/x y"}),
    ("url=redis://h:1/0?x=1", {"url": "redis://h:1/0?x=1"}),
])
def test_parse_conf(text: str, expected: Dict[str, str]) -> None:
    assert parse_conf(text) == expected


@pytest.mark.parametrize("text, bad", [("a", "'a'"), ("=1", "'=1'"), ("a=1,b", "'b'"), (" =x", "'=x'")])
def test_parse_conf_errors_name_the_item(text: str, bad: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        parse_conf(text)
    assert bad in str(info.value) and "--rdzv-conf" in str(info.value)


def test_typed_getters() -> None:
    address = Address("x", conf={"n": "3", "f": "0.5", "t": "Yes", "o": "off", "e": "", "bad": "maybe"})
    assert address.get("n") == "3" and address.get("missing", "d") == "d"
    assert address.get_int("n") == 3 and address.get_int("e", 7) == 7 and address.get_int("missing") is None
    assert address.get_float("f") == 0.5 and address.get_float("n") == 3.0
    assert address.get_bool("t") is True and address.get_bool("o") is False and address.get_bool("e", True) is True
    for getter in (address.get_int, address.get_float, address.get_bool):
        with pytest.raises(BackendConfigError, match="bad"):
            getter("bad")
