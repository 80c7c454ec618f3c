"""The documented JSON form of a state, with exact round trips and named errors.

A state as JSON (keys always present, in this order)::

    {
      "round": 3,
      "complete": true,
      "deadline": null,                       # or "2026-11-24T22:00:05.123456+00:00"
      "closed": false,
      "participants": {"node-a_4021_0": 0},   # node id -> rank, by rank
      "wait_list": ["node-c_77_0"],           # node ids, sorted
      "redundancy_list": [],
      "last_heartbeats": {"node-a_4021_0": "2026-11-24T21:59:58.000001+00:00"},
      "datetime_style": "aware"               # "naive": written back naive (torch < 2.6)
    }

Node ids are torch's ``addr_pid_localid``; datetimes are ISO-8601 in UTC with
microseconds.  ``get -o json`` wraps this under ``"state"`` together with
read-only fields (liveness, problems, token...); :func:`state_from_document`
accepts that whole document and ignores the read-only parts.
"""

from __future__ import annotations

import datetime as _dt
import json
from operator import attrgetter, itemgetter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union

from rdzvctl.errors import StateValidationError
from rdzvctl.state.model import STATE_FIELDS, NodeDesc, RendezvousState, by_rank, in_node_order, node_order
from rdzvctl.text import excerpt

__all__ = [
    "STATE_KEYS",
    "DOCUMENT_KEYS",
    "state_to_json",
    "state_header",
    "state_from_json",
    "state_from_document",
    "format_time",
    "parse_time",
]

STATE_KEYS = (*STATE_FIELDS, "datetime_style")

#: Top-level keys of ``get -o json``; all but ``state`` are read-only.
DOCUMENT_KEYS = frozenset(
    {
        "schema",
        "backend",
        "endpoint",
        "run_id",
        "token",
        "fetched_at",
        "keep_alive",
        "state",
        "summary",
        "nodes",
        "problems",
        "lifecycle",
        "store_keys",
    }
)


def format_time(value: Optional[_dt.datetime]) -> Optional[str]:
    """ISO-8601 in UTC with microseconds; a naive datetime is taken as UTC (never local time)."""
    if value is None:
        return None
    if value.tzinfo is _UTC:  # every decoded datetime
        # isoformat() writes the microseconds unless they are 0 (a sixth cheaper than asking for them)
        return value.isoformat() if value.microsecond else value.isoformat(timespec="microseconds")
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: Any, field: str) -> _dt.datetime:
    if not isinstance(value, str):
        raise StateValidationError(field, f"expected an ISO-8601 datetime string, got {_json_kind(value)}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise StateValidationError(field, f"not an ISO-8601 datetime: {excerpt(value)}") from None
    if parsed.tzinfo is None:
        raise StateValidationError(field, f"datetime {excerpt(value)} has no UTC offset (write e.g. ...+00:00 or ...Z)")
    try:
        return parsed.astimezone(_dt.timezone.utc)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-23:59 is past the last datetime in UTC
        raise StateValidationError(field, f"datetime {excerpt(value)} is out of range in UTC") from None


_UTC = _dt.timezone.utc


_FIRST, _SECOND, _ID = itemgetter(0), itemgetter(1), attrgetter("id")


def _ids(nodes: Iterable[NodeDesc]) -> List[str]:
    return list(map(_ID, sorted(nodes, key=node_order)))


def state_header(state: RendezvousState) -> Dict[str, Any]:
    """The first fields of :func:`state_to_json`, those that do not list nodes."""
    return {"round": state.round, "complete": state.complete, "deadline": format_time(state.deadline),
            "closed": state.closed}


def state_to_json(state: RendezvousState) -> Dict[str, Any]:
    """The JSON form of ``state`` (plain dicts/lists/str/int/bool/None).

    Built with ``map``/``zip`` over C getters: a Python step per node is most of the cost
    for 65,536 nodes (the heartbeats' ``isoformat`` is the rest).
    """
    ranked = by_rank(state.participants)
    beats = in_node_order(state.last_heartbeats)
    return {
        **state_header(state),
        "participants": dict(zip(map(_ID, map(_FIRST, ranked)), map(_SECOND, ranked))),
        "wait_list": _ids(state.wait_list),
        "redundancy_list": _ids(state.redundancy_list),
        "last_heartbeats": dict(zip(map(_ID, map(_FIRST, beats)), map(format_time, map(_SECOND, beats)))),
        "datetime_style": "naive" if state.naive_datetimes else "aware",
    }


#: The integers torch's states hold (round, rank, pid, local id) fit in 64 bits.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _json_kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _node(value: Any, field: str) -> NodeDesc:
    if not isinstance(value, str):
        raise StateValidationError(field, f"expected a node id string addr_pid_localid, got {_json_kind(value)}")
    try:
        node = NodeDesc.parse(value)
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StateValidationError(field, "the node id is not valid text (it holds a lone surrogate)") from None
    except ValueError as exc:
        raise StateValidationError(field, str(exc)) from None
    if not (_INT_MIN <= node.pid <= _INT_MAX and _INT_MIN <= node.local_id <= _INT_MAX):
        raise StateValidationError(field, "pid and local id must fit in 64 bits, as in torch's states")
    return node


def _bool(doc: Mapping[str, Any], key: str) -> bool:
    value = doc[key]
    if type(value) is not bool:
        raise StateValidationError(key, f"expected true or false, got {_json_kind(value)}")
    return value


def _node_list(doc: Mapping[str, Any], key: str) -> Set[NodeDesc]:
    value = doc[key]
    if not isinstance(value, list):
        raise StateValidationError(key, f"expected an array of node ids, got {_json_kind(value)}")
    nodes = [_node(item, f"{key}[{i}]") for i, item in enumerate(value)]
    if len(set(nodes)) != len(nodes):
        raise StateValidationError(key, "lists a node twice")
    return set(nodes)


def _object(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc[key]
    if not isinstance(value, dict):
        raise StateValidationError(key, f"expected an object keyed by node id, got {_json_kind(value)}")
    return value


def _check_keys(doc: Mapping[str, Any], allowed: Iterable[str], where: str, required: Iterable[str]) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise StateValidationError(name, f"unknown field (known: {', '.join(allowed)})")
    missing = [key for key in required if key not in doc]
    if missing:
        name = f"{where}.{missing[0]}" if where else missing[0]
        raise StateValidationError(name, "missing")


def state_from_json(doc: Any) -> RendezvousState:
    """Validate a JSON state and build it; errors name the offending field."""
    if not isinstance(doc, dict):
        raise StateValidationError("state", f"expected a JSON object, got {_json_kind(doc)}")
    _check_keys(doc, STATE_KEYS, "", [k for k in STATE_KEYS if k != "datetime_style"])
    rnd = doc["round"]
    if type(rnd) is not int or not 0 <= rnd <= _INT_MAX:
        raise StateValidationError("round", f"expected a non-negative integer, got {excerpt(rnd)}")
    deadline = None if doc["deadline"] is None else parse_time(doc["deadline"], "deadline")
    participants: Dict[NodeDesc, int] = {}
    for key, rank in _object(doc, "participants").items():
        node = _node(key, f"participants[{excerpt(key)}]")
        if type(rank) is not int or not 0 <= rank <= _INT_MAX:
            raise StateValidationError(f"participants[{excerpt(key)}]", f"rank must be a non-negative integer, got {excerpt(rank)}")
        participants[node] = rank
    heartbeats = {
        _node(key, f"last_heartbeats[{excerpt(key)}]"): parse_time(when, f"last_heartbeats[{excerpt(key)}]")
        for key, when in _object(doc, "last_heartbeats").items()
    }
    style = doc.get("datetime_style", "aware")
    if style not in ("aware", "naive"):
        raise StateValidationError("datetime_style", f"expected \"aware\" or \"naive\", got {excerpt(style)}")
    return RendezvousState(
        round=rnd,
        complete=_bool(doc, "complete"),
        deadline=deadline,
        closed=_bool(doc, "closed"),
        participants=participants,
        wait_list=_node_list(doc, "wait_list"),
        redundancy_list=_node_list(doc, "redundancy_list"),
        last_heartbeats=heartbeats,
        naive_datetimes=style == "naive",
    )


def state_from_document(doc: Any) -> RendezvousState:
    """Accept either a bare JSON state or the whole ``get -o json`` document."""
    if isinstance(doc, dict) and "state" in doc:
        _check_keys(doc, sorted(DOCUMENT_KEYS), "", ["state"])
        try:
            return state_from_json(doc["state"])
        except StateValidationError as exc:
            raise StateValidationError(f"state.{exc.field}", exc.reason) from None
    return state_from_json(doc)



class JSONDocumentError(ValueError):
    """Text that is not a JSON document: ``str()`` is the parser's reason; ``too_deep`` for nesting."""

    def __init__(self, reason: str, too_deep: bool = False) -> None:
        super().__init__(reason)
        self.too_deep = too_deep


def load_json_document(data: Union[str, bytes]) -> Any:
    """``json.loads``, with every failure (bad JSON, bad UTF-8, nesting past the recursion limit)
    as one :class:`JSONDocumentError` the caller words for its source."""
    try:
        return json.loads(data)
    except RecursionError:
        raise JSONDocumentError("the JSON nests too deeply", too_deep=True) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JSONDocumentError(str(exc)) from None
