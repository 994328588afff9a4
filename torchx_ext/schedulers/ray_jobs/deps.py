"""Dependencies on a Ray cluster, client side: waiting records and the cluster's broker job.

A dependent app is submitted as a *waiting record* (a job ``<id>--waiting`` that never starts and
carries the app's submission in its metadata); the broker job (:mod:`ray_jobs_cluster.broker`)
submits the app when its dependencies succeed. Here: submitting a record, finding or starting the
broker, and reading a waiting app's state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shlex
import time
from typing import Any, Optional

from torchx.specs import AppState

from torchx_ext.schedulers.ray_jobs import cluster as cluster
from torchx_ext.schedulers.ray_jobs import local as rl
from torchx_ext.schedulers.ray_jobs.client import get_job, job_status, make_app_id, split_app_id
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND

logger = logging.getLogger(__name__)


@functools.cache
def broker_prefix() -> str:
    """The prefix of the broker jobs' submission ids, versioned by the broker's code: an upgraded
    client starts its own broker (an older one still running is harmless: every decision claims a
    unique id). Each start gets a fresh ``<prefix>-<8 hex>``: Ray cannot reliably reuse the id of
    a deleted job whose supervisor actor may still hold its name."""
    digest = hashlib.sha1()
    for name in ("__init__.py", "broker.py"):
        with open(os.path.join(os.path.dirname(cluster.__file__), name), "rb") as f:
            digest.update(f.read())
    return f"torchx-ext-broker-{digest.hexdigest()[:8]}"


def running_broker(client: Any, known: Optional[str] = None) -> Optional[str]:
    """The submission id of a running broker of this version on the cluster, if any. One GET
    when the caller already knows one (``known``); otherwise one list_jobs, which also deletes
    broker records that ended over 10 minutes ago (one per idle exit) so they do not pile up."""
    if known:
        job = get_job(client, known)
        if job is not None and job_status(job) in ("PENDING", "RUNNING"):
            return known
    found = None
    for job in client.list_jobs():
        sid = job.submission_id or ""
        if not sid.startswith(broker_prefix() + "-"):
            continue
        if job_status(job) in ("PENDING", "RUNNING"):
            found = sid
        elif job.end_time and time.time() - job.end_time / 1000 > 600:
            try:
                client.delete_job(sid)
            except Exception:  # noqa: BLE001 - best effort: a leftover record only costs a list entry
                pass
    return found


def start_broker(client: Any, python: str, package_dir: str) -> str:
    """Submits a broker job under a fresh id and returns that id."""
    sid = f"{broker_prefix()}-{os.urandom(4).hex()}"
    client.submit_job(
        entrypoint=" ".join(shlex.quote(w) for w in [python, "-m", "ray_jobs_cluster.broker"]),
        submission_id=sid, metadata={KIND: "broker"}, runtime_env={"py_modules": [package_dir]})
    return sid


class Brokers:
    """Finds, starts and remembers (per process, a cache) the broker job of each cluster."""

    def __init__(self) -> None:
        self._running: dict[str, str] = {}  # dashboard url -> the broker job last seen running

    def ensure(self, client: Any, url: str, python: str) -> bool:
        """Starts the cluster's broker job unless one runs; returns whether it started one. Two
        submitters racing may start two: harmless, every decision claims a unique id."""
        found = running_broker(client, self._running.get(url))
        # the staged package, named ray_jobs_cluster (the broker's entrypoint imports it by that
        # name; the source directory here is ray_jobs/cluster)
        self._running[url] = found or start_broker(client, python, rl.cluster_package())
        return not found

    def submit_waiting(self, client: Any, url: str, sid: str, entrypoint: str, runtime_env: dict[str, Any],
                       metadata: dict[str, str], dependencies: list[str], submit_kwargs: dict[str, Any]) -> None:
        """Submits the app as a waiting record that the broker starts later."""
        python = entrypoint.split()[0]
        self.ensure(client, url, python)
        meta = {KIND: "waiting", cluster.RECORD_HELD: "1", "torchx_ext_submission_id": sid,
                "torchx_ext_dependencies": json.dumps(dependencies),
                "torchx_ext_dependency_names": json.dumps({d: make_app_id(url, d) for d in dependencies}),
                "torchx_ext_entrypoint": entrypoint, "torchx_ext_submit_kwargs": json.dumps(submit_kwargs),
                "torchx_ext_app_metadata": json.dumps(metadata), "torchx_ext_app": metadata["torchx_ext_app"]}
        record_env = {k: v for k, v in runtime_env.items() if k != "pip"}
        if "pip" in runtime_env:  # installed by the app's job, not by the record
            meta["torchx_ext_pip"] = json.dumps(runtime_env["pip"])
        # the record only has to exist: it asks for a resource no node has, so Ray keeps it PENDING
        # and never starts its job supervisor (the broker releases it once the app is decided)
        client.submit_job(entrypoint="exit 0", submission_id=sid + "--waiting", runtime_env=record_env,
                          metadata=meta, entrypoint_resources={cluster.RECORD_RESOURCE: 1})
        # again: an idle broker may have exited between its last look and this record
        self.ensure(client, url, python)

    def waiting_state(self, client: Any, app_id: str, sid: str) -> Optional[tuple[AppState, str, dict[str, str]]]:
        """(state, message, the app's metadata) of an app waiting for its dependencies; None if
        there is no waiting record either.

        The one action a query may take: a waiting app needs the broker, which may have been
        killed; starting it (never deciding for it) is what heals the pipeline. Logged.
        """
        record = get_job(client, sid + "--waiting")
        if record is None:
            return None
        meta = record.metadata or {}
        app_meta = json.loads(meta.get("torchx_ext_app_metadata", "{}"))
        if job_status(record) == "FAILED" and cluster.RECORD_HELD not in meta:  # an older, running record
            return AppState.FAILED, f"could not set up the job's runtime_env: {record.message}", app_meta
        names = json.loads(meta.get("torchx_ext_dependency_names", "{}"))
        deps = ", ".join(names.get(d, d) for d in json.loads(meta.get("torchx_ext_dependencies", "[]")))
        url = split_app_id(app_id)[0] or ""
        try:
            started = self.ensure(client, url, str(meta.get("torchx_ext_entrypoint") or "python").split()[0])
        except RuntimeError as e:  # the dashboard answered, and refused the broker job
            return AppState.UNKNOWN, (f"waiting for {deps}, but no torchx-ext broker job ({broker_prefix()}-*) "
                                      f"runs on the cluster and starting one failed: {e}"), app_meta
        if started:
            logger.warning("ray_jobs: no torchx-ext broker job was running on %s; started one", url)
        note = " (no torchx-ext broker job was running; started one)" if started else ""
        return AppState.PENDING, f"waiting for dependencies: {deps}{note}", app_meta
