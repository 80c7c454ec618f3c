"""The conformance kit: passes on the reference backend and on torch's own c10d
backend over a real TCPStore, and fails deliberately broken backends."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from rdzvctl.backends.base import Address, RendezvousBackend, SetResult, StateAndToken, Token
from rdzvctl.backends.registry import open_backend
from rdzvctl.backends.torch_adapter import TorchBackendAdapter
from rdzvctl.errors import BackendUnavailableError, StateCorruptError, TokenConflictError
from rdzvctl.testing import (
    CASES,
    BackendConformanceTests,
    CaseResult,
    ConformanceLimitation,
    run_conformance,
)
from rdzvctl.testing.memory import MemoryBackend

TORCH_C10D = "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend:create_backend"
CASE_NAMES = [name for name, _, _ in CASES]


# -- the reference backend ----------------------------------------------------------------
class TestMemoryBackend(BackendConformanceTests):
    """The in-memory reference backend passes every case (strict, with clear and list_runs)."""

    def make_backend(self, run_id: str) -> RendezvousBackend:
        return MemoryBackend(Address("memory", "kit-reference", run_id))

    def corrupt_state(self, backend: RendezvousBackend) -> None:
        assert isinstance(backend, MemoryBackend)
        backend.corrupt()


def test_reference_backend_passes_every_case_with_no_skips() -> None:
    results = run_conformance(lambda run_id: MemoryBackend(Address("memory", "kit-run", run_id)),
                              corrupter=lambda backend: backend.corrupt())  # type: ignore[attr-defined]
    assert [r.name for r in results] == CASE_NAMES
    assert {r.name: r.outcome for r in results} == {name: "pass" for name in CASE_NAMES}, _details(results)


# -- torch's own C10dRendezvousBackend over a real TCPStore ----------------------------------
@pytest.fixture(scope="module")
def torch_store() -> Iterator[Any]:
    """A torch TCPStore server hosted by this process on a free loopback port."""
    dist = pytest.importorskip("torch.distributed")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield store
    del store


def _torch_address(store: Any, run_id: str) -> Address:
    return Address(TORCH_C10D, f"127.0.0.1:{store.port}", run_id, {"is_host": "false", "store_type": "tcp"},
                   timeout=10.0)


def _corrupt_through_torch(store: Any, backend: RendezvousBackend) -> None:
    """Store a value torch's own backend must refuse (not base64) at the run's key."""
    store.set(f"torch.rendezvous.{backend.run_id}", "!not base64")


class TestTorchC10dBackend(BackendConformanceTests):
    """torch's C10dRendezvousBackend, through the module:factory adapter, on a real TCPStore."""

    @pytest.fixture(autouse=True)
    def _store(self, torch_store: Any) -> None:
        self.store = torch_store

    def make_backend(self, run_id: str) -> RendezvousBackend:
        return open_backend(_torch_address(self.store, run_id))

    def corrupt_state(self, backend: RendezvousBackend) -> None:
        _corrupt_through_torch(self.store, backend)

    def test_no_aba(self) -> None:
        """torch's c10d design uses the value as its token: a declared limitation, reported as such."""
        with pytest.warns(ConformanceLimitation, match="uses the value as its token"):
            BackendConformanceTests.test_no_aba(self)  # type: ignore[attr-defined]


def test_torch_backend_outcomes(torch_store: Any) -> None:
    """The same through run_conformance: every torch case passes; ABA is a limitation, not a skip."""
    results = run_conformance(lambda run_id: open_backend(_torch_address(torch_store, run_id)),
                              corrupter=lambda backend: _corrupt_through_torch(torch_store, backend))
    outcomes = {r.name: r.outcome for r in results}
    expected = {name: "pass" for name in CASE_NAMES}
    expected.update(no_aba="limitation", clear_fenced="skip", list_runs="skip", store_rounds="skip", history="skip")
    assert outcomes == expected, _details(results)


def test_adapter_wraps_torchs_backend(torch_store: Any) -> None:
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    backend = open_backend(_torch_address(torch_store, f"adapter-{uuid.uuid4().hex[:8]}"))
    assert isinstance(backend, TorchBackendAdapter)
    assert isinstance(backend.wrapped, C10dRendezvousBackend)
    assert backend.strict_fencing is False
    assert backend.get_state() is None
    state, token, has_set = backend.set_state(b"\x00state")
    assert (state, has_set) == (b"\x00state", True)
    assert torch_store.get(f"torch.rendezvous.{backend.run_id}") == token  # the token is the stored base64


def test_adapter_maps_torch_errors(torch_store: Any) -> None:
    backend = open_backend(_torch_address(torch_store, f"adapter-{uuid.uuid4().hex[:8]}"))
    _corrupt_through_torch(torch_store, backend)
    with pytest.raises(StateCorruptError) as info:
        backend.get_state()
    assert type(info.value.__cause__).__name__ == "RendezvousStateError"


def test_adapter_reports_an_unreachable_store() -> None:
    import socket

    pytest.importorskip("torch")
    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # No read_timeout in the conf: the address's timeout bounds torch's store (not its 60 s default).
    address = Address(TORCH_C10D, f"127.0.0.1:{port}", "job", {"is_host": "false", "store_type": "tcp"},
                      timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{port}"):
        open_backend(address)
    assert time.monotonic() - started < 15


def test_adapter_passes_rdzvctl_errors_through() -> None:
    class Wrapped:
        def get_state(self) -> Any:
            raise StateCorruptError("already typed")

        def set_state(self, state: bytes, token: Any = None) -> Any:
            raise TokenConflictError("lost")

    adapter = TorchBackendAdapter(Address("pkg:factory", "h:1", "job"), backend=Wrapped())
    with pytest.raises(StateCorruptError, match="already typed"):
        adapter.get_state()
    with pytest.raises(TokenConflictError):
        adapter.set_state(b"x")


# -- deliberately broken backends fail ---------------------------------------------------------
class _DictBackend(RendezvousBackend):
    """A plain fenced backend over a class-level dict; subclasses break one rule each."""

    name = "broken"
    _lock = threading.Lock()
    _table: Dict[str, Tuple[bytes, int]] = {}
    _versions = itertools.count(1)

    def _current(self) -> Optional[Tuple[bytes, int]]:
        return self._table.get(self.address.endpoint + "/" + self.run_id)

    def _store(self, state: bytes) -> Tuple[bytes, int]:
        value = (bytes(state), next(self._versions))
        self._table[self.address.endpoint + "/" + self.run_id] = value
        return value

    def get_state(self) -> Optional[StateAndToken]:
        with self._lock:
            return self._current()

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        with self._lock:
            current = self._current()
            if (token is None and current is None) or (current is not None and type(token) is int
                                                       and token == current[1]):
                return (*self._store(state), True)
            return None if current is None else (*current, False)


class IgnoresToken(_DictBackend):
    """Writes whatever the token says."""

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        with self._lock:
            return (*self._store(state), True)


class AlwaysHasSet(_DictBackend):
    """Fenced correctly, but claims every write succeeded."""

    def set_state(self, state: bytes, token: Optional[Token] = None) -> Optional[SetResult]:
        result = super().set_state(state, token)
        return None if result is None else (result[0], result[1], True)


class TokenNeverChanges(_DictBackend):
    """Fenced on a token that is always 1."""

    def _store(self, state: bytes) -> Tuple[bytes, int]:
        value = (bytes(state), 1)
        self._table[self.address.endpoint + "/" + self.run_id] = value
        return value


class ClaimsNonStrictButIsStrict(_DictBackend):
    strict_fencing = False


def _run(cls: type) -> Dict[str, CaseResult]:
    endpoint = f"{cls.__name__}-{uuid.uuid4().hex[:8]}"
    # A token that never changes also blinds watch, which then waits out its 10 s: not run here.
    only = [name for name in CASE_NAMES if name != "watch" or cls is not TokenNeverChanges]
    results = run_conformance(lambda run_id: cls(Address("broken", endpoint, run_id)), racers=6, only=only)
    return {r.name: r for r in results}


def _details(results: List[CaseResult]) -> str:
    return "; ".join(f"{r.name}={r.outcome} {r.detail}" for r in results if r.outcome != "pass")


def test_the_correct_dict_backend_passes() -> None:
    results = _run(_DictBackend)
    assert {n: r.outcome for n, r in results.items() if r.outcome != "pass"} == {
        "get_corrupt_raises": "skip", "clear_fenced": "skip", "list_runs": "skip", "store_rounds": "skip",
        "history": "skip"}


@pytest.mark.parametrize("cls, failing", [
    (IgnoresToken, {"set_old_token", "set_no_token_existing", "set_invalid_token", "set_token_absent_state",
                    "racing_writers"}),
    (AlwaysHasSet, {"set_old_token", "set_no_token_existing", "set_invalid_token", "racing_writers"}),
    (TokenNeverChanges, {"set_current_token", "set_old_token", "racing_writers", "no_aba"}),
    (ClaimsNonStrictButIsStrict, {"no_aba"}),
])
def test_broken_backends_fail_the_kit(cls: type, failing: set) -> None:
    results = _run(cls)
    failed = {name for name, r in results.items() if r.outcome == "fail"}
    assert failed == failing, {n: r.detail for n, r in results.items() if r.outcome == "fail"}
    assert all(results[name].detail for name in failed)
    assert results["get_none_when_absent"].outcome == "pass"


def test_broken_backend_fails_through_the_pytest_mixin() -> None:
    class TestIgnoresToken(BackendConformanceTests):
        def make_backend(self, run_id: str) -> RendezvousBackend:
            return IgnoresToken(Address("broken", "mixin", run_id))

    with pytest.raises(AssertionError, match="old token was accepted"):
        TestIgnoresToken().test_set_old_token()  # type: ignore[attr-defined]
    TestIgnoresToken().test_get_none_when_absent()  # type: ignore[attr-defined]


def test_a_factory_that_raises_fails_every_case_instead_of_crashing() -> None:
    def factory(run_id: str) -> RendezvousBackend:
        raise BackendUnavailableError("nothing listens at 127.0.0.1:1")

    results = run_conformance(factory, only=["get_none_when_absent", "set_creates"])
    assert [(r.name, r.outcome) for r in results] == [("get_none_when_absent", "fail"), ("set_creates", "fail")]
    assert "127.0.0.1:1" in results[0].detail


def test_only_selects_cases_in_order() -> None:
    results = run_conformance(lambda run_id: MemoryBackend(Address("memory", "kit-only", run_id)),
                              only=["set_creates", "get_none_when_absent"])
    assert [r.name for r in results] == ["get_none_when_absent", "set_creates"]


# -- what a case leaves behind ---------------------------------------------------------------
def _one_case_on(address: Address) -> str:
    """Write a state on a fresh scratch run, clear it and close the case as the kit does; the run id."""
    from rdzvctl.testing.context import CaseContext

    context = CaseContext(lambda run_id: open_backend(address.with_run_id(run_id)), None, 1)
    context.set(b"scratch state")
    context.close()
    return context.run_id


def test_a_case_leaves_no_key_on_redis(redis_server) -> None:
    """A fenced clear keeps the run's version counter (tokens never repeat); the scratch run's is removed."""
    run_id = _one_case_on(Address("redis", redis_server.endpoint))
    assert [key for key in redis_server.client().scan_iter(match=f"*{run_id}*")] == []


def test_a_case_leaves_no_key_on_etcd_v3(etcd_server) -> None:
    """A cleared etcd v3 state leaves its lease to expire; the scratch run's lease is revoked."""
    leases_before = set(etcd_server.etcdctl("lease", "list").split()[3:])  # "found N leases", then the ids
    run_id = _one_case_on(Address("etcd-v3", etcd_server.endpoint))
    assert run_id not in etcd_server.etcdctl("get", "--prefix", "", "--keys-only")
    assert set(etcd_server.etcdctl("lease", "list").split()[3:]) <= leases_before
