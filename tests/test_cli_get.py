"""rdzvctl get, and the behaviour every command shares: addressing, errors, exit codes."""

from __future__ import annotations

import datetime as _dt
import io
import os
import pickle
import re
from pathlib import Path

import pytest

import rdzvctl.cli.app
from rdzvctl.state.codec import encode
from rdzvctl.state.jsonform import DOCUMENT_KEYS, STATE_KEYS
from tests.support.cli import (
    NOW,
    closed_port,
    invoke,
    json_out,
    make_state,
)

SNAPSHOTS = Path(__file__).parent / "snapshots"
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(autouse=True)
def _quick_confirmation(monkeypatch):
    """These states never change: confirming a stuck verdict needs no real wait here."""
    import rdzvctl.inspection

    monkeypatch.setattr(rdzvctl.inspection, "CONFIRM_SECONDS", 0.3)


def assert_one_line_error(result, code: int, *words: str) -> str:
    """The error contract: exit ``code``, one ``rdzvctl: `` line on stderr, no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rdzvctl: "), lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


# -- happy paths ----------------------------------------------------------------------
def test_get_text_shows_header_nodes_and_problems(memory):
    memory.put(make_state())
    result = invoke(["get", *memory.flags()])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert f"backend   memory  {memory.endpoint}" in out
    assert "run id    job42" in out
    assert "round     2" in out
    assert "nodes     4 participants (3 alive, 1 dead), 1 waiting, 0 redundant" in out
    assert "phase     recovering" in out  # a node waits: the agents restart and torch drops the dead one
    assert re.search(r"3\s+trainer-3.cluster.local_4103_0\s+50.0s ago\s+dead", out)
    assert re.search(r"spare-100.cluster.local_4200_0\s+2.0s ago\s+alive", out)
    assert "dead-participants" in out and "[torch: recovers]" in out and "rdzvctl reset" not in out
    assert not ANSI.search(out)


def test_get_json_has_the_documented_schema(memory):
    memory.put(make_state())
    result = invoke(["get", *memory.flags(), "-o", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.get/v1"
    assert set(doc) == DOCUMENT_KEYS - {"store_keys"}
    assert list(doc["state"]) == list(STATE_KEYS)
    assert set(doc["summary"]) == {"participants", "alive", "dead", "waiting", "redundant", "deadline_remaining"}
    assert doc["summary"]["dead"] == 1 and doc["summary"]["alive"] == 3
    assert doc["token"] == str(memory.token())
    assert doc["fetched_at"] == "2026-11-24T22:00:00.000000+00:00"
    assert doc["keep_alive"] == {"interval": 5.0, "max_attempt": 3}
    for entry in doc["nodes"]:
        assert set(entry) == {"node", "role", "rank", "last_heartbeat", "age", "alive"}
    assert [n["rank"] for n in doc["nodes"] if n["role"] == "participant"] == [0, 1, 2, 3]
    dead = [n for n in doc["nodes"] if n["alive"] is False]
    assert [n["node"] for n in dead] == ["trainer-3.cluster.local_4103_0"] and dead[0]["age"] == 50.0
    (problem,) = doc["problems"]
    assert set(problem) == {"code", "severity", "message", "repair", "nodes", "torch_next", "outlook"}
    assert problem["torch_next"] == "recovers" and not problem["repair"]
    assert doc["lifecycle"]["phase"] == "recovering" and "trainer-3.cluster.local_4103_0" in doc["lifecycle"]["nodes"]
    assert problem["code"] == "dead-participants" and problem["nodes"] == ["trainer-3.cluster.local_4103_0"]


def test_get_raw_prints_the_exact_stored_bytes(memory):
    memory.put(make_state())
    result = invoke(["get", *memory.flags(), "-o", "raw"])
    assert result.exit_code == 0
    assert result.stdout_bytes == memory.raw()


def test_keep_alive_settings_come_from_rdzv_conf(memory):
    memory.put(make_state())
    result = invoke(["get", *memory.flags(conf="keep_alive_interval=30,keep_alive_max_attempt=2"), "-o", "json"])
    doc = json_out(result)
    assert doc["keep_alive"] == {"interval": 30.0, "max_attempt": 2}
    assert doc["summary"]["dead"] == 0 and doc["problems"] == []


def test_address_from_torchrun_environment(memory):
    memory.put(make_state(), run_id="from-env")
    env = {"PET_RDZV_BACKEND": "memory", "PET_RDZV_ENDPOINT": memory.endpoint, "PET_RDZV_ID": "from-env"}
    result = invoke(["get", "-o", "json"], env=env)
    assert result.exit_code == 0, result.stderr
    assert json_out(result)["run_id"] == "from-env"
    # rdzvctl's own variables win over torchrun's.
    memory.put(make_state(round=9), run_id="mine")
    result = invoke(["get", "-o", "json"], env={**env, "RDZVCTL_RDZV_ID": "mine"})
    assert json_out(result)["state"]["round"] == 9


def test_keys_on_a_backend_without_store_keys_is_a_note(memory):
    memory.put(make_state())
    result = invoke(["get", *memory.flags(backend="memory-unlisted"), "--keys"])
    assert result.exit_code == 0
    assert "note:" in result.stderr and "store keys" in result.stderr


# -- large states -----------------------------------------------------------------------
def test_large_state_is_summarised_by_default(memory):
    memory.put(make_state(alive=4090, dead=6, waiting=0))
    result = invoke(["get", *memory.flags()])
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+trainer-", line)]
    assert len(rows) == 50
    assert "... 4046 more participants not shown (--all-nodes shows every row)" in result.stdout
    # The dead nodes are the ones worth showing first.
    assert sum(" dead" in row for row in rows) == 6


def test_all_nodes_shows_every_row(memory):
    memory.put(make_state(alive=4090, dead=6, waiting=0))
    result = invoke(["get", *memory.flags(), "--all-nodes"])
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+trainer-", line)]
    assert len(rows) == 4096
    assert "more participants not shown" not in result.stdout


# -- errors and exit codes ----------------------------------------------------------------
def test_no_state_exits_5(memory):
    result = invoke(["get", *memory.flags(run_id="absent")])
    assert_one_line_error(result, 5, "NoStateError", "'absent'")
    assert result.stdout == ""


def test_raw_of_no_state_exits_5(memory):
    result = invoke(["get", *memory.flags(run_id="absent"), "-o", "raw"])
    assert_one_line_error(result, 5, "NoStateError")
    assert result.stdout_bytes == b""


def test_verbose_adds_the_traceback(memory):
    result = invoke(["-v", "get", *memory.flags(run_id="absent")])
    assert result.exit_code == 5
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rdzvctl: NoStateError")


def test_verbose_from_the_environment(memory):
    result = invoke(["get", *memory.flags(run_id="absent")], env={"RDZVCTL_VERBOSE": "1"})
    assert "Traceback" in result.stderr


def test_missing_run_id_exits_2(memory):
    result = invoke(["get", *memory.flags(run_id=None)])
    assert_one_line_error(result, 2, "--rdzv-id")


def test_missing_backend_exits_2(memory):
    result = invoke(["get", "--rdzv-id", "x"])
    assert_one_line_error(result, 2, "--rdzv-backend")


def test_unknown_backend_lists_the_registered_ones(memory):
    result = invoke(["get", "--rdzv-backend", "zookeeper", "--rdzv-endpoint", "x", "--rdzv-id", "j"])
    line = assert_one_line_error(result, 2, "BackendNotFoundError", "'zookeeper'")
    for name in ("c10d", "etcd-v2", "etcd-v3", "redis", "memory"):
        assert name in line


@pytest.mark.parametrize("conf", ["novalue", "=x", "keep_alive_interval=abc", "keep_alive_max_attempt=0",
                                  "max_nodes=many"])
def test_bad_rdzv_conf_exits_2(memory, conf):
    memory.put(make_state())
    result = invoke(["get", *memory.flags(conf=conf)])
    assert_one_line_error(result, 2)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["get", "--nope"], ["No such option '--nope'", "(see 'rdzvctl get --help')"]),
        (["get", "--timeout", "0"], ["--timeout", "must be positive"]),
        (["get", "--timeout", "abc"], ["'abc' is not a valid float"]),
        (["get", "-o", "yaml"], ["'yaml' is not one of 'text', 'json', 'raw'"]),
        (["reset"], ["Missing option '--mode'. Choose from: clear, reopen, prune"]),
        (["nope"], ["No such command 'nope'", "(see 'rdzvctl --help')"]),
        (["--nope"], ["No such option '--nope'"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(memory, args, words):
    result = invoke(args)
    line = assert_one_line_error(result, 2, *words)
    assert line.startswith("rdzvctl: UsageError: ")


def test_bare_rdzvctl_shows_the_help(memory):
    result = invoke([])
    assert result.exit_code == 2  # click's convention for a group called without a command
    assert "Commands:" in result.stderr and "rdzvctl: " not in result.stderr


def test_unreachable_backend_exits_4(memory):
    port = closed_port()
    result = invoke(["get", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "j",
                     "--timeout", "1"])
    assert_one_line_error(result, 4, f"127.0.0.1:{port}")


def test_corrupt_pickle_exits_6_and_shows_why(memory):
    memory.put(b"\x80\x04\x95garbage")
    result = invoke(["get", *memory.flags()])
    assert result.exit_code == 6
    assert re.search(r"^state\s+corrupt$", result.stdout, re.MULTILINE)
    assert "state-corrupt" in result.stdout
    result = invoke(["get", *memory.flags(), "-o", "json"])
    assert result.exit_code == 6
    doc = json_out(result)
    assert doc["state"] is None and doc["problems"][0]["code"] == "state-corrupt"
    # -o raw still hands out the bytes, for inspection.
    result = invoke(["get", *memory.flags(), "-o", "raw"])
    assert result.exit_code == 0 and result.stdout_bytes == b"\x80\x04\x95garbage"


def test_corrupt_stored_wrapping_exits_6(memory):
    memory.corrupt()
    result = invoke(["get", *memory.flags(), "-o", "json"])
    assert result.exit_code == 6
    assert json_out(result)["problems"][0]["code"] == "state-corrupt"


class _Explode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def unsafe_state(memory, tmp_path):
    marker = tmp_path / "pwned"
    memory.put(pickle.dumps(_Explode(marker), protocol=4))
    yield marker
    assert not marker.exists(), "an unsafe pickle was executed"


@pytest.mark.parametrize("args", [["get"], ["get", "-o", "json"], ["corrupt-detect"], ["set", "--no-closed", "--yes"],
                                  ["reset", "--mode", "prune", "--yes"], ["reset", "--mode", "reopen", "--yes"],
                                  ["edit", "--yes"]])
def test_unsafe_pickle_is_never_executed(memory, unsafe_state, args):
    before = memory.raw()
    result = invoke([*args, *memory.flags()], env={"EDITOR": "true"})
    assert result.exit_code == 6, (result.stdout, result.stderr)
    assert "unsafe" in (result.stdout + result.stderr).lower()
    if args == ["get"]:
        assert re.search(r"^state\s+unsafe$", result.stdout, re.MULTILINE)
    assert "os.system" in result.stdout + result.stderr or "posix.system" in result.stdout + result.stderr
    assert memory.raw() == before


# -- snapshots ------------------------------------------------------------------------------
def _snapshot_state():
    state = make_state(alive=3, dead=1, waiting=1, complete=False)
    state.deadline = NOW + _dt.timedelta(seconds=25)
    return state


def _check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("RDZVCTL_UPDATE_SNAPSHOTS") == "1":  # pragma: no cover - regenerating
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing snapshot {path}: run with RDZVCTL_UPDATE_SNAPSHOTS=1 to write it"
    assert text == path.read_text(), (f"{name} changed; check the diff, then regenerate with "
                                      "RDZVCTL_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_cli_get.py")


def _stable(text: str, memory) -> str:
    """Endpoint and token vary between runs; trailing padding depends on their width."""
    text = text.replace(memory.endpoint, "mem-snapshot")
    text = re.sub(r"^(token\s+)\d+", r"\g<1>17", text, flags=re.MULTILINE)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def test_get_plain_snapshot(memory):
    memory.put(_snapshot_state())
    result = invoke(["get", *memory.flags(), "--rdzv-conf", "max_nodes=3"])
    assert result.exit_code == 0
    _check_snapshot("get_plain.txt", _stable(result.stdout, memory))


def test_get_rich_snapshot_at_fixed_width(memory, monkeypatch):
    from rich.console import Console

    consoles = []

    def recording_console(self, stderr: bool = False) -> Console:
        console = Console(file=io.StringIO(), record=True, width=100, force_terminal=True, color_system="truecolor",
                          highlight=False, soft_wrap=False)
        consoles.append(console)
        return console

    monkeypatch.setattr(rdzvctl.cli.app.App, "console", recording_console)
    memory.put(_snapshot_state())
    result = invoke(["get", *memory.flags(), "--rdzv-conf", "max_nodes=3"], env={"NO_COLOR": None,
                                                                                    "RDZVCTL_FORCE_RICH": "1"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # everything went through the console
    text = "".join(c.export_text(clear=False) for c in consoles)
    _check_snapshot("get_rich.txt", _stable(text, memory))
    styled = "".join(c.export_text(styles=True) for c in consoles)
    assert ANSI.search(styled), "a terminal gets colours"


def test_no_color_drops_the_colours_not_the_rich_layout(memory):
    memory.put(_snapshot_state())
    rich = invoke(["get", *memory.flags()], env={"NO_COLOR": None, "RDZVCTL_FORCE_RICH": "1"})
    result = invoke(["get", *memory.flags()], env={"NO_COLOR": "1", "RDZVCTL_FORCE_RICH": "1"})
    assert result.exit_code == 0
    assert not ANSI.search(result.stdout)
    assert result.stdout == rich.stdout and "─" in result.stdout  # rich's table rules, not the plain layout


def test_forced_rich_output_without_a_terminal_has_no_escapes(memory):
    memory.put(_snapshot_state())
    result = invoke(["get", *memory.flags()], env={"NO_COLOR": None, "RDZVCTL_FORCE_RICH": "1", "COLUMNS": "100"})
    assert result.exit_code == 0
    assert not ANSI.search(result.stdout)
    assert max(len(line) for line in result.stdout.splitlines()) <= 100


def test_encode_is_what_the_fixture_stores(memory):
    """Guards the snapshot tests: the fixture stores exactly what the codec encodes."""
    state = _snapshot_state()
    memory.put(state)
    assert memory.raw() == encode(state)


def test_the_table_is_described_without_heartbeat_times_and_shows_the_same() -> None:
    """get's table asks describe() to skip the heartbeat times (only the JSON document prints
    them): the document differs only there, and the table drawn from either is the same."""
    from rdzvctl import inspection
    from rdzvctl.cli.render import render_get
    from rdzvctl.state.model import NodeDesc, RendezvousState
    from rdzvctl.state.nodes import KeepAlive

    now = _dt.datetime(2026, 12, 1, 12, tzinfo=_dt.timezone.utc)
    state = RendezvousState(round=2, complete=True, deadline=now + _dt.timedelta(seconds=9))
    for i in range(60):
        node = NodeDesc(f"host-{i}", 10 + i, 0)
        state.participants[node] = i
        state.last_heartbeats[node] = now - _dt.timedelta(seconds=99 if i < 3 else 1)
    state.wait_list.add(NodeDesc("late", 1, 0))
    state.redundancy_list.add(NodeDesc("spare", 1, 0))
    state.last_heartbeats[NodeDesc("gone", 1, 0)] = now
    snap = inspection.Snapshot("c10d", "store", "job", b"raw", b"t", "t", state, None, now)
    full = inspection.describe(snap, KeepAlive(5.0, 3))
    lean = inspection.describe(snap, KeepAlive(5.0, 3), heartbeats=False)
    assert lean["state"] == {k: full["state"][k] for k in ("round", "complete", "deadline", "closed")}
    assert lean["nodes"] == [{**row, "last_heartbeat": None} for row in full["nodes"]]
    assert {k: v for k, v in lean.items() if k not in ("state", "nodes")} == \
        {k: v for k, v in full.items() if k not in ("state", "nodes")}

    class PlainApp:  # what render_get asks of the App off a terminal
        rich = False

        def __init__(self) -> None:
            self.printed = io.StringIO()

        def out(self, text: str = "") -> None:
            self.printed.write(f"{text}\n")

    def table(doc: dict, all_nodes: bool) -> str:
        app = PlainApp()
        render_get(app, doc, all_nodes)  # type: ignore[arg-type]
        return app.printed.getvalue()

    for all_nodes in (False, True):
        assert table(lean, all_nodes) == table(full, all_nodes) != ""
