"""The detached watcher of a ``docker_jobs`` app: the only component that acts on it after submit.

``python -m torchx_ext.schedulers.docker_jobs_watcher APP_ID ...`` is started by ``schedule`` and
outlives ``torchx run``. It polls :func:`reconcile` with ``acting=True`` until the app is over:
it starts the group once its dependencies succeeded, pins the verdict (group rule, failed start,
failed dependency), stops what must not run any more (gracefully, blocking up to the stop timeout)
and removes the app's network.

``describe`` calls :func:`reconcile` with ``acting=False``: the same rules, computed only, never
acted on.

**One acting watcher per app, wherever status is asked from**: the lease of
:mod:`.docker_jobs_lease`, held on the daemon.

**Healing.** While an app is not over and its lease is free, a status query starts a new watcher
(:func:`ensure_watcher`, logged) that heals a killed watcher or a rebooted host: only for the apps
the caller submitted (the :data:`~.docker_jobs_daemon.L_SUBMITTER` label: uid, machine and
``$TORCHX_EXT_HOME``), other users' apps on a shared daemon are only read. The query takes the
lease itself and hands it to the watcher it starts, so it never waits for the watcher to come up,
and no other query anywhere starts a second one meanwhile.

An app counts as ended only once none of its containers runs: a verdict with containers still
stopping is reported as RUNNING with a "stopping" message.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Optional

from torchx.specs import AppState, is_terminal

from torchx_ext import state
from torchx_ext.schedulers import docker_jobs_retries as retries
from torchx_ext.schedulers.docker_jobs_daemon import (
    L_APP_ID,
    SCHEDULER,
    Replica,
    Snapshot,
    Verdict,
    app_filter,
    client,
    computed_state,
    explain,
    fetch,
    parallel,
    pin_verdict,
    remove_network,
    stop,
    submitter,
    transient,
    verdict_volume,
)
from torchx_ext.schedulers.docker_jobs_lease import ACT_MIN_S, Heartbeat, Lease, remove_leases, take_lease

POLL_S = 0.25
DIE_SETTLE_S, DIE_SETTLE_POLL_S = 0.5, 0.02  # after a "die" event: how long, and how often, to look again
UNREACHABLE_GIVE_UP_S = 3600.0
logger = logging.getLogger(__name__)


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
        """Decided (verdict pinned) and nothing runs any more: no watcher is needed."""
        return self.snapshot.verdict is not None and not self.snapshot.running


def reconcile(api: Any, app_id: str, acting: bool, died: Optional[dict[str, int]] = None) -> Optional[AppStatus]:
    """Reads the app from the daemon, applies the group rules, and reports its state.

    Args:
        api: a docker ``APIClient``
        app_id: the app
        acting: True in the watcher: start, pin, stop and clean up as the rules say. False in
            describe: the same state, computed only; nothing on the daemon changes
        died: container id → exit code, from the daemon's "die" events: the daemon sends them
            some 50-90 ms before a snapshot shows those containers exited. They start restarts
            at once; a verdict waits for the snapshot (it alone says OOMKilled, for one)
    """
    snap = fetch(api, app_id)
    if snap is None:
        return None
    verdict = snap.verdict
    if verdict is None and acting:
        due = [r for r in _as_died(api, snap.replicas, died or {}) if retries.restart_due(snap, r)]
        if due:
            retries.restart(api, snap, due[0])  # its scope may hold the others: one per pass
            snap = fetch(api, app_id) or snap
            verdict = snap.verdict  # a restart that could not create its attempts decides the app
        retries.start_due(api, snap)
    if verdict is None:
        # first attempts not started: waiting for their dependencies (a restart's wait is its backoff)
        waiting = [r for r in snap.replicas if r.status == "created" and not r.started and not r.error
                   and r.attempt == 1]
        if waiting:
            ok, why = dependency_verdict(api, snap.dependencies)
            if why and not acting:
                return AppStatus(snap, AppState.FAILED, why)
            if why:
                verdict = pin_verdict(api, snap, AppState.FAILED, why)
            elif ok and not acting:
                return AppStatus(snap, AppState.PENDING, "its dependencies succeeded; starting")
            elif ok:
                start_group(api, snap, waiting)
                snap = fetch(api, app_id) or snap
                verdict = snap.verdict
            elif not any(r.started for r in snap.replicas):
                return AppStatus(snap, AppState.PENDING, "waiting for dependencies: " + ", ".join(snap.dependencies))
    if verdict is None:
        st, msg = computed_state(api, snap)
        if not is_terminal(st):
            return AppStatus(snap, st, msg)
        # the outcome is decided; only the watcher records it (the first verdict wins)
        verdict = pin_verdict(api, snap, st, msg) if acting else Verdict(st, msg, time.time())
    if snap.running and acting:
        stop(api, snap.running, snap.stop_timeout)
        snap = fetch(api, app_id) or snap
    if snap.running:
        names = ", ".join(f"{r.role}/{r.replica_id}" for r in snap.running)
        return AppStatus(snap, AppState.RUNNING,
                         f"stopping {names}; then {verdict.state.name}" + (f": {verdict.msg}" if verdict.msg else ""))
    if acting and snap.network:
        remove_network(api, snap.network)
    return AppStatus(snap, verdict.state, verdict.msg)


def _as_died(api: Any, replicas: list[Replica], died: dict[str, int]) -> list[Replica]:
    """``replicas``, those a "die" event named but the snapshot still shows running as exited
    (copies: the snapshot itself stays as read)."""
    out = []
    for rep in replicas:
        if rep.running and rep.container_id in died:
            oom = False
            if died[rep.container_id] == 137:  # SIGKILL: say OOMKilled if that is why
                oom = bool(api.inspect_container(rep.container_id)["State"].get("OOMKilled"))
            rep = replace(rep, status="exited", exit_code=died[rep.container_id], oom_killed=oom,
                          finished_at=time.time())
        out.append(rep)
    return out


def remove_app(api: Any, app_id: str, network: Optional[str]) -> None:
    """Removes an app's containers, network and verdict from the daemon (delete, failed submit)."""
    import docker

    for s in api.containers(all=True, filters=app_filter(app_id)):
        try:
            api.remove_container(s["Id"], force=True)
        except docker.errors.NotFound:
            pass
    if network:
        remove_network(api, network)
    try:
        api.remove_volume(verdict_volume(app_id))
    except docker.errors.NotFound:
        pass
    remove_leases(api, app_id)


# --------------------------------------------------------------------------- watcher ------
def log_path(app_id: str) -> str:
    # diagnostics only (tracebacks of the watcher); never read back: the daemon is the truth
    return state.scheduler_dir(SCHEDULER, f"{app_id}.watcher.log")


def spawn(lease: Lease) -> None:
    """Starts a detached watcher that holds ``lease`` (taken by the caller: so from this instant on,
    a status query anywhere finds the app watched, before the watcher's interpreter has started)."""
    state.makedirs(state.scheduler_dir(SCHEDULER))
    # the log can hold a traceback with Role.env values: private from its creation
    fd = os.open(log_path(lease.app_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "torchx_ext.schedulers.docker_jobs_watcher", lease.app_id, lease.holder,
             str(lease.epoch), repr(lease.valid_until)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )


def ensure_watcher(api: Any, status: AppStatus) -> bool:
    """The one place a status query may act: starts a watcher for an app of this caller's (same
    user, machine and home) that is not over and whose lease nobody holds. Other apps on the daemon
    are only read. Best effort: True if a watcher was started."""
    snap = status.snapshot
    if status.over or not snap.submitter or snap.submitter != submitter():
        return False
    try:
        lease = take_lease(api, snap.app_id)
    except Exception as e:  # healing is best effort: the state was read already; the next query retries
        if not transient(e):
            logger.warning("docker_jobs: could not check the watcher lease of %s: %s", snap.app_id, explain(e))
        return False
    if lease is None:
        return False  # a live watcher, here or elsewhere, holds it
    logger.warning("docker_jobs: the watcher of %s was not running; started a new one (log: %s)",
                   snap.app_id, log_path(snap.app_id))
    spawn(lease)
    return True


def watch(lease: Lease, poll: float = POLL_S) -> int:
    """Reconciles the app of ``lease`` until it is over or deleted, acting only while it holds the
    lease; survives daemon restarts."""
    app_id = lease.app_id
    beat = Heartbeat(lease)
    beat.start()
    api = None
    down_since: Optional[float] = None
    quick_until = 0.0
    died: dict[str, int] = {}
    try:
        while True:
            if beat.lost.is_set():
                print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} lost the lease of {app_id} (it expired and another "
                      "watcher took it); exiting", flush=True)
                return 0
            if not lease.valid_for(ACT_MIN_S):
                time.sleep(0.2)  # renewals fail (daemon away): act on nothing until one succeeds
                continue
            # events from this instant on wake the next wait, also the ones the reconcile misses
            # (a replica that dies while the snapshot is read)
            mark = time.time()
            try:
                if api is None:
                    api = client()
                status = reconcile(api, app_id, acting=True, died=died)
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
                beat.done.set()
                beat.join()
                remove_leases(api, app_id)  # nothing left to act on: no lease volumes stay behind
                return 0
            if time.time() < quick_until:
                time.sleep(DIE_SETTLE_POLL_S)
                continue
            died = _wait_for_a_change(api, app_id, poll, mark)
            if died:
                # the daemon sends "die" some 50-90 ms before a snapshot shows the container exited:
                # the next pass takes the event's word for it, and later ones look again every few ms
                quick_until = time.time() + DIE_SETTLE_S
    finally:
        beat.done.set()


def _wait_for_a_change(api: Any, app_id: str, poll: float, since: float) -> dict[str, int]:
    """Sleeps ``poll`` seconds, or less: until one of the app's containers dies (the daemon's
    event stream, replayed from ``since``), so the group rules and restarts act on an exit at
    once. Returns the containers that died, with their exit codes."""
    try:
        events = api.events(since=since, until=time.time() + poll, decode=True,
                            filters={"label": [f"{L_APP_ID}={app_id}"], "event": ["die"]})
        for event in events:
            events.close()
            actor = event.get("Actor") or {}
            code = str((actor.get("Attributes") or {}).get("exitCode"))
            return {actor["ID"]: int(code)} if actor.get("ID") and code.lstrip("-").isdigit() else {"": 0}
    except Exception as e:  # a daemon without events: poll as before
        if not transient(e):
            time.sleep(poll)
    return {}


def main(argv: list[str]) -> int:
    """``python -m torchx_ext.schedulers.docker_jobs_watcher APP_ID [HOLDER EPOCH VALID_UNTIL]``: the
    lease taken by :func:`spawn` (``VALID_UNTIL``: ``time.monotonic()``, system-wide), or none: then
    the watcher takes the app's lease itself, and exits if another holds it."""
    app_id = argv[1]
    lease: Optional[Lease]
    if len(argv) > 4:
        lease = Lease(app_id, argv[2], int(argv[3]), float(argv[4]))
    else:
        lease = take_lease(client(), app_id)
    if lease is None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} another watcher holds the lease of {app_id}; exiting",
              flush=True)
        return 0
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watching {app_id} (pid {os.getpid()}, lease "
          f"{lease.holder} from epoch {lease.epoch})", flush=True)
    try:
        return watch(lease)
    except Exception:
        # the lease runs out, and the next describe of the submitter starts a new watcher
        traceback.print_exc()
        return 1
    finally:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} watcher of {app_id} exits", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
