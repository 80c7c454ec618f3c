"""rdzvctl exporter on every backend, real servers: torch TCPStore, FileStore, redis, etcd v2 and v3.

The exporter runs as a real process against each server.  Its values equal
what ``rdzvctl get -o json`` reports for the same state; runs appear and
disappear with the backend; a server killed while a scrape waits on it gives
``rdzvctl_backend_up 0`` and the exporter keeps serving, then recovers; TLS
and auth options work as for every command, and a redis or etcd password
never reaches the page or the log.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

pytest.importorskip("prometheus_client")

from rdzvctl.state.codec import encode  # noqa: E402
from tests.reliability.servers import BACKEND_IDS, FileLockHolder, Target, TcpStoreZygote, make_target  # noqa: E402
from tests.support.cli import make_state, run_rdzvctl  # noqa: E402
from tests.support.etcd_server import ROOT_PASSWORD  # noqa: E402
from tests.support.exporter import ExporterProcess, Page  # noqa: E402
from tests.support.redis_server import DEFAULT_PASSWORD  # noqa: E402

HOSTILE = 'evil"\n\\\x1b[2Jrun'
KEEP_ALIVE = {"keep_alive_interval": "5", "keep_alive_max_attempt": "3"}


@pytest.fixture(scope="module")
def zygote() -> Iterator[Any]:
    holder: Dict[str, TcpStoreZygote] = {}

    def get() -> TcpStoreZygote:
        if "z" not in holder:
            pytest.importorskip("torch")
            holder["z"] = TcpStoreZygote()
        return holder["z"]

    yield get
    if "z" in holder:
        holder["z"].close()


@pytest.fixture(scope="module", params=BACKEND_IDS)
def target(request: pytest.FixtureRequest, zygote: Any) -> Iterator[Target]:
    root = Path(tempfile.mkdtemp(prefix=f"rdzvctl-exporter-{request.param}-"))
    started = make_target(request.param, root, zygote() if request.param == "c10d-tcp" else None)
    try:
        yield started
    finally:
        if started.server is not None:
            started.server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def live(target: Target) -> Target:
    """The target with its server running (a previous test may have killed it)."""
    if target.server is not None:
        target.server.ensure_running()
    return target


def _put(target: Target, run_id: str, state: Any) -> None:
    with target.open(run_id) as backend:
        current = backend.get_state()
        result = backend.set_state(encode(state), None if current is None else current[1])
        assert result is not None and result[2]


def _remove(target: Target, run_id: str) -> None:
    with target.open(run_id) as backend:
        current = backend.get_state()
        assert current is not None and backend.clear(current[1])


def _exporter(target: Target, *extra: str, **conf: str) -> ExporterProcess:
    return ExporterProcess([*target.flags(None, **KEEP_ALIVE, **conf), "--timeout", "2", *extra])


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _wait_page(exporter: ExporterProcess, predicate: Any, timeout: float = 30.0) -> Page:
    """Scrape until ``predicate(page)`` holds (the backend may take a moment to show a write)."""
    deadline = time.monotonic() + timeout
    while True:
        page = exporter.scrape()
        if predicate(page) or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_values_equal_what_get_json_reports(live: Target) -> None:
    prefix = f"exp-{uuid.uuid4().hex[:6]}"
    runs = {f"{prefix}-dead": make_state(alive=3, dead=1, waiting=1, now=_now()),
            f"{prefix}-closed": make_state(alive=2, dead=0, waiting=0, closed=True, now=_now()),
            f"{prefix}-{HOSTILE}": make_state(alive=2, dead=2, waiting=0, complete=False, round=5, now=_now())}
    for run_id, state in runs.items():
        _put(live, run_id, state)
    with _exporter(live, "--all") as exporter:
        page = exporter.scrape()
        for run_id in runs:
            doc = json.loads(run_rdzvctl(["get", *live.flags(run_id, **KEEP_ALIVE), "-o", "json"]).stdout)
            labels = {"run_id": run_id}
            assert page.value("rdzvctl_round", **labels) == doc["state"]["round"]
            assert page.value("rdzvctl_complete", **labels) == float(doc["state"]["complete"])
            assert page.value("rdzvctl_closed", **labels) == float(doc["state"]["closed"])
            for metric, key in [("rdzvctl_participants", "participants"), ("rdzvctl_participants_alive", "alive"),
                                ("rdzvctl_participants_dead", "dead"), ("rdzvctl_waiting_nodes", "waiting"),
                                ("rdzvctl_redundant_nodes", "redundant")]:
                assert page.value(metric, **labels) == doc["summary"][key], (run_id, metric)
            codes = {(dict(k)["code"], dict(k)["severity"]) for k in page.series("rdzvctl_findings", **labels)}
            assert codes == {(p["code"], p["severity"]) for p in doc["problems"]}, run_id
            assert page.value("rdzvctl_state_decoded", **labels) == 1
        assert page.value("rdzvctl_backend_up") == 1
        endpoint = {dict(k)["endpoint"] for k in page.series("rdzvctl_backend_up")}
        assert endpoint == {json.loads(run_rdzvctl(["get", *live.flags(f"{prefix}-dead", **KEEP_ALIVE),
                                                    "-o", "json"]).stdout)["endpoint"]}
    for run_id in runs:
        _remove(live, run_id)


def test_runs_appear_and_disappear(live: Target) -> None:
    run_id = f"exp-{uuid.uuid4().hex[:6]}"
    with _exporter(live, "--all") as exporter:
        assert run_id not in exporter.scrape().run_ids()
        _put(live, run_id, make_state(now=_now()))
        assert run_id in _wait_page(exporter, lambda p: run_id in p.run_ids()).run_ids()
        _remove(live, run_id)
        page = _wait_page(exporter, lambda p: run_id not in p.run_ids())
        assert run_id not in page.run_ids()
        assert not [key for (_, key) in page.samples if ("run_id", run_id) in key]


def _scrape_in_background(exporter: ExporterProcess) -> List[Page]:
    pages: List[Page] = []
    thread = threading.Thread(target=lambda: pages.append(exporter.scrape()), daemon=True)
    thread.start()
    return pages, thread  # type: ignore[return-value]


def test_a_server_killed_mid_scrape_is_backend_up_0_and_the_exporter_stays_up(live: Target) -> None:
    run_id = f"exp-{uuid.uuid4().hex[:6]}"
    _put(live, run_id, make_state(now=_now()))
    with _exporter(live, "--rdzv-id", run_id) as exporter:
        assert exporter.scrape().value("rdzvctl_backend_up") == 1
        if live.server is None:  # a FileStore: a peer holding torch's lock stands for a dead server
            holder = FileLockHolder(live.endpoint)
            try:
                page = exporter.scrape()
            finally:
                holder.release()
            kind = "timeout"
        else:
            with live.server.paused():  # the scrape waits on a frozen server ...
                pages, thread = _scrape_in_background(exporter)  # type: ignore[misc]
                time.sleep(0.5)
                live.server.kill()  # ... which dies under it
            thread.join(60)
            page = pages[0]
            kind = ""
        assert page.value("rdzvctl_backend_up") == 0
        errors = page.series("rdzvctl_backend_errors_total")
        assert sum(errors.values()) == 1
        if kind:
            assert page.value("rdzvctl_backend_errors_total", kind=kind) == 1
        assert page.run_ids() == []
        assert exporter.get("/healthz") == (200, "ok\n")
        if live.server is not None:
            assert exporter.scrape().value("rdzvctl_backend_up") == 0  # still down, still serving
            live.server.start()
            if not live.server.persistent:
                _put(live, run_id, make_state(now=_now()))  # a TCPStore restarts empty
        page = _wait_page(exporter, lambda p: p.value("rdzvctl_backend_up") == 1 and p.run_ids() == [run_id])
        assert page.value("rdzvctl_backend_up") == 1 and page.run_ids() == [run_id]
        assert exporter.process.poll() is None
        assert exporter.wait_stderr("backend down") and exporter.wait_stderr("backend up again"), exporter.stderr
    _remove(live, run_id)


def test_no_secret_in_the_page_or_the_log(redis_server_auth: Any) -> None:
    endpoint = f"redis://:{DEFAULT_PASSWORD}@127.0.0.1:{redis_server_auth.port}/0"
    target = Target("redis", "redis", endpoint)
    _put(target, "job42", make_state(now=_now()))
    with ExporterProcess([*target.flags("job42"), "--timeout", "2"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 1 and page.run_ids() == ["job42"]
        assert DEFAULT_PASSWORD not in page.text and "***" in page.text
    with ExporterProcess([*Target("redis", "redis", endpoint.replace(DEFAULT_PASSWORD, "wrong-" + DEFAULT_PASSWORD))
                          .flags("job42"), "--timeout", "2"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 0
        assert DEFAULT_PASSWORD not in page.text
    assert "backend down" in exporter.stderr and DEFAULT_PASSWORD not in exporter.stderr


def test_etcd_over_tls_with_client_certificates(etcd_tls_server: Any) -> None:
    target = Target("etcd-v3", "etcd-v3", etcd_tls_server.endpoint, etcd_tls_server.conf())
    _put(target, "job42", make_state(now=_now()))
    with ExporterProcess([*target.flags("job42"), "--timeout", "5"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 1 and page.run_ids() == ["job42"]
        assert {dict(k)["endpoint"] for k in page.series("rdzvctl_backend_up")} == {
            f"https://{etcd_tls_server.endpoint}"}


def test_etcd_password_never_in_the_page_or_the_log(etcd_auth_server: Any) -> None:
    good = Target("etcd-v3", "etcd-v3", etcd_auth_server.endpoint, {"username": "root", "password": ROOT_PASSWORD})
    _put(good, "job42", make_state(now=_now()))
    with ExporterProcess([*good.flags("job42"), "--timeout", "5"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 1 and page.run_ids() == ["job42"]
        assert ROOT_PASSWORD not in page.text
    bad = Target("etcd-v3", "etcd-v3", etcd_auth_server.endpoint, {"username": "root", "password": "x" + ROOT_PASSWORD})
    with ExporterProcess([*bad.flags("job42"), "--timeout", "5"]) as exporter:
        page = exporter.scrape()
        assert page.value("rdzvctl_backend_up") == 0
        assert ROOT_PASSWORD not in page.text
    assert "backend down" in exporter.stderr and ROOT_PASSWORD not in exporter.stderr
