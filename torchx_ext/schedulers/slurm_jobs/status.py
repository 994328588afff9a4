"""How ``slurm_jobs`` reads an app's state: what Slurm says of the job (squeue/sacct) and what the
job directory holds (each replica's exit, host, reason; the script's result, error and restarts),
turned into describe's answer. Pure functions of what was read: describe reads, in one round trip
to a remote cluster, and asks these.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from torchx.specs import AppState, ReplicaStatus, Role, RoleStatus, is_terminal

from torchx_ext.groups import ReplicaOutcome, group_state
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs.request import (
    OUTPUT_DIR,
)
from torchx_ext.schedulers.slurm_jobs.request import (
    SlurmJobsExecutor as SlurmJobsExecutor,
)
from torchx_ext.schedulers.slurm_jobs.script import (
    DEP_NEVER,
    SlurmJob,
    parse_result,
    signal_reason,
)


def num_restarts(job: Optional[SlurmJob], files: dict[str, str]) -> int:
    """Restarts inside the allocation (a line each in the job directory's ``restarts``) plus
    Slurm's requeues (slurmctld's count; the script's own record once Slurm forgot the job)."""
    text = files.get("restarts") or ""
    requeues = max(sc.file_int(files, "requeues") or 0, job.restarts if job else 0)
    return len(text.splitlines()) + requeues

def shown_dir(record: Mapping[str, Any], key: str) -> str:
    """A directory of the record as a message shows it (``login:path`` when remote)."""
    path = str(record.get(key, ""))
    return f"{record['login']}:{path}" if record.get("login") else path

def replicas(
    record: dict[str, Any], job: Optional[SlurmJob], files: dict[str, str]
) -> tuple[list[Role], list[RoleStatus], list[ReplicaOutcome]]:
    job_state = job.app_state if job else sc.verdict_from_files(
        record["app_id"], shown_dir(record, "job_dir"), files)[0]
    result = parse_result(files.get("result"))
    roles, statuses, outcomes = [], [], []
    for summary in record.get("roles", []):
        name, service = summary["name"], summary["service"]
        roles.append(Role(name=name, image=summary["image"], entrypoint=summary["entrypoint"],
                          num_replicas=summary["num_replicas"]))
        replicas = []
        for k in range(summary["num_replicas"]):
            rdir = f"{summary['dirname']}/{k}"
            code = sc.file_int(files, f"{rdir}/exit")
            host = (files.get(f"{rdir}/host") or "").split()
            shown = outcome = AppState.PENDING
            if job_state == AppState.PENDING:
                pass  # requeued: what the last run left is not this run's
            elif code is not None and f"{rdir}/stopped" in files and f"{rdir}/reason" in files:
                shown = outcome = AppState.FAILED  # the engine's verdict is about it (not ready in time)
            elif code is not None and f"{rdir}/stopped" in files:
                # the group stopped it: judged as it was then (running), shown as stopped
                outcome = AppState.RUNNING
                ok = result is not None and result[0] == 0
                shown = AppState.SUCCEEDED if service and ok else AppState.CANCELLED
            elif code is not None:
                shown = outcome = AppState.SUCCEEDED if code == 0 else AppState.FAILED
            elif is_terminal(job_state):
                shown = outcome = AppState.CANCELLED if job_state == AppState.SUCCEEDED else job_state
            elif host and job_state == AppState.RUNNING:
                shown = outcome = AppState.RUNNING
            reason = ""
            if outcome in (AppState.FAILED, AppState.SUCCEEDED) and code and f"{rdir}/stopped" not in files:
                reason = signal_reason(code) or sc.last_error_in(files.get(f"{rdir}/log", ""))
            if outcome in (AppState.FAILED, AppState.SUCCEEDED):
                # out of restarts: "after 3 attempts (REPLICA policy, max_retries=2)"
                attempts = (files.get(f"{rdir}/reason") or "").strip()
                reason = "; ".join(x for x in (reason, attempts) if x)
            outcomes.append(ReplicaOutcome(name, k, service, outcome, code, reason))
            replicas.append(ReplicaStatus(id=k, state=shown, role=name, hostname=host[-1] if host else ""))
        statuses.append(RoleStatus(name, replicas))
    return roles, statuses, outcomes

def app_state(
    job_id: str, record: dict[str, Any], job: Optional[SlurmJob], err: Optional[str],
    outcomes: list[ReplicaOutcome], files: dict[str, str], cluster: Callable[[], sc.SlurmClient],
) -> tuple[AppState, str]:
    out_file = f"{shown_dir(record, 'job_root')}/{OUTPUT_DIR}/slurm-{job_id}.out"
    error = (files.get("error") or "").strip()  # the app failed before its engine could decide
    # the engine decided without a replica's end (a service not ready in time): its words
    verdict = (files.get("verdict") or "").strip()
    if job is None:
        st, msg = sc.verdict_from_files(job_id, shown_dir(record, "job_dir"), files)
        if st == AppState.UNKNOWN and err:
            msg = f"slurmctld unreachable: {err}"
        if st == AppState.FAILED:
            msg = f"{error}; see {out_file}" if error else (verdict or group_state(outcomes)[1]
                                                             or f"the job failed; see {out_file}")
        return st, msg
    st = job.app_state
    reason = job.reason if job.reason not in ("", "None") else ""
    if job.reason == DEP_NEVER:
        failed = re.findall(r"(\d+)(?:_\*)?\(failed\)", job.dependency) or [
            d.rpartition(":")[2] for d in record.get("dependencies", [])]
        if record.get("login"):  # named as the user knows them: app ids
            failed = [f"{record['login']}:{d}" for d in failed]
        return st, (f"dependency {', '.join(failed)} did not succeed, so Slurm cancelled this job "
                    f"({DEP_NEVER})")
    if st == AppState.PENDING:
        return st, f"pending in Slurm: {reason}" if reason else ""
    if st == AppState.CANCELLED:
        return st, "cancelled" + (f" ({reason})" if reason else "")
    if st == AppState.FAILED and error:
        return st, f"{error}; see {out_file}"
    if st == AppState.FAILED:
        group, msg = (AppState.FAILED, verdict) if verdict else group_state(outcomes)
        if group == AppState.FAILED and job.state.startswith("FAILED"):
            return st, msg
        detail = f"Slurm: {job.state}" + (f" ({reason})" if reason else "")
        if job.state.startswith("NODE_FAIL"):  # not requeued: this app asked for no retries
            detail += ": " + cluster().node_fail_detail(job.nodes, record.get("roles", []), files)
            msg = ""  # the replicas elsewhere were ended by Slurm with the job: not theirs to answer for
        if job.exit_code or job.signal:
            detail += f", batch script exit code {job.exit_code}" + (f" signal {job.signal}" if job.signal else "")
        return st, f"{detail}; {msg + '; ' if msg else ''}see {out_file}"
    if st == AppState.RUNNING:
        group, msg = (AppState.FAILED, verdict) if verdict else group_state(outcomes)
        return st, (f"stopping: {msg}" if group == AppState.FAILED else "")
    return st, ""
