"""The ``etcd`` backend (torch's legacy etcd rendezvous) against real etcd 3.4 with --enable-v2,
with torch's real ``EtcdRendezvousHandler`` as the peer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.etcd_legacy import EtcdLegacyBackend
from rdzvctl.errors import BackendConfigError, StateCorruptError
from rdzvctl.state.legacy_etcd import analyse, describe
from rdzvctl.testing.conformance import BackendConformanceTests
from tests.support.etcd_server import EtcdCluster
from tests.support.legacy_etcd_agent import agents, rendezvous

TIMEOUT = 5.0


def new_run_id() -> str:
    return f"legacy-{uuid.uuid4().hex[:10]}"


def backend(endpoint: str, run_id: str = "", **conf: str) -> EtcdLegacyBackend:
    return EtcdLegacyBackend.from_address(Address("etcd", endpoint, run_id or new_run_id(), conf, TIMEOUT))


def raw(cluster: EtcdCluster, method: str, key: str, **form: object) -> dict:
    """A plain v2 keys API call, bypassing the backend."""
    data = urlencode(form).encode() if form else None
    request = urllib.request.Request(f"{cluster.member.client_url}/v2/keys{key}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def report(b: EtcdLegacyBackend, **options: Any):
    run = b.read_run()
    return run, analyse(run, time.time(), **options)


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


# -- conformance ------------------------------------------------------------------------------------
class TestConformance(BackendConformanceTests):
    """The kit's cases on ``active_version``; binary_safe does not apply (values are torch's JSON text)."""

    @pytest.fixture(autouse=True)
    def _server(self, etcd_server):
        self.server = etcd_server

    def make_backend(self, run_id):
        return backend(self.server.endpoint, run_id)

    def corrupt_state(self, b: EtcdLegacyBackend) -> None:
        raw(self.server, "PUT", b.key, dir="true")


# -- the backend without torch --------------------------------------------------------------------
def test_torchs_options_are_accepted_and_others_refused(etcd_server):
    b = backend(etcd_server.endpoint, "job", etcd_prefix="/custom", protocol="http")
    assert b.key == "/custom/run_job/rdzv/active_version"
    with pytest.raises(BackendConfigError, match="key_prefix"):
        backend(etcd_server.endpoint, key_prefix="/x")
    with pytest.raises(BackendConfigError, match="http or https"):
        backend(etcd_server.endpoint, protocol="ftp")


def test_every_option_torchs_handler_reads_is_accepted():
    """``create_rdzv_handler`` and ``_create_etcd_client`` read ``params.get``/``params.config.get`` keys."""
    import importlib.util
    import re

    from rdzvctl.backends.base import SHARED_CONF_KEYS

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        pytest.skip("torch is not installed")
    source = (Path(spec.origin).parent / "distributed/elastic/rendezvous/etcd_rendezvous.py").read_text()
    keys = set(re.findall(r'params\.(?:config\.)?get(?:_as_\w+)?\(\s*"(\w+)"', source))
    assert {"etcd_prefix", "protocol", "cert", "key", "cacert", "timeout", "last_call_timeout"} <= keys
    assert keys <= EtcdLegacyBackend.conf_keys | SHARED_CONF_KEYS


def test_the_backend_imports_nothing_heavy():
    code = ("import sys\nfrom rdzvctl.backends.registry import get_backend_class\nget_backend_class('etcd')\n"
            "import rdzvctl.cli.legacy\n"
            "print([m for m in ('torch', 'etcd', 'rich', 'redis') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_writes_carry_the_ttl_torch_gives_the_status(etcd_server):
    b = backend(etcd_server.endpoint)
    _, token, _ = b.set_state(b'{"status": "setup"}')
    assert raw(etcd_server, "GET", b.key)["node"]["ttl"] <= 5
    _, token, _ = b.set_state(b'{"status": "joinable", "version": "1", "participants": []}', token)
    assert "ttl" not in raw(etcd_server, "GET", b.key)["node"]
    _, token, _ = b.set_state(b'{"status": "frozen", "version": "1", "participants": [0], "keep_alives": []}',
                              token)
    assert raw(etcd_server, "GET", b.key)["node"]["ttl"] <= 10


def test_not_utf8_is_refused_unwritten(etcd_server):
    b = backend(etcd_server.endpoint)
    with pytest.raises(StateCorruptError):
        b.set_state(b"\xff\xfe")
    assert b.get_state() is None


def test_clear_removes_the_run_directory_and_reopen_only_the_state(etcd_server):
    b = backend(etcd_server.endpoint)
    rdzv = f"{b.run_path}/rdzv"
    raw(etcd_server, "PUT", b.run_path, dir="true", ttl=7200)
    raw(etcd_server, "PUT", f"{rdzv}/version_counter", value="3")
    raw(etcd_server, "PUT", f"{rdzv}/v_3/kv/a", value="x")
    _, token, _ = b.set_state(b'{"status": "closed", "version": "3", "participants": [0]}')
    assert b.reopen(token) is True
    assert b.get_state() is None
    assert raw(etcd_server, "GET", f"{rdzv}/version_counter")["node"]["value"] == "3"
    _, token, _ = b.set_state(b'{"status": "closed"}')
    assert b.clear(token + 1) is False and b.get_state() is not None
    assert b.clear(token) is True
    assert raw(etcd_server, "GET", b.run_path)["errorCode"] == 100


def test_list_runs_reads_each_run(etcd_server):
    prefix = f"/list-{uuid.uuid4().hex[:8]}"
    one = backend(etcd_server.endpoint, "one", etcd_prefix=prefix)
    two = backend(etcd_server.endpoint, "two", etcd_prefix=prefix)
    _, token, _ = one.set_state(b'{"status": "closed"}')
    raw(etcd_server, "PUT", two.key, dir="true")
    entries = {e.run_id: e for e in one.list_runs()}
    assert entries["one"].state == (b'{"status": "closed"}', token)
    assert entries["two"].state is None and isinstance(entries["two"].error, StateCorruptError)


# -- torch's EtcdRendezvousHandler as the peer ---------------------------------------------------
@pytest.fixture()
def torch_peer():
    pytest.importorskip("torch")
    pytest.importorskip("etcd")


@pytest.mark.torch
def test_two_handlers_complete_and_the_state_reads_final(etcd_server, torch_peer):
    run_id = new_run_id()
    with agents(etcd_server.endpoint, run_id, 2) as group:
        rounds = rendezvous(group)
        assert sorted(r["rank"] for r in rounds) == [0, 1]
        run, result = report(backend(etcd_server.endpoint, run_id))
        state = result.state
        assert state is not None and state.status == "final" and state.participants == (0, 1)
        assert state.version == rounds[0]["version"] and state.num_workers_waiting == 0
        assert [n.lease for n in result.nodes] == ["alive", "alive"]
        assert run.counter is not None and run.counter.value == state.version
        assert run.run_dir is not None and run.run_dir.ttl is not None
        assert result.findings == []
        doc = describe(run, result, backend="etcd", endpoint=etcd_server.endpoint, token=str(run.token),
                       fetched_at="now")
        assert doc["summary"]["alive"] == 2 and doc["state"]["status"] == "final"


def _closed_run(endpoint: str) -> str:
    """A job that finished: two handlers rendezvoused, then shutdown() closed the run."""
    run_id = new_run_id()
    with agents(endpoint, run_id, 2) as group:
        rendezvous(group)
        assert group[0].call("shutdown", "shutdown")["result"] is True
    return run_id


@pytest.mark.torch
def test_clear_is_for_new_handlers_only(etcd_server, torch_peer):
    """After a clear, like after the run's TTL expired, a handler created before it dies
    (``try_create_rendezvous``: no version_counter, 'worker needs to die'); a new one starts afresh."""
    run_id = _closed_run(etcd_server.endpoint)
    b = backend(etcd_server.endpoint, run_id)
    with agents(etcd_server.endpoint, run_id, 1, min_nodes=1, max_nodes=1) as (old,):
        assert old.call("next", "error")["type"] == "RendezvousClosedError"
        run = b.read_run()
        assert b.clear(run.token) is True
        assert b.read_run().run_dir is None
        assert old.call("next", "error")["type"] == "RendezvousError"
    with agents(etcd_server.endpoint, run_id, 1, min_nodes=1, max_nodes=1) as (new,):
        joined = new.call("next", "round")
        assert joined["rank"] == 0 and joined["version"] == "1"


@pytest.mark.torch
def test_a_write_racing_a_live_handler_writes_nothing(etcd_server, torch_peer):
    run_id = new_run_id()
    b = backend(etcd_server.endpoint, run_id)
    with agents(etcd_server.endpoint, run_id, 2) as (first, second):
        first.send("next")  # joins and waits for the second
        read = wait_until(lambda: (lambda s: s if s and b'"participants": [0]' in s[0] else None)(b.get_state()),
                          60, "the first handler joined")
        second.send("next")  # the handler moves the state on under our token
        first.expect("round")
        second.expect("round")
        now = b.get_state()
        assert now is not None and now[1] != read[1]
        assert b.set_state(b'{"status": "closed"}', read[1]) == (*now, False)
        assert b.reopen(read[1]) is False
        assert b.clear(read[1]) is False
        assert b.get_state() == now


@pytest.mark.torch
def test_a_participant_lost_in_frozen_expires_the_version_and_the_others_start_the_next(etcd_server, torch_peer):
    """torch's ``frozen`` TTL (10 s) is what rescues the others: the analysis says so while it runs."""
    import os
    import signal

    run_id = new_run_id()
    b = backend(etcd_server.endpoint, run_id)
    with agents(etcd_server.endpoint, run_id, 2) as (first, second):
        first.send("next")
        wait_until(lambda: (lambda s: s and b'"participants": [0]' in s[0])(b.get_state()), 60, "the first joined")
        os.kill(first.process.pid, signal.SIGSTOP)  # it never confirms
        try:
            second.send("next")
            _, frozen = wait_until(
                lambda: (lambda rr: rr if rr[1].state and rr[1].state.keep_alives else None)(report(b)),
                30, "the second confirmed")
            assert frozen.state.status == "frozen" and len(frozen.state.participants) == 2
            assert [n.lease for n in frozen.nodes] == ["unconfirmed", "alive"]
            assert "1 of 2 participant(s) confirmed" in frozen.next_step and "expires in" in frozen.next_step
            old = frozen.state.version
            _, after = wait_until(
                lambda: (lambda rr: rr if rr[1].state and rr[1].state.version not in (None, old)
                         and rr[1].state.participants else None)(report(b)),
                30, "the frozen version expired and the second started the next")
            assert after.state.status == "joinable" and after.state.participants == (0,)
        finally:
            os.kill(first.process.pid, signal.SIGCONT)
        rounds = [first.expect("round"), second.expect("round")]
        assert sorted(r["rank"] for r in rounds) == [0, 1] and int(rounds[0]["version"]) > int(old)


def test_torchs_tls_options(etcd_tls_server):
    """``protocol=https`` with torch's ``cacert``/``cert``/``key`` (``_create_etcd_client``)."""
    tls = etcd_tls_server.tls
    b = backend(etcd_tls_server.endpoint, protocol="https", cacert=tls.ca_cert, cert=tls.client_cert,
                key=tls.client_key)
    assert b.get_state() is None
    _, token, has_set = b.set_state(b'{"status": "closed"}')
    assert has_set and b.read_run().token == token
    assert b.reopen(token) is True
    with pytest.raises(BackendConfigError, match="cacert: no such file"):
        backend(etcd_tls_server.endpoint, protocol="https", cacert="/no/such/ca.pem")


def test_follow_yields_the_legacy_events_in_the_shape_of_every_backend(etcd_server):
    """rdzvctl.follow.follow() is watch's library loop on this backend too: the same event dicts."""
    from rdzvctl.follow import follow

    b = backend(etcd_server.endpoint)
    _, token, _ = b.set_state(b'{"status": "joinable", "version": "3", "participants": [0]}')
    events = follow(b, interval=0.05, until="closed", duration=30)
    first = next(events)
    assert first["kind"] == "snapshot" and first["round"] == 3 and first["status"] == "joinable"
    assert set(first) >= {"time", "kind", "message", "run_id"} and first["run_id"] == b.run_id
    b.set_state(b'{"status": "closed", "version": "3", "participants": [0]}', token)
    rest = list(events)
    kinds = [e["kind"] for e in rest]
    assert "status" in kinds and kinds[-1] == "until-met"
    assert rest[-1]["message"] == "condition 'closed' holds"
