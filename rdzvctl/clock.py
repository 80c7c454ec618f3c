"""rdzvctl's one clock: every "now" in the product is :func:`now_utc`.

Callers use it as ``clock.now_utc()`` (the module attribute, looked up at
each call), so a test that freezes time patches this one function.
"""

from __future__ import annotations

import datetime as _dt

__all__ = ["now_utc"]


def now_utc() -> _dt.datetime:
    """The current time, timezone-aware (UTC)."""
    return _dt.datetime.now(_dt.timezone.utc)
