"""End to end: real torch rendezvous -> rdzvctl exporter -> a real Prometheus server -> the alert.

Two torch ``DynamicRendezvousHandler`` processes (tests/support/torch_handlers.py)
complete a round in a FileStore, then one is SIGKILLed: its heartbeat goes
stale while the survivor keeps heartbeating.  The exporter judges liveness
with a 1 s x 3 keep-alive (``--rdzv-conf``); the nodes tolerate 300 missed
heartbeats, so torch's survivor does not prune the dead node during the test
(with equal settings it would, within one keep-alive interval, and the
finding would become ``participant-left``).  Nobody waits, so the round is
stuck (``dead-participants`` error, torch_next ``stays``) and it pages; while
a node waited torch would recover and nothing would page.  Prometheus (its own TSDB in a
temporary directory, a free loopback port) scrapes the exporter every second
and evaluates a copy of deploy/prometheus/rdzvctl-alerts.yml with every
``for:`` cut to 1 s.  Its HTTP API must report
``rdzvctl_participants_dead`` 1 for the run and the dead-participants alert
pending or firing; a hostile run id in the same store is ingested as one
label value.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

pytest.importorskip("prometheus_client")

from rdzvctl.backends.base import Address  # noqa: E402
from rdzvctl.backends.registry import open_backend  # noqa: E402
from rdzvctl.state.codec import encode  # noqa: E402
from tests.support.cli import make_state  # noqa: E402
from tests.support.exporter import ExporterProcess  # noqa: E402
from tests.support.harness import free_port, stop_process, wait_ready  # noqa: E402
from tests.support.torch_handlers import NodeFactory, Target  # noqa: E402

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rdzvctl-alerts.yml"
HOSTILE = 'evil"\n\\\x1b[31m}run'

pytestmark = [pytest.mark.torch, pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")]


class Prometheus:
    """A prometheus server scraping one target every second, with the rules given."""

    def __init__(self, directory: Path, scrape_port: int, rules: str) -> None:
        (directory / "rules.yml").write_text(rules)
        (directory / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - rules.yml\n"
            "scrape_configs:\n  - job_name: rdzvctl\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{scrape_port}']\n")
        self.port = free_port()
        self.log = open(directory / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}",  # type: ignore[list-item]
             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=directory)
        self.directory = directory
        wait_ready(self._ready, self.process, timeout=60, what="prometheus", log=directory / "prometheus.log",
                   interval=0.25)

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
            return bool(answer.status == 200)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=10) as answer:
            doc = json.loads(answer.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; log: "
                             f"{(self.directory / 'prometheus.log').read_text()[-2000:]}")

    def stop(self) -> None:
        stop_process(self.process, timeout=20)
        self.log.close()


def fast_rules() -> str:
    """The shipped rules with every ``for:`` at 1 s."""
    text, count = re.subn(r"^(\s+for:) \S+$", r"\1 1s", RULES.read_text(), flags=re.MULTILINE)
    assert count >= 5
    return text


@pytest.fixture
def prometheus_for() -> Iterator[Callable[[Path, int], Prometheus]]:
    started: List[Prometheus] = []

    def start(directory: Path, port: int) -> Prometheus:
        server = Prometheus(directory, port, fast_rules())
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _alert(prometheus: Prometheus, name: str, run_id: str) -> Optional[Dict[str, Any]]:
    for alert in prometheus.api("alerts")["alerts"]:
        if alert["labels"].get("alertname") == name and alert["labels"].get("run_id") == run_id:
            return alert  # type: ignore[no-any-return]
    return None


def test_a_killed_participant_is_dead_in_prometheus_and_the_alert_fires(
        tmp_path: Path, node_factory: NodeFactory, prometheus_for: Callable[[Path, int], Prometheus]) -> None:
    store = tmp_path / "filestore"
    store.write_bytes(b"")
    target = Target("c10d-file", "c10d", str(store), {"store_type": "file"})
    run_id = f"prom-{uuid.uuid4().hex[:8]}"
    with open_backend(Address("c10d", str(store), HOSTILE, {"store_type": "file"})) as backend:
        assert backend.set_state(encode(make_state()))[2]  # type: ignore[index]
    with node_factory.group(target, run_id, 2, keep_alive_max_attempt=300) as nodes:
        rounds = nodes.next_round()
        assert {r["world_size"] for r in rounds} == {2}
        victim = nodes[1]
        victim.kill()  # SIGKILL: no shutdown, the heartbeat just stops
        with ExporterProcess(["--rdzv-backend", "c10d", "--rdzv-endpoint", str(store), "--all", "--rdzv-conf",
                              "store_type=file,keep_alive_interval=1,keep_alive_max_attempt=3"]) as exporter:
            prometheus = prometheus_for(tmp_path, exporter.port)
            dead = prometheus.wait_for(
                lambda: [r for r in prometheus.query(f'rdzvctl_participants_dead{{run_id="{run_id}"}}')
                         if r["value"][1] == "1"],
                "rdzvctl_participants_dead 1")
            assert dead[0]["metric"]["backend"] == "c10d" and dead[0]["metric"]["endpoint"] == str(store)
            assert prometheus.query(f'rdzvctl_participants_alive{{run_id="{run_id}"}}')[0]["value"][1] == "1"
            # Nobody waits: the survivor keeps the round, nothing in torch moves it (phase stuck, "stays").
            assert [r["metric"]["phase"] for r in prometheus.query(f'rdzvctl_phase{{run_id="{run_id}"}}')] == ["stuck"]
            (finding,) = prometheus.query(f'rdzvctl_findings{{run_id="{run_id}",code="dead-participants"}}')
            assert (finding["metric"]["severity"], finding["metric"]["torch_next"]) == ("error", "stays")
            alert = prometheus.wait_for(lambda: _alert(prometheus, "RendezvousDeadParticipants", run_id),
                                        "the dead-participants alert")
            assert alert["state"] in ("pending", "firing")
            assert run_id in alert["annotations"]["description"]
            assert alert["annotations"]["repair"].startswith("rdzvctl reset --mode prune")
            assert "--rdzv-conf store_type=file" in alert["annotations"]["repair"]
            hostile = [r["metric"]["run_id"] for r in prometheus.query("rdzvctl_round")]
            assert HOSTILE in hostile and run_id in hostile
            assert prometheus.query('up{job="rdzvctl"}')[0]["value"][1] == "1"
