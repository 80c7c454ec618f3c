"""torchrun's ``--rdzv-backend=redis`` / ``etcd-v3``: registration, stores, real jobs, races.

Every test runs against real servers (redis-server, etcd) started by the
fixtures and real torch: the handlers torchrun builds, torch's store
semantics (compared with its own ``HashStore``), gloo on our stores, two
``torchrun`` nodes doing an all-reduce, and torch handlers racing a fenced
writer.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from torch.distributed.elastic.rendezvous import RendezvousParameters  # noqa: E402

from rdzvctl.torchrun import plugins  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALLREDUCE = REPO / "tests" / "e2e" / "allreduce.py"
BACKENDS = ["redis", "etcd-v3"]
E2E_TIMEOUT = 120.0  # seconds for a whole two-node torchrun job


def _run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def endpoint(backend_name: str, request: pytest.FixtureRequest) -> str:
    """The endpoint of a live server for ``backend_name`` (servers start only when needed)."""
    fixture = "redis_server" if backend_name == "redis" else "etcd_server"
    return request.getfixturevalue(fixture).endpoint


def _params(backend: str, endpoint: str, run_id: str, min_nodes: int = 1, max_nodes: int = 1,
            **conf: Any) -> RendezvousParameters:
    conf.setdefault("read_timeout", "10")
    return RendezvousParameters(backend=backend, endpoint=endpoint, run_id=run_id,
                                min_nodes=min_nodes, max_nodes=max_nodes, **conf)


def _create(backend: str) -> Callable[[RendezvousParameters], Tuple[Any, Any]]:
    return plugins.create_redis_backend if backend == "redis" else plugins.create_etcd_v3_backend


def _make_store(backend: str, endpoint: str, run_id: str, **conf: Any) -> Any:
    return _create(backend)(_params(backend, endpoint, run_id, **conf))[1]


def _rdzvctl_backend(backend: str, endpoint: str, run_id: str) -> Any:
    from rdzvctl.backends.base import Address
    from rdzvctl.backends.registry import open_backend

    return open_backend(Address(backend, endpoint, run_id, timeout=10.0))


# -- registration -------------------------------------------------------------------------


def test_entry_points_are_torchrun_handlers() -> None:
    """The ``torchrun.handlers`` group names both creators, as installed metadata."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="torchrun.handlers")}
    assert found.get("redis") == "rdzvctl.torchrun.plugins:redis_handler"
    assert found.get("etcd-v3") == "rdzvctl.torchrun.plugins:etcd_v3_handler"
    assert plugins.redis_handler() is plugins.create_redis_handler
    assert plugins.etcd_v3_handler() is plugins.create_etcd_v3_handler


def test_torch_registered_both_handlers() -> None:
    """Importing torch's rendezvous package (done above) registered both creators."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry

    assert registry._registry["redis"] is plugins.create_redis_handler
    assert registry._registry["etcd-v3"] is plugins.create_etcd_v3_handler


_REGISTRY_PROBE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    import rdzvctl.torchrun.plugins  # first: torch then loads it while it is being imported
    heavy = {m.split(".")[0] for m in sys.modules} & {"torch", "redis", "etcd3", "etcd3gw", "grpc"}
    assert not heavy, heavy
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry
    from rdzvctl.torchrun import plugins
    assert registry._registry["redis"] is plugins.create_redis_handler, registry._registry
    assert registry._registry["etcd-v3"] is plugins.create_etcd_v3_handler, registry._registry
    heavy = {m.split(".")[0] for m in sys.modules} & {"redis", "etcd3", "etcd3gw", "grpc"}
    assert not heavy, heavy
    print("registered")
""")


def test_plugins_import_lightly_and_register_in_any_order() -> None:
    """The plugin module imports no torch or client library; registration works even when it is
    imported before torch (torch re-enters it), and logs no plugin warning."""
    done = subprocess.run([sys.executable, "-c", _REGISTRY_PROBE], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "registered" in done.stdout
    assert "out of tree plugin" not in done.stderr, done.stderr


def test_registry_builds_a_dynamic_handler(backend_name: str, endpoint: str) -> None:
    """torch's own registry builds our handler; its backend name matches the entry point."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    handler = get_rendezvous_handler(_params(backend_name, endpoint, _run_id("registry")))
    assert isinstance(handler, DynamicRendezvousHandler)
    assert handler.get_backend() == backend_name


def test_backend_satisfies_torch_abc(backend_name: str, endpoint: str) -> None:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

    backend, store = _create(backend_name)(_params(backend_name, endpoint, _run_id("abc")))
    assert isinstance(backend, RendezvousBackend)
    assert isinstance(store, dist.Store)
    assert backend.name == backend_name
    assert backend.get_state() is None
    state, token, has_set = backend.set_state(b"first")
    assert (state, has_set) == (b"first", True)
    assert backend.set_state(b"second", token) [2] is True
    stale = backend.set_state(b"third", token)
    assert stale is not None and stale[0] == b"second" and stale[2] is False


def test_store_uses_the_backends_credentials(backend_name: str, request: pytest.FixtureRequest) -> None:
    """Options such as a password reach both the backend and the store (one connection setup)."""
    if backend_name == "redis":
        from tests.support.redis_server import DEFAULT_PASSWORD

        server = request.getfixturevalue("redis_server_auth")
        conf = {"password": DEFAULT_PASSWORD}
    else:
        from tests.support.etcd_server import ROOT_PASSWORD

        server = request.getfixturevalue("etcd_auth_server")
        conf = {"username": "root", "password": ROOT_PASSWORD}
    backend, store = _create(backend_name)(_params(backend_name, server.endpoint, _run_id("auth"), **conf))
    assert backend.set_state(b"state")[2] is True
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert store.add("n", 1) == 1


def test_unreachable_server_is_a_torch_connection_error(backend_name: str) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError

    from tests.support.harness import free_port

    backend, store = _create(backend_name)(
        _params(backend_name, f"127.0.0.1:{free_port()}", _run_id("down"), read_timeout="2"))
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError):
        backend.get_state()
    with pytest.raises(dist.DistNetworkError):
        store.get("key")
    assert time.monotonic() - started < 10


def test_bad_options_are_value_errors(backend_name: str) -> None:
    with pytest.raises(ValueError):
        _create(backend_name)(_params(backend_name, "127.0.0.1:1", _run_id("bad"), read_timeout="0"))
    with pytest.raises(ValueError):
        _create(backend_name)(_params(backend_name, "127.0.0.1:1", _run_id("bad"), ttl="soon"))


# -- the store contract ----------------------------------------------------------------------


@pytest.fixture()
def store(backend_name: str, endpoint: str) -> Any:
    return _make_store(backend_name, endpoint, _run_id("store"), read_timeout="5")


def test_set_get_bytes_and_str(store: Any) -> None:
    store.set("text", "value")
    store.set("binary", b"\x00\xff\n")
    assert store.get("text") == b"value"
    assert store.get("binary") == b"\x00\xff\n"
    store.set("text", "again")
    assert store.get("text") == b"again"


def test_get_blocks_until_set(store: Any) -> None:
    threading.Timer(0.3, store.set, args=("late", "here")).start()
    started = time.monotonic()
    assert store.get("late") == b"here"
    assert 0.2 < time.monotonic() - started < 3


def test_get_times_out_with_store_timeout(store: Any) -> None:
    store.set_timeout(dt.timedelta(milliseconds=400))
    assert store.timeout == dt.timedelta(milliseconds=400)
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="wait timeout after 400ms"):
        store.get("never")
    assert 0.35 < time.monotonic() - started < 3


def test_wait_with_and_without_timeout(store: Any) -> None:
    store.set("a", "1")
    store.wait(["a"])
    store.wait(["a"], dt.timedelta(seconds=1))
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="never"):
        store.wait(["a", "never"], dt.timedelta(milliseconds=300))
    assert 0.25 < time.monotonic() - started < 3
    with pytest.raises(dist.DistStoreError):
        store.wait(["never"], dt.timedelta(0))  # zero: do not wait (TCPStore's behaviour)
    store.set_timeout(dt.timedelta(milliseconds=300))
    with pytest.raises(dist.DistStoreError):
        store.wait(["never"])
    threading.Timer(0.2, store.multi_set, args=(["b", "c"], ["2", "3"])).start()
    store.wait(["a", "b", "c"], dt.timedelta(seconds=5))


def test_check_never_waits(store: Any) -> None:
    store.set("present", "x")
    started = time.monotonic()
    assert store.check(["present"]) is True
    assert store.check(["present", "absent"]) is False
    assert store.check([]) is True
    assert time.monotonic() - started < 1


def test_add_is_atomic(store: Any) -> None:
    assert store.add("counter", 5) == 5
    assert store.add("counter", -2) == 3
    assert store.add("counter", 0) == 3
    assert store.get("counter") == b"3"
    threads = [threading.Thread(target=lambda: [store.add("race", 1) for _ in range(20)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.add("race", 0) == 80


_CAS_SEQUENCE = [
    ("cs", "", "a"),      # missing + empty expected: created
    ("cs", "", "b"),      # existing + empty expected: refused, current value back
    ("cs", "a", "c"),     # match: replaced
    ("cs", "zz", "d"),    # mismatch: current value back
    ("gone", "q", "w"),   # missing + expected: nothing created, expected back
]


def test_compare_set_matches_torch_hashstore(store: Any) -> None:
    reference = dist.HashStore()
    ours = [store.compare_set(*case) for case in _CAS_SEQUENCE]
    torch_answers = [reference.compare_set(*case) for case in _CAS_SEQUENCE]
    assert ours == torch_answers == [b"a", b"a", b"c", b"c", b"q"]
    assert store.check(["gone"]) is reference.check(["gone"]) is False
    assert store.get("cs") == b"c"


def test_delete_and_num_keys(store: Any) -> None:
    assert store.num_keys() == 0
    store.set("one", "1")
    store.add("two", 2)
    assert store.num_keys() == 2
    assert store.delete_key("one") is True
    assert store.delete_key("one") is False
    assert store.num_keys() == 1
    assert store.check(["one"]) is False


def test_multi_get_multi_set_append(store: Any) -> None:
    store.multi_set(["k1", "k2"], ["v1", b"v2"])
    assert store.multi_get(["k2", "k1"]) == [b"v2", b"v1"]
    store.append("log", "ab")
    store.append("log", b"cd")
    assert store.get("log") == b"abcd"


def test_prefix_store_reaches_every_operation(store: Any) -> None:
    """torch wraps the store in a C++ ``PrefixStore``: each call must reach our Python code."""
    prefixed = dist.PrefixStore("torch.rendezvous.job.0", store)
    prefixed.set("MASTER_ADDR", "127.0.0.1")
    assert store.get("torch.rendezvous.job.0/MASTER_ADDR") == b"127.0.0.1"
    assert prefixed.get("MASTER_ADDR") == b"127.0.0.1"
    assert prefixed.add("n", 2) == 2
    assert prefixed.compare_set("c", "", "x") == b"x"
    assert prefixed.check(["c"]) is True
    prefixed.wait(["c"])
    prefixed.wait(["c"], dt.timedelta(seconds=1))
    prefixed.multi_set(["m1", "m2"], ["1", "2"])
    assert prefixed.multi_get(["m1", "m2"]) == [b"1", b"2"]
    assert prefixed.num_keys() == 5
    assert prefixed.delete_key("c") is True
    with pytest.raises(dist.DistStoreError):
        prefixed.wait(["missing"], dt.timedelta(milliseconds=100))


def test_store_keys_live_under_the_run_prefix_with_a_ttl(backend_name: str, request: pytest.FixtureRequest) -> None:
    run_id = _run_id("layout")
    if backend_name == "redis":
        server = request.getfixturevalue("redis_server")
        store = _make_store(backend_name, server.endpoint, run_id, ttl="600")
        store.set("k", "v")
        key = f"torch.rendezvous.{run_id}.store/k"
        client = server.client()
        assert client.get(key) == b"v"
        assert 0 < client.ttl(key) <= 600
    else:
        server = request.getfixturevalue("etcd_server")
        store = _make_store(backend_name, server.endpoint, run_id, ttl="600")
        store.set("k", "v")
        key = f"/torch/elastic/store/{run_id}/k"
        assert server.etcdctl("get", key, "--print-value-only").strip() == "v"
        lease = server.etcdctl("get", key, "-w", "json")
        assert '"lease":' in lease and '"lease":0' not in lease


def test_etcd_store_replaces_a_lost_lease(etcd_server: Any) -> None:
    """Keys die with their lease; a store whose lease was revoked (or expired) grants a new one."""
    store = _make_store("etcd-v3", etcd_server.endpoint, _run_id("lease"))
    store.set("a", "1")
    store.gateway.lease_revoke(store._lease)
    assert store.check(["a"]) is False
    store.set("b", "2")
    assert store.get("b") == b"2"
    assert store.add("n", 4) == 4
    assert store.compare_set("c", "", "x") == b"x"


def test_redis_store_ttl_zero_never_expires(redis_server: Any) -> None:
    run_id = _run_id("nottl")
    store = _make_store("redis", redis_server.endpoint, run_id, ttl="0")
    store.set("a", "1")
    store.add("n", 1)
    store.compare_set("c", "", "x")
    store.append("log", "x")
    client = redis_server.client()
    keys = list(client.scan_iter(match=f"torch.rendezvous.{run_id}.store/*"))
    assert len(keys) == 4
    assert {client.ttl(key) for key in keys} == {-1}


def test_clone_shares_the_keys(store: Any) -> None:
    twin = store.clone()
    store.set("shared", "yes")
    assert twin.get("shared") == b"yes"


def test_torch_c10d_backend_runs_on_our_store(store: Any) -> None:
    """torch's ``C10dRendezvousBackend`` relies on TCPStore's compare_set answers; ours give the same."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    backend = C10dRendezvousBackend(store, "on-our-store")
    assert backend.get_state() is None
    state, token, has_set = backend.set_state(b"s1")
    assert has_set and state == b"s1"
    assert backend.set_state(b"s2", token)[2] is True
    assert backend.set_state(b"s3", token)[:3:2] == (b"s2", False)


_GLOO_WORKER = textwrap.dedent("""
    import sys, datetime
    import torch, torch.distributed as dist
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzvctl.torchrun import plugins
    backend, endpoint, run_id, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    params = RendezvousParameters(backend=backend, endpoint=endpoint, run_id=run_id,
                                  min_nodes=1, max_nodes=1, read_timeout="30")
    create = plugins.create_redis_backend if backend == "redis" else plugins.create_etcd_v3_backend
    store = create(params)[1]
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    value = torch.tensor([rank + 1.0])
    dist.all_reduce(value)
    dist.barrier()
    print("sum", value.item(), flush=True)
    dist.destroy_process_group()
""")


def test_gloo_process_group_on_our_store(backend_name: str, endpoint: str) -> None:
    """gloo's own rendezvous (C++ calls through the Python store) works on our stores."""
    run_id = _run_id("gloo")
    procs = [
        subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, backend_name, endpoint, run_id, str(rank)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         start_new_session=True)
        for rank in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=90) for proc in procs]
    finally:
        _kill_all(procs)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "sum 3.0" in out


# -- end to end: two torchrun nodes -------------------------------------------------------------


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_all(procs: List[subprocess.Popen]) -> None:
    """Stop what is still running: SIGTERM first (torchrun then stops its workers, which run in
    sessions of their own), SIGKILL to the process group after a grace period."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)


def _torchrun(backend: str, endpoint: str, run_id: str, directory: Path, node: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0", "--monitor-interval=0.5",
        f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
        "--rdzv-conf=join_timeout=90,read_timeout=30",
        str(ALLREDUCE),
    ]
    env = dict(os.environ, RDZV_E2E_DIR=str(directory), RDZV_E2E_HOLD="60", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(directory / f"node{node}.log", "wb")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    finally:
        log.close()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, procs: List[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                raise AssertionError(f"a torchrun node exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_torchrun_two_nodes_allreduce(backend_name: str, endpoint: str, tmp_path: Path) -> None:
    """Two torchrun nodes rendezvous on our backend, all-reduce with gloo, and rdzvctl sees the round."""
    from rdzvctl.state.codec import decode

    run_id = _run_id("e2e")

    def logs() -> str:
        return "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace")[-3000:] for n in range(2))

    procs = [_torchrun(backend_name, endpoint, run_id, tmp_path, node) for node in range(2)]
    try:
        deadline = time.monotonic() + E2E_TIMEOUT
        _wait_for(lambda: all((tmp_path / f"rank{r}.done").exists() for r in range(2)), E2E_TIMEOUT,
                  "both workers to finish the all-reduce", procs)
        # The job is still running: read the rendezvous the way rdzvctl does.
        with _rdzvctl_backend(backend_name, endpoint, run_id) as backend:
            current = backend.get_state()
        assert current is not None, "no rendezvous state while the job runs"
        state = decode(current[0])
        assert state.complete and not state.closed
        assert len(state.participants) == 2
        assert sorted(state.participants.values()) == [0, 1]
        assert set(state.last_heartbeats) >= set(state.participants)
        assert not state.wait_list
        if "store_keys" in backend.capabilities:  # torch's per-round keys, in our store
            with _rdzvctl_backend(backend_name, endpoint, run_id) as backend:
                keys = backend.store_keys()
            assert f"{state.round}/MASTER_ADDR" in keys and f"{state.round}/MASTER_PORT" in keys
        (tmp_path / "release").write_text("")
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        _kill_all(procs)
        raise AssertionError(f"{exc}\n--- torchrun logs ---\n{logs()}") from exc
    finally:
        _kill_all(procs)
    assert [proc.returncode for proc in procs] == [0, 0], logs()
    assert logs().count("all-reduce 3.0 (expected 3.0)") == 2, logs()


# -- torch handlers against a competing fenced writer -----------------------------------------------


class _CountingBackend:
    """A torch backend that records each refused write of a handler."""

    def __init__(self, backend: Any, refusals: List[int]) -> None:
        self.backend = backend
        self.refusals = refusals
        self.name = backend.name

    def get_state(self) -> Any:
        return self.backend.get_state()

    def set_state(self, state: bytes, token: Any = None) -> Any:
        result = self.backend.set_state(state, token)
        if result is not None and not result[2]:
            self.refusals.append(1)
        return result


@pytest.mark.slow
def test_handlers_survive_a_competing_writer(backend_name: str, endpoint: str) -> None:
    """3 torch handlers join while a 4th writer rewrites the state through rdzvctl, fenced.

    The writer adds a node of its own to ``last_heartbeats`` with every write it
    attempts (every 5th one on purpose with a token it made stale itself); no
    update may be lost: each accepted write's node is in the final state, no
    refused write's node is, every accepted write got a new, larger token, and
    the round completes with exactly the 3 handlers.
    """
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    from rdzvctl.state.codec import decode, encode
    from rdzvctl.state.model import NodeDesc

    run_id = _run_id("race")
    params = _params(backend_name, endpoint, run_id, min_nodes=3, max_nodes=3,
                     join_timeout="60", local_addr="127.0.0.1")
    handlers = []
    handler_refusals: List[int] = []
    for _ in range(3):
        backend, store = _create(backend_name)(params)
        handlers.append(create_handler(store, _CountingBackend(backend, handler_refusals), params))

    stop = threading.Event()
    accepted: List[Tuple[int, Any]] = []
    refused: List[int] = []
    errors: List[BaseException] = []

    def compete() -> None:
        attempt = 0
        stale: Any = None  # a token this writer itself made stale
        try:
            with _rdzvctl_backend(backend_name, endpoint, run_id) as backend:
                while not stop.is_set():
                    current = backend.get_state()
                    if current is None:
                        time.sleep(0.005)
                        continue
                    state = decode(current[0])
                    time.sleep(random.uniform(0, 0.004))  # leave the handlers a window to write
                    attempt += 1
                    state.last_heartbeats[NodeDesc("competitor", os.getpid(), attempt)] = (
                        dt.datetime.now(dt.timezone.utc))
                    use_stale = stale is not None and attempt % 5 == 0
                    result = backend.set_state(encode(state), stale if use_stale else current[1])
                    assert result is not None
                    assert not (use_stale and result[2]), "a write with a stale token was accepted"
                    if result[2]:
                        accepted.append((attempt, result[1]))
                        stale = current[1]
                    else:
                        refused.append(attempt)
                    time.sleep(random.uniform(0, 0.002))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    infos: List[Any] = [None] * 3

    def join(index: int) -> None:
        try:
            infos[index] = handlers[index].next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    competitor = threading.Thread(target=compete, daemon=True)
    joiners = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(3)]
    competitor.start()
    time.sleep(0.05)
    for thread in joiners:
        thread.start()
    try:
        for thread in joiners:
            thread.join(timeout=90)
        # Let the writer race the first heartbeats too, then stop it.
        time.sleep(0.5)
    finally:
        stop.set()
        competitor.join(timeout=30)
    assert not errors, errors
    assert all(info is not None for info in infos)
    assert sorted(info.rank for info in infos) == [0, 1, 2]
    assert {info.world_size for info in infos} == {3}

    with _rdzvctl_backend(backend_name, endpoint, run_id) as backend:
        current = backend.get_state()
    assert current is not None
    final = decode(current[0])
    assert final.complete and len(final.participants) == 3
    assert all(node.addr == "127.0.0.1" for node in final.participants)
    competitors = {node.local_id for node in final.last_heartbeats if node.addr == "competitor"}
    assert accepted, "the competing writer never got a write in"
    assert refused, "the stale-token writes were not refused"
    assert competitors == {attempt for attempt, _ in accepted}, (competitors, accepted, refused)
    print(f"competitor: {len(accepted)} accepted, {len(refused)} refused; handlers: {len(handler_refusals)} refused")
    tokens = [token for _, token in accepted]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    for handler in handlers:
        handler.shutdown()
