"""What ``ray_jobs`` keeps on this machine: the clusters you submitted to (for status/list from
any shell), when each was last unreachable (``lost_contact_s``), the manifest, workspace copies;
and, in memory, this process's connections.

Values of secrets are never stored here: ``token_env`` is kept by name.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Optional

from torchx_ext import engine, state
from torchx_ext.errors import SchedulerUnavailable, TorchxExtError
from torchx_ext.schedulers.ray_jobs import cluster as ray_jobs_cluster
from torchx_ext.schedulers.ray_jobs.adapter import forget_cluster
from torchx_ext.schedulers.ray_jobs.client import resolve_dashboard, same_dashboard


@functools.cache
def cluster_package() -> str:
    """The directory shipped to the cluster as ``ray_jobs_cluster`` (``py_modules``): that package
    with the group engine inside it as ``ray_jobs_cluster.engine``, so that the driver decides with
    the very rules of every other backend, and the engine's name cannot meet a user's module named
    ``engine``. Staged once per process in a private temporary directory, removed at exit; Ray names
    a package by its content, so every process ships, and uploads, the same one."""
    root = tempfile.mkdtemp(prefix="torchx-ext-ray-")  # 0700; the files 0600 (state.write_text)
    atexit.register(shutil.rmtree, root, True)
    target = os.path.join(root, "ray_jobs_cluster")
    for src, dst in ((os.path.dirname(ray_jobs_cluster.__file__), target),
                     (os.path.dirname(engine.__file__), os.path.join(target, "engine"))):
        state.makedirs(dst)
        for name in sorted(os.listdir(src)):
            if name.endswith(".py"):  # both packages are flat, standard library (and ray) only
                with open(os.path.join(src, name)) as f:
                    state.write_text(os.path.join(dst, name), f.read(), sync_dir=False)
    return target


class Connections:
    """This process's Jobs API clients, per dashboard and token variable, shared by threads (a
    cache, not a behaviour); and the jobs this process submitted lately (see ``marker``)."""

    # A job submitted by this process less than RECENT_S ago: its status learns of a cancel from
    # this machine (cancel_record) instead of asking the cluster for the cancel marker
    RECENT_S = 10.0

    def __init__(self, connect: Callable[[str, Optional[str], float], Any], default_timeout: float) -> None:
        self._connect = connect
        self._default_timeout = default_timeout
        self._clients: dict[str, Any] = {}
        self._recent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._token_envs: dict[str, tuple[float, Optional[str]]] = {}

    def get(self, url: str, token_env: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        if token_env is None and timeout is None:  # a query: any connection made to url will do
            with self._lock:
                made = [c for k, c in self._clients.items() if k.startswith(url + "|")]
            if made:
                return made[-1]
        token_env = token_env or self._remembered_token_env(url)
        key = f"{url}|{token_env}"
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            client = self._connect(url, token_env, timeout or self._default_timeout)  # asks: unlocked
            with self._lock:
                client = self._clients.setdefault(key, client)
        return client

    def token_env(self, url: str) -> Optional[str]:
        """The token variable a query of ``url`` sends (see :func:`token_env_for`)."""
        return self._remembered_token_env(url)

    def _remembered_token_env(self, url: str) -> Optional[str]:
        """The token variable bound to ``url`` (see :func:`token_env_for`); read once per FILES_S:
        two files and a config parse are a third of a submission's client time, and a fan-out
        from threads submits many apps a second."""
        now, key = time.monotonic(), local_dir("clusters.json") + "|" + url
        with self._lock:
            hit = self._token_envs.get(key)
        if hit is not None and now - hit[0] < FILES_S:
            return hit[1]
        found = token_env_for(url)
        with self._lock:
            self._token_envs[key] = (now, found)
        return found

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
            self._cancelled &= {k for k in self._cancelled if k.rsplit("|", 1)[-1] in self._recent}

    def marker(self, url: str, sid: str) -> Optional[bool]:
        """Whether the job ``sid`` has a cancel marker, when that is known here; None: ask the
        cluster (only a PENDING job's state needs it).

        Known for a job this process submitted less than RECENT_S ago: a cancel of it made on
        this machine (this process or another, even with a stop that never reached the job)
        left a cancel record (``record_cancel``). So a status right after a submit is one
        request, as with Ray's own client, not two: the marker lookup of a job that does not
        exist costs the dashboard as much as the job's own (both scan the GCS's job table).
        What this does not see: a cancel made on another machine within RECENT_S of the
        submission; the status shows it once RECENT_S have passed."""
        with self._lock:
            if time.monotonic() - self._recent.get(sid, -self.RECENT_S) >= self.RECENT_S:
                return None
            if f"{url}|{sid}" in self._cancelled:
                return True
        return os.path.exists(cancel_record(url, sid))

    def cancelled(self, url: str, sid: str) -> None:
        """A cancel of the PENDING job ``sid`` by this process (see ``marker``)."""
        with self._lock:
            self._cancelled.add(f"{url}|{sid}")
        record_cancel(url, sid)


def local_dir(*parts: str) -> str:
    return state.scheduler_dir("ray_jobs", *parts)


def cancel_record(url: str, sid: str) -> str:
    """Where a cancel of a PENDING job made on this machine is noted (see Connections.marker);
    named by a digest: a submission id is any string Ray accepted."""
    return local_dir("cancelled", hashlib.sha256(f"{url}|{sid}".encode()).hexdigest()[:24])


def record_cancel(url: str, sid: str, keep_s: float = 3600) -> None:
    """Notes a cancel of a PENDING job (before its cancel marker is claimed on the cluster);
    records older than ``keep_s`` go (a status needs one for Connections.RECENT_S). An unwritable
    home loses nothing but this shortcut's view of the cancel for Connections.RECENT_S."""
    path = cancel_record(url, sid)
    try:
        state.makedirs(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, state.FILE_MODE)
        try:
            os.utime(fd)  # a cancel again: the record's age starts anew
        finally:
            os.close(fd)
        for name in os.listdir(os.path.dirname(path)):
            old = os.path.join(os.path.dirname(path), name)
            if time.time() - os.path.getmtime(old) > keep_s:
                os.remove(old)
    except OSError:
        pass


def known_clusters() -> dict[str, dict[str, Any]]:
    """Dashboards this user submitted to: url -> {token_env (a name, never a value), lost_contact_s,
    unreachable_since}."""
    return state.read_json(local_dir("clusters.json")) or {}


# What this process read from or wrote to its files is trusted for FILES_S (see their users)
FILES_S = 5.0
_REMEMBERED: dict[str, tuple[float, str]] = {}  # file|url -> (when, the fields remembered, as JSON)
_REMEMBERED_LOCK = threading.Lock()


def update_cluster(url: str, **fields: Any) -> None:
    """Merges ``fields`` into the cluster's record (a None removes the field), under the lock of
    clusters.json: every process and thread of this user writes it, and each must keep the
    others' entries. Only writes when something changes."""

    def unchanged(known: dict[str, Any]) -> bool:
        entry = known.get(url)
        return entry is not None and all(entry.get(k) == v for k, v in fields.items())

    if unchanged(known_clusters()):  # most calls: no lock taken
        return

    def merge(known: dict[str, Any]) -> Optional[dict[str, Any]]:
        if unchanged(known):  # another writer got there first
            return None
        entry = {**known.get(url, {}), **fields}
        return {**known, url: {k: v for k, v in entry.items() if v is not None}}

    state.update_file(local_dir("clusters.json"), merge)


def remember_cluster(url: str, **fields: Any) -> None:
    """``update_cluster`` for a submission: the same fields for the same cluster within FILES_S
    are taken as still there (every submission of a fan-out sends the same), without reading
    the file again."""
    said = json.dumps(fields, sort_keys=True, default=str)
    key = local_dir("clusters.json") + "|" + url
    with _REMEMBERED_LOCK:
        hit = _REMEMBERED.get(key)
    if hit is not None and hit[1] == said and time.monotonic() - hit[0] < FILES_S:
        return
    update_cluster(url, **fields)
    with _REMEMBERED_LOCK:
        _REMEMBERED[key] = (time.monotonic(), said)


def token_env_for(url: str) -> Optional[str]:
    """The token variable of the dashboard ``url``, or None: a token goes only where it was
    configured. That is the dashboard a submission from this machine recorded it with
    (clusters.json), or the ``dashboard_url`` of the ``.torchxconfig`` section that names it
    (``$RAY_ADDRESS`` when the section names none). A handle is pasted from chats and dashboards:
    one naming any other address is asked without credentials."""
    recorded = known_clusters().get(url, {}).get("token_env")
    if recorded:
        return str(recorded)
    config = torchxconfig()
    name = config.get("token_env")
    if not name:
        return None
    try:
        configured = resolve_dashboard(config.get("dashboard_url") or None)
    except TorchxExtError:  # neither the section nor $RAY_ADDRESS names a dashboard: bound to none
        return None
    return name if same_dashboard(configured, url) else None


# Dashboards no submission from this machine recorded, first found unreachable by this process
# (a foreign handle's status is never written to clusters.json; its lost_contact_s is the default)
_FOREIGN_UNREACHABLE: dict[str, float] = {}


def lost_contact(url: str, msg: str, app_id: str, default_limit_s: float) -> None:
    """Notes the first failure to reach ``url`` and raises :class:`SchedulerUnavailable` once it
    has lasted the cluster's ``lost_contact_s``: so a ``--wait`` on a dead head ends instead of
    polling UNKNOWN forever. A dashboard this user submitted to keeps the time in clusters.json
    (shared by every process); any other, in this process only."""
    record = known_clusters().get(url)
    if record is None:
        since: Optional[float] = _FOREIGN_UNREACHABLE.setdefault(url, time.time())
        limit = default_limit_s
    else:
        since = record.get("unreachable_since")
        if since is None:
            _mark_unreachable(url)
            return
        limit = float(record.get("lost_contact_s", default_limit_s))
    assert since is not None
    if time.time() - since >= limit:
        raise SchedulerUnavailable(
            f"{msg}; it has not answered for {time.time() - since:.0f} s (lost_contact_s={limit:g}), "
            f"so {app_id} is given up on here: it may still run")


def _mark_unreachable(url: str) -> None:
    """Sets the recorded cluster's ``unreachable_since`` unless a process did meanwhile (the
    first failure's time is kept: it starts the lost_contact_s count)."""
    now = time.time()

    def mark(known: dict[str, Any]) -> Optional[dict[str, Any]]:
        entry = known.get(url)
        if entry is None or entry.get("unreachable_since") is not None:
            return None
        return {**known, url: {**entry, "unreachable_since": now}}

    state.update_file(local_dir("clusters.json"), mark)


def note_unreachable(url: str) -> None:
    """Notes that the recorded cluster ``url`` did not answer (unless noted already)."""
    if url in known_clusters():
        _mark_unreachable(url)


def forget_unreachable(url: str, before: float) -> None:
    """Drops the cluster from clusters.json if it is still unreachable since before ``before``
    (prune: a cluster that is gone costs every ``list`` a request timeout)."""

    def drop(known: dict[str, Any]) -> Optional[dict[str, Any]]:
        since = (known.get(url) or {}).get("unreachable_since")
        if since is None or float(since) >= before:
            return None  # it answered meanwhile
        return {k: v for k, v in known.items() if k != url}

    state.update_file(local_dir("clusters.json"), drop)


def submitter() -> str:
    """This caller as a job's ``torchx_ext_submitter`` names it: uid, machine and home."""
    return f"uid={os.getuid()}@{socket.gethostname()}:{os.path.realpath(state.home())}"


def in_contact(url: str) -> None:
    _FOREIGN_UNREACHABLE.pop(url, None)
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
    except Exception:  # noqa: BLE001 - a broken config file must not break status; TorchX itself reports it
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
        state.makedirs(os.path.dirname(path) or ".")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return
    fs.makedirs(fs._parent(path), exist_ok=True)  # noqa: SLF001 - fsspec's own way to a path's parent, any protocol
    mode = "ab"
    try:
        with fs.open(path, mode) as f:
            f.write(line.encode())
    except (NotImplementedError, ValueError):  # stores without append: read-modify-write
        old = fs.cat_file(path) if fs.exists(path) else b""
        with fs.open(path, "wb") as f:
            f.write(old + line.encode())
