"""The conformance cases of ``watch``: what the one watch driver promises on every backend.

``watch`` yields the current state, then the state (``None`` when absent)
each time its token changes: never the same token twice in a row, a ``since``
state is not repeated, a cleared and recreated state is reported, and setting
``stop`` ends the iteration promptly (also while the watch is idle).  The
cases run a real watch in a thread against the backend under test.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, List, Optional, Tuple

from rdzvctl.backends.base import RendezvousBackend, StateAndToken
from rdzvctl.testing.context import CaseContext, Skip

__all__ = ["WATCH_CASES", "WAIT_SECONDS"]

#: How long a case waits for the watch to report a write (generous: a polled watch backs off).
WAIT_SECONDS = 10.0
_END = object()


class _Follower:
    """A watch running in a thread; its items (and any exception) arrive on a queue."""

    def __init__(self, backend: RendezvousBackend, interval: float = 0.05,
                 since: Optional[StateAndToken] = None) -> None:
        self.stop = threading.Event()
        self.items: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(backend, interval, since), daemon=True)
        self._thread.start()

    def _run(self, backend: RendezvousBackend, interval: float, since: Optional[StateAndToken]) -> None:
        try:
            for item in backend.watch(interval=interval, stop=self.stop, since=since):
                self.items.put(item)
        except Exception as exc:  # reported by next()
            self.items.put(exc)
        self.items.put(_END)

    def next(self, ctx: CaseContext, what: str) -> Optional[StateAndToken]:
        try:
            item = self.items.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            raise ctx.failure(f"watch() did not report {what} within {WAIT_SECONDS:g} s") from None
        if isinstance(item, Exception):
            raise ctx.failure(f"watch() raised {type(item).__name__}: {item}")
        ctx.check(item is not _END, f"watch() ended before reporting {what}")
        return item  # type: ignore[no-any-return]

    def __enter__(self) -> "_Follower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish(5.0)

    def finish(self, timeout: float) -> Tuple[bool, List[Any]]:
        """Set ``stop``; whether the thread ended within ``timeout`` s, and the items not yet taken."""
        self.stop.set()
        self._thread.join(timeout)
        rest = []
        while not self.items.empty():
            rest.append(self.items.get_nowait())
        return not self._thread.is_alive(), [item for item in rest if item is not _END]


def _writes_change_the_token(ctx: CaseContext) -> None:
    """Skip when a write keeps the token: a watch cannot see such writes (the set cases fail already)."""
    _, token, _ = ctx.set(b"probe-1", None, ctx.open(f"{ctx.run_id}-probe"))
    result = ctx.opened[-1].set_state(b"probe-2", token)
    if result is None or not result[2] or result[1] == token:
        raise Skip("a write does not change the token, so watch cannot report it (see set_current_token)")


def watch_sees_change(ctx: CaseContext) -> None:
    _, token, _ = ctx.set(b"before")
    with _Follower(ctx.open()) as follower:
        first = follower.next(ctx, "the current state")
        ctx.check(first is not None and first[0] == b"before", "watch() did not start with the current state")
        _, token2, _ = ctx.set(b"after", token)
        item = follower.next(ctx, "a write")
        ctx.check(item == (b"after", token2), f"watch() reported {item!r} after a write, expected the new state")


def watch_reports_each_token_once(ctx: CaseContext) -> None:
    _writes_change_the_token(ctx)
    _, token, _ = ctx.set(b"v0")
    with _Follower(ctx.open()) as follower:
        follower.next(ctx, "the current state")
        written = []
        for i in range(1, 4):
            _, token, _ = ctx.set(b"v%d" % i, token)
            written.append(token)
        seen: List[object] = []
        while not seen or seen[-1] != written[-1]:
            item = follower.next(ctx, "the last of three writes")
            ctx.check(item is not None, "watch() reported an absent state while only writes happened")
            seen.append(item[1])  # type: ignore[index]
        repeats = [a for a, b in zip(seen, seen[1:]) if a == b]
        ctx.check(not repeats, f"watch() reported the same token twice in a row: {repeats[:1]!r}")
        ctx.check(set(seen) <= set(written), "watch() reported a token that no write produced")


def watch_since_skips_the_known_state(ctx: CaseContext) -> None:
    _writes_change_the_token(ctx)
    known = ctx.set(b"known")[:2]
    with _Follower(ctx.open(), since=known) as follower:
        _, token, _ = ctx.set(b"next", known[1])
        item = follower.next(ctx, "a write after the since state")
        ctx.check(item == (b"next", token), f"watch(since=...) first reported {item!r}, not the next state")


def watch_reports_clear_and_recreate(ctx: CaseContext) -> None:
    _writes_change_the_token(ctx)
    _, token, _ = ctx.set(b"a")
    with _Follower(ctx.open()) as follower:
        follower.next(ctx, "the current state")
        if "clear" in ctx.backend.capabilities:
            ctx.check(ctx.backend.clear(token), "clear() with the current token failed")
            ctx.check(follower.next(ctx, "the clear") is None, "watch() did not report the cleared state as None")
            _, token, _ = ctx.set(b"b")
        else:  # without clear, a replacing write stands in for the recreate
            _, token, _ = ctx.set(b"b", token)
        item = follower.next(ctx, "the recreated state")
        ctx.check(item == (b"b", token), f"watch() reported {item!r}, not the recreated state")


def watch_stops_promptly(ctx: CaseContext) -> None:
    follower = _Follower(ctx.open(), interval=0.2)
    first = follower.next(ctx, "the current state (None)")
    ctx.check(first is None, f"watch() of a run without state started with {first!r}")
    threading.Event().wait(1.0)  # idle: a polled watch backs off, a pushed one blocks on the server
    ended, rest = follower.finish(3.0)
    ctx.check(ended, "watch() did not end within 3 s of stop being set")
    ctx.check(not [item for item in rest if isinstance(item, Exception)], f"watch() raised on stop: {rest[:1]!r}")


WATCH_CASES = [
    ("watch", "watch yields the current state, then each change", watch_sees_change),
    ("watch_each_token_once", "watch reports each token at most once in a row, only written ones",
     watch_reports_each_token_once),
    ("watch_since", "watch(since=state) does not repeat the known state", watch_since_skips_the_known_state),
    ("watch_clear_recreate", "watch reports a cleared state as None, then the recreated one",
     watch_reports_clear_and_recreate),
    ("watch_stop", "watch ends promptly when stop is set, also while idle", watch_stops_promptly),
]
