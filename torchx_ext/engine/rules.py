"""The group rules and every message they write, on plain strings (standard library only).

One copy for every launcher: the host supervisor, the Slurm batch job, the Ray driver (the engine
travels to the cluster inside the driver's package) and the Docker watcher import these.
"""

from __future__ import annotations

import signal
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STATES = ("PENDING", "RUNNING", *TERMINAL)
RETRY_POLICIES = ("REPLICA", "ROLE", "APPLICATION")
BACKOFF_CAP_S = 60.0
MARK_PREFIX = "[torchx-ext] "  # the attempt marker's start, in a replica's stderr
READY_TIMEOUT_S = 300.0  # how long a service may take to accept connections (run option ready_timeout_s)


# ------------------------------------------------------------------------ group state ----
def outcome(role: str, replica_id: int, service: bool, state: str,
            exit_code: Optional[int] = None, reason: str = "") -> Dict[str, Any]:
    """One replica's outcome as :func:`group_state` reads it."""
    return {"role": role, "replica_id": replica_id, "service": service, "state": state,
            "exit_code": exit_code, "reason": reason}


def group_state(outcomes: Sequence[Mapping[str, Any]]) -> Tuple[str, str]:
    """(state, message) of a group from its replicas' outcomes.

    * any non-service replica FAILED: FAILED, naming it;
    * else any non-service replica CANCELLED: CANCELLED, naming it;
    * every non-service replica SUCCEEDED: SUCCEEDED (the launcher then stops the services);
    * a service that ended while a non-service replica has not: FAILED, naming it;
    * otherwise RUNNING if anything runs, else PENDING.
    """
    main = [o for o in outcomes if not o["service"]]
    services = [o for o in outcomes if o["service"]]
    for o in main:
        if o["state"] == "FAILED":
            return "FAILED", failure_message(o, "role")
    for o in main:
        if o["state"] == "CANCELLED":
            return "CANCELLED", f"{replica_name(o['role'], o['replica_id'])} was cancelled"
    if main and all(o["state"] == "SUCCEEDED" for o in main):
        return "SUCCEEDED", ""
    for o in services:
        if o["state"] in TERMINAL:
            return "FAILED", failure_message(o, "service role", early=True)
    if any(o["state"] == "RUNNING" for o in outcomes):
        return "RUNNING", ""
    return "PENDING", ""


def failure_message(o: Mapping[str, Any], kind: str, early: bool = False) -> str:
    """``role 'a' replica 0 failed with exit code 3: after 3 attempts (...)``."""
    what = "ended early" if early else "failed"
    code = f" with {exit_description(o['exit_code'])}" if o.get("exit_code") is not None else ""
    reason = f": {o['reason']}" if o.get("reason") else ""
    return f"{kind} '{o['role']}' replica {o['replica_id']} {what}{code}{reason}"


def replica_name(role: str, replica_id: int) -> str:
    return f"role '{role}' replica {replica_id}"


# ---------------------------------------------------------------------------- retries ----
def retry_policy_name(policy: Any) -> str:
    """A ``RetryPolicy`` by value (``"ROLE"`` also on torchx 0.7.0, whose enum lacks it)."""
    return str(getattr(policy, "value", policy)).upper()


def retry_unit(policy: str, role: str, replica_id: int) -> str:
    """What a restart budget counts for ``policy``: one replica, one role, or the whole app."""
    if policy == "REPLICA":
        return f"replica:{role}/{replica_id}"
    return f"role:{role}" if policy == "ROLE" else "app"


def restart_scope(policy: str, role: str, replica_id: int,
                  replicas: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
    """The (role, replica id) pairs that restart together when ``role``/``replica_id`` fails."""
    if policy == "REPLICA":
        return [(role, replica_id)]
    if policy == "ROLE":
        return [r for r in replicas if r[0] == role]
    return list(replicas)


def wants_restart(service: bool, exit_code: Optional[int]) -> bool:
    """Does an ended replica ask for a restart (budget permitting)? A failure does; so does a
    service ending at all, since a service is meant to run until the others are done."""
    return service or exit_code != 0


def backoff_s(base_s: float, attempt: int) -> float:
    """Delay before restart number ``attempt`` (1, 2, ...) of a unit: ``base_s`` doubled each
    time, capped at BACKOFF_CAP_S; 0 restarts at once."""
    return min(base_s * 2 ** (attempt - 1), BACKOFF_CAP_S) if base_s > 0 else 0.0


# --------------------------------------------------------------------------- messages ----
def exit_description(exit_code: Optional[int]) -> str:
    """``"exit code 1"``, or ``"signal SIGKILL"`` for a negative (Popen-style) code."""
    if exit_code is not None and exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def ended_description(exit_code: Optional[int], lost: str = "", how: str = "") -> str:
    """How an attempt ended, as a restart names it: ``ended with exit code 3``, ``ended with
    signal SIGKILL``, ``ended with OOMKilled`` (``how``, a launcher's own word) or, for a replica
    lost with its node or worker, ``ended: <why>``."""
    if lost:
        return f"ended: {lost}"
    return f"ended with {how or exit_description(exit_code)}"


def restart_why(role: str, replica_id: int, ended: str, policy: str, number: int, max_retries: int) -> str:
    """``role 'a' replica 0 ended with exit code 3; REPLICA policy, restart 1 of 2``."""
    return f"{replica_name(role, replica_id)} {ended}; {policy} policy, restart {number} of {max_retries}"


def attempt_marker(attempt: int, role: str, replica_id: int, why: str) -> str:
    """The line a restarted replica's stderr gets before its new attempt (no newline)."""
    return f"{MARK_PREFIX}attempt {attempt} of {replica_name(role, replica_id)} begins: {why}"


def exhausted_reason(attempts: int, policy: str, max_retries: int) -> str:
    """What a failed replica's message adds once its budget is spent."""
    return f"after {attempts} attempts ({policy} policy, max_retries={max_retries})"


def start_failed_message(role: str, replica_id: int, error: str, attempt: int) -> str:
    """The verdict of a replica that could not start: the first attempt stops the group (all or
    nothing); a restart that cannot start fails the app."""
    if attempt <= 1:
        return (f"{replica_name(role, replica_id)} failed to start: {error}; "
                "the group was stopped (all or nothing)")
    return f"{replica_name(role, replica_id)} failed to restart: {error}"


def not_ready_reason(ports: Sequence[int], timeout_s: float) -> str:
    """Why a service failed its readiness: ``port 8000 did not accept connections within 300 s``."""
    which = f"port {ports[0]}" if len(ports) == 1 else "ports " + ", ".join(str(p) for p in ports)
    return (f"{which} did not accept connections within {timeout_s:g} s "
            "(run option ready_timeout_s); the other roles were not started")


def not_ready_message(role: str, replica_id: int, reason: str) -> str:
    """The verdict of a service that was not ready in time."""
    return f"service role '{role}' replica {replica_id} was not ready: {reason}"


CANCELLED_BY_USER = "cancelled by user"
CANCELLED_BEFORE_START = "cancelled before start"
CANCELLED_WAITING = "cancelled while waiting for dependencies"
