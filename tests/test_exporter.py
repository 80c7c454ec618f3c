"""rdzvctl exporter: the decode cache, the metrics and the command (in-memory backend; real HTTP).

Backend behaviour on real servers is in test_exporter_backends.py, a real
Prometheus in test_exporter_prometheus.py.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import io
import itertools
import signal
import subprocess
import sys
import urllib.request
from typing import Any, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from rdzvctl.backends.base import Address, RendezvousBackend  # noqa: E402
from rdzvctl.errors import BackendTimeoutError, BackendUnavailableError  # noqa: E402
from rdzvctl.inspection import assess, describe, snapshot_from, summarize  # noqa: E402
from rdzvctl.monitor.collector import METRIC_NAMES, RendezvousCollector  # noqa: E402
from rdzvctl.monitor.exposition import render_as  # noqa: E402
from rdzvctl.monitor.runs import RunReader, analyze  # noqa: E402
from rdzvctl.state.analysis import KeepAlive, deadline_remaining, node_statuses  # noqa: E402
from rdzvctl.state.codec import encode  # noqa: E402
from rdzvctl.testing.memory import MemoryBackend  # noqa: E402
from tests.strategies import rendezvous_states  # noqa: E402
from tests.support.cli import NOW, make_state, run_rdzvctl  # noqa: E402
from tests.support.exporter import ExporterProcess, Page  # noqa: E402

HOSTILE = 'job"\n\\\x1b[31mred\x1b[0m}{x="1"'
_ENDPOINTS = itertools.count(1)


class Store:
    """An in-memory backend endpoint, a reader and a collector over it, and a settable clock."""

    def __init__(self, max_runs: int = 100, run_ids: Optional[List[str]] = None, fail: Any = None) -> None:
        self.endpoint = f"exporter-test-{next(_ENDPOINTS)}"
        self.now = NOW
        self.fail = fail  # an exception the backend raises on list_runs, while set
        self.address = Address("memory", self.endpoint, "", {})
        self.reader = RunReader(self.address, run_ids, max_runs, opener=self._open)
        self.log = io.StringIO()
        self.collector = RendezvousCollector(self.reader, KeepAlive(5.0, 3), clock=lambda: self.now, log=self.log)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def _open(self, address: Address, run_id: Optional[str]) -> RendezvousBackend:
        store = self

        class Failing(MemoryBackend):
            def list_runs(self):  # type: ignore[no-untyped-def]
                if store.fail is not None:
                    raise store.fail
                return super().list_runs()

        return Failing(address.with_run_id(run_id or ""))

    def backend(self, run_id: str) -> MemoryBackend:
        return MemoryBackend(self.address.with_run_id(run_id))

    def put(self, run_id: str, state: Any) -> None:
        backend = self.backend(run_id)
        current = backend.get_state()
        raw = state if isinstance(state, bytes) else encode(state)
        assert backend.set_state(raw, None if current is None else current[1])[2]  # type: ignore[index]

    def remove(self, run_id: str) -> None:
        backend = self.backend(run_id)
        assert backend.clear(backend.get_state()[1])  # type: ignore[index]

    def scrape(self) -> Page:
        return Page(render_as(self.registry, generate_latest).decode("utf-8"))  # the page /metrics serves

    def labels(self, run_id: str) -> dict:
        return {"backend": "memory", "endpoint": self.reader.endpoint, "run_id": run_id}

    def phase(self, page: Page, run_id: str) -> List[str]:
        return [dict(key)["phase"] for key in page.series("rdzvctl_phase", run_id=run_id)]

    def findings(self, page: Page, run_id: str) -> set:
        return {(dict(k)["code"], dict(k)["severity"], dict(k)["torch_next"])
                for k in page.series("rdzvctl_findings", run_id=run_id)}


def test_unchanged_runs_are_not_decoded_again() -> None:
    store = Store()
    for i in range(20):
        store.put(f"run-{i}", make_state())
    store.scrape()
    assert store.reader.decodes_total == 20
    page = store.scrape()
    assert store.reader.decodes_total == 20
    assert page.value("rdzvctl_state_decodes_total") == 20
    store.put("run-3", make_state(round=3))
    page = store.scrape()
    assert store.reader.decodes_total == 21
    assert page.value("rdzvctl_round", run_id="run-3") == 3
    assert len(page.run_ids()) == 20


def test_liveness_follows_the_clock_without_a_new_decode() -> None:
    store = Store()
    store.put("job42", make_state(alive=2, dead=0, waiting=0))  # heartbeats 1 s and 2 s old
    assert store.scrape().value("rdzvctl_participants_dead", run_id="job42") == 0
    store.now = NOW + _dt.timedelta(seconds=20)  # past 5 s x 3
    page = store.scrape()
    assert page.value("rdzvctl_participants_dead", run_id="job42") == 2
    assert page.value("rdzvctl_findings", run_id="job42", code="dead-participants") == 1
    assert page.value("rdzvctl_heartbeat_newest_age_seconds", run_id="job42") == 21.0
    assert store.reader.decodes_total == 1


def test_values_equal_what_get_json_reports() -> None:
    store = Store()
    state = make_state(alive=3, dead=1, waiting=2, closed=True)
    state.deadline = NOW + _dt.timedelta(seconds=12.5)
    state.complete = False
    store.put("job42", state)
    page = store.scrape()
    backend = store.backend("job42")
    snap = snapshot_from(backend, backend.get_state())
    snap = snap._replace(fetched_at=NOW)
    doc = describe(snap, KeepAlive(5.0, 3))
    labels = {"run_id": "job42"}
    summary = doc["summary"]
    assert page.value("rdzvctl_round", **labels) == doc["state"]["round"]
    assert page.value("rdzvctl_complete", **labels) == float(doc["state"]["complete"])
    assert page.value("rdzvctl_closed", **labels) == float(doc["state"]["closed"])
    for metric, key in [("rdzvctl_participants", "participants"), ("rdzvctl_participants_alive", "alive"),
                        ("rdzvctl_participants_dead", "dead"), ("rdzvctl_waiting_nodes", "waiting"),
                        ("rdzvctl_redundant_nodes", "redundant"),
                        ("rdzvctl_deadline_remaining_seconds", "deadline_remaining")]:
        assert page.value(metric, **labels) == summary[key], metric
    found = {(dict(k)["code"], dict(k)["severity"], dict(k)["torch_next"]): v
             for k, v in page.series("rdzvctl_findings", **labels).items()}
    expected: dict = {}
    for problem in doc["problems"]:
        key = (problem["code"], problem["severity"], problem["torch_next"])
        expected[key] = expected.get(key, 0) + 1
    # Closed under live agents, first seen now: a normal end cannot be told yet (phase closing).
    assert found == expected and ("closed", "error", "new-job-fails") in found
    assert doc["lifecycle"]["phase"] == "closing"
    assert page.series("rdzvctl_phase", **labels) == {
        frozenset({**store.labels("job42"), "phase": "closing"}.items()): 1.0}
    ages = [n["age"] for n in doc["nodes"] if n["age"] is not None]
    assert page.value("rdzvctl_heartbeat_newest_age_seconds", **labels) == min(ages)
    assert page.value("rdzvctl_heartbeat_oldest_age_seconds", **labels) == max(ages)
    assert page.value("rdzvctl_state_size_bytes", **labels) == len(backend.get_state()[0])  # type: ignore[index]


@pytest.mark.parametrize(("state", "phase", "finding"), [
    (make_state(alive=2, dead=0, waiting=0), "complete", None),
    # torch recovers: the survivors restart for the waiting node and the next live sync drops the dead one
    (make_state(alive=2, dead=1, waiting=1), "recovering", ("dead-participants", "info", "recovers")),
    # nobody waits: the live agents keep the round and nothing in torch moves it
    (make_state(alive=2, dead=1, waiting=0), "stuck", ("dead-participants", "error", "stays")),
    # no agent is alive: the next job's first sync fixes it
    (make_state(alive=0, dead=2, waiting=0), "stuck", ("dead-participants", "warning", "next-join-fixes")),
    (make_state(alive=0, dead=2, waiting=0, closed=True), "finished", ("closed", "error", "new-job-fails")),
    (make_state(alive=2, dead=0, waiting=0, complete=False), "forming", None),
], ids=["complete", "recovering", "stuck", "no-agent-alive", "finished", "forming"])
def test_one_phase_series_per_run_as_get_json_reports(state: Any, phase: str, finding: Any) -> None:
    store = Store()
    store.put("job42", state)
    page = store.scrape()
    backend = store.backend("job42")
    snap = snapshot_from(backend, backend.get_state())
    snap = snap._replace(fetched_at=NOW)
    doc = describe(snap, KeepAlive(5.0, 3))
    assert store.phase(page, "job42") == [phase] == [doc["lifecycle"]["phase"]]
    found = store.findings(page, "job42")
    assert found == {(p["code"], p["severity"], p["torch_next"]) for p in doc["problems"]}
    if finding is not None:
        assert finding in found
    else:
        assert not [f for f in found if f[1] == "error"]


def test_the_exporter_settles_a_close_by_watching_it() -> None:
    store = Store()
    store.put("job42", make_state(alive=2, dead=0, waiting=0, closed=True))
    page = store.scrape()
    assert store.phase(page, "job42") == ["closing"]  # a normal end cannot be told yet
    assert ("closed", "error", "new-job-fails") in store.findings(page, "job42")
    # A keep-alive window (5 s x 3) later the agents still heartbeat into the closed run.
    later = NOW + _dt.timedelta(seconds=20)
    store.now = later
    store.put("job42", make_state(alive=2, dead=0, waiting=0, closed=True, now=later))
    page = store.scrape()
    assert store.phase(page, "job42") == ["closed-under-live-agents"]
    assert ("closed-while-alive", "error", "new-job-fails") in store.findings(page, "job42")
    fresh = Store()  # an exporter that has not watched the close cannot tell yet, like corrupt-detect
    fresh.now = later
    fresh.put("job42", make_state(alive=2, dead=0, waiting=0, closed=True, now=later))
    assert fresh.phase(fresh.scrape(), "job42") == ["closing"]
    # The agents stop heartbeating: the run has ended.
    store.now = later + _dt.timedelta(seconds=30)
    page = store.scrape()
    assert store.phase(page, "job42") == ["finished"]
    assert {f for f in store.findings(page, "job42") if f[1] != "info"} == {("closed", "error", "new-job-fails")}
    # Reopened, then closed again: the watch starts over.
    store.put("job42", make_state(alive=2, dead=0, waiting=0, now=store.now))
    assert store.phase(store.scrape(), "job42") == ["complete"]
    store.put("job42", make_state(alive=2, dead=0, waiting=0, closed=True, now=store.now))
    store.now += _dt.timedelta(seconds=20)
    store.put("job42", make_state(alive=2, dead=0, waiting=0, closed=True, now=store.now))
    assert store.phase(store.scrape(), "job42") == ["closing"]


def test_runs_appear_and_disappear() -> None:
    store = Store()
    store.put("a", make_state())
    assert store.scrape().run_ids() == ["a"]
    store.put("b", make_state())
    assert store.scrape().run_ids() == ["a", "b"]
    store.remove("a")
    page = store.scrape()
    assert page.run_ids() == ["b"]
    assert not [key for (name, key) in page.samples if ("run_id", "a") in key]
    assert set(store.reader.records) == {"b"}


def test_rounds_advanced_is_a_counter_across_scrapes() -> None:
    store = Store()
    store.put("job42", make_state(round=2))
    assert store.scrape().value("rdzvctl_rounds_advanced_total", run_id="job42") == 0
    store.put("job42", make_state(round=3))
    store.scrape()
    store.put("job42", make_state(round=6))  # three rounds between two scrapes
    assert store.scrape().value("rdzvctl_rounds_advanced_total", run_id="job42") == 4
    store.put("job42", make_state(round=0))  # cleared and created again: a new baseline, not a decrease
    assert store.scrape().value("rdzvctl_rounds_advanced_total", run_id="job42") == 4


def test_an_incomplete_round_is_timed_from_when_it_was_first_seen() -> None:
    store = Store()
    store.put("job42", make_state(round=4, complete=False))
    assert store.scrape().value("rdzvctl_round_incomplete_seconds", run_id="job42") == 0
    store.now = NOW + _dt.timedelta(seconds=90)
    assert store.scrape().value("rdzvctl_round_incomplete_seconds", run_id="job42") == 90
    store.put("job42", make_state(round=4, complete=True))
    assert store.scrape().value("rdzvctl_round_incomplete_seconds", run_id="job42") is None


def test_max_runs_bounds_the_cache_and_counts_the_excess() -> None:
    store = Store(max_runs=3)
    for i in range(5):
        store.put(f"run-{i}", make_state())
    page = store.scrape()
    assert page.run_ids() == ["run-0", "run-1", "run-2"]
    assert page.value("rdzvctl_runs") == 3
    assert page.value("rdzvctl_runs_over_limit") == 2
    assert page.value("rdzvctl_max_runs") == 3
    assert len(store.reader.records) == 3


def test_selected_run_ids_only() -> None:
    store = Store(run_ids=["b", "missing"])
    store.put("a", make_state())
    store.put("b", make_state())
    assert store.scrape().run_ids() == ["b"]


def test_a_corrupt_state_is_exported_as_not_decoded_and_counted_once_per_value() -> None:
    store = Store()
    store.put("job42", b"\x80\x04garbage")
    page = store.scrape()
    assert page.value("rdzvctl_state_decoded", run_id="job42") == 0
    assert page.value("rdzvctl_state_decode_failures_total", run_id="job42") == 1
    assert page.value("rdzvctl_findings", run_id="job42", code="state-corrupt", severity="error") == 1
    assert page.value("rdzvctl_round", run_id="job42") is None
    assert store.scrape().value("rdzvctl_state_decode_failures_total", run_id="job42") == 1
    store.put("job42", b"\x80\x04other garbage")
    assert store.scrape().value("rdzvctl_state_decode_failures_total", run_id="job42") == 2


def test_an_outage_is_backend_up_0_and_the_next_good_read_recovers() -> None:
    store = Store()
    store.put("job42", make_state())
    assert store.scrape().value("rdzvctl_backend_up") == 1
    store.fail = BackendUnavailableError("cannot talk to memory: connection refused")
    page = store.scrape()
    assert page.value("rdzvctl_backend_up") == 0
    assert page.value("rdzvctl_backend_errors_total", kind="unavailable") == 1
    assert page.value("rdzvctl_backend_errors_total", kind="timeout") == 0
    assert page.run_ids() == []  # no stale values while the backend is down
    store.fail = BackendTimeoutError("no answer within 1 s")
    assert store.scrape().value("rdzvctl_backend_errors_total", kind="timeout") == 1
    store.fail = RuntimeError("a broken plugin")
    assert store.scrape().value("rdzvctl_backend_errors_total", kind="internal") == 1
    assert "RuntimeError (internal error)" in store.log.getvalue() and "a broken plugin" not in store.log.getvalue()
    store.fail = None
    page = store.scrape()
    assert page.value("rdzvctl_backend_up") == 1 and page.run_ids() == ["job42"]
    assert store.reader.decodes_total == 1  # the cache outlived the outage


def test_a_hostile_run_id_stays_one_label_value() -> None:
    store = Store()
    store.put(HOSTILE, make_state())
    page = store.scrape()  # parsed by prometheus_client's parser
    assert page.run_ids() == [HOSTILE]
    assert "\n" not in [line for line in page.text.splitlines() if "rdzvctl_round{" in line][0]


def test_every_exported_name_is_in_the_documented_list() -> None:
    store = Store()
    store.put("job42", make_state(complete=False, closed=True))
    store.put("bad", b"garbage")
    names = {name for name, _ in store.scrape().samples}
    names = {n[:-len("_info")] + "_info" if n.endswith("_info") else n for n in names}
    assert names <= METRIC_NAMES, names - METRIC_NAMES
    assert "rdzvctl_participants_dead" in names and "rdzvctl_backend_up" in names


# -- the command -----------------------------------------------------------------------------------
def test_usage_errors_exit_2_with_one_line() -> None:
    cases = [
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1"],  # no run, no --all
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--all", "--rdzv-id", "a"],
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--all", "--listen", "nowhere"],
        ["--rdzv-backend", "nope", "--all"],
    ]
    for args in cases:
        done = run_rdzvctl(["exporter", *args])
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_without_prometheus_client_the_command_says_what_to_install() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "sys.argv = ['rdzvctl', 'exporter', '--rdzv-backend', 'c10d', '--rdzv-endpoint', '127.0.0.1:1', '--all']\n"
            "from rdzvctl.cli.main import main; main()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "pip install 'rdzvctl[exporter]'" in done.stderr and "Traceback" not in done.stderr


def test_the_help_does_not_import_prometheus_client() -> None:
    code = ("import sys; sys.argv = ['rdzvctl', 'exporter', '--help']\n"
            "from rdzvctl.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'prometheus_client' not in sys.modules, 'imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def filestore(tmp_path: Any) -> str:
    from rdzvctl.backends.registry import open_backend

    path = tmp_path / "store"
    path.write_bytes(b"")
    for run_id in ("job42", HOSTILE):
        with open_backend(Address("c10d", str(path), run_id, {"store_type": "file"})) as backend:
            assert backend.set_state(encode(make_state(now=_dt.datetime.now(_dt.timezone.utc))))[2]  # type: ignore[index]
    return str(path)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_serves_metrics_and_healthz_and_stops_cleanly(filestore: str, signum: int, code: int) -> None:
    exporter = ExporterProcess(["--rdzv-backend", "c10d", "--rdzv-endpoint", filestore,
                                "--rdzv-conf", "store_type=file", "--all"])
    try:
        page = exporter.scrape()
        assert page.run_ids() == sorted(["job42", HOSTILE])
        assert page.value("rdzvctl_backend_up") == 1
        assert exporter.get("/healthz") == (200, "ok\n")
        assert exporter.get("/nothing")[0] == 404
        request = urllib.request.Request(exporter.url, headers={
            "Accept-Encoding": "gzip", "Accept": "application/openmetrics-text;version=1.0.0"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.headers["Content-Encoding"] == "gzip"
            assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
            text = gzip.decompress(answer.read()).decode()
        assert text.rstrip().endswith("# EOF") and 'rdzvctl_backend_up{backend="c10d"' in text
    finally:
        assert exporter.stop(signum) == code
    assert "Traceback" not in exporter.stderr and exporter.stderr.endswith("rdzvctl exporter: stopped")


def test_repeated_rdzv_id_exports_those_runs(filestore: str) -> None:
    with ExporterProcess(["--rdzv-backend", "c10d", "--rdzv-endpoint", filestore, "--rdzv-conf", "store_type=file",
                          "--rdzv-id", "job42", "--rdzv-id", "absent"]) as exporter:
        assert exporter.scrape().run_ids() == ["job42"]


def test_the_run_reader_imports_no_client_library() -> None:
    code = ("import sys\nimport rdzvctl.monitor.runs\n"
            "heavy = [m for m in ('prometheus_client', 'redis', 'torch', 'rich', 'click') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_busy_listen_port_is_a_usage_error(filestore: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_rdzvctl(["exporter", "--rdzv-backend", "c10d", "--rdzv-endpoint", filestore, "--rdzv-conf",
                            "store_type=file", "--all", "--listen", f"127.0.0.1:{port}"])
    assert done.returncode == 2 and "cannot listen there" in done.stderr and "Traceback" not in done.stderr


def test_verbose_logs_the_traceback_of_a_bug() -> None:
    store = Store()
    store.collector.verbose = True
    store.fail = RuntimeError("a broken plugin")
    store.scrape()
    lines = store.log.getvalue().splitlines()
    assert lines[0] == "rdzvctl exporter: backend down: RuntimeError (internal error)"
    assert lines[1].startswith("Traceback") and lines[-1] == "RuntimeError: a broken plugin"


def test_the_readme_lists_every_exported_metric() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Monitoring"):readme.index("## Safety design")]
    listed = {m for line in section.splitlines() if line.startswith("| `rdzvctl_")
              for m in re.findall(r"`(rdzvctl_[a-z_]+)", line)}
    assert listed == set(METRIC_NAMES)


@settings(max_examples=200, deadline=None)
@given(rendezvous_states(), st.floats(-3600, 3600), st.sampled_from([None, 1, 4]), st.booleans())
def test_the_analysis_equals_get_json_for_random_states_and_clocks(state: Any, offset: float, max_nodes: Any,
                                                                   closed_before: bool) -> None:
    """The counts, phase, findings and ages the exporter exports are get -o json's (summarize, assess)."""
    keep_alive = KeepAlive(5.0, 3)
    now = max(state.last_heartbeats.values(), default=NOW) + _dt.timedelta(seconds=offset) \
        if offset > -3000 else NOW  # around the heartbeats (each expiry crossed), or anywhere
    closed_since = now - _dt.timedelta(seconds=20) if closed_before else None
    got = analyze(state, now, keep_alive, max_nodes, "job42", closed_since)
    summary = summarize(state, node_statuses(state, now, keep_alive), deadline_remaining(state, now))
    life, findings = assess(state, now, "job42", keep_alive, max_nodes, closed_since=closed_since, probe=False)
    assert (got.participants, got.alive, got.dead, got.deadline_remaining) == (
        summary["participants"], summary["alive"], summary["dead"], summary["deadline_remaining"])
    assert got.lifecycle == life and got.findings == findings
    ages = [s.age for s in node_statuses(state, now, keep_alive) if s.age is not None]  # get's per-node ages
    assert got.newest_heartbeat_age == (min(ages) if ages else None)
    assert got.oldest_heartbeat_age == (max(ages) if ages else None)
