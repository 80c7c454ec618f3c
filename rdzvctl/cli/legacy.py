"""The commands for a backend whose state is torch's legacy etcd JSON (``state_format = "legacy-etcd-json"``).

get, corrupt-detect, list, reset and restore dispatch here when
:func:`handles` says so (set, edit and exporter refuse); the shapes (exit
codes, output modes, the write flow of :func:`rdzvctl.cli.change.apply_change`)
are the other backends'.  watch needs no dispatch: :func:`rdzvctl.follow.follow`
follows this format too.  The state layer is :mod:`rdzvctl.state.legacy_etcd`,
reading a run :func:`rdzvctl.inspection.read_legacy`; nothing here talks to
etcd except through the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from rdzvctl import clock
from rdzvctl.backends.registry import get_backend_class
from rdzvctl.errors import (
    EXIT_CORRUPT,
    NoStateError,
    RdzvctlError,
    StateCorruptError,
    StateError,
    TokenConflictError,
    UnsupportedOperationError,
)
from rdzvctl.inspection import Snapshot, describe_legacy, is_legacy_etcd, read_legacy
from rdzvctl.state.jsonform import format_time

if TYPE_CHECKING:  # rdzvctl.state.legacy_etcd is imported when a command runs on such a backend, not by every get
    from rdzvctl.state.legacy_etcd import LegacyReport, LegacyRun

__all__ = ["handles", "get", "detect", "list_runs", "reset", "restore", "refuse", "LegacyWrites"]


def handles(app: Any) -> bool:
    """True when the addressed backend keeps torch's legacy etcd JSON (checked without connecting)."""
    try:
        name = app.address.backend
    except RdzvctlError:
        return False  # the command reports it as usual
    return handles_backend(name)


def handles_backend(name: Optional[str]) -> bool:
    if not name:
        return False
    try:
        cls = get_backend_class(name)
    except RdzvctlError:
        return False
    return is_legacy_etcd(cls)


def refuse(command: str, instead: str = "use reset --mode reopen|clear, or restore a backup") -> None:
    raise UnsupportedOperationError(
        f"{command} does not apply to the etcd backend (torch's legacy JSON state): {instead}")


def _doc(backend: Any, run: LegacyRun, report: LegacyReport) -> Dict[str, Any]:
    return describe_legacy(backend, run, report)


def _no_state(run: LegacyRun, report: LegacyReport) -> NoStateError:
    return NoStateError.for_run(run.run_id, f"{run.run_path}/rdzv/active_version", report.next_step)


# -- get ------------------------------------------------------------------------------------------
def get(app: Any, output: str, all_nodes: bool, show_keys: bool = False) -> None:
    with app.open() as backend:
        run, report = read_legacy(backend)
    if show_keys:
        app.err("note: --keys is not offered on the etcd backend: each version's store is "
                f"{run.run_path}/rdzv/v_<version>/kv, and versions never repeat")
    if output == "raw":
        if run.raw is None:
            raise _no_state(run, report)
        app.raw(run.raw)
        return
    if run.raw is None and run.active is None:
        raise _no_state(run, report)
    doc = _doc(backend, run, report)
    if output == "json":
        app.json(doc)
    else:
        render_get(app, doc, all_nodes)
    if report.error is not None or run.raw is None:
        app.exit(EXIT_CORRUPT)


def render_get(app: Any, doc: Dict[str, Any], all_nodes: bool = False) -> None:
    from rdzvctl.cli.render import SUMMARY_LIMIT, Table, _problems_table, render_tables

    state = doc.get("state")
    pairs = [("backend", f"{doc['backend']}  {doc['endpoint']}"), ("run id", doc["run_id"]),
             ("key", doc["key"]), ("token", doc.get("token") or "-")]
    ttl = "none" if doc["ttl"] is None else f"{doc['ttl']} s left"
    if state is None:
        pairs += [("state", "corrupt"), ("next", doc["next"])]
        render_tables(app, pairs, [_problems_table(doc["problems"])])
        return
    summary = doc["summary"]
    waiting = "-" if summary["waiting"] is None else str(summary["waiting"])
    pairs += [
        ("status", f"{summary['status']}  (TTL {ttl})"),
        ("version", summary["version"] or "-"),
        ("participants", f"{summary['participants']} ({summary['confirmed']} confirmed: {summary['alive']} alive, "
                         f"{summary['expired']} expired)"),
        ("waiting", f"{waiting} (num_workers_waiting)"),
        ("counter", doc["version_counter"] or "missing"),
        ("run lease", "none" if doc["run_lease_ttl"] is None else f"{doc['run_lease_ttl']} s left"),
        ("phase", (doc.get("lifecycle") or {}).get("phase") or "-"),
        ("next", doc["next"]),
    ]
    nodes = doc["nodes"]
    note = ""
    if not all_nodes and len(nodes) > SUMMARY_LIMIT:
        shown = ([n for n in nodes if n["lease"] == "expired"] + [n for n in nodes if n["lease"] != "expired"])
        note = f"... {len(nodes) - SUMMARY_LIMIT} more participants not shown (--all-nodes shows every row)"
        nodes = shown[:SUMMARY_LIMIT]
    rows = [[str(n["rank"]), n["keep_alive"] or "-", n["lease"], "-" if n["ttl"] is None else f"{n['ttl']} s"]
            for n in nodes]
    render_tables(app, pairs, [Table("Participants", ["rank", "keep-alive key", "lease", "ttl"], rows, note),
                               _problems_table(doc["problems"])])


# -- corrupt-detect and list ------------------------------------------------------------------------
def _all_runs(app: Any, backend: Any) -> List[Tuple[LegacyRun, LegacyReport]]:
    from rdzvctl.cli.render import with_progress

    found = []
    for entry in with_progress(app, backend.list_runs()):
        with backend.with_run(entry.run_id) as one:
            found.append(read_legacy(one))
    return found


def detect(app: Any, output: str, all_runs: bool, fail_on: str, for_launch: bool = False) -> None:
    """corrupt-detect; ``--settle`` has nothing to wait for here (a closed run's agents show as live
    keep-alive leases at once: phase ``closing``)."""
    import click

    from rdzvctl.cli.detect_output import show_reports
    from rdzvctl.state.legacy_etcd import check_json, launch_of

    if for_launch and all_runs:
        raise click.UsageError("--for-launch judges one run id: it cannot be combined with --all")
    verdict = None
    if all_runs:
        with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
            reports = [check_json(*pair) for pair in _all_runs(app, backend)]
        reports = [r for r in reports if r["status"] != "absent"]
    else:
        with app.open() as backend:
            run, report = read_legacy(backend)
        reports = [check_json(run, report)]
        if for_launch and reports[0]["status"] != "corrupt":
            verdict = launch_of(run, report)
        if reports[0]["status"] == "absent" and verdict is None:
            raise _no_state(run, report)
    code = show_reports(app, reports, all_runs, verdict, fail_on, output)
    if output != "json":
        if not all_runs and reports[0]["lifecycle"] is None:
            app.out(f"\nnext: {reports[0]['next']}")
    if code:
        app.exit(code)


def list_runs(app: Any, output: str) -> None:
    from rdzvctl.state.legacy_etcd import list_row

    rows = []
    with app.open(run_id=app.address.run_id or "", need_run_id=False) as backend:
        for run, report in _all_runs(app, backend):
            if run.raw is None and run.active is None:
                continue
            rows.append(list_row(run, report, None if run.token is None else backend.format_token(run.token)))
    if output == "json":
        app.json({"schema": "rdzvctl.list/v1", "backend": app.address.backend, "runs": rows})
        return
    from rdzvctl.cli.render import Table, render_tables

    def show(value: object) -> str:
        return "-" if value is None else ("yes" if value is True else "no" if value is False else str(value))

    keys = ("status", "round", "participants", "waiting", "closed", "phase")
    table = Table("", ["run id", "status", "version", "participants", "waiting", "closed", "phase", "health"],
                  [[r["run_id"], *(show(r[k]) for k in keys), r["health"]] for r in rows])
    render_tables(app, [], [table])


# -- writes ---------------------------------------------------------------------------------------------
class LegacyWrites:
    """The write flow's format hooks (``apply_change(..., fmt=...)``) for torch's legacy JSON.

    ``removal`` says what writing ``None`` means: ``reopen`` (delete
    ``active_version``) or ``clear`` (remove the run's directory).
    """

    def __init__(self, removal: str = "reopen", before_clear: Any = None) -> None:
        self.removal = removal
        self.before_clear = before_clear  # called with the backend after consent and backup, before a clear

    @staticmethod
    def view(raw: Optional[bytes]) -> Any:
        if raw is None:
            return None
        from rdzvctl.state.legacy_etcd import parse_state

        try:
            return parse_state(raw).to_json()
        except StateError as exc:
            return {"undecodable": str(exc), "text": raw[:4096].decode("utf-8", "replace")}

    @staticmethod
    def check(new: bytes) -> None:
        """Write only what torch's handler reads: it ``json.loads`` the value and indexes its fields."""
        from rdzvctl.state.legacy_etcd import parse_state

        try:
            parse_state(new)
        except StateError as exc:
            raise type(exc)(f"refusing to write bytes that are not torch's legacy etcd state ({exc}); "
                            "nothing was written") from None

    def write(self, backend: Any, token: Any, new: Optional[bytes]) -> Any:
        from rdzvctl.fence import current_or_none, write_fenced

        if new is not None or token is None:
            return write_fenced(backend, token, new)
        if self.removal == "clear" and self.before_clear is not None:
            self.before_clear(backend)
        removed = backend.reopen(token) if self.removal == "reopen" else backend.clear(token)
        if not removed:
            raise TokenConflictError(
                f"run {backend.run_id!r} changed since it was read (token {backend.format_token(token)}); "
                "nothing was removed", current_or_none(backend))
        return None

    def report_conflict(self, app: Any, snap: Any, exc: TokenConflictError) -> None:
        current = exc.current
        before = self.view(snap.raw)
        after = None if current is None else self.view(current[0])
        if current is None:
            app.err("Changed meanwhile: active_version was removed or expired.")
        elif isinstance(before, dict) and isinstance(after, dict):
            changes = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                       if before.get(k) != after.get(k)]
            app.err("Changed meanwhile: " + ("; ".join(changes) if changes else "rewritten with equal content "
                                                                                 "(a TTL refresh)"))


def snapshot(backend: Any, run: LegacyRun, report: LegacyReport) -> Any:
    """The write flow's :class:`~rdzvctl.inspection.Snapshot` of ``active_version``."""
    return Snapshot(backend=backend.address.backend, endpoint=backend.describe(), run_id=run.run_id, raw=run.raw,
                    token=run.token, token_text=None if run.token is None else backend.format_token(run.token),
                    state=None, error=report.error, fetched_at=clock.now_utc())


def reset(app: Any, mode: str, yes: bool, dry_run: bool, backup_dir: Optional[str], output: str,
          retry: int = 0) -> None:
    """``reset --mode reopen|clear``; ``--retry N`` re-reads and re-plans a reopen after a conflict (the
    last-call holder renews the joinable state every 5 s, which changes its index)."""
    if mode == "prune":
        raise UnsupportedOperationError(
            "reset --mode prune does not apply to the etcd backend: its participants are ranks without "
            "heartbeats; a final version with a dead rank is repaired by --mode reopen")
    from rdzvctl.cli.change import retry_conflicts

    with app.open() as backend:
        run, result = retry_conflicts(app, retry if mode == "reopen" else 0,
                                      lambda confirmed: _reset_once(app, backend, mode, confirmed, dry_run, backup_dir),
                                      yes)
    if output == "json":
        app.json(result or {"written": False, "run_id": run.run_id})


def _reset_once(app: Any, backend: Any, mode: str, yes: bool, dry_run: bool,
                backup_dir: Optional[str]) -> Tuple[LegacyRun, Optional[Dict[str, Any]]]:
    from rdzvctl.cli.change import apply_change
    from rdzvctl.state.legacy_etcd import next_version

    run, report = read_legacy(backend)
    if run.raw is None and run.active is not None:
        raise StateCorruptError(f"{run.run_path}/rdzv/active_version is a directory: etcd v2 cannot remove a "
                                "directory fenced, so rdzvctl does not; remove it with "
                                f"`ETCDCTL_API=2 etcdctl rm -r {run.run_path}/rdzv/active_version`")
    if run.raw is None:
        if mode == "clear" and run.run_dir is not None:
            app.err(f"Run {run.run_id!r} has no active_version; its directory {run.run_path} is left to its "
                    "TTL (nothing to fence on).")
        raise _no_state(run, report)
    snap = snapshot(backend, run, report)
    notes = [f"torch next, now: {report.next_step}"]
    if report.state is not None and report.state.status != "closed" and not report.findings:
        notes.append(f"Warning: nothing is wrong with this {report.state.status} version: its agents keep "
                     "their ranks, and new agents would start another version beside them.")
    if mode == "reopen":
        notes.append(f"Reopen deletes {run.run_path}/rdzv/active_version only (compare on index {run.token}), "
                     "as torch's wait_for_rendezvous_to_free does to a dead version: the next init_phase, also "
                     "of agents already running, creates version "
                     f"{next_version(run)} and agents join it.")
    else:
        notes.append(f"Clear removes {run.run_path} (active_version fenced on index {run.token}, then "
                     f"version_counter {run.counter.value if run.counter else '-'}, "
                     f"{len(run.versions)} version director(ies) with their keep-alives and round stores), "
                     "as its 7200 s TTL would. active_version is backed up (restorable), the rest saved apart for "
                     "forensics. A handler created before the clear dies at its next rendezvous (RendezvousError "
                     "'worker needs to die'): use it when no agent of this run id runs; --mode reopen otherwise.")
    result = apply_change(app, backend, snap, None, yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                          command=f"reset --mode {mode}", title=f"Reset ({mode}) of run {run.run_id!r}",
                          notes=notes, fmt=LegacyWrites(mode, lambda b: _save_run_directory(app, b, backup_dir)))
    if result is not None and "run_directory_backup" in app.progress:
        result["run_directory_backup"] = app.progress["run_directory_backup"]
    return run, result


def _save_run_directory(app: Any, backend: Any, backup_dir: Optional[str]) -> None:
    """Save every key ``clear`` removes (counter, per-version stores, leases) as a second backup, for
    forensics: ``restore`` refuses it (not a state) and puts back only ``active_version`` backups."""
    from pathlib import Path

    from rdzvctl.backup import Backup, public_conf, write_backup

    address = backend.address
    path = write_backup(Backup(address.backend, backend.describe(), backend.run_id, public_conf(dict(address.conf)),
                               None, format_time(clock.now_utc()) or "", "reset --mode clear: the run directory (forensics)",
                               backend.dump_run()), Path(backup_dir) if backup_dir else None)
    app.progress["run_directory_backup"] = str(path)
    app.err(f"Run directory saved (forensics, not restorable): {path}")


def restore(app: Any, backend: Any, saved: Any, backup_file: str, yes: bool, dry_run: bool,
            backup_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    from rdzvctl.cli.change import apply_change

    run, report = read_legacy(backend)
    snap = snapshot(backend, run, report)
    notes = []
    if saved.state is not None and run.counter is None:
        notes.append("version_counter is missing: handlers created before its removal fail until a new handler "
                     "recreates it (a restore brings back active_version only).")
    return apply_change(app, backend, snap, saved.state, yes=yes, dry_run=dry_run, backup_dir=backup_dir,
                        command=f"restore {backup_file}",
                        title=f"Restore of run {snap.run_id!r} from {backup_file} (saved {saved.time})",
                        notes=notes, fmt=LegacyWrites("reopen"))
