"""What ``slurm_jobs`` leaves behind, and how ``delete`` and ``prune`` remove it.

An app leaves, here or on the cluster (``<login>:`` apps: on the login node, under ``remote_dir``):

* its record, ``$TORCHX_EXT_HOME/slurm_jobs/<app id>/`` (always local);
* its job directory ``<job root>/<job id>.<token>/`` (logs, exit codes, the script);
* Slurm's own output, ``<job root>/slurm-out/slurm-<job id>.out``;
* its workspace copies, ``<job root>/workspaces/<copy>`` here and ``<job root>/workspaces/<hash>/<time>``
  on a cluster (one per submission; the newest of each workspace is what the next submission of it
  hard-links unchanged files from, ``remote_workspaces.json``).

An app is over when slurmctld lists it in a terminal state or does not list it at all (it forgot
the job, MinJobAge): a job that runs or waits is always listed, so ``squeue`` once per cluster
tells every app's fate, and a cluster that cannot be asked keeps all its apps.

Dangling copies are pruned here only (under the home's job root): a cluster's ``remote_dir`` may be
shared by the user's other machines and homes, whose records this home cannot see.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from torchx.specs import AppState, is_terminal

from torchx_ext import state
from torchx_ext.errors import BackendError, StateError, TorchxExtError
from torchx_ext.schedulers.retention import Leftover as Leftover  # slurm_jobs' hooks name them from here
from torchx_ext.schedulers.retention import Prunable as Prunable
from torchx_ext.schedulers.retention import Warn as Warn
from torchx_ext.schedulers.retention import dangling_copies, tree_bytes
from torchx_ext.schedulers.slurm_jobs import client as sc
from torchx_ext.schedulers.slurm_jobs.script import app_state_of

if TYPE_CHECKING:
    from torchx_ext.index import AppIndex
    from torchx_ext.schedulers.slurm_jobs.scheduler import SlurmJobsScheduler

SCHEDULER = "slurm_jobs"
OUTPUT_DIR = "slurm-out"  # as slurm_jobs.OUTPUT_DIR


def workspace_copies(record: Mapping[str, Any]) -> list[str]:
    """The workspace copies made for an app: the roles' images under its job root's ``workspaces``."""
    root = str(record.get("job_root", "")).rstrip("/") + "/workspaces/"
    return sorted({str(r["image"]) for r in record.get("roles", []) if str(r.get("image") or "").startswith(root)})


def app_paths(record: Mapping[str, Any]) -> list[str]:
    """Everything of an app under its job root (here, or on its cluster): see the module docstring."""
    job_id = str(record["app_id"]).rpartition(":")[2]
    out = os.path.join(str(record["job_root"]), OUTPUT_DIR, f"slurm-{job_id}.out")
    return [str(record["job_dir"]), out, *workspace_copies(record)]


def paths_bytes(paths: list[str]) -> int:
    """Bytes of the files under ``paths``, each counted once: with the default job root the record's
    directory IS the job directory, and a job root may be under the record's."""
    norm = sorted({os.path.normpath(os.path.abspath(p)) for p in paths})
    outer = [p for p in norm if not any(p.startswith(q.rstrip(os.sep) + os.sep) for q in norm if q != p)]
    return sum(tree_bytes(p) for p in outer)


def remove_files(scheduler: SlurmJobsScheduler, app_id: str, record: Mapping[str, Any]) -> None:
    """Removes an app's files (:func:`app_paths`; on the cluster in one round trip), then its record."""
    paths = app_paths(record)
    if record.get("login"):
        proc = scheduler._cluster(record).run(["rm", "-rf", "--", *paths])  # noqa: SLF001 - slurm_jobs' own hooks
        if proc.returncode != 0:
            raise BackendError(f"cannot remove {record['login']}:{record['job_dir']}: {proc.stderr.strip()}")
        _forget_links(set(workspace_copies(record)))
    else:
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
    shutil.rmtree(state.scheduler_dir(SCHEDULER, app_id), ignore_errors=True)


def _forget_links(removed: set[str]) -> None:
    """Drops remote_workspaces.json entries naming a removed copy: the next submission of that
    workspace ships it whole instead of linking into a directory that is gone."""
    if not removed:
        return

    def change(known: dict[str, Any]) -> Optional[dict[str, Any]]:
        kept = {k: v for k, v in known.items() if v not in removed}
        return kept if len(kept) != len(known) else None

    state.update_file(state.scheduler_dir(SCHEDULER, "remote_workspaces.json"), change)


def records(warn: Optional[Warn] = None) -> dict[str, dict[str, Any]]:
    """Every app record under the home, by app id; a damaged one is a ``warn`` (without ``warn``:
    StateError)."""
    try:
        names = os.listdir(state.scheduler_dir(SCHEDULER))
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if sc.split_app_id(name) is None:
            continue
        try:
            record = state.read_json(state.scheduler_dir(SCHEDULER, name, "app.json"))
        except StateError as e:
            if warn is None:
                raise
            warn(f"{SCHEDULER}: {e}; left alone")
            continue
        if record is not None:
            out[name] = record
    return out


def prunable(scheduler: SlurmJobsScheduler, cutoff: float, warn: Warn) -> list[Prunable]:
    """The recorded apps over before ``cutoff``: one ``squeue`` per cluster (see the module docstring)."""
    by_cluster: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for app_id, record in records(warn).items():
        by_cluster.setdefault(_cluster_key(record), {})[app_id] = record
    out = []
    for (login, _i, _c), apps in sorted(by_cluster.items()):
        client = scheduler._cluster(next(iter(apps.values())))  # noqa: SLF001 - slurm_jobs' own hooks
        try:
            listed = {j["job_id"]: app_state_of(j["state"], j["reason"]) for j in client.squeue_jobs() if j["leader"]}
        except TorchxExtError as e:
            warn(f"{SCHEDULER}: {login or 'the local cluster'} cannot be asked ({e}); its {len(apps)} "
                 "app(s) are left alone")
            continue
        for app_id, record in apps.items():
            job_id = app_id.rpartition(":")[2]
            st = listed.get(job_id)
            if st is not None and not is_terminal(st):
                continue  # runs or waits: never pruned
            ended = float(record.get("submitted") or 0)
            size: Optional[int] = None
            if not login:
                result = os.path.join(str(record["job_dir"]), "result")
                if os.path.exists(result):
                    ended = max(ended, os.path.getmtime(result))
                if st is None:
                    verdict = sc.verdict_from_files(job_id, str(record["job_dir"]))[0]
                    st = verdict if is_terminal(verdict) else None
                size = paths_bytes([*app_paths(record), state.scheduler_dir(SCHEDULER, app_id)])
            if ended < cutoff:
                out.append(Prunable(app_id, st or AppState.UNKNOWN, ended, size))
    return out


def _cluster_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """Which cluster an app's record says it runs on (its login, key and ssh config)."""
    return (str(record.get("login") or ""), str(record.get("identity_file") or ""),
            str(record.get("ssh_config") or ""))


def delete_apps(scheduler: SlurmJobsScheduler, app_ids: Sequence[str],
                done: Callable[[str, Optional[Exception]], None], index: AppIndex) -> None:
    """Deletes many apps with ONE ``squeue`` per cluster, not a ``scontrol show job`` per app (what
    ``delete``'s cancel asks; 2,000 of them were 90% of a prune's time): an app that slurmctld lists
    as running or waiting is deleted as ``delete`` does, cancelled first; the others are over, or
    forgotten by slurmctld, and neither can run again, so only their files and records go. The
    index learns of them in one write, after the files (an app gone from the disk but not yet from
    the index is not listed: see torchx_ext.index)."""
    by_cluster: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for app_id in app_ids:
        try:
            with scheduler._translated("delete"):  # noqa: SLF001 - slurm_jobs' own retention hooks, split out of its module for size
                record = scheduler._record(app_id)  # noqa: SLF001 - as above
                if record is None:  # nothing recorded: delete as usual (a no-op, or a cancel)
                    scheduler._delete(app_id)  # noqa: SLF001 - as above
        except TorchxExtError as e:
            done(app_id, e)
            continue
        if record is None:
            done(app_id, None)
        else:
            by_cluster.setdefault(_cluster_key(record), {})[app_id] = record
    for apps in by_cluster.values():
        try:
            with scheduler._translated("delete"):  # noqa: SLF001 - as above
                client = scheduler._cluster(next(iter(apps.values())))  # noqa: SLF001 - as above
                live = {j["job_id"] for j in client.squeue_jobs()
                        if j["leader"] and not is_terminal(app_state_of(j["state"], j["reason"]))}
        except TorchxExtError as e:  # the cluster cannot be asked: none of its apps is touched
            for app_id in apps:
                done(app_id, e)
            continue
        removed: list[str] = []
        try:
            for app_id, record in apps.items():
                try:
                    if app_id.rpartition(":")[2] in live:
                        scheduler.delete(app_id)
                    else:
                        with scheduler._translated("delete"):  # noqa: SLF001 - as above
                            remove_files(scheduler, app_id, record)
                        removed.append(app_id)
                except TorchxExtError as e:
                    done(app_id, e)
                    continue
                done(app_id, None)
        finally:
            index.forget_many(removed)


def leftovers(cutoff: float, warn: Warn) -> list[Leftover]:
    """Local workspace copies under the home's job root that no record names."""
    try:
        referenced = [c for r in records().values() if not r.get("login") for c in workspace_copies(r)]
    except TorchxExtError as e:  # a damaged record: what it refers to is not known
        warn(f"{SCHEDULER}: {e}; no dangling workspace copy is removed")
        return []
    return dangling_copies(state.scheduler_dir(SCHEDULER, "workspaces"), referenced, cutoff)
