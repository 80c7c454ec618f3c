"""torch's legacy etcd JSON: the documents of a run (``get``, ``corrupt-detect``, ``list``, ``--for-launch``),
in the shapes the pickled backends' documents have.  No I/O."""

from __future__ import annotations

from typing import Any, Dict, Optional

from rdzvctl.state.analysis import SEVERITIES
from rdzvctl.state.legacy_etcd.analysis import LegacyReport, next_version
from rdzvctl.state.legacy_etcd.parser import SCHEMA, STATE_FORMAT, LegacyRun
from rdzvctl.state.lifecycle import LaunchVerdict


def describe(run: LegacyRun, report: LegacyReport, *, backend: str, endpoint: str, token: Optional[str],
             fetched_at: str) -> Dict[str, Any]:
    """The ``get -o json`` document for this handler (schema ``rdzvctl.get.legacy-etcd/v1``)."""
    state = report.state
    doc: Dict[str, Any] = {
        "schema": SCHEMA,
        "state_format": STATE_FORMAT,
        "backend": backend,
        "endpoint": endpoint,
        "run_id": run.run_id,
        "key": f"{run.run_path}/rdzv/active_version",
        "token": token,
        "fetched_at": fetched_at,
        "ttl": None if run.active is None else run.active.ttl,
        "state": None if state is None else state.to_json(),
        "version_counter": None if run.counter is None else run.counter.value,
        "versions": list(run.versions),
        "run_lease_ttl": None if run.run_dir is None else run.run_dir.ttl,
    }
    if state is not None:
        doc["summary"] = {
            "status": state.status,
            "version": state.version,
            "participants": len(state.participants or ()),
            "confirmed": len(state.keep_alives or ()),
            "alive": sum(1 for n in report.nodes if n.lease == "alive"),
            "expired": sum(1 for n in report.nodes if n.lease == "expired"),
            "waiting": state.num_workers_waiting,
        }
        doc["nodes"] = [{"rank": n.rank, "keep_alive": n.keep_alive, "lease": n.lease, "ttl": n.ttl}
                        for n in report.nodes]
        doc["version_keys"] = sorted(run.version_keys)
    doc["next"] = report.next_step
    doc["lifecycle"] = lifecycle_json(run, report)
    doc["problems"] = [f.to_json() for f in report.findings]
    return doc


def phase_of(run: LegacyRun, report: LegacyReport) -> Optional[str]:
    """The run's phase in rdzvctl's vocabulary (:data:`rdzvctl.state.lifecycle.PHASES`)."""
    state = report.state
    if state is None:
        return None
    codes = {f.code for f in report.findings}
    if codes & {"stuck-setup", "stuck-joinable", "stuck-frozen", "final-unconfirmed"}:
        return "stuck"
    if state.status in ("setup", "joinable", "frozen"):
        return "forming"
    if state.status == "final":
        if "dead-participant" in codes:
            return "recovering" if state.num_workers_waiting else "stuck"
        return "complete"
    return "closing" if any(n.lease == "alive" for n in report.nodes) else "finished"


def lifecycle_json(run: LegacyRun, report: LegacyReport) -> Optional[Dict[str, Any]]:
    """The ``lifecycle`` member of the pickled backends' documents: phase, torch_next, outlook."""
    phase = phase_of(run, report)
    if phase is None:
        return None
    torch_next = {"forming": "proceeds", "complete": "proceeds", "recovering": "recovers", "stuck": "stays",
                  "closing": "new-job-fails", "finished": "new-job-fails"}[phase]
    nodes = [f"rank_{n.rank}" for n in report.nodes if n.lease == "expired"]
    return {"phase": phase, "torch_next": torch_next, "outlook": report.next_step, "nodes": nodes,
            "known_at": None}


def check_json(run: LegacyRun, report: LegacyReport) -> Dict[str, Any]:
    """A run's ``corrupt-detect`` report (the pickled backends' shape, ``state_format`` added; ``round`` is
    the version, ``legacy_status`` torch's status); its ``status`` is also ``list``'s health."""
    if report.error is not None or (run.raw is None and run.active is not None):
        status = "corrupt"
    elif run.raw is None:
        status = "absent"
    else:
        status = max((f.severity for f in report.findings), key=SEVERITIES.index, default="ok")
    life = lifecycle_json(run, report)
    state = report.state
    return {
        "run_id": run.run_id,
        "status": status,
        "state_format": STATE_FORMAT,
        "round": None if state is None or state.version is None else int(state.version),
        "phase": None if life is None else life["phase"],
        "lifecycle": life,
        "legacy_status": None if state is None else state.status,
        "next": report.next_step,
        "problems": [f.to_json() for f in report.findings],
    }


def list_row(run: LegacyRun, report: LegacyReport, token: Optional[str]) -> Dict[str, Any]:
    """A run's row of ``list`` (``token`` as the backend formats it)."""
    checked = check_json(run, report)
    state = report.state
    return {
        "run_id": run.run_id, "health": checked["status"], "status": None if state is None else state.status,
        "round": checked["round"],
        "complete": None if state is None else state.status == "final",
        "participants": None if state is None else len(state.participants or ()),
        "waiting": None if state is None else state.num_workers_waiting,
        "closed": None if state is None else state.status == "closed",
        "phase": checked["phase"],
        "token": token,
        "error": None if report.error is None else str(report.error),
    }


def launch_of(run: LegacyRun, report: LegacyReport) -> LaunchVerdict:
    """Will a job started now with this run id rendezvous? (``corrupt-detect --for-launch``).

    torch's ``init_phase``: no state → it creates one; ``closed`` → RendezvousClosedError;
    ``final`` → it waits (``num_workers_waiting``) until the running job re-rendezvouses, unless a
    keep-alive is gone (then it destroys the version and starts the next); ``joinable`` → it
    joins whoever is forming; ``setup``/``frozen`` → it waits for the state to change.
    """
    state = report.state
    upcoming = next_version(run)
    if state is None:
        return LaunchVerdict(True, f"no rendezvous: the job creates version {upcoming}",
                             None if not upcoming.isdigit() else int(upcoming))
    version = None if state.version is None else int(state.version)
    if state.status == "closed":
        return LaunchVerdict(False, "the run is closed: every agent fails with RendezvousClosedError "
                                    "(rdzvctl reset --mode reopen)", version)
    if state.status == "final":
        expired = [n.rank for n in report.nodes if n.lease == "expired"]
        if expired:
            return LaunchVerdict(True, f"version {state.version} has a dead rank ({expired[0]}): the job's first "
                                       "agent destroys it and a new version forms", version)
        return LaunchVerdict(False, f"a running job holds version {state.version} ({len(report.nodes)} live "
                                    "rank(s)): new agents only wait in num_workers_waiting", version)
    if state.status == "joinable":
        return LaunchVerdict(False, f"version {state.version} is forming with {len(state.participants or ())} "
                                    "participant(s): new agents would join it (if they are left from another job, "
                                    "rdzvctl reset --mode reopen)", version)
    return LaunchVerdict(False, f"version {state.version or upcoming} is {state.status}: agents wait for it "
                                "to finish or expire", version)
