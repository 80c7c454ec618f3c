"""The paths an operator walks, through the real CLI on every real backend.

``watch`` reports a corrupt value and carries on; large states give
summaries (one event per kind with a count, a plan summary unless
``--full-diff``); ``restore`` refuses bytes torch cannot load and says why;
``list``/``corrupt-detect --all`` report every run, sorted; ``set -f``
refuses a state that breaks torch's invariants; and the output details
(``NO_COLOR`` keeps the layout, nothing folds at 60 columns, the liveness
line is not an error, ``get --keys`` says when there are none, ``watch
--for``) on a real pseudo-terminal.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import subprocess
import sys
import threading
import tty
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from rdzvctl.backup import read_backup
from rdzvctl.state.jsonform import state_to_json
from tests.reliability.common import REPO_ROOT, assert_one_line_error, cli_env, put_state, rdzvctl, sample_state
from tests.reliability.servers import Target

_KEBAB = re.compile(r"^[a-z]+(-[a-z]+)*$")
_COLOUR = re.compile(rb"\x1b\[[0-9;]*(3[0-9]|9[0-7]|38;[0-9;]+)m")
_SGR = re.compile(rb"\x1b\[[0-9;]*m")


def _run_id(name: str) -> str:
    return f"ops-{name}-{uuid.uuid4().hex[:6]}"


def put_unwrappable(target: Target, backend: Any) -> None:
    """A value that is not even base64 at the run's key (get_state raises)."""
    garbage = "%%% not base64 %%%"
    if target.backend == "c10d":
        backend.store.set(backend.key, garbage.encode())
    elif target.backend == "redis":
        backend.client.hset(backend.key, mapping={"state": garbage, "version": "1"})
    elif target.backend == "etcd-v2":
        backend._call("PUT", backend.key, {"value": garbage})
    else:
        backend.gateway.call("kv/put", {"key": base64.b64encode(backend.key.encode()).decode(),
                                        "value": base64.b64encode(garbage.encode()).decode()})


def remove_raw(target: Target, backend: Any) -> None:
    """Remove the run's value the way the backend's own tools would (c10d: torch's sentinel)."""
    if target.backend == "c10d":
        assert backend.clear(backend.store.get(backend.key))
    elif target.backend == "redis":
        backend.client.delete(backend.key)
    elif target.backend == "etcd-v2":
        backend._call("DELETE", backend.key)
    else:
        backend.gateway.call("kv/deleterange", {"key": base64.b64encode(backend.key.encode()).decode()})


class Watch:
    """``rdzvctl watch -o json`` in the background, its events read as they come."""

    def __init__(self, args: List[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rdzvctl", "watch", "-o", "json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=cli_env(), start_new_session=True)
        self.events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.seen: List[Dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.events.put(json.loads(line))

    def next(self, kind: str, timeout: float = 30) -> Dict[str, Any]:
        while True:
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event; got {[e['kind'] for e in self.seen]}; "
                                     f"exit {self.proc.poll()}") from None
            self.seen.append(event)
            if event["kind"] == kind:
                return event

    def finish(self) -> Tuple[int, str]:
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        while not self.events.empty():
            self.seen.append(self.events.get())
        return self.proc.returncode, err


# -- 3. watch carries on after a corrupt value --------------------------------------------------------
def test_watch_reports_a_corrupt_value_then_its_removal(target: Target) -> None:
    run_id = _run_id("watch-corrupt")
    backend = target.open(run_id)
    try:
        put_state(backend, sample_state(round=1))
        watch = Watch([*target.flags(run_id), "--until", "absent", "--for", "60", "--interval", "0.1"])
        assert watch.next("snapshot")["round"] == 1
        put_unwrappable(target, backend)
        assert "base64" in watch.next("state-corrupt")["message"]
        remove_raw(target, backend)
        watch.next("state-removed")
        code, err = watch.finish()
    finally:
        backend.close()
    assert code == 0, err
    kinds = [e["kind"] for e in watch.seen]
    assert kinds == ["snapshot", "state-corrupt", "state-removed", "until-met"], kinds
    assert all(_KEBAB.match(kind) for kind in kinds)


# -- 4. summaries of large states -------------------------------------------------------------------------
def test_many_stale_heartbeats_are_one_event_with_a_count(target: Target) -> None:
    run_id = _run_id("stale")
    with target.open(run_id) as backend:
        put_state(backend, sample_state(round=1, nodes=300, dead=250))
    done = rdzvctl(["watch", "-o", "json", *target.flags(run_id), "--until", "round>=0", "--for", "30"])
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["snapshot", "heartbeat-stale", "until-met"]
    stale = events[1]
    assert stale["count"] == 250 and len(stale["nodes"]) == 20 and stale["message"].endswith(" and 247 more")
    text = rdzvctl(["watch", *target.flags(run_id), "--until", "round>=0", "--for", "30"])
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3, text.stdout


def test_long_plans_are_summarised_unless_full_diff(target: Target, tmp_path: Path) -> None:
    run_id = _run_id("plan")
    with target.open(run_id) as backend:
        put_state(backend, sample_state(round=1, nodes=300, dead=250))
    write = [*target.flags(run_id), "--dry-run", "--backup-dir", str(tmp_path)]
    clear = rdzvctl(["reset", "--mode", "clear", *write])
    assert clear.returncode == 0, clear.stderr
    lines = clear.stderr.splitlines()
    assert len(lines) < 20, clear.stderr
    assert any("summarised; --full-diff shows it all" in line for line in lines[:2]), clear.stderr  # after the round-keys note
    assert "    participants: 300 entries" in lines
    prune = rdzvctl(["reset", "--mode", "prune", *write])
    assert prune.returncode == 0, prune.stderr
    first = prune.stderr.splitlines()[0]
    assert first.startswith("250 dead node(s) to prune: trainer-") and first.endswith(" and 245 more")
    assert "  participants: 250 removed (" in prune.stderr
    full = rdzvctl(["reset", "--mode", "prune", "--full-diff", *write])
    assert full.returncode == 0 and len(full.stderr.splitlines()) > 500
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # dry runs


# -- 7. restore never writes bytes torch cannot load ------------------------------------------------------
def test_restore_refuses_a_backup_of_a_corrupt_state(target: Target, tmp_path: Path) -> None:
    run_id = _run_id("restore")
    backups = tmp_path / "backups"
    with target.open(run_id) as backend:
        put_state(backend, b"\x80\x04not a pickle at all")
        clear = rdzvctl(["reset", "--mode", "clear", "--yes", *target.flags(run_id), "--backup-dir", str(backups)])
        assert clear.returncode == 0, clear.stderr
        assert "keeps the undecodable bytes for forensics" in clear.stderr and "rdzvctl restore" not in clear.stderr
        (saved,) = backups.iterdir()
        restore = rdzvctl(["restore", str(saved), "--yes", *target.flags(run_id), "--backup-dir", str(backups)])
        assert restore.returncode == 6
        line = assert_one_line_error(restore.stderr)
        assert line.startswith("rdzvctl: StateCorruptError: ") and str(saved) in line
        assert "kept for forensics" in line and "reset --mode clear" in line and "nothing was written" in line
        assert backend.get_state() is None
        assert read_backup(saved).state == b"\x80\x04not a pickle at all"  # kept, exactly


# -- 8. every run listed, sorted ---------------------------------------------------------------------------
def test_list_and_corrupt_detect_report_every_run_sorted(target: Target) -> None:
    tag = uuid.uuid4().hex[:6]
    ids = [f"ops-list-{tag}-zeta", f"ops-list-{tag}-alpha", f"ops-list-{tag}-team/a", f"ops-list-{tag}-bad"]
    for run_id in ids[:3]:
        with target.open(run_id) as backend:
            put_state(backend, sample_state(round=2))
            if target.backend == "c10d":  # a round's store key is not a run
                backend.store.set(backend.key + b".2/MASTER_ADDR", b"10.0.0.1")
    with target.open(ids[3]) as backend:
        put_unwrappable(target, backend)
    expected = sorted(ids)
    if target.backend == "redis":
        with target.open(ids[0]) as backend:
            client = backend.client
            client.set(f"torch.rendezvous.ops-list-{tag}-string", "x")  # another type
            client.hset(f"torch.rendezvous.ops-list-{tag}-nostate", "version", "3")  # no state field
            client.set(f"{backend.key}.store/torch.rendezvous.{ids[0]}.2/MASTER_ADDR", "10.0.0.1")  # a store key
        expected = sorted(expected + [f"ops-list-{tag}-string", f"ops-list-{tag}-nostate"])
    listed = rdzvctl(["list", "-o", "json", *target.flags(None)])
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [r["run_id"] for r in runs] == sorted(r["run_id"] for r in runs)  # every backend: by run id
    mine = [r for r in runs if r["run_id"].startswith(f"ops-list-{tag}-")]
    assert [r["run_id"] for r in mine] == expected
    by_id = {r["run_id"]: r for r in mine}
    assert by_id[ids[2]]["health"] == "ok" and by_id[ids[2]]["participants"] == 3  # a run id with '/'
    assert by_id[ids[3]]["health"] == "corrupt" and by_id[ids[3]]["error"]
    text = rdzvctl(["list", *target.flags(None)])
    assert "Unreadable runs:" in text.stdout and f"ops-list-{tag}-bad " in text.stdout
    detect = rdzvctl(["corrupt-detect", "--all", "-o", "json", *target.flags(None)])
    assert detect.returncode == 6, detect.stderr
    reports = [r["run_id"] for r in json.loads(detect.stdout)["runs"] if r["run_id"].startswith(f"ops-list-{tag}-")]
    assert reports == expected


# -- 9. set -f keeps torch's invariants ----------------------------------------------------------------------
def test_set_refuses_a_state_breaking_torchs_invariants(target: Target, tmp_path: Path) -> None:
    run_id = _run_id("invariants")
    with target.open(run_id) as backend:
        put_state(backend, sample_state(round=2))
        before = backend.get_state()
        doc = state_to_json(sample_state(round=3, nodes=1))
        (only,) = doc["participants"]
        doc["participants"][only] = 5
        doc["wait_list"] = [only]
        doc["last_heartbeats"] = {}
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(doc))
        args = ["set", "-f", str(path), "--yes", *target.flags(run_id), "--backup-dir", str(tmp_path / "b")]
        refused = rdzvctl(args)
        assert refused.returncode == 2
        line = assert_one_line_error(refused.stderr)
        for part in ("StateValidationError", "rank outside 0..0 (world size 1)", "both participating and waiting",
                     "1 participant(s) without a heartbeat", "--force"):
            assert part in line, line
        assert backend.get_state() == before and not (tmp_path / "b").exists()
        forced = rdzvctl([*args, "--force"])
        assert forced.returncode == 0, forced.stderr
        assert backend.get_state() != before


# -- 10. output details on a real terminal ---------------------------------------------------------------
def on_tty(args: List[str], extra: Dict[str, str]) -> Tuple[int, bytes, str]:
    """stdout on a pseudo-terminal (raw mode), stderr piped."""
    env = cli_env({"TERM": "xterm-256color", **extra})
    if "NO_COLOR" not in extra:
        env.pop("NO_COLOR", None)
    master, slave = os.openpty()
    tty.setraw(slave)
    chunks: List[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "rdzvctl", *args], stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        os.close(slave)
        slave = -1
        _, err = proc.communicate(timeout=60)
        reader.join(10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return proc.returncode, b"".join(chunks), err.decode()


@pytest.fixture()
def dead_run(filestore_target: Target) -> Iterator[Tuple[Target, str]]:
    """A FileStore run with two dead participants: rendering is the same on every backend."""
    run_id = "job-narrow"
    with filestore_target.open(run_id) as backend:
        put_state(backend, sample_state(round=2, nodes=4, dead=2))
    yield filestore_target, run_id


@pytest.mark.parametrize("columns", ["60", "80", "160"])
def test_codes_and_node_ids_never_fold(dead_run: Tuple[Target, str], columns: str) -> None:
    target, run_id = dead_run
    for command in (["get"], ["corrupt-detect"]):
        code, out, err = on_tty([*command, *target.flags(run_id)], {"COLUMNS": columns})
        text = _SGR.sub(b"", out).decode()
        assert code in (0, 1), err
        assert max(len(line) for line in text.splitlines()) <= int(columns)
        assert "dead-participants" in text, text
        for i in range(4) if command == ["get"] else (2, 3):
            assert f"trainer-{i}.cluster.local_410{i}_0" in text, text


def test_no_color_keeps_the_rich_layout(dead_run: Tuple[Target, str]) -> None:
    target, run_id = dead_run
    _, coloured, _ = on_tty(["get", *target.flags(run_id)], {"COLUMNS": "100"})
    _, plain, _ = on_tty(["get", *target.flags(run_id)], {"COLUMNS": "100", "NO_COLOR": "1"})
    assert _COLOUR.search(coloured) and not _COLOUR.search(plain)
    def layout(out: bytes) -> bytes:
        return re.sub(rb"[0-9]", b"0", _SGR.sub(b"", out))  # heartbeat ages move between the runs

    assert layout(coloured) == layout(plain)
    assert "─".encode() in plain  # rich's table rule: the terminal layout, not the piped one


def test_the_liveness_line_is_not_styled_as_an_error(dead_run: Tuple[Target, str]) -> None:
    target, run_id = dead_run
    _, out, _ = on_tty(["get", *target.flags(run_id)], {"COLUMNS": "120"})
    (line,) = [line for line in out.split(b"\n") if b"dead after" in line]
    assert b"liveness" in line and not _COLOUR.search(line), line


def test_get_keys_says_when_there_are_none(target: Target) -> None:
    run_id = _run_id("keys")
    with target.open(run_id) as backend:
        put_state(backend, sample_state(round=1))
        has_keys = "store_keys" in backend.capabilities
    done = rdzvctl(["get", "--keys", *target.flags(run_id)])
    assert done.returncode == 0, done.stderr
    if has_keys:
        assert "no round keys for this run" in done.stdout
    else:
        assert "has no per-round store keys" in done.stderr


def test_watch_for_bounds_until_and_fails_in_one_error_line(target: Target) -> None:
    run_id = _run_id("for")
    with target.open(run_id) as backend:
        state = sample_state(round=1)
        state.complete = False
        put_state(backend, state)
    done = rdzvctl(["watch", *target.flags(run_id), "--until", "complete", "--for", "1", "--timeout", "10"])
    assert done.returncode == 1
    line = assert_one_line_error(done.stderr)
    assert line == "rdzvctl: ConditionNotMetError: the condition 'complete' did not hold within 1s"
    plain = rdzvctl(["watch", "-o", "json", *target.flags(run_id), "--for", "0.5"])
    assert plain.returncode == 0 and [json.loads(x)["kind"] for x in plain.stdout.splitlines()] == ["snapshot"]
