"""One incident report: the decoded state, its findings, doctor's checklist and the repair commands.

:func:`build_bundle` assembles the data (the ``report -o json`` document,
schema ``rdzvctl.report/v1``) from the documents other commands print (the
``get -o json`` document of :func:`rdzvctl.inspection.describe` and
:meth:`rdzvctl.doctor.Diagnosis.to_json`); :func:`render_markdown` turns it
into Markdown.  Every value from a store or a server is untrusted: each is
scrubbed of secrets and escaped (:func:`rdzvctl.text.safe`, then Markdown:
:func:`md`), so no value can forge a heading, a table row, a link, HTML or
leave the code block of repair commands.  :func:`write_private_file` saves it
with mode 0600.

The "Last events" section shows ``bundle["events"]``: the newest events of
the run's history (:func:`rdzvctl.timeline.last_events`, the ``history -o
json`` event form), or None when the backend keeps no history or it could
not be read; ``bundle["events_note"]`` says why, or what the history lacks.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from rdzvctl.backends.base import Address
from rdzvctl.errors import UsageError
from rdzvctl.text import safe, scrub

__all__ = ["SCHEMA", "build_bundle", "repair_commands", "render_markdown", "md", "write_private_file",
           "open_private_file", "check_output_file", "NODE_ROWS"]

SCHEMA = "rdzvctl.report/v1"
#: At most this many node rows in the Markdown (the JSON bundle has them all).
NODE_ROWS = 50
#: At most this many commands per repair that names a node.
_PER_NODE = 10

# A repair text that is an rdzvctl command: the words up to the first parenthesis, ';' or ','.
_COMMAND = re.compile(r"^rdzvctl [a-z][a-z-]*(?: (?![(])[^\s(),;]+)*")
# What Markdown (CommonMark/GFM) could read as inline markup or a cell boundary ('<' and '&' become entities).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
# The start of a GFM "www." extended autolink (matched case-insensitively here to be safe).
_AUTOLINK_WWW = re.compile(r"((?i:www))\.")


def md(text: Any) -> str:
    """One untrusted value as inert Markdown text: :func:`safe`, then markup escaped (tables too).

    GFM's extended autolinks are broken too, so a store value such as
    ``https://evil.example/login`` or ``www.evil.com`` stays plain text: a
    backslash before the ``/`` of ``://`` and before the ``.`` of ``www.``
    (the autolink matcher sees the raw text), and every ``@`` becomes a code
    span of its own (email autolinks are matched after escapes are resolved, so
    only a separate inline node breaks them).  The rendered text is unchanged
    apart from the ``@`` in code font.
    """
    value = safe("" if text is None else text)
    value = value.replace("&", "&amp;").replace("<", "&lt;")
    value = _MD_SPECIAL.sub(r"\\\1", value)
    value = _AUTOLINK_WWW.sub(r"\1\\.", value).replace("://", ":\\/\\/")
    return value.replace("@", "`@`")


def _flags(address: Address) -> List[str]:
    """The address flags of a repair command, without secrets."""
    from rdzvctl.backup import public_conf

    flags = ["--rdzv-backend", address.backend]
    if address.endpoint:
        flags += ["--rdzv-endpoint", scrub(address.endpoint)]
    flags += ["--rdzv-id", address.run_id]
    conf = public_conf(dict(address.conf))
    if conf:
        flags += ["--rdzv-conf", ",".join(f"{k}={v}" for k, v in conf.items())]
    return flags


def repair_commands(problems: Iterable[Mapping[str, Any]], checks: Iterable[Mapping[str, Any]],
                    address: Address) -> List[Dict[str, str]]:
    """The rdzvctl commands the findings and failed checks suggest, with this run's address, deduplicated.

    Each is ``{"source", "why", "command"}``; ``command`` is shell-quoted
    (node ids and run ids are untrusted), a ``NODE`` placeholder becomes the
    finding's nodes.
    """
    suggestions: List[tuple] = []
    for p in problems:
        suggestions.append((f"finding {p.get('code')}", p.get("message", ""), p.get("repair") or "", p.get("nodes") or []))
    for c in checks:
        if c.get("status") != "ok":
            suggestions.append((f"check {c.get('name')}", c.get("message", ""), c.get("fix") or "", []))
    out: List[Dict[str, str]] = []
    seen = set()
    flags = _flags(address)
    for source, why, repair, nodes in suggestions:
        match = _COMMAND.match(str(repair))
        if not match:
            continue
        words = match.group(0).split()[1:]
        variants = [words]
        if "NODE" in words and nodes:
            variants = [[str(n) if w == "NODE" else w for w in words] for n in list(nodes)[:_PER_NODE]]
        for variant in variants:
            command = " ".join(["rdzvctl", *(shlex.quote(w) for w in variant + flags)])
            if command in seen:
                continue
            seen.add(command)
            out.append({"source": str(source), "why": str(why), "command": command})
    return out


def build_bundle(address: Address, get_doc: Optional[Dict[str, Any]], doctor_doc: Dict[str, Any],
                 generated_at: _dt.datetime, events: Optional[List[Dict[str, Any]]] = None,
                 events_note: str = "") -> Dict[str, Any]:
    """The report's data: ``report -o json`` prints exactly this."""
    from rdzvctl import __version__
    from rdzvctl.state.jsonform import format_time

    problems = (get_doc or {}).get("problems") or []
    return {
        "schema": SCHEMA,
        "generated_at": format_time(generated_at),
        "rdzvctl_version": __version__,
        "backend": address.backend,
        "endpoint": doctor_doc.get("endpoint"),
        "run_id": address.run_id,
        "get": get_doc,
        "doctor": doctor_doc,
        "events": events,
        "events_note": events_note,
        "repairs": repair_commands(problems, doctor_doc.get("checks") or [], address),
    }


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(v) for v in row) + " |" for row in rows]
    return lines


def _fence(lines: Sequence[str]) -> str:
    """A backtick fence longer than any backtick run in ``lines`` (so none can close it)."""
    longest = max((len(run) for line in lines for run in re.findall(r"`+", line)), default=0)
    return "`" * max(3, longest + 1)


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.1f} s ago" if seconds >= 0 else f"{-seconds:.1f} s in the future"


def _legacy_summary(get_doc: Mapping[str, Any]) -> List[str]:
    """The Summary tables of a legacy etcd run: torch's status and version, keep-alive leases per rank."""
    summary = get_doc.get("summary") or {}
    life = get_doc.get("lifecycle") or {}
    ttl = get_doc.get("ttl")
    lease = get_doc.get("run_lease_ttl")
    out = _table(["field", "value"], [
        ["state format", get_doc.get("state_format")],
        ["key", get_doc.get("key")],
        ["status", f"{summary.get('status')} (TTL {'none' if ttl is None else f'{ttl} s left'})"],
        ["version", summary.get("version") or "-"],
        ["participants", f"{summary.get('participants')} ({summary.get('confirmed')} confirmed: "
                         f"{summary.get('alive')} alive, {summary.get('expired')} expired)"],
        ["waiting", "-" if summary.get("waiting") is None else summary.get("waiting")],
        ["counter", get_doc.get("version_counter") or "missing"],
        ["run lease", "none" if lease is None else f"{lease} s left"],
        *([["phase", life.get("phase")]] if life else []),
        ["torch next", get_doc.get("next")],
    ])
    nodes = sorted(get_doc.get("nodes") or [], key=lambda n: n.get("lease") != "expired")  # expired ones first
    out += ["", "### Nodes", ""]
    out += _table(["rank", "keep-alive key", "lease", "ttl"], [
        [n.get("rank"), n.get("keep_alive") or "-", n.get("lease"), "-" if n.get("ttl") is None else f"{n.get('ttl')} s"]
        for n in nodes[:NODE_ROWS]
    ])
    if len(nodes) > NODE_ROWS:
        out += ["", f"{len(nodes) - NODE_ROWS} more node(s) not shown (the JSON bundle has them all)."]
    return out


def render_markdown(bundle: Mapping[str, Any]) -> str:
    """The report as Markdown (one document; every value escaped)."""
    get_doc = bundle.get("get") or {}
    doctor = bundle.get("doctor") or {}
    state = get_doc.get("state")
    counts = doctor.get("counts") or {}
    out: List[str] = [f"# Incident report: run {md(bundle.get('run_id'))}", ""]
    out += _table(["field", "value"], [
        ["generated", bundle.get("generated_at")],
        ["rdzvctl", bundle.get("rdzvctl_version")],
        ["backend", bundle.get("backend")],
        ["endpoint", bundle.get("endpoint")],
        ["run id", bundle.get("run_id")],
        ["token", get_doc.get("token") or "-"],
        ["doctor", f"{doctor.get('status')} ({counts.get('ok', 0)} ok, {counts.get('warn', 0)} warn, "
                   f"{counts.get('fail', 0)} fail)"],
    ])
    out += ["", "## Summary", ""]
    if not get_doc:
        out.append("The run could not be read (see Doctor).")
    elif state is None:
        problems = get_doc.get("problems") or []
        out.append("The state does not decode." if problems else "There is no state for this run.")
    elif get_doc.get("state_format") is not None:  # torch's legacy etcd JSON (rdzvctl.state.legacy_etcd.describe)
        out += _legacy_summary(get_doc)
    else:
        summary = get_doc.get("summary") or {}
        ka = get_doc.get("keep_alive") or {}
        remaining = summary.get("deadline_remaining")
        life = get_doc.get("lifecycle") or {}
        out += _table(["field", "value"], [
            ["round", state.get("round")],
            ["complete", "yes" if state.get("complete") else "no"],
            ["closed", "yes" if state.get("closed") else "no"],
            ["deadline", "-" if state.get("deadline") is None else f"{state.get('deadline')} ({remaining} s left)"],
            ["participants", f"{summary.get('participants')} ({summary.get('alive')} alive, {summary.get('dead')} dead)"],
            ["waiting", summary.get("waiting")],
            ["redundant", summary.get("redundant")],
            ["liveness", f"dead after {ka.get('interval')} s x {ka.get('max_attempt')} without a heartbeat"],
            *([["phase", life.get("phase")], ["torch next", life.get("outlook")]] if life else []),
        ])
        nodes = get_doc.get("nodes") or []
        shown = sorted(nodes, key=lambda n: n.get("alive") is not False)[:NODE_ROWS]  # dead ones first
        out += ["", "### Nodes", ""]
        out += _table(["rank", "node", "role", "last heartbeat", "status"], [
            ["-" if n.get("rank") is None else n.get("rank"), n.get("node"), n.get("role"), _age(n.get("age")),
             {True: "alive", False: "dead", None: "no heartbeat"}.get(n.get("alive"), "?")]
            for n in shown
        ])
        if len(nodes) > len(shown):
            out += ["", f"{len(nodes) - len(shown)} more node(s) not shown (the JSON bundle has them all)."]
        keys = get_doc.get("store_keys")
        if keys:
            out += ["", "### Store keys", ""]
            out += _table(["key", "value"], list(sorted(keys.items()))[:NODE_ROWS])
    out += ["", "## Findings", ""]
    problems = get_doc.get("problems") or []
    if problems:
        out += _table(["severity", "code", "message", "torch next", "repair"],
                      [[p.get("severity"), p.get("code"), p.get("message"), p.get("outlook") or p.get("torch_next") or "",
                        p.get("repair") or ""] for p in problems])
    else:
        out.append("None.")
    out += ["", "## Doctor", ""]
    out += _table(["status", "check", "finding", "what to do"],
                  [[c.get("status"), c.get("name"), c.get("message"), c.get("fix") or ""]
                   for c in doctor.get("checks") or []])
    out += ["", "## Last events", ""]
    events = bundle.get("events")
    note = bundle.get("events_note") or ""
    if events is None:
        out.append(f"Not available: {md(note or 'no history was read')}.")
    elif not events:
        out.append("None recorded.")
    else:
        out += _table(["time", "event", "message"], [[e.get("time"), e.get("kind"), e.get("message")] for e in events])
        if note:
            out += ["", md(note)]
    out += ["", "## Repair commands", ""]
    repairs = bundle.get("repairs") or []
    if repairs:
        out.append("Each asks before it writes and backs up what it replaces; add --dry-run to see the plan first.")
        out.append("")
        body: List[str] = []
        for r in repairs:
            body += [safe(f"# {r['source']}: {r['why']}"), safe(r["command"])]
        fence = _fence(body)
        out += [fence + "bash", *body, fence]
    else:
        out.append("None suggested.")
    return "\n".join(out) + "\n"


def write_private_file(path: str, text: str, force: bool = False, keep: Sequence[str] = ()) -> None:
    """Write ``text`` to ``path`` with mode 0600; an existing file only with ``force``.

    A new file is created exclusively (never via a symlink).  With ``force`` an
    existing *regular* file is replaced atomically: the text goes to a new 0600
    file in the same directory, is fsynced and renamed over ``path``, so the old
    inode (its mode, its other links) is never touched.  Anything else at
    ``path`` (a symlink, a device, a FIFO, a directory, a socket) is refused,
    and so is a file that is one of ``keep`` (the run's own FileStore).
    """
    data = text.encode("utf-8")
    if check_output_file(path, force, keep):
        fd, tmp = _temp_beside(path)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
        return
    fd = _create_exclusive(path)
    try:
        _write_all(fd, data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def open_private_file(path: str, force: bool = False, keep: Sequence[str] = ()) -> int:
    """A write fd of a new, empty 0600 file at ``path``, under :func:`write_private_file`'s rules.

    For output written as it comes (``watch --record``): with ``force`` an
    existing regular file is replaced by a new empty one (renamed over it, the
    old inode untouched) before anything is written.
    """
    if check_output_file(path, force, keep):
        fd, tmp = _temp_beside(path)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(tmp)
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
        return fd
    return _create_exclusive(path)


def check_output_file(path: str, force: bool, keep: Sequence[str]) -> bool:
    """True when ``path`` is an existing regular file ``force`` may replace; False when it is free."""
    import stat

    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
    if not force:
        raise UsageError(f"{path} exists: pass --force to overwrite it; nothing was written")
    if not stat.S_ISREG(existing.st_mode):
        raise UsageError(f"{path} is not a regular file: --force replaces only regular files; nothing was written")
    for other in keep:
        try:
            same = os.path.samefile(path, other)
        except OSError:
            same = False
        if same:
            raise UsageError(f"{path} is the run's store file: choose another file; nothing was written")
    return True


def _temp_beside(path: str) -> "tuple[int, str]":
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        return tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None


def _create_exclusive(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: pass --force to overwrite it; nothing was written") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
