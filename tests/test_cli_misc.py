"""backends, conformance, demo, completion; and rdzvctl as a real process on a FileStore."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from rdzvctl.backends.base import CAPABILITIES, Address
from rdzvctl.backends.registry import get_backend_class, open_backend
from rdzvctl.cli.commands.completion import completion_script
from rdzvctl.state.codec import decode
from rdzvctl.testing.memory import MemoryBackend
from tests.support.cli import (
    closed_port,
    invoke,
    json_out,
    make_state,
    run_rdzvctl,
)

BUILTINS = ("c10d", "etcd-v2", "etcd-v3", "redis")


class NeedsAbsentLibraryBackend(MemoryBackend):
    name = "memory-needs-lib"
    requires = ("rdzvctl_no_such_client_lib",)
    install_hint = "rdzvctl-no-such-client-lib"


# -- backends -----------------------------------------------------------------------
def test_backends_json_lists_the_builtins_with_capabilities(memory):
    result = invoke(["backends", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.backends/v1"
    rows = {row["name"]: row for row in doc["backends"]}
    for name in BUILTINS:
        row = rows[name]
        cls = get_backend_class(name)
        assert row["capabilities"] == [c for c in CAPABILITIES if c in cls.capabilities], name
        assert {"clear", "list_runs"} <= set(row["capabilities"]), name
        assert row["error"] is None and row["summary"], name
        assert row["origin"].startswith("rdzvctl"), name
    assert rows["c10d"]["usable"] is True and rows["c10d"]["strict_fencing"] is False
    assert rows["memory"]["capabilities"] == ["clear", "list_runs", "store_keys", "history"]


def test_backends_text(memory):
    result = invoke(["backends"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ORIGIN", "CLIENT"]
    for name in BUILTINS:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "no (value is the token)" in result.stdout
    assert lines[-1] == "Also: any torch RendezvousBackend as --rdzv-backend module:factory."


def test_backends_reports_plugins_that_fail_or_lack_their_library(memory):
    import rdzvctl.backends.registry as registry

    with registry.register({"ghost": "rdzvctl_no_such_plugin:Backend",
                            "memory-needs-lib": "tests.test_cli_misc:NeedsAbsentLibraryBackend"}):
        result = invoke(["backends", "-o", "json"])
        assert result.exit_code == 0
        rows = {row["name"]: row for row in json_out(result)["backends"]}
        assert rows["ghost"]["usable"] is False and "rdzvctl_no_such_plugin" in rows["ghost"]["error"]
        assert rows["memory-needs-lib"]["missing"] == ["rdzvctl_no_such_client_lib"]
        text = invoke(["backends"]).stdout
        assert "failed to load" in text and "pip install rdzvctl-no-such-client-lib" in text
        # Using it says what to install, exit 2.
        result = invoke(["get", *memory.flags(backend="memory-needs-lib")])
        assert result.exit_code == 2
        assert "pip install rdzvctl-no-such-client-lib" in result.stderr


# -- conformance -----------------------------------------------------------------------
def test_conformance_of_the_reference_backend_passes(memory):
    result = invoke(["conformance", *memory.flags(run_id=None), "--racers", "4"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "result   ok" in result.stdout
    assert "racing_writers" in result.stdout


def test_conformance_json(memory):
    result = invoke(["conformance", *memory.flags(run_id=None), "-o", "json", "--racers", "2"])
    assert result.exit_code == 0
    doc = json_out(result)
    assert doc["schema"] == "rdzvctl.conformance/v1" and doc["passed"] is True
    outcomes = {case["name"]: case["outcome"] for case in doc["cases"]}
    assert outcomes["set_old_token"] == "pass" and outcomes["list_runs"] == "pass"
    assert set(outcomes.values()) <= {"pass", "skip", "limitation"}


def test_conformance_of_a_broken_backend_fails(memory):
    result = invoke(["conformance", *memory.flags(run_id=None, backend="memory-broken"), "-o", "json"])
    assert result.exit_code == 1
    doc = json_out(result)
    assert doc["passed"] is False
    failed = {case["name"] for case in doc["cases"] if case["outcome"] == "fail"}
    assert {"set_old_token", "set_no_token_existing", "racing_writers"} <= failed
    result = invoke(["conformance", *memory.flags(run_id=None, backend="memory-broken")])
    assert result.exit_code == 1 and "result   fail" in result.stdout


# -- demo and completion ------------------------------------------------------------------
def test_demo_creates_a_filestore_rendezvous(memory, tmp_path):
    result = invoke(["demo", "--no-live", "--path", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.stderr
    store = tmp_path / "demo" / "rendezvous.store"
    assert f"PET_RDZV_ENDPOINT={store}" in result.stdout
    for command in ("rdzvctl get", "rdzvctl corrupt-detect", "rdzvctl reset --mode prune --dry-run",
                    "rdzvctl restore BACKUP --yes", "rdzvctl watch"):
        assert f"  {command} " in result.stdout
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(store), "PET_RDZV_ID": "demo-job",
           "PET_RDZV_CONF": "store_type=file"}
    result = invoke(["get", "-o", "json"], env=env)
    assert result.exit_code == 0, result.stderr
    doc = json_out(result)
    assert doc["summary"] == {"participants": 4, "alive": 3, "dead": 1, "waiting": 0, "redundant": 0,
                              "deadline_remaining": None}
    assert invoke(["corrupt-detect"], env=env).exit_code == 1
    # The FileStore log holds the run's past: the scale-up into round 1, the restart into round 2.
    history = invoke(["history", "-o", "json"], env=env)
    assert history.exit_code == 0, history.stderr
    events = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(e["from"], e["to"]) for e in events if e["kind"] == "round-advanced"] == [(0, 1), (1, 2)]
    assert [e["node"] for e in events if e["kind"] == "joined-wait-list"] == ["trainer-3.cluster.local_4103_0"]
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)
    # Running it again on the same path rewrites the state, fenced.
    again = invoke(["demo", "--no-live", "--path", str(tmp_path / "demo")])
    assert again.exit_code == 0
    assert "after 15 s every node looks dead" in again.stdout and f"rm -r {tmp_path / 'demo'}" in again.stdout


def test_demo_heartbeats_keep_its_story_true_ten_minutes_later():
    """Ten simulated minutes of the live demo's ticks: still 3 participants alive, exactly 1 dead."""
    import datetime as dt

    from rdzvctl.cli.commands.demo import demo_state, heartbeat
    from rdzvctl.state.analysis import dead_nodes, node_statuses

    start = dt.datetime(2026, 11, 24, 22, 0, tzinfo=dt.timezone.utc)
    state = demo_state(start)
    now = start
    for _ in range(300):  # every 2 s for 10 minutes
        now += dt.timedelta(seconds=2)
        heartbeat(state, now)
    assert [str(n) for n in dead_nodes(state, now)] == ["trainer-3.cluster.local_4103_0"]
    participants = [s for s in node_statuses(state, now) if s.role == "participant"]
    assert sorted(s.alive for s in participants) == [False, True, True, True]
    assert not state.wait_list and state.round == 2 and state.complete

@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_script(memory, shell):
    result = invoke(["completion", shell])
    assert result.exit_code == 0
    assert result.stdout == completion_script(shell)
    assert "_RDZVCTL_COMPLETE" in result.stdout


def test_completion_of_an_unknown_shell_exits_2(memory):
    assert invoke(["completion", "tcsh"]).exit_code == 2


# -- as a real process ----------------------------------------------------------------------
@pytest.fixture
def demo_store(tmp_path) -> dict:
    """A demo FileStore made by a real rdzvctl process; returns the PET_RDZV_* environment."""
    done = run_rdzvctl(["demo", "--no-live", "--path", str(tmp_path / "demo")])
    assert done.returncode == 0, done.stderr
    store = tmp_path / "demo" / "rendezvous.store"
    return {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(store), "PET_RDZV_ID": "demo-job",
            "PET_RDZV_CONF": "store_type=file", "RDZVCTL_BACKUP_DIR": str(tmp_path / "backups")}


def test_process_inspect_prune_restore_on_a_filestore(demo_store):
    text = run_rdzvctl(["get"], env=demo_store, importtime=True)
    assert text.returncode == 0 and "trainer-3.cluster.local_4103_0" in text.stdout
    assert not imported_modules(text.stderr) & HEAVY  # plain output needs no rich
    before = run_rdzvctl(["get", "-o", "raw"], env=demo_store, text=False)
    assert before.returncode == 0 and before.stdout
    detect = run_rdzvctl(["corrupt-detect", "-o", "json"], env=demo_store, importtime=True)
    assert detect.returncode == 1
    assert not imported_modules(detect.stderr) & HEAVY
    (problem,) = json.loads(detect.stdout)["runs"][0]["problems"]
    assert problem["nodes"] == ["trainer-3.cluster.local_4103_0"] and problem["repair"].startswith(
        "rdzvctl reset --mode prune") and problem["torch_next"] == "stays"
    prune = run_rdzvctl(["reset", "--mode", "prune", "--yes"], env=demo_store)
    assert prune.returncode == 0, prune.stderr
    backup = next(line.split(": ", 1)[1] for line in prune.stderr.splitlines() if line.startswith("Backup written"))
    assert run_rdzvctl(["corrupt-detect"], env=demo_store).returncode == 0
    restore = run_rdzvctl(["restore", backup, "--yes"], env=demo_store)
    assert restore.returncode == 0, restore.stderr
    after = run_rdzvctl(["get", "-o", "raw"], env=demo_store, text=False)
    assert after.stdout == before.stdout


BAD_CONF = [
    ("keep_alive_interval=nan", "keep_alive_interval", "get"),
    ("keep_alive_interval=inf", "keep_alive_interval", "doctor"),
    ("keep_alive_interval=1e309", "keep_alive_interval", "report"),
    ("keep_alive_interval=86401", "keep_alive_interval", "list"),
    ("keep_alive_max_attempt=99999999999999999999999", "keep_alive_max_attempt", "corrupt-detect"),
    ("keep_alive_max_attempt=" + "9" * 5000, "keep_alive_max_attempt", "get"),
    ("min_nodes=3,max_nodes=2", "min_nodes", "get"),
    ("join_timeout=abc", "join_timeout", "get"),
    ("last_call_timeout=abc", "last_call_timeout", "corrupt-detect"),
    ("close_timeout=abc", "close_timeout", "list"),
    ("heartbeat_timeout=0", "heartbeat_timeout", "get"),
    ("read_timeout=abc", "read_timeout", "get"),
    ("timeout=abc", "timeout", "doctor"),
]


def test_process_bad_numeric_rdzv_conf_is_one_usage_line_naming_the_option(demo_store):
    for extra, key, command in BAD_CONF:
        env = {**demo_store, "PET_RDZV_CONF": "store_type=file," + extra}
        done = run_rdzvctl([command], env=env)
        assert done.returncode == 2, (extra, command, done.stderr)
        (line,) = done.stderr.splitlines()
        assert f"--rdzv-conf {key}" in line and "internal error" not in line and len(line) < 300, line
    fine = {**demo_store, "PET_RDZV_CONF": "store_type=file,keep_alive_interval=0.5,keep_alive_max_attempt=6,"
            "min_nodes=2,max_nodes=4,join_timeout=600,last_call_timeout=1.5"}
    assert run_rdzvctl(["get"], env=fine).returncode == 0


def test_process_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path):
    store = tmp_path / "store"
    store.write_bytes(b"")
    env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(store), "PET_RDZV_CONF": "store_type=file"}
    done = run_rdzvctl(["get", "--rdzv-id", "absent"], env=env)
    assert done.returncode == 5
    assert done.stderr.splitlines() == [f"rdzvctl: NoStateError: no rendezvous state for run 'absent' on c10d {store}"]
    verbose = run_rdzvctl(["-v", "get", "--rdzv-id", "absent"], env=env)
    assert verbose.returncode == 5 and "Traceback (most recent call last)" in verbose.stderr
    usage = run_rdzvctl(["get", "--rdzv-backend", "zookeeper"], env=env)
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1


def test_process_unreachable_tcpstore_exits_4(tmp_path):
    port = closed_port()
    done = run_rdzvctl(["get", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "j",
                        "--timeout", "1"], timeout=30)
    assert done.returncode == 4
    (line,) = done.stderr.splitlines()
    assert line.startswith("rdzvctl: ") and f"127.0.0.1:{port}" in line


def test_process_clear_repairs_a_value_that_is_not_base64(tmp_path):
    store = tmp_path / "store"
    store.write_bytes(b"")
    address = Address("c10d", str(store), "job", {"store_type": "file"})
    with open_backend(address) as backend:
        backend.store.set(backend.key, b"!!! not base64 !!!")
    flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(store), "--rdzv-id", "job", "--rdzv-conf",
             "store_type=file", "--backup-dir", str(tmp_path / "b")]
    get = run_rdzvctl(["get", *flags[:-2]])
    assert get.returncode == 6 and "not base64" in get.stdout
    clear = run_rdzvctl(["reset", "--mode", "clear", "--yes", *flags])
    assert clear.returncode == 0, clear.stderr
    assert run_rdzvctl(["get", *flags[:-2]]).returncode == 5
    with open_backend(address) as backend:
        assert backend.get_state() is None


def test_console_script_runs():
    script = shutil.which("rdzvctl")
    if script is None:  # pragma: no cover - the package is installed in CI
        pytest.skip("the rdzvctl console script is not on PATH")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("rdzvctl ")


def test_demo_live_gives_watch_something_to_show(tmp_path):
    path = tmp_path / "live"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RDZVCTL_"))}
    live = subprocess.Popen([sys.executable, "-m", "rdzvctl", "demo", "--live", "--interval", "0.2", "--path",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        store = path / "rendezvous.store"
        watch_env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": str(store), "PET_RDZV_ID": "demo-job",
                     "PET_RDZV_CONF": "store_type=file"}
        # Wait for the demo to write its state, then follow it: heartbeats only, the round stays.
        for _ in range(100):
            if store.exists() and run_rdzvctl(["get", "-o", "json"], env=watch_env).returncode == 0:
                break
        done = run_rdzvctl(["watch", "-o", "json", "--interval", "0.1", "--until", "round>=3", "--for", "1.5"],
                           env=watch_env)
        assert done.returncode == 1  # the demo never advances the round
        kinds = [json.loads(line)["kind"] for line in done.stdout.splitlines()]
        assert kinds[0] == "snapshot" and "round-advanced" not in kinds
    finally:
        live.send_signal(signal.SIGINT)
        try:
            _, err = live.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover - never leave it running
            live.kill()
            _, err = live.communicate()
    assert live.returncode == 0, err
    with open_backend(Address("c10d", str(store), "demo-job", {"store_type": "file"})) as backend:
        assert decode(backend.get_state()[0]).round == 2


def test_live_demo_heartbeats_and_removes_its_temp_dir(tmp_path):
    """The default demo keeps its nodes alive while it runs and leaves nothing behind when stopped."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RDZVCTL_"))}
    live = subprocess.Popen([sys.executable, "-m", "rdzvctl", "demo", "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "TMPDIR": str(tmp), "NO_COLOR": "1"})
    try:
        first = live.stdout.readline()
        store = first.split("FileStore ", 1)[1].rstrip(".\n")
        assert store.startswith(str(tmp)) and os.path.exists(store)
        watch_env = {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": store, "PET_RDZV_ID": "demo-job",
                     "PET_RDZV_CONF": "store_type=file"}
        seen = set()
        for _ in range(200):  # until every live node has heartbeated at least once more
            doc = json.loads(run_rdzvctl(["get", "-o", "json"], env=watch_env).stdout)
            beats = doc["state"]["last_heartbeats"]
            seen.add(beats["trainer-0.cluster.local_4100_0"])
            if len(seen) > 2:
                break
        assert len(seen) > 2, "the demo's live nodes never heartbeated"
        assert doc["summary"]["dead"] == 1 and doc["summary"]["alive"] == 3
        assert beats["trainer-3.cluster.local_4103_0"] < min(seen)  # the dead node stays dead
    finally:
        live.send_signal(signal.SIGTERM)
        try:
            _, err = live.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover - never leave it running
            live.kill()
            _, err = live.communicate()
    assert live.returncode == 0, err
    assert "Stopped; removed" in err
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize(("typed", "meant"), [("gte", "get"), ("corupt-detect", "corrupt-detect"), ("lsit", "list"),
                                             ("rest", "reset")])
def test_a_mistyped_command_suggests_the_closest(typed, meant):
    done = run_rdzvctl([typed, "--rdzv-id", "x"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"rdzvctl: UsageError: No such command '{typed}'. Did you mean '{meant}'? (see 'rdzvctl --help')"]


def test_an_unknown_command_far_from_any_gets_no_suggestion():
    done = run_rdzvctl(["xyzzy"])
    assert done.returncode == 2 and "Did you mean" not in done.stderr and "No such command 'xyzzy'" in done.stderr


def test_help_names_both_environment_variables_in_precedence_order():
    done = run_rdzvctl(["get", "--help"], env={"COLUMNS": "200"})
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # help wraps lines
    for name in ("BACKEND", "ENDPOINT", "ID", "CONF"):
        assert f"[env: RDZVCTL_RDZV_{name}, then PET_RDZV_{name}]" in text


# -- startup ---------------------------------------------------------------------------------
HEAVY = {"rich", "torch", "redis", "etcd3", "etcd3gw", "grpc"}


def imported_modules(stderr: str) -> set:
    """Top-level module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["get", "--help"], ["backends", "-o", "json"]])
def test_startup_imports_no_heavy_module(args):
    done = run_rdzvctl(args, importtime=True)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = imported_modules(done.stderr)
    assert "click" in modules and "rdzvctl" in modules  # the parse works
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_conformance_of_an_unreachable_backend_exits_4(memory):
    port = closed_port()
    result = invoke(["conformance", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--timeout", "1"])
    assert result.exit_code == 4
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rdzvctl: BackendUnavailableError: ") and f"127.0.0.1:{port}" in line
    assert result.stdout == ""


# -- rich output on a terminal -------------------------------------------------------------
@pytest.fixture
def recording(monkeypatch) -> list:
    """Rich output forced on, into recording consoles (as on a 100-column terminal)."""
    import io

    from rich.console import Console

    import rdzvctl.cli.app

    consoles: list = []

    def console(self, stderr: bool = False) -> Console:
        made = Console(file=io.StringIO(), record=True, width=100, force_terminal=True, highlight=False)
        consoles.append(made)
        return made

    monkeypatch.setattr(rdzvctl.cli.app.App, "console", console)
    return consoles


RICH_ENV = {"NO_COLOR": None, "RDZVCTL_FORCE_RICH": "1"}


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["get"], 0, "Participants"),
        (["set", "--closed", "--dry-run"], 0, '+  "closed": true,'),
        (["corrupt-detect"], 1, "dead-participants"),
        (["list"], 0, "job42"),
        (["backends"], 0, "c10d"),
        (["watch", "--until", "round>=0", "--for", "5", "--interval", "0.02"], 0, "until-met"),
    ],
)
def test_commands_render_with_rich(memory, recording, args, code, expected):
    memory.put(make_state(waiting=0))  # stuck: nobody waits
    flags = memory.flags(run_id=None if args[0] in ("list", "backends") else "job42")
    if args[0] == "backends":
        flags = []
    result = invoke([*args, *flags], env=RICH_ENV)
    assert result.exit_code == code, result.stderr
    text = "".join(c.export_text(clear=False) for c in recording)
    assert expected in text
    assert "\x1b[" in "".join(c.export_text(styles=True) for c in recording)


def test_progress_is_shown_only_on_a_terminal(monkeypatch, recording):
    import io
    import sys

    from rdzvctl.cli.render import with_progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from rdzvctl.cli.app import App

    class AppStub:
        console = App.console  # the recording one

    app = AppStub()
    assert list(with_progress(app, iter(range(5)))) == list(range(5))  # not a terminal: no rich at all
    assert recording == []
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert list(with_progress(app, iter(range(500)))) == list(range(500))
    assert len(recording) == 1


def test_main_honours_its_own_argv_for_verbose(monkeypatch, capsys):
    """An error outside any subcommand: ``main(["-v", ...])`` shows the traceback, whatever sys.argv says."""
    import sys

    import rdzvctl.cli.main as cli_main

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_main.cli, "main", fail)
    monkeypatch.setattr(sys, "argv", ["rdzvctl"])
    monkeypatch.delenv("RDZVCTL_VERBOSE", raising=False)
    for argv, traceback in ((["-v", "get"], True), (["get"], False)):
        with pytest.raises(SystemExit) as exited:
            cli_main.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 1
        assert err.splitlines()[-1] == "rdzvctl: internal error: RuntimeError: boom"
        assert ("Traceback" in err) is traceback
