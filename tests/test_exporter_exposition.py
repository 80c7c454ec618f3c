"""The exporter's page writer: the same bytes as prometheus_client's encoders, every format and escaping."""

from __future__ import annotations

import datetime as _dt
from functools import partial
from typing import Any, List

import pytest

pytest.importorskip("prometheus_client")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily  # noqa: E402
from prometheus_client.exposition import choose_encoder, generate_latest  # noqa: E402
from prometheus_client.openmetrics import exposition as openmetrics  # noqa: E402

from rdzvctl.monitor.exposition import render, render_as  # noqa: E402
from tests.support.cli import NOW, make_state  # noqa: E402
from tests.test_exporter import HOSTILE, Store  # noqa: E402

ESCAPINGS = [openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8, openmetrics.DOTS, openmetrics.VALUES]
FORMATS = [(om, escaping) for om in (False, True) for escaping in ESCAPINGS]
#: What a scraper may ask for; choose_encoder picks the encoder (and escaping) from it.
ACCEPTS = [
    "",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
]


class Families:
    def __init__(self, metrics: List[Any]) -> None:
        self.metrics = metrics

    def collect(self) -> List[Any]:
        return self.metrics


def encoder(om: bool, escaping: str) -> Any:
    return partial(openmetrics.generate_latest, escaping=escaping) if om else partial(generate_latest,
                                                                                     escaping=escaping)


values = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
label_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    [HOSTILE, "", '"', "\\", "\n", "a\\nb", "ünï.cödé"])


@st.composite
def families(draw: Any) -> List[Any]:
    out: List[Any] = []
    for n in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["gauge", "counter", "info"]))
        name = draw(st.sampled_from(["rdzvctl_round", "rdzvctl_x2", "my.dotted:name", "a_b_c"])) + f"_{n}"
        doc = draw(st.sampled_from(["Help.", 'with "quotes", a \\ and\na newline', "ünïcode"]))
        labels = draw(st.sampled_from([[], ["run_id"], ["backend", "endpoint", "run_id"], ["dotted.label", "z"]]))
        family: Any = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                       "info": InfoMetricFamily}[kind](name, doc, labels=labels)
        shared = None
        for _ in range(draw(st.integers(0, 4))):
            got = [draw(label_values) for _ in labels]
            if kind == "info":
                family.add_metric(got, {"version": draw(label_values)})
            elif shared is not None and draw(st.booleans()):
                # one label dict for several samples, as the collector shares a run's
                family.add_sample(family.samples[-1].name, shared, draw(values))
            else:
                family.add_metric(got, draw(values))
                shared = family.samples[-1].labels
        out.append(family)
    return out


@settings(max_examples=150, deadline=None)
@given(families())
def test_the_same_bytes_as_prometheus_client_for_every_format(metrics: List[Any]) -> None:
    for om, escaping in FORMATS:
        assert render(metrics, om, escaping) == encoder(om, escaping)(Families(metrics)), (om, escaping)


def test_the_exporter_page_is_prometheus_clients_for_every_accept_header() -> None:
    store = Store()
    store.put(HOSTILE, make_state())
    store.put("job.dotted", make_state(alive=2, dead=1, waiting=1))
    store.put("forming", make_state(complete=False, closed=True))
    store.put("bad", b"garbage")
    store.scrape()
    store.now = NOW + _dt.timedelta(seconds=16)  # some heartbeats expire
    metrics = list(store.collector.collect())
    for accept in ACCEPTS:
        chosen, _ = choose_encoder(accept)
        assert render_as(Families(metrics), chosen) == chosen(Families(metrics)), accept


def test_an_unknown_encoder_is_used_as_it_is() -> None:
    metrics = [GaugeMetricFamily("g", "help", value=1.0)]
    assert render_as(Families(metrics), lambda registry: b"theirs") == b"theirs"


@pytest.mark.parametrize("add", [
    lambda f: f.add_metric(["x"], 1.0, timestamp=5.0),
    lambda f: f.add_sample("c_created", {"l": "x"}, 1.0),
])
def test_samples_other_than_plain_ones_are_refused(add: Any) -> None:
    family = CounterMetricFamily("c", "help", labels=["l"])
    add(family)
    with pytest.raises(ValueError, match="only plain samples"):
        render([family])
