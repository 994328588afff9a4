"""The detached watcher of a home's ``docker_jobs`` apps: the only component that acts on them after submit.

``python -m torchx_ext.schedulers.docker_jobs.watcher --home HOME`` is started by ``schedule`` (or
a status query) and outlives ``torchx run``. **One process per daemon, user and
``$TORCHX_EXT_HOME``** (and machine) watches every app submitted from there; it exits once none is
left. Client-side memory is one process whatever the number of apps (a process per app cost 33 MB
each). For each app it runs :func:`~.launcher.reconcile` with ``acting=True``: the
app's group engine (:mod:`torchx_ext.engine`, restored from the daemon) decides, and the watcher
performs: it starts the group once its dependencies succeeded, restarts replicas, pins the verdict,
stops what must not run any more and removes the app's network (:mod:`.launcher`).

``describe`` calls it with ``acting=False``: the same decisions, computed only, never acted on.

**Which apps, and when.** The watcher's apps are those with a live container labelled with this
home's :data:`~.daemon.L_SUBMITTER` (listed every :data:`SWEEP_S`) and those handed to
it by a request file (:func:`.watching.request_watch`: by ``schedule`` and by healing, so an app whose
containers all exited before its verdict was pinned is found too). One stream of the daemon's
container events for the whole home wakes an app at once when one of its containers is created,
started, dies or is removed; an app waiting for dependencies, a backoff or a service's readiness
(each look connects once: :mod:`.readiness`), or stopping, is looked at every :data:`POLL_S`, any
other every :data:`IDLE_RECHECK_S` and whenever the listing shows a change. Reconciles run in a
pool of workers, one at a time per app, so an app whose containers take their stop timeout to stop
never delays another's restart.

**One watcher per home**: a lock file (``flock``) held for the watcher's life; the kernel frees it
when the watcher dies, so "is it alive?" is one non-blocking ``flock``. :func:`.watching.spawn` takes the lock
and hands it to the child: of concurrent callers only one starts a watcher. A watcher with nothing
left gives the lock up, then looks for work once more; a submission requests its app before it
checks the lock, so an app is never left between a watcher that exits and one that is not started.

**One acting watcher per app, wherever status is asked from**: the lease of
:mod:`.lease`, held on the daemon, one per app (the watcher renews all of its leases
from one thread). A submission holds its app's lease while it creates and starts the group, then
passes it to the watcher's holder name (:func:`.watching.hand_over`), which the watcher adopts: there is no
instant at which another could take it. The lock file lists the lease holders of the home's
earlier watchers: holding the lock proves them dead, so a new watcher takes their apps' leases at
once instead of waiting for them to expire.

**Healing.** While an app is not over, a status query of its submitter (same user, machine and
home) hands it to the home's watcher and starts the watcher if none lives
(:func:`.watching.ensure_watcher`, logged); other users' apps on a shared daemon are only read.

An app counts as ended only once none of its containers runs: a verdict with containers still
stopping is reported as RUNNING with a "stopping" message.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torchx_ext.schedulers.docker_jobs.daemon import (
    L_APP_ID,
    L_SCHEDULER,
    L_SUBMITTER,
    SCHEDULER,
    app_filter,
    client,
    explain,
    parallel,
    remove_network,
    submitter,
    transient,
    verdict_volume,
)

# re-exported: docker_jobs (schedule, describe) reaches them as the watcher's
from torchx_ext.schedulers.docker_jobs.launcher import AppStatus as AppStatus
from torchx_ext.schedulers.docker_jobs.launcher import reconcile as reconcile
from torchx_ext.schedulers.docker_jobs.launcher import start_group as start_group
from torchx_ext.schedulers.docker_jobs.lease import (
    ACT_MIN_S,
    LEASE_TTL_S,
    RENEW_EVERY_S,
    Lease,
    new_holder,
    remove_leases,
    renew,
    take_lease,
)
from torchx_ext.schedulers.docker_jobs.readiness import remove_records
from torchx_ext.schedulers.docker_jobs.watching import (
    MODULE,
    holders,
    requested_apps,
    try_lock,
    unrequest,
    write_holders,
)

POLL_S = 0.25
DIE_SETTLE_S, DIE_SETTLE_POLL_S = 0.5, 0.02  # after a "die" event: how long, and how often, to look again
UNREACHABLE_GIVE_UP_S = 3600.0
logger = logging.getLogger(__name__)


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
    remove_records(api, app_id)


# --------------------------------------------------------------------------- watcher ------
SWEEP_S = 1.0  # how often the home's live containers and requests are listed (new apps, missed changes)
IDLE_RECHECK_S = 30.0  # an app with nothing pending is reconciled at least this often (a safety net)
IDLE_EXIT_S = 3.0  # with nothing to watch for this long, the watcher exits
WORKERS = 16  # reconciles at once (a stop blocks its worker up to the app's stop timeout)
_LIVE = ["created", "running", "restarting", "paused"]
_EVENTS = ["create", "start", "die", "destroy"]


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", flush=True)


@dataclass
class _Watched:
    """What the watcher keeps per app (in its main thread; workers get copies of what they need)."""

    app_id: str
    lease: Optional[Lease] = None
    due: float = 0.0
    busy: bool = False
    again: bool = False  # something happened while a reconcile was running: run another
    died: dict[str, tuple[int, float]] = field(default_factory=dict)  # container id -> (exit code, when)
    quick_until: float = 0.0
    digest: tuple[tuple[str, str], ...] = ()
    said_held: bool = False
    held_since: Optional[float] = None  # since when another holds its lease (as far as we saw)
    lease_lock: threading.Lock = field(default_factory=threading.Lock)


class HomeWatcher:
    """The one watcher of a home (or, with ``only``, of the named apps of any submitter).

    The main thread keeps the set of watched apps and runs their reconciles in a pool of workers,
    one at a time per app; a thread follows the daemon's events of the home's containers (one
    stream for every app: a "die" wakes its app at once); another renews the leases it holds.
    """

    def __init__(self, lock_fd: Optional[int], only: Sequence[str] = (), holder: Optional[str] = None) -> None:
        self.lock_fd = lock_fd
        self.only = list(only)
        self.me = submitter()
        self.holder = holder or new_holder()
        self.dead: set[str] = set()
        self.apps: dict[str, _Watched] = {}
        self.over: dict[str, tuple[tuple[str, str], ...]] = {}  # ended apps (their last digest): not again
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.api = client(pool_size=WORKERS * 2)
        self.down_since: Optional[float] = None
        if lock_fd is not None:
            self._note_holder(lock_fd)

    def _note_holder(self, fd: int) -> None:
        """Reads the holders of this home's earlier watchers (dead: we hold the lock they held while
        they lived) and writes ours."""
        names = holders(fd)
        self.dead = set(names) - {self.holder}
        write_holders(fd, [*[n for n in names if n != self.holder], self.holder])

    # ---------------------------------------------------------------- threads ---
    def _follow_events(self) -> None:
        """Puts the daemon's container events of the watched apps on the queue; replays from the
        last one seen after a break (a daemon restart), so none is missed."""
        since = time.time()
        label = f"{L_APP_ID}={self.only[0]}" if len(self.only) == 1 else (
            f"{L_SCHEDULER}={SCHEDULER}" if self.only else f"{L_SUBMITTER}={self.me}")
        failures = 0
        while True:
            try:
                api = client()
                for ev in api.events(since=since, decode=True,
                                     filters={"type": ["container"], "event": _EVENTS, "label": [label]}):
                    when = float(ev.get("timeNano") or 0) / 1e9
                    since = max(since, when)
                    actor = ev.get("Actor") or {}
                    attrs = actor.get("Attributes") or {}
                    code = str(attrs.get("exitCode"))
                    self.queue.put(("event", attrs.get(L_APP_ID, ""), str(actor.get("ID") or ""),
                                    int(code) if code.lstrip("-").isdigit() else None, ev.get("status"),
                                    when or time.time()))
                failures = 0
            except Exception:  # noqa: BLE001 - a timeout, or the daemon away: replayed from `since`; the sweeps poll meanwhile
                failures += 1
                time.sleep(0.05 if failures == 1 else 1.0)

    def _renew_leases(self) -> None:
        api = None
        while True:
            time.sleep(RENEW_EVERY_S)
            held = [a for a in list(self.apps.values()) if a.lease is not None]
            try:
                api = api or client(pool_size=8)
                failed = [e for _, e in parallel(functools.partial(self._renew, api), held) if e is not None]
            except Exception as e:  # noqa: BLE001 - any failure to renew is handled below as one (the leases run out)
                failed = [e]
            if failed:  # the daemon away: the leases run out, and their apps wait (one line per round)
                _say(f"could not renew {len(failed)} of {len(held)} leases: {explain(failed[0])}")

    def _renew(self, api: Any, app: _Watched) -> None:
        with app.lease_lock:
            lease = app.lease
            if lease is not None and not renew(api, lease):
                _say(f"lost the lease of {app.app_id} (it expired and another watcher took it)")
                app.lease = None
                self.queue.put(("wake", app.app_id))

    # ---------------------------------------------------------------- main loop ---
    def run(self) -> int:
        for target in (self._follow_events, self._renew_leases):
            threading.Thread(target=target, daemon=True).start()
        pool = ThreadPoolExecutor(max_workers=WORKERS)
        for app_id in self.only:
            self.apps[app_id] = _Watched(app_id)
        last_sweep, empty_since = 0.0, time.time()
        while True:
            now = time.time()
            if not self.only and now - last_sweep >= SWEEP_S:
                last_sweep = now
                self._sweep()
            for app in self.apps.values():
                if not app.busy and app.due <= now:
                    app.busy, died, app.died = True, app.died, {}
                    pool.submit(self._job, app, died)
            if self.apps:
                empty_since = now
            elif self.only or now - empty_since >= IDLE_EXIT_S:
                if self.only or self._exit():
                    return 0
                empty_since = now
            wake = min([a.due for a in self.apps.values() if not a.busy] + [last_sweep + SWEEP_S])
            try:
                item = self.queue.get(timeout=min(max(wake - time.time(), 0.0), SWEEP_S))
                while True:
                    self._handle(item)
                    item = self.queue.get_nowait()
            except queue.Empty:
                pass
            if self.down_since is not None and time.time() - self.down_since > UNREACHABLE_GIVE_UP_S:
                _say(f"docker daemon unavailable for {UNREACHABLE_GIVE_UP_S:.0f}s; giving up")
                return 1

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind, app_id = item[0], item[1]
        if kind == "done":
            app = self.apps.get(app_id)
            if app is None:
                return
            app.busy = False
            if item[2] is None:  # over or gone
                del self.apps[app_id]
                self.over[app_id] = app.digest
            elif app.again:
                app.again, app.due = False, 0.0
            else:
                app.due = item[2]
            return
        if kind == "event":
            _, _, cid, code, what, when = item
            if app_id not in self.apps:
                if not app_id or what not in ("create", "start") or (self.only and app_id not in self.only):
                    return  # an ended app's containers going away, or not one of ours
                self.over.pop(app_id, None)
                self.apps[app_id] = _Watched(app_id)
            app = self.apps[app_id]
            if what == "die" and code is not None:
                # the daemon sends "die" some 50-90 ms before a snapshot shows the container exited:
                # the next pass takes the event's word for it, and later ones look again every few ms
                app.died[cid] = (code, when)
                app.quick_until = time.time() + DIE_SETTLE_S
        woken = self.apps.get(app_id)
        if woken is not None and woken.busy:
            woken.again = True
        elif woken is not None:
            woken.due = 0.0

    def _sweep(self) -> None:
        """New apps of this home (requests, live containers) and apps whose containers changed in a
        way no event told (a missed stream, a daemon restart)."""
        try:
            live = self.api.containers(all=True, filters={"label": [f"{L_SUBMITTER}={self.me}"], "status": _LIVE})
            self.down_since = None
        except Exception as e:  # noqa: BLE001 - whatever it is, this sweep is skipped and the next one asks again
            if transient(e):
                self.down_since = self.down_since or time.time()
            else:
                _say(f"listing this home's containers failed: {explain(e)}")
            return
        digests: dict[str, list[tuple[str, str]]] = {}
        for c in live:
            digests.setdefault((c.get("Labels") or {}).get(L_APP_ID, ""), []).append((c["Id"], c.get("State", "")))
        requested = requested_apps()
        for app_id in set(digests) | requested | set(self.apps):
            if not app_id:
                continue
            digest = tuple(sorted(digests.get(app_id, [])))
            if app_id in self.over and self.over[app_id] == digest:
                unrequest(app_id)  # asked again by a query that read it just before it ended
                continue
            app = self.apps.get(app_id)
            if app is None:
                self.over.pop(app_id, None)
                self.apps[app_id] = _Watched(app_id, digest=digest)
            elif app.digest != digest:
                app.digest = digest
                self._handle(("wake", app_id))

    def _exit(self) -> bool:
        """Gives the home's lock up, then looks for work once more: a submission hands its app over
        (:func:`request_watch`) before it checks the lock, so either this look finds the app, or the
        submission finds the lock free and starts a new watcher. True: exit now."""
        assert self.lock_fd is not None
        os.close(self.lock_fd)
        self.lock_fd = None
        try:
            live = self.api.containers(all=True, filters={"label": [f"{L_SUBMITTER}={self.me}"], "status": _LIVE})
        except Exception:  # noqa: BLE001 - on the way out: the requested apps alone decide, as when none is live
            live = []
        work = (requested_apps() | {(c.get("Labels") or {}).get(L_APP_ID, "") for c in live}) - set(self.over) - {""}
        if not work:
            _say("nothing left to watch; exiting")
            return True
        fd = try_lock()
        if fd is None:
            _say("another watcher of this home took over; exiting")
            return True
        self.lock_fd = fd
        self._note_holder(fd)
        return False

    def _job(self, app: _Watched, died: dict[str, tuple[int, float]]) -> None:
        """One reconcile of ``app`` (in a worker); puts ("done", app id, next due or None: drop it)."""
        due: Optional[float] = time.time() + 1.0
        try:
            due = self._reconcile(app, died)
            self.down_since = None
        except Exception as e:  # noqa: BLE001 - one app's trouble, whatever it is, never stops the others (below)
            if transient(e):
                if self.down_since is None:
                    _say(f"daemon unavailable, retrying: {e}")
                    self.down_since = time.time()
            else:  # one app's trouble never stops the others: logged, and tried again later
                _say(f"reconciling {app.app_id} failed:\n{traceback.format_exc()}")
                due = time.time() + 5.0
        finally:
            self.queue.put(("done", app.app_id, due))

    def _reconcile(self, app: _Watched, died: dict[str, tuple[int, float]]) -> Optional[float]:
        api, now = self.api, time.time()
        if app.lease is None:
            lease = take_lease(api, app.app_id, self.holder, self.dead)
            if lease is None:
                # held: a submission still in progress, a watcher elsewhere, or one that died without
                # this home's lock (its lease expires): read only, and look again soon
                # (a submission holds it for a moment: said only when it lasts, or by a watcher by hand)
                app.held_since = app.held_since or now
                if (self.only or now - app.held_since > LEASE_TTL_S) and not app.said_held:
                    app.said_held = True
                    _say(f"another watcher holds the lease of {app.app_id}; waiting for it")
                st = reconcile(api, app.app_id, acting=False)
                return None if st is None or st.over else now + POLL_S
            with app.lease_lock:
                app.lease = lease
            if app.said_held:
                _say(f"watching {app.app_id} (lease {lease.holder} from epoch {lease.epoch})")
        if not app.lease.valid_for(ACT_MIN_S):
            return now + 0.2  # renewals fail (daemon away): act on nothing until one succeeds
        status = reconcile(api, app.app_id, acting=True, died=died)
        if status is None or status.over:
            with app.lease_lock:
                app.lease = None
            remove_leases(api, app.app_id)  # nothing left to act on: no lease volumes stay behind
            remove_records(api, app.app_id)  # (nor readiness records: only a live app's engine reads them)
            unrequest(app.app_id)
            _say(f"{app.app_id} is over" if status else f"{app.app_id} is gone")
            return None
        now = time.time()
        if now < app.quick_until:
            return now + DIE_SETTLE_POLL_S
        snap = status.snapshot
        if (snap.verdict is not None or status.probing
                or any(r.status == "created" and not r.started for r in snap.replicas)):
            # stopping, waiting for dependencies, a backoff or a service's readiness (each pass
            # connects once: see readiness): look again soon
            return now + POLL_S
        due = status.next_due  # a restart whose attempts could not be created yet
        return min(now + IDLE_RECHECK_S, max(due, now + POLL_S)) if due is not None else now + IDLE_RECHECK_S


def main(argv: list[str]) -> int:
    """``python -m torchx_ext.schedulers.docker_jobs.watcher [--home HOME] [--lock-fd FD] [--app APP ...]``:
    the watcher of a home (the lock taken by :func:`spawn`, or taken here: it exits if another
    watcher of the home lives), or with ``--app`` one of the named apps of any submitter (recovery
    by hand: it acts on an app only while it holds the app's lease)."""
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--home")
    parser.add_argument("--lock-fd", type=int)
    parser.add_argument("--holder")
    parser.add_argument("--app", action="append", default=[])
    args = parser.parse_args(argv[1:])
    if args.home:
        os.environ["TORCHX_EXT_HOME"] = args.home
    lock_fd = None
    if not args.app:
        lock_fd = args.lock_fd if args.lock_fd is not None else try_lock()
        if lock_fd is None:
            _say("another watcher of this home runs; exiting")
            return 0
    watcher = HomeWatcher(lock_fd, args.app, args.holder)
    _say(f"watching {', '.join(args.app) or 'the apps of ' + watcher.me} (pid {os.getpid()}, lease holder "
         f"{watcher.holder})")
    try:
        return watcher.run()
    except Exception:  # noqa: BLE001 - a detached process: print it to its log and exit non-zero
        # the leases run out, and the next status query of the submitter starts a new watcher
        traceback.print_exc()
        return 1
    finally:
        _say("watcher exits")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
