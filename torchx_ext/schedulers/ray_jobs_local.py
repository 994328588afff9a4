"""What ``ray_jobs`` keeps on this machine: the clusters you submitted to (for status/list from
any shell), when each was last unreachable (``lost_contact_s``), the manifest, workspace copies;
and, in memory, this process's connections.

Values of secrets are never stored here: ``token_env`` is kept by name.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

from torchx_ext import state
from torchx_ext.errors import SchedulerUnavailable
from torchx_ext.schedulers.ray_jobs_client import forget_cluster


class Connections:
    """This process's Jobs API clients, per dashboard and token variable, shared by threads (a
    cache, not a behaviour); and the jobs submitted lately, whose first status asks for the cancel
    marker at the same time as for the job, not after it (a job just submitted is PENDING, and
    a pending job's state needs the marker)."""

    RECENT_S = 30.0

    def __init__(self, connect: Callable[[str, Optional[str], float], Any], default_timeout: float) -> None:
        self._connect = connect
        self._default_timeout = default_timeout
        self._clients: dict[str, Any] = {}
        self._recent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None

    def get(self, url: str, token_env: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        if token_env is None and timeout is None:  # a query: any connection made to url will do
            with self._lock:
                made = [c for k, c in self._clients.items() if k.startswith(url + "|")]
            if made:
                return made[-1]
        known = known_clusters().get(url, {}) if token_env is None or timeout is None else {}
        token_env = token_env or known.get("token_env") or torchxconfig().get("token_env") or None
        key = f"{url}|{token_env}"
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            client = self._connect(url, token_env, timeout or self._default_timeout)  # asks: unlocked
            with self._lock:
                client = self._clients.setdefault(key, client)
        return client

    def drop(self, url: str) -> None:
        """Forgets the clients of ``url`` (it stopped answering: the next call connects anew)."""
        with self._lock:
            dropped = [v for k, v in self._clients.items() if k.startswith(url + "|")]
            self._clients = {k: v for k, v in self._clients.items() if not k.startswith(url + "|")}
        for client in dropped:  # and what this process learnt about that cluster
            forget_cluster(str(getattr(client, "_address", url)))
        forget_cluster(url)

    def submitted(self, sid: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self.RECENT_S}
            self._recent[sid] = now

    def prefetch_marker(self, client: Any, sid: str) -> Optional[Future[Any]]:
        """The cancel marker's lookup, started now, for a job submitted lately; else None."""
        from torchx_ext.schedulers.ray_jobs_client import CANCELLED_SUFFIX, get_job

        with self._lock:
            if time.monotonic() - self._recent.get(sid, -self.RECENT_S) >= self.RECENT_S:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(4, thread_name_prefix="ray_jobs-marker")
            pool = self._pool
        return pool.submit(get_job, client, sid + CANCELLED_SUFFIX)


def local_dir(*parts: str) -> str:
    return state.scheduler_dir("ray_jobs", *parts)


def known_clusters() -> dict[str, dict[str, Any]]:
    """Dashboards this user submitted to: url -> {token_env (a name, never a value), lost_contact_s,
    unreachable_since}."""
    return state.read_json(local_dir("clusters.json")) or {}


def update_cluster(url: str, **fields: Any) -> None:
    """Merges ``fields`` into the cluster's record (only writes when something changes)."""
    known = known_clusters()
    entry = dict(known.get(url, {}))
    if all(entry.get(k) == v for k, v in fields.items()) and url in known:
        return
    entry.update(fields)
    known[url] = {k: v for k, v in entry.items() if v is not None}
    state.makedirs(local_dir())
    state.write_json(local_dir("clusters.json"), known)


def lost_contact(url: str, msg: str, app_id: str, default_limit_s: float) -> None:
    """Notes the first failure to reach ``url`` (shared by every process, in clusters.json) and
    raises :class:`SchedulerUnavailable` once it has lasted the cluster's ``lost_contact_s``: so a
    ``--wait`` on a dead head ends instead of polling UNKNOWN forever."""
    record = known_clusters().get(url, {})
    since = record.get("unreachable_since")
    if since is None:
        update_cluster(url, unreachable_since=time.time())
        return
    limit = float(record.get("lost_contact_s", default_limit_s))
    if time.time() - since >= limit:
        raise SchedulerUnavailable(
            f"{msg}; it has not answered for {time.time() - since:.0f} s (lost_contact_s={limit:g}), "
            f"so {app_id} is given up on here: it may still run")


def in_contact(url: str) -> None:
    if known_clusters().get(url, {}).get("unreachable_since"):
        update_cluster(url, unreachable_since=None)


def torchxconfig() -> dict[str, str]:
    """The ``[ray_jobs]`` section of the .torchxconfig files TorchX reads (for status/list/log)."""
    try:
        import configparser

        from torchx.runner.config import find_configs

        parser = configparser.ConfigParser()
        parser.read(find_configs())
        return dict(parser["ray_jobs"]) if parser.has_section("ray_jobs") else {}
    except Exception:  # a broken config file must not break status; TorchX itself reports it
        return {}


def prune_workspace_copies(root: str, max_age_s: float = 3600) -> None:
    """Removes copies a dry-run left behind (``schedule`` removes its own once uploaded)."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return
    for name in entries:
        path = os.path.join(root, name)
        try:
            if time.time() - os.path.getmtime(path) > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------- manifest -----
def default_manifest() -> str:
    return "file://" + local_dir("manifest.jsonl")


def append_manifest(url: str, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to the manifest at fsspec ``url`` (local files: O_APPEND, atomic)."""
    line = json.dumps({"time": time.time(), **record}, sort_keys=True) + "\n"
    if url.startswith("file://") or "://" not in url:  # the default: no fsspec needed
        fs, path = None, url[len("file://"):] if url.startswith("file://") else url
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    if fs is None or fs.protocol in ("file", ("file", "local")):
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
