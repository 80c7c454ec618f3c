"""``rdzvctl history`` and ``watch --record``: sources, options, record files (untrusted), exit codes."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Iterator, List

import pytest

import rdzvctl.backends.registry
from rdzvctl.backends.base import Address, HistoryVersion, HistoryWindow
from rdzvctl.backends.filestore import FileStore
from rdzvctl.backends.registry import open_backend
from rdzvctl.recording import FORMAT, Recorder
from rdzvctl.state.codec import encode
from rdzvctl.state.jsonform import state_to_json
from rdzvctl.state.model import NodeDesc, RendezvousState
from rdzvctl.testing.memory import MemoryBackend
from tests.support.cli import NOW, invoke, make_state

UTC = _dt.timezone.utc
A = NodeDesc("trainer-0", 10, 0)
B = NodeDesc("trainer-1\x1b[31m", 11, 0)  # a hostile node id: escaped on a terminal, exact in JSON


def at(seconds: float) -> _dt.datetime:
    return NOW + _dt.timedelta(seconds=seconds)


def state(round_: int, nodes: List[NodeDesc], t: float, complete: bool = False) -> RendezvousState:
    return RendezvousState(round=round_, complete=complete, participants={n: i for i, n in enumerate(sorted(nodes))},
                           last_heartbeats={n: at(t) for n in nodes})


class NoticeBackend(MemoryBackend):
    """An in-memory backend with a history window that misses the oldest versions."""

    name = "memory-history"
    capabilities = MemoryBackend.capabilities | {"history"}

    def history(self) -> HistoryWindow:
        versions = [HistoryVersion(encode(state(0, [A], 0)), at(0), 7),
                    HistoryVersion(encode(state(0, [A, B], 1, complete=True)), at(1), 9)]
        return HistoryWindow(iter(versions), "revisions before 7 were compacted away")


@pytest.fixture
def registered(memory) -> Iterator[None]:
    with rdzvctl.backends.registry.register({"memory-history": "tests.test_cli_history:NoticeBackend"}):
        yield


def record(path: Path, *lines: dict) -> Path:
    header = {"format": FORMAT, "run_id": "job42", "backend": "c10d", "endpoint": "node0:29400",
              "started": "2026-11-24T22:00:00+00:00"}
    path.write_text("\n".join(json.dumps(line) for line in (header, *lines)) + "\n")
    return path


def good_record(tmp_path: Path) -> Path:
    path = tmp_path / "job42.history"
    rec = Recorder(str(path), run_id="job42", backend="c10d", endpoint="node0:29400", started=NOW)
    rec.version(at(0), state(0, [A], 0), "tok1", True)
    rec.version(at(1), state(0, [A], 1), "tok2", True)  # heartbeat-only
    rec.version(at(2), state(0, [A, B], 2, complete=True), "tok3", True)
    rec.version(at(3), None, None, False)
    rec.close()
    return path


def test_history_from_a_record_needs_no_backend(cli_env, tmp_path):
    path = good_record(tmp_path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    result = invoke(["history", "--from", str(path), "-o", "json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["state-created", "joined-participants", "joined-participants",
                                           "completed", "state-removed"]
    assert events[0]["collapsed"] == 1 and events[0]["time_source"] == "recorded"
    assert events[2]["node"] == str(B) and all(e["run_id"] == "job42" for e in events)
    text = invoke(["history", "--from", str(path)])
    assert text.exit_code == 0 and "\x1b" not in text.stdout and "trainer-1" in text.stdout
    assert text.stdout.splitlines()[0].startswith("2026-11-24T22:00:00")


def test_since_and_limit(cli_env, tmp_path, frozen_now):
    path = good_record(tmp_path)
    since = [json.loads(x)["kind"] for x in invoke(["history", "--from", str(path), "-o", "json", "--since",
                                                    "2026-11-24T22:00:02Z"]).stdout.splitlines()]
    assert since == ["joined-participants", "completed", "state-removed"]
    recent = invoke(["history", "--from", str(path), "-o", "json", "--since", "2s"])  # from NOW - 2 s: everything
    assert recent.exit_code == 0 and len(recent.stdout.splitlines()) == 5
    limited = invoke(["history", "--from", str(path), "-o", "json", "--limit", "2"]).stdout.splitlines()
    assert [json.loads(x)["kind"] for x in limited] == ["completed", "state-removed"]
    bad = invoke(["history", "--from", str(path), "--since", "yesterday"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "header"),
    (b'{"format": "something-else"}\n', "header"),
    (b"not json\n", "line 1: not JSON"),
    (json.dumps({"format": FORMAT}).encode() + b"\n{bad\n", "line 2: not JSON"),
    (json.dumps({"format": FORMAT}).encode() + b'\n{"time": "2026-11-24T22:00:00Z"}\n', "line 2"),
    (json.dumps({"format": FORMAT}).encode() + b'\n{"time": 5, "removed": true}\n', "line 2"),
    (json.dumps({"format": FORMAT}).encode() + b'\n{"time": "2026-11-24T22:00:00Z", "state": {"round": "x"}}\n',
     "line 2"),
    (json.dumps({"format": FORMAT}).encode() + b"\n[1, 2]\n", "line 2: expected a JSON object"),
])
def test_a_bad_record_file_is_one_line_and_exit_2(cli_env, tmp_path, content, reason):
    path = tmp_path / "bad.history"
    path.write_bytes(content)
    result = invoke(["history", "--from", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and reason in result.stderr and "Traceback" not in result.stderr


def test_record_lines_are_bounded(cli_env, tmp_path, monkeypatch):
    import rdzvctl.recording

    monkeypatch.setattr(rdzvctl.recording, "MAX_LINE", 200)
    path = record(tmp_path / "long.history", {"time": "2026-11-24T22:00:00Z", "removed": True, "pad": "x" * 500})
    result = invoke(["history", "--from", str(path)])
    assert result.exit_code == 2 and "line 2: longer than 200 bytes" in result.stderr
    missing = invoke(["history", "--from", str(tmp_path / "absent")])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1


def test_svg_is_written_and_never_overwritten_without_force(cli_env, tmp_path):
    import xml.etree.ElementTree as ET

    path = good_record(tmp_path)
    svg = tmp_path / "job42.svg"
    result = invoke(["history", "--from", str(path), "--svg", str(svg)])
    assert result.exit_code == 0, result.output
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    assert "3 entries" in svg.read_text()  # the replay the events came from: heartbeat-only folded
    since = invoke(["history", "--from", str(path), "--since", at(2).isoformat(), "--svg", str(svg), "--force"])
    assert since.exit_code == 0 and "2 entries" in svg.read_text()  # what --since shows, no more
    again = invoke(["history", "--from", str(path), "--svg", str(svg)])
    assert again.exit_code == 2 and "--force" in again.stderr and again.stdout == ""  # refused before replaying
    assert invoke(["history", "--from", str(path), "--svg", str(svg), "--force"]).exit_code == 0


def test_a_backend_notice_goes_to_stderr_and_first_json_line(registered, memory):
    flags = ["--rdzv-backend", "memory-history", "--rdzv-endpoint", memory.endpoint, "--rdzv-id", "job42"]
    result = invoke(["history", *flags, "-o", "json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert lines[0] == {"kind": "notice", "message": "revisions before 7 were compacted away", "run_id": "job42"}
    assert [x["revision"] for x in lines[1:]] == [7, 7, 9, 9]
    assert lines[1]["time_source"] == "backend"
    assert "notice: revisions before 7 were compacted away" in result.stderr


def test_a_backend_without_history_points_at_watch_record(cli_env, tcpstore_libuv):
    flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", tcpstore_libuv.endpoint, "--rdzv-id", "job42"]
    result = invoke(["history", *flags])  # a TCPStore holds only the current value
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "watch --record" in result.stderr


def test_no_history_is_exit_5(cli_env, tmp_path):
    path = tmp_path / "store"
    FileStore(str(path), create=True).set(b"/unrelated", b"x")
    flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(path), "--rdzv-id", "job42",
             "--rdzv-conf", "store_type=file"]
    result = invoke(["history", *flags])
    assert result.exit_code == 5 and "job42" in result.stderr and result.stderr.count("\n") == 1
    address = Address("c10d", str(path), "job42", {"store_type": "file"})
    with open_backend(address) as backend:
        backend.set_state(encode(make_state(2)))
    listed = invoke(["history", *flags, "-o", "json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["kind"] == "state-created"


def test_watch_record_writes_versions_and_refuses_an_existing_file(memory, tmp_path):
    memory.put(make_state(2))
    path = tmp_path / "job42.history"
    result = invoke(["watch", *memory.flags(), "--record", str(path), "--for", "0.3", "--interval", "0.05"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["format"] == FORMAT and lines[0]["run_id"] == "job42"
    assert lines[1]["state"] == state_to_json(memory.state()) and lines[1]["token"]
    again = invoke(["watch", *memory.flags(), "--record", str(path), "--for", "0.1"])
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = invoke(["watch", *memory.flags(), "--record", str(path), "--for", "0.1", "--force"])
    assert forced.exit_code == 0
    replay = invoke(["history", "--from", str(path), "-o", "json"])
    assert replay.exit_code == 0 and json.loads(replay.stdout.splitlines()[0])["kind"] == "state-created"


def _state_line(time: str = '"2026-11-24T22:00:00Z"', **replace: str) -> bytes:
    doc = ('{"round": 0, "complete": false, "deadline": null, "closed": false, "participants": {"a_1_0": 0}, '
           '"wait_list": [], "redundancy_list": [], "last_heartbeats": {"a_1_0": "2026-11-24T22:00:00Z"}}')
    for old, new in replace.items():
        doc = doc.replace(old.replace("__", " "), new)
    return json.dumps({"format": FORMAT}).encode() + b'\n{"time": %s, "state": %s}\n' % (time.encode(), doc.encode())


@pytest.mark.parametrize(("content", "reason"), [
    # past the last datetime once in UTC: was "internal error: OverflowError"
    (_state_line('"9999-12-31T23:59:59.999999-23:59"'), "out of range in UTC"),
    (_state_line(**{'"2026-11-24T22:00:00Z"}}': '"9999-12-31T23:59:59-12:00"}}'}), "out of range in UTC"),
    # a huge number or node id is quoted cut, not whole (nor Python's int-digits advice)
    (_state_line(**{'"round":__0': '"round": ' + "9" * 4000}), "round"),
    (_state_line(**{"a_1_0": "a_" + "9" * 5000 + "_0"}), "not a node id"),
    (_state_line(**{"a_1_0": "x" * 100_000}), "not a node id"),
])
def test_a_hostile_record_value_is_one_short_line_and_exit_2(cli_env, tmp_path, content, reason):
    path = tmp_path / "hostile.history"
    path.write_bytes(content)
    result = invoke(["history", "--from", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
    assert len(result.stderr) < 400 and "internal error" not in result.stderr and "int_max_str" not in result.stderr


def test_odd_limits_and_since_times_are_no_internal_error(cli_env, tmp_path):
    path = good_record(tmp_path)
    huge = invoke(["history", "--from", str(path), "-o", "json", "--limit", str(10**30)])  # was OverflowError
    assert huge.exit_code == 0 and len(huge.stdout.splitlines()) == 5, huge.stderr
    for since in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):  # out of range once in UTC
        bad = invoke(["history", "--from", str(path), "--since", since])
        assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr, bad.stderr
