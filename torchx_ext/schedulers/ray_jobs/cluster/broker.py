"""Starts dependent apps when their dependencies succeed: ``python -m ray_jobs_cluster.broker``.

One broker job per cluster and version of this code (submission id ``torchx-ext-broker-<hash>-<8 hex>``,
fresh at each start). Why not one waiting driver per app: a
Ray job costs a job-supervisor actor (~100 MB) plus its driver (~70 MB) for as long as it waits,
and supervisors start about one per second, so a pipeline of hundreds of pending stages would
not fit. Instead a dependent app is submitted as a *waiting record*: a Ray job
``<id>--waiting`` that carries the app's runtime_env and, in its metadata, the app's entrypoint,
resources and dependencies, and that never starts (it asks for ``RECORD_RESOURCE``, which no node
has, so Ray starts no supervisor for it). The broker is stateless: every poll it lists the
cluster's jobs and, for each waiting record whose app job does not exist yet,

* all dependencies SUCCEEDED → submits the app job (submission id ``<id>``) from the record;
* a dependency FAILED, STOPPED (a cancel's verdict counts as STOPPED), or gone → submits ``<id>``
  as a verdict job, held like a record and released at once, with metadata naming the dependency
  (so the app is FAILED with a reason, never stuck);
* otherwise leaves it waiting.

Once the app job exists (started, failed, or cancelled by ``torchx cancel``), the broker releases
the record: it kills the record's pending supervisor actor, which Ray then reports FAILED
("supervisor actor died"), a status nobody reads for a held record.

Submission ids are unique per cluster, so an app id is decided exactly once, even against a
concurrent ``torchx cancel`` (which claims the id the same way) or a second broker.

Files uploaded with the waiting record (working_dir, py_modules) are kept alive while it waits:
Ray deletes unreferenced packages once its temporary reference expires (10 min by default).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from . import RECORD_HELD, RECORD_RESOURCE, already_exists

KIND = "torchx_ext_kind"  # metadata: "app", "waiting", "verdict", "broker"
PIN_EVERY_S = 240.0
PIN_FOR_S = 900
RELEASE_AFTER_S = 3.0  # a held job is released once it is this old (see decided_held)


def _uris(runtime_env: Dict[str, Any]) -> Iterable[str]:
    wd = runtime_env.get("working_dir")
    if isinstance(wd, str) and "://" in wd:
        yield wd
    for m in runtime_env.get("py_modules") or []:
        if isinstance(m, str) and "://" in m:
            yield m


def dependency_state(dep: str, jobs: Dict[str, Any]) -> str:
    """SUCCEEDED/FAILED/STOPPED/PENDING/RUNNING/MISSING of the app with submission id ``dep``."""
    job = jobs.get(dep)
    if job is not None:
        meta = job.metadata or {}
        if meta.get(KIND) == "verdict":  # decided without running: the outcome is in its metadata,
            # whatever Ray says of the job that carries it (a cancel's claim exits 0: SUCCEEDED)
            return "STOPPED" if meta.get("torchx_ext_verdict") == "CANCELLED" else "FAILED"
        return str(job.status)
    waiting = jobs.get(dep + "--waiting")
    if waiting is None:
        return "MISSING"
    if str(waiting.status) == "FAILED" and RECORD_HELD not in (waiting.metadata or {}):
        # an older record (one that ran): its runtime env could not be set up, so it never starts
        return "FAILED"
    return "PENDING"


def decide(record: Any, jobs: Dict[str, Any]) -> Optional[Dict[str, str]]:
    """None to keep waiting, else {"verdict": "start"} or {"verdict": "fail", "msg": ...}."""
    meta = record.metadata or {}
    names = json.loads(meta.get("torchx_ext_dependency_names", "{}"))  # submission id -> app id
    for dep in json.loads(meta.get("torchx_ext_dependencies", "[]")):
        state = dependency_state(dep, jobs)
        name = names.get(dep, dep)
        if state in ("FAILED", "STOPPED"):
            return {"verdict": "fail", "msg": f"dependency '{name}' {state.lower()}; not started"}
        if state == "MISSING":
            return {"verdict": "fail", "msg": f"dependency '{name}' no longer exists; not started"}
        if state != "SUCCEEDED":
            return None
    return {"verdict": "start"}


def submit_decided(client: Any, record: Any, decision: Dict[str, str]) -> None:
    meta = dict(record.metadata or {})
    app_id = meta["torchx_ext_submission_id"]
    real_meta = json.loads(meta["torchx_ext_app_metadata"])
    try:
        if decision["verdict"] == "start":
            kwargs = json.loads(meta.get("torchx_ext_submit_kwargs", "{}"))
            runtime_env = dict(record.runtime_env or {})
            if "torchx_ext_pip" in meta:  # kept out of the record so that it installs nothing
                runtime_env["pip"] = json.loads(meta["torchx_ext_pip"])
            client.submit_job(entrypoint=meta["torchx_ext_entrypoint"], submission_id=app_id,
                              runtime_env=runtime_env, metadata=real_meta, **kwargs)
        else:
            # a verdict is read from its metadata, never run: held like a record, then released
            real_meta.update({KIND: "verdict", "torchx_ext_verdict": "FAILED",
                              "torchx_ext_msg": decision["msg"], RECORD_HELD: "1"})
            client.submit_job(entrypoint="exit 1", submission_id=app_id, metadata=real_meta,
                              entrypoint_resources={RECORD_RESOURCE: 1})
        print(f"{time.strftime('%H:%M:%S')} {app_id}: {decision['verdict']} {decision.get('msg', '')}", flush=True)
    except RuntimeError as e:
        if not already_exists(e):  # else: cancelled (or decided) concurrently
            print(f"{app_id}: could not submit: {e}", file=sys.stderr, flush=True)


def undecided(listed: List[Any]) -> List[Any]:
    """The waiting records among ``listed`` whose app job does not exist yet."""
    ids = {j.submission_id for j in listed if j.submission_id}
    return [j for j in listed if (j.metadata or {}).get(KIND) == "waiting"
            and (j.metadata or {}).get("torchx_ext_submission_id") not in ids]


def decided_held(listed: List[Any]) -> List[Tuple[str, bool]]:
    """(job id, Ray still says PENDING) of the held jobs among ``listed`` that the broker releases:
    the waiting records whose app job exists, and the verdicts it submitted. Only those that may
    still have a supervisor actor pending: Ray reports them PENDING, or failed because the
    supervisor waited too long to start (RAY_JOB_START_TIMEOUT_SECONDS)."""
    ids = {j.submission_id for j in listed if j.submission_id}
    out = []
    for j in listed:
        meta = j.metadata or {}
        if RECORD_HELD not in meta:
            continue
        decided = meta.get(KIND) == "verdict" or (
            meta.get(KIND) == "waiting" and meta.get("torchx_ext_submission_id") in ids)
        pending = str(j.status) == "PENDING"
        # Ray's job monitor (polling every 1 s) must hold the supervisor's handle before the kill,
        # or it never sees the actor die and leaves the job PENDING for 15 min (undeletable)
        settled = time.time() - (getattr(j, "start_time", None) or 0) / 1000 > RELEASE_AFTER_S
        if decided and settled and (pending or str(getattr(j, "error_type", "") or "").endswith("START_TIMEOUT")):
            out.append((str(j.submission_id), pending))
    return out


def release(job_id: str) -> bool:
    """Kills the pending supervisor actor of a held job; False if there is none (not yet
    registered, or gone already)."""
    import ray

    try:
        from ray.dashboard.modules.job.common import JOB_ACTOR_NAME_TEMPLATE, SUPERVISOR_ACTOR_RAY_NAMESPACE
    except ImportError:  # the names Ray has used since its Jobs API began
        JOB_ACTOR_NAME_TEMPLATE, SUPERVISOR_ACTOR_RAY_NAMESPACE = (
            "_ray_internal_job_actor_{job_id}", "SUPERVISOR_ACTOR_RAY_NAMESPACE")
    try:
        actor = ray.get_actor(JOB_ACTOR_NAME_TEMPLATE.format(job_id=job_id),
                              namespace=SUPERVISOR_ACTOR_RAY_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


def _waiting_now(client: Any) -> bool:
    """A last look before an idle exit: a record may have been submitted since the last poll.
    The submitter checks the broker again after submitting a record, and describe() restarts a
    broker that is gone; what remains is a record submitted within the second this process takes
    to exit after this look, once per idle period, and the next status of any waiting app heals it."""
    try:
        return bool(undecided(client.list_jobs()))
    except Exception:  # noqa: BLE001 - cannot tell: stay (exiting with a record waiting is the worse mistake)
        return True


def main() -> int:
    import ray
    from ray.job_submission import JobSubmissionClient

    ctx = ray.init(log_to_driver=False)
    client = JobSubmissionClient("http://" + str(ctx.dashboard_url))
    interval = float(os.environ.get("TORCHX_EXT_BROKER_POLL_S", "0.5"))
    idle_exit_s = float(os.environ.get("TORCHX_EXT_BROKER_IDLE_EXIT_S", "600"))
    pinned: Dict[str, float] = {}
    released: Set[str] = set()  # held jobs released (or tried) by this broker: once each
    last_busy = time.time()
    print(f"torchx-ext broker up, polling {ctx.dashboard_url} every {interval} s", flush=True)
    while True:
        try:
            listed = client.list_jobs()
        except Exception as e:  # noqa: BLE001 - the dashboard restarts, whatever it raises: keep going
            print(f"list_jobs failed: {e}", file=sys.stderr, flush=True)
            time.sleep(5)
            continue
        jobs = {j.submission_id: j for j in listed if j.submission_id}
        now = time.time()
        waiting = undecided(listed)
        if waiting:
            last_busy = now
        elif now - last_busy > idle_exit_s and not _waiting_now(client):
            # nothing to do for a while: exit, so brokers of older versions do not poll forever;
            # the next submission with dependencies, or status of a waiting app, starts one again
            print(f"idle for {idle_exit_s:g} s, exiting", flush=True)
            return 0
        for job in waiting:
            decision = decide(job, jobs)
            if decision is not None:
                submit_decided(client, job, decision)  # its record is released once the app job shows
                continue
            for uri in _uris(job.runtime_env or {}):
                if now - pinned.get(uri, 0) > PIN_EVERY_S:
                    try:
                        from ray.experimental.internal_kv import _pin_runtime_env_uri

                        _pin_runtime_env_uri(uri, expiration_s=PIN_FOR_S)
                        pinned[uri] = now
                    except Exception as e:  # noqa: BLE001 - pinning is a nicety: said, and tried next round
                        print(f"could not pin {uri}: {e}", file=sys.stderr, flush=True)
        for job_id, pending in decided_held(listed):  # records and verdicts, also an earlier broker's
            _release(job_id, pending, released)
        time.sleep(interval)


def _release(job_id: str, pending: bool, released: Set[str]) -> None:
    if job_id in released:
        return
    try:
        # a PENDING job whose actor is not found yet is looked for again at the next poll
        if release(job_id) or not pending:
            released.add(job_id)
    except Exception as e:  # noqa: BLE001 - it stays PENDING: a job record and an unschedulable actor, nothing runs
        released.add(job_id)
        print(f"could not release {job_id}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
