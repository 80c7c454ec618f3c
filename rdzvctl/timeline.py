"""A run's history from its backend or a ``watch --record`` file, as events: what ``history`` and ``report`` show.

The pure work is :mod:`rdzvctl.state.history`; this module picks the source
(:meth:`rdzvctl.backends.base.RendezvousBackend.history`, or
:func:`rdzvctl.recording.read_record`), and bounds what is kept (``last``: a
ring of the newest events).  No printing.
"""

from __future__ import annotations

import collections
import datetime as _dt
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from rdzvctl.backends.base import RendezvousBackend
from rdzvctl.state.history import (
    DEFAULT_STORM,
    HistoryEntry,
    StormSettings,
    replay,
    replay_observations,
    timeline,
)

__all__ = ["Source", "from_backend", "from_record", "events_of", "handing_on", "last_events", "parse_since",
           "SINCE_HELP", "REPORT_EVENTS"]

#: How many of the newest events ``report`` shows.
REPORT_EVENTS = 20

SINCE_HELP = "expected a duration such as 90s, 10m, 2h or 1d, or an ISO time such as 2026-11-24T22:00:00Z"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Source(NamedTuple):
    """Where a history comes from: the run id, a lazy replay, what the source says is missing, and where it is."""

    run_id: str
    entries: Iterator[HistoryEntry]
    notice: Optional[str]
    where: str = ""


def from_backend(backend: RendezvousBackend) -> Source:
    """The backend's history replayed (UnsupportedOperationError, exit 2, where it keeps none)."""
    window = backend.history()
    return Source(backend.run_id, replay(window.versions), window.notice, backend.describe())


def from_record(path: str) -> Source:
    """A ``watch --record`` file replayed (UsageError, exit 2, on a bad file)."""
    from rdzvctl.recording import read_record

    header, observations = read_record(path)
    run_id = header.get("run_id")
    return Source(run_id if isinstance(run_id, str) else "", replay_observations(observations), None,
                  f"the record file {path}")


def handing_on(source: Source, add: Callable[[HistoryEntry], None], since: Optional[_dt.datetime]) -> Source:
    """``source`` whose entries, as they are replayed, are also handed to ``add`` (those at or after
    ``since``): ``history --svg`` draws the very versions it printed, from one replay."""
    def entries() -> Iterator[HistoryEntry]:
        for entry in source.entries:
            if since is None or (entry.time is not None and entry.time >= since):
                add(entry)
            yield entry

    return source._replace(entries=entries())


def events_of(source: Source, *, storm: Optional[StormSettings] = DEFAULT_STORM,
              since: Optional[_dt.datetime] = None, last: Optional[int] = None,
              require: bool = False) -> Iterator[Dict[str, Any]]:
    """The source's events oldest first; with ``last`` only the newest ``last`` (kept in a ring, then yielded).

    With ``require``, a source holding no version of the run raises NoStateError (exit 5) once replayed.
    """
    entries = _required(source) if require else source.entries
    events = timeline(entries, source.run_id, storm=storm, since=since)
    if last is None:
        return events
    return iter(collections.deque(events, maxlen=max(0, min(last, sys.maxsize))))  # --limit 10**30: all


def _required(source: Source) -> Iterator[HistoryEntry]:
    from rdzvctl.errors import NoStateError

    empty = True
    for entry in source.entries:
        empty = False
        yield entry
    if empty:
        raise NoStateError(f"no history for run {source.run_id!r} in {source.where}: the state was never "
                           "written (or the versions kept hold none)")


def last_events(backend: RendezvousBackend, count: int = REPORT_EVENTS) -> Tuple[Optional[List[Dict[str, Any]]], str]:
    """The newest ``count`` events of the backend's history for ``report``, or (None, why not).

    Never raises: a report must not fail because history did (a bug included: it becomes the note).
    """
    from rdzvctl.errors import RdzvctlError, UnsupportedOperationError

    try:  # a backend without the capability says why in its history() (the base class's message)
        source = from_backend(backend)
        events = list(events_of(source, last=count))
    except UnsupportedOperationError as exc:
        return None, str(exc)
    except RdzvctlError as exc:
        return None, f"the history could not be read: {exc}"
    except Exception as exc:  # noqa: BLE001 - a report is written during an incident: a bug here must not stop it
        return None, f"the history could not be read (internal error: {type(exc).__name__}: {exc})"
    note = "" if source.notice is None else source.notice
    return events, note


def parse_since(text: str, now: _dt.datetime) -> _dt.datetime:
    """``--since``: a duration back from ``now`` (``90s``, ``10m``, ``2h``, ``1d``) or an ISO time with its UTC offset."""
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
        if seconds > 100 * 365 * 86400:
            raise ValueError(SINCE_HELP)
        return now - _dt.timedelta(seconds=seconds)
    from rdzvctl.errors import StateValidationError
    from rdzvctl.state.jsonform import parse_time

    try:
        return parse_time(text, "--since")
    except StateValidationError:
        raise ValueError(SINCE_HELP) from None
