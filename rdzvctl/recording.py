"""``watch --record FILE`` files: a run's history where the backend keeps none (TCPStore).

JSON lines, ASCII only (every other character ``\\u``-escaped).  The first line
is the header::

    {"format": "rdzvctl-history/1", "run_id": "job42", "backend": "c10d",
     "endpoint": "node0:29400", "started": "2026-11-24T22:00:00.000000+00:00"}

then one line per version ``watch`` observed, oldest first::

    {"time": "<ISO, when observed>", "token": "<text>", "state": {<get -o json's "state">}}
    {"time": "...", "removed": true}
    {"time": "...", "token": "<text>", "corrupt": "<why the value is unusable>"}

:func:`read_record` reads one back as :class:`rdzvctl.state.history.Observation`
(``time_source="recorded"``) for :func:`rdzvctl.state.history.replay_observations`.
The file is untrusted: a line over :data:`MAX_LINE` bytes, bad JSON or a bad
state is one :class:`~rdzvctl.errors.UsageError` line naming the line number.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from rdzvctl.errors import RdzvctlError, UsageError
from rdzvctl.state.history import Observation
from rdzvctl.state.jsonform import (
    JSONDocumentError,
    format_time,
    load_json_document,
    parse_time,
    state_from_json,
    state_to_json,
)
from rdzvctl.state.model import RendezvousState
from rdzvctl.text import cut, excerpt, scrub

__all__ = ["FORMAT", "MAX_LINE", "Recorder", "read_record"]

FORMAT = "rdzvctl-history/1"
#: The longest line written or read back.  A line becomes a state of Python objects ~12x its
#: size, two or three of them alive at once, so a longer one (a crafted file of a million
#: nodes) would take gigabytes; 8 MiB is a state of ~50,000 nodes.  ``watch`` records a
#: larger state as a corrupt version saying so.
MAX_LINE = 8 * 1024 * 1024
#: The longest corrupt reason read back.
_REASON_CHARS = 300


def _line(obj: Dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


class Recorder:
    """Appends the versions ``watch`` observes to a new 0600 file (an existing one only with ``force``)."""

    def __init__(self, path: str, *, run_id: str, backend: str, endpoint: str, started: _dt.datetime,
                 force: bool = False, keep: Sequence[str] = ()) -> None:
        from rdzvctl.report import open_private_file

        self.path = path
        self._fd: Optional[int] = open_private_file(path, force, keep)
        self._write({"format": FORMAT, "run_id": run_id, "backend": backend, "endpoint": scrub(endpoint),
                     "started": format_time(started)})

    def version(self, when: _dt.datetime, state: Optional[RendezvousState], token: Optional[str], exists: bool,
                error: Optional[str] = None) -> None:
        """One observed version: a state, a removal (``exists`` False) or a corrupt value (``error``)."""
        if error is not None:
            self._write({"time": format_time(when), "token": token, "corrupt": error})
        elif not exists or state is None:
            self._write({"time": format_time(when), "removed": True})
        else:
            line = _line({"time": format_time(when), "token": token, "state": state_to_json(state)})
            if len(line) > MAX_LINE:
                line = _line({"time": format_time(when), "token": token, "corrupt": (
                    f"the state is too large to record ({len(line):,} bytes as JSON, over the record "
                    f"file's {MAX_LINE:,}-byte line limit)")})
            self._write_line(line)

    def _write(self, obj: Dict[str, Any]) -> None:
        self._write_line(_line(obj))

    def _write_line(self, line: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise UsageError(f"cannot write the record file {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_record(path: str) -> Tuple[Dict[str, Any], Iterator[Observation]]:
    """The header of a ``watch --record`` file and its versions, read lazily (the file stays open until
    the iterator ends).  Raises UsageError (exit 2) with the line number for anything malformed."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the generator)
    except OSError as exc:
        raise UsageError(f"cannot read the record file {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise UsageError(f"the record file {path} is not a regular file")
        first = _read_line(handle, path, 1)
        if not first.strip():
            raise UsageError(f"{path} is not a 'watch --record' file (it has no {FORMAT} header)")
        header = _parse(path, 1, first)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise UsageError(f"{path} is not a 'watch --record' file (its first line is not a {FORMAT} header)")
    except BaseException:
        handle.close()
        raise
    return header, _observations(handle, path)


def _read_line(handle: Any, path: str, number: int) -> bytes:
    line = handle.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise UsageError(f"{path} line {number}: longer than {MAX_LINE:,} bytes")
    return bytes(line)


def _parse(path: str, number: int, line: bytes) -> Any:
    try:
        return load_json_document(line)
    except JSONDocumentError as exc:
        raise UsageError(f"{path} line {number}: not JSON ({excerpt(str(exc))})") from None


def _observations(handle: Any, path: str) -> Iterator[Observation]:
    number = 1
    try:
        while True:
            number += 1
            line = _read_line(handle, path, number)
            if not line:
                return
            if not line.strip():
                continue
            yield _observation(path, number, _parse(path, number, line))
    finally:
        handle.close()


def _observation(path: str, number: int, doc: Any) -> Observation:
    where = f"{path} line {number}"
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a JSON object")
    try:
        when = parse_time(doc.get("time"), "time")
        if doc.get("removed") is True:
            return Observation(None, False, when, "recorded")
        if "corrupt" in doc:
            reason = doc["corrupt"]  # the reason as watch wrote it, cut (not quoted: it is a sentence)
            return Observation(None, True, when, "recorded",
                               error=cut(reason, _REASON_CHARS) if isinstance(reason, str) else excerpt(reason))
        if "state" not in doc:
            raise UsageError(f"{where}: expected \"state\", \"removed\" or \"corrupt\"")
        return Observation(state_from_json(doc["state"]), True, when, "recorded")
    except UsageError as exc:
        if str(exc).startswith(where):
            raise
        raise UsageError(f"{where}: {exc}") from None
    except RdzvctlError as exc:
        raise UsageError(f"{where}: {exc}") from None
