"""``doctor``'s verdict line (:class:`Check`) and the helpers every check module shares.  No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

__all__ = ["Check", "STATUSES", "worst", "ms", "show"]

STATUSES = ("ok", "warn", "fail")
_SHOW = 5


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str
    status: str
    message: str
    fix: str = ""
    data: Dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> Dict[str, Any]:
        doc: Dict[str, Any] = {"name": self.name, "status": self.status, "message": self.message, "fix": self.fix}
        if self.data:
            doc["data"] = self.data
        return doc


def worst(checks: Sequence[Check]) -> str:
    return max((c.status for c in checks), key=STATUSES.index, default="ok")


def ms(seconds: Optional[float]) -> str:
    """A duration for a check line (``-``: not measured)."""
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def show(items: Sequence[str]) -> str:
    """The first few items, and how many more there are."""
    return ", ".join(items[:_SHOW]) + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")
