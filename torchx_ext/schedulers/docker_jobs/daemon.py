"""What the Docker daemon knows about a ``docker_jobs`` app, read back and interpreted.

Everything about an app lives in the daemon; nothing is kept in a side file:

* one container per replica, labelled with the app id, role, replica id, service flag, the
  app's dependencies and a JSON summary of all roles (so describe works even if a container was
  removed by hand);
* a *verdict*: a tiny labelled volume ``<app_id>.verdict`` created once the app's outcome is
  decided (group rule, cancel, failed start, failed dependency). Labels cannot change after
  creation, and creating a volume whose name exists returns the existing one, so the first verdict
  wins atomically and nobody can overwrite it. Without a verdict the state is what the group
  engine makes of the containers (:mod:`.launcher`).

This module reads (:func:`fetch`) and holds the few primitive actions (:func:`pin_verdict`,
:func:`stop`, :func:`remove_network`); :mod:`.launcher` performs the engine's decisions
with them, in the watcher. Errors of the SDK become ours in
:func:`translate_error`, the one place that reads docker's exception types.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from torchx.specs import AppState

from torchx_ext import state as local_state
from torchx_ext.engine.rules import READY_TIMEOUT_S
from torchx_ext.errors import BackendError, MissingExtraError, SchedulerUnavailable, TorchxExtError
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts

SCHEDULER = "docker_jobs"
P = "torchx-ext."
L_SCHEDULER = P + "scheduler"
L_APP_ID = P + "app-id"
L_APP_NAME = P + "app-name"
L_SESSION = P + "session"
L_ROLE = P + "role"
L_REPLICA = P + "replica-id"
L_SERVICE = P + "service"
L_HOST = P + "host"
L_DEPENDENCIES = P + "dependencies"
L_ROLES = P + "roles"
L_NETWORK = P + "network"
L_STOP_TIMEOUT = P + "stop-timeout"
L_CREATED = P + "created"
L_VERDICT = P + "verdict"
L_STATE = P + "state"
L_MSG = P + "msg"
L_TIME = P + "time"
# restarts (Role.max_retries): every attempt is a new container; see docker_jobs.launcher
L_ATTEMPT = P + "attempt"
L_MAX_RETRIES = P + "max-retries"
L_RETRY_POLICY = P + "retry-policy"
L_RETRY_BACKOFF = P + "retry-backoff-s"
L_READY_TIMEOUT = P + "ready-timeout-s"  # run option ready_timeout_s (services with ports)
L_RESTART = P + "restart"  # the number of the restart that created this attempt
L_RESTART_UNIT = P + "restart-unit"  # the budget it was charged to (rules.retry_unit)
L_START_AFTER = P + "start-after"  # unix time: the end of its backoff
L_RESTART_WHY = P + "restart-why"  # shown in its log as the attempt's first line
L_ENGINE = P + "engine"  # the group engine's snapshot when the restart that created it was performed
# who submitted the app (user, machine, $TORCHX_EXT_HOME): only they heal it (start a watcher)
L_SUBMITTER = P + "submitter"

RUNNING = {"running", "restarting", "paused"}
_NEVER = "0001-01-01T00:00:00Z"

T = TypeVar("T")


# ------------------------------------------------------------------------------ client ----
def client(pool_size: int = 10) -> Any:
    """A low-level docker ``APIClient`` from the environment (DOCKER_HOST, DOCKER_API_VERSION);
    ``pool_size``: connections kept for threads that share it."""
    try:
        import docker
    except ImportError as e:
        raise MissingExtraError("docker", "docker") from e
    try:
        # a pinned version saves the /version round trip of "auto"
        return docker.APIClient(
            version=os.environ.get("DOCKER_API_VERSION") or "auto", max_pool_size=pool_size,
            **docker.utils.kwargs_from_env()
        )
    except docker.errors.DockerException as e:
        raise SchedulerUnavailable(
            f"cannot reach the Docker daemon ({_docker_host()}): {e}"
        ) from e


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the daemon is not answering right now" (e.g. while it restarts)."""
    import requests

    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout, SchedulerUnavailable)


def transient(e: BaseException) -> bool:
    """Worth retrying in the watcher: unreachable, or a 5xx from a daemon that is (re)starting."""
    if isinstance(e, unreachable_errors()):
        return True
    status = getattr(getattr(e, "response", None), "status_code", None)
    return isinstance(status, int) and status >= 500


def retrying(fn: Callable[[], T], seconds: float = 10.0) -> T:
    """Runs a read-only ``fn``, retrying while the daemon is unreachable (a dockerd restart with
    live-restore takes ~2 s), then raises :class:`SchedulerUnavailable`."""
    errors = unreachable_errors()
    deadline = time.time() + seconds
    while True:
        try:
            return fn()
        except errors as e:
            if time.time() >= deadline:
                raise SchedulerUnavailable(
                    f"the Docker daemon ({_docker_host()}) "
                    f"did not answer for {seconds:.0f}s: {e}"
                ) from e
            time.sleep(0.3)


# ------------------------------------------------------------------------------ truth -----
@dataclass
class Replica:
    """One container of an app, as the daemon reports it."""

    role: str
    replica_id: int
    service: bool
    container_id: str
    name: str
    host: str
    status: str  # docker State.Status: created, running, exited, dead, ...
    exit_code: Optional[int] = None
    error: str = ""
    oom_killed: bool = False
    started: bool = False
    finished_at: Optional[float] = None
    ports: dict[int, str] = field(default_factory=dict)  # container port -> "host ip:host port"
    attempt: int = 1
    max_retries: int = 0
    policy: str = "APPLICATION"
    restart: int = 0
    restart_unit: str = ""
    start_after: float = 0.0
    engine: str = ""  # L_ENGINE (JSON), on the attempts a restart created

    @property
    def running(self) -> bool:
        return self.status in RUNNING


@dataclass
class Verdict:
    state: AppState
    msg: str
    time: float


@dataclass
class Snapshot:
    """Everything the daemon knows about one app."""

    app_id: str
    app_name: str
    roles: list[dict[str, Any]]
    dependencies: list[str]
    network: str
    stop_timeout: int
    replicas: list[Replica] = field(default_factory=list)  # each replica's latest attempt
    verdict: Optional[Verdict] = None
    previous: list[Replica] = field(default_factory=list)  # earlier attempts (their logs, budgets)
    retry_backoff_s: float = 0.0
    ready_timeout_s: float = READY_TIMEOUT_S
    submitter: str = ""  # the L_SUBMITTER label ("" for apps submitted before it existed)

    @property
    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]


def submitter() -> str:
    """This caller as :data:`L_SUBMITTER` names a submitter: uid, machine and ``$TORCHX_EXT_HOME``."""
    return f"uid={os.getuid()}@{socket.gethostname()}:{os.path.realpath(local_state.home())}"


def verdict_volume(app_id: str) -> str:
    """Name of the volume that records the app's outcome."""
    return f"{app_id}.verdict"


def app_filter(app_id: str, **extra: str) -> dict[str, list[str]]:
    """A docker ``filters`` value selecting the app's containers (and ``extra`` labels)."""
    labels = [f"{L_SCHEDULER}={SCHEDULER}", f"{L_APP_ID}={app_id}"]
    labels += [f"{k}={v}" for k, v in extra.items()]
    return {"label": labels}


def _read_verdict(api: Any) -> Callable[[str], Optional[tuple[Verdict, dict[str, str]]]]:
    import docker

    def read(app_id: str) -> Optional[tuple[Verdict, dict[str, str]]]:
        try:
            vol = api.inspect_volume(verdict_volume(app_id))
        except docker.errors.NotFound:
            return None
        labels = vol.get("Labels") or {}
        if labels.get(L_SCHEDULER) != SCHEDULER or labels.get(L_APP_ID) != app_id:
            return None  # someone else's volume with a colliding name: not ours to read
        return verdict_of(labels), labels
    return read


def verdict_of(labels: dict[str, str]) -> Verdict:
    """The verdict a verdict volume's labels hold."""
    state = AppState.__members__.get(labels.get(L_STATE, ""), AppState.UNKNOWN)
    return Verdict(state, labels.get(L_MSG, ""), float(labels.get(L_TIME) or 0))


def fetch(api: Any, app_id: str) -> Optional[Snapshot]:
    """The app's snapshot from the daemon, or None if the daemon knows no such app."""
    if not app_id or "/" in app_id:
        return None
    # verdict first: ``delete`` removes containers before the verdict, so a reader that finds no
    # verdict finds no containers either, and cannot re-pin a verdict for a half-deleted app
    found = _read_verdict(api)(app_id)
    return snapshot(api, app_id, found, api.containers(all=True, filters=app_filter(app_id)))


def snapshot(api: Any, app_id: str, found: Optional[tuple[Verdict, dict[str, str]]],
             summaries: list[dict[str, Any]]) -> Optional[Snapshot]:
    """The app's snapshot from its verdict (and the volume's labels) and its containers' summaries,
    read in that order (:func:`fetch`, or :mod:`.inventory` for all apps at once); inspects the
    containers whose details a summary lacks. None if both are empty."""
    import docker

    if not summaries and found is None:
        return None
    labels = summaries[0]["Labels"] if summaries else found[1]  # type: ignore[index]
    snap = Snapshot(
        app_id=app_id, app_name=labels.get(L_APP_NAME, app_id),
        roles=json.loads(labels.get(L_ROLES) or "[]"),
        dependencies=[d for d in labels.get(L_DEPENDENCIES, "").split(",") if d],
        network=labels.get(L_NETWORK, ""), stop_timeout=int(labels.get(L_STOP_TIMEOUT) or 10),
        verdict=found[0] if found else None,
    )
    snap.retry_backoff_s = float(labels.get(L_RETRY_BACKOFF) or 0.0)
    snap.ready_timeout_s = float(labels.get(L_READY_TIMEOUT) or READY_TIMEOUT_S)
    snap.submitter = labels.get(L_SUBMITTER, "")
    latest: dict[tuple[str, int], Replica] = {}
    for s in summaries:
        lab = s["Labels"]
        rep = Replica(
            role=lab.get(L_ROLE, "?"), replica_id=int(lab.get(L_REPLICA, "0")),
            service=lab.get(L_SERVICE) == "true", container_id=s["Id"],
            name=(s.get("Names") or ["/?"])[0].lstrip("/"), host=lab.get(L_HOST, ""),
            status=s.get("State", ""), started=s.get("State") != "created",
            ports={int(p["PrivatePort"]): f"{p.get('IP', '')}:{p['PublicPort']}"
                   for p in s.get("Ports") or [] if p.get("PublicPort")},
            attempt=int(lab.get(L_ATTEMPT) or 1), max_retries=int(lab.get(L_MAX_RETRIES) or 0),
            policy=lab.get(L_RETRY_POLICY) or "APPLICATION", restart=int(lab.get(L_RESTART) or 0),
            restart_unit=lab.get(L_RESTART_UNIT, ""), start_after=float(lab.get(L_START_AFTER) or 0.0),
            engine=lab.get(L_ENGINE, ""),
        )
        key = (rep.role, rep.replica_id)
        if key in latest and latest[key].attempt > rep.attempt:
            snap.previous.append(rep)
            continue
        if key in latest:
            snap.previous.append(latest[key])
        latest[key] = rep
    for rep in latest.values():
        if not rep.running:
            # exit codes, OOM and start errors are only in the full inspect; running ones
            # (the common case while polling) need none of that
            try:
                state = api.inspect_container(rep.container_id)["State"]
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
            rep.status = state.get("Status", rep.status)
            rep.exit_code = state.get("ExitCode")
            rep.error = state.get("Error") or ""
            rep.oom_killed = bool(state.get("OOMKilled"))
            rep.started = state.get("StartedAt", _NEVER) != _NEVER
            rep.finished_at = parse_ts(state.get("FinishedAt", _NEVER))
        snap.replicas.append(rep)
    snap.replicas.sort(key=lambda r: (r.role, r.replica_id))
    snap.previous.sort(key=lambda r: (r.role, r.replica_id, r.attempt))
    return snap


def pin_verdict(api: Any, snap: Snapshot, state: AppState, msg: str) -> Verdict:
    """Records the app's outcome unless one is recorded already; returns the one that stands."""
    labels = {
        L_SCHEDULER: SCHEDULER, L_APP_ID: snap.app_id, L_APP_NAME: snap.app_name, L_VERDICT: "1",
        L_STATE: state.name, L_MSG: msg[:4000], L_TIME: f"{time.time():.6f}",
        L_ROLES: json.dumps(snap.roles), L_DEPENDENCIES: ",".join(snap.dependencies),
        L_NETWORK: snap.network, L_STOP_TIMEOUT: str(snap.stop_timeout),
    }
    vol = api.create_volume(verdict_volume(snap.app_id), driver="local", labels=labels)
    got = vol.get("Labels") or {}
    verdict = Verdict(
        AppState.__members__.get(got.get(L_STATE, ""), state), got.get(L_MSG, msg),
        float(got.get(L_TIME) or time.time()),
    )
    snap.verdict = verdict
    return verdict


# ---------------------------------------------------------------------------- outcomes ----
def replica_outcome(rep: Replica) -> tuple[AppState, str]:
    """What one container means for the group rules, with a reason when it failed."""
    if rep.running:
        return AppState.RUNNING, ""
    if rep.error:
        return AppState.FAILED, rep.error
    if rep.status == "created" and not rep.started:
        return AppState.PENDING, ""
    if rep.status in ("exited", "dead"):
        if rep.exit_code == 0 and rep.status == "exited":
            return AppState.SUCCEEDED, ""
        return AppState.FAILED, "OOMKilled" if rep.oom_killed else ("container is dead" if rep.status == "dead" else "")
    return AppState.UNKNOWN, f"container is {rep.status}"


def displayed_state(rep: Replica, verdict: Optional[Verdict]) -> AppState:
    """A replica's state for describe: once a verdict exists, what the group stopped is CANCELLED."""
    state, _ = replica_outcome(rep)
    if verdict is None or state in (AppState.RUNNING, AppState.SUCCEEDED):
        return state
    if state == AppState.PENDING:
        return AppState.CANCELLED  # never started: the app ended first
    if state == AppState.FAILED and not rep.error and rep.finished_at and rep.finished_at > verdict.time:
        return AppState.CANCELLED  # ended after the verdict: stopped by the group, not failed
    return state


def last_stderr_line(api: Any, rep: Replica) -> str:
    """The last line ``rep`` wrote to stderr (e.g. the last line of a traceback), or ""."""
    try:
        raw = api.logs(rep.container_id, stdout=False, stderr=True, tail=5)
    except Exception:  # noqa: BLE001 - the reason is a nicety; never let it break describe
        return ""
    lines = [x.strip() for x in raw.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------- actions ------
def parallel(fn: Callable[[T], Any], reps: list[T]) -> list[tuple[T, Optional[BaseException]]]:
    """Runs ``fn`` on every item at once (container create/start/stop are mostly waiting)."""
    def one(rep: T) -> tuple[T, Optional[BaseException]]:
        try:
            fn(rep)
            return rep, None
        except Exception as e:  # noqa: BLE001 - collected: all-or-nothing needs every outcome, whatever it is
            return rep, e
    if len(reps) <= 1:
        return [one(r) for r in reps]
    with ThreadPoolExecutor(max_workers=min(8, len(reps))) as pool:
        return list(pool.map(one, reps))


def explain(e: BaseException) -> str:
    """The daemon's own words for an API error (not the HTTP wrapping)."""
    return str(getattr(e, "explanation", None) or e)


def stop(api: Any, reps: list[Replica], timeout: Optional[int]) -> None:
    """Stops containers (SIGTERM, SIGKILL after ``timeout``; 0 = kill at once). Errors ignored:
    a container that is already gone or stopped is what we want."""
    parallel(lambda r: api.stop(r.container_id, timeout=timeout), reps)


def remove_network(api: Any, name: str) -> None:
    """Frees the app's network (bridge address pools are few); stopped containers keep their logs."""
    import docker

    try:
        api.remove_network(name)
    except docker.errors.APIError:
        pass  # already gone, or not ours to remove (an existing network given as network_mode)


def published_roles(snap: Snapshot) -> list[dict[str, Any]]:
    """The app's role summaries with ``port_map`` as published: ``NAME/k`` (and ``NAME``, replica 0's)
    -> host port."""
    by_key = {(r.role, r.replica_id): r for r in snap.replicas}
    out = []
    for summary in snap.roles:
        published: dict[str, int] = {}
        for name, port in (summary.get("port_map") or {}).items():
            for k in range(int(summary["num_replicas"])):
                rep = by_key.get((summary["name"], k))
                if rep is not None and int(port) in rep.ports:
                    published[f"{name}/{k}"] = int(rep.ports[int(port)].rsplit(":", 1)[1])
            if f"{name}/0" in published:
                published[name] = published[f"{name}/0"]
        out.append({**summary, "port_map": published})
    return out


def translate_error(e: BaseException, verb: str) -> Optional[TorchxExtError]:
    """An SDK error as one of ours (None: not the SDK's). Decided on types and HTTP status codes."""
    import sys

    if "docker" not in sys.modules:
        return None  # nothing of docker's can have raised
    import docker

    if isinstance(e, unreachable_errors()):
        return SchedulerUnavailable(f"the Docker daemon ({_docker_host()}) is unreachable: {e}")
    if isinstance(e, docker.errors.APIError):
        code = e.status_code
        return BackendError(f"the Docker daemon refused to {verb}" + (f" (HTTP {code})" if code else "")
                            + f": {explain(e)}")
    if isinstance(e, docker.errors.DockerException):
        return BackendError(f"docker {verb} failed: {e}")
    return None


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
