"""The c10d backend over torch's FileStore, with torch 2.13 as the peer on the same file."""

from __future__ import annotations

import base64
import fcntl
import os
import subprocess
import sys
import time
import uuid

import pytest

from rdzvctl.backends.base import Address
from rdzvctl.backends.c10d import NULL_SENTINEL, C10dBackend
from rdzvctl.backends.filestore import FileStore
from rdzvctl.backends.filestore_log import parse_records
from rdzvctl.errors import BackendConfigError, BackendTimeoutError, BackendUnavailableError, StateCorruptError
from rdzvctl.testing.conformance import BackendConformanceTests, run_conformance
from tests.support.torch_peer import (
    torch_filestore,
)

pytestmark = pytest.mark.torch
TIMEOUT = 5.0


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def backend(path: str, run_id: str = "", timeout: float = TIMEOUT) -> C10dBackend:
    return C10dBackend.from_address(
        Address("c10d", path, run_id or new_run_id(), {"store_type": "file"}, timeout)
    )


def torch_backend(store, run_id: str):
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    return C10dRendezvousBackend(store, run_id)


def records(path: str):
    with open(path, "rb") as f:
        return parse_records(f.read())[0]


# -- the conformance kit on a file torch has open ------------------------------------------------
class TestConformance(BackendConformanceTests):
    @pytest.fixture(autouse=True)
    def _file(self, filestore_path):
        self.path = filestore_path

    def make_backend(self, run_id):
        return backend(self.path, run_id)

    def corrupt_state(self, b: C10dBackend) -> None:
        FileStore(self.path).set(b.key, b"%%% not base64 %%%")


def test_no_aba_is_a_declared_limitation(filestore_path):
    [result] = run_conformance(lambda run_id: backend(filestore_path, run_id), only=["no_aba"])
    assert result.outcome == "limitation", result.detail


# -- the file format and torch's bookkeeping ------------------------------------------------------
def test_we_append_torchs_record_format(filestore_path):
    b = backend(filestore_path)
    _, token, _ = b.set_state(b"\x00state\xff")
    assert (b.key, token) == records(filestore_path)[-1]
    assert torch_filestore(filestore_path).get(f"torch.rendezvous.{b.run_id}") == token


def test_the_file_only_grows_and_bookkeeping_is_untouched(filestore_path):
    with open(filestore_path, "rb") as f:
        before = f.read()
    bookkeeping = [r for r in records(filestore_path) if r[0] in (b"refcount/", b"cleanup/")]
    b = backend(filestore_path)
    _, token, _ = b.set_state(b"x")
    b.set_state(b"y", token)
    b.set_state(b"z", b"stale")
    b.clear(b.get_state()[1])
    list(b.list_runs())
    with open(filestore_path, "rb") as f:
        after = f.read()
    assert after.startswith(before)
    assert [r for r in records(filestore_path) if r[0] in (b"refcount/", b"cleanup/")] == bookkeeping
    assert all(key == b.key for key, _ in parse_records(after[len(before):])[0])


def test_reading_a_missing_run_appends_nothing(filestore_path):
    size = os.path.getsize(filestore_path)
    b = backend(filestore_path)
    assert b.get_state() is None
    assert b.store_keys() == {}
    assert os.path.getsize(filestore_path) == size
    assert torch_filestore(filestore_path).check([f"torch.rendezvous.{b.run_id}"]) is False


def test_a_missing_file_is_no_state_and_is_never_created(tmp_path):
    path = str(tmp_path / "gone")
    b = backend(path)
    assert b.get_state() is None
    assert list(b.list_runs()) == []
    with pytest.raises(BackendUnavailableError, match="does not exist"):
        b.set_state(b"x")
    assert not os.path.exists(path)


def test_create_builds_a_store_torch_can_read(tmp_path):
    path = str(tmp_path / "new")
    FileStore(path, create=True).compare_set(b"/torch.rendezvous.demo", b"", b"eA==")
    assert torch_backend(torch_filestore(path), "demo").get_state() == (b"x", b"eA==")


def test_bookkeeping_keys_are_never_written(filestore_path):
    store = FileStore(filestore_path)
    for key in (b"refcount/", b"cleanup/", b"-/k"):
        with pytest.raises(BackendConfigError):
            store.set(key, b"1")


def test_torchs_deletes_and_later_appends_are_seen(filestore_path):
    theirs = torch_filestore(filestore_path)
    store = FileStore(filestore_path)
    theirs.set("k", "1")
    assert store.get(b"/k") == b"1"
    theirs.delete_key("k")
    assert store.get(b"/k") is None
    theirs.set("k", "2")
    assert store.get(b"/k") == b"2"


def test_a_replaced_file_is_replayed_from_scratch(tmp_path):
    path = str(tmp_path / "store")
    first = torch_filestore(path)
    first.set("k", "old value")
    store = FileStore(path)
    assert store.get(b"/k") == b"old value"
    os.unlink(path)
    second = torch_filestore(path)
    second.set("other", "x" * 200)
    assert store.get(b"/k") is None
    assert store.get(b"/other") == b"x" * 200
    del first, second


def test_our_reads_do_not_keep_torch_from_deleting_its_file(tmp_path):
    import torch.distributed as dist

    path = str(tmp_path / "store")
    theirs = dist.FileStore(path, 1)  # deleted when its last user closes it
    theirs.set("k", "v")
    assert FileStore(path).get(b"/k") == b"v"
    del theirs
    assert not os.path.exists(path)


def test_a_held_lock_times_out_within_the_timeout(filestore_path):
    b = backend(filestore_path, timeout=0.5)
    fd = os.open(filestore_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(BackendTimeoutError, match="locked"):
            b.get_state()
        assert time.monotonic() - start < 1.5
    finally:
        os.close(fd)
    assert b.get_state() is None


def test_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(BackendConfigError):
        backend(str(tmp_path)).set_state(b"x")


def test_non_base64_value_is_corrupt_and_names_the_run(filestore_path):
    b = backend(filestore_path)
    torch_filestore(filestore_path).set(f"torch.rendezvous.{b.run_id}", "not base64!")
    with pytest.raises(StateCorruptError, match=b.run_id):
        b.get_state()
    # a listing says the same (not a pickle error from decoding the raw bytes), and keeps the raw
    # value as its token so a fenced clear can still remove it
    entry = next(e for e in b.list_runs() if e.run_id == b.run_id)
    assert isinstance(entry.error, StateCorruptError) and "not base64" in str(entry.error)
    assert entry.state == (b"not base64!", b"not base64!")
    assert b.clear(entry.state[1]) and b.get_state() is None


# -- cross-writes with torch's C10dRendezvousBackend over FileStore ----------------------------------
def test_torch_writes_we_read_the_same_bytes_and_token(filestore_path):
    run_id = new_run_id()
    _, token, _ = torch_backend(torch_filestore(filestore_path), run_id).set_state(b"\x80\x04torch")
    assert backend(filestore_path, run_id).get_state() == (b"\x80\x04torch", token)


def test_we_write_with_torchs_token_and_torch_reads_it(filestore_path):
    run_id = new_run_id()
    theirs = torch_backend(torch_filestore(filestore_path), run_id)
    _, torch_token, _ = theirs.set_state(b"v1")
    _, token, has_set = backend(filestore_path, run_id).set_state(b"v2", torch_token)
    assert has_set
    assert theirs.get_state() == (b"v2", token)


def test_torchs_stale_token_is_refused_by_our_write(filestore_path):
    run_id = new_run_id()
    theirs = torch_backend(torch_filestore(filestore_path), run_id)
    _, stale, _ = theirs.set_state(b"v1")
    _, current, _ = theirs.set_state(b"v2", stale)
    assert backend(filestore_path, run_id).set_state(b"v3", stale) == (b"v2", current, False)


def test_our_stale_token_is_refused_by_torchs_write(filestore_path):
    ours = backend(filestore_path)
    _, stale, _ = ours.set_state(b"v1")
    _, current, _ = ours.set_state(b"v2", stale)
    theirs = torch_backend(torch_filestore(filestore_path), ours.run_id)
    assert theirs.set_state(b"v3", stale) == (b"v2", current, False)


def test_clear_writes_the_sentinel_torch_reads_as_no_state(filestore_path):
    b = backend(filestore_path)
    _, token, _ = b.set_state(b"x")
    assert b.clear(token) is True
    assert torch_filestore(filestore_path).get(f"torch.rendezvous.{b.run_id}") == NULL_SENTINEL
    assert torch_backend(torch_filestore(filestore_path), b.run_id).get_state() is None


def test_list_runs_and_store_keys(filestore_path):
    theirs = torch_filestore(filestore_path)
    run_id = new_run_id()
    _, token, _ = torch_backend(theirs, run_id).set_state(b"listed")
    theirs.set(f"torch.rendezvous.{run_id}.1/MASTER_ADDR", "node0")
    b = backend(filestore_path, run_id)
    assert {e.run_id: e.state for e in b.list_runs()} == {run_id: (b"listed", token)}
    assert b.store_keys() == {"1/MASTER_ADDR": b"node0"}


def test_list_runs_reads_values_in_byte_bounded_batches(filestore_path, monkeypatch):
    """Values are read a few MiB at a time (here 100 bytes); one larger value comes alone, none is lost."""
    import rdzvctl.backends.c10d as module

    monkeypatch.setattr(module, "_FILE_BATCH_BYTES", 100)
    store = FileStore(filestore_path)
    asked = []
    real = FileStore.multi_get

    def multi_get(self, keys):
        asked.append(len(keys))
        return real(self, keys)

    monkeypatch.setattr(FileStore, "multi_get", multi_get)
    states = {f"run-{i:02d}": (b"x" * (500 if i == 7 else 10)) for i in range(20)}
    for run_id, state in states.items():
        store.set(f"/torch.rendezvous.{run_id}", base64.b64encode(state))
    entries = list(backend(filestore_path).list_runs())
    assert [e.run_id for e in entries] == sorted(states)
    assert {e.run_id: e.state[0] for e in entries} == states
    assert 1 in asked and max(asked) < len(states) and sum(asked) == len(states)


_TORCH_INCREMENTER = r"""
import sys
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
backend = C10dRendezvousBackend(dist.FileStore(sys.argv[1]), sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
done = 0
while done < int(sys.argv[3]):
    state, token = backend.get_state()
    count = int(state.split(b":")[0])
    if backend.set_state(b"%d:torch" % (count + 1), token)[2]:
        done += 1
"""


def test_racing_torch_and_us_on_one_file_lose_no_update(filestore_path):
    # Each writer tags its value: with the value as the token, two writers
    # writing equal bytes could not tell who won (the declared no-ABA limitation).
    run_id, each = new_run_id(), 150
    ours = backend(filestore_path, run_id)
    ours.set_state(b"0:start")
    proc = subprocess.Popen([sys.executable, "-c", _TORCH_INCREMENTER, filestore_path, run_id, str(each)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        done = 0
        while done < each:
            state, token = ours.get_state()
            count = int(state.split(b":")[0])
            if ours.set_state(b"%d:ours" % (count + 1), token)[2]:
                done += 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ours.get_state()[0].split(b":")[0] == b"%d" % (2 * each)


def test_a_torn_record_is_reported_and_nothing_is_appended(tmp_path):
    path = str(tmp_path / "store")
    FileStore(path, create=True).set(b"/k", b"v")
    with open(path, "ab") as f:
        f.write(b"\x05\x00\x00\x00/tor")  # a record cut short
    size = os.path.getsize(path)
    b = backend(path)
    with pytest.raises(StateCorruptError, match="incomplete record"):
        b.get_state()
    with pytest.raises(StateCorruptError):
        b.set_state(b"x")
    assert os.path.getsize(path) == size


def test_replay_in_small_chunks_matches_torch(filestore_path, monkeypatch):
    import rdzvctl.backends.filestore as filestore

    theirs = torch_filestore(filestore_path)
    for i in range(50):
        theirs.set(f"k{i % 7}", f"value-{i}" * (i % 5))
    theirs.delete_key("k3")
    monkeypatch.setattr(filestore, "_CHUNK", 29)  # records straddle every chunk boundary
    ours = FileStore(filestore_path)
    wire = [f"/k{i}" for i in range(7)]
    expected = [theirs.get(k[1:]) if theirs.check([k[1:]]) else None for k in wire]
    assert ours.multi_get(wire) == expected
    assert expected[3] is None


def test_keys_longer_than_a_chunk_and_later_appends_match_torch(filestore_path, monkeypatch):
    import rdzvctl.backends.filestore as filestore

    theirs = torch_filestore(filestore_path)
    long_key = "k" * 100
    theirs.set(long_key, "first")
    theirs.set("big", "v" * 1000)
    monkeypatch.setattr(filestore, "_CHUNK", 29)  # a header, and a value, longer than a chunk
    ours = FileStore(filestore_path)
    assert ours.multi_get(["/" + long_key, "/big"]) == [b"first", b"v" * 1000]
    theirs.set(long_key, "second")  # read incrementally: the latest record wins
    theirs.delete_key("big")
    assert ours.multi_get(["/" + long_key, "/big"]) == [b"second", None]
    assert ours.compare_set("/" + long_key, b"second", b"third") == b"third"
    assert theirs.get(long_key) == b"third"


# -- history: the log replayed -------------------------------------------------------------------
def test_history_replays_every_value_torch_wrote_in_order(filestore_path, monkeypatch):
    import rdzvctl.backends.filestore as filestore

    theirs = torch_filestore(filestore_path)
    b = backend(filestore_path)
    run_key = b.key.decode()[1:]
    theirs.set(run_key, NULL_SENTINEL)  # torch's constructor: no state yet
    written = []
    for i in range(5):
        value = b.set_state(f"state-{i}".encode(), None if i == 0 else written[-1][1])
        assert value is not None and value[2]
        written.append(value)
        theirs.set("other", "x" * (i * 40))  # other keys are counted, not returned
    theirs.delete_key(run_key)
    monkeypatch.setattr(filestore, "_CHUNK", 37)  # records and values straddle chunks
    versions = list(b.history().versions)
    assert [v.value for v in versions] == [None] + [f"state-{i}".encode() for i in range(5)] + [None]
    assert all(v.written_at is None for v in versions)
    revisions = [v.revision for v in versions]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert "history" in b.capabilities


def test_history_of_a_torn_log_is_corrupt(tmp_path):
    path = str(tmp_path / "store")
    store = FileStore(path, create=True)
    store.set(b"/torch.rendezvous.job", b"eA==")
    with open(path, "ab") as f:
        f.write(b"\x05\x00\x00\x00/abc")
    b = backend(path, "job")
    with pytest.raises(StateCorruptError):
        list(b.history().versions)


def test_history_of_a_missing_file_is_empty_and_tcpstore_has_none(tmp_path):
    from rdzvctl.errors import UnsupportedOperationError

    assert list(backend(str(tmp_path / "absent"), "job").history().versions) == []
    assert not (tmp_path / "absent").exists()
    tcp = C10dBackend.from_address(Address("c10d", "127.0.0.1:1", "job", {}, TIMEOUT))
    assert "history" not in tcp.capabilities
    with pytest.raises(UnsupportedOperationError, match="watch --record"):
        tcp.history()


def test_history_reads_under_torchs_lock_and_never_holds_it(filestore_path):
    b = backend(filestore_path)
    b.set_state(b"one")
    versions = b.history().versions
    assert next(versions).value == b"one"
    fd = os.open(filestore_path, os.O_RDWR)
    try:  # between chunks the lock is free: torch can append
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert list(versions) == []


def test_history_of_a_long_log_streams_in_bounded_memory(tmp_path, monkeypatch):
    import datetime as _dt
    import tracemalloc

    import rdzvctl.backends.filestore as filestore
    from rdzvctl.backends.filestore_log import encode_record
    from rdzvctl.state.codec import encode, encode_base64
    from rdzvctl.state.history import replay
    from rdzvctl.state.model import NodeDesc, RendezvousState

    path = str(tmp_path / "store")
    nodes = [NodeDesc(f"trainer-{i}.cluster.local", 4000 + i, 0) for i in range(64)]
    states = [encode_base64(encode(RendezvousState(round=1, participants={n: 0 for n in nodes}, last_heartbeats={
        n: _dt.datetime(2026, 1, 1, 0, 0, k, tzinfo=_dt.timezone.utc) for n in nodes}))) for k in range(2)]
    with open(path, "wb") as f:
        for i in range(800):
            f.write(encode_record(b"/torch.rendezvous.job", states[i % 2]))
    monkeypatch.setattr(filestore, "_CHUNK", 16 << 10)
    assert os.path.getsize(path) > 4 * (512 << 10)
    tracemalloc.start()
    try:
        entries = list(replay(backend(path, "job").history().versions))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(entries) == 1 and entries[0].collapsed == 799
    assert peak < 512 << 10  # a chunk and a version or two, never the log


def test_history_says_the_real_size_of_a_value_too_large_to_read(tmp_path, monkeypatch):
    # Only the start of a huge value is read; the event must give the value's size, not the cut's
    # (a 1 GiB record was "the state is 22,369,625 bytes").
    import struct

    import rdzvctl.backends.filestore as filestore
    from rdzvctl.state.history import replay

    path = str(tmp_path / "store")
    key = b"/torch.rendezvous.job"
    huge = 32 << 20
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(key)) + key + struct.pack("<I", huge))
        f.seek(huge, os.SEEK_CUR)  # sparse: no 32 MiB written
        f.write(filestore.encode_record(key, b"x" * 100))  # and in one chunk with others
    monkeypatch.setattr(filestore, "_CHUNK", 1 << 20)
    versions = list(backend(path, "job").history().versions)
    assert versions[0].value is None and f"{huge:,} bytes" in versions[0].error
    assert versions[1].error is None
    entries = list(replay(iter(versions)))
    assert [e.kind for e in entries[0].events] == ["state-corrupt"]
    assert f"{huge:,} bytes" in entries[0].events[0].message


def test_history_names_a_value_that_is_not_base64_as_get_does(tmp_path):
    """A version torch could never have written: history says what get says of it ("not base64"),
    not the codec's "not a valid pickle" of the raw bytes, and the states around it read on."""
    from rdzvctl.state.codec import encode, encode_base64
    from rdzvctl.state.history import replay
    from rdzvctl.state.model import RendezvousState

    path = str(tmp_path / "store")
    store = FileStore(path, create=True)
    b = backend(path, "job")
    good = encode(RendezvousState(round=1))
    for value in (encode_base64(good), b"%%% not base64 %%%", encode_base64(good)):
        store.set(b"/torch.rendezvous.job", value)
    versions = list(b.history().versions)
    assert versions[1].value is None and "is not base64" in (versions[1].error or "")
    kinds = [e.kind for entry in replay(versions) for e in entry.events]
    assert kinds[:2] == ["state-created", "state-corrupt"] and "state-created" in kinds[2:]
    corrupt = next(e for entry in replay(versions) for e in entry.events if e.kind == "state-corrupt")
    assert "not base64" in corrupt.message and "pickle" not in corrupt.message
