"""``slurm_jobs``: a Slurm scheduler where a multi-role app is ONE heterogeneous job.

* one role → one job, its replicas are the job's tasks; several roles → one heterogeneous job
  (``#SBATCH hetjob``), one component per role with that role's cpus/mem/gpus, so Slurm starts
  all roles together or none (gang allocation);
* each replica is its own ``srun`` step (placed on the node Slurm allocated for that task), so
  TorchX macros (``${replica_id}``) are exact and every replica has its own log and exit code;
* the batch script starts the group engine (:mod:`torchx_ext.engine`, shipped inside the script)
  with the node's Python (run option ``node_python``): its launcher (:mod:`.node`)
  starts the steps, the engine decides restarts, services and the verdict; the job exits with the
  deciding exit code and leaves per-replica results in the job directory (see :mod:`.script`);
* the app id IS the Slurm job id (``squeue -j <app id>`` works); status comes from ``scontrol``
  while slurmctld knows the job, ``sacct`` where accounting exists, then the job directory;
* dependencies are Slurm's own ``--dependency=afterok`` with ``--kill-on-invalid-dep=yes``;
* restarts (``Role.max_retries``) happen inside the allocation, decided by the engine; an app with
  retries is submitted ``--requeue`` and a requeue by Slurm is one more restart (README: Retries).

State lives under ``$TORCHX_EXT_HOME/slurm_jobs/<job id>/`` (``app.json``; the job directory
``<job id>.<token>/`` beside it unless ``job_dir`` is set), so any shell can query any app. Run
``torchx`` where ``sbatch`` works, or anywhere with run option ``login``: a remote cluster's login node over SSH
(:mod:`.ssh`). The app id then names the cluster, ``<login>:<job id>``, and the
record (``$TORCHX_EXT_HOME/slurm_jobs/<app id>/app.json``) keeps how to reach it, so that
``torchx status/log/cancel <handle>`` from any local shell needs no options; the job directories
and workspaces live on the cluster under ``remote_dir``.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
import stat
import time
import uuid
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, Role, is_terminal, macros
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import index, state
from torchx_ext.engine.rules import retry_policy_name
from torchx_ext.errors import (
    BackendError,
    DependencyError,
    InvalidAppError,
    InvalidOptionError,
    SchedulerUnavailable,
    StateError,
    TorchxExtError,
)
from torchx_ext.groups import is_service, role_env_suffix
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, end_unstarted_replicas, role_summaries
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs import retention, status
from torchx_ext.schedulers.slurm_jobs.request import (
    DEFAULT_REMOTE_DIR,
    OUTPUT_DIR,
    SCHEDULER,
    SlurmJobsRequest,
    WorkspaceCopy,
    job_name,
    output_option,
    record_dir,
    replaced_in,
    role_dirname,
    signal_option,
    split_app_id,
    with_root,
)
from torchx_ext.schedulers.slurm_jobs.request import (
    SlurmJobsExecutor as SlurmJobsExecutor,
)
from torchx_ext.schedulers.slurm_jobs.script import (
    APP_ID_TOKEN,
    MARKER,
    ReplicaCommand,
    RoleComponent,
    ScriptSpec,
    app_state_of,
    render,
)
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin
from torchx_ext.schedulers.slurm_jobs.support import MATRIX
from torchx_ext.schedulers.workspace import copy_workspace, is_current_dir

logger = logging.getLogger(__name__)


class SlurmJobsScheduler(WorkspaceMixin[None], ExtScheduler[SlurmJobsExecutor]):
    """Slurm jobs, one (heterogeneous) job per app. See the module docstring."""

    executor_cls = SlurmJobsExecutor
    support = MATRIX
    name_forms = {"job directory": role_dirname}

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__(session_name, **kwargs)
        self._slurm = sc.SlurmClient()
        # remote clusters met so far, by (login, identity_file, ssh_config); nothing connects yet
        self._remotes: dict[tuple[str, str, str], sc.RemoteSlurmClient] = {}
        # workspace copies planned by build_workspace_and_update_role, by target (the role's image),
        # for the dry-run that follows to put into its request; nothing is copied before schedule
        self._planned: dict[str, WorkspaceCopy] = {}

    # ------------------------------------------------------------------ clusters ----
    def _remote(self, login: str, identity_file: Optional[str], ssh_config: Optional[str]) -> sc.RemoteSlurmClient:
        key = (login, identity_file or "", ssh_config or "")
        if key not in self._remotes:
            self._remotes[key] = sc.RemoteSlurmClient(SshLogin(login, identity_file, ssh_config))
        return self._remotes[key]

    def _cluster(self, record: Optional[Mapping[str, Any]]) -> sc.SlurmClient:
        """The Slurm client of an app (its record) or a run (its options): local, or on a login node."""
        if not record or not record.get("login"):
            return self._slurm
        return self._remote(record["login"], record.get("identity_file"), record.get("ssh_config"))

    def _remote_root(self, client: sc.RemoteSlurmClient, remote_dir: Optional[str]) -> str:
        """The remote base directory, absolute: ``~`` resolved on the login node once, then remembered."""
        wanted = remote_dir or DEFAULT_REMOTE_DIR
        if wanted.startswith("/"):
            return os.path.normpath(wanted)
        key = f"{client.login.name} {wanted}"
        known = state.read_json(state.scheduler_dir(SCHEDULER, "remote_roots.json")) or {}
        if key in known:
            return str(known[key])
        proc = client.login.run(["sh", "-c", 'umask 077; case $1 in "~") d=$HOME ;; "~/"*) d=$HOME/${1#"~/"} ;; '
                                 '/*) d=$1 ;; *) d=$HOME/$1 ;; esac; mkdir -p -- "$d" && cd -- "$d" && pwd -P',
                                 "sh", wanted])
        if proc.returncode != 0 or not proc.stdout.strip().startswith("/"):
            raise BackendError(f"cannot create {wanted} on {client.login.name}: "
                               f"{(proc.stderr.strip().splitlines() or ['no answer'])[-1]}")
        root = proc.stdout.strip().splitlines()[-1]
        state.makedirs(state.scheduler_dir(SCHEDULER))
        state.update_json(state.scheduler_dir(SCHEDULER), "remote_roots.json", **{key: root})
        return root

    # ------------------------------------------------------------------ dry-run -----
    def _build_request(self, app: AppDef, ex: SlurmJobsExecutor, dependencies: list[str]) -> SlurmJobsRequest:
        login = SshLogin(ex.login, ex.identity_file, ex.ssh_config).name if ex.login else ""
        if not login:
            for key in ("identity_file", "ssh_config", "remote_dir"):
                if getattr(ex, key):
                    raise InvalidOptionError(f"{key} is an option of a remote cluster: set login too")
        elif ex.job_dir:
            raise InvalidOptionError("job_dir is a directory here; with login, the directory on the cluster "
                                     "is remote_dir")
        dep_ids = []
        for dep in dependencies:
            where = split_app_id(dep)
            if where is None or where[0] != login:
                what = f"an app id of {login} (<login>:<job id>)" if login else "a Slurm job id"
                raise DependencyError(f"dependency '{dep}' is not {what}: an app can depend on apps of its "
                                      "own cluster only")
            dep_ids.append(where[1])
        dependencies = dep_ids
        if login:
            job_root = self._planned_remote_root(login, ex.remote_dir)
        else:
            job_root = os.path.abspath(os.path.expanduser(ex.job_dir or state.scheduler_dir(SCHEDULER)))
        shared: list[str] = []
        for key in ("partition", "time", "account", "qos"):
            if getattr(ex, key):
                shared.append(f"--{key}={getattr(ex, key)}")
        if ex.exclusive:
            shared.append("--exclusive")
        shared += ex.sbatch_args or []
        job_opts = [f"--job-name={job_name(app.name)}", f"--comment={MARKER}",
                    output_option(job_root), "--open-mode=append",
                    # with retries Slurm may requeue it (preemption, a node failure, scontrol requeue);
                    # without, it must not, behind the user's back
                    "--requeue" if any(r.max_retries for r in app.roles) else "--no-requeue"]
        for key in ("mail_user", "mail_type"):
            if getattr(ex, key):
                job_opts.append(f"--{key.replace('_', '-')}={getattr(ex, key)}")
        if ex.signal:
            job_opts.append(f"--signal={signal_option(ex.signal)}")
        if ex.retry_backoff_s < 0:
            raise InvalidOptionError(f"retry_backoff_s={ex.retry_backoff_s}: a delay in seconds, >= 0")
        prefix = f"{login}:" if login else ""
        workspaces = [self._planned[r.image] for r in app.roles if r.image in self._planned]
        planned = {w.target for w in workspaces}
        components = [self._component(role, ex, prefix, planned) for role in app.roles]
        spec = ScriptSpec(app_name=app.name, job_root=job_root, job_opts=job_opts, shared_opts=shared,
                          dependencies=dependencies, components=components,
                          container=bool(ex.container_image), retry_backoff_s=float(ex.retry_backoff_s),
                          app_id_prefix=prefix, node_python=ex.node_python)
        roles = [{**summary, "dirname": role_dirname(summary["name"])} for summary in role_summaries(app)]
        remote = {"login": login, "identity_file": ex.identity_file, "ssh_config": ex.ssh_config,
                  "remote_dir": ex.remote_dir} if login else None
        return SlurmJobsRequest(spec=spec, roles=roles, remote=remote, workspaces=workspaces)

    @staticmethod
    def _planned_remote_root(login: str, remote_dir: Optional[str]) -> str:
        """The remote root as far as known without connecting: resolved at a submission (one round
        trip, remembered); until then a dry-run shows ``~/...``."""
        wanted = remote_dir or DEFAULT_REMOTE_DIR
        if wanted.startswith("/"):
            return os.path.normpath(wanted)
        known = state.read_json(state.scheduler_dir(SCHEDULER, "remote_roots.json")) or {}
        return str(known.get(f"{login} {wanted}", wanted))

    # Over 60 lines: each Role/Resource field maps to its sbatch and srun options in one place
    # (the support matrix's order), a few lines per field.
    @staticmethod
    def _component(role: Role, ex: SlurmJobsExecutor, app_id_prefix: str = "",
                   planned: Collection[str] = ()) -> RoleComponent:
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
        # a planned workspace copy is the role's directory (schedule makes it before sbatch)
        if role.image and role.image in planned:
            workdir: Optional[str] = role.image
        elif ex.login:  # an absolute image is a directory on the cluster
            workdir = role.image if role.image and role.image.startswith("/") else None
        else:
            workdir = os.path.abspath(role.image) if role.image and os.path.isdir(role.image) else None
        if ex.container_image:
            step.append(f"--container-image={ex.container_image}")
            mounts = list(ex.container_mounts or [])
            mounts += [f"{m.src_path}:{m.dst_path}" + (":ro" if m.read_only else "") for m in role.mounts]
            if workdir:  # a workspace copy (or any local directory): visible at the same path inside
                mounts.append(f"{workdir}:{workdir}")
            if mounts:
                step.append(f"--container-mounts={','.join(mounts)}")
            if role.image and (role.image.startswith("/") or role.image in planned):
                workdir = role.image
                step.append(f"--container-workdir={role.image}")
        elif workdir:
            step.append(f"--chdir={workdir}")
        step += ex.srun_args or []
        comp = RoleComponent(
            name=role.name, dirname=role_dirname(role.name), env_suffix=role_env_suffix(role.name),
            service=is_service(role), num_replicas=n, sbatch_opts=sbatch, srun_opts=step,
            max_retries=role.max_retries, retry_policy=retry_policy_name(role.retry_policy),
        )
        for k in range(n):
            values = macros.Values(img_root=workdir or role.image, app_id=app_id_prefix + APP_ID_TOKEN,
                                   replica_id=str(k), rank0_env="TORCHX_RANK0_HOST")
            r = values.apply(role)
            comp.replicas.append(ReplicaCommand(k, [r.entrypoint, *r.args], dict(r.env)))
        return comp

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Plans to run the role in a copy of ``workspace`` (minus ``.torchxignore`` matches) under the
        job root (``job_dir``, which the nodes must see), as TorchX's DirWorkspace does; with
        container_image it is mounted at the same path. The current directory (the CLI's default)
        runs in place, as sbatch does anyway; ``--workspace ""`` runs without one. With ``login`` the
        workspace (the current directory too) is shipped to the cluster instead.

        Only plans: TorchX's ``Runner.dryrun`` calls this, and a dry-run writes nothing and connects
        nowhere. The role's image becomes the copy's path; ``schedule`` makes the copy (see
        :meth:`_copy_workspaces`) before sbatch.
        """
        ex: SlurmJobsExecutor = SlurmJobsExecutor.from_cfg(cfg)  # type: ignore[assignment]
        if ex.login:
            copy = self._plan_remote_workspace(workspace, ex)
        elif is_current_dir(workspace):
            return
        else:
            job_root = os.path.abspath(os.path.expanduser(str(ex.job_dir or state.scheduler_dir(SCHEDULER))))
            copy = WorkspaceCopy(source=workspace,
                                 target=os.path.join(job_root, "workspaces", uuid.uuid4().hex[:12]))
        self._planned[copy.target] = copy
        role.image = copy.target

    def _plan_remote_workspace(self, workspace: str, ex: SlurmJobsExecutor) -> WorkspaceCopy:
        """Where ``workspace`` goes on the cluster: a NEW directory per submission, so that no
        running job sees its files change under it; unchanged files will be hard links into the
        previous copy of the same workspace (``rsync --link-dest``), so a re-submit sends only what
        changed. With a login, the current directory (the CLI's default workspace) is shipped too:
        the cluster cannot run it in place."""
        local = workspace[len("file://"):] if workspace.startswith("file://") else workspace
        if "://" in local:
            raise InvalidOptionError(f"workspace {workspace}: with login, a local directory")
        local = os.path.realpath(local)
        login = SshLogin(str(ex.login), ex.identity_file, ex.ssh_config).name
        root = self._planned_remote_root(login, ex.remote_dir)
        # the root as given (not as resolved): a dry-run and the submission agree on it offline
        key = f"{login} {ex.remote_dir or DEFAULT_REMOTE_DIR} {local}"
        base = f"{root}/workspaces/{uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:12]}"
        target = f"{base}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return WorkspaceCopy(source=local, target=target, planned_root=root, key=key)

    def _copy_workspaces(self, req: SlurmJobsRequest) -> None:
        """Makes the request's local workspace copies (schedule only)."""
        for copy in req.workspaces:
            with self._translated("copy the workspace"):
                copy_workspace(copy.source, copy.target)

    def _ship_workspaces(self, req: SlurmJobsRequest, client: sc.RemoteSlurmClient,
                         root: str) -> tuple[SlurmJobsRequest, dict[str, int]]:
        """Ships the request's workspaces to the cluster (schedule only) and returns the request with
        each planned path under the resolved ``root``, and the bytes sent per copy."""
        sent: dict[str, int] = {}
        spec, roles = asdict(req.spec), req.roles
        known = state.read_json(state.scheduler_dir(SCHEDULER, "remote_workspaces.json")) or {}
        for copy in req.workspaces:
            target = copy.target
            if copy.planned_root != root and target.startswith(copy.planned_root + "/"):
                target = root + target[len(copy.planned_root):]
                spec, roles = replaced_in(spec, copy.target, target), replaced_in(roles, copy.target, target)
            previous = known.get(copy.key)
            sent[target] = client.login.sync_dir(copy.source, target, link_dest=previous)
            state.update_json(state.scheduler_dir(SCHEDULER), "remote_workspaces.json", **{copy.key: target})
            logger.info("workspace %s shipped to %s:%s: %d bytes sent%s", copy.source, client.login.name, target,
                        sent[target], f" (unchanged files linked from {previous})" if previous else "")
        return replace(req, spec=ScriptSpec.from_dict(spec), roles=roles), sent

    # ------------------------------------------------------------------ submit ------
    def _schedule(self, req: SlurmJobsRequest) -> str:
        if req.remote:
            return self._schedule_remote(req)
        deps = self._resolve_dependencies(req.spec.dependencies)
        spec = replace(req.spec, dependencies=deps)
        # the job root may be the user's (job_dir, e.g. 0755 on a shared filesystem): Slurm's own
        # output goes into a directory of ours inside it, private before sbatch names the file
        out_dir = os.path.join(spec.job_root, OUTPUT_DIR)
        state.makedirs(out_dir)
        _private_dir(out_dir)
        script = render(spec)
        try:
            self._copy_workspaces(req)
            # umask 077: Slurm creates slurm-<id>.out with the submitter's umask (SLURM_UMASK)
            token = submission_token()
            proc = sc.run(["sbatch", "--parsable"], stdin=script, umask=0o077,  # the replicas' umask: see render
                          env={"TORCHX_EXT_UMASK": sc.current_umask(), "TORCHX_EXT_SUBMISSION": token})
        except BaseException:
            self._remove_copies(req)  # a half copy, or one no job will use
            raise
        if proc.returncode != 0:
            self._remove_copies(req)  # nothing submitted: nothing left behind
            err = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
            if sc.unreachable(proc):
                raise SchedulerUnavailable(f"sbatch could not reach slurmctld: {err}")
            raise BackendError(f"sbatch rejected the job: {err}")
        job_id = proc.stdout.strip().split(";")[0]
        app_dir = os.path.join(spec.job_root, f"{job_id}.{token}")
        for d in (app_dir, record_dir(job_id)):
            # 0700 from creation (the job may have made it already, under its umask 077)
            state.makedirs(d)
        with open(os.open(os.path.join(app_dir, "script.sbatch"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                  "w") as f:
            f.write(script)
        record = {
            "app_id": job_id, "app_name": spec.app_name, "job_dir": app_dir, "job_root": spec.job_root,
            "roles": req.roles, "dependencies": req.spec.dependencies, "submitted": time.time(),
            "spec": asdict(spec),  # the request as submitted, for describe_native
        }
        state.write_json(os.path.join(record_dir(job_id), "app.json"), record)
        _INDEX.add(_index_entry(record))
        return job_id

    @staticmethod
    def _remove_copies(req: SlurmJobsRequest) -> None:
        for copy in req.workspaces:
            shutil.rmtree(copy.target, ignore_errors=True)

    def _schedule_remote(self, req: SlurmJobsRequest) -> str:
        """sbatch on the login node: ONE round trip (once the remote root is known) that checks that
        the remote root can be written (a full disk fails here, before anything is submitted) and
        submits the script from stdin; a failed submission leaves no job and no file behind."""
        remote = req.remote or {}
        client = self._remote(remote["login"], remote.get("identity_file"), remote.get("ssh_config"))
        login = client.login.name
        root = self._remote_root(client, remote.get("remote_dir"))
        req, sent = self._ship_workspaces(req, client, root)
        deps = self._resolve_dependencies(req.spec.dependencies, client, login)
        spec = with_root(replace(req.spec, dependencies=deps), root)
        script = render(spec)
        token = submission_token()
        proc = client.login.run_shell(f"root={shlex.quote(spec.job_root)} TORCHX_EXT_SUBMISSION={token}\n"
                                      f"{_REMOTE_SUBMIT}", stdin=script)
        out = proc.stdout.strip().splitlines()
        err = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        if sc.no_slurm_on_remote(proc):
            raise client.no_slurm("sbatch: command not found")
        if proc.returncode != 0 or not out or not sc.JOB_ID.match(out[-1].split(";")[0]):
            where = f"{login}:{spec.job_root}"
            if proc.returncode == 90:
                raise BackendError(f"cannot write into {where}: {err}; nothing was submitted and no file "
                                   "was left there")
            if sc.unreachable(proc):
                raise SchedulerUnavailable(f"sbatch on {login} could not reach slurmctld: {err}")
            raise BackendError(f"sbatch on {login} rejected the job: {err or 'no answer'}; nothing was submitted "
                               "and no file was left on the cluster")
        job_id = out[-1].split(";")[0]
        app_id = f"{login}:{job_id}"
        state.makedirs(record_dir(app_id))
        record = {
            "app_id": app_id, "app_name": spec.app_name, "job_dir": f"{spec.job_root}/{job_id}.{token}",
            "job_root": spec.job_root, "roles": req.roles,
            "dependencies": [f"{login}:{d}" for d in req.spec.dependencies], "submitted": time.time(),
            "login": login, "identity_file": remote.get("identity_file"), "ssh_config": remote.get("ssh_config"),
            "workspace_bytes_sent": sent, "spec": asdict(spec),
        }
        state.write_json(os.path.join(record_dir(app_id), "app.json"), record)
        _INDEX.add(_index_entry(record))
        return app_id

    def _resolve_dependencies(self, deps: list[str], client: Optional[sc.SlurmClient] = None,
                              login: str = "") -> list[str]:
        """The dependencies Slurm must still wait for; errors for unknown or failed ones.

        A dependency slurmctld has already forgotten (MinJobAge) cannot go into --dependency
        (sbatch rejects it): if it is known to have succeeded it is simply satisfied.
        """
        keep = []
        slurm = client or self._slurm
        for dep in deps:
            job, err = slurm.job(dep)
            if err:
                raise SchedulerUnavailable(f"cannot check dependency {dep}: {err}")
            if job is not None:
                keep.append(dep)
                continue
            job = slurm.sacct_job(dep)
            st = job.app_state if job else self._state_from_files(f"{login}:{dep}" if login else dep)[0]
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
        if split_app_id(app_id) is None:
            return None
        return state.read_json(os.path.join(record_dir(app_id), "app.json"))

    def _describe_native(self, app_id: str) -> Optional[SlurmJobsRequest]:
        record = self._record(app_id)
        if record is None or "spec" not in record:
            return None
        return SlurmJobsRequest(spec=ScriptSpec.from_dict(record["spec"]), roles=record.get("roles", []))

    def _state_from_files(self, app_id: str) -> tuple[AppState, str]:
        """The verdict the batch script left, for jobs Slurm has forgotten (no accounting)."""
        record = self._record(app_id)
        if record is None:
            return AppState.UNKNOWN, ""
        if not record.get("login"):
            return sc.verdict_from_files(app_id, record["job_dir"])
        _job, _err, files = self._cluster(record).snapshot(
            app_id.rpartition(":")[2], record["job_dir"], ["result", "cancelled", "error"])
        return sc.verdict_from_files(app_id, f"{record['login']}:{record['job_dir']}", files)

    # ------------------------------------------------------------------ describe ----
    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        where = split_app_id(app_id)
        if where is None:
            return None
        login, job_id = where
        record = self._record(app_id)
        if record is None:
            if login:
                return None  # not an app of ours: its record says how to reach the cluster
            _job, err = self._slurm.job(app_id)
            if err:
                raise SchedulerUnavailable(err)
            return None  # not an app of ours (or deleted): Slurm may still list the job for a while
        # local: scontrol (sacct) and the job directory read here; remote: ONE round trip for both
        job, err, files = self._cluster(record).snapshot(job_id, record["job_dir"],
                                                         sc.job_file_names(record.get("roles", [])))
        roles, statuses, outcomes = status.replicas(record, job, files)
        st, msg = status.app_state(job_id, record, job, err, outcomes, files, lambda: self._cluster(record))
        end_unstarted_replicas(st, statuses)
        return DescribeAppResponse(app_id=app_id, state=st, msg=msg, roles=roles, roles_statuses=statuses,
                                   num_restarts=status.num_restarts(job, files))

    # ------------------------------------------------------------------ list/cancel -
    def _list(self, cfg: Any) -> list[ListAppResponse]:
        """The apps this home recorded, newest first, from the index (:mod:`torchx_ext.index`).

        An app whose end the index holds is shown as it ended, without asking anyone; for the
        others, one squeue per cluster that has any (here, and each login node). A local app
        slurmctld has forgotten reads its verdict from its job directory; a remote one is left out
        (its verdict is on the cluster: one round trip each). Ends seen are cached. A cluster that
        cannot be asked is one warning and its open apps are not listed; only when no cluster
        could be asked is it an error.
        """
        entries = _INDEX.entries()
        clusters: dict[tuple[str, str, str], list[index.Entry]] = {}
        for entry in entries:
            if not entry.end:
                key = (str(entry.extra.get("login") or ""), str(entry.extra.get("identity_file") or ""),
                       str(entry.extra.get("ssh_config") or ""))
                clusters.setdefault(key, []).append(entry)
        listed: dict[str, tuple[AppState, bool]] = {}  # open apps: (state, final)
        failed: list[TorchxExtError] = []
        for (login, identity_file, ssh_config), apps in sorted(clusters.items()):
            try:
                client = self._remote(login, identity_file or None, ssh_config or None) if login else self._slurm
                jobs = {j["job_id"]: j for j in client.squeue_jobs() if j["leader"]}  # one round trip
            except TorchxExtError as e:
                failed.append(e)
                where = f"at {login}" if login else "of this machine"
                logger.warning("the Slurm cluster %s could not be asked: %s; its apps that had not ended "
                               "are not listed", where, e)
                continue
            for entry in apps:
                job = jobs.get(entry.app_id.rpartition(":")[2])
                if job is not None:
                    st = app_state_of(job["state"], job["reason"])
                    # a node failure or a preemption may be requeued: not final yet
                    final = is_terminal(st) and job["state"].split()[0] not in ("NODE_FAIL", "PREEMPTED")
                    listed[entry.app_id] = (st, final)
                elif not login:
                    try:
                        record = self._record(entry.app_id)
                    except StateError as e:  # one damaged record must not hide every other app
                        logger.warning("%s; this app is not listed", e)
                        continue
                    if record is not None:  # else: deleted meanwhile
                        st = sc.verdict_from_files(entry.app_id, record["job_dir"])[0]
                        listed[entry.app_id] = (st, is_terminal(st))
        if failed and len(failed) == len(clusters):
            raise failed[0]
        _INDEX.ended({k: st.name for k, (st, final) in listed.items() if final})
        out = []
        for entry in entries:
            if entry.end:
                out.append(self.listed(entry.app_id, AppState[entry.end], entry.name))
            elif entry.app_id in listed:
                out.append(self.listed(entry.app_id, listed[entry.app_id][0], entry.name))
        return out

    def _cancel(self, app_id: str) -> None:
        where = split_app_id(app_id)
        if where is None:
            return
        login, job_id = where
        record = self._record(app_id)
        if login and record is None:
            return  # not ours: how to reach its cluster is in the record
        slurm = self._cluster(record)
        job, err = slurm.job(job_id)
        if err:
            raise SchedulerUnavailable(f"cannot cancel {app_id}: {err}")
        if job is None or is_terminal(job.app_state):
            return  # idempotent: nothing to do for a finished or forgotten job
        if login:
            assert record is not None
            # the marker (for when Slurm has forgotten the job) and scancel, in one round trip
            proc = slurm.run(["sh", "-c", '[ -d "$1" ] && : >"$1/cancelled"; scancel -- "$2"', "sh",
                              record["job_dir"], job_id])
            if sc.no_slurm_on_remote(proc):
                raise self._remote(login, record.get("identity_file"), record.get("ssh_config")).no_slurm(
                    "scancel: command not found")
        else:
            if record is not None and os.path.isdir(record["job_dir"]):
                # remembered for when Slurm has forgotten the job (no accounting)
                open(os.path.join(record["job_dir"], "cancelled"), "w").close()
            proc = sc.run(["scancel", app_id])
        if sc.unreachable(proc):  # any other error: the job ended meanwhile, which is what we want
            raise SchedulerUnavailable(f"scancel could not reach slurmctld: {proc.stderr.strip()}")

    def _delete(self, app_id: str) -> None:
        self._cancel(app_id)
        if (record := self._record(app_id)) is not None:  # its files and record (see retention)
            retention.remove_files(self, app_id, record)
            _INDEX.forget(app_id)

    def delete_apps(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None]) -> None:
        # one squeue per cluster instead of a scontrol per app (see retention.delete_apps)
        retention.delete_apps(self, app_ids, done, _INDEX)

    def _prunable(self, cutoff: float, warn: retention.Warn) -> list[retention.Prunable]:
        return retention.prunable(self, cutoff, warn)

    def _leftovers(self, cutoff: float, warn: retention.Warn) -> list[retention.Leftover]:
        return retention.leftovers(cutoff, warn)

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
        plain = since is None and until is None  # no time to filter on: lines a chunk at a time
        if record.get("login"):
            # the replica's log on the login node, read from where the last poll stopped
            # (a bounded read from OFFSET over the shared connection: one round trip per poll and chunk)
            remote = self._cluster(record)
            assert isinstance(remote, sc.RemoteSlurmClient)
            path = f"{record['job_dir']}/{dirname}/{k}/log"
            reader = state.StampedLineReader(path, tagged=True, want_tag=tag, plain=plain,
                                             fetch=lambda offset, limit: remote.read_bytes_from(path, offset, limit))
            return reader.read_new, None
        path = os.path.join(record.get("job_dir", ""), dirname, str(k), "log")
        return state.StampedLineReader(path, tagged=True, want_tag=tag, plain=plain).read_new, None


def _private_dir(path: str) -> None:
    """Checks that ``path`` (made by :func:`state.makedirs`, 0700) is a directory of this user's that
    no one else can enter; one left open by an earlier version is closed (it is ours)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise StateError(f"cannot use {path} for Slurm's output: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise StateError(f"{path} is not a directory owned by this user: Slurm's output would be "
                         "readable there; remove it or choose another job_dir")
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise StateError(f"cannot make {path} private: {e.strerror or e}") from e


# sbatch on a login node in one round trip, run by the login shell itself (POSIX sh; $root is set
# first), with the script on stdin. A byte written into the root by the shell (no process) finds
# a full disk or an unwritable root before anything is submitted; then sbatch is the only process
# (the round trip's cost is process starts). The job copies its script into its directory when it
# starts (see script.render). Exit 90: the root cannot be written (nothing submitted);
# else sbatch's own status (127: no sbatch on the remote PATH).
_REMOTE_SUBMIT = r"""TORCHX_EXT_UMASK=$(umask); export TORCHX_EXT_UMASK TORCHX_EXT_SUBMISSION; umask 077
if { [ -d "$root/slurm-out" ] || mkdir -p -- "$root/slurm-out"; } && printf x >"$root/.torchx_ext_writable"
then sbatch --parsable
else rm -f -- "$root/.torchx_ext_writable"; (exit 90)
fi"""


def submission_token() -> str:
    """Names a submission's job directory with its job id (``<job id>.<token>``): Slurm gives a job
    id again once its state is reset (a reinstalled or testbed cluster), and the new job must not
    append to the old one's logs or read its exit codes and verdict."""
    return uuid.uuid4().hex[:12]


def _index_entry(record: Mapping[str, Any]) -> index.Entry:
    """What list needs of an app: its id, submission time, name and, remote, how to reach its cluster."""
    cluster = {k: record[k] for k in ("login", "identity_file", "ssh_config") if record.get(k)}
    return index.Entry(str(record["app_id"]), float(record.get("submitted") or 0), str(record.get("app_name", "")),
                       extra=cluster)


def _entry_from_record(app_id: str) -> Optional[index.Entry]:
    try:
        record = SlurmJobsScheduler._record(app_id)  # noqa: SLF001 - this module's own class
    except StateError as e:  # not listed (as before the index): say so, the others are listed
        logger.warning("%s; this app is not listed", e)
        return None
    if record is None:
        return None
    if not record.get("submitted"):  # written by hand or an old version: the record's time
        try:
            record = {**record, "submitted": os.path.getmtime(os.path.join(record_dir(app_id), "app.json"))}
        except OSError:
            return None
    return _index_entry({**record, "app_id": app_id})


# list's index of this home's slurm_jobs apps (see torchx_ext.index)
_INDEX = index.AppIndex(SCHEDULER, lambda name: split_app_id(name) is not None, _entry_from_record)


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmJobsScheduler:
    return SlurmJobsScheduler(session_name, **kwargs)
