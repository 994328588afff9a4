"""Finding and starting a home's ``docker_jobs`` watcher (:mod:`.watcher`): its lock file (the
kernel frees it when the watcher dies), the apps handed to it (request files), the lease holder
name it acts as, and the one place a status query may start it. Used by the scheduler, the watcher
and the tests; the watcher's loop itself is :class:`.watcher.HomeWatcher`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
from typing import Any, Optional

from torchx_ext import state
from torchx_ext.schedulers.docker_jobs.daemon import (
    SCHEDULER,
    submitter,
)

# re-exported: docker_jobs (schedule, describe) reaches them as the watcher's
from torchx_ext.schedulers.docker_jobs.launcher import AppStatus as AppStatus
from torchx_ext.schedulers.docker_jobs.launcher import reconcile as reconcile
from torchx_ext.schedulers.docker_jobs.launcher import start_group as start_group
from torchx_ext.schedulers.docker_jobs.lease import (
    Lease,
    new_holder,
    remove_leases,
    transfer,
)

logger = logging.getLogger(__name__)

MODULE = "torchx_ext.schedulers.docker_jobs.watcher"
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


def requested_apps() -> set[str]:
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


def try_lock() -> Optional[int]:
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
    fd = try_lock()
    if fd is not None:
        os.close(fd)
    return fd is None


def holders(fd: int) -> list[str]:
    with os.fdopen(os.dup(fd), "r") as f:
        f.seek(0)
        return [x.strip() for x in f.read().splitlines() if x.strip()]


def write_holders(fd: int, names: list[str]) -> None:
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
    fd = try_lock()
    if fd is None:
        return False
    holder = holder or new_holder("watcher")
    try:
        write_holders(fd, [*holders(fd), holder])
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
