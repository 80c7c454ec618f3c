"""``history`` against a hostile record file: a crafted state as large as a line may be must not
take more memory than the machine gives (run under ``ulimit -v``, as test_hostile_acceptance does)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import List

from rdzvctl.recording import FORMAT, MAX_LINE, Recorder
from tests.reliability.common import REPO_ROOT, cli_env

#: The address space of the rdzvctl process (as test_hostile_acceptance.ADDRESS_SPACE).
ADDRESS_SPACE = 1024 * 1024 * 1024


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _history(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rdzvctl", "history", "--from", str(path), "-o", "json"],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO_ROOT,
                          preexec_fn=_limited)


def _state_line(nodes: List[str], round_: int, second: int) -> str:
    state = {"round": round_, "complete": False, "deadline": None, "closed": False,
             "participants": {n: 0 for n in nodes}, "wait_list": [], "redundancy_list": [],
             "last_heartbeats": {n: f"2026-11-24T22:00:0{second}Z" for n in nodes}}
    return json.dumps({"time": f"2026-11-24T22:00:0{second}Z", "state": state}, separators=(",", ":"))


def _many_nodes_record(path: Path, line_bytes: int, versions: int = 3) -> Path:
    per_node = len('"n000000_1_0":0,"n000000_1_0":"2026-11-24T22:00:00Z",')
    nodes = [f"n{i:06d}_1_0" for i in range(line_bytes // per_node)]
    with open(path, "w") as f:
        f.write(json.dumps({"format": FORMAT, "run_id": "job"}) + "\n")
        for k in range(versions):
            f.write(_state_line(nodes[k:], k, k) + "\n")
    return path


def test_a_line_of_a_million_nodes_is_refused_not_an_out_of_memory(tmp_path):
    # 64 MiB lines used to be read: one of ~600,000 nodes took over 1 GiB ("internal error: MemoryError").
    path = _many_nodes_record(tmp_path / "million.history", 40 << 20, versions=1)
    done = _history(path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "line 2: longer than" in done.stderr


def test_the_largest_lines_replay_within_the_address_space(tmp_path):
    path = _many_nodes_record(tmp_path / "big.history", MAX_LINE - 4096)
    done = _history(path)
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)["kind"] for line in done.stdout.splitlines()]
    assert kinds.count("round-advanced") == 2 and "internal error" not in done.stderr


def test_watch_records_a_state_too_large_for_a_line_as_corrupt(tmp_path, monkeypatch):
    import datetime as _dt

    import rdzvctl.recording
    from rdzvctl.recording import read_record
    from rdzvctl.state.model import NodeDesc, RendezvousState

    monkeypatch.setattr(rdzvctl.recording, "MAX_LINE", 2000)
    when = _dt.datetime(2026, 11, 24, 22, tzinfo=_dt.timezone.utc)
    nodes = [NodeDesc(f"trainer-{i}", i, 0) for i in range(100)]
    rec = Recorder(str(tmp_path / "r.history"), run_id="job", backend="c10d", endpoint="x", started=when)
    rec.version(when, RendezvousState(participants={n: 0 for n in nodes}), "1", True)
    rec.version(when, RendezvousState(participants={nodes[0]: 0}), "2", True)
    rec.close()
    _, observations = read_record(str(tmp_path / "r.history"))  # every line it wrote reads back
    first, second = list(observations)
    assert first.state is None and "too large to record" in first.error
    assert second.state is not None and len(second.state.participants) == 1


def test_a_recorded_corrupt_reason_reads_back_as_written_and_bounded(tmp_path):
    # It came back as an excerpt of its repr: "'not a valid pickl...load key, 'x'.'".
    from rdzvctl.recording import read_record

    reason = "the state is 22,369,625 bytes, over the 16,777,216-byte (16 MiB) limit"
    path = tmp_path / "r.history"
    path.write_text("\n".join(json.dumps(line) for line in (
        {"format": FORMAT}, {"time": "2026-11-24T22:00:00Z", "corrupt": reason},
        {"time": "2026-11-24T22:00:01Z", "corrupt": "x" * 100_000},
        {"time": "2026-11-24T22:00:02Z", "corrupt": {"not": "text"}})) + "\n")
    first, long, other = list(read_record(str(path))[1])
    assert first.error == reason
    assert long.error.startswith("xxx") and len(long.error) <= 300
    assert other.error and len(other.error) <= 120
