"""Which processes are a ``host`` app's, proven rather than assumed.

A pid alone is not an identity: once a process is reaped (or the machine reboots) the kernel
hands its number to another process, the user's shell or another user's daemon. So every process
host records (the supervisor, each replica's group leader) is recorded as (pid, start time in
clock ticks after boot from /proc/<pid>/stat field 22, boot id), checked right before any signal.
Processes a replica started are found by the token in their environment (``TOKEN_ENV``).
Shared by the scheduler (status, cancel) and the supervisor; reads only /proc.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Mapping, Optional

# A pid alone is not an identity: once a process is reaped (or the machine reboots) the kernel
# hands its number to another process, the user's shell or another user's daemon. So every process
# host records (the supervisor, each replica's group leader) is recorded as (pid, start time in
# clock ticks after boot from /proc/<pid>/stat field 22, boot id), checked right before any signal.
# In state.json: ``supervisor_pid``/``supervisor_start``, each replica's ``pid``/``start``, and one
# ``boot_id`` for the app (a reboot ends all its processes at once).
Identity = Mapping[str, Any]  # {"pid": int, "start": int, "boot": str}


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state letter, process group, start ticks) of ``pid`` from /proc, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # the command name (field 2) may hold spaces and parentheses: split after its last ")"
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int) -> Optional[dict[str, Any]]:
    """The identity of the process ``pid`` now (a zombie included), or None if there is none."""
    st = _stat(pid)
    return None if st is None else {"pid": pid, "start": st[2], "boot": boot_id()}


def supervisor_of(record: Mapping[str, Any]) -> Identity:
    return {"pid": record.get("supervisor_pid"), "start": record.get("supervisor_start"),
            "boot": record.get("boot_id")}


def replica_of(record: Mapping[str, Any], replica: Mapping[str, Any]) -> Identity:
    return {"pid": replica.get("pid"), "start": replica.get("start"), "boot": record.get("boot_id")}


def same_process(ident: Identity) -> bool:
    """Is the recorded process still the one holding its pid? A zombie is (its pid, and a group
    it leads, cannot be reused before it is reaped); a record without a start time never is."""
    pid, start, boot = ident.get("pid"), ident.get("start"), ident.get("boot")
    if not isinstance(pid, int) or pid <= 0 or start is None or not boot or boot != boot_id():
        return False
    st = _stat(pid)
    return st is not None and st[2] == start


def running(ident: Identity) -> bool:
    """The recorded process is still that process and has not exited (a zombie has)."""
    st = _stat(ident["pid"]) if same_process(ident) else None
    return st is not None and st[0] != "Z"


def signal_process(ident: Identity, sig: int) -> bool:
    """Sends ``sig`` to the recorded process if it is still that process; True if sent. A process
    that is gone or not the user's any more is no error (cancel must not fail for good on it)."""
    if not same_process(ident):
        return False
    try:
        os.kill(ident["pid"], sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def signal_group(leader: Identity, sig: int, token: str) -> bool:
    """Sends ``sig`` to the process group of a replica whose recorded ``leader`` started it, only
    while the group provably is that replica's: its leader is still that process, or (the leader
    reaped) a member still carries the replica's ``token``. A group number can be reused only once
    the group is empty, so either proof holds until the signal lands."""
    pgid = leader.get("pid")
    if not isinstance(pgid, int) or pgid <= 0:
        return False
    if not same_process(leader) and not any(g == pgid for _, g in marked({token})):
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def pid_alive(pid: Optional[int]) -> bool:
    """Some process, not a zombie, holds ``pid`` (whichever it is: use :func:`running` to decide)."""
    st = _stat(pid) if pid else None
    return st is not None and st[0] != "Z"


# A replica's descendants can leave its process group (setsid, a daemon's double fork), so the
# group kill misses them. Each replica's environment carries a token naming it; what still carries
# it once the group is gone is killed too (a process cannot drop an inherited environment unasked).
TOKEN_ENV = "TORCHX_EXT_REPLICA_TOKEN"


def replica_token(app_dir: str, role: str, replica_id: int) -> str:
    # derived, not recorded: a cancel finds a replica's processes even if the supervisor died
    # before writing anything about it
    return f"host/{os.path.basename(os.path.normpath(app_dir))}/{role}/{replica_id}"


def marked(tokens: set[str]) -> list[tuple[Identity, int]]:
    """(identity, process group) of each live process whose environment holds
    ``TORCHX_EXT_REPLICA_TOKEN=<one of tokens>``. The identity is read before the environment: if
    the pid changed hands in between, the identity no longer matches and nothing is signalled."""
    marks = [f"{TOKEN_ENV}={t}".encode() for t in tokens]
    found: list[tuple[Identity, int]] = []
    boot = boot_id()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        st = _stat(int(entry))
        if st is None or st[0] == "Z":
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue  # gone, or another user's
        if any(m in environ for m in marks):
            found.append(({"pid": int(entry), "start": st[2], "boot": boot}, st[1]))
    return found


def marked_pids(tokens: set[str]) -> list[int]:
    """Live pids whose environment holds ``TORCHX_EXT_REPLICA_TOKEN=<one of tokens>``."""
    return [ident["pid"] for ident, _ in marked(tokens)]


def kill_marked(tokens: set[str]) -> None:
    """SIGKILLs every process carrying one of ``tokens``, until none is left (bounded)."""
    for _ in range(50):
        found = marked(tokens)
        if not found:
            return
        for ident, _ in found:
            signal_process(ident, signal.SIGKILL)
        time.sleep(0.02)
