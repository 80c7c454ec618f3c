"""The redis backend against real redis-server processes (plain, TLS, auth, cluster, sentinel)."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
import uuid

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.redis_backend import RedisBackend, counter_key, translate_error
from rdzvctl.errors import (
    BackendConfigError,
    BackendTimeoutError,
    BackendUnavailableError,
    RdzvctlError,
    StateCorruptError,
)
from rdzvctl.testing.conformance import BackendConformanceTests
from tests.support.redis_server import (
    ACL_PASSWORD,
    ACL_USER,
    DEFAULT_PASSWORD,
    free_port,
)

TIMEOUT = 5.0


def backend(endpoint: str, run_id: str = "", timeout: float = TIMEOUT, **conf: str) -> RedisBackend:
    return RedisBackend.from_address(Address("redis", endpoint, run_id or new_run_id(), conf, timeout))


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def write_garbage(server, key: str) -> None:
    """Store a state field that is not base64, straight through a raw client."""
    client = server.client()
    client.hset(key, mapping={"state": "%%% not base64 %%%", "version": "1"})
    client.close()


# -- the conformance kit, once per server variant ----------------------------------
class _Kit(BackendConformanceTests):
    server_fixture = ""

    @pytest.fixture(autouse=True)
    def _server(self, request):
        self.server = request.getfixturevalue(self.server_fixture)

    def corrupt_state(self, b: RedisBackend) -> None:
        write_garbage(self.server, b.key)


class TestConformancePlain(_Kit):
    """No keyspace notifications: watch polls."""

    server_fixture = "redis_server"

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id)


class TestConformanceNotify(_Kit):
    """Keyspace notifications on: watch is pushed."""

    server_fixture = "redis_server_notify"

    def make_backend(self, run_id):
        return backend(f"redis://127.0.0.1:{self.server.port}/0", run_id)


class TestConformanceTls(_Kit):
    """rediss:// with CA verification and a client certificate."""

    server_fixture = "redis_server_tls"

    def make_backend(self, run_id):
        tls = self.server.tls
        return backend(
            self.server.url, run_id,
            ssl_ca_certs=str(tls.ca), ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key),
        )


class TestConformanceAuth(_Kit):
    """An ACL user with a password in the URL."""

    server_fixture = "redis_server_auth"

    def make_backend(self, run_id):
        return backend(f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{self.server.port}/2", run_id)

    def corrupt_state(self, b: RedisBackend) -> None:
        client = self.server.client(db=2)
        client.hset(b.key, mapping={"state": "%%% not base64 %%%", "version": "1"})
        client.close()


class TestConformanceCluster(_Kit):
    """A one-node Redis Cluster: the state and counter keys must share a slot."""

    server_fixture = "redis_cluster_node"

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id, cluster="true")


class TestConformanceSentinel(_Kit):
    """The master found through a sentinel."""

    server_fixture = "redis_sentinel"

    @pytest.fixture(autouse=True)
    def _server(self, request):
        self.sentinel, self.server = request.getfixturevalue("redis_sentinel")

    def make_backend(self, run_id):
        return backend(self.sentinel.endpoint, run_id, sentinel_master="mymaster")


# -- layout: what redis-cli sees ----------------------------------------------------
def test_layout_is_readable_with_redis_cli(redis_server):
    b = backend(redis_server.endpoint, ttl="600")
    state = bytes(range(256))
    _, token, _ = b.set_state(state)
    assert redis_server.cli("type", b.key).strip() == "hash"
    assert base64.b64decode(redis_server.cli("hget", b.key, "state").strip()) == state
    assert int(redis_server.cli("hget", b.key, "version")) == token
    assert b.counter_key == "{torch.rendezvous." + b.run_id + "}:version"
    assert int(redis_server.cli("get", b.counter_key)) == token
    assert 590 < int(redis_server.cli("ttl", b.key)) <= 600
    assert 590 < int(redis_server.cli("ttl", b.counter_key)) <= 600


def test_ttl_refreshed_on_write_and_zero_means_forever(redis_server):
    b = backend(redis_server.endpoint, ttl="100")
    _, token, _ = b.set_state(b"x")
    redis_server.client().expire(b.key, 5)
    b.set_state(b"y", token)
    assert int(redis_server.cli("ttl", b.key)) > 90
    forever = backend(redis_server.endpoint, ttl="0")
    forever.set_state(b"x")
    assert int(redis_server.cli("ttl", forever.key)) == -1
    assert int(redis_server.cli("ttl", forever.counter_key)) == -1


def test_default_ttl_is_torchs_7200_s(redis_server):
    b = backend(redis_server.endpoint)
    b.set_state(b"x")
    assert 7190 < int(redis_server.cli("ttl", b.key)) <= 7200


def test_key_prefix_option(redis_server):
    b = backend(redis_server.endpoint, run_id="job", key_prefix="team-a:rdzv:")
    b.set_state(b"x")
    assert b.key == "team-a:rdzv:job"
    assert redis_server.cli("exists", "team-a:rdzv:job").strip() == "1"


def test_versions_increase_strictly_across_clear(redis_server):
    b = backend(redis_server.endpoint)
    _, t1, _ = b.set_state(b"x")
    _, t2, _ = b.set_state(b"x", t1)
    assert b.clear(t2) is True
    _, t3, has_set = b.set_state(b"y")
    assert has_set and t1 < t2 < t3
    for old in (t1, t2):
        assert b.set_state(b"z", old)[2] is False
        assert b.clear(old) is False
    assert b.get_state() == (b"y", t3)


def test_versions_increase_after_the_counter_is_gone(redis_server):
    b = backend(redis_server.endpoint)
    _, t1, _ = b.set_state(b"x")
    assert b.clear(t1)
    redis_server.client().delete(b.counter_key)  # as if it had expired
    _, t2, _ = b.set_state(b"y")
    assert t2 > t1


def test_bool_and_string_tokens_are_stale(redis_server):
    b = backend(redis_server.endpoint)
    _, token, _ = b.set_state(b"x")
    for bad in (True, str(token), float(token), str(token).encode()):
        assert b.set_state(b"y", bad)[2] is False
    assert b.get_state() == (b"x", token)


def test_token_on_absent_run_returns_none(redis_server):
    assert backend(redis_server.endpoint).set_state(b"x", 12345) is None


# -- corrupt data -------------------------------------------------------------------
def test_key_of_another_type_is_corrupt(redis_server):
    b = backend(redis_server.endpoint)
    redis_server.client().set(b.key, "a string, not a hash")
    with pytest.raises(StateCorruptError):
        b.get_state()
    with pytest.raises(StateCorruptError):
        b.set_state(b"x")


def test_hash_without_version_is_corrupt(redis_server):
    b = backend(redis_server.endpoint)
    redis_server.client().hset(b.key, "state", base64.b64encode(b"x"))
    with pytest.raises(StateCorruptError):
        b.get_state()


def test_set_over_corrupt_state_raises(redis_server):
    b = backend(redis_server.endpoint)
    write_garbage(redis_server, b.key)
    with pytest.raises(StateCorruptError):
        b.set_state(b"x", 7)


# -- list_runs ------------------------------------------------------------------------
def test_list_runs_returns_every_run_with_state_and_token(redis_server):
    prefix = f"list-{uuid.uuid4().hex[:6]}:"
    expected = {}
    for i in range(300):
        b = backend(redis_server.endpoint, run_id=f"job-{i}", key_prefix=prefix)
        state, token, _ = b.set_state(f"state {i}".encode())
        expected[b.run_id] = (state, token)
        b.close()
    client = redis_server.client()
    client.set(prefix + "job-0.store/torch.rendezvous.job-0.1/MASTER_ADDR", "10.0.0.1")  # a torchrun store key
    client.hset(prefix + "not-ours", "field", "value")  # a hash without our fields
    client.set(prefix + "a-string", "value")  # a key of another type
    b = backend(redis_server.endpoint, run_id="job-300", key_prefix=prefix)
    b.set_state(b"x")
    assert b.clear(b.get_state()[1])
    entries = list(b.list_runs())
    assert [e.run_id for e in entries] == sorted(e.run_id for e in entries)  # sorted, not in SCAN order
    found = {entry.run_id: entry.state for entry in entries if entry.error is None}
    assert found == expected
    errors = {entry.run_id: str(entry.error) for entry in entries if entry.error is not None}
    assert set(errors) == {"not-ours", "a-string"}
    assert "has no state field" in errors["not-ours"] and "another type" in errors["a-string"]


def test_list_runs_keeps_a_corrupt_run(redis_server):
    prefix = f"list-{uuid.uuid4().hex[:6]}:"
    b = backend(redis_server.endpoint, run_id="bad", key_prefix=prefix)
    write_garbage(redis_server, b.key)
    [entry] = list(b.list_runs())
    assert entry.run_id == "bad" and entry.state[0] == b"%%% not base64 %%%"


def test_list_runs_pattern_is_escaped(redis_server):
    b = backend(redis_server.endpoint, run_id="x", key_prefix="glob*[chars]?:")
    b.set_state(b"x")
    redis_server.client().hset("globXXchars]?:y", mapping={"state": "eA==", "version": "1"})
    assert [entry.run_id for entry in b.list_runs()] == ["x"]


def test_list_runs_reads_in_batches_and_stays_sorted(redis_server, monkeypatch):
    """Names sorted first, states read a batch at a time: the order is the run ids', whatever SCAN's."""
    import rdzvctl.backends.redis.backend as module

    monkeypatch.setattr(module, "LIST_BATCH", 7)
    prefix = f"batch-{uuid.uuid4().hex[:6]}:"
    client = redis_server.client()
    run_ids = [f"job-{i}" for i in range(60)]
    for n, run_id in enumerate(run_ids, 1):
        client.hset(prefix + run_id, mapping={"state": base64.b64encode(run_id.encode()), "version": n})
    entries = list(backend(redis_server.endpoint, run_id="job-0", key_prefix=prefix).list_runs())
    assert [e.run_id for e in entries] == sorted(run_ids)
    assert all(e.state[0] == e.run_id.encode() for e in entries)


@pytest.mark.slow
def test_list_runs_reads_10000_runs(redis_server):
    prefix = f"bench-{uuid.uuid4().hex[:6]}:"
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    state = base64.b64encode(b"\x80\x04" + b"s" * 600)
    for i in range(10_000):
        pipe.hset(f"{prefix}job-{i}", mapping={"state": state, "version": i + 1})
    pipe.execute()
    b = backend(redis_server.endpoint, run_id="job-0", key_prefix=prefix)
    listed = [entry.run_id for entry in b.list_runs()]
    assert listed == sorted(f"job-{i}" for i in range(10_000))  # how fast: the benchmarks' (P4, P8)


# -- store_keys ---------------------------------------------------------------------------
def test_store_keys_reads_the_per_round_keys(redis_server):
    b = backend(redis_server.endpoint, run_id="job7")
    client = redis_server.client()
    store = b.store_prefix
    assert store == "torch.rendezvous.job7.store/"
    client.set(store + "torch.rendezvous.job7.1/MASTER_ADDR", "10.0.0.1")
    client.set(store + "torch.rendezvous.job7.0/MASTER_PORT", "29500")
    client.set(store + "torch.rendezvous.job7.1/MASTER_PORT", "29501")
    client.set(store + "torchelastic/agent", "not per round")
    client.set("torch.rendezvous.job70.store/torch.rendezvous.job70.0/MASTER_ADDR", "other run")
    assert list(b.store_keys().items()) == [
        ("0/MASTER_PORT", b"29500"),
        ("1/MASTER_ADDR", b"10.0.0.1"),
        ("1/MASTER_PORT", b"29501"),
    ]
    assert backend(redis_server.endpoint, run_id="job8").store_keys() == {}


# -- watch ------------------------------------------------------------------------------
def test_notifications_detected(redis_server, redis_server_notify):
    assert backend(redis_server.endpoint).notifications_enabled() is False
    assert backend(redis_server_notify.endpoint).notifications_enabled() is True


def _follow(b: RedisBackend, stop: threading.Event, seen: list, interval: float) -> threading.Thread:
    def run() -> None:
        for item in b.watch(interval=interval, stop=stop):
            seen.append((time.monotonic(), item))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_native_watch_reports_quickly_even_with_a_long_interval(redis_server_notify):
    writer = backend(redis_server_notify.endpoint)
    _, token, _ = writer.set_state(b"before")
    stop, seen = threading.Event(), []
    thread = _follow(backend(redis_server_notify.endpoint, writer.run_id), stop, seen, interval=30)
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        written = time.monotonic()
        _, token2, _ = writer.set_state(b"after", token)
        writer.clear(token2)
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(2)
    items = [item for _, item in seen]
    assert items[0] == (b"before", token)
    assert items[1] == (b"after", token2) or items[1] is None
    assert items[-1] is None
    assert seen[1][0] - written < 2  # pushed, not polled every 30 s
    assert not thread.is_alive()


# -- errors -----------------------------------------------------------------------------
def test_wrong_password_is_unavailable_and_not_echoed(redis_server_auth):
    secret = "wr0ng-pa55word-xyz"
    for b in (
        backend(f"redis://{ACL_USER}:{secret}@127.0.0.1:{redis_server_auth.port}"),
        backend(redis_server_auth.endpoint, password=secret),
        backend(redis_server_auth.endpoint, username=ACL_USER, password=secret),
    ):
        with pytest.raises(BackendUnavailableError) as info:
            b.get_state()
        assert not isinstance(info.value, BackendTimeoutError)
        assert secret not in str(info.value)
        assert secret not in b.describe() and secret not in repr(b)
        assert "authentication failed" in str(info.value)


def test_no_password_is_unavailable(redis_server_auth):
    with pytest.raises(BackendUnavailableError, match="authentication failed"):
        backend(redis_server_auth.endpoint).get_state()


def test_password_from_environment(redis_server_auth, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", DEFAULT_PASSWORD)
    b = backend(redis_server_auth.endpoint)
    assert b.set_state(b"x")[2] is True
    assert DEFAULT_PASSWORD not in b.describe()


def test_describe_masks_the_password():
    b = backend("redis://alice:hunter2@10.0.0.5:6380/3")
    assert b.describe() == "redis://alice:***@10.0.0.5:6380/3"
    assert backend("10.0.0.5", password="hunter2").describe() == "redis://:***@10.0.0.5:6379/0"
    assert backend("h1,h2:26380", sentinel_master="m").describe() == (
        "redis://h1:26379,h2:26380/0 (sentinel master m)"
    )


def test_refused_port_fails_within_the_timeout():
    b = backend(f"127.0.0.1:{free_port()}", timeout=2)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        b.get_state()
    assert time.monotonic() - start < 2
    assert "127.0.0.1" in str(info.value)


def test_paused_server_times_out_within_the_timeout(redis_server_paused):
    connected = backend(redis_server_paused.endpoint, timeout=1)
    connected.set_state(b"x")
    fresh = backend(redis_server_paused.endpoint, connected.run_id, timeout=1)
    with redis_server_paused.paused():
        for b, call in ((connected, lambda b: b.get_state()), (fresh, lambda b: b.set_state(b"y", 1))):
            start = time.monotonic()
            with pytest.raises(BackendTimeoutError):
                call(b)
            assert time.monotonic() - start < 1.8
    assert connected.get_state()[0] == b"x"


def test_tls_server_without_ca_fails_verification(redis_server_tls):
    with pytest.raises(BackendUnavailableError):
        backend(redis_server_tls.url, timeout=2).get_state()


def test_tls_with_ssl_option_and_host_port(redis_server_tls):
    b = backend(redis_server_tls.endpoint, ssl="true", ssl_ca_certs=str(redis_server_tls.tls.ca))
    assert b.set_state(b"x")[2] is True
    assert b.describe().startswith("rediss://")


@pytest.mark.parametrize(
    "conf",
    [
        {"ssl_ca_certs": "/nonexistent/ca.pem"},
        {"ssl_certfile": "/nonexistent/client.pem"},
        {"ssl_cert_reqs": "sometimes"},
    ],
)
def test_bad_tls_options_are_config_errors(conf):
    with pytest.raises(BackendConfigError):
        backend("rediss://127.0.0.1:6379", **conf)


def test_unloadable_certificate_is_a_config_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(BackendConfigError, match="ssl_ca_certs"):
        backend("rediss://127.0.0.1:6379", ssl_ca_certs=str(bad))


@pytest.mark.parametrize(
    "endpoint, conf",
    [
        ("127.0.0.1:notaport", {}),
        ("127.0.0.1:70000", {}),
        ("h1:6379,h2:6379", {}),
        ("http://127.0.0.1:6379", {}),
        ("redis://127.0.0.1:6379/notadb", {}),
        ("127.0.0.1", {"db": "x"}),
        ("127.0.0.1", {"ttl": "soon"}),
        ("127.0.0.1", {"cluster": "true", "db": "1"}),
        ("127.0.0.1", {"cluster": "true", "sentinel_master": "m"}),
        ("redis://127.0.0.1", {"sentinel_master": "m"}),
        ("unix:///tmp/redis.sock", {"ssl": "true"}),
    ],
)
def test_bad_endpoints_are_config_errors(endpoint, conf):
    with pytest.raises(BackendConfigError):
        backend(endpoint, **conf)


def test_unix_socket(tmp_path_factory):
    from tests.support.redis_server import RedisServer

    directory = tmp_path_factory.mktemp("redis-unix")
    sock = directory / "redis.sock"
    server = RedisServer(directory, ["--unixsocket", str(sock)])
    try:
        b = backend(f"unix://{sock}?db=1")
        assert b.set_state(b"x")[2] is True
        assert server.client(db=1).hget(b.key, "version") is not None
    finally:
        server.stop()


def test_counter_key_shares_the_hash_slot():
    assert counter_key("torch.rendezvous.job") == "{torch.rendezvous.job}:version"
    assert counter_key("{team}.rdzv.job") == "{team}.rdzv.job:version"
    assert counter_key("weird}key") is None


def test_every_redis_exception_is_mapped():
    from redis import exceptions as rx

    classes = [
        obj for obj in vars(rx).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == rx.__name__
    ]
    assert len(classes) > 20
    for cls in classes:
        try:
            exc = cls("1 127.0.0.1:7000")
        except Exception:
            exc = cls()
        mapped = translate_error(exc, "127.0.0.1:6379", 1.0, ["pw"])
        assert isinstance(mapped, RdzvctlError), cls


def test_translate_scrubs_secrets():
    from redis import exceptions as rx

    mapped = translate_error(rx.ConnectionError("cannot use redis://u:pw1@h and pw2"), "h", 1, ["pw2"])
    assert "pw1" not in str(mapped) and "pw2" not in str(mapped)


def test_import_does_not_import_redis():
    code = "import sys, rdzvctl.backends.redis_backend; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


def test_construction_does_not_contact_the_server():
    b = backend(f"127.0.0.1:{free_port()}")
    assert b._client_obj is None


def _start_redis(port: int, directory) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--notify-keyspace-events", "KEA"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


@pytest.mark.slow
def test_watch_rides_out_a_server_restart(tmp_path):
    """A SIGKILLed and restarted server does not end the watch: it reconnects and reports what follows."""
    from tests.support.harness import free_port

    port = free_port()
    server = _start_redis(port, tmp_path)
    try:
        watcher = backend(f"127.0.0.1:{port}", timeout=8.0)
        writer = backend(f"127.0.0.1:{port}", run_id=watcher.run_id, timeout=8.0)
        writer.set_state(b"before")
        seen: list = []
        stop = threading.Event()
        failure: list = []

        def follow() -> None:
            try:
                for item in watcher.watch(interval=0.05, stop=stop):
                    seen.append(None if item is None else item[0])
            except Exception as exc:  # reported by the assertions below
                failure.append(exc)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while seen != [b"before"] and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()
        server.wait(5)
        time.sleep(0.5)  # the watch sees the outage
        server = _start_redis(port, tmp_path)  # no persistence: the state is gone
        writer.set_state(b"after")
        deadline = time.monotonic() + 8
        while b"after" not in seen and time.monotonic() < deadline and not failure:
            time.sleep(0.05)
        stop.set()
        thread.join(5)
        assert not failure, failure
        assert seen[0] == b"before" and seen[-1] == b"after"
        assert seen.count(b"after") == 1
    finally:
        server.kill()
        server.wait(5)


def test_watch_gives_up_after_an_outage_longer_than_the_timeout(tmp_path):
    from tests.support.harness import free_port

    port = free_port()
    server = _start_redis(port, tmp_path)
    watcher = backend(f"127.0.0.1:{port}", timeout=1.0)
    stop = threading.Event()
    items = watcher.watch(interval=0.05, stop=stop)
    assert next(items) is None
    server.kill()
    server.wait(5)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        for _ in items:
            pass
    assert time.monotonic() - started < 5
