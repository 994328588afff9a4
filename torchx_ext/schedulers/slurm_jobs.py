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
* dependencies are Slurm's own ``--dependency=afterok`` with ``--kill-on-invalid-dep=yes``.

State lives under ``$TORCHX_EXT_HOME/slurm_jobs/<job id>/`` (``app.json``; also the job directory
unless ``job_dir`` is set), never in the current directory, so any shell can query any app.
Remote submission over SSH is not implemented: run ``torchx`` where ``sbatch`` works.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, macros, runopts

from torchx_ext import cli_errors, compat
from torchx_ext.errors import DependencyError, SchedulerUnavailable
from torchx_ext.executors import Capabilities, Executor, check_options, option, runopts_for
from torchx_ext.groups import (
    ReplicaOutcome, app_handle_id, group_state, handle_scheduler, is_service, role_env_suffix, validate_app,
)
from torchx_ext.logs import TimedLine, filter_lines, follow
from torchx_ext.schedulers import host_supervisor as sup
from torchx_ext.schedulers.slurm_jobs_script import (
    APP_ID_TOKEN, DEP_NEVER, MARKER, ReplicaCommand, RoleComponent, ScriptSpec, SlurmJob, app_state_of,
    parse_result, parse_sacct, parse_scontrol_job, render, signal_reason,
)

SCHEDULER = "slurm_jobs"

_TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}
_JOB_ID = re.compile(r"^[0-9]+$")
# what Slurm's clients print when slurmctld cannot be reached (retrying is the caller's choice)
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                "Zero Bytes were transmitted", "Connection timed out")


@dataclass
class SlurmJobsExecutor(Executor):
    """Run options of the ``slurm_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = Capabilities(
        heterogeneous_groups=True, services=True, dependencies=True,
        persistent_status=True, discovery_env=True,
    )

    partition: Optional[str] = option(None, help="Slurm partition (every role's component)")
    time: Optional[str] = option(None, help="time limit, in any sbatch --time format (e.g. 1:00:00)")
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

    @property
    def script(self) -> str:
        return render(self.spec)

    def __repr__(self) -> str:
        return self.script


def _run(cmd: list[str], stdin: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SchedulerUnavailable(
            f"'{cmd[0]}' was not found: run torchx where Slurm's client commands are on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(f"'{' '.join(cmd[:3])}' did not answer within {timeout:.0f} s") from None


def _unreachable(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 and any(s in proc.stderr for s in _UNREACHABLE)


def _state_root() -> str:
    # one place per user (not the cwd, not per option): any shell finds any app
    return os.path.join(sup.home(), SCHEDULER)


def _dirname(role_name: str) -> str:
    # distinct for names validate_app accepts: two names mapping here also share an env suffix
    return re.sub(r"[^A-Za-z0-9_-]", "_", role_name) or "_"


def _job_name(app_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", app_name)[:64].strip("-") or "app"


def _last_error(log_path: str) -> str:
    """The last stderr line of a replica log that is not srun's own summary (why it failed)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(os.path.getsize(log_path) - 16384, 0))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        _stamp, _, rest = line.partition(" ")
        tag, _, text = rest.partition(" ")
        if tag == "E" and text.strip() and not text.startswith("srun: "):
            return text.strip()[:300]
    return ""


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_int(path: str) -> Optional[int]:
    text = _read(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


class SlurmJobsScheduler(Scheduler[Mapping[str, Any]]):
    """Slurm jobs, one (heterogeneous) job per app. See the module docstring."""

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        # no Slurm call here: TorchX builds throwaway instances just to read the run options
        super().__init__(SCHEDULER, session_name)
        self._accounting: Optional[bool] = None

    # ------------------------------------------------------------------ options -----
    def _run_opts(self) -> runopts:
        return runopts_for(SlurmJobsExecutor)

    def _validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        validate_app(app)

    # ------------------------------------------------------------------ dry-run -----
    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> AppDryRunInfo:
        check_options(SCHEDULER, cfg, self.run_opts())
        validate_app(app)
        deps = []
        for d in compat.as_list(cfg.get("dependencies")):
            if handle_scheduler(d) not in (None, SCHEDULER):
                raise DependencyError(
                    f"dependency '{d}' belongs to scheduler '{handle_scheduler(d)}'; "
                    f"a {SCHEDULER} app can only depend on {SCHEDULER} apps (Slurm jobs)"
                )
            dep_id = app_handle_id(d)
            if not _JOB_ID.match(dep_id):
                raise DependencyError(f"dependency '{d}' is not a Slurm job id ({SCHEDULER} app ids are job ids)")
            deps.append(dep_id)
        job_root = os.path.abspath(os.path.expanduser(str(cfg.get("job_dir") or _state_root())))

        shared: list[str] = []
        for key in ("partition", "time", "account", "qos", "constraint"):
            if cfg.get(key):
                shared.append(f"--{key}={cfg[key]}")
        if cfg.get("exclusive"):
            shared.append("--exclusive")
        shared += compat.as_list(cfg.get("sbatch_args"))
        job_opts = [f"--job-name={_job_name(app.name)}", f"--comment={MARKER}",
                    # %% is a literal % in Slurm's filename patterns; %j is the job id
                    f"--output={job_root.replace('%', '%%')}/slurm-%j.out", "--open-mode=append"]
        for key in ("mail_user", "mail_type"):
            if cfg.get(key):
                job_opts.append(f"--{key.replace('_', '-')}={cfg[key]}")

        components = [self._component(role, cfg) for role in app.roles]
        spec = ScriptSpec(app_name=app.name, job_root=job_root, job_opts=job_opts, shared_opts=shared,
                          dependencies=deps, components=components)
        roles = [{"name": r.name, "dirname": _dirname(r.name), "image": r.image, "entrypoint": r.entrypoint,
                  "num_replicas": r.num_replicas, "service": is_service(r)} for r in app.roles]
        return compat.make_dryrun_info(SlurmJobsRequest(spec=spec, roles=roles), repr)

    @staticmethod
    def _component(role: Role, cfg: Mapping[str, Any]) -> RoleComponent:
        n = role.num_replicas
        res = role.resource
        sbatch = [f"--ntasks={n}"]
        per_node = cfg.get("ntasks_per_node")
        if per_node:
            sbatch += [f"--nodes={math.ceil(n / int(per_node))}", f"--ntasks-per-node={int(per_node)}"]
        step = ["--nodes=1", "--ntasks=1", "--exact", "--export=ALL"]
        res_opts = []
        if res.cpu > 0:
            res_opts.append(f"--cpus-per-task={math.ceil(res.cpu)}")
        if res.memMB > 0:
            # per CPU, so that replicas packed onto one node add up
            res_opts.append(f"--mem-per-cpu={math.ceil(res.memMB / max(math.ceil(res.cpu), 1))}")
        sbatch += res_opts
        step += res_opts
        if res.gpu > 0 and cfg.get("gpus_per_node"):
            sbatch.append(f"--gpus-per-node={int(cfg['gpus_per_node'])}")
        elif res.gpu > 0:
            sbatch.append(f"--gpus-per-task={res.gpu}")
            step.append(f"--gpus-per-task={res.gpu}")
        workdir = os.path.abspath(role.image) if role.image and os.path.isdir(role.image) else None
        if cfg.get("container_image"):
            step.append(f"--container-image={cfg['container_image']}")
            mounts = compat.as_list(cfg.get("container_mounts"))
            if mounts:
                step.append(f"--container-mounts={','.join(mounts)}")
            if role.image and role.image.startswith("/"):
                workdir = role.image
                step.append(f"--container-workdir={role.image}")
        elif workdir:
            step.append(f"--chdir={workdir}")
        step += compat.as_list(cfg.get("srun_args"))
        comp = RoleComponent(
            name=role.name, dirname=_dirname(role.name), env_suffix=role_env_suffix(role.name),
            service=is_service(role), num_replicas=n, sbatch_opts=sbatch, srun_opts=step,
        )
        for k in range(n):
            values = macros.Values(img_root=workdir or role.image, app_id=APP_ID_TOKEN,
                                   replica_id=str(k), rank0_env="TORCHX_RANK0_HOST")
            r = values.apply(role)
            comp.replicas.append(ReplicaCommand(k, [r.entrypoint, *r.args], dict(r.env)))
        return comp

    # ------------------------------------------------------------------ submit ------
    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: SlurmJobsRequest = dryrun_info.request
        deps = self._resolve_dependencies(req.spec.dependencies)
        spec = replace(req.spec, dependencies=deps)
        os.makedirs(spec.job_root, exist_ok=True)  # sbatch needs it for slurm-<id>.out
        script = render(spec)
        proc = _run(["sbatch", "--parsable"], stdin=script)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if _unreachable(proc):
                raise SchedulerUnavailable(f"sbatch could not reach slurmctld: {err}")
            if "dependency" in err.lower():
                raise DependencyError(f"sbatch rejected the dependencies {deps}: {err}")
            raise ValueError(f"sbatch rejected the job: {err}")
        job_id = proc.stdout.strip().split(";")[0]
        app_dir = os.path.join(spec.job_root, job_id)
        record_dir = os.path.join(_state_root(), job_id)
        for d in (app_dir, record_dir):
            # private, like the script's env values and logs (the job may have created it already)
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        with open(os.open(os.path.join(app_dir, "script.sbatch"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  "w", encoding="utf-8") as f:
            f.write(script)
        sup.write_json(os.path.join(record_dir, "app.json"), {
            "app_id": job_id, "app_name": spec.app_name, "job_dir": app_dir, "job_root": spec.job_root,
            "roles": req.roles, "dependencies": req.spec.dependencies, "submitted": time.time(),
        })
        return job_id

    def _resolve_dependencies(self, deps: list[str]) -> list[str]:
        """The dependencies Slurm must still wait for; errors for unknown or failed ones.

        A dependency slurmctld has already forgotten (MinJobAge) cannot go into --dependency
        (sbatch rejects it): if it is known to have succeeded it is simply satisfied.
        """
        keep = []
        for dep in deps:
            job, err = self._slurm_job(dep)
            if err:
                raise SchedulerUnavailable(f"cannot check dependency {dep}: {err}")
            if job is not None:
                keep.append(dep)
                continue
            job = self._sacct_job(dep)
            state = job.app_state if job else self._state_from_files(dep)[0]
            if state == AppState.SUCCEEDED:
                continue
            if state in _TERMINAL:
                raise DependencyError(f"dependency {dep} ended {state.name}; this app could never start")
            raise DependencyError(
                f"dependency '{dep}' does not exist: Slurm does not know job {dep} and it is not "
                f"a {SCHEDULER} app recorded under {_state_root()}"
            )
        return keep

    # ------------------------------------------------------------------ Slurm queries --
    def _slurm_job(self, job_id: str) -> tuple[Optional[SlurmJob], Optional[str]]:
        """(job, None) if slurmctld knows it, (None, None) if not, (None, error) if unreachable."""
        proc = _run(["scontrol", "show", "job", "-o", job_id])
        if proc.returncode == 0:
            return parse_scontrol_job(proc.stdout, job_id), None
        if _unreachable(proc):
            return None, proc.stderr.strip()
        return None, None  # "Invalid job id specified": purged or never existed

    def _sacct_job(self, job_id: str) -> Optional[SlurmJob]:
        if self._accounting is False:
            return None
        try:
            proc = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"])
        except SchedulerUnavailable:
            self._accounting = False
            return None
        if proc.returncode != 0:  # "accounting storage is disabled" (or no slurmdbd)
            self._accounting = False
            return None
        self._accounting = True
        return parse_sacct(proc.stdout, job_id)

    def squeue_jobs(self) -> list[dict[str, Any]]:
        """All jobs slurmctld knows, in ONE call: ``squeue --json`` (``-o`` fallback for old Slurm)."""
        proc = _run(["squeue", "--json"])
        if proc.returncode == 0:
            import json

            return [
                {"job_id": str(j["job_id"]), "state": j.get("job_state", ""), "reason": j.get("state_reason", ""),
                 "comment": j.get("comment") or "",
                 "leader": j.get("het_job_id") in (0, None, j["job_id"]) and not j.get("het_job_offset")}
                for j in json.loads(proc.stdout).get("jobs", [])
            ]
        if _unreachable(proc):
            raise SchedulerUnavailable(f"squeue could not reach slurmctld: {proc.stderr.strip()}")
        return self._squeue_formatted()

    @staticmethod
    def _squeue_formatted() -> list[dict[str, Any]]:
        # %i is "<id>+<offset>" for het components; the comment is last (it may hold any text)
        proc = _run(["squeue", "-h", "-a", "-t", "all", "-o", "%i|%T|%r|%k"])
        if proc.returncode != 0:
            raise SchedulerUnavailable(f"squeue failed: {proc.stderr.strip()}")
        out = []
        for line in proc.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) == 4:
                jid, _, offset = parts[0].partition("+")
                out.append({"job_id": jid, "state": parts[1], "reason": parts[2],
                            "comment": parts[3], "leader": offset in ("", "0")})
        return out

    # ------------------------------------------------------------------ records -----
    @staticmethod
    def _record(app_id: str) -> Optional[dict[str, Any]]:
        if not _JOB_ID.match(app_id or ""):
            return None
        return sup.read_json(os.path.join(_state_root(), app_id, "app.json"))

    def _state_from_files(self, app_id: str) -> tuple[AppState, str]:
        """The verdict the batch script left, for jobs Slurm has forgotten (no accounting)."""
        record = self._record(app_id)
        if record is None:
            return AppState.UNKNOWN, ""
        result = parse_result(_read(os.path.join(record["job_dir"], "result")))
        if result is not None:
            return (AppState.SUCCEEDED if result[0] == 0 else AppState.FAILED), ""
        if os.path.exists(os.path.join(record["job_dir"], "cancelled")):
            return AppState.CANCELLED, "cancelled by user"
        return AppState.UNKNOWN, (
            f"Slurm no longer knows job {app_id} and has no accounting (sacct); "
            f"its job directory {record['job_dir']} has no result"
        )

    # ------------------------------------------------------------------ describe ----
    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        if not _JOB_ID.match(app_id or ""):
            return None
        record = self._record(app_id)
        job, err = self._slurm_job(app_id)
        if job is None and err is None:
            job = self._sacct_job(app_id)
        if record is None:
            if err:
                raise SchedulerUnavailable(err)
            if job is None:
                return None
            # a Slurm job not started by us: its state, no roles
            return DescribeAppResponse(app_id=app_id, state=job.app_state, msg=f"Slurm: {job.state}")
        roles, statuses, outcomes = self._replicas(record, job)
        state, msg = self._app_state(app_id, record, job, err, outcomes)
        return DescribeAppResponse(app_id=app_id, state=state, msg=msg, roles=roles, roles_statuses=statuses)

    def _replicas(
        self, record: dict[str, Any], job: Optional[SlurmJob]
    ) -> tuple[list[Role], list[RoleStatus], list[ReplicaOutcome]]:
        job_dir = record["job_dir"]
        job_state = job.app_state if job else self._state_from_files(record["app_id"])[0]
        result = parse_result(_read(os.path.join(job_dir, "result")))
        roles, statuses, outcomes = [], [], []
        for summary in record.get("roles", []):
            name, service = summary["name"], summary["service"]
            roles.append(Role(name=name, image=summary["image"], entrypoint=summary["entrypoint"],
                              num_replicas=summary["num_replicas"]))
            replicas = []
            for k in range(summary["num_replicas"]):
                rdir = os.path.join(job_dir, summary["dirname"], str(k))
                code = _read_int(os.path.join(rdir, "exit"))
                host = (_read(os.path.join(rdir, "host")) or "").split()
                shown = outcome = AppState.PENDING
                if code is not None and os.path.exists(os.path.join(rdir, "stopped")):
                    # the group stopped it: judged as it was then (running), shown as stopped
                    outcome = AppState.RUNNING
                    ok = result is not None and result[0] == 0
                    shown = AppState.SUCCEEDED if service and ok else AppState.CANCELLED
                elif code is not None:
                    shown = outcome = AppState.SUCCEEDED if code == 0 else AppState.FAILED
                elif job_state in _TERMINAL:
                    shown = outcome = AppState.CANCELLED if job_state == AppState.SUCCEEDED else job_state
                elif host and job_state == AppState.RUNNING:
                    shown = outcome = AppState.RUNNING
                reason = ""
                if outcome in (AppState.FAILED, AppState.SUCCEEDED) and code:
                    reason = signal_reason(code) or _last_error(os.path.join(rdir, "log"))
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
            state, msg = self._state_from_files(app_id)
            if state == AppState.UNKNOWN and err:
                msg = f"slurmctld unreachable: {err}"
            if state == AppState.FAILED:
                msg = group_state(outcomes)[1] or f"the job failed; see {out_file}"
            return state, msg
        state = job.app_state
        if job.reason == DEP_NEVER:
            failed = re.findall(r"(\d+)(?:_\*)?\(failed\)", job.dependency) or record.get("dependencies", [])
            return state, (f"dependency {', '.join(failed)} did not succeed, so Slurm cancelled this job "
                           f"({DEP_NEVER})")
        if state == AppState.PENDING:
            return state, f"pending in Slurm: {job.reason}" if job.reason not in ("", "None") else ""
        if state == AppState.CANCELLED:
            return state, "cancelled" + (f" ({job.reason})" if job.reason not in ("", "None") else "")
        if state == AppState.FAILED:
            group, msg = group_state(outcomes)
            if group == AppState.FAILED and job.state.startswith("FAILED"):
                return state, msg
            detail = f"Slurm: {job.state}" + (f" ({job.reason})" if job.reason not in ("", "None") else "")
            if job.exit_code or job.signal:
                detail += f", batch script exit code {job.exit_code}" + (f" signal {job.signal}" if job.signal else "")
            return state, f"{detail}; {msg + '; ' if msg else ''}see {out_file}"
        if state == AppState.RUNNING:
            group, msg = group_state(outcomes)
            return state, (f"stopping: {msg}" if group == AppState.FAILED else "")
        return state, ""

    # ------------------------------------------------------------------ list/cancel -
    def list(self, cfg: Any = None) -> list[ListAppResponse]:
        try:
            ours = {d for d in os.listdir(_state_root()) if _JOB_ID.match(d)}
        except FileNotFoundError:
            ours = set()
        out = []
        for j in self.squeue_jobs():
            if j["leader"] and (j["comment"] == MARKER or j["job_id"] in ours):
                out.append(ListAppResponse(
                    app_id=j["job_id"], state=app_state_of(j["state"], j["reason"]),
                    app_handle=f"{SCHEDULER}://{self.session_name}/{j['job_id']}",
                ))
        return out

    def _cancel_existing(self, app_id: str) -> None:
        if not _JOB_ID.match(app_id or ""):
            return
        job, err = self._slurm_job(app_id)
        if err:
            raise SchedulerUnavailable(f"cannot cancel {app_id}: {err}")
        if job is None or job.app_state in _TERMINAL:
            return  # idempotent: nothing to do for a finished or forgotten job
        record = self._record(app_id)
        if record is not None and os.path.isdir(record["job_dir"]):
            # remembered for when Slurm has forgotten the job (no accounting)
            open(os.path.join(record["job_dir"], "cancelled"), "w").close()
        proc = _run(["scancel", app_id])
        if proc.returncode != 0 and _unreachable(proc):
            raise SchedulerUnavailable(f"scancel could not reach slurmctld: {proc.stderr.strip()}")

    def delete(self, app_id: str) -> None:
        """Cancels the app if needed and removes its job directory and record."""
        record = self._record(app_id)
        self._cancel_existing(app_id)
        if record is not None:
            shutil.rmtree(record["job_dir"], ignore_errors=True)
            shutil.rmtree(os.path.join(_state_root(), app_id), ignore_errors=True)

    # ------------------------------------------------------------------ logs --------
    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: Optional[str] = None,
        since: Optional[datetime] = None,
        until: Optional[datetime] = None,
        should_tail: bool = False,
        streams: Optional[Stream] = None,
    ) -> Iterable[str]:
        record = self._record(app_id)
        if record is None:
            raise ValueError(f"unknown {SCHEDULER} app '{app_id}' (no record under {_state_root()})")
        roles = {r["name"]: r for r in record.get("roles", [])}
        if role_name not in roles or not 0 <= k < roles[role_name]["num_replicas"]:
            raise ValueError(
                f"app '{app_id}' has no replica {k} of role '{role_name}'; roles: "
                + ", ".join(f"{n} (replicas 0..{r['num_replicas'] - 1})" for n, r in roles.items())
            )
        tags = {Stream.STDOUT: b"O", Stream.STDERR: b"E"}.get(streams)  # type: ignore[arg-type]
        reader = _StampedReader(os.path.join(record["job_dir"], roles[role_name]["dirname"], str(k), "log"), tags)

        def done() -> bool:
            resp = self.describe(app_id)
            return resp is None or resp.state in _TERMINAL

        return filter_lines(follow(reader.read_new, done, should_tail), regex, since, until)


class _StampedReader:
    """Reads new complete lines of a replica log (``<unix time> <O|E> <text>``)."""

    def __init__(self, path: str, tag: Optional[bytes]) -> None:
        self.path = path
        self.tag = tag
        self.offset = 0

    def read_new(self) -> list[TimedLine]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
        self.offset += end
        out: list[TimedLine] = []
        for raw in data[:end].split(b"\n")[:-1]:
            stamp, _, rest = raw.partition(b" ")
            tag, _, text = rest.partition(b" ")
            try:
                ts: Optional[float] = float(stamp)
            except ValueError:
                ts, tag, text = None, b"", raw
            if self.tag is not None and tag != self.tag:
                continue
            out.append((ts, text.decode("utf-8", errors="replace")))
        return out


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmJobsScheduler:
    cli_errors.install()
    return SlurmJobsScheduler(session_name, **kwargs)
