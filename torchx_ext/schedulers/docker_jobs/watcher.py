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
it by a request file (:func:`request_watch`: by ``schedule`` and by healing, so an app whose
containers all exited before its verdict was pinned is found too). One stream of the daemon's
container events for the whole home wakes an app at once when one of its containers is created,
started, dies or is removed; an app waiting for dependencies or a backoff, or stopping, is looked
at every :data:`POLL_S`, any other every :data:`IDLE_RECHECK_S` and whenever the listing shows a
change. Reconciles run in a pool of workers, one at a time per app, so an app whose containers take
their stop timeout to stop never delays another's restart.

**One watcher per home**: a lock file (``flock``) held for the watcher's life; the kernel frees it
when the watcher dies, so "is it alive?" is one non-blocking ``flock``. :func:`spawn` takes the lock
and hands it to the child: of concurrent callers only one starts a watcher. A watcher with nothing
left gives the lock up, then looks for work once more; a submission requests its app before it
checks the lock, so an app is never left between a watcher that exits and one that is not started.

**One acting watcher per app, wherever status is asked from**: the lease of
:mod:`.lease`, held on the daemon, one per app (the watcher renews all of its leases
from one thread). A submission holds its app's lease while it creates and starts the group, then
passes it to the watcher's holder name (:func:`hand_over`), which the watcher adopts: there is no
instant at which another could take it. The lock file lists the lease holders of the home's
earlier watchers: holding the lock proves them dead, so a new watcher takes their apps' leases at
once instead of waiting for them to expire.

**Healing.** While an app is not over, a status query of its submitter (same user, machine and
home) hands it to the home's watcher and starts the watcher if none lives
(:func:`ensure_watcher`, logged); other users' apps on a shared daemon are only read.

An app counts as ended only once none of its containers runs: a verdict with containers still
stopping is reported as RUNNING with a "stopping" message.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import logging
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torchx_ext import state
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
    transfer,
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


# --------------------------------------------------------------------------- watcher ------
MODULE = "torchx_ext.schedulers.docker_jobs.watcher"
SWEEP_S = 1.0  # how often the home's live containers and requests are listed (new apps, missed changes)
IDLE_RECHECK_S = 30.0  # an app with nothing pending is reconciled at least this often (a safety net)
IDLE_EXIT_S = 3.0  # with nothing to watch for this long, the watcher exits
WORKERS = 16  # reconciles at once (a stop blocks its worker up to the app's stop timeout)
_LIVE = ["created", "running", "restarting", "paused"]
_EVENTS = ["create", "start", "die", "destroy"]


def daemon_key() -> str:
    """This machine and daemon, as part of a file name: one watcher per (daemon, user, home) and
    machine (a home on a shared file system is watched from each machine for its own apps)."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    machine = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
    return f"{machine}-{hashlib.sha1(host.encode()).hexdigest()[:10]}"


def lock_path() -> str:
    # flock'ed by the living watcher; its lines name the lease holders of the watchers so far
    return state.scheduler_dir(SCHEDULER, f"watcher-{daemon_key()}.lock")


def log_path() -> str:
    # diagnostics only (tracebacks of the watcher); never read back: the daemon is the truth
    return state.scheduler_dir(SCHEDULER, f"watcher-{daemon_key()}.log")


def requests_dir() -> str:
    """One empty file per app handed to the watcher (by submit and by healing), removed once it is over."""
    return state.scheduler_dir(SCHEDULER, f"watching-{daemon_key()}")


def request_watch(app_id: str) -> None:
    """Hands ``app_id`` to this home's watcher (before :func:`spawn`: see :meth:`HomeWatcher._exit`)."""
    path = os.path.join(requests_dir(), app_id)
    if not os.path.exists(path):
        state.makedirs(requests_dir())
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _requested() -> set[str]:
    try:
        return {n for n in os.listdir(requests_dir()) if state.is_plain_name(n)}
    except FileNotFoundError:
        return set()


def unrequest(app_id: str) -> None:
    """Takes ``app_id`` back from this home's watcher (over, or deleted)."""
    try:
        os.remove(os.path.join(requests_dir(), app_id))
    except FileNotFoundError:
        pass


def _try_lock() -> Optional[int]:
    """The home watcher's lock (an fd holding it), or None while a living watcher holds it."""
    state.makedirs(state.scheduler_dir(SCHEDULER))
    fd = os.open(lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def watcher_running() -> bool:
    """Does a watcher of this home (and daemon) live? The kernel frees its lock when it dies."""
    fd = _try_lock()
    if fd is not None:
        os.close(fd)
    return fd is None


def _holders(fd: int) -> list[str]:
    with os.fdopen(os.dup(fd), "r") as f:
        f.seek(0)
        return [x.strip() for x in f.read().splitlines() if x.strip()]


def _write_holders(fd: int, names: list[str]) -> None:
    with os.fdopen(os.dup(fd), "r+") as f:
        f.seek(0)
        f.truncate()
        f.write("\n".join(list(dict.fromkeys(names))[-16:]) + "\n")


def current_holder() -> str:
    """The lease holder of this home's watcher: the last name written to the lock file (by the
    living watcher, or by a dead one, whose successor then takes its leases at once)."""
    try:
        with open(lock_path()) as f:
            names = [x.strip() for x in f.read().splitlines() if x.strip()]
    except FileNotFoundError:
        return ""
    return names[-1] if names else ""


def spawn(holder: Optional[str] = None) -> bool:
    """Starts this home's detached watcher, holding leases as ``holder``, unless one lives; True if
    one was started. The lock is taken here and handed to the child, so that concurrent callers start
    one watcher between them, and the holder is written at once (see :func:`current_holder`)."""
    fd = _try_lock()
    if fd is None:
        return False
    holder = holder or new_holder("watcher")
    try:
        _write_holders(fd, [*_holders(fd), holder])
        if os.path.exists(log_path()) and os.path.getsize(log_path()) > 4 << 20:
            os.replace(log_path(), log_path() + ".1")
        # the log can hold a traceback with Role.env values: private from its creation
        log = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            subprocess.Popen(
                [sys.executable, "-m", MODULE, "--home", os.path.realpath(state.home()), "--holder", holder,
                 "--lock-fd", str(fd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                pass_fds=(fd,),
            )
        finally:
            os.close(log)
    finally:
        os.close(fd)  # the child holds the lock now (flock belongs to the open file, shared)
    return True


def hand_over(api: Any, lease: Lease) -> None:
    """Gives a submitted app to this home's watcher (started if none lives): the app is requested
    before the watcher's lock is checked (see :meth:`HomeWatcher._exit`), then the lease the
    submission held while it acted passes straight to the watcher's holder name (no instant where
    another could take it); the watcher adopts it. If it cannot pass (the lease ran out), it is
    freed for the watcher to take."""
    request_watch(lease.app_id)
    holder = new_holder("watcher")  # its pid is not known yet: the watcher's log names both
    if not spawn(holder):
        holder = current_holder()
    if not holder or not transfer(api, lease, holder):
        remove_leases(api, lease.app_id)


def ensure_watcher(status: AppStatus) -> bool:
    """The one place a status query may act: hands an app of this caller's (same user, machine and
    home) that is not over to this home's watcher, and starts the watcher if none lives. Other apps
    on the daemon are only read. Best effort: True if a watcher was started."""
    snap = status.snapshot
    if status.over or not snap.submitter or snap.submitter != submitter():
        return False
    try:
        request_watch(snap.app_id)
        if not spawn():
            return False
    except OSError as e:  # healing is best effort: the state was read already; the next query retries
        logger.warning("docker_jobs: could not start the watcher of %s: %s", snap.app_id, e)
        return False
    logger.warning("docker_jobs: the watcher of this home was not running; started a new one for %s and "
                   "the home's other apps (log: %s)", snap.app_id, log_path())
    return True


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
        names = _holders(fd)
        self.dead = set(names) - {self.holder}
        _write_holders(fd, [*[n for n in names if n != self.holder], self.holder])

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
        requested = _requested()
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
        work = (_requested() | {(c.get("Labels") or {}).get(L_APP_ID, "") for c in live}) - set(self.over) - {""}
        if not work:
            _say("nothing left to watch; exiting")
            return True
        fd = _try_lock()
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
            unrequest(app.app_id)
            _say(f"{app.app_id} is over" if status else f"{app.app_id} is gone")
            return None
        now = time.time()
        if now < app.quick_until:
            return now + DIE_SETTLE_POLL_S
        snap = status.snapshot
        if snap.verdict is not None or any(r.status == "created" and not r.started for r in snap.replicas):
            return now + POLL_S  # stopping, waiting for dependencies or a backoff: look again soon
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
        lock_fd = args.lock_fd if args.lock_fd is not None else _try_lock()
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
