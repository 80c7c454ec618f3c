"""The backend conformance kit.

It proves that a backend obeys torch's ``RendezvousBackend`` contract (every
case of torch's own backend test mixin) and rdzvctl's stricter one: binary
safety, large states, racing writers, no ABA, and the optional capabilities.

Two ways to run it:

* from pytest, subclass :class:`BackendConformanceTests` and implement
  ``make_backend(run_id)`` (and ``corrupt_state(backend)`` if you can)::

      class TestMyBackend(BackendConformanceTests):
          def make_backend(self, run_id):
              return MyBackend(Address("my", "127.0.0.1:1234", run_id))

* from code (``rdzvctl conformance`` does this), call :func:`run_conformance`,
  which returns one :class:`CaseResult` per case.

A backend that declares ``strict_fencing = False`` (torch's c10d design uses
the value itself as the token) gets the outcome ``limitation`` for the no-ABA
case: the kit checks that the limitation is real and reports it, never
skipping silently.
"""

from __future__ import annotations

import itertools
import os
import threading
import traceback
import warnings
from typing import List, Optional, Union

from rdzvctl.backends.base import RendezvousBackend, SetResult
from rdzvctl.errors import StateError, UnsupportedOperationError
from rdzvctl.state.store_keys import split_round_key
from rdzvctl.testing.context import (
    BackendFactory,
    CaseContext,
    CaseResult,
    ConformanceFailure,
    ConformanceLimitation,
    Corrupter,
    Limitation,
    Skip,
    StoreWriter,
)
from rdzvctl.testing.watch_cases import WATCH_CASES

__all__ = [
    "CaseResult",
    "ConformanceFailure",
    "ConformanceLimitation",
    "StoreWriter",
    "CASES",
    "run_conformance",
    "BackendConformanceTests",
]

# -- torch's RendezvousBackendTestMixin, case for case -------------------------
def get_returns_none_when_absent(ctx: CaseContext) -> None:
    ctx.check(ctx.backend.get_state() is None, "get_state() on a new run did not return None")


def get_returns_state_and_token(ctx: CaseContext) -> None:
    ctx.backend.set_state(b"x")
    state, token = ctx.get(after="a write")
    ctx.check(state == b"x", f"get_state() returned {state!r}, expected b'x'")
    ctx.check(token is not None, "get_state() returned a None token")


def get_raises_on_corrupt_state(ctx: CaseContext) -> None:
    if ctx.corrupter is None:
        raise Skip("no way to corrupt the stored state was given")
    ctx.corrupter(ctx.backend)
    try:
        ctx.backend.get_state()
    except StateError:
        return
    raise ConformanceFailure("get_state() on a corrupt stored state did not raise StateError")


def set_creates_when_absent(ctx: CaseContext) -> None:
    state, token, has_set = ctx.set(b"x")
    ctx.check(has_set is True, "set_state(b'x') with no token on a new run did not set")
    ctx.check(state == b"x", f"set_state returned {state!r}, expected b'x'")
    ctx.check(token is not None, "set_state returned a None token")


def set_replaces_with_current_token(ctx: CaseContext) -> None:
    _, token1, has_set1 = ctx.set(b"x")
    state2, token2, has_set2 = ctx.set(b"y", token1)
    ctx.check(has_set1 and has_set2, "a write with the current token did not set")
    ctx.check(state2 == b"y", f"set_state returned {state2!r}, expected b'y'")
    ctx.check(token1 != token2, "the token did not change after a successful write")


def set_refuses_old_token(ctx: CaseContext) -> None:
    _, token1, _ = ctx.set(b"x")
    state2, token2, _ = ctx.set(b"y", token1)
    state3, token3, has_set = ctx.set(b"z", token1)
    ctx.check(has_set is False, "a write with an old token was accepted")
    ctx.check((state3, token3) == (state2, token2), "a refused write did not return the current state and token")
    ctx.check(ctx.backend.get_state() == (state2, token2), "a refused write changed the stored state")


def set_refuses_no_token_when_present(ctx: CaseContext) -> None:
    state1, token1, _ = ctx.set(b"x")
    state2, token2, has_set = ctx.set(b"y")
    ctx.check(has_set is False, "a write with no token over an existing state was accepted")
    ctx.check((state2, token2) == (state1, token1), "the refused write did not return the current state")


def set_refuses_invalid_token(ctx: CaseContext) -> None:
    state1, token1, _ = ctx.set(b"x")
    for bad in ("invalid", b"invalid", 10**12, -1, 1.5, object(), ("x",)):
        state2, token2, has_set = ctx.set(b"y", bad)
        ctx.check(has_set is False, f"a write with the invalid token {bad!r} was accepted")
        ctx.check((state2, token2) == (state1, token1), f"the invalid token {bad!r} did not return the current state")


# -- rdzvctl's stricter contract ------------------------------------------------
def set_with_token_on_absent_state_writes_nothing(ctx: CaseContext) -> None:
    _, token, _ = ctx.set(b"x")
    other = ctx.open(ctx.run_id + "-other")
    other.set_state(b"y", token)
    ctx.check(other.get_state() is None, "a token from another run created a state")


def binary_safe(ctx: CaseContext) -> None:
    if getattr(ctx.backend, "text_values", False):
        return _text_safe(ctx)
    payload = bytes(range(256)) * 4
    _, token, _ = ctx.set(payload)
    state, _ = ctx.get(after="writing the 256 byte values")
    ctx.check(state == payload, "the 256 byte values did not round-trip")
    big = os.urandom(1 << 20) + b"\x00\xff"
    _, _, has_set = ctx.set(big, token)
    ctx.check(has_set, "a 1 MiB state was not written")
    state, _ = ctx.get(after="writing a 1 MiB state")
    ctx.check(state == big, "a 1 MiB state did not round-trip")


def _text_safe(ctx: CaseContext) -> None:
    """The variant for a backend whose values are text (``text_values = True``, e.g. torch's legacy etcd
    JSON): every printable ASCII character, non-ASCII UTF-8 and a 1 MiB value round-trip; other bytes are
    refused unwritten (a StateError), never mangled."""
    payload = (bytes(range(32, 127)) * 4 + "é€😀".encode("utf-8"))
    _, token, _ = ctx.set(payload)
    state, _ = ctx.get(after="writing printable and UTF-8 text")
    ctx.check(state == payload, "the printable and UTF-8 characters did not round-trip")
    try:
        ctx.backend.set_state(b"\xff\xfe", token)
    except StateError:
        pass
    ctx.check(ctx.backend.get_state() == (payload, token), "bytes that are not text changed the stored value")
    big = b"x" * (1 << 20)
    _, _, has_set = ctx.set(big, token)
    ctx.check(has_set, "a 1 MiB value was not written")
    state, _ = ctx.get(after="writing a 1 MiB value")
    ctx.check(state == big, "a 1 MiB value did not round-trip")
    raise Limitation(f"the {ctx.backend.name} backend stores text (torch's JSON), not bytes: printable, UTF-8 "
                      "and 1 MiB values round-trip; other bytes are refused unwritten")


def racing_writers_one_wins(ctx: CaseContext) -> None:
    _, token, _ = ctx.set(b"start")
    racers = [ctx.open() for _ in range(ctx.racers)]
    barrier = threading.Barrier(len(racers))
    results: List[Union[None, SetResult, Exception]] = [None] * len(racers)

    def race(i: int) -> None:
        barrier.wait()
        try:
            results[i] = racers[i].set_state(f"racer-{i}".encode(), token)
        except Exception as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    ctx.check(not errors, f"racing writers raised: {errors[:1]!r}")
    winners = [i for i, r in enumerate(results) if r is not None and not isinstance(r, Exception) and r[2]]
    ctx.check(len(winners) == 1, f"{len(winners)} of {len(racers)} racing writers won, expected exactly 1")
    final = ctx.backend.get_state()
    ctx.check(final is not None and final[0] == f"racer-{winners[0]}".encode(), "the stored state is not the winner's")


def token_changes_on_equal_bytes(ctx: CaseContext) -> None:
    _, token1, _ = ctx.set(b"same")
    _, token2, has_set = ctx.set(b"same", token1)
    ctx.check(has_set, "rewriting the same bytes with the current token did not set")
    if ctx.backend.strict_fencing:
        ctx.check(token1 != token2, "the token did not change on a write of equal bytes (ABA)")
        return
    if token1 == token2:
        raise Limitation(
            f"the {ctx.backend.name} backend uses the value as its token: rewriting equal "
            "bytes keeps the token, so a writer cannot detect an A-B-A change"
        )
    raise ConformanceFailure("the backend declares strict_fencing=False but behaved strictly; declare it True")


def clear_is_fenced(ctx: CaseContext) -> None:
    if "clear" not in ctx.backend.capabilities:
        raise Skip("the backend does not declare the clear capability")
    _, token1, _ = ctx.set(b"x")
    _, token2, _ = ctx.set(b"y", token1)
    ctx.check(ctx.backend.clear(token1) is False, "clear() with an old token removed the state")
    ctx.check(ctx.backend.get_state() is not None, "clear() with an old token removed the state")
    ctx.check(ctx.backend.clear(token2) is True, "clear() with the current token did not remove the state")
    ctx.check(ctx.backend.get_state() is None, "get_state() after clear() did not return None")
    _, _, has_set = ctx.set(b"z")
    ctx.check(has_set, "a tokenless write after clear() did not create the state")


def list_runs_finds_run(ctx: CaseContext) -> None:
    if "list_runs" not in ctx.backend.capabilities:
        raise Skip("the backend does not declare the list_runs capability")
    _, token, _ = ctx.set(b"listed")
    try:
        runs = {entry.run_id: entry.state for entry in ctx.backend.list_runs()}
    except UnsupportedOperationError as exc:
        raise Skip(str(exc)) from None
    ctx.check(ctx.run_id in runs, f"list_runs() did not include run {ctx.run_id!r}")
    ctx.check(runs[ctx.run_id] == (b"listed", token), "list_runs() returned a different state or token than get_state()")


def store_rounds_of_the_run(ctx: CaseContext) -> None:
    if "store_keys" not in ctx.backend.capabilities:
        raise Skip("the backend does not declare the store_keys capability")
    try:
        empty = ctx.backend.store_rounds()
    except UnsupportedOperationError as exc:
        raise Skip(str(exc)) from None
    ctx.check(empty == frozenset(), f"store_rounds() of a new run is {sorted(empty)}, expected none")
    ctx.check(ctx.backend.store_keys() == {}, "store_keys() of a new run is not empty")
    if ctx.store_writer is None:
        return  # nothing more can be checked without torch's handler store
    written = {"0/MASTER_ADDR": b"10.0.0.1", "3/MASTER_PORT": b"29500", "11/torchelastic/role_info/0": b"\x00\xff"}
    for name, value in written.items():
        round_, key = split_round_key(name) or (0, name)
        ctx.store_writer(ctx.backend, round_, key, value)
    # Runs whose ids extend this one's must not count: "<id>.5" (a dot) and "<id>1".
    dotted, longer = ctx.open(ctx.run_id + ".5"), ctx.open(ctx.run_id + "1")
    ctx.store_writer(dotted, 2, "MASTER_ADDR", b"other")
    ctx.store_writer(longer, 4, "MASTER_ADDR", b"other")
    rounds = ctx.backend.store_rounds()
    ctx.check(rounds == frozenset({0, 3, 11}), f"store_rounds() is {sorted(rounds)}, expected [0, 3, 11]")
    keys = ctx.backend.store_keys()
    ctx.check(keys == written, f"store_keys() is {sorted(keys)}, expected {sorted(written)}")
    ctx.check(list(keys) == list(written), "store_keys() is not sorted by round then name")
    ctx.check(dotted.store_rounds() == frozenset({2}), "store_rounds() of run '<id>.5' is not [2]")
    ctx.check(longer.store_rounds() == frozenset({4}), "store_rounds() of run '<id>1' is not [4]")


def history_of_the_run(ctx: CaseContext) -> None:
    if "history" not in ctx.backend.capabilities:
        raise Skip("the backend does not declare the history capability")
    _, token, _ = ctx.set(b"first")
    _, token, _ = ctx.set(b"second", token)
    cleared = "clear" in ctx.backend.capabilities
    if cleared:
        ctx.check(ctx.backend.clear(token) is True, "clear() with the current token did not remove the state")
    window = ctx.backend.history()
    ctx.check(window.notice is None or (isinstance(window.notice, str) and "\n" not in window.notice),
              f"history() gave a notice that is not one line: {window.notice!r}")
    versions = list(itertools.islice(window.versions, 10_000))
    revisions = [v.revision for v in versions if v.revision is not None]
    ctx.check(all(a < b for a, b in zip(revisions, revisions[1:])), f"history() revisions do not increase: {revisions}")
    ctx.check(all(v.written_at is None or v.written_at.utcoffset() is not None for v in versions),
              "history() gave a naive written_at (must be aware UTC)")
    values = [v.value for v in versions]
    ctx.check(b"first" in values and b"second" in values[values.index(b"first"):],
              "history() does not hold the run's two writes in order")
    if cleared:
        ctx.check(values[-1] is None, f"history() does not end with the clear (a None value): {values[-1:]!r}")


CASES = [
    ("get_none_when_absent", "get_state returns None when no state exists", get_returns_none_when_absent),
    ("get_state_and_token", "get_state returns the state and a non-None token", get_returns_state_and_token),
    ("get_corrupt_raises", "get_state raises StateError on a corrupt stored state", get_raises_on_corrupt_state),
    ("set_creates", "set_state with no token creates the state", set_creates_when_absent),
    ("set_current_token", "set_state with the current token replaces it, new token", set_replaces_with_current_token),
    ("set_old_token", "set_state with an old token writes nothing, returns current", set_refuses_old_token),
    ("set_no_token_existing", "set_state with no token over a state writes nothing", set_refuses_no_token_when_present),
    ("set_invalid_token", "set_state with invalid tokens writes nothing", set_refuses_invalid_token),
    ("set_token_absent_state", "a token on a run with no state creates nothing", set_with_token_on_absent_state_writes_nothing),
    ("binary_safe", "all 256 byte values and a 1 MiB state round-trip", binary_safe),
    ("racing_writers", "N writers racing with one token: exactly one wins", racing_writers_one_wins),
    ("no_aba", "the token changes on every write, even of equal bytes", token_changes_on_equal_bytes),
    ("clear_fenced", "clear removes only with the current token", clear_is_fenced),
    ("list_runs", "list_runs finds the run with its state and token", list_runs_finds_run),
    ("store_rounds", "store_rounds/store_keys list the run's per-round store keys, no other run's",
     store_rounds_of_the_run),
    ("history", "history holds the run's writes (and its clear) in order, oldest first", history_of_the_run),
    *WATCH_CASES,
]


def _run_case(func, factory: BackendFactory, corrupter: Optional[Corrupter], racers: int,
              store_writer: Optional[StoreWriter] = None) -> CaseResult:
    name, description = next((n, d) for n, d, f in CASES if f is func)
    ctx: Optional[CaseContext] = None
    try:
        ctx = CaseContext(factory, corrupter, racers, store_writer)  # a factory that raises fails the case, not the run
        func(ctx)
        return CaseResult(name, description, "pass")
    except Limitation as exc:
        return CaseResult(name, description, "limitation", str(exc))
    except Skip as exc:
        return CaseResult(name, description, "skip", str(exc))
    except ConformanceFailure as exc:
        return CaseResult(name, description, "fail", str(exc))
    except Exception as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return CaseResult(name, description, "fail", f"raised {last}")
    finally:
        if ctx is not None:
            ctx.close()


def run_conformance(
    factory: BackendFactory,
    corrupter: Optional[Corrupter] = None,
    racers: int = 8,
    only: Optional[List[str]] = None,
    store_writer: Optional[StoreWriter] = None,
) -> List[CaseResult]:
    """Run every case (or those named in ``only``) and return the results in order.

    ``store_writer`` (optional) writes per-round store keys as torch's handler
    does; without it the store_rounds case checks only an empty run."""
    return [
        _run_case(func, factory, corrupter, racers, store_writer)
        for name, _, func in CASES
        if only is None or name in only
    ]


class BackendConformanceTests:
    """pytest mixin: one ``test_<case>`` per case.  Implement ``make_backend``.

    Override ``corrupt_state(backend)`` to store something ``get_state`` must
    refuse; without it the corrupt-state case is skipped with a reason.
    Override ``write_store_key(backend, round, name, value)`` to write a
    per-round store key as torch's handler does; without it the store_rounds
    case checks only that a new run has none.
    """

    racers = 8

    def make_backend(self, run_id: str) -> RendezvousBackend:  # pragma: no cover - abstract
        raise NotImplementedError

    corrupt_state: Optional[Corrupter] = None
    write_store_key: Optional[StoreWriter] = None

    def _check_case(self, name: str) -> None:
        func = next(f for n, _, f in CASES if n == name)
        corrupter = self.corrupt_state
        result = _run_case(func, self.make_backend, corrupter, self.racers, self.write_store_key)
        if result.outcome == "fail":
            raise ConformanceFailure(f"{name}: {result.detail}")
        if result.outcome == "limitation":
            warnings.warn(ConformanceLimitation(result.detail), stacklevel=2)
        if result.outcome == "skip":
            import pytest

            pytest.skip(result.detail)


def _make_test(name: str):
    def test(self: BackendConformanceTests) -> None:
        self._check_case(name)

    test.__name__ = f"test_{name}"
    test.__doc__ = next(d for n, d, _ in CASES if n == name)
    return test


for _case in CASES:
    setattr(BackendConformanceTests, f"test_{_case[0]}", _make_test(_case[0]))
