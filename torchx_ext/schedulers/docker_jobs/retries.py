"""The next attempt of a ``docker_jobs`` replica: a new container (``Role.max_retries``).

Each attempt is a new container, created from the last one's own configuration (so forwarded
environment values are kept without being stored anywhere) with ``TORCHX_EXT_ATTEMPT`` raised,
on the same network under the same alias and hostname, so every replica's discovery values stay
true. The earlier attempts stay (exited) for ``torchx log``. Which replicas restart, when, and
what is said about it is decided by the group engine (:mod:`torchx_ext.engine`);
:mod:`.launcher` performs its decisions with :func:`recreate`.
"""

from __future__ import annotations

from typing import Any

from torchx_ext.groups import ENV_ATTEMPT
from torchx_ext.schedulers.docker_jobs.daemon import L_ATTEMPT, Replica, Snapshot


def num_restarts(snap: Snapshot) -> int:
    """The restarts the daemon records: the number of the last one that created an attempt."""
    return max((r.restart for r in (*snap.previous, *snap.replicas)), default=0)


def recreate(api: Any, rep: Replica, attempt: int, labels: dict[str, str]) -> str:
    """Creates attempt ``attempt`` of ``rep``'s replica from ``rep`` (an earlier attempt's
    container), with ``labels`` added to its own; the new container's id."""
    info = api.inspect_container(rep.container_id)
    cfg, host_config = info["Config"], info["HostConfig"]
    env = [e for e in cfg.get("Env") or [] if not e.startswith(ENV_ATTEMPT + "=")] + [f"{ENV_ATTEMPT}={attempt}"]
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
        environment=env, labels={**(cfg.get("Labels") or {}), **labels, L_ATTEMPT: str(attempt)},
        host_config=host_config, networking_config=networking, user=cfg.get("User") or None,
        stop_timeout=cfg.get("StopTimeout"), detach=True, ports=list(cfg.get("ExposedPorts") or {}) or None,
    )["Id"])
