"""``slurm_jobs``: a Slurm scheduler where a multi-role app is ONE heterogeneous job.

* one role → one job, its replicas are the job's tasks; several roles → one heterogeneous job
  (``#SBATCH hetjob``), one component per role with that role's cpus/mem/gpus, so Slurm starts
  all roles together or none (gang allocation);
* each replica is its own ``srun`` step (placed on the node Slurm allocated for that task), so
  TorchX macros (``${replica_id}``) are exact and every replica has its own log and exit code;
* the batch script applies the group rules of :mod:`torchx_ext.groups` (services stopped when the
  main roles end; final state from the main roles) and exits with the deciding exit code; it
  records per-replica results in the job directory (see :mod:`.slurm_jobs_script`);
* the app id IS the Slurm job id (``squeue -j <app id>`` works); status comes from ``scontrol``
  while slurmctld knows the job, ``sacct`` where accounting exists, then the job directory;
* dependencies are Slurm's own ``--dependency=afterok`` with ``--kill-on-invalid-dep=yes``;
* restarts (``Role.max_retries``) happen inside the allocation, in the batch script; an app with
  retries is submitted ``--requeue`` and a requeue by Slurm is one more restart (README: Retries).

State lives under ``$TORCHX_EXT_HOME/slurm_jobs/<job id>/`` (``app.json``; also the job directory
unless ``job_dir`` is set), so any shell can query any app. Run ``torchx`` where ``sbatch`` works.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal as signal_module
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, Callable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, ReplicaStatus, Role, RoleStatus, is_terminal, macros
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import state
from torchx_ext import support as matrices
from torchx_ext.errors import BackendError, DependencyError, InvalidAppError, InvalidOptionError, SchedulerUnavailable
from torchx_ext.executors import GROUP_CAPABILITIES, Executor, option, retry_backoff_option
from torchx_ext.groups import ReplicaOutcome, group_state, is_service, role_env_suffix
from torchx_ext.schedulers import slurm_jobs_client as sc
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, copy_workspace, is_current_dir, role_summaries
from torchx_ext.schedulers.ray_jobs_cluster.rules import retry_policy_name
from torchx_ext.schedulers.slurm_jobs_script import (
    APP_ID_TOKEN,
    DEP_NEVER,
    MARKER,
    ReplicaCommand,
    RoleComponent,
    ScriptSpec,
    SlurmJob,
    app_state_of,
    parse_result,
    render,
    signal_reason,
)

SCHEDULER = "slurm_jobs"
_JOB_ID = re.compile(r"^[0-9]+$")


@dataclass
class SlurmJobsExecutor(Executor):
    """Run options of the ``slurm_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = GROUP_CAPABILITIES

    partition: Optional[str] = option(None, help="Slurm partition (every role's component)")
    time: Optional[str] = option(None, help="time limit, in any sbatch --time format (e.g. 1:00:00)")
    signal: Optional[str] = option(
        None, help="a signal for every replica's process before the time limit, as SIG[@SECONDS] "
        "(sbatch --signal; e.g. USR1@120: SIGUSR1 about 120 s before; Slurm may send it up to 60 s early) "
        "so a training script can checkpoint")
    account: Optional[str] = option(None, help="account to charge (sbatch --account)")
    qos: Optional[str] = option(None, help="quality of service (sbatch --qos)")
    constraint: Optional[str] = option(None, help="node features (sbatch --constraint)")
    exclusive: bool = option(False, help="whole nodes only (sbatch --exclusive)")
    gpus_per_node: Optional[int] = option(
        None, help="GPUs per node for the roles that ask for GPUs (sbatch --gpus-per-node) instead "
        "of resource.gpu per replica (--gpus-per-task); their steps then see all GPUs of the node"
    )
    ntasks_per_node: Optional[int] = option(
        None, help="replicas per node (sbatch --ntasks-per-node; nodes = ceil(replicas / this)); "
        "default: Slurm packs replicas as resources allow"
    )
    retry_backoff_s: float = retry_backoff_option()
    mail_user: Optional[str] = option(None, help="who gets Slurm's mail (sbatch --mail-user)")
    mail_type: Optional[str] = option(None, help="when Slurm sends mail, e.g. END,FAIL (sbatch --mail-type)")
    sbatch_args: Optional[list[str]] = option(
        None, help="extra sbatch options, one per item as --name=value, added to every role's component"
    )
    srun_args: Optional[list[str]] = option(
        None, help="extra srun options, one per item as --name=value, added to every replica's step"
    )
    job_dir: Optional[str] = option(
        None, help="directory for job directories (<job_dir>/<job id>/: logs, exit codes) and "
        "slurm-<job id>.out; must be visible from the nodes (default: $TORCHX_EXT_HOME/slurm_jobs)"
    )
    container_image: Optional[str] = option(
        None, help="run every replica in this container image (pyxis: srun --container-image); "
        "an absolute role image is then the working directory in the container"
    )
    container_mounts: Optional[list[str]] = option(
        None, help="pyxis mounts, SRC:DST[:FLAGS] per item (srun --container-mounts)"
    )


@dataclass
class SlurmJobsRequest:
    """What ``schedule`` performs: the script spec; ``--dryrun`` prints the script itself."""

    spec: ScriptSpec
    roles: list[dict[str, Any]]

    def __repr__(self) -> str:
        return render(self.spec)


def _dirname(role_name: str) -> str:
    # distinct for names validate_app accepts: two names mapping here also share an env suffix
    return re.sub(r"[^A-Za-z0-9_-]", "_", role_name) or "_"


def _job_name(app_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", app_name)[:64].strip("-") or "app"


def _record_dir(app_id: str) -> str:
    # one place per user (not the cwd, not per option): any shell finds any app
    return state.scheduler_dir(SCHEDULER, app_id)


_SIGNAL = re.compile(r"(?:SIG)?([A-Z][A-Z0-9]*|[0-9]+)(?:@([0-9]+))?")


def _signal_option(value: str) -> str:
    """``signal`` as sbatch --signal wants it, refusing what would not reach the replicas."""
    m = _SIGNAL.fullmatch(value.strip().upper())
    if not m or (not m.group(1).isdigit() and not hasattr(signal_module.Signals, "SIG" + m.group(1))):
        raise InvalidOptionError(
            f"signal={value!r}: give a signal name or number and, optionally, @SECONDS before the time "
            "limit (e.g. USR1@120); 'B:' (the batch shell only) is not offered: it would not reach the replicas")
    return m.group(1) + (f"@{m.group(2)}" if m.group(2) else "")


class SlurmJobsScheduler(WorkspaceMixin[None], ExtScheduler[SlurmJobsExecutor]):
    """Slurm jobs, one (heterogeneous) job per app. See the module docstring."""

    executor_cls = SlurmJobsExecutor
    support = matrices.SLURM_JOBS
    name_forms = {"job directory": _dirname}

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__(session_name, **kwargs)
        self._slurm = sc.SlurmClient()

    # ------------------------------------------------------------------ dry-run -----
    def _build_request(self, app: AppDef, ex: SlurmJobsExecutor, dependencies: list[str]) -> SlurmJobsRequest:
        for dep in dependencies:
            if not _JOB_ID.match(dep):
                raise DependencyError(f"dependency '{dep}' is not a Slurm job id ({SCHEDULER} app ids are job ids)")
        job_root = os.path.abspath(os.path.expanduser(ex.job_dir or state.scheduler_dir(SCHEDULER)))
        shared: list[str] = []
        for key in ("partition", "time", "account", "qos"):
            if getattr(ex, key):
                shared.append(f"--{key}={getattr(ex, key)}")
        if ex.exclusive:
            shared.append("--exclusive")
        shared += ex.sbatch_args or []
        job_opts = [f"--job-name={_job_name(app.name)}", f"--comment={MARKER}",
                    # %% is a literal % in Slurm's filename patterns; %j is the job id
                    f"--output={job_root.replace('%', '%%')}/slurm-%j.out", "--open-mode=append",
                    # with retries Slurm may requeue it (preemption, a node failure, scontrol requeue);
                    # without, it must not, behind the user's back
                    "--requeue" if any(r.max_retries for r in app.roles) else "--no-requeue"]
        for key in ("mail_user", "mail_type"):
            if getattr(ex, key):
                job_opts.append(f"--{key.replace('_', '-')}={getattr(ex, key)}")
        if ex.signal:
            job_opts.append(f"--signal={_signal_option(ex.signal)}")
        if ex.retry_backoff_s < 0:
            raise InvalidOptionError(f"retry_backoff_s={ex.retry_backoff_s}: a delay in seconds, >= 0")
        components = [self._component(role, ex) for role in app.roles]
        spec = ScriptSpec(app_name=app.name, job_root=job_root, job_opts=job_opts, shared_opts=shared,
                          dependencies=dependencies, components=components,
                          container=bool(ex.container_image), retry_backoff_s=float(ex.retry_backoff_s))
        roles = [{**summary, "dirname": _dirname(summary["name"])} for summary in role_summaries(app)]
        return SlurmJobsRequest(spec=spec, roles=roles)

    @staticmethod
    def _component(role: Role, ex: SlurmJobsExecutor) -> RoleComponent:
        n = role.num_replicas
        res = role.resource
        sbatch = [f"--ntasks={n}"]
        if ex.ntasks_per_node:
            sbatch += [f"--nodes={math.ceil(n / ex.ntasks_per_node)}", f"--ntasks-per-node={ex.ntasks_per_node}"]
        step = ["--nodes=1", "--ntasks=1", "--exact", "--export=ALL"]
        res_opts = []
        if res.cpu > 0:
            res_opts.append(f"--cpus-per-task={math.ceil(res.cpu)}")
        if res.memMB > 0:
            # per CPU, so that replicas packed onto one node add up
            res_opts.append(f"--mem-per-cpu={math.ceil(res.memMB / max(math.ceil(res.cpu), 1))}")
        sbatch += res_opts
        step += res_opts
        if res.gpu > 0 and ex.gpus_per_node:
            sbatch.append(f"--gpus-per-node={ex.gpus_per_node}")
        elif res.gpu > 0:
            sbatch.append(f"--gpus-per-task={res.gpu}")
            step.append(f"--gpus-per-task={res.gpu}")
        caps = dict(res.capabilities or {})
        features = [ex.constraint] if ex.constraint else []
        features += [name for name, value in caps.items() if value is True]
        if features:
            sbatch.append(f"--constraint={'&'.join(features)}")
        gres = [f"{name}:{value}" for name, value in caps.items() if value is not True and value]
        if gres:
            sbatch.append(f"--gres={','.join(gres)}")
        if role.mounts and not ex.container_image:
            raise InvalidAppError(f"role '{role.name}': Role.mounts need a container on {SCHEDULER}: set "
                                  "container_image (pyxis); a bare step sees the nodes' filesystems as they are")
        workdir = os.path.abspath(role.image) if role.image and os.path.isdir(role.image) else None
        if ex.container_image:
            step.append(f"--container-image={ex.container_image}")
            mounts = list(ex.container_mounts or [])
            mounts += [f"{m.src_path}:{m.dst_path}" + (":ro" if m.read_only else "") for m in role.mounts]
            if workdir:  # a workspace copy (or any local directory): visible at the same path inside
                mounts.append(f"{workdir}:{workdir}")
            if mounts:
                step.append(f"--container-mounts={','.join(mounts)}")
            if role.image and role.image.startswith("/"):
                workdir = role.image
                step.append(f"--container-workdir={role.image}")
        elif workdir:
            step.append(f"--chdir={workdir}")
        step += ex.srun_args or []
        comp = RoleComponent(
            name=role.name, dirname=_dirname(role.name), env_suffix=role_env_suffix(role.name),
            service=is_service(role), num_replicas=n, sbatch_opts=sbatch, srun_opts=step,
            max_retries=role.max_retries, retry_policy=retry_policy_name(role.retry_policy),
        )
        for k in range(n):
            values = macros.Values(img_root=workdir or role.image, app_id=APP_ID_TOKEN,
                                   replica_id=str(k), rank0_env="TORCHX_RANK0_HOST")
            r = values.apply(role)
            comp.replicas.append(ReplicaCommand(k, [r.entrypoint, *r.args], dict(r.env)))
        return comp

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Runs the role in a copy of ``workspace`` (minus ``.torchxignore`` matches) under the job root
        (``job_dir``, which the nodes must see), as TorchX's DirWorkspace does; with container_image it
        is mounted at the same path. The current directory (the CLI's default) runs in place, as
        sbatch does anyway; ``--workspace ""`` runs without one."""
        if is_current_dir(workspace):
            return
        job_root = os.path.abspath(os.path.expanduser(str(cfg.get("job_dir") or state.scheduler_dir(SCHEDULER))))
        target = os.path.join(job_root, "workspaces", uuid.uuid4().hex[:12])
        with self._translated("copy the workspace"):
            copy_workspace(workspace, target)
        role.image = target

    # ------------------------------------------------------------------ submit ------
    def _schedule(self, req: SlurmJobsRequest) -> str:
        deps = self._resolve_dependencies(req.spec.dependencies)
        spec = replace(req.spec, dependencies=deps)
        state.makedirs(spec.job_root)  # sbatch needs it for slurm-<id>.out
        script = render(spec)
        proc = sc.run(["sbatch", "--parsable"], stdin=script)
        if proc.returncode != 0:
            err = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
            if sc.unreachable(proc):
                raise SchedulerUnavailable(f"sbatch could not reach slurmctld: {err}")
            raise BackendError(f"sbatch rejected the job: {err}")
        job_id = proc.stdout.strip().split(";")[0]
        app_dir = os.path.join(spec.job_root, job_id)
        for d in (app_dir, _record_dir(job_id)):
            # private, like the script's env values and logs (the job may have created it already)
            state.makedirs(d, mode=0o700)
            os.chmod(d, 0o700)
        with open(os.open(os.path.join(app_dir, "script.sbatch"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  "w") as f:
            f.write(script)
        state.write_json(os.path.join(_record_dir(job_id), "app.json"), {
            "app_id": job_id, "app_name": spec.app_name, "job_dir": app_dir, "job_root": spec.job_root,
            "roles": req.roles, "dependencies": req.spec.dependencies, "submitted": time.time(),
            "spec": asdict(spec),  # the request as submitted, for describe_native
        })
        return job_id

    def _resolve_dependencies(self, deps: list[str]) -> list[str]:
        """The dependencies Slurm must still wait for; errors for unknown or failed ones.

        A dependency slurmctld has already forgotten (MinJobAge) cannot go into --dependency
        (sbatch rejects it): if it is known to have succeeded it is simply satisfied.
        """
        keep = []
        for dep in deps:
            job, err = self._slurm.job(dep)
            if err:
                raise SchedulerUnavailable(f"cannot check dependency {dep}: {err}")
            if job is not None:
                keep.append(dep)
                continue
            job = self._slurm.sacct_job(dep)
            st = job.app_state if job else self._state_from_files(dep)[0]
            if st == AppState.SUCCEEDED:
                continue
            if is_terminal(st):
                raise DependencyError(f"dependency {dep} ended {st.name}; this app could never start")
            raise DependencyError(
                f"dependency '{dep}' does not exist: Slurm does not know job {dep} and it is not "
                f"a {SCHEDULER} app recorded under {state.scheduler_dir(SCHEDULER)}"
            )
        return keep

    # ------------------------------------------------------------------ records -----
    @staticmethod
    def _record(app_id: str) -> Optional[dict[str, Any]]:
        if not _JOB_ID.match(app_id or ""):
            return None
        return state.read_json(os.path.join(_record_dir(app_id), "app.json"))

    def _describe_native(self, app_id: str) -> Optional[SlurmJobsRequest]:
        record = self._record(app_id)
        if record is None or "spec" not in record:
            return None
        return SlurmJobsRequest(spec=ScriptSpec.from_dict(record["spec"]), roles=record.get("roles", []))

    def _state_from_files(self, app_id: str) -> tuple[AppState, str]:
        """The verdict the batch script left, for jobs Slurm has forgotten (no accounting)."""
        record = self._record(app_id)
        return (AppState.UNKNOWN, "") if record is None else sc.verdict_from_files(app_id, record["job_dir"])

    # ------------------------------------------------------------------ describe ----
    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        if not _JOB_ID.match(app_id or ""):
            return None
        record = self._record(app_id)
        job, err = self._slurm.job(app_id)
        if job is None and err is None:
            job = self._slurm.sacct_job(app_id)
        if record is None:
            if err:
                raise SchedulerUnavailable(err)
            return None  # not an app of ours (or deleted): Slurm may still list the job for a while
        roles, statuses, outcomes = self._replicas(record, job)
        st, msg = self._app_state(app_id, record, job, err, outcomes)
        return DescribeAppResponse(app_id=app_id, state=st, msg=msg, roles=roles, roles_statuses=statuses,
                                   num_restarts=self._num_restarts(record, job))

    @staticmethod
    def _num_restarts(record: dict[str, Any], job: Optional[SlurmJob]) -> int:
        """Restarts inside the allocation (a line each in the job directory's ``restarts``) plus
        Slurm's requeues (slurmctld's count; the script's own record once Slurm forgot the job)."""
        text = sc.read_text(os.path.join(record["job_dir"], "restarts")) or ""
        requeues = max(sc.read_int(os.path.join(record["job_dir"], "requeues")) or 0, job.restarts if job else 0)
        return len(text.splitlines()) + requeues

    def _replicas(
        self, record: dict[str, Any], job: Optional[SlurmJob]
    ) -> tuple[list[Role], list[RoleStatus], list[ReplicaOutcome]]:
        job_dir = record["job_dir"]
        job_state = job.app_state if job else self._state_from_files(record["app_id"])[0]
        result = parse_result(sc.read_text(os.path.join(job_dir, "result")))
        roles, statuses, outcomes = [], [], []
        for summary in record.get("roles", []):
            name, service = summary["name"], summary["service"]
            roles.append(Role(name=name, image=summary["image"], entrypoint=summary["entrypoint"],
                              num_replicas=summary["num_replicas"]))
            replicas = []
            for k in range(summary["num_replicas"]):
                rdir = os.path.join(job_dir, summary["dirname"], str(k))
                code = sc.read_int(os.path.join(rdir, "exit"))
                host = (sc.read_text(os.path.join(rdir, "host")) or "").split()
                shown = outcome = AppState.PENDING
                if job_state == AppState.PENDING:
                    pass  # requeued: what the last run left is not this run's
                elif code is not None and os.path.exists(os.path.join(rdir, "stopped")):
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
                if outcome in (AppState.FAILED, AppState.SUCCEEDED) and code:
                    reason = signal_reason(code) or sc.last_error(os.path.join(rdir, "log"))
                if outcome in (AppState.FAILED, AppState.SUCCEEDED):
                    # out of restarts: "after 3 attempts (REPLICA policy, max_retries=2)"
                    attempts = (sc.read_text(os.path.join(rdir, "reason")) or "").strip()
                    reason = "; ".join(x for x in (reason, attempts) if x)
                outcomes.append(ReplicaOutcome(name, k, service, outcome, code, reason))
                replicas.append(ReplicaStatus(id=k, state=shown, role=name, hostname=host[-1] if host else ""))
            statuses.append(RoleStatus(name, replicas))
        return roles, statuses, outcomes

    def _app_state(
        self, app_id: str, record: dict[str, Any], job: Optional[SlurmJob], err: Optional[str],
        outcomes: list[ReplicaOutcome],
    ) -> tuple[AppState, str]:
        out_file = os.path.join(record.get("job_root", ""), f"slurm-{app_id}.out")
        if job is None:
            st, msg = self._state_from_files(app_id)
            if st == AppState.UNKNOWN and err:
                msg = f"slurmctld unreachable: {err}"
            if st == AppState.FAILED:
                msg = group_state(outcomes)[1] or f"the job failed; see {out_file}"
            return st, msg
        st = job.app_state
        reason = job.reason if job.reason not in ("", "None") else ""
        if job.reason == DEP_NEVER:
            failed = re.findall(r"(\d+)(?:_\*)?\(failed\)", job.dependency) or record.get("dependencies", [])
            return st, (f"dependency {', '.join(failed)} did not succeed, so Slurm cancelled this job "
                        f"({DEP_NEVER})")
        if st == AppState.PENDING:
            return st, f"pending in Slurm: {reason}" if reason else ""
        if st == AppState.CANCELLED:
            return st, "cancelled" + (f" ({reason})" if reason else "")
        if st == AppState.FAILED:
            group, msg = group_state(outcomes)
            if group == AppState.FAILED and job.state.startswith("FAILED"):
                return st, msg
            detail = f"Slurm: {job.state}" + (f" ({reason})" if reason else "")
            if job.state.startswith("NODE_FAIL"):  # not requeued: this app asked for no retries
                detail += f": a node of the job ({job.nodes or 'unknown'}) failed, so Slurm ended it"
            if job.exit_code or job.signal:
                detail += f", batch script exit code {job.exit_code}" + (f" signal {job.signal}" if job.signal else "")
            return st, f"{detail}; {msg + '; ' if msg else ''}see {out_file}"
        if st == AppState.RUNNING:
            group, msg = group_state(outcomes)
            return st, (f"stopping: {msg}" if group == AppState.FAILED else "")
        return st, ""

    # ------------------------------------------------------------------ list/cancel -
    def _list(self, cfg: Any) -> list[ListAppResponse]:
        try:
            ours = {d for d in os.listdir(state.scheduler_dir(SCHEDULER)) if _JOB_ID.match(d)}
        except FileNotFoundError:
            ours = set()
        return [self.listed(j["job_id"], app_state_of(j["state"], j["reason"]),
                            (self._record(j["job_id"]) or {}).get("app_name", ""))
                for j in self._slurm.squeue_jobs()
                if j["leader"] and (j["comment"] == MARKER or j["job_id"] in ours)]

    def _cancel(self, app_id: str) -> None:
        if not _JOB_ID.match(app_id or ""):
            return
        job, err = self._slurm.job(app_id)
        if err:
            raise SchedulerUnavailable(f"cannot cancel {app_id}: {err}")
        if job is None or is_terminal(job.app_state):
            return  # idempotent: nothing to do for a finished or forgotten job
        record = self._record(app_id)
        if record is not None and os.path.isdir(record["job_dir"]):
            # remembered for when Slurm has forgotten the job (no accounting)
            open(os.path.join(record["job_dir"], "cancelled"), "w").close()
        proc = sc.run(["scancel", app_id])
        if sc.unreachable(proc):  # any other error: the job ended meanwhile, which is what we want
            raise SchedulerUnavailable(f"scancel could not reach slurmctld: {proc.stderr.strip()}")

    def _delete(self, app_id: str) -> None:
        record = self._record(app_id)
        self._cancel(app_id)
        if record is not None:
            shutil.rmtree(record["job_dir"], ignore_errors=True)
            shutil.rmtree(_record_dir(app_id), ignore_errors=True)

    # ------------------------------------------------------------------ logs --------
    def _replica_counts(self, app_id: str) -> Optional[dict[str, int]]:
        record = self._record(app_id)
        return None if record is None else {r["name"]: r["num_replicas"] for r in record.get("roles", [])}

    def _log_source(
        self, app_id: str, role_name: str, k: int, streams: Optional[Stream],
        since: Optional[datetime], until: Optional[datetime],
    ) -> tuple[ReadNew, Optional[Callable[[], bool]]]:
        record = self._record(app_id) or {}
        dirname = next(r["dirname"] for r in record.get("roles", []) if r["name"] == role_name)
        tag = {Stream.STDOUT: b"O", Stream.STDERR: b"E"}.get(streams)
        path = os.path.join(record.get("job_dir", ""), dirname, str(k), "log")
        return state.StampedLineReader(path, tagged=True, want_tag=tag).read_new, None


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmJobsScheduler:
    return SlurmJobsScheduler(session_name, **kwargs)
