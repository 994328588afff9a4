"""Where a ``slurm_jobs`` app's files go before sbatch: the remote root on a login node (``~``
resolved once), a workspace copy per submission (planned by the dry-run, made or shipped by
``schedule``, with ``rsync --link-dest`` against the last copy), and the private directory Slurm's
own output goes to."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import asdict, replace
from typing import Optional

from torchx_ext import state
from torchx_ext.errors import (
    BackendError,
    InvalidOptionError,
    StateError,
)
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs import transfer
from torchx_ext.schedulers.slurm_jobs.request import (
    DEFAULT_REMOTE_DIR,
    SCHEDULER,
    SlurmJobsExecutor,
    SlurmJobsRequest,
    WorkspaceCopy,
    planned_remote_root,
    replaced_in,
)
from torchx_ext.schedulers.slurm_jobs.script import (
    ScriptSpec,
)
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin

logger = logging.getLogger(__name__)


def remote_root(client: sc.RemoteSlurmClient, remote_dir: Optional[str]) -> str:
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


def plan_remote(workspace: str, ex: SlurmJobsExecutor) -> WorkspaceCopy:
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
    root = planned_remote_root(login, ex.remote_dir)
    # the root as given (not as resolved): a dry-run and the submission agree on it offline
    key = f"{login} {ex.remote_dir or DEFAULT_REMOTE_DIR} {local}"
    base = f"{root}/workspaces/{uuid.uuid5(uuid.NAMESPACE_URL, key).hex[:12]}"
    target = f"{base}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return WorkspaceCopy(source=local, target=target, planned_root=root, key=key)


def ship(req: SlurmJobsRequest, client: sc.RemoteSlurmClient, root: str) -> tuple[SlurmJobsRequest, dict[str, int]]:
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
        sent[target] = transfer.sync_dir(client.login, copy.source, target, link_dest=previous)
        state.update_json(state.scheduler_dir(SCHEDULER), "remote_workspaces.json", **{copy.key: target})
        logger.info("workspace %s shipped to %s:%s: %d bytes sent%s", copy.source, client.login.name, target,
                    sent[target], f" (unchanged files linked from {previous})" if previous else "")
    return replace(req, spec=ScriptSpec.from_dict(spec), roles=roles), sent


def remove_copies(req: SlurmJobsRequest) -> None:
    for copy in req.workspaces:
        shutil.rmtree(copy.target, ignore_errors=True)


def private_dir(path: str) -> None:
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
