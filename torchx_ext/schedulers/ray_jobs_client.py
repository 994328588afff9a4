"""The client side plumbing of ``ray_jobs``: addresses, the Jobs API client, preflight, manifest.

Nothing here imports ray at module import: ``torchx runopts`` and ``--dryrun`` must stay cheap
(``from ray.job_submission import JobSubmissionClient`` alone costs ~0.6 s).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shlex
import time
import urllib.parse
from typing import Any, Dict, Iterable, Mapping, Optional

from torchx_ext.errors import InvalidAppError, MissingExtraError, SchedulerUnavailable
from torchx_ext.logs import TimedLine
from torchx_ext.schedulers import ray_jobs_cluster as cluster
from torchx_ext.schedulers.ray_jobs_cluster.broker import KIND

APP_SEP = "~"  # app id = <address>~<submission id>; neither part can contain it


# ---------------------------------------------------------------------------- addresses ----
def resolve_dashboard(cfg_value: Optional[str]) -> str:
    """The dashboard URL from the run option, else ``$RAY_ADDRESS`` when it is an http(s) URL."""
    url = cfg_value or os.environ.get("RAY_ADDRESS", "")
    if not url:
        raise InvalidAppError(
            "ray_jobs needs the Ray dashboard (Jobs API) address: pass -cfg dashboard_url=http://HEAD:8265, "
            "set it in the [ray_jobs] section of .torchxconfig, or export RAY_ADDRESS=http://HEAD:8265"
        )
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise InvalidAppError(
            f"'{url}' is not a Ray dashboard address: the Jobs API is HTTP (http://HEAD:8265); "
            f"'{scheme}://' addresses (GCS, Ray Client) cannot submit jobs"
        )
    return url.rstrip("/")


def encode_address(url: str) -> str:
    """``http://127.0.0.1:8265`` → ``127.0.0.1:8265``; anything else is percent-encoded."""
    rest = url[len("http://"):] if url.startswith("http://") else url
    return urllib.parse.quote(rest, safe=":@")


def decode_address(addr: str) -> str:
    url = urllib.parse.unquote(addr)
    return url if "://" in url else "http://" + url


def make_app_id(url: str, submission_id: str) -> str:
    return f"{encode_address(url)}{APP_SEP}{submission_id}"


def split_app_id(app_id: str) -> tuple[Optional[str], str]:
    """``(dashboard url or None, submission id)``; a bare id uses ``$RAY_ADDRESS``."""
    if APP_SEP in app_id:
        addr, sid = app_id.rsplit(APP_SEP, 1)
        return decode_address(addr), sid
    env = os.environ.get("RAY_ADDRESS", "")
    return (resolve_dashboard(env) if env.startswith(("http://", "https://")) else None), app_id


# ---------------------------------------------------------------------------- client -------
def import_client_class() -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise MissingExtraError("ray", "ray") from e
    return JobSubmissionClient


@functools.lru_cache(maxsize=None)
def _timeout_client_class() -> Any:
    base = import_client_class()

    class TimeoutJobSubmissionClient(base):  # type: ignore[misc, valid-type]
        """The Jobs API client with a per-request timeout (Ray's has none: a dead head hangs it)."""

        request_timeout_s: float = 10.0

        def _do_request(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self.request_timeout_s)
            return super()._do_request(*args, **kwargs)

    return TimeoutJobSubmissionClient


def auth_headers(token_env: Optional[str]) -> Dict[str, str]:
    """``Authorization: Bearer <token>`` from the variable named ``token_env`` (value never shown)."""
    if not token_env:
        return {}
    token = os.environ.get(token_env)
    if not token:
        raise InvalidAppError(
            f"token_env={token_env} names an environment variable that is not set (or empty); "
            "export it with the dashboard's bearer token, or drop token_env"
        )
    return {"Authorization": f"Bearer {token}"}


def connect(url: str, token_env: Optional[str] = None, timeout: float = 10.0) -> Any:
    """A Jobs API client for ``url``; an unreachable dashboard is one clear error, quickly."""
    cls = _timeout_client_class()
    headers = auth_headers(token_env)
    try:
        # the constructor checks the connection and the Jobs API version (one GET, now bounded)
        old = cls.request_timeout_s
        cls.request_timeout_s = timeout
        try:
            client = cls(url, headers=headers or None)
        finally:
            cls.request_timeout_s = old
    except (ConnectionError, OSError, RuntimeError, ValueError) as e:
        raise SchedulerUnavailable(_unreachable(url, e)) from None
    except Exception as e:  # requests' exceptions (ConnectionError subclasses above cover most)
        raise SchedulerUnavailable(_unreachable(url, e)) from None
    client.request_timeout_s = timeout
    return client


def _unreachable(url: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(first) > 300:
        first = first[:300] + "..."
    return f"the Ray dashboard at {url} is unreachable: {first}"


def is_unreachable(e: BaseException) -> bool:
    """Is ``e`` a transport failure (as opposed to an answer from the dashboard)?"""
    if isinstance(e, (OSError, SchedulerUnavailable)):
        return True
    try:
        import requests

        return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
    except ImportError:
        return False


def is_not_found(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and ("does not exist" in str(e) or "404" in str(e))


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
        rows = client._do_request("GET", "/api/v0/placement_groups?" + query).json()["data"]["result"]["result"]
    except Exception:
        return None
    states = [row.get("state") for row in rows if row.get("name") == name]
    return str(states[0]) if states else "ABSENT"


# ---------------------------------------------------------------------------- preflight ----
def preflight(client: Any, url: str, needs: Iterable[Mapping[str, float]],
              label_selector: Mapping[str, str], warn: Any) -> None:
    """Checks the cluster can run the app: versions, and a node for every bundle.

    ``needs``: the resources of each unit that must fit on one node (the driver's entrypoint
    resources, or one bundle per replica). Raises :class:`InvalidAppError` naming what is missing.
    """
    try:
        version = client._do_request("GET", "/api/version").json()
        nodes_resp = client._do_request("GET", "/api/v0/nodes?detail=1&limit=10000").json()
    except Exception as e:
        if is_unreachable(e):
            raise SchedulerUnavailable(_unreachable(url, e)) from None
        raise
    try:
        import ray

        local = ray.__version__
    except ImportError:
        local = "unknown"
    remote = version.get("ray_version", "unknown")
    if local.split(".")[:2] != str(remote).split(".")[:2]:
        warn(f"Ray client {local} and cluster {remote} differ; the Jobs API is compatible across "
             "versions, but the driver runs with the cluster's Ray")
    nodes = [n for n in nodes_resp.get("data", {}).get("result", {}).get("result", []) if n.get("state") == "ALIVE"]
    if label_selector:
        nodes = [n for n in nodes if _labels_match(n.get("labels") or {}, label_selector)]
        if not nodes:
            raise InvalidAppError(
                f"no alive node of the cluster at {url} has the labels {dict(label_selector)}; "
                f"labels seen: {_labels_seen(nodes_resp)}"
            )
    for need in needs:
        need = {k: v for k, v in need.items() if v > 0}
        if not any(all(n.get("resources_total", {}).get(k, 0) >= v for k, v in need.items()) for n in nodes):
            total: Dict[str, float] = {}
            for n in nodes:
                for k, v in n.get("resources_total", {}).items():
                    total[k] = max(total.get(k, 0), v)
            missing = {k: v for k, v in need.items() if total.get(k, 0) < v}
            raise InvalidAppError(
                f"no node of the cluster at {url} can hold {_fmt(need)}"
                + (f" (labels {dict(label_selector)})" if label_selector else "")
                + f": missing {_fmt(missing) if missing else 'a single node with all of them'}; "
                f"largest node offers {_fmt({k: total.get(k, 0) for k in need})}. "
                "Use smaller resources, or preflight=False to submit anyway and wait for the autoscaler"
            )


def _labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    for key, want in selector.items():
        have = labels.get(key)
        if want.startswith("!"):
            if have is not None and have in want[1:].split(","):
                return False
        elif want.startswith("in(") and want.endswith(")"):
            if have not in want[3:-1].split(","):
                return False
        elif have != want:
            return False
    return True


def _labels_seen(nodes_resp: Mapping[str, Any]) -> str:
    seen = set()
    for n in nodes_resp.get("data", {}).get("result", {}).get("result", []):
        seen.update(f"{k}={v}" for k, v in (n.get("labels") or {}).items() if not k.startswith("ray.io/"))
    return ", ".join(sorted(seen)) or "none"


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(
        f"{k}: {v / 2**20:.0f} MiB" if k == "memory" else f"{k}: {v:g}" for k, v in sorted(res.items())
    ) + "}"


# ---------------------------------------------------------------------------- jobs, logs ---
class JobLogReader:
    """New lines of one replica (or of the driver) from the job's log, demultiplexed."""

    def __init__(self, client: Any, sid: str, key: Optional[tuple[str, int]], stream: Optional[str]) -> None:
        self.client, self.sid, self.key, self.stream = client, sid, key, stream
        self.offset = 0

    def read_new(self) -> list[TimedLine]:
        try:
            text = self.client.get_job_logs(self.sid)
        except RuntimeError as e:
            if is_not_found(e):  # still waiting for its dependencies
                return []
            raise
        end = text.rfind("\n") + 1
        chunk, self.offset = text[self.offset:end], max(self.offset, end)
        out: list[TimedLine] = []
        # not splitlines(): it also splits at the \x1e that starts our marks
        for line in chunk[:-1].split("\n") if chunk else []:
            if line.startswith(cluster.VERDICT_MARK):
                continue
            if line.startswith(cluster.LINE_MARK):
                parts = line[len(cluster.LINE_MARK):].split(" ", 4)
                if len(parts) < 4:
                    continue
                role, rep, stream, ts = parts[:4]
                body = parts[4] if len(parts) == 5 else ""
                if role == cluster.DRIVER_ROLE:
                    if self.key is None:
                        out.append((float(ts), body))
                    continue
                if self.key == (role, int(rep)) and (self.stream is None or self.stream == stream):
                    out.append((float(ts), body))
            elif self.key is None:  # Ray's own lines and anything else the driver printed
                out.append((None, line))
        return out


@functools.lru_cache(maxsize=None)
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


def get_job(client: Any, sid: str) -> Any:
    """The job's JobDetails, or None if the cluster has no job with that submission id."""
    try:
        return client.get_job_info(sid)
    except RuntimeError as e:
        if is_not_found(e):
            return None
        raise


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
            except Exception:
                pass  # best effort: a leftover record only costs a list entry
    return found


def start_broker(client: Any, python: str, package_dir: str) -> str:
    """Submits a broker job under a fresh id and returns that id."""
    sid = f"{broker_prefix()}-{os.urandom(4).hex()}"
    client.submit_job(
        entrypoint=" ".join(shlex.quote(w) for w in [python, "-m", "ray_jobs_cluster.broker"]),
        submission_id=sid, metadata={KIND: "broker"}, runtime_env={"py_modules": [package_dir]})
    return sid


def job_status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


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


# ---------------------------------------------------------------------------- manifest -----
def default_manifest() -> str:
    home = os.environ.get("TORCHX_EXT_HOME") or os.path.join(os.path.expanduser("~"), ".torchx_ext")
    return "file://" + os.path.join(home, "ray_jobs", "manifest.jsonl")


def append_manifest(url: str, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to the manifest at fsspec ``url`` (local files: O_APPEND, atomic)."""
    import fsspec

    line = json.dumps({"time": time.time(), **record}, sort_keys=True) + "\n"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.protocol in ("file", ("file", "local")):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return
    fs.makedirs(fs._parent(path), exist_ok=True)
    mode = "ab"
    try:
        with fs.open(path, mode) as f:
            f.write(line.encode())
    except (NotImplementedError, ValueError):  # stores without append: read-modify-write
        old = fs.cat_file(path) if fs.exists(path) else b""
        with fs.open(path, "wb") as f:
            f.write(old + line.encode())
