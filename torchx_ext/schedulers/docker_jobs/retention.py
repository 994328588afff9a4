"""What ``docker_jobs`` leaves behind, and how ``delete`` and ``prune`` remove it.

An app leaves, on the daemon: its containers (kept after they exit, for their logs), its network
(removed once the app is over), its verdict volume ``<app>.verdict``, its watcher lease volumes
``<app>.watcher-<epoch>`` and the workspace images built for it (labelled ``torchx-ext.workspace``);
on the submitting machine: ``$TORCHX_EXT_HOME/docker_jobs/<app>.request.json`` and
``<app>.watcher.log``.

``prune`` considers only the apps this caller submitted (the submitter label: uid, machine and
home, as the watcher's healing does): a daemon is shared, and another user's ended app is theirs.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from torchx_ext import state
from torchx_ext.schedulers.docker_jobs import daemon as d
from torchx_ext.schedulers.docker_jobs import lease as leases
from torchx_ext.schedulers.docker_jobs import readiness, watching
from torchx_ext.schedulers.docker_jobs.inventory import Ended, Inventory
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts
from torchx_ext.schedulers.retention import IN_FLIGHT_S, Leftover, Prunable, Warn

SCHEDULER = d.SCHEDULER
LOCAL_SUFFIXES = (".request.json", ".watcher.log")


def local_files(app_id: str) -> list[str]:
    """The files an app keeps on the submitting machine."""
    return [state.scheduler_dir(SCHEDULER, app_id + s) for s in LOCAL_SUFFIXES]


def _size(paths: Iterable[str]) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def image_ids(api: Any, app_id: str) -> list[str]:
    """The workspace images (built by docker_jobs) the app's containers run."""
    ids = {s.get("ImageID", "") for s in api.containers(all=True, filters=d.app_filter(app_id))}
    return sorted(i for i in ids if i)


def remove_workspace_images(api: Any, ids: Iterable[str]) -> None:
    """Removes the workspace images among ``ids`` (never a base image); one still used by another
    app's container (the same workspace, built twice: the same image) stays."""
    import docker

    for image_id in ids:
        try:
            labels = (api.inspect_image(image_id).get("Config") or {}).get("Labels") or {}
            if labels.get(d.L_SCHEDULER) == SCHEDULER and d.P + "workspace" in labels:
                api.remove_image(image_id)
        except docker.errors.APIError:  # gone already, or in use (409): kept
            pass


def remove_local_files(app_id: str) -> None:
    for path in local_files(app_id):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def app_volumes(api: Any) -> dict[str, list[str]]:
    """The watcher lease volumes and readiness records of every app, by app id (two daemon reads:
    they carry no scheduler label, so each kind is read by its own label)."""
    def labelled(label: str) -> list[dict[str, Any]]:
        return d.retrying(lambda: api.volumes(filters={"label": [label]}).get("Volumes") or [])

    out: dict[str, list[str]] = {}
    for label in (leases.L_LEASE, readiness.L_READY):
        for v in labelled(label):
            app_id = (v.get("Labels") or {}).get(label, "")
            if app_id and str(v.get("Name", "")).startswith(app_id + "."):  # not a colliding name of someone else's
                out.setdefault(app_id, []).append(v["Name"])
    return out


def remove_ended(api: Any, app_id: str, ended: Ended, volumes: list[str]) -> None:
    """Removes what an app that is over left (as ``delete`` does, in the same order: its containers
    before its verdict), by the ids already read: ``ended`` (:meth:`.inventory.Inventory.ended`)
    and its ``volumes`` (:func:`app_volumes`). Nothing of an app that is over starts again."""
    import docker

    images = sorted({c.get("ImageID", "") for c in ended.containers} - {""})
    for c in ended.containers:
        try:
            api.remove_container(c["Id"], force=True)
        except docker.errors.NotFound:
            pass
    if ended.verdict.get(d.L_NETWORK):
        d.remove_network(api, ended.verdict[d.L_NETWORK])
    for name in [d.verdict_volume(app_id), *volumes]:
        try:
            api.remove_volume(name)
        except docker.errors.NotFound:
            pass
    watching.unrequest(app_id)
    remove_workspace_images(api, images)
    remove_local_files(app_id)


def prunable(inv: Inventory, cutoff: float) -> list[Prunable]:
    """This caller's apps that are over (:meth:`.inventory.Inventory.ended`), decided before ``cutoff``."""
    me = d.submitter()
    out = []
    for app_id, e in inv.ended().items():
        # the submitter is on the containers (a verdict alone, its containers removed: not ours to judge)
        if ((e.containers[0].get("Labels") or {}) if e.containers else e.verdict).get(d.L_SUBMITTER, "") != me:
            continue
        ended = float(e.verdict.get(d.L_TIME) or 0)
        if ended < cutoff:
            out.append(Prunable(app_id, e.state, ended, _size(local_files(app_id))))
    return out


def leftovers(api: Any, known: set[str], cutoff: float, warn: Warn) -> list[Leftover]:
    """Request/log files of apps the daemon no longer knows, and lease volumes of no app, unused
    since before ``cutoff`` (and older than IN_FLIGHT_S: a submission takes its lease first)."""
    limit = min(cutoff, time.time() - IN_FLIGHT_S)
    out = []
    try:
        names = os.listdir(state.scheduler_dir(SCHEDULER))
    except FileNotFoundError:
        names = []
    for name in sorted(names):
        app_id = next((name[: -len(s)] for s in LOCAL_SUFFIXES if name.endswith(s)), None)
        path = state.scheduler_dir(SCHEDULER, name)
        if app_id is None or app_id in known or os.path.getmtime(path) >= limit:
            continue
        out.append(Leftover(f"{path} (the daemon knows no app {app_id})", os.path.getsize(path),
                            lambda p=path: os.remove(p)))  # type: ignore[misc]
    vols = api.volumes(filters={"label": leases.L_LEASE}).get("Volumes") or []
    orphans: dict[str, float] = {}
    for v in vols:
        app_id = (v.get("Labels") or {}).get(leases.L_LEASE, "")
        created = parse_ts(str(v.get("CreatedAt") or "")) or time.time()
        if app_id and app_id not in known:
            orphans[app_id] = max(orphans.get(app_id, 0.0), created)
    for app_id, created in sorted(orphans.items()):
        if created < limit:
            out.append(Leftover(f"watcher lease volumes of {app_id} (no such app)", None,
                                lambda a=app_id: leases.remove_leases(api, a)))  # type: ignore[misc]
    return out
