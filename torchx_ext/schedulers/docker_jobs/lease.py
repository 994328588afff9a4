"""The lease that makes one watcher per ``docker_jobs`` app the acting one.

A lock
file on one machine cannot exclude a watcher started from another home or another machine
(``DOCKER_HOST``); two acting watchers would restart the same replica twice. The lease is a
sequence of tiny labelled volumes ``<app>.watcher-<epoch>`` (label :data:`L_HOLDER` names the
holder). Creating a volume is atomic on the daemon and the first creator's labels stand (creating
one that exists returns it), so of several callers claiming the same epoch exactly one finds its own
name in the labels. The holder renews by claiming the next epoch every :data:`RENEW_EVERY_S`
(the home watcher's renewing thread) and removes the older ones; a volume's creation time, read on the daemon's own
clock, is the heartbeat. A lease whose newest epoch is older than :data:`LEASE_TTL_S` (by the
daemon's clock, never the caller's) may be taken over by claiming the next epoch: again one wins,
and a late holder finds the epoch taken at its next renewal and exits. Names are never reused while
a holder lives, and a claim that finds a newer epoch than its own yields, so a remove-then-create
race cannot give two winners. The holder acts only while its lease has :data:`ACT_MIN_S` left by
its own monotonic clock (counted from before it asked the daemon, so it stops before any taker could
start). Why volumes: they are the daemon's cheapest atomic named object (a container costs a rootfs
copy with the vfs driver), and they carry no scheduler label, so they never read as an app.
"""

from __future__ import annotations

import email.utils
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Collection, Optional

from torchx_ext.schedulers.docker_jobs.daemon import P
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts

LEASE_TTL_S = 10.0  # a lease not renewed for this long, by the daemon's clock, may be taken over
RENEW_EVERY_S = 2.0
_MARGIN_S = 1.5  # the holder stops acting this long before a taker could find its lease expired
ACT_MIN_S = 3.0  # an acting pass begins only with at least this much of the lease left
L_LEASE = P + "watcher-lease"  # the app id (lease volumes carry no scheduler label: they are no app)
L_HOLDER = P + "watcher-holder"
L_EPOCH = P + "watcher-epoch"


@dataclass
class Lease:
    """The right to act on one app, held on its daemon (see the module docstring)."""

    app_id: str
    holder: str
    epoch: int
    valid_until: float  # time.monotonic() after which the holder must not act until it renews

    def valid_for(self, seconds: float = 0.0) -> bool:
        return time.monotonic() + seconds < self.valid_until


def lease_volume(app_id: str, epoch: int) -> str:
    return f"{app_id}.watcher-{epoch}"


def new_holder(what: str = "") -> str:
    """A holder's name: unique, and telling a human where it runs (``what``: default, this pid)."""
    return f"{socket.gethostname()}/{what or os.getpid()}/{uuid.uuid4().hex[:12]}"


def _leases(api: Any, app_id: str) -> list[tuple[int, dict[str, Any]]]:
    """The app's lease volumes (epoch, volume), oldest first."""
    vols = api.volumes(filters={"label": [f"{L_LEASE}={app_id}"]}).get("Volumes") or []
    out = []
    for v in vols:
        labels = v.get("Labels") or {}
        epoch = str(labels.get(L_EPOCH, ""))
        if labels.get(L_LEASE) == app_id and epoch.isdigit() and v.get("Name") == lease_volume(app_id, int(epoch)):
            out.append((int(epoch), v))
    return sorted(out, key=lambda x: x[0])


def daemon_now(api: Any) -> float:
    """The daemon's clock (the ``Date`` of a ``/_ping`` answer, whole seconds): lease ages are measured
    on the clock that stamped the lease, so the clocks of the machines that ask never matter."""
    res = api.get(f"{api.base_url}/_ping", timeout=10)
    res.raise_for_status()
    return email.utils.parsedate_to_datetime(res.headers["Date"]).timestamp()


def _expired(api: Any, volume: dict[str, Any]) -> bool:
    created = parse_ts(str(volume.get("CreatedAt") or ""))
    # both stamps are whole seconds, rounded down: + 1 so that a lease is never taken early
    return created is None or daemon_now(api) > created + LEASE_TTL_S + 1.0


def _remove_volumes(api: Any, names: list[str]) -> None:
    import docker

    for name in names:
        try:
            api.remove_volume(name)
        except docker.errors.APIError:
            pass  # gone already (another holder's clean-up)


def _claim(api: Any, app_id: str, holder: str, epoch: int) -> Optional[Lease]:
    """Creates the lease volume of ``epoch`` for ``holder``; the lease, or None if another won it."""
    began = time.monotonic()
    labels = {L_LEASE: app_id, L_HOLDER: holder, L_EPOCH: str(epoch)}
    got = api.create_volume(lease_volume(app_id, epoch), driver="local", labels=labels)
    if (got.get("Labels") or {}).get(L_HOLDER) != holder:
        return None  # created first by another: creating a volume that exists returns that one
    leases = _leases(api, app_id)
    if leases and leases[-1][0] > epoch:
        # the name was free again because a holder had moved past it and removed it: the newer stands
        _remove_volumes(api, [lease_volume(app_id, epoch)])
        return None
    _remove_volumes(api, [str(v["Name"]) for e, v in leases if e < epoch])
    return Lease(app_id, holder, epoch, began + LEASE_TTL_S - _MARGIN_S)


def take_lease(api: Any, app_id: str, holder: Optional[str] = None,
               dead: Collection[str] = ()) -> Optional[Lease]:
    """The app's lease for a new holder, or None while another holds a live one. Of several callers
    that find it free (never held, expired, or held by one of ``dead``), exactly one gets it.

    Args:
        dead: holders known to be dead without waiting for their leases to expire: the home
            watcher's predecessors (its lock file proves them gone, see docker_jobs.watcher)
    """
    leases = _leases(api, app_id)
    newest = (leases[-1][1].get("Labels") or {}).get(L_HOLDER) if leases else None
    # a lease passed to ``holder`` (transfer) is adopted by claiming its next epoch
    if leases and newest != holder and newest not in dead and not _expired(api, leases[-1][1]):
        return None
    return _claim(api, app_id, holder or new_holder(), leases[-1][0] + 1 if leases else 0)


def transfer(api: Any, lease: Lease, holder: str) -> bool:
    """Passes a valid ``lease`` to ``holder`` (who adopts it with :func:`take_lease`) by claiming its
    next epoch in that name; the giver must not act any more. False: not passed (it ran out)."""
    if not lease.valid_for(ACT_MIN_S):
        return False
    labels = {L_LEASE: lease.app_id, L_HOLDER: holder, L_EPOCH: str(lease.epoch + 1)}
    got = api.create_volume(lease_volume(lease.app_id, lease.epoch + 1), driver="local", labels=labels)
    if (got.get("Labels") or {}).get(L_HOLDER) != holder:
        return False
    _remove_volumes(api, [lease_volume(lease.app_id, lease.epoch)])
    return True


def renew(api: Any, lease: Lease) -> bool:
    """Extends ``lease`` by claiming its next epoch; False: it was lost (taken over once it expired).

    While the lease is still valid nobody can have taken it over (a taker waits for it to expire
    by the daemon's clock, and our validity ends :data:`_MARGIN_S` before that), so no newer epoch
    can exist: the renewal is one create and one remove (a watcher renews every app it holds).
    A late renewal claims as a taker does, checking for a newer epoch."""
    if not lease.valid_for():
        new = _claim(api, lease.app_id, lease.holder, lease.epoch + 1)
        if new is None:
            return False
        lease.epoch, lease.valid_until = new.epoch, new.valid_until
        return True
    began = time.monotonic()
    labels = {L_LEASE: lease.app_id, L_HOLDER: lease.holder, L_EPOCH: str(lease.epoch + 1)}
    got = api.create_volume(lease_volume(lease.app_id, lease.epoch + 1), driver="local", labels=labels)
    if (got.get("Labels") or {}).get(L_HOLDER) != lease.holder:
        return False
    _remove_volumes(api, [lease_volume(lease.app_id, lease.epoch)])
    lease.epoch, lease.valid_until = lease.epoch + 1, began + LEASE_TTL_S - _MARGIN_S
    return True


def remove_leases(api: Any, app_id: str) -> None:
    _remove_volumes(api, [str(v["Name"]) for _, v in _leases(api, app_id)])
