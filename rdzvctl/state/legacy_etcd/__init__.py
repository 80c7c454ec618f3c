"""torch's legacy ``etcd`` rendezvous (``etcd_rendezvous.py``): its JSON state, parsed and explained.

No I/O here.  The backend (:mod:`rdzvctl.backends.etcd_legacy`) reads a run
into a :class:`LegacyRun`; :func:`parse_state` decodes the untrusted JSON of
``<prefix>/run_<run_id>/rdzv/active_version`` strictly and boundedly, and
:func:`analyse` says what is wrong and what torch's handler will do next.

The package: :mod:`.parser` (torch's constants, the document, its parser, the
read model), :mod:`.analysis` (findings, leases, torch's next step),
:mod:`.documents` (``get``/``corrupt-detect``/``list``/``--for-launch``
documents) and :mod:`.events` (``watch``'s events); every name is re-exported here.

The life cycle, from torch 2.13's ``EtcdRendezvous`` (function names cited):

* ``setup``    — ``try_create_rendezvous`` wrote ``{"status": "setup"}`` with
  ``prevExist=false`` and TTL 5 s, then bumps ``rdzv/version_counter`` and
  creates the directory ``rdzv/v_<version>``;
* ``joinable`` — ``{"status", "version", "participants": [0, 1, ...]}``;
  ``join_rendezvous`` appends rank ``len(participants)``; at ``min_workers``
  the state gets TTL 10 s, which the last-call holder (rank ``min - 1``,
  ``handle_join_last_call``) refreshes until ``last_call_timeout``;
* ``frozen``   — at ``max_workers`` or after the last call, with
  ``keep_alives: []`` and TTL 10 s; ``confirm_membership`` writes each rank's
  lease key ``rdzv/v_<version>/rank_<r>`` (TTL 10 s, renewed every 5 s) and
  appends it to ``keep_alives``;
* ``final``    — when every participant confirmed; ``num_workers_waiting: 0``,
  no TTL; ``announce_self_waiting`` increments the counter, and
  ``wait_for_rendezvous_to_free`` deletes ``active_version`` (compare on the
  value) when a listed lease key is gone;
* ``closed``   — ``set_closed`` (``shutdown()``) keeps the other fields, no TTL;
  every ``init_phase`` then raises ``RendezvousClosedError``.

The run's directory has TTL 7200 s, renewed by every live handler (at
construction, then every hour).  Every write of torch's is a compare-and-swap
on the previous *value*; rdzvctl's are stricter, on the ``modifiedIndex``.
"""

from __future__ import annotations

from rdzvctl.state.legacy_etcd.analysis import LegacyNode, LegacyReport, analyse, next_version
from rdzvctl.state.legacy_etcd.documents import (
    check_json,
    describe,
    launch_of,
    lifecycle_json,
    list_row,
    phase_of,
)
from rdzvctl.state.legacy_etcd.events import diff_runs
from rdzvctl.state.legacy_etcd.parser import (
    DEFAULT_LAST_CALL_TIMEOUT,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    FROZEN_TTL,
    JOINABLE_TTL,
    KEEPALIVE_TTL,
    MAX_STATE_BYTES,
    RUN_TTL,
    SCHEMA,
    SETUP_TTL,
    STATE_FORMAT,
    STATUSES,
    KeyInfo,
    LegacyRun,
    LegacyState,
    encode_state,
    normalise_prefix,
    parse_state,
    ttl_for,
)

__all__ = [
    "STATE_FORMAT",
    "DEFAULT_PREFIX",
    "STATUSES",
    "MAX_STATE_BYTES",
    "LegacyState",
    "KeyInfo",
    "LegacyRun",
    "LegacyNode",
    "LegacyReport",
    "parse_state",
    "encode_state",
    "ttl_for",
    "normalise_prefix",
    "analyse",
    "describe",
    "diff_runs",
    "phase_of",
    "lifecycle_json",
    "check_json",
    "list_row",
    "launch_of",
    "next_version",
    "SCHEMA",
    "SETUP_TTL",
    "FROZEN_TTL",
    "JOINABLE_TTL",
    "KEEPALIVE_TTL",
    "RUN_TTL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_LAST_CALL_TIMEOUT",
]
