"""Turn documents into text: plain (stable, colourless) or rich (terminal).

Commands build data (the documents of :mod:`rdzvctl.inspection`, rows of
tables) and hand it here; nothing in this module talks to a backend.  Plain
output never imports rich, so scripted use stays fast and byte-stable.

Every value shown (cells, titles, notes, pairs, event messages, diff lines)
goes through :func:`rdzvctl.text.safe` here, so a node address, run id,
store key or finding holding escape sequences, bidi overrides or line breaks
is shown escaped and never forges a row.  Rich gets ``Text`` objects only,
never markup built from data.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from rdzvctl.text import json_text, safe

if TYPE_CHECKING:  # the App only types arguments here
    from rdzvctl.cli.app import App

__all__ = [
    "Table",
    "render_tables",
    "render_get",
    "render_plan",
    "render_event",
    "with_progress",
    "plan_summary",
    "render_doctor",
    "fmt_age",
    "fmt_seconds",
    "SUMMARY_LIMIT",
]

#: Above this many nodes, ``get`` summarises unless ``--all-nodes``.
SUMMARY_LIMIT = 50
_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan", "alive": "green", "dead": "bold red",
           "ok": "green", "corrupt": "bold red", "unsafe": "bold red", "warn": "yellow", "fail": "bold red"}


class Table:
    """A titled table: column names and rows of strings; ``note`` prints below it."""

    def __init__(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], note: str = "") -> None:
        self.title = safe(title)
        self.columns = [safe(c) for c in columns]
        self.rows = [["" if c is None else safe(c) for c in row] for row in rows]
        self.note = safe(note)


def fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 60:
        return f"{sign}{s:.1f}s"
    if s < 3600:
        return f"{sign}{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{sign}{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{sign}{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def fmt_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    if seconds < 0:
        return f"in {fmt_seconds(-seconds)} (future)"
    return f"{fmt_seconds(seconds)} ago"


def _plain_table(table: Table) -> List[str]:
    lines = [f"{table.title}:"] if table.title else []
    if table.rows:
        widths = [max(len(c), *(len(r[i]) for r in table.rows)) for i, c in enumerate(table.columns)]
        head = "  ".join(c.upper().ljust(w) for c, w in zip(table.columns, widths)).rstrip()
        lines.append("  " + head if table.title else head)
        for row in table.rows:
            text = "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
            lines.append("  " + text if table.title else text)
    else:
        lines.append("  (none)" if table.title else "(none)")
    if table.note:
        lines.append(("  " if table.title else "") + table.note)
    return lines


def _plain_pairs(pairs: Sequence[Tuple[str, str]]) -> List[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{k.ljust(width)}  {v}" for k, v in pairs]


def render_tables(app: "App", pairs: Sequence[Tuple[str, str]], tables: Sequence[Table]) -> None:
    """Print key/value pairs then tables, rich on a terminal, plain otherwise."""
    pairs = [(safe(k), safe(v)) for k, v in pairs]
    if not app.rich:
        blocks = []
        if pairs:
            blocks.append("\n".join(_plain_pairs(pairs)))
        blocks += ["\n".join(_plain_table(t)) for t in tables]
        app.out("\n\n".join(blocks))
        return
    from rich.table import Table as RichTable
    from rich.text import Text

    console = app.console()
    if pairs:
        grid = RichTable.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in pairs:
            # Only a value that is a status word is styled ("liveness: dead after 15s ..." is not an error).
            grid.add_row(Text(key), Text(value, style=_STYLES.get(value, "")))
        console.print(grid)
    for table in tables:
        console.print()
        if not table.rows:
            console.print(Text.assemble((table.title, "bold"), "\n  (none)"))
        elif _prose_below(table, console.width):
            _print_stacked(console, table)
        else:
            console.print(_rich_table(table, console.width))
        if table.note:
            console.print(Text(table.note, style="dim"))


#: Columns of identifiers (codes, node ids, run ids, keys) and status words: never wrapped or
#: folded while they fit; the other columns give way first (their headers may fold).
_IDENTIFIERS = {"code", "codes", "node", "run id", "key", "name", "case", "health", "status", "severity"}
#: Columns of prose: they wrap at spaces; below this width they go on their own lines instead.
_PROSE = {"message", "repair", "why", "summary", "description", "detail"}
_PROSE_MIN_WIDTH = 36


def _widths(table: Table) -> List[int]:
    return [max(len(c), *(len(r[i]) for r in table.rows)) for i, c in enumerate(table.columns)]


def _prose_below(table: Table, width: int) -> bool:
    """True when the prose columns would be squeezed below :data:`_PROSE_MIN_WIDTH` beside the others."""
    prose = [i for i, c in enumerate(table.columns) if c in _PROSE]
    if not prose:
        return False
    widths = _widths(table)
    beside = sum(w + 2 for i, w in enumerate(widths) if i not in prose)
    return (width - beside) / len(prose) < _PROSE_MIN_WIDTH


def _rich_table(table: Table, width: int) -> Any:
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    rich_table = RichTable(title=Text(table.title) if table.title else None, title_justify="left",
                           title_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    widths = _widths(table)
    keep = sum(w + 2 for w, c in zip(widths, table.columns) if c in _IDENTIFIERS) <= width - 8
    for column, natural in zip(table.columns, widths):
        if keep and column in _IDENTIFIERS:
            rich_table.add_column(Text(column.upper()), no_wrap=True, min_width=natural, overflow="fold")
        else:
            rich_table.add_column(Text(column.upper()), overflow="fold")
    for row in table.rows:
        rich_table.add_row(*(Text(v, style=_STYLES.get(v, "")) for v in row))
    return rich_table


def _print_stacked(console: Any, table: Table) -> None:
    """A narrow terminal: the short columns on one line, each prose cell indented on its own lines below."""
    from rich.padding import Padding
    from rich.text import Text

    prose = [i for i, c in enumerate(table.columns) if c in _PROSE]
    if table.title:
        console.print(Text(table.title, style="bold"))
    for row in table.rows:
        head = Text("  ").join(Text(row[i], style=_STYLES.get(row[i], "")) for i in range(len(row)) if i not in prose)
        console.print(head, no_wrap=True, overflow="fold")
        for i in prose:
            if row[i]:
                console.print(Padding(Text(row[i]), (0, 0, 0, 4)))


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def render_get(app: "App", doc: Dict[str, Any], all_nodes: bool = False) -> None:
    """The ``get`` view: header, nodes by role, problems."""
    state = doc.get("state")
    pairs = [("backend", f"{doc['backend']}  {doc['endpoint']}"), ("run id", doc["run_id"]),
             ("token", doc.get("token") or "-")]
    if state is None:
        problems = doc.get("problems") or []
        kind = problems[0]["code"].replace("state-", "", 1) if problems else "none"  # corrupt | unsafe
        pairs.append(("state", kind))
        render_tables(app, pairs, [_problems_table(doc.get("problems", []))])
        return
    summary = doc["summary"]
    remaining = summary["deadline_remaining"]
    if state["deadline"] is None:
        deadline = "-"
    elif remaining is not None and remaining >= 0:
        deadline = f"in {fmt_seconds(remaining)} ({state['deadline']})"
    else:
        deadline = f"passed {fmt_seconds(-(remaining or 0))} ago ({state['deadline']})"
    pairs += [
        ("round", str(state["round"])),
        ("complete", _yes(state["complete"])),
        ("closed", _yes(state["closed"])),
        *_lifecycle_pairs(doc.get("lifecycle")),
        ("deadline", deadline),
        ("nodes", f"{summary['participants']} participants ({summary['alive']} alive, {summary['dead']} dead), "
                  f"{summary['waiting']} waiting, {summary['redundant']} redundant"),
    ]
    ka = doc["keep_alive"]
    expiry = ka["interval"] * ka["max_attempt"]
    tables = []
    for role, title in (("participant", "Participants"), ("waiting", "Wait list"),
                        ("redundant", "Redundancy list"), ("orphan", "Heartbeats of nodes in no list")):
        nodes = [n for n in doc["nodes"] if n["role"] == role]
        if role == "orphan" and not nodes:
            continue
        note = ""
        if not all_nodes and len(nodes) > SUMMARY_LIMIT:
            dead = [n for n in nodes if n["alive"] is False]
            shown = (dead + [n for n in nodes if n["alive"] is not False])[:SUMMARY_LIMIT]
            note = f"... {len(nodes) - len(shown)} more {title.lower()} not shown (--all-nodes shows every row)"
            nodes = shown
        columns = (["rank"] if role == "participant" else []) + ["node", "last heartbeat", "status"]
        rows = [
            ([str(n["rank"])] if role == "participant" else [])
            + [n["node"], fmt_age(n["age"]), _status(n["alive"])]
            for n in nodes
        ]
        tables.append(Table(title, columns, rows, note))
    tables.append(_problems_table(doc["problems"]))
    if doc.get("store_keys") is not None:  # asked for (--keys)
        keys = doc["store_keys"]
        tables.append(Table("Store keys", ["key", "value"], sorted(keys.items()),
                            "" if keys else "no round keys for this run (torch writes them once a round completes)"))
    pairs.append(("liveness", f"dead after {expiry:g}s without a heartbeat "
                              f"({ka['interval']:g}s x {ka['max_attempt']})"))
    render_tables(app, pairs, tables)


def _lifecycle_pairs(life: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """The phase and what torch does next (``lifecycle`` of the document)."""
    return [] if not life else [("phase", life["phase"]), ("next", life["outlook"])]


def _status(alive: Optional[bool]) -> str:
    return {True: "alive", False: "dead", None: "no heartbeat"}[alive]


def _problems_table(problems: List[Dict[str, Any]]) -> Table:
    rows = [[p["severity"], p["code"], p["message"] + (f" [torch: {p['torch_next']}]" if p.get("torch_next") else "")
             + (f" -> {p['repair']}" if p.get("repair") else "")]
            for p in problems]
    return Table("Problems", ["severity", "code", "message"], rows)


#: A plan's diff longer than this many lines is summarised unless ``--full-diff``.
PLAN_DIFF_LIMIT = 60
#: How many names a plan summary shows per changed field.
PLAN_NAMED = 3


def render_plan(app: "App", before: Any, after: Any, title: str) -> bool:
    """Show a unified diff of two JSON documents; returns False when they are equal.

    A diff longer than :data:`PLAN_DIFF_LIMIT` lines (a large state cleared or
    pruned) is summarised field by field, so the question that follows is on
    screen; ``--full-diff`` (``app.full_diff``) shows every line.
    """
    # json_text: data-held controls, bidi and separators become \u escapes, so no diff line carries them.
    old = json_text(before, indent=2).splitlines() if before is not None else []
    new = json_text(after, indent=2).splitlines() if after is not None else []
    if old == new:
        app.err(f"{title}: no change.")
        return False
    import difflib

    diff = [safe(line) for line in difflib.unified_diff(old, new, "current", "new", lineterm="", n=2)]
    if len(diff) > PLAN_DIFF_LIMIT and not getattr(app, "full_diff", False):
        app.err(f"{title} (a {len(diff)}-line diff, summarised; --full-diff shows it all):")
        for line in plan_summary(before, after):
            app.err(f"  {line}")
        return True
    app.err(f"{title}:")
    if app.rich:
        from rich.syntax import Syntax

        app.console(stderr=True).print(Syntax("\n".join(diff), "diff", theme="ansi_dark", background_color="default"))
    else:
        for line in diff:
            app.err(line)
    return True


def _named(names: List[str]) -> str:
    shown = ", ".join(names[:PLAN_NAMED])
    return shown + (f" and {len(names) - PLAN_NAMED} more" if len(names) > PLAN_NAMED else "")


def _size(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"{len(value)} entries"
    return json_text(value)


def plan_summary(before: Any, after: Any) -> List[str]:
    """What a plan changes, one line per top-level field (counts and the first names, never every node)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        which, doc = ("removes", before) if after is None else ("writes", after)
        if not isinstance(doc, dict):
            return [f"{which} the state"]
        return [f"{which} the state:"] + [f"  {k}: {_size(v)}" for k, v in doc.items() if k != "bytes_base64"]
    lines = []
    for key in list(before) + [k for k in after if k not in before]:
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
            old_items = old if isinstance(old, dict) else {k: None for k in (old or [])}
            new_items = new if isinstance(new, dict) else {k: None for k in (new or [])}
            parts = []
            for label, names in (("added", [k for k in new_items if k not in old_items]),
                                 ("removed", [k for k in old_items if k not in new_items]),
                                 ("changed", [k for k in new_items if k in old_items and old_items[k] != new_items[k]])):
                if names:
                    parts.append(f"{len(names)} {label} ({_named([str(n) for n in names])})")
            lines.append(f"{key}: " + "; ".join(parts))
        else:
            lines.append(f"{key}: {json_text(old)} -> {json_text(new)}")
    return lines


def render_event(app: "App", event: Dict[str, Any]) -> None:
    """One watch or history event as a line: time, kind, message."""
    line = safe(f"{event['time']}  {event['kind']:<22} {event['message']}")
    if app.rich:
        from rich.text import Text

        alarming = ("heartbeat-stale", "state-removed", "state-corrupt", "closed", "restart-storm")
        style = "red" if event["kind"] in alarming else ""
        app.console().print(Text(line, style=style))
    else:
        app.out(line)


T = TypeVar("T")


def with_progress(app: "App", entries: Iterable[T], label: str = "checking runs", streamed: bool = False) -> Iterator[T]:
    """``entries``, with a progress display on stderr while they are consumed, only on a terminal
    (and not when the output is ``streamed`` to a terminal as the entries come: it is the progress)."""
    if not sys.stderr.isatty() or (streamed and sys.stdout.isatty()):
        yield from entries
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    with Progress(SpinnerColumn(), TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  transient=True, console=app.console(stderr=True)) as progress:
        task = progress.add_task("runs", total=None)
        for entry in entries:
            yield entry
            progress.advance(task)


def render_doctor(app: Any, doc: Dict[str, Any]) -> None:
    """The ``doctor`` checklist: one line per check (status, name, finding -> what to do), then a verdict."""
    rows = [[c["status"], c["name"], c["message"] + (f" -> {c['fix']}" if c.get("fix") else "")]
            for c in doc["checks"]]
    counts = doc["counts"]
    pairs = [("backend", f"{doc['backend']}  {doc['endpoint']}"), ("run id", doc["run_id"] or "-"),
             ("verdict", f"{doc['status']}  ({counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail)")]
    render_tables(app, pairs, [Table("Checks", ["status", "check", "finding"], rows)])
