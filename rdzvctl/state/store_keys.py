"""torch's per-round store keys, named the one way rdzvctl names them: ``"<round>/<name>"``.

torch's handler writes a round's keys through ``PrefixStore("torch.rendezvous.<run_id>.<round>", store)``
(``DynamicRendezvousHandler._get_store``/``_wrap_store``), so on the wire a key
is ``<prefix>torch.rendezvous.<run_id>.<round>/<name>``.  :func:`round_of_store_key`
reads that wire form; backends' ``store_keys()`` give ``"<round>/<name>"``
(:func:`round_key`), which :func:`split_round_key` reads back.  Pure functions.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

__all__ = ["MAX_ROUND_DIGITS", "round_of_store_key", "store_keys_by_round", "round_key", "split_round_key"]

#: Rounds are counters: a store key whose round has more digits than an int64 is not torch's.
MAX_ROUND_DIGITS = 18


def _round(text: str) -> Optional[int]:
    return int(text) if text.isdigit() and text.isascii() and len(text) <= MAX_ROUND_DIGITS else None


def round_of_store_key(name: bytes, round_prefix: bytes) -> Optional[Tuple[int, bytes]]:
    """``(round, name)`` of a store key ``<round_prefix><round>/<name>``, else None.

    ``round_prefix`` is ``torch.rendezvous.<run_id>.`` (plus any wire prefix):
    torch's ``_wrap_store`` prefix for that run.  Keys of another run never
    match: its id would leave a non-digit (``job.5``: ``5.0/...``) before the ``/``.
    """
    if not name.startswith(round_prefix):
        return None
    round_, sep, rest = name[len(round_prefix):].partition(b"/")
    if not sep or not round_.isdigit() or len(round_) > MAX_ROUND_DIGITS:
        return None  # (a longer "round" is no key torch wrote, and int() would refuse it)
    return int(round_), rest


def store_keys_by_round(keys: Iterable[bytes], round_prefix: bytes) -> List[Tuple[int, bytes, bytes]]:
    """``(round, name, key)`` of each of ``keys`` that is a per-round store key under ``round_prefix``
    (:func:`round_of_store_key`), sorted by round, then name."""
    found = []
    for key in keys:
        parsed = round_of_store_key(key, round_prefix)
        if parsed is not None:
            found.append((parsed[0], parsed[1], key))
    return sorted(found)


def round_key(round_: int, name: str) -> str:
    """The ``"<round>/<name>"`` form of a per-round store key."""
    return f"{round_}/{name}"


def split_round_key(key: str) -> Optional[Tuple[int, str]]:
    """``(round, name)`` of a ``"<round>/<name>"`` key, else None."""
    round_, sep, name = key.partition("/")
    number = _round(round_) if sep else None
    return None if number is None else (number, name)
