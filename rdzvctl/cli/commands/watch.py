"""rdzvctl watch: follow a run and print semantic events as they happen."""

from __future__ import annotations

import queue
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import click

from rdzvctl.cli.app import App, output_option, with_app
from rdzvctl.errors import ConditionNotMetError, StateError

_UNTIL = re.compile(r"^(complete|closed|absent|round>=(\d+))$")


def parse_until(text: Optional[str]) -> Optional[Callable[[Any, bool], bool]]:
    """``complete|closed|absent|round>=N`` as a predicate over (state, exists)."""
    if text is None:
        return None
    match = _UNTIL.match(text.strip())
    if not match:
        raise click.BadParameter("expected complete, closed, absent or round>=N", param_hint="--until")
    kind = match.group(1)
    if kind == "complete":
        return lambda state, exists: state is not None and state.complete
    if kind == "closed":
        return lambda state, exists: state is not None and state.closed
    if kind == "absent":
        return lambda state, exists: not exists
    target = int(match.group(2))
    return lambda state, exists: state is not None and state.round >= target


@click.command("watch")
@with_app
@output_option("text", "json")
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Polling interval where the backend has no native watch; also how often liveness is checked.")
@click.option("--until", "until", metavar="CONDITION",
              help="Exit 0 once complete, closed, absent or round>=N holds (with --for: exit 1 if it never does).")
@click.option("--for", "duration", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop after SECONDS; with --until exit 1 if the condition did not hold by then. "
                   "(--timeout bounds each backend operation, as everywhere.)")
def command(app: App, output: str, interval: float, until: Optional[str], duration: Optional[float]) -> None:
    """Follow a run live and print what changes, with timestamps.

    Events: node joined/left participants, wait list or redundancy list, rank
    changed, round advanced, completed, closed/reopened, deadline set/cleared,
    heartbeat went stale, state created/removed/corrupt.  Many nodes of one
    kind at once are one event with a count (-o json: "count", and the first
    node ids in "nodes").  A corrupt value is reported and watching goes
    on.  The backend's native watch is used where it has one; otherwise the
    state is polled.

    \b
    Examples:
      rdzvctl watch --rdzv-backend etcd-v3 --rdzv-endpoint 10.0.0.5:2379 --rdzv-id job42
      rdzvctl watch ... --until complete --for 600 -o json   # gate a CI step on a rendezvous
    """
    from rdzvctl.inspect import now_utc
    from rdzvctl.state.analysis import diff_states, stale_transitions
    from rdzvctl.state.codec import decode
    from rdzvctl.state.jsonform import format_time

    predicate = parse_until(until)
    if until is not None and duration is None and app.timeout_given:
        # Before --for existed, --timeout also bounded --until: a CI gate written that way
        # must stay bounded rather than wait forever.
        duration = app.address.timeout
        app.err(f"rdzvctl: warning: --until with --timeout and no --for waits at most {duration:g}s, as before; "
                "write --for SECONDS (--timeout now bounds each backend operation only)")
    deadline = None if duration is None else time.monotonic() + duration
    keep_alive = app.keep_alive
    items: "queue.Queue[Any]" = queue.Queue()
    stop = threading.Event()
    backend = app.open()

    def follow() -> None:
        while not stop.is_set():
            try:
                for item in backend.watch(interval=interval, stop=stop):
                    items.put(("state", item))
                    if stop.is_set():
                        return
                return
            except StateError as exc:
                # The stored value cannot even be unwrapped (bad base64, a key of another
                # type): report it and watch again, so a repair or removal is seen.
                items.put(("corrupt", exc))
                stop.wait(interval)
            except Exception as exc:  # surfaced as one line by the main thread
                items.put(("error", exc))
                return

    def emit(kind: str, message: str, extra: Optional[Dict[str, Any]] = None) -> None:
        event = {"time": format_time(now_utc()), "kind": kind, "message": message, "run_id": backend.run_id}
        if extra:
            event.update(extra)
        if output == "json":
            app.json_line(event)
        else:
            from rdzvctl.cli.render import render_event

            render_event(app, event)

    def emit_all(events: List[Any]) -> None:
        """One line per event; many nodes of one kind at once become one event with a count."""
        from rdzvctl.cli.render import group_events

        for kind, message, fields in group_events(events):
            emit(kind, message, fields or None)

    thread = threading.Thread(target=follow, name="rdzvctl-watch", daemon=True)
    thread.start()
    previous: Any = None
    first = True
    exists = False
    corrupt: Optional[str] = None  # why the stored value is unusable, while it is
    stale: set = set()
    try:
        while True:
            wait = interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                kind, item = items.get(timeout=wait)
            except queue.Empty:
                kind, item = "tick", None
            if kind == "error":
                raise item
            error: Optional[StateError] = item if kind == "corrupt" else None
            state = None
            if kind == "state" and item is not None:
                try:
                    state = decode(item[0])
                except StateError as exc:
                    error = exc
            if error is not None:
                exists = True
                if str(error) != corrupt:
                    emit("state-corrupt", str(error))
                previous, first, corrupt = None, False, str(error)
            elif kind == "state":
                exists = item is not None
                if first:
                    emit("snapshot", _describe_start(state, exists), {"round": None if state is None else state.round})
                elif corrupt is not None and state is None:
                    emit("state-removed", "state removed (it was corrupt)")
                else:
                    emit_all(diff_states(previous, state))
                previous, first, corrupt = state, False, None
            if previous is not None:
                emit_all(stale_transitions(previous, now_utc(), stale, keep_alive))
            if predicate is not None and not first and predicate(previous, exists):
                emit("until-met", f"condition {until!r} holds")
                return
            if deadline is not None and time.monotonic() >= deadline:
                if until is not None:
                    raise ConditionNotMetError(f"the condition {until!r} did not hold within {duration:g}s")
                return
    finally:
        stop.set()
        backend_close = getattr(backend, "close", None)
        if backend_close is not None:
            try:
                backend_close()
            except Exception:  # noqa: BLE001 - closing must not mask the result
                pass


def _describe_start(state: Any, exists: bool) -> str:
    if not exists:
        return "no state yet"
    if state is None:
        return "state present"
    return (f"round {state.round}, {'complete' if state.complete else 'incomplete'}"
            f"{', closed' if state.closed else ''}, {len(state.participants)} participants, "
            f"{len(state.wait_list)} waiting")
