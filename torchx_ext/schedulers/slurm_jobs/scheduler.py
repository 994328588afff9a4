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
import os
import shlex
import time
import uuid
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, Sequence

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, Role, is_terminal
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import index, state
from torchx_ext.errors import (
    BackendError,
    DependencyError,
    SchedulerUnavailable,
    StateError,
    TorchxExtError,
)
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, end_unstarted_replicas
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs import records, retention, status, workspaces
from torchx_ext.schedulers.slurm_jobs.request import (
    OUTPUT_DIR,
    SCHEDULER,
    SlurmJobsRequest,
    WorkspaceCopy,
    build_request,
    record_dir,
    role_dirname,
    split_app_id,
    with_root,
)
from torchx_ext.schedulers.slurm_jobs.request import (
    SlurmJobsExecutor as SlurmJobsExecutor,
)
from torchx_ext.schedulers.slurm_jobs.script import (
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

    # ------------------------------------------------------------------ dry-run -----
    def _build_request(self, app: AppDef, ex: SlurmJobsExecutor, dependencies: list[str]) -> SlurmJobsRequest:
        return build_request(app, ex, dependencies, self._planned)

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Plans to run the role in a copy of ``workspace`` (minus ``.torchxignore`` matches) under the
        job root (``job_dir``, which the nodes must see), as TorchX's DirWorkspace does; with
        container_image it is mounted at the same path. The current directory (the CLI's default)
        runs in place, as sbatch does anyway; ``--workspace ""`` runs without one. With ``login`` the
        workspace (the current directory too) is shipped to the cluster instead.

        Only plans: TorchX's ``Runner.dryrun`` calls this, and a dry-run writes nothing and connects
        nowhere. The role's image becomes the copy's path; ``schedule`` makes the copy (see
        :meth:`_copy_workspaces`, or :func:`.workspaces.ship`) before sbatch.
        """
        ex: SlurmJobsExecutor = SlurmJobsExecutor.from_cfg(cfg)  # type: ignore[assignment]
        if ex.login:
            copy = workspaces.plan_remote(workspace, ex)
        elif is_current_dir(workspace):
            return
        else:
            job_root = os.path.abspath(os.path.expanduser(str(ex.job_dir or state.scheduler_dir(SCHEDULER))))
            copy = WorkspaceCopy(source=workspace,
                                 target=os.path.join(job_root, "workspaces", uuid.uuid4().hex[:12]))
        self._planned[copy.target] = copy
        role.image = copy.target

    def _copy_workspaces(self, req: SlurmJobsRequest) -> None:
        """Makes the request's local workspace copies (schedule only)."""
        for copy in req.workspaces:
            with self._translated("copy the workspace"):
                copy_workspace(copy.source, copy.target)

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
        workspaces.private_dir(out_dir)
        script = render(spec)
        try:
            self._copy_workspaces(req)
            # umask 077: Slurm creates slurm-<id>.out with the submitter's umask (SLURM_UMASK)
            token = records.submission_token()
            proc = sc.run(["sbatch", "--parsable"], stdin=script, umask=0o077,  # the replicas' umask: see render
                          env={"TORCHX_EXT_UMASK": sc.current_umask(), "TORCHX_EXT_SUBMISSION": token})
        except BaseException:
            workspaces.remove_copies(req)  # a half copy, or one no job will use
            raise
        if proc.returncode != 0:
            workspaces.remove_copies(req)  # nothing submitted: nothing left behind
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
        records.INDEX.add(records.index_entry(record))
        return job_id

    def _schedule_remote(self, req: SlurmJobsRequest) -> str:
        """sbatch on the login node: ONE round trip (once the remote root is known) that checks that
        the remote root can be written (a full disk fails here, before anything is submitted) and
        submits the script from stdin; a failed submission leaves no job and no file behind."""
        remote = req.remote or {}
        client = self._remote(remote["login"], remote.get("identity_file"), remote.get("ssh_config"))
        login = client.login.name
        root = workspaces.remote_root(client, remote.get("remote_dir"))
        req, sent = workspaces.ship(req, client, root)
        deps = self._resolve_dependencies(req.spec.dependencies, client, login)
        spec = with_root(replace(req.spec, dependencies=deps), root)
        script = render(spec)
        token = records.submission_token()
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
        records.INDEX.add(records.index_entry(record))
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
    _record = staticmethod(records.read_record)  # (retention and the benches read records through it)

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
        entries = records.INDEX.entries()
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
        records.INDEX.ended({k: st.name for k, (st, final) in listed.items() if final})
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
            records.INDEX.forget(app_id)

    def delete_apps(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None]) -> None:
        # one squeue per cluster instead of a scontrol per app (see retention.delete_apps)
        retention.delete_apps(self, app_ids, done, records.INDEX)

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


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmJobsScheduler:
    return SlurmJobsScheduler(session_name, **kwargs)
