"""The run's history as one SVG picture, for an incident ticket (``history --svg FILE``).

One row per node with a bar while it is a participant, waiting or redundant
(a colour per role), the rounds as bands along the time axis (round number and
participant count, the membership in each band's tooltip), vertical markers
where a round advanced, completed, the run closed or reopened or the state was
created, removed or found corrupt, a UTC time axis, and the run id and time span in the title.

Hand-built with the standard library.  Everything that came from a store (run
id, node addresses) is made visible (:func:`rdzvctl.text.safe`: control and
bidi characters escaped, secrets masked), cut, and XML-escaped; the picture
has no script, no external reference and no ``foreignObject``.

What is drawn is gathered by :class:`rdzvctl.history_spans.Collector`, bounded
whatever the history (its limits are re-exported here); what was left out is
counted and said in the notes.
"""

from __future__ import annotations

import datetime as _dt
from typing import Iterable, List, Optional
from xml.sax.saxutils import escape, quoteattr

from rdzvctl.history_spans import (
    MARKED_KINDS,
    MAX_BANDS,
    MAX_MARKERS,
    MAX_ROWS,
    ROLES,
    SPANS_PER_NODE,
    TOOLTIP_CHARS,
    TRACKED_NODES,
    HistoryEntryLike,
    ordered_nodes,
)
from rdzvctl.history_spans import Collector as _Collector
from rdzvctl.text import cut, safe

__all__ = ["HistoryEntryLike", "render_svg", "draw_svg", "MAX_ROWS", "TRACKED_NODES", "SPANS_PER_NODE", "MAX_MARKERS",
           "MAX_BANDS", "LABEL_CHARS"]

#: Characters of a node label or the run id in the picture (after escaping control characters).
LABEL_CHARS = 40

UTC = _dt.timezone.utc

ROLE_COLOURS = dict(zip(ROLES, ("#2f9e44", "#f08c00", "#868e96")))

#: How each marked event kind is drawn: (colour, dash pattern).
_MARKER_STYLES = {
    "state-created": ("#495057", "2,2"),
    "round-advanced": ("#1c7ed6", "4,3"),
    "round-went-back": ("#f76707", "4,3"),
    "completed": ("#2b8a3e", ""),
    "closed": ("#e03131", ""),
    "reopened": ("#ae3ec9", "6,2"),
    "state-removed": ("#000000", "1,2"),
    "state-corrupt": ("#d9480f", "1,1"),
}
#: Event kinds drawn as markers: (colour, dash pattern, legend text).
MARKERS = {kind: (*_MARKER_STYLES[kind], legend) for kind, legend in MARKED_KINDS.items()}

# Layout (pixels).
_WIDTH = 1200
_LEFT = 300
_RIGHT = 24
_PLOT = _WIDTH - _LEFT - _RIGHT
_BAND_TOP = 60
_BAND_HEIGHT = 22
_ROWS_TOP = _BAND_TOP + _BAND_HEIGHT + 8
_ROW = 16
_BAR = 10
_FONT = "font-family=\"DejaVu Sans Mono,Menlo,Consolas,monospace\""

#: Tick steps of the time axis, in seconds.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
          172800, 604800, 2592000, 7776000, 31536000)


def _label(text: object, limit: int = LABEL_CHARS) -> str:
    """An untrusted string, visible (control characters escaped, secrets masked) and cut to ``limit``."""
    return cut(safe(text), limit)


def _text(x: float, y: float, content: str, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(content)}</text>'


def _tick_label(when: _dt.datetime, step: float) -> str:
    if step >= 86400:
        return when.date().isoformat()
    return when.strftime("%H:%M:%S" if step < 60 else "%H:%M")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _stamp(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, UTC).isoformat(sep=" ", timespec="seconds")[:19] + "Z"


def render_svg(entries: Iterable[HistoryEntryLike], *, run_id: str, title: Optional[str] = None) -> str:
    """The history as an SVG document (text); ``entries`` oldest first, consumed once."""
    collector = _Collector()
    for entry in entries:
        collector.add(entry)
    return draw_svg(collector, run_id=run_id, title=title)


def draw_svg(collector: _Collector, *, run_id: str, title: Optional[str] = None) -> str:
    """The SVG document of what ``collector`` gathered (fed by :func:`render_svg`, or by a caller
    that shows the same entries another way as they come, so one replay serves both)."""
    heading = _label(title, 80) if title else f"rendezvous history of run {_label(run_id)}"
    if collector.first is None or collector.last is None:
        return _document(heading, f"run {_label(run_id)}: no history", [], 120)
    collector.finish()
    first, last = collector.first, collector.last
    span = max(last - first, 1.0)

    def x(t: float) -> float:
        return _LEFT + (t - first) / span * _PLOT

    until = _stamp(last)
    if until[:10] == _stamp(first)[:10]:
        until = until[11:]
    subtitle = (f"run {_label(run_id)} \u00b7 {_stamp(first)} \u2192 {until} "
                f"({_duration(last - first)}, {collector.entries} entr{'ies' if collector.entries != 1 else 'y'})")
    body: List[str] = []
    rows = ordered_nodes(collector)
    bottom = _ROWS_TOP + max(len(rows), 1) * _ROW

    # Round bands along the top, alternating shades; membership in the tooltip.
    body.append('<g class="rounds">')
    for i, band in enumerate(collector.bands):
        left, right = x(band.start), max(x(band.end), x(band.start) + 1.0)
        names = ", ".join(_label(n, TOOLTIP_CHARS // 4) for n in band.sample)
        more = band.participants - len(band.sample)
        tip = (f"round {band.round}: {band.participants} participant{'s' * (band.participants != 1)}"
               f"{' (complete)' if band.complete else ''}{': ' + names if names else ''}"
               f"{f' and {more} more' if more > 0 else ''}")
        shade = "#e7f5ff" if i % 2 == 0 else "#d0ebff"
        body.append(f'<g class="round"><title>{escape(tip)}</title>'
                    f'<rect x="{left:.1f}" y="{_BAND_TOP}" width="{right - left:.1f}" height="{_BAND_HEIGHT}" '
                    f'fill="{shade}" stroke="#74c0fc" stroke-width="0.5"/>')
        label = f"r{band.round} \u00b7 {band.participants}{'' if band.complete else '*'}"
        if right - left >= 7 * len(label):
            body.append(_text(left + 3, _BAND_TOP + 15, label, ' font-size="11"'))
        elif right - left >= 7 * len(str(band.round)) + 4:
            body.append(_text(left + 2, _BAND_TOP + 15, str(band.round), ' font-size="10"'))
        body.append("</g>")
    body.append("</g>")

    # Rows: a label and the node's bars.
    body.append('<g class="nodes">')
    for i, node in enumerate(rows):
        top = _ROWS_TOP + i * _ROW
        track = collector.nodes[node]
        if i % 2:
            body.append(f'<rect x="0" y="{top}" width="{_WIDTH}" height="{_ROW}" fill="#f8f9fa"/>')
        tip = _label(node, TOOLTIP_CHARS) + (" (some short spans merged)" if track.merged else "")
        body.append(f'<g class="node"><title>{escape(tip)}</title>')
        body.append(_text(_LEFT - 6, top + 12, _label(node), ' font-size="11" text-anchor="end"'))
        for start, end, role in track.spans:
            left = x(start)
            width = max(x(end) - left, 1.5)
            body.append(f'<rect x="{left:.1f}" y="{top + (_ROW - _BAR) / 2:.1f}" width="{width:.1f}" '
                        f'height="{_BAR}" fill="{ROLE_COLOURS[ROLES[int(role)]]}"/>')
        body.append("</g>")
    body.append("</g>")

    # Markers over bands and rows.
    body.append('<g class="markers">')
    for when, kind, message in collector.markers:
        colour, dash, _ = MARKERS[kind]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        px = x(when)
        body.append(f'<line class="marker {kind}" x1="{px:.1f}" y1="{_BAND_TOP - 4}" x2="{px:.1f}" y2="{bottom}" '
                    f'stroke="{colour}" stroke-width="1.5"{dashed}><title>{escape(_label(message, TOOLTIP_CHARS))} '
                    f'at {_stamp(when)}</title></line>')
    body.append("</g>")

    # Time axis.
    y = bottom + 6
    body.append(f'<g class="axis"><line x1="{_LEFT}" y1="{y}" x2="{_LEFT + _PLOT}" y2="{y}" stroke="#343a40"/>')
    step = next((s for s in _STEPS if span / s <= 8), _STEPS[-1] * (int(span / _STEPS[-1] / 8) + 1))
    tick = (first // step + 1) * step if first % step else first
    day: Optional[_dt.date] = None
    while tick <= last + 1e-6:
        px = x(tick)
        moment = _dt.datetime.fromtimestamp(tick, UTC)
        body.append(f'<line x1="{px:.1f}" y1="{y}" x2="{px:.1f}" y2="{y + 5}" stroke="#343a40"/>')
        body.append(_text(px, y + 18, _tick_label(moment, step), ' font-size="11" text-anchor="middle"'))
        if step < 86400 and moment.date() != day:  # the date under the first tick of each day
            body.append(_text(px, y + 31, moment.date().isoformat(), ' font-size="10" text-anchor="middle"'))
        day = moment.date()
        tick += step
    body.append(_text(_LEFT + _PLOT, y + 44, "time (UTC)", ' font-size="11" text-anchor="end"'))
    body.append("</g>")

    # Legend and notes.
    y += 64
    body.append('<g class="legend">')
    px = float(_LEFT)
    for role_name, colour in ROLE_COLOURS.items():
        body.append(f'<rect x="{px:.1f}" y="{y - 9}" width="14" height="{_BAR}" fill="{colour}"/>')
        body.append(_text(px + 18, y, role_name, ' font-size="11"'))
        px += 18 + 7 * len(role_name) + 16
    y += 18
    px = float(_LEFT)
    for kind, (colour, dash, meaning) in MARKERS.items():
        count = collector.marker_counts.get(kind, 0)
        if not count:
            continue
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(f'<line x1="{px + 4:.1f}" y1="{y - 11}" x2="{px + 4:.1f}" y2="{y + 2}" stroke="{colour}" '
                    f'stroke-width="1.5"{dashed}/>')
        item = f"{meaning} \u00d7{count}"
        body.append(_text(px + 12, y, item, ' font-size="11"'))
        px += 12 + 7 * len(item) + 16
        if px > _WIDTH - 200:
            px, y = float(_LEFT), y + 18
    body.append("</g>")
    notes = ["round bands: r<round> \u00b7 <participants>, * when the round never completed"]
    more = collector.hidden_count(set(rows))
    if more > 0 or collector.hidden_overflow:
        notes.append(f"and {'more than ' if collector.hidden_overflow else ''}{more} more "
                     f"node{'s' * (more != 1)} not shown")
    if not rows:
        notes.append("no node was a participant, waiting or redundant")
    if collector.band_count > len(collector.bands):
        notes.append(f"only the last {len(collector.bands)} of {collector.band_count} rounds drawn")
    total = sum(collector.marker_counts.values())
    if total > len(collector.markers):
        notes.append(f"only the last {len(collector.markers)} of {total} markers drawn")
    if collector.merged:
        notes.append("some short spans of a node merged into one bar")
    body.append('<g class="notes">')
    for note in notes:
        y += 18
        body.append(_text(12, y, note, ' font-size="11" fill="#495057"'))
    body.append("</g>")
    return _document(heading, subtitle, body, y + 16)


def _document(heading: str, subtitle: str, body: List[str], height: float) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {_WIDTH} {height:.0f}" role="img" aria-label={quoteattr(heading)} {_FONT}>')
    return "\n".join([
        '<?xml version="1.0" encoding="UTF-8"?>',
        head,
        f"<title>{escape(heading)}</title>",
        f'<rect x="0" y="0" width="{_WIDTH}" height="{height:.0f}" fill="#ffffff"/>',
        _text(12, 24, heading, ' font-size="16" font-weight="bold"'),
        _text(12, 44, subtitle, ' font-size="12" fill="#495057"'),
        *body,
        "</svg>",
        "",
    ])
