"""What ``ray_jobs`` leaves behind, and how ``delete`` and ``prune`` remove it.

An app leaves, on its cluster: its Ray job (``<sid>``; its log and metadata), and where it had
dependencies or was cancelled while pending, the ``<sid>--waiting`` record and the
``<sid>--cancelled`` marker. On this machine: a cancel record (``ray_jobs/cancelled/<digest>``,
kept an hour at most anyway) and the cluster's entry in ``clusters.json`` (shared by every app on
that cluster). Workspace copies are removed once uploaded; a killed submitter may leave one.

``prune`` considers the apps this caller submitted (the job's ``torchx_ext_submitter`` metadata:
uid, machine and home) on the clusters of ``clusters.json``: a Ray cluster is shared, and another
user's ended job is theirs. Apps submitted before that metadata existed are never pruned (delete
them by handle). A cluster that cannot be reached is a warning, and its entry is dropped once it
has been unreachable for longer than the cutoff: each one costs ``list`` a request timeout.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from torchx.specs import is_terminal

from torchx_ext import state
from torchx_ext.errors import TorchxExtError
from torchx_ext.schedulers.ray_jobs import adapter
from torchx_ext.schedulers.ray_jobs import client as rc
from torchx_ext.schedulers.ray_jobs import local as rl
from torchx_ext.schedulers.retention import Leftover as Leftover  # ray_jobs' hooks name them from here
from torchx_ext.schedulers.retention import Prunable as Prunable
from torchx_ext.schedulers.retention import Warn as Warn
from torchx_ext.schedulers.retention import dangling_copies

if TYPE_CHECKING:
    from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsScheduler

SCHEDULER = "ray_jobs"
SUBMITTER_KEY = "torchx_ext_submitter"


def job_ids(sid: str) -> list[str]:
    """The Ray jobs of one app (see the module docstring)."""
    return [sid, sid + "--waiting", sid + rc.CANCELLED_SUFFIX]


def forget_app(url: str, sid: str) -> None:
    """Removes what this machine keeps of one app (its cancel record)."""
    try:
        os.remove(rl.cancel_record(url, sid))
    except FileNotFoundError:
        pass


def prunable(scheduler: RayJobsScheduler, cutoff: float, warn: Warn) -> list[Prunable]:
    """This caller's apps, on the clusters it submitted to, that ended before ``cutoff``."""
    me = rl.submitter()
    out = []
    for url in rl.known_clusters():
        try:
            jobs = scheduler._client(url).list_jobs()  # noqa: SLF001 - ray_jobs' own retention hooks, split out of its module for size
        except Exception as e:
            if not adapter.is_unreachable(e):
                raise
            rl.note_unreachable(url)  # starts the count after which prune forgets the cluster
            msg = str(e) if isinstance(e, TorchxExtError) else adapter.unreachable_message(url, e)
            warn(f"{SCHEDULER}: {msg}; its apps are left alone")
            continue
        rl.in_contact(url)
        by_id = {j.submission_id: j for j in jobs}
        for sid, st, _name in rc.listed_apps(jobs):
            job = by_id.get(sid)
            if job is None or not is_terminal(st) or (job.metadata or {}).get(SUBMITTER_KEY) != me:
                continue
            ended = (job.end_time or job.start_time or 0) / 1000
            if ended < cutoff:
                out.append(Prunable(rc.make_app_id(url, sid), st, ended, None))
    return out


def delete_apps(scheduler: RayJobsScheduler, app_ids: Sequence[str],
                done: Callable[[str, Optional[Exception]], None]) -> None:
    """Deletes many apps with one listing and one wait per cluster: an app the listing shows
    ended is not cancelled first, and :func:`rc.delete_jobs` asks only for jobs that exist."""
    by_url: dict[str, list[str]] = {}
    for app_id in app_ids:
        url, sid = rc.split_app_id(app_id)
        by_url.setdefault(url or "", []).append(sid)
    for url, sids in by_url.items():
        listed: dict[str, Any] = {}
        ended: set[str] = set()
        try:
            with scheduler._translated("delete"):  # noqa: SLF001 - ray_jobs' own retention hooks, split out of its module for size
                if url:
                    jobs = scheduler._client(url).list_jobs()  # noqa: SLF001 - as above
                    listed = {j.submission_id: j for j in jobs}
                    ended = {sid for sid, st, _ in rc.listed_apps(jobs) if is_terminal(st)}
        except TorchxExtError as e:
            for sid in sids:
                done(rc.make_app_id(url, sid), e)
            continue
        kept = []
        for sid in sids:
            try:
                with scheduler._translated("delete"):  # noqa: SLF001 - as above
                    if url and sid not in ended:
                        scheduler._cancel(rc.make_app_id(url, sid))  # noqa: SLF001 - as delete does: a running app stops first
            except TorchxExtError as e:
                done(rc.make_app_id(url, sid), e)
                continue
            kept.append(sid)
        # the listing names every job an ended app has (one it lacks does not exist); a cancel
        # just now may have made a marker job, so a cancelled app's jobs are all asked for
        ids = [j for sid in kept for j in job_ids(sid) if sid not in ended or j in listed]
        left: set[str] = set()
        try:
            with scheduler._translated("delete"):  # noqa: SLF001 - as above
                if url:
                    left = set(rc.delete_jobs(scheduler._client(url), ids, listed=listed))  # noqa: SLF001 - as above
        except TorchxExtError as e:
            for sid in kept:
                done(rc.make_app_id(url, sid), e)
            continue
        for sid in kept:
            if any(j in left for j in job_ids(sid)):
                done(rc.make_app_id(url, sid), TorchxExtError(
                    f"Ray kept job {sid} after repeated deletes for a while; run prune (or delete) again"))
                continue
            forget_app(url, sid)
            done(rc.make_app_id(url, sid), None)


def leftovers(cutoff: float, warn: Warn) -> list[Leftover]:
    """Clusters unreachable since before ``cutoff``; workspace copies a killed submitter left."""
    out = []
    for url, entry in sorted(rl.known_clusters().items()):
        since: Any = entry.get("unreachable_since")
        if since is not None and float(since) < cutoff:
            hours = (time.time() - float(since)) / 3600
            out.append(Leftover(f"cluster {url} from clusters.json (unreachable for {hours:.1f}h)", None,
                                lambda u=url: rl.forget_unreachable(u, cutoff)))  # type: ignore[misc]
    return out + dangling_copies(state.scheduler_dir(SCHEDULER, "workspaces"), [], cutoff)
