"""The Jobs API side of ``ray_jobs``: addresses and app ids, jobs and their states.

The client itself (and the one use of Ray's private client API) is :mod:`.adapter`; a job's log,
demultiplexed and followed, is :mod:`.logs`.

Nothing here imports ray at module import: ``torchx runopts`` and ``--dryrun`` must stay cheap
(``from ray.job_submission import JobSubmissionClient`` alone costs ~0.6 s).
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import time
import urllib.parse
from typing import Any, Optional, Sequence

from torchx.specs import AppState

from torchx_ext.errors import InvalidOptionError
from torchx_ext.schedulers.ray_jobs import cluster as cluster
from torchx_ext.schedulers.ray_jobs.adapter import raise_error, request
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND

APP_SEP = "~"  # app id = <address>~<submission id>; neither part can contain it


# ---------------------------------------------------------------------------- addresses ----
def resolve_dashboard(cfg_value: Optional[str]) -> str:
    """The dashboard URL from the run option, else ``$RAY_ADDRESS`` when it is an http(s) URL."""
    url = cfg_value or os.environ.get("RAY_ADDRESS", "")
    if not url:
        raise InvalidOptionError(
            "ray_jobs needs the Ray dashboard (Jobs API) address: pass -cfg dashboard_url=http://HEAD:8265, "
            "set it in the [ray_jobs] section of .torchxconfig, or export RAY_ADDRESS=http://HEAD:8265"
        )
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise InvalidOptionError(
            f"'{url}' is not a Ray dashboard address: the Jobs API is HTTP (http://HEAD:8265); "
            f"'{scheme}://' addresses (GCS, Ray Client) cannot submit jobs"
        )
    return url.rstrip("/")


def encode_address(url: str) -> str:
    """``http://127.0.0.1:8265`` → ``127.0.0.1:8265``; anything else is percent-encoded."""
    rest = url[len("http://"):] if url.startswith("http://") else url
    return urllib.parse.quote(rest, safe=":@")


def decode_address(addr: str) -> Optional[str]:
    """The dashboard URL an app id names, or None when it is not an http(s) URL (such an id is
    no app of ours: nothing is asked of it)."""
    url = urllib.parse.unquote(addr)
    url = url if "://" in url else "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.strip("/"):
        return None
    return url.rstrip("/")


def same_dashboard(a: str, b: str) -> bool:
    """Do two dashboard URLs name the same endpoint? Scheme and host compare case-insensitively,
    a trailing slash is dropped; anything else (another port, path or scheme) is another one."""
    def key(url: str) -> tuple[str, str, str]:
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        return parts.scheme.lower(), parts.netloc.lower(), parts.path

    return key(a) == key(b)


def make_app_id(url: str, submission_id: str) -> str:
    return f"{encode_address(url)}{APP_SEP}{submission_id}"


def split_app_id(app_id: str) -> tuple[Optional[str], str]:
    """``(dashboard url or None, submission id)``; a bare id uses ``$RAY_ADDRESS``; an id whose
    address is not http(s) has no dashboard."""
    if APP_SEP in app_id:
        addr, sid = app_id.rsplit(APP_SEP, 1)
        return decode_address(addr), sid
    env = os.environ.get("RAY_ADDRESS", "")
    return (resolve_dashboard(env) if env.startswith(("http://", "https://")) else None), app_id


def get_json(client: Any, endpoint: str) -> Any:
    """A GET on the Jobs API; None for HTTP 404 (decided on the status code, not on text)."""
    r = request(client, "GET", endpoint)
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise_error(client, r)
    return r.json()


def supports_label_selector(client: Any) -> bool:
    """Older Ray clients (< 2.55) have no ``entrypoint_label_selector`` (they raise TypeError)."""
    try:
        return "entrypoint_label_selector" in inspect.signature(client.submit_job).parameters
    except (TypeError, ValueError):
        return False


def placement_state(client: Any, name: str) -> Optional[str]:
    """State of the placement group ``name`` from the dashboard's state API: PENDING, PREPARED,
    CREATED, RESCHEDULING, REMOVED, or ABSENT (not created yet); None if the API gives no answer
    (then the caller keeps the job's own state: one extra request must not break describe)."""
    query = urllib.parse.urlencode({"filter_keys": "name", "filter_predicates": "=", "filter_values": name,
                                    "limit": 10, "detail": 0})
    try:
        rows = request(client, "GET", "/api/v0/placement_groups?" + query).json()["data"]["result"]["result"]
    except Exception:  # noqa: BLE001 - any failure of this extra request: the job's own state stands
        return None
    states = [row.get("state") for row in rows if row.get("name") == name]
    return str(states[0]) if states else "ABSENT"


# ---------------------------------------------------------------------------- jobs -------
def get_job(client: Any, sid: str) -> Any:
    """The job's JobDetails, or None if the cluster has no job with that submission id.

    The same request as ``client.get_job_info``, which answers a missing job only with a
    RuntimeError whose text holds "404" (as a hex submission id may)."""
    from ray.job_submission import JobDetails

    found = get_json(client, f"/api/jobs/{sid}")
    return None if found is None else JobDetails(**found)


def job_status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


STATES = {"PENDING": AppState.PENDING, "RUNNING": AppState.RUNNING, "SUCCEEDED": AppState.SUCCEEDED,
          "FAILED": AppState.FAILED, "STOPPED": AppState.CANCELLED}


CANCELLED_SUFFIX = "--cancelled"  # the marker job a cancel of a pending app leaves


def job_state(client: Any, job: Any, marker: Optional[bool] = None) -> tuple[AppState, str, dict[str, Any]]:
    """An app job's state, message and the driver's verdict (per-replica states). ``marker``:
    whether the job has a cancel marker, if known (else it is asked for when needed)."""
    meta = job.metadata or {}
    if meta.get(KIND) == "verdict":  # decided without running: cancelled or failed dependency
        return AppState[meta.get("torchx_ext_verdict", "FAILED")], meta.get("torchx_ext_msg", ""), {}
    st = STATES.get(job_status(job), AppState.UNKNOWN)
    verdict = parse_verdict(job.message or "")
    msg = verdict.get("msg") or ("" if st == AppState.SUCCEEDED else (job.message or ""))
    if st == AppState.PENDING and (marker if marker is not None
                                   else get_job(client, job.submission_id + CANCELLED_SUFFIX) is not None):
        # Ray keeps a stopped job PENDING while it cannot be placed (up to 15 min)
        return AppState.CANCELLED, "cancelled by user before it could be placed", verdict
    if st == AppState.CANCELLED:
        msg = "stopped (cancelled)"
    elif st == AppState.FAILED and verdict.get("state") == "CANCELLED":
        # the driver found the cancel marker of a stop that never reached it and ended itself
        st = AppState.CANCELLED
    pg_name = meta.get("torchx_ext_placement_group")
    if st == AppState.RUNNING and pg_name:
        # the driver runs, but the gang's replicas start only once its placement group is
        # reserved: until then the app is PENDING, as TorchX means it (waiting for resources)
        pg = placement_state(client, pg_name)
        if pg in ("ABSENT", "PENDING", "PREPARED"):
            return AppState.PENDING, (f"waiting for the cluster to reserve the group's resources "
                                      f"(placement group {pg_name}: {pg.lower()})"), verdict
    return st, msg, verdict


def listed_apps(jobs: Sequence[Any]) -> list[tuple[str, AppState, str]]:
    """(submission id, state, app name) of every torchx-ext app among a cluster's jobs (waiting ones
    too), the newest submission first (a waiting app's record was made when it was submitted)."""
    ids = {j.submission_id for j in jobs}
    out = []
    for job in sorted(jobs, key=lambda j: -(j.start_time or 0)):
        meta = job.metadata or {}
        kind, name = meta.get(KIND), str(meta.get("torchx_ext_app", ""))
        if kind == "verdict":
            out.append((job.submission_id, AppState[meta["torchx_ext_verdict"]], name))
        elif kind == "app":
            out.append((job.submission_id, STATES.get(job_status(job), AppState.UNKNOWN), name))
        elif kind == "waiting" and meta.get("torchx_ext_submission_id") not in ids:
            out.append((meta["torchx_ext_submission_id"], AppState.PENDING, name))
    return out


def claim(client: Any, sid: str, metadata: dict[str, str]) -> bool:
    """Submits a job that exits at once under ``sid``; False if the id is taken already."""
    try:
        client.submit_job(entrypoint="exit 0", submission_id=sid, metadata=metadata)
        return True
    except RuntimeError as e:
        if cluster.already_exists(e):
            return False
        raise


def delete_jobs(client: Any, ids: list[str], patience_s: float = 40,
                listed: Optional[dict[str, Any]] = None) -> list[str]:
    """Deletes jobs once they are over; returns the ids still there when it gave up.

    Ray's job monitor can write a just-ended job back (FAILED, "supervisor actor died") after
    delete_job: a job is deleted once over for a while, and again if it returns. It gives up after
    ``patience_s`` without progress (not after ``patience_s`` in all: a long list takes its time).
    ``listed``: jobs by submission id from a ``list_jobs`` just before, which the first pass reads
    instead of asking job by job (a prune of 2,000 apps asked for each of its jobs).
    """
    pending = list(ids)
    first = listed is not None
    deadline = time.time() + patience_s
    while pending and time.time() < deadline:
        for job_id in list(pending):
            job = listed[job_id] if first and listed is not None and job_id in listed else get_job(client, job_id)
            if job is None:
                pending.remove(job_id)
                deadline = time.time() + patience_s  # progress: the patience is for a stuck job
            elif job_status(job) not in ("PENDING", "RUNNING") and time.time() - (job.end_time or 0) / 1000 > 3:
                client.delete_job(job_id)
        first = False
        if pending:
            time.sleep(1.0)
    return pending


def request_fields(url: str, app_id: str, sid: str, job: Any) -> dict[str, Any]:
    """A submitted app's request (RayJobsRequest's fields), read back from its job (or its waiting
    record): what describe_native returns. Secret values stay masked by the request's repr."""
    meta = dict(job.metadata or {})
    waiting = meta.get(KIND) == "waiting"
    runtime_env = dict(job.runtime_env or {})
    if waiting:
        app_meta = json.loads(meta.get("torchx_ext_app_metadata", "{}"))
        resources = json.loads(meta.get("torchx_ext_submit_kwargs", "{}"))
        if "torchx_ext_pip" in meta:
            runtime_env["pip"] = json.loads(meta["torchx_ext_pip"])
    else:
        app_meta = meta
        resources = {k: getattr(job, k) for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                                                    "entrypoint_resources") if getattr(job, k, None)}
    encoded = (runtime_env.get("env_vars") or {}).get(cluster.SPEC_ENV, "")
    spec = json.loads(base64.b64decode(encoded)) if encoded else {}
    return {"dashboard_url": url, "app_id": app_id, "submission_id": sid,
            "entrypoint": meta.get("torchx_ext_entrypoint") if waiting else job.entrypoint,
            "runtime_env": runtime_env, "metadata": app_meta, "entrypoint_resources": resources,
            "label_selector": dict(spec.get("label_selector") or {}),
            "dependencies": json.loads(meta.get("torchx_ext_dependencies", "[]")), "spec": spec,
            "preflight_needs": [], "secret_names": json.loads(app_meta.get("torchx_ext_secret_names", "[]"))}


def from_ray(e: BaseException) -> bool:
    """Was ``e`` raised inside Ray's own code (its client refusing a request)?"""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("ray.")


def parse_verdict(message: str) -> dict[str, Any]:
    """The driver's verdict line, which Ray repeats in a failed job's message (last logs)."""
    idx = message.rfind(cluster.VERDICT_MARK)
    if idx < 0:
        return {}
    line = message[idx + len(cluster.VERDICT_MARK):].split("\n", 1)[0]
    try:
        return dict(json.loads(line))
    except ValueError:
        return {}


def ray_version() -> str:
    try:
        import ray

        return f"ray {ray.__version__}"
    except ImportError:
        return "no ray"


RESTARTS_TIMEOUT_S = 3


def published(client: Any, job: Any) -> Optional[dict[str, Any]]:
    """What the driver of a running (or SUCCEEDED) app published: num_restarts, and ``held``, the
    [role, replica] not started while the services are not ready: a small file beside the job's
    driver log (``ray_jobs_cluster.RESTARTS_FILE``), read through the dashboard's state API
    (``/api/v0/logs/file``, what ``ray.util.state.get_log`` asks) on the driver's node. None when
    there is none to read (a driver of an older version, a lost node): then 0 restarts are shown."""
    node = getattr(job, "driver_node_id", None)
    if not node:
        return None
    # the dashboard asks the node's agent, for up to `timeout` s (30 by default): a lost node must
    # not hold describe, nor read as a lost dashboard (which get_job, just before, has ruled out)
    query = urllib.parse.urlencode({"node_id": node, "filename": cluster.RESTARTS_FILE.format(job.submission_id),
                                    "lines": 1, "timeout": RESTARTS_TIMEOUT_S})
    try:
        r = request(client, "GET", "/api/v0/logs/file?" + query, timeout=RESTARTS_TIMEOUT_S + 2)
        if r.status_code != 200:  # no such file (Ray answers 500 with text), or no node to ask
            return None
        out = json.loads(r.text)
        return {"num_restarts": int(out["num_restarts"]), "held": [list(x) for x in out.get("held", [])]}
    except Exception:  # noqa: BLE001 - one extra request must not break describe (as placement_state)
        return None
