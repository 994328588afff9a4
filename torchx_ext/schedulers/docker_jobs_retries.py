"""Restarts of ``docker_jobs`` replicas (``Role.max_retries`` under ``Role.retry_policy``).

Each attempt is a new container, created from the last one's own configuration (so forwarded
environment values are kept without being stored anywhere) with ``TORCHX_EXT_ATTEMPT`` raised,
on the same network under the same alias and hostname, so every replica's discovery values stay
true. The earlier attempts stay (exited) for ``torchx log``. As for the verdict, everything is in
the daemon's labels: the attempt, the retry policy and budget, the number of the restart that
created a container and the budget it was charged to, and when its backoff ends. The rules
themselves are :mod:`.ray_jobs_cluster.rules`, shared by every scheduler.

:func:`restart_due` only reads (describe uses it: a replica about to restart is PENDING, not
FAILED); :func:`restart` and :func:`start_due` act, in the watcher only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from torchx.specs import AppState

from torchx_ext.groups import ENV_ATTEMPT
from torchx_ext.schedulers.ray_jobs_cluster import rules

if TYPE_CHECKING:
    from torchx_ext.schedulers.docker_jobs_daemon import Replica, Snapshot


def _every(snap: Snapshot) -> list[Replica]:
    return [*snap.previous, *snap.replicas]


def num_restarts(snap: Snapshot) -> int:
    return max((r.restart for r in _every(snap)), default=0)


def _used(snap: Snapshot, rep: Replica) -> int:
    """The restarts charged to ``rep``'s budget unit, up to the one that created ``rep``.

    A later restart of the same unit always recreates ``rep`` too (the unit's scope holds it), so
    one newer than ``rep`` is still creating its replacements: a describe that reads the daemon in
    the middle of it must see ``rep`` about to restart, not a budget already spent."""
    unit = rules.retry_unit(rep.policy, rep.role, rep.replica_id)
    return len({r.restart for r in _every(snap) if r.restart_unit == unit and r.restart <= rep.restart})


def _ended(rep: Replica) -> bool:
    from torchx_ext.schedulers.docker_jobs_daemon import replica_outcome

    return replica_outcome(rep)[0] in (AppState.SUCCEEDED, AppState.FAILED)


def restart_due(snap: Snapshot, rep: Replica) -> bool:
    """Has ``rep`` ended in a way its policy restarts, with budget left (and no verdict yet)?"""
    if snap.verdict is not None or not rep.max_retries or not _ended(rep):
        return False
    code = None if rep.error or rep.oom_killed else rep.exit_code
    if not rules.wants_restart(rep.service, code):
        return False
    return _used(snap, rep) < rep.max_retries


def exhausted_reason(snap: Snapshot, rep: Replica) -> str:
    """What a failed replica's message adds once its budget is spent ("" without retries)."""
    if not rep.max_retries:
        return ""
    used = _used(snap, rep)
    return f"after {used + 1} attempts ({rep.policy} policy, max_retries={rep.max_retries})"


def restart(api: Any, snap: Snapshot, rep: Replica) -> None:
    """Replaces ``rep`` and whatever its policy restarts with it by new, created containers
    (started by :func:`start_due` once the backoff is over), then stops the old ones still running."""
    from torchx_ext.schedulers.docker_jobs_daemon import explain, parallel, pin_verdict, stop

    unit = rules.retry_unit(rep.policy, rep.role, rep.replica_id)
    used = _used(snap, rep)
    number = num_restarts(snap) + 1
    keys = rules.restart_scope(rep.policy, rep.role, rep.replica_id, [(r.role, r.replica_id) for r in snap.replicas])
    scope = [r for r in snap.replicas if (r.role, r.replica_id) in keys]
    ended = "OOMKilled" if rep.oom_killed else rep.error or rules.exit_description(rep.exit_code)
    why = (f"role '{rep.role}' replica {rep.replica_id} ended with {ended}; {rep.policy} policy, "
           f"restart {used + 1} of {rep.max_retries}")
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} restart {number}: {why}", flush=True)
    start_after = time.time() + rules.backoff_s(snap.retry_backoff_s, used + 1)
    # the new attempts first, the old ones stopped after: a describe meanwhile sees each replica
    # either still running or about to restart, never a group that failed
    created: list[str] = []
    results = parallel(lambda r: created.append(_recreate(api, r, number, unit, start_after, why)), scope)
    stop(api, [r for r in scope if r.running], snap.stop_timeout)
    failed = [(r, e) for r, e in results if e is not None]
    if failed:
        # a replica with no next attempt cannot restart: the app fails, all or nothing (the
        # attempts already created are never started: start_due starts none once it is decided)
        r, err = failed[0]
        pin_verdict(api, snap, AppState.FAILED,
                    f"restart {number} ({why}) could not create the next attempt of role '{r.role}' "
                    f"replica {r.replica_id}: {explain(err)}")
        return
    if start_after <= time.time():  # no backoff: start them now
        parallel(api.start, created)


def _recreate(api: Any, rep: Replica, number: int, unit: str, start_after: float, why: str) -> str:
    from torchx_ext.schedulers import docker_jobs_daemon as d

    info = api.inspect_container(rep.container_id)
    cfg, host_config = info["Config"], info["HostConfig"]
    attempt = rep.attempt + 1
    env = [e for e in cfg.get("Env") or [] if not e.startswith(ENV_ATTEMPT + "=")] + [f"{ENV_ATTEMPT}={attempt}"]
    labels = {**(cfg.get("Labels") or {}), d.L_ATTEMPT: str(attempt), d.L_RESTART: str(number),
              d.L_RESTART_UNIT: unit, d.L_START_AFTER: f"{start_after:.3f}", d.L_RESTART_WHY: why}
    networking = None
    if host_config.get("NetworkMode") not in ("host", "none"):
        # the same aliases (the discovery names), less the ones docker derives from the old container
        own = {rep.container_id[:12], rep.name}
        networking = {"EndpointsConfig": {
            net: {"Aliases": [a for a in (ep.get("Aliases") or []) if a not in own] or None}
            for net, ep in (info.get("NetworkSettings", {}).get("Networks") or {}).items()}}
    base = rep.name[: -len(f"-a{rep.attempt}")] if rep.attempt > 1 else rep.name
    return str(api.create_container(
        cfg["Image"], command=cfg.get("Cmd"), name=f"{base}-a{attempt}", hostname=cfg.get("Hostname"),
        environment=env, labels=labels, host_config=host_config, networking_config=networking,
        user=cfg.get("User") or None, stop_timeout=cfg.get("StopTimeout"), detach=True,
        ports=list(cfg.get("ExposedPorts") or {}) or None,
    )["Id"])


def start_due(api: Any, snap: Snapshot) -> None:
    """Starts the restarted containers whose backoff is over (a failed start is that attempt's
    failure: the daemon records the error on the container)."""
    from torchx_ext.schedulers.docker_jobs_daemon import parallel

    if snap.verdict is not None:
        return
    now = time.time()
    due = [r for r in snap.replicas if r.attempt > 1 and r.status == "created" and not r.started
           and not r.error and r.start_after <= now]
    parallel(lambda r: api.start(r.container_id), due)
