"""The ``/metrics`` page: prometheus_client's text formats, with each run's labels written once.

``prometheus_client``'s encoders (``generate_latest`` for the text format 0.0.4,
``openmetrics.exposition.generate_latest`` for OpenMetrics) format every sample
from scratch: they sort its label dict, check and escape every label name and
value, then format the line.  A page of 10,000 runs has ~150,000 samples that
share one label dict per run, so that was 60 % of a scrape's CPU.  :func:`render`
writes the same bytes, and formats a label dict once however many samples
share it.

What comes from ``prometheus_client`` itself: each family's ``# HELP``/``# TYPE``
(/``# UNIT``) lines (its encoder run on the family without samples), every
metric and label name as the format and escaping scheme spell it (its escape
functions, once per distinct name), every value (``floatToGoString``).  What is
written here, as its encoders write it (0.26): ``k="v"`` pairs sorted by name,
joined by commas, a value escaped by backslash, newline and double quote (the
same in both formats), the line's braces, and OpenMetrics' ``# EOF``.
``tests/test_exporter_exposition.py`` compares the bytes with the encoders'
for both formats, every escaping scheme and hostile label values.

Only plain samples are rendered (no timestamp, exemplar, native histogram,
and none of the ``_created``/``_gsum``/``_gcount`` samples the text format
moves after their family): the exporter's families have nothing else, and
anything else is a ``ValueError``, not a different page.  With a prometheus_client
without the escaping schemes (older than 0.26 was checked), the page is its encoders' (``WRITTEN_HERE``).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from prometheus_client import exposition as _text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as _om
from prometheus_client.utils import floatToGoString

try:  # the escaping schemes of recent prometheus_client; with an older one, its encoders write the page
    from prometheus_client.openmetrics.exposition import (  # noqa: F401 - all needed below
        ALLOWUTF8,
        UNDERSCORES,
        _escape,
        _is_legacy_labelname_rune,
        escape_label_name,
        escape_metric_name,
    )
    from prometheus_client.validation import _is_valid_legacy_metric_name
except ImportError:  # pragma: no cover - the tests pin a version that has them
    WRITTEN_HERE = False
else:
    WRITTEN_HERE = True

__all__ = ["render", "render_as"]

Encoder = Callable[[Any], bytes]
_MOVED = ("_created", "_gsum", "_gcount")  # the text format puts these after their family


class _Families:
    """A registry of given families (what the encoders iterate)."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def _encoding(encoder: Encoder) -> Optional[Tuple[bool, str]]:
    """(OpenMetrics?, escaping) of an encoder ``choose_encoder`` returns; None for another one."""
    func, keywords = getattr(encoder, "func", encoder), getattr(encoder, "keywords", {})
    if func is _text.generate_latest:
        return False, keywords.get("escaping", UNDERSCORES)
    if func is _om.generate_latest:
        return True, keywords.get("escaping", UNDERSCORES)
    return None


def render_as(registry: Any, encoder: Encoder) -> bytes:
    """``encoder(registry)``, the same bytes, for the encoders of the two text formats."""
    how = _encoding(encoder) if WRITTEN_HERE else None
    if how is None:
        return encoder(registry)
    return render(registry.collect(), *how)


def render(metrics: Iterable[Metric], openmetrics: bool = False, escaping: str = "underscores") -> bytes:
    """The page of ``metrics`` in the text format (or OpenMetrics), as prometheus_client writes it."""
    encoder = _om.generate_latest if openmetrics else _text.generate_latest
    out: List[str] = []
    append = out.append
    # id(labels) -> (labels, 'k="v",...'): the dict is kept, so its id is not reused during the page.
    label_texts: Dict[int, Tuple[Dict[str, str], str]] = {}
    label_names: Dict[str, str] = {}
    sample_names: Dict[str, Tuple[bool, str]] = {}  # name -> (inside the braces?, as spelled)
    # An int's text, once per int (0, 1, counts): floatToGoString(float(n)), a function of n alone.
    # Floats are written each time (0.0 and -0.0 are equal keys with two texts).
    ints: Dict[int, str] = {}
    for metric in metrics:
        empty = copy.copy(metric)
        empty.samples = []
        header = encoder(_Families([empty]), escaping=escaping).decode("utf-8")
        append(header[:-len("# EOF\n")] if openmetrics else header)
        moved = () if openmetrics else tuple(metric.name + suffix for suffix in _MOVED)
        for sample in metric.samples:
            name, labels, value, timestamp, exemplar, native = sample
            if timestamp is not None or exemplar is not None or native is not None or value is None \
                    or name in moved:
                raise ValueError(f"{name}: only plain samples are rendered (no timestamp, exemplar, "
                                 "histogram, created or missing value)")
            spelled = sample_names.get(name)
            if spelled is None:
                spelled = sample_names[name] = _spell(name, openmetrics, escaping)
            text = ""
            if labels:
                known = label_texts.get(id(labels))
                if known is None or known[0] is not labels:
                    known = label_texts[id(labels)] = (labels, _labels(labels, escaping, label_names))
                text = known[1]
            braced, spelling = spelled
            if braced:
                line = f"{{{spelling},{text}}} " if text else f"{{{spelling}}} "
            else:
                line = f"{spelling}{{{text}}} " if text else f"{spelling} "
            if type(value) is int:
                number = ints.get(value)
                if number is None:
                    number = ints[value] = floatToGoString(value)
            else:
                number = floatToGoString(value)
            append(f"{line}{number}\n")
    if openmetrics:
        append("# EOF\n")
    return "".join(out).encode("utf-8")


def _spell(name: str, openmetrics: bool, escaping: str) -> Tuple[bool, str]:
    """How the encoder writes a sample's name: inside the braces (a UTF-8 name), or before them."""
    inside = escaping == ALLOWUTF8 and not _is_valid_legacy_metric_name(name)
    if inside or not openmetrics:
        return inside, escape_metric_name(name, escaping)
    return False, _escape(name, escaping, _is_legacy_labelname_rune)


def _labels(labels: Dict[str, str], escaping: str, names: Dict[str, str]) -> str:
    parts = []
    for key, value in sorted(labels.items()):
        spelled = names.get(key)
        if spelled is None:
            spelled = names[key] = escape_label_name(key, escaping)
        # Label values are escaped the same way in every format and scheme (ALLOWUTF8's rule).
        parts.append(f'{spelled}="{_escape(value, ALLOWUTF8, _is_legacy_labelname_rune)}"')
    return ",".join(parts)
