"""The daemon-side truth of a ``docker_jobs`` app, and the detached watcher that enforces it.

Everything about an app is read back from the Docker daemon; nothing is kept in a side file:

* one container per replica, labelled with the app id, role, replica id, service flag, the
  app's dependencies and a JSON summary of all roles (so describe works even if a container was
  removed by hand);
* a *verdict*: a tiny labelled volume ``<app_id>.verdict`` created once the app's outcome is
  decided (group rule, cancel, failed start, failed dependency). Labels cannot change after
  creation, and creating a volume whose name exists returns the existing one, so the first verdict
  wins atomically and nobody can overwrite it. Without a verdict the state is computed from the
  containers' states and exit codes by :func:`torchx_ext.groups.group_state`.

:func:`reconcile` is the one place that turns that truth into a state *and* into actions (start
the group once its dependencies succeeded, pin the verdict, stop what must not run any more). It
is idempotent, so it is called from two places:

* ``python -m torchx_ext.schedulers.docker_jobs_watcher APP_ID``: a detached process started by
  ``schedule`` that outlives ``torchx run`` and polls ``reconcile(acting=True)`` until the app is
  over (it stops containers gracefully, blocking up to their stop timeout);
* every ``describe`` (``acting=False``): it pins verdicts and starts dependants too, but only
  kills leftovers once the watcher is clearly not doing its job (``stop_timeout`` + grace after
  the verdict), so a dead watcher (killed, host rebooted) never leaves an app stuck.

An app counts as ended only once none of its containers runs: a verdict with containers still
stopping is reported as RUNNING with a "stopping" message.
"""

from __future__ import annotations

import calendar
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from torchx.specs import AppState

from torchx_ext.errors import MissingExtraError, SchedulerUnavailable
from torchx_ext.groups import ReplicaOutcome, group_state

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

POLL_S = 0.25
KILL_FALLBACK_S = 3.0  # describe kills leftovers this long after the stop timeout has passed
UNREACHABLE_GIVE_UP_S = 3600.0
_TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}
_RUNNING = {"running", "restarting", "paused"}
_NEVER = "0001-01-01T00:00:00Z"

T = TypeVar("T")


# ------------------------------------------------------------------------------ client ----
def client() -> Any:
    """A low-level docker ``APIClient`` from the environment (DOCKER_HOST, DOCKER_API_VERSION)."""
    try:
        import docker
    except ImportError as e:
        raise MissingExtraError("docker", "docker") from e
    try:
        # a pinned version saves the /version round trip of "auto"
        return docker.APIClient(
            version=os.environ.get("DOCKER_API_VERSION") or "auto", **docker.utils.kwargs_from_env()
        )
    except docker.errors.DockerException as e:
        raise SchedulerUnavailable(
            f"cannot reach the Docker daemon ({os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}): {e}"
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
                    f"the Docker daemon ({os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}) "
                    f"did not answer for {seconds:.0f}s: {e}"
                ) from e
            time.sleep(0.3)


# --------------------------------------------------------------------------- timestamps ----
_EPOCH: dict[str, int] = {}


def parse_ts(text: str) -> Optional[float]:
    """Unix time of a daemon timestamp (``2026-11-21T09:54:37.113819260Z``); None if unset.

    Hand-rolled because log lines carry nanoseconds (``fromisoformat`` wants at most 6 digits)
    and it is called once per log line: the whole-second part is cached.
    """
    if len(text) < 20 or text.startswith("0001-"):
        return None
    base, rest = text[:19], text[19:]
    secs = _EPOCH.get(base)
    if secs is None:
        try:
            secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return None
        if len(_EPOCH) > 4096:
            _EPOCH.clear()
        _EPOCH[base] = secs
    offset = 0
    if rest[-6:-5] in ("+", "-") and rest[-3:-2] == ":":  # only UTC "Z" from dockerd, but be lenient
        sign = 1 if rest[-6] == "+" else -1
        offset = sign * (int(rest[-5:-3]) * 3600 + int(rest[-2:]) * 60)
        rest = rest[:-6]
    rest = rest.rstrip("Z")
    frac = float("0" + rest) if rest.startswith(".") and rest[1:].isdigit() else 0.0
    return secs + frac - offset


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

    @property
    def running(self) -> bool:
        return self.status in _RUNNING


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
    replicas: list[Replica] = field(default_factory=list)
    verdict: Optional[Verdict] = None

    @property
    def running(self) -> list[Replica]:
        return [r for r in self.replicas if r.running]


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
        state = AppState.__members__.get(labels.get(L_STATE, ""), AppState.UNKNOWN)
        return Verdict(state, labels.get(L_MSG, ""), float(labels.get(L_TIME) or 0)), labels
    return read


def fetch(api: Any, app_id: str) -> Optional[Snapshot]:
    """The app's snapshot from the daemon, or None if the daemon knows no such app."""
    import docker

    if not app_id or "/" in app_id:
        return None
    # verdict first: ``delete`` removes containers before the verdict, so a reader that finds no
    # verdict finds no containers either, and cannot re-pin a verdict for a half-deleted app
    found = _read_verdict(api)(app_id)
    summaries = api.containers(all=True, filters=app_filter(app_id))
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
    for s in summaries:
        lab = s["Labels"]
        rep = Replica(
            role=lab.get(L_ROLE, "?"), replica_id=int(lab.get(L_REPLICA, "0")),
            service=lab.get(L_SERVICE) == "true", container_id=s["Id"],
            name=(s.get("Names") or ["/?"])[0].lstrip("/"), host=lab.get(L_HOST, ""),
            status=s.get("State", ""), started=s.get("State") != "created",
        )
        if not rep.running:
            # exit codes, OOM and start errors are only in the full inspect; running ones
            # (the common case while polling) need none of that
            try:
                state = api.inspect_container(s["Id"])["State"]
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


def _last_stderr_line(api: Any, rep: Replica) -> str:
    try:
        raw = api.logs(rep.container_id, stdout=False, stderr=True, tail=5)
    except Exception:  # the reason is a nicety; never let it break describe
        return ""
    lines = [x.strip() for x in raw.decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def computed_state(api: Any, snap: Snapshot) -> tuple[AppState, str]:
    """The group state from the containers alone (no verdict yet)."""
    outcomes = []
    present = {(r.role, r.replica_id) for r in snap.replicas}
    for role in snap.roles:
        for i in range(int(role["num_replicas"])):
            if (role["name"], i) not in present:
                outcomes.append(ReplicaOutcome(role["name"], i, bool(role.get("service")), AppState.FAILED,
                                               None, "its container was removed"))
    for rep in snap.replicas:
        state, reason = replica_outcome(rep)
        if state == AppState.FAILED and not reason:
            reason = _last_stderr_line(api, rep)  # e.g. the last line of a traceback
        outcomes.append(ReplicaOutcome(rep.role, rep.replica_id, rep.service, state, rep.exit_code, reason))
    return group_state(outcomes)


# --------------------------------------------------------------------------- actions ------
def parallel(fn: Callable[[T], Any], reps: list[T]) -> list[tuple[T, Optional[BaseException]]]:
    """Runs ``fn`` on every item at once (container create/start/stop are mostly waiting)."""
    def one(rep: T) -> tuple[T, Optional[BaseException]]:
        try:
            fn(rep)
            return rep, None
        except Exception as e:  # collected: all-or-nothing needs every outcome
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


def start_group(api: Any, snap: Snapshot, reps: list[Replica]) -> Optional[Verdict]:
    """Starts ``reps`` all or nothing; on any failure pins FAILED and stops the group."""
    failures = [(r, e) for r, e in parallel(lambda r: api.start(r.container_id), reps) if e is not None]
    if not failures:
        return None
    rep, err = failures[0]
    verdict = pin_verdict(
        api, snap, AppState.FAILED,
        f"role '{rep.role}' replica {rep.replica_id} failed to start: {explain(err)}; "
        "the group was stopped (all or nothing)",
    )
    stop(api, [r for r in reps if (r.role, r.replica_id) != (rep.role, rep.replica_id)], 0)
    return verdict


def dependency_verdict(api: Any, deps: list[str]) -> tuple[bool, str]:
    """(all succeeded, failure message or "")."""
    for dep in deps:
        st = reconcile(api, dep, acting=False)
        if st is None:
            return False, f"dependency '{dep}' no longer exists"
        if st.state in (AppState.FAILED, AppState.CANCELLED):
            return False, f"dependency '{dep}' ended {st.state.name}" + (f" ({st.msg})" if st.msg else "")
        if st.state != AppState.SUCCEEDED:
            return False, ""
    return True, ""


@dataclass
class AppStatus:
    """The reported state of an app (what describe shows)."""

    snapshot: Snapshot
    state: AppState
    msg: str

    @property
    def over(self) -> bool:
        """Decided and nothing runs any more: the watcher's work is done."""
        return self.snapshot.verdict is not None and not self.snapshot.running


def reconcile(api: Any, app_id: str, acting: bool) -> Optional[AppStatus]:
    """Reads the app from the daemon, applies the group rules, and reports its state.

    Args:
        api: a docker ``APIClient``
        app_id: the app
        acting: True in the watcher (stops gracefully and waits); False in describe (never
            blocks on a graceful stop; kills leftovers only once the watcher is evidently gone)
    """
    snap = fetch(api, app_id)
    if snap is None:
        return None
    if snap.verdict is None:
        waiting = [r for r in snap.replicas if r.status == "created" and not r.started and not r.error]
        if waiting:
            ok, why = dependency_verdict(api, snap.dependencies)
            if why:
                pin_verdict(api, snap, AppState.FAILED, why)
            elif ok:
                start_group(api, snap, waiting)
                snap = fetch(api, app_id) or snap
            elif not any(r.started for r in snap.replicas):
                return AppStatus(snap, AppState.PENDING,
                                 "waiting for dependencies: " + ", ".join(snap.dependencies))
    if snap.verdict is None:
        state, msg = computed_state(api, snap)
        if state not in _TERMINAL:
            return AppStatus(snap, state, msg)
        pin_verdict(api, snap, state, msg)
    verdict = snap.verdict
    assert verdict is not None
    if snap.running:
        if acting:
            stop(api, snap.running, snap.stop_timeout)
            snap = fetch(api, app_id) or snap
        elif time.time() - verdict.time > snap.stop_timeout + KILL_FALLBACK_S:
            stop(api, snap.running, 0)
            snap = fetch(api, app_id) or snap
    if snap.running:
        names = ", ".join(f"{r.role}/{r.replica_id}" for r in snap.running)
        return AppStatus(snap, AppState.RUNNING,
                         f"stopping {names}; then {verdict.state.name}" + (f": {verdict.msg}" if verdict.msg else ""))
    if acting and snap.network:
        remove_network(api, snap.network)
    return AppStatus(snap, verdict.state, verdict.msg)


def remove_network(api: Any, name: str) -> None:
    """Frees the app's network (bridge address pools are few); stopped containers keep their logs."""
    import docker

    try:
        api.remove_network(name)
    except docker.errors.APIError:
        pass  # already gone, or not ours to remove (an existing network given as network_mode)


# --------------------------------------------------------------------------- watcher ------
def watch(app_id: str, poll: float = POLL_S) -> int:
    """Reconciles ``app_id`` until it is over or deleted; survives daemon restarts."""
    api = None
    down_since: Optional[float] = None
    while True:
        try:
            if api is None:
                api = client()
            status = reconcile(api, app_id, acting=True)
            down_since = None
        except Exception as e:
            if not transient(e):
                raise
            if down_since is None:
                print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} daemon unavailable, retrying: {e}", flush=True)
                down_since = time.time()
            if time.time() - down_since > UNREACHABLE_GIVE_UP_S:
                print(f"docker daemon unavailable for {UNREACHABLE_GIVE_UP_S:.0f}s; giving up", flush=True)
                return 1
            time.sleep(1.0)
            continue
        if status is None or status.over:
            return 0
        time.sleep(poll)


def main(argv: list[str]) -> int:
    """``python -m torchx_ext.schedulers.docker_jobs_watcher APP_ID``."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watching {argv[1]} (pid {os.getpid()})", flush=True)
    try:
        return watch(argv[1])
    except Exception:
        # describe keeps working without us (it reconciles too); the traceback is for humans
        traceback.print_exc()
        return 1
    finally:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watcher of {argv[1]} exits", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
