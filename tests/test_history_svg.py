"""history --svg: the picture parses, shows the rows and markers of the run, escapes hostile names, stays bounded."""

from __future__ import annotations

import datetime as _dt
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from rdzvctl.history_svg import (
    LABEL_CHARS,
    MAX_MARKERS,
    MAX_ROWS,
    SPANS_PER_NODE,
    TRACKED_NODES,
    _Collector,
    render_svg,
)
from rdzvctl.state.analysis import Event, diff_states
from rdzvctl.state.model import NodeDesc, RendezvousState

UTC = _dt.timezone.utc
T0 = _dt.datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
NS = "{http://www.w3.org/2000/svg}"
#: What a 200,000-entry history may weigh as a picture.
SIZE_BOUND = 2_000_000


@dataclass(frozen=True)
class Entry:
    """The shape of ``rdzvctl.state.history.HistoryEntry`` the picture reads."""

    time: Optional[_dt.datetime]
    state: Optional[RendezvousState]
    events: List[Event] = field(default_factory=list)


def state(round: int, participants: Sequence[NodeDesc] = (), waiting: Sequence[NodeDesc] = (),
          complete: bool = False, closed: bool = False) -> RendezvousState:
    """A state the way torch builds it: ranks by node order, a heartbeat for everyone."""
    ranks = {node: rank for rank, node in enumerate(sorted(participants))}
    beats = {node: T0 for node in (*participants, *waiting)}
    return RendezvousState(round=round, complete=complete, closed=closed, participants=ranks,
                           wait_list=set(waiting), last_heartbeats=beats)


def history(states: Iterable[Optional[RendezvousState]], step: float = 10.0) -> Iterator[Entry]:
    """Entries step seconds apart, each with the events that lead to it from the one before."""
    previous: Optional[RendezvousState] = None
    for i, current in enumerate(states):
        yield Entry(T0 + _dt.timedelta(seconds=i * step), current, diff_states(previous, current))
        previous = current


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def rows(root: ET.Element) -> List[Tuple[str, int]]:
    """(node label, number of bars) per row, top to bottom."""
    out = []
    for group in root.iter(f"{NS}g"):
        if group.get("class") == "node":
            label = group.find(f"{NS}text")
            assert label is not None
            out.append((label.text or "", len(group.findall(f"{NS}rect"))))
    return out


def markers(root: ET.Element) -> List[str]:
    return [line.get("class", "").split()[1] for line in root.iter(f"{NS}line")
            if line.get("class", "").startswith("marker ")]


def texts(root: ET.Element) -> List[str]:
    return ["".join(element.itertext()) for element in root.iter(f"{NS}text")]


A, B, C, D = (NodeDesc(f"node-{i}", 100 + i, 0) for i in range(4))

#: Joins, a complete round, a node waiting, a node leaving (a new round), the scale-up round, close.
RUN = [
    state(0, [A]),
    state(0, [A, B]),
    state(0, [A, B], complete=True),
    state(0, [A, B], [C], complete=True),
    state(1),
    state(1, [A, C]),
    state(1, [A, C], complete=True),
    state(1, [A, C], [D], complete=True),
    state(2),
    state(2, [A, C, D], complete=True),
    state(2, [A, C, D], complete=True, closed=True),
]


def test_a_run_shows_one_row_per_node_the_last_participants_first():
    root = parse(render_svg(history(RUN), run_id="job42"))
    assert [label for label, _ in rows(root)] == [str(A), str(C), str(D), str(B)]
    bars = dict(rows(root))
    assert bars[str(A)] == 3  # one bar per round: torch's new round empties the participants
    assert bars[str(B)] == 1  # B left after round 0
    assert bars[str(C)] == 3  # waiting, participant in round 1, participant in round 2


def test_bars_are_coloured_by_role_with_a_legend():
    root = parse(render_svg(history(RUN), run_id="job42"))
    (c_row,) = [g for g in root.iter(f"{NS}g") if g.get("class") == "node" and g.findtext(f"{NS}title") == str(C)]
    fills = [rect.get("fill") for rect in c_row.findall(f"{NS}rect")]
    assert fills[0] != fills[1] == fills[2]  # waiting first, then participant twice
    legend = [t for t in texts(root) if t in ("participant", "waiting", "redundant")]
    assert legend == ["participant", "waiting", "redundant"]


def test_markers_where_rounds_advanced_completed_and_the_run_closed():
    root = parse(render_svg(history(RUN), run_id="job42"))
    assert markers(root) == ["state-created", "completed", "round-advanced", "completed", "round-advanced",
                             "completed", "closed"]
    assert "round advanced \u00d72" in texts(root) and "closed \u00d71" in texts(root)


def test_reopened_and_removed_are_marked_and_removal_ends_every_bar():
    run = [state(0, [A], complete=True), state(0, [A], complete=True, closed=True),
           state(0, [A], complete=True), None]
    root = parse(render_svg(history(run), run_id="job42"))
    assert markers(root)[-2:] == ["reopened", "state-removed"]
    assert rows(root) == [(str(A), 1)]


def test_a_corrupt_version_is_marked_and_a_first_entry_without_time_is_skipped():
    entries = [Entry(None, None, [Event("state-corrupt", "not a pickle")]),
               Entry(T0, state(0, [A]), [Event("state-created", "state created (round 0)")]),
               Entry(T0 + _dt.timedelta(seconds=5), None, [Event("state-corrupt", "truncated pickle")])]
    root = parse(render_svg(entries, run_id="job42"))
    assert markers(root) == ["state-created", "state-corrupt"]
    assert rows(root) == [(str(A), 1)]


def test_rounds_are_bands_along_the_time_axis_with_their_membership():
    root = parse(render_svg(history(RUN), run_id="job42"))
    bands = [g for g in root.iter(f"{NS}g") if g.get("class") == "round"]
    assert [g.findtext(f"{NS}text") for g in bands] == ["r0 \u00b7 2", "r1 \u00b7 2", "r2 \u00b7 3"]
    assert bands[1].findtext(f"{NS}title") == f"round 1: 2 participants (complete): {A}, {C}"


def test_title_names_the_run_and_the_time_span_in_utc():
    root = parse(render_svg(history(RUN), run_id="job42"))
    lines = texts(root)
    assert lines[0] == "rendezvous history of run job42"
    assert lines[1].startswith("run job42 \u00b7 2026-12-01 18:00:00Z \u2192 18:01:40Z (100 s, 11 entries)")
    assert "18:00:00" in lines and "18:01:00" in lines and "time (UTC)" in lines
    assert root.findtext(f"{NS}title") == lines[0]
    custom = parse(render_svg(history(RUN), run_id="job42", title="incident 7"))
    assert texts(custom)[:2] == ["incident 7", lines[1]]


def test_an_empty_history_is_still_a_picture():
    root = parse(render_svg([], run_id="job42"))
    assert texts(root)[1] == "run job42: no history"


HOSTILE = [
    "<script>alert(1)</script>",
    "a&b&amp;c",
    "q\"u'o`te",
    "esc\x1b[31mred\x00nul\x07bell\x9bcsi",
    "bidi\u202etxt.exe",
    "]]><!ENTITY x SYSTEM 'file:///etc/passwd'>",
    "x" * 10_000,
]


def test_hostile_node_names_and_run_id_are_escaped_and_cut():
    nodes = [NodeDesc(addr, 1, 0) for addr in HOSTILE]
    run = [state(0, nodes[:4], nodes[4:]), state(0, nodes, complete=True), state(1), state(1, nodes[::2])]
    svg = render_svg(history(run), run_id="<script>run\x1b]0;evil\x07" + "r" * 10_000,
                     title="<foreignObject>t</foreignObject>")
    root = parse(svg)  # well-formed
    lowered = svg.lower()
    for forbidden in ("<script", "<foreignobject", "<!entity", "<![cdata", "href="):
        assert forbidden not in lowered
    tags = {element.tag.replace(NS, "") for element in root.iter()}
    assert tags <= {"svg", "title", "g", "rect", "text", "line"}
    assert not any("href" in name for element in root.iter() for name in element.attrib)
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202e]", svg)
    assert "x" * 200 not in svg and "r" * 200 not in svg
    labels = [label for label, _ in rows(root)]
    assert len(labels) == len(HOSTILE)
    assert all(len(label) <= LABEL_CHARS for label in labels)
    assert "<script>alert(1)</script>_1_0" in labels  # shown as text, not markup
    assert any(label.startswith("esc\\x1b[31mred\\x00nul\\x07") for label in labels)
    assert any(label.startswith("bidi\\u202etxt") for label in labels)
    assert len(svg) < 100_000


def test_a_node_that_flaps_keeps_a_bounded_number_of_bars():
    run = [state(0, [A, B]) if i % 2 else state(0, [A], [B]) for i in range(10_000)]
    root = parse(render_svg(history(run), run_id="job42"))
    bars = dict(rows(root))
    assert bars[str(A)] == 1  # one unbroken participant span
    assert 1 < bars[str(B)] <= SPANS_PER_NODE
    assert "some short spans of a node merged into one bar" in texts(root)


def test_many_nodes_show_the_cap_and_say_how_many_more():
    nodes = [NodeDesc(f"worker-{i}", 1, 0) for i in range(300)]
    run = [state(0, nodes[: i + 1]) for i in range(len(nodes))] + [state(1, nodes[-10:], complete=True)]
    root = parse(render_svg(history(run), run_id="job42"))
    shown = [label for label, _ in rows(root)]
    assert len(shown) == MAX_ROWS
    assert shown[:10] == [str(n) for n in sorted(nodes[-10:])]  # the last round's participants first
    assert f"and {300 - MAX_ROWS} more nodes not shown" in texts(root)


def test_distinct_nodes_beyond_what_is_followed_are_still_counted():
    # 6,000 nodes that each join and leave: more than the collector follows, so old ones are forgotten.
    def run() -> Iterator[RendezvousState]:
        for i in range(6_000):
            yield state(0, [A, NodeDesc(f"short-lived-{i}", 1, 0)])
        yield state(0, [A], complete=True)

    root = parse(render_svg(history(run(), step=0.5), run_id="job42"))
    assert rows(root)[0][0] == str(A)
    assert f"and {6_000 + 1 - MAX_ROWS} more nodes not shown" in texts(root)


def test_what_is_kept_while_reading_stays_bounded():
    """Memory: nodes followed and bars per node are capped however many distinct nodes come and go."""
    collector = _Collector()
    run = (state(0, [A, NodeDesc(f"n{i}", 1, 0)], [B] * (i % 2)) for i in range(20_000))  # B flaps too
    for i, entry in enumerate(history(run, step=0.1)):
        collector.add(entry)
        assert len(collector.nodes) <= TRACKED_NODES + len(collector.roles)  # idle ones capped, plus the current
        if i % 1000 == 0:
            assert all(len(track.spans) <= SPANS_PER_NODE for track in collector.nodes.values())
    collector.finish()
    assert collector.hidden_count({A, B}) == 20_000


def test_markers_are_capped_but_all_counted():
    run = [state(i, [A], complete=True) for i in range(3_000)]
    root = parse(render_svg(history(run, step=1.0), run_id="job42"))
    assert len(markers(root)) == MAX_MARKERS
    assert "round advanced \u00d72999" in texts(root)
    assert f"only the last {MAX_MARKERS} of 3000 markers drawn" in texts(root)


def test_time_going_backwards_draws_no_negative_bar():
    entries = list(history(RUN))
    entries[5] = Entry(T0 - _dt.timedelta(hours=1), entries[5].state, entries[5].events)
    svg = render_svg(entries, run_id="job42")
    assert not re.search(r'width="-', svg)
    parse(svg)


def test_a_long_generated_history_stays_under_the_size_bound():
    """200,000 entries of churn: joins, leaves, rounds, closes, thousands of distinct nodes."""
    pool = [NodeDesc(f"10.0.{i // 256}.{i % 256}", 4000 + i, 0) for i in range(5_000)]

    def churn() -> Iterator[Entry]:
        for i in range(200_000):
            base = (i // 50) % len(pool)
            members = [pool[(base + k) % len(pool)] for k in range(8)]
            current = state(i // 50, members[: 4 + i % 5], members[6:], complete=i % 50 > 40, closed=i % 997 == 0)
            # the events diff_states gives for the markers (built directly: the test is about the picture)
            events = [Event("round-advanced", f"round {i // 50 - 1} -> {i // 50}")] if i % 50 == 0 else []
            events += [Event("completed", "round complete")] if i % 50 == 41 else []
            events += [Event("closed", "rendezvous closed")] if i % 997 == 0 else []
            yield Entry(T0 + _dt.timedelta(seconds=i * 0.05), current, events)

    svg = render_svg(churn(), run_id="storm")
    assert len(svg.encode("utf-8")) < SIZE_BOUND
    root = parse(svg)
    assert len(rows(root)) == MAX_ROWS
    assert any(t.startswith("only the last") for t in texts(root))
