"""What a ``slurm_jobs`` submission asks: its run options (:class:`SlurmJobsExecutor`), the request a
dry-run prints and ``schedule`` performs (:class:`SlurmJobsRequest`), and the sbatch options and
names made of them."""

from __future__ import annotations

import math
import os
import re
import signal as signal_module
from dataclasses import dataclass, field, replace
from typing import Any, Collection, Mapping, Optional

from torchx.specs import AppDef, Role, macros

from torchx_ext import state
from torchx_ext.engine.rules import retry_policy_name
from torchx_ext.errors import (
    DependencyError,
    InvalidAppError,
    InvalidOptionError,
)
from torchx_ext.executors import (
    GROUP_CAPABILITIES,
    Executor,
    engine_timings,
    option,
    ready_timeout_option,
    retry_backoff_option,
)
from torchx_ext.groups import is_service, role_env_suffix, service_ports
from torchx_ext.schedulers.base import role_summaries
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs.script import (
    APP_ID_TOKEN,
    MARKER,
    ReplicaCommand,
    RoleComponent,
    ScriptSpec,
    render,
)
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin

SCHEDULER = "slurm_jobs"
split_app_id = sc.split_app_id  # where the ids are parsed: below the scheduler (its retention uses it too)
DEFAULT_REMOTE_DIR = "~/.torchx_ext/slurm_jobs"
# under the job root: Slurm's own output (slurm-<job id>.out), in a directory made 0700 before
# sbatch (Slurm opens the file before the job's private directory can exist)
OUTPUT_DIR = "slurm-out"


@dataclass
class SlurmJobsExecutor(Executor):
    """Run options of the ``slurm_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = GROUP_CAPABILITIES

    partition: Optional[str] = option(None, help="Slurm partition (every role's component)")
    time: Optional[str] = option(None, help="time limit, in any sbatch --time format (e.g. 1:00:00)")
    signal: Optional[str] = option(
        None, help="a signal for every replica's process before the time limit, as SIG[@SECONDS] "
        "(sbatch --signal; e.g. USR1@120: SIGUSR1 about 120 s before; Slurm may send it up to 60 s early, "
        "once, to the replicas running then) so a training script can checkpoint")
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
    ready_timeout_s: float = ready_timeout_option()
    mail_user: Optional[str] = option(None, help="who gets Slurm's mail (sbatch --mail-user)")
    mail_type: Optional[str] = option(None, help="when Slurm sends mail, e.g. END,FAIL (sbatch --mail-type)")
    sbatch_args: Optional[list[str]] = option(
        None, help="extra sbatch options, one per item as --name=value, added to every role's component"
    )
    srun_args: Optional[list[str]] = option(
        None, help="extra srun options, one per item as --name=value, added to every replica's step"
    )
    job_dir: Optional[str] = option(
        None, help="directory for job directories (<job_dir>/<job id>.<token>/: logs, exit codes) and "
        f"{OUTPUT_DIR}/slurm-<job id>.out; must be visible from the nodes (default: $TORCHX_EXT_HOME/slurm_jobs)"
    )
    container_image: Optional[str] = option(
        None, help="run every replica in this container image (pyxis: srun --container-image); "
        "an absolute role image is then the working directory in the container"
    )
    container_mounts: Optional[list[str]] = option(
        None, help="pyxis mounts, SRC:DST[:FLAGS] per item (srun --container-mounts)"
    )
    node_python: str = option(
        "python3", help="the Python (>= 3.8, standard library only) that runs the group engine on the "
        "job's first node, as a command name or path; the job ships the engine itself, nodes need no "
        "torchx-ext. A node without it fails the app, saying so"
    )
    login: Optional[str] = option(
        None, help="a remote cluster: its login node as user@host[:port] or a Host alias of ~/.ssh/config, "
        "reached with the system ssh (your agent, ProxyJump, known_hosts; never prompts; one shared "
        "connection). Slurm's commands run there; the handle names it, so status/log/cancel need no "
        "options. Unset: Slurm's commands run here"
    )
    identity_file: Optional[str] = option(
        None, help="with login: the private key to log in with (ssh -i, IdentitiesOnly); default: "
        "what ssh would use (agent, ~/.ssh/config)"
    )
    ssh_config: Optional[str] = option(
        None, help="with login: an ssh config file read instead of ~/.ssh/config (ssh -F)"
    )
    remote_dir: Optional[str] = option(
        None, help="with login: the directory on the cluster for job directories and workspaces "
        f"(must be visible from the nodes); default {DEFAULT_REMOTE_DIR} of the login user"
    )


@dataclass
class WorkspaceCopy:
    """A workspace copy ``schedule`` makes before sbatch (a dry-run only plans it).

    ``target`` is where the role runs (its image). Remote: on the login node; ``planned_root`` is
    the remote root as the dry-run knew it (``~/...`` until a submission resolved it), replaced by
    the resolved root at submission; ``key`` finds the previous copy (``rsync --link-dest``).
    """

    source: str
    target: str
    planned_root: str = ""
    key: str = ""


@dataclass
class SlurmJobsRequest:
    """What ``schedule`` performs: the script spec and the workspace copies to make first;
    ``--dryrun`` prints the script itself, then the copies as comments."""

    spec: ScriptSpec
    roles: list[dict[str, Any]]
    # remote mode: login, identity_file, ssh_config, remote_dir (as given); None: here
    remote: Optional[dict[str, Any]] = None
    workspaces: list[WorkspaceCopy] = field(default_factory=list)

    def __repr__(self) -> str:
        where = f"{self.remote['login']}:" if self.remote else ""
        plan = "".join(f"# before sbatch: copy the workspace {w.source} to {where}{w.target}\n"
                       for w in self.workspaces)
        return render(self.spec) + plan


def role_dirname(role_name: str) -> str:
    # distinct for names validate_app accepts: two names mapping here also share an env suffix
    return re.sub(r"[^A-Za-z0-9_-]", "_", role_name) or "_"


def job_name(app_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", app_name)[:64].strip("-") or "app"


def record_dir(app_id: str) -> str:
    # one place per user (not the cwd, not per option): any shell finds any app
    return state.scheduler_dir(SCHEDULER, app_id)


def with_root(spec: ScriptSpec, root: str) -> ScriptSpec:
    """``spec`` with its job root replaced (the remote root, once resolved)."""
    old = output_option(spec.job_root)
    new = output_option(root)
    return replace(spec, job_root=root, job_opts=[new if o == old else o for o in spec.job_opts])


def output_option(job_root: str) -> str:
    # %% is a literal % in Slurm's filename patterns; %j is the job id
    return f"--output={job_root.replace('%', '%%')}/{OUTPUT_DIR}/slurm-%j.out"


def replaced_in(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON-like) with ``old`` replaced by ``new`` in every string: a planned remote
    workspace path (unique: it ends in a random suffix) by the resolved one."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [replaced_in(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: replaced_in(v, old, new) for k, v in value.items()}
    return value


SIGNAL_RE = re.compile(r"(?:SIG)?([A-Z][A-Z0-9]*|[0-9]+)(?:@([0-9]+))?")


def signal_option(value: str) -> str:
    """``signal`` as sbatch --signal wants it, refusing what would not reach the replicas."""
    m = SIGNAL_RE.fullmatch(value.strip().upper())
    if not m or (not m.group(1).isdigit() and not hasattr(signal_module.Signals, "SIG" + m.group(1))):
        raise InvalidOptionError(
            f"signal={value!r}: give a signal name or number and, optionally, @SECONDS before the time "
            "limit (e.g. USR1@120); 'B:' (the batch shell only) is not offered: it would not reach the replicas")
    return m.group(1) + (f"@{m.group(2)}" if m.group(2) else "")


def build_request(app: AppDef, ex: SlurmJobsExecutor, dependencies: list[str],
                  plans: Mapping[str, WorkspaceCopy]) -> SlurmJobsRequest:
    """The request of ``app`` (pure: what ``--dryrun`` prints); ``plans``: the workspace copies
    planned for its roles, by target."""
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
        job_root = planned_remote_root(login, ex.remote_dir)
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
    backoff, ready = engine_timings(ex)
    prefix = f"{login}:" if login else ""
    workspaces = [plans[r.image] for r in app.roles if r.image in plans]
    planned = {w.target for w in workspaces}
    components = [role_component(role, ex, prefix, planned) for role in app.roles]
    spec = ScriptSpec(app_name=app.name, job_root=job_root, job_opts=job_opts, shared_opts=shared,
                      dependencies=dependencies, components=components,
                      container=bool(ex.container_image), retry_backoff_s=backoff, ready_timeout_s=ready,
                      app_id_prefix=prefix, node_python=ex.node_python)
    roles = [{**summary, "dirname": role_dirname(summary["name"])} for summary in role_summaries(app)]
    remote = {"login": login, "identity_file": ex.identity_file, "ssh_config": ex.ssh_config,
              "remote_dir": ex.remote_dir} if login else None
    return SlurmJobsRequest(spec=spec, roles=roles, remote=remote, workspaces=workspaces)

def planned_remote_root(login: str, remote_dir: Optional[str]) -> str:
    """The remote root as far as known without connecting: resolved at a submission (one round
    trip, remembered); until then a dry-run shows ``~/...``."""
    wanted = remote_dir or DEFAULT_REMOTE_DIR
    if wanted.startswith("/"):
        return os.path.normpath(wanted)
    known = state.read_json(state.scheduler_dir(SCHEDULER, "remote_roots.json")) or {}
    return str(known.get(f"{login} {wanted}", wanted))

# Over 60 lines: each Role/Resource field maps to its sbatch and srun options in one place
# (the support matrix's order), a few lines per field.
def role_component(role: Role, ex: SlurmJobsExecutor, app_id_prefix: str = "",
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
        ports=list(service_ports(role)),
    )
    for k in range(n):
        values = macros.Values(img_root=workdir or role.image, app_id=app_id_prefix + APP_ID_TOKEN,
                               replica_id=str(k), rank0_env="TORCHX_RANK0_HOST")
        r = values.apply(role)
        comp.replicas.append(ReplicaCommand(k, [r.entrypoint, *r.args], dict(r.env)))
    return comp
