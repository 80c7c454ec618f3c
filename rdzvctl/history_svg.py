"""A picture of a run's history for the ticket (placeholder: the full drawing replaces this module)."""

from __future__ import annotations

from typing import Any, Iterable, Optional
from xml.sax.saxutils import escape

__all__ = ["render_svg"]


def render_svg(entries: Iterable[Any], *, run_id: str, title: Optional[str] = None) -> str:
    """An SVG document of ``entries`` (:class:`rdzvctl.state.history.HistoryEntry`): one mark per entry."""
    count = sum(1 for _ in entries)
    label = escape(title or f"rendezvous history of run {run_id}")
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40" viewBox="0 0 400 40">'
            f'<title>{label}</title><text x="4" y="24">{label}: {count} changes</text></svg>\n')
