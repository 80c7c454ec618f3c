"""torch's legacy etcd JSON: torch's constants, the ``active_version`` document and its strict parser,
and the model of one read of a run (:class:`KeyInfo`, :class:`LegacyRun`).  No I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from rdzvctl.errors import StateCorruptError
from rdzvctl.text import excerpt

STATE_FORMAT = "legacy-etcd-json"
SCHEMA = "rdzvctl.get.legacy-etcd/v1"

DEFAULT_PREFIX = "/torchelastic/p2p"  # create_rdzv_handler's etcd_prefix default
STATUSES = ("setup", "joinable", "frozen", "final", "closed")

# torch 2.13 etcd_rendezvous.py constants.
SETUP_TTL = 5  # CONST_ETCD_SETUP_TTL
FROZEN_TTL = 10  # CONST_ETCD_FROZEN_TTL
JOINABLE_TTL = 10  # CONST_ETCD_JOINABLE_EPHEMERAL_TTL
KEEPALIVE_TTL = 10  # CONST_WORKER_KEEPALIVE_TTL
RUN_TTL = 7200  # CONST_RUNID_SUBROOT_TTL
DEFAULT_TIMEOUT = 600  # _DEFAULT_TIMEOUT
DEFAULT_LAST_CALL_TIMEOUT = 30  # _DEFAULT_LAST_CALL_TIMEOUT

#: etcd refuses requests over 1.5 MiB by default; anything larger is not torch's.
MAX_STATE_BYTES = 4 << 20
MAX_LIST = 1 << 17  # participants / keep_alives entries
MAX_KEY_CHARS = 4096
MAX_INT = (1 << 31) - 1
MAX_VERSION_DIGITS = 18
#: A run lease renewed this recently means a handler was (re)created for the run id.
RECENT_RENEWAL = 300.0

# The fields torch's code reads at each status (KeyError otherwise, retried until the timeout).
_REQUIRED = {
    "setup": (),
    "joinable": ("version", "participants"),
    "frozen": ("version", "participants", "keep_alives"),
    "final": ("version", "participants", "keep_alives", "num_workers_waiting"),
    "closed": (),
}
_KNOWN_FIELDS = ("status", "version", "participants", "keep_alives", "num_workers_waiting")
#: A version as torch writes it: version_counter's decimal value.
DIGITS = re.compile(r"[0-9]{1,%d}\Z" % MAX_VERSION_DIGITS)


# -- the state ------------------------------------------------------------------------
@dataclass(frozen=True)
class LegacyState:
    """The decoded ``active_version`` document; fields absent in the JSON are None."""

    status: str
    version: Optional[str] = None
    participants: Optional[Tuple[int, ...]] = None
    keep_alives: Optional[Tuple[str, ...]] = None
    num_workers_waiting: Optional[int] = None
    unknown_fields: Tuple[str, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        """The document as torch writes it (field order of ``json.dumps(state)``), absent fields left out."""
        doc: Dict[str, Any] = {"status": self.status}
        if self.version is not None:
            doc["version"] = self.version
        if self.participants is not None:
            doc["participants"] = list(self.participants)
        if self.keep_alives is not None:
            doc["keep_alives"] = list(self.keep_alives)
        if self.num_workers_waiting is not None:
            doc["num_workers_waiting"] = self.num_workers_waiting
        return doc


def _corrupt(message: str) -> StateCorruptError:
    return StateCorruptError(f"active_version: {message}")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _corrupt(f"field {excerpt(key)} appears twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _corrupt(f"{name} is not JSON torch writes")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_VERSION_DIGITS:
        raise _corrupt("an integer with more than 18 digits")
    return int(text)


def _int_field(doc: Mapping[str, Any], name: str, *, lowest: int = 0) -> Optional[int]:
    value = doc.get(name)
    if value is None and name not in doc:
        return None
    if type(value) is not int:
        raise _corrupt(f"{name} must be an integer, got {type(value).__name__}")
    if not lowest <= value <= MAX_INT:
        raise _corrupt(f"{name} = {value} is out of range {lowest}..{MAX_INT}")
    return value


def parse_state(raw: bytes) -> LegacyState:
    """Decode ``active_version`` strictly: size cap, UTF-8, JSON without duplicate keys or NaN,
    an object of torch's fields with torch's types, integers in range, ranks ``0..n-1``.

    Raises :class:`StateCorruptError` naming the field; never anything else.
    """
    if len(raw) > MAX_STATE_BYTES:
        raise _corrupt(f"{len(raw)} bytes, over the {MAX_STATE_BYTES >> 20} MiB cap (torch never writes that much)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt("not UTF-8 text (torch writes JSON)") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_int=_bounded_int)
    except StateCorruptError:
        raise
    except RecursionError:
        raise _corrupt("JSON nested too deeply") from None
    except ValueError as exc:
        raise _corrupt(f"not JSON ({str(exc)[:120]}); torch's json.loads fails and its handler retries "
                       "every second until its timeout") from None
    if not isinstance(doc, dict):
        raise _corrupt(f"a JSON {type(doc).__name__}, not an object")
    status = doc.get("status")
    if "status" not in doc:
        raise _corrupt("no status field (torch's init_phase fails with KeyError and retries until its timeout)")
    if not isinstance(status, str) or status not in STATUSES:
        shown = excerpt(status) if isinstance(status, str) else type(status).__name__
        raise _corrupt(f"status {shown} is none of {', '.join(STATUSES)}")
    for name in _REQUIRED[status]:
        if name not in doc:
            raise _corrupt(f"status {status} without the {name} field (torch's handler fails with KeyError)")
    version = doc.get("version")
    if "version" in doc:
        if not isinstance(version, str) or not DIGITS.match(version):
            raise _corrupt("version must be a decimal string, as torch writes version_counter's value")
    participants: Optional[Tuple[int, ...]] = None
    if "participants" in doc:
        items = doc["participants"]
        if not isinstance(items, list) or len(items) > MAX_LIST:
            raise _corrupt("participants must be a list of ranks")
        for position, rank in enumerate(items):
            if type(rank) is not int or rank != position:
                raise _corrupt(f"participants[{position}] is {excerpt(rank)}: torch appends ranks 0, 1, ... in order")
        participants = tuple(items)
    keep_alives: Optional[Tuple[str, ...]] = None
    if "keep_alives" in doc:
        items = doc["keep_alives"]
        if not isinstance(items, list) or len(items) > MAX_LIST:
            raise _corrupt("keep_alives must be a list of etcd keys")
        for position, key in enumerate(items):
            if not isinstance(key, str) or not key.startswith("/") or len(key) > MAX_KEY_CHARS:
                raise _corrupt(f"keep_alives[{position}] is not an etcd key")
        if participants is not None and len(items) > len(participants):
            raise _corrupt(f"{len(items)} keep-alive keys for {len(participants)} participants")
        if len(set(items)) != len(items):
            raise _corrupt("keep_alives lists a key twice")
        keep_alives = tuple(items)
    waiting = _int_field(doc, "num_workers_waiting")
    unknown = tuple(sorted(k for k in doc if k not in _KNOWN_FIELDS))
    return LegacyState(status, version, participants, keep_alives, waiting, unknown)


def encode_state(state: LegacyState) -> bytes:
    """The bytes torch's ``json.dumps(state)`` would store (ASCII, ``", "``/``": "`` separators)."""
    return json.dumps(state.to_json()).encode("ascii")


def ttl_for(state: LegacyState, min_nodes: Optional[int] = None) -> Optional[int]:
    """The TTL torch gives ``active_version`` at this status (None: permanent).

    setup 5 s (``try_create_rendezvous``), frozen 10 s (``join_rendezvous``,
    ``handle_join_last_call``, ``confirm_membership``), joinable 10 s once
    ``min_nodes`` joined (``join_rendezvous``); final and closed have none.
    """
    if state.status == "setup":
        return SETUP_TTL
    if state.status == "frozen":
        return FROZEN_TTL
    if state.status == "joinable" and min_nodes and state.participants is not None \
            and len(state.participants) >= min_nodes:
        return JOINABLE_TTL
    return None


def normalise_prefix(prefix: Optional[str]) -> str:
    """torch's prefix handling: ``EtcdRendezvous.__init__`` appends a ``/`` when missing."""
    prefix = DEFAULT_PREFIX if prefix is None else prefix
    return prefix if prefix.endswith("/") else prefix + "/"



# -- a read of the run ---------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    """One etcd v2 node: its key, remaining TTL (None: permanent) and modifiedIndex."""

    key: str
    ttl: Optional[int] = None
    expiration: Optional[str] = None
    modified_index: int = 0
    value: Optional[str] = None


@dataclass
class LegacyRun:
    """Everything of one run the handler uses, from one read (see the backend's ``read_run``)."""

    prefix: str
    run_id: str
    run_dir: Optional[KeyInfo] = None
    active: Optional[KeyInfo] = None
    raw: Optional[bytes] = None
    counter: Optional[KeyInfo] = None
    versions: Tuple[str, ...] = ()
    #: children of ``rdzv/v_<version of the state>`` by name (``rank_0``, ``kv``, ``extra_data``)
    version_keys: Dict[str, KeyInfo] = field(default_factory=dict)

    @property
    def run_path(self) -> str:
        return f"{self.prefix}run_{self.run_id}"

    @property
    def token(self) -> Optional[int]:
        return None if self.active is None else self.active.modified_index

    def lease_key(self, version: str, rank: int) -> str:
        """The keep-alive key ``confirm_membership`` writes for ``rank``."""
        return f"{self.run_path}/rdzv/v_{version}/rank_{rank}"
