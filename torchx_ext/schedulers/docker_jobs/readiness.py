"""Service readiness on Docker: where a service's ports are probed, the connect check, and the
daemon's record of an attempt that was ready.

The group engine (:mod:`torchx_ext.engine`) holds the other roles until every service with ports
(``Role.port_map``) accepts connections, and fails the app when one does not within
``ready_timeout_s``. The Docker launcher restores the engine on every pass (:mod:`.launcher`), so
what the engine heard must be read back from the daemon each time:

* **when the attempt started**: its container's ``StartedAt``. The ``Started`` is reported at that
  time, so the deadline is the same whichever pass, watcher or describe computes it.
* **that it was ready**: a tiny labelled volume ``<app>.ready-<role>-<k>-a<attempt>``, created by
  the acting watcher once every port accepted. Describe and a successor watcher report ``Ready``
  from it; a successor never re-decides a readiness that was seen. Volumes for the lease's
  reasons (:mod:`.lease`: the daemon's cheapest named object, and no scheduler label, so they
  never read as an app); removed with the app's leases once it is over, and by delete.

**Where to connect.** With a local daemon (the default, a ``unix://`` socket): the container's
address on the app's network at the container port. That is what the other replicas use (their
``TORCHX_EXT_HOSTS_*`` names resolve to it), so "it accepts there" is the promise the held roles
rely on. The published port is no good locally: docker-proxy accepts on the host side before
anything listens in the container (a false "ready"), and ``publish_host`` may be any address. With
``network_mode=host`` the container has the host's network: ``127.0.0.1:port``. With a remote
daemon (``tcp://``, ``ssh://``) no container address is routable from here: the published port,
at ``publish_host`` (or the daemon's host when that is a wildcard or loopback address), where a
connect is forwarded by the kernel and refused while nothing listens; a service that is not
published where this machine can reach it is never ready (the app fails naming its ports).

**How.** One connect per port per pass of the app (at most :data:`CONNECT_TIMEOUT_S` each: a
refused connect on a local bridge returns at once), in the app's reconcile, which runs in a worker
of the watcher's pool, never in its main loop; the watcher looks again every ``POLL_S`` while a
probe is pending (:attr:`.launcher.AppStatus.probing`). The engine asks again each pass for the
current attempt only, so probing stops by itself when the attempt is stopped or ends, or a verdict
is set.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional
from urllib.parse import urlparse

from torchx_ext.engine.probe import accepts
from torchx_ext.groups import ports_waited_on
from torchx_ext.schedulers.docker_jobs.daemon import P, Replica, Snapshot
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts

CONNECT_TIMEOUT_S = 0.2
L_READY = P + "ready"  # the app id (records carry no scheduler label: they are no app)
L_READY_ROLE = P + "ready-role"
L_READY_REPLICA = P + "ready-replica"
L_READY_ATTEMPT = P + "ready-attempt"
_LOOPBACK = ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost")

Record = tuple[str, int, int]  # (role, replica id, attempt)
Key = tuple[str, int]


def ports(summary: Mapping[str, Any]) -> tuple[int, ...]:
    """A role's ports to wait on, from its summary (the L_ROLES label), by the rule of
    :func:`torchx_ext.groups.service_ports`."""
    return ports_waited_on(bool(summary.get("service")), summary.get("port_map") or {})


def record_name(app_id: str, role: str, replica_id: int, attempt: int) -> str:
    return f"{app_id}.ready-{re.sub(r'[^A-Za-z0-9_.-]', '-', role)}-{replica_id}-a{attempt}"


def recorded(api: Any, app_id: str) -> set[Record]:
    """The attempts of the app's services that were seen ready (one daemon read)."""
    vols = api.volumes(filters={"label": [f"{L_READY}={app_id}"]}).get("Volumes") or []
    out = set()
    for v in vols:
        lab = v.get("Labels") or {}
        try:
            rec = (str(lab[L_READY_ROLE]), int(lab[L_READY_REPLICA]), int(lab[L_READY_ATTEMPT]))
        except (KeyError, ValueError):
            continue  # not one of ours
        if lab.get(L_READY) == app_id and v.get("Name") == record_name(app_id, *rec):
            out.add(rec)
    return out


def record(api: Any, app_id: str, rec: Record) -> None:
    """Records that attempt ``rec`` was ready (creating an existing record returns it: idempotent)."""
    labels = {L_READY: app_id, L_READY_ROLE: rec[0], L_READY_REPLICA: str(rec[1]), L_READY_ATTEMPT: str(rec[2])}
    api.create_volume(record_name(app_id, *rec), driver="local", labels=labels)


def remove_records(api: Any, app_id: str) -> None:
    """Removes the app's readiness records (the app is over, or deleted)."""
    import docker

    for v in api.volumes(filters={"label": [f"{L_READY}={app_id}"]}).get("Volumes") or []:
        try:
            api.remove_volume(v["Name"])
        except docker.errors.NotFound:
            pass


def started_at(api: Any, rep: Replica) -> Optional[float]:
    """When ``rep``'s container started (the daemon's clock), or None if it did not (or is gone)."""
    import docker

    try:
        return parse_ts(api.inspect_container(rep.container_id)["State"].get("StartedAt", ""))
    except docker.errors.NotFound:
        return None


def remote_daemon() -> Optional[str]:
    """The daemon's host name when it is not on this machine (None: a local socket or address)."""
    url = urlparse(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    host = url.hostname or ""
    return host if url.scheme in ("tcp", "http", "https", "ssh") and host not in _LOOPBACK else None


def endpoints(api: Any, rep: Replica, ports: tuple[int, ...], network: str) -> list[tuple[str, int]]:
    """Where to connect to each of ``ports`` of ``rep`` (see the module docstring); [] if not known yet
    (no address on its network, a port not published)."""
    remote = remote_daemon()
    info = api.inspect_container(rep.container_id)
    if info.get("HostConfig", {}).get("NetworkMode") == "host":
        return [(remote or "127.0.0.1", p) for p in ports]
    if remote:
        out = []
        for p in ports:
            ip, _, host_port = rep.ports.get(p, "").rpartition(":")
            if not host_port:
                return []
            out.append((remote if ip in _LOOPBACK else ip, int(host_port)))
        return out
    nets = info.get("NetworkSettings", {}).get("Networks") or {}
    chosen: dict[str, Any] = nets.get(network) or next(iter(nets.values()), {})
    addr = chosen.get("IPAddress") or chosen.get("GlobalIPv6Address") or ""
    return [(addr, p) for p in ports] if addr else []


def check(api: Any, rep: Replica, ports: tuple[int, ...], network: str) -> bool:
    """Does every one of ``ports`` of ``rep``'s container accept a connection now?"""
    import docker

    try:
        where = endpoints(api, rep, ports, network)
    except docker.errors.NotFound:
        return False  # removed meanwhile: the replay reports it lost
    return bool(where) and all(accepts(h, p, CONNECT_TIMEOUT_S) for h, p in where)


class Readiness:
    """What one pass of an app (:class:`.launcher.Pass`) knows of its services' readiness: the
    records (read once), the start times it looked up, and whether it may connect (``probing``:
    the acting watcher; never describe, nor the submission's own pass)."""

    def __init__(self, api: Any, snap: Snapshot, gated: bool, probing: bool) -> None:
        self.api, self.app_id, self.network, self.probing = api, snap.app_id, snap.network, probing
        self.recorded = recorded(api, snap.app_id) if gated else set()
        self.started: dict[tuple[Key, int], float] = {}  # (replica, attempt) -> when it started
        self.checked: set[Record] = set()  # connected to in this pass (once is enough)

    def started_at(self, attempt: tuple[Key, int], rep: Optional[Replica], now: float) -> float:
        """When ``attempt`` started (``now`` if it is not known)."""
        if attempt not in self.started and rep is not None:
            self.started[attempt] = started_at(self.api, rep) or now
        return self.started.get(attempt, now)

    def ready(self, probe: Any, rep: Optional[Replica]) -> bool:
        """Was ``probe``'s attempt (an ``engine.Probe``) seen ready: recorded, or (probing) accepting
        on every port now, and then recorded?"""
        rec = (probe.key[0], probe.key[1], probe.attempt)
        if rec in self.recorded or not self.probing or rep is None or rec in self.checked:
            return rec in self.recorded
        self.checked.add(rec)
        if check(self.api, rep, probe.ports, self.network):
            record(self.api, self.app_id, rec)
            self.recorded.add(rec)
        return rec in self.recorded
