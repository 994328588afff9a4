"""The group rules on plain strings (the cluster side cannot import torchx).

Kept identical to :func:`torchx_ext.groups.group_state`; ``tests/test_ray_jobs_unit.py`` checks
the two agree on every combination of replica states.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def outcome(role: str, replica_id: int, service: bool, state: str,
            exit_code: Optional[int] = None, reason: str = "") -> Dict[str, Any]:
    return {"role": role, "replica_id": replica_id, "service": service, "state": state,
            "exit_code": exit_code, "reason": reason}


def group_state(outcomes: List[Dict[str, Any]]) -> Tuple[str, str]:
    """(state, message) of a group from its replicas' outcomes (see torchx_ext.groups)."""
    main = [o for o in outcomes if not o["service"]]
    services = [o for o in outcomes if o["service"]]
    for o in main:
        if o["state"] == "FAILED":
            return "FAILED", _failure(o, "role")
    for o in main:
        if o["state"] == "CANCELLED":
            return "CANCELLED", f"role '{o['role']}' replica {o['replica_id']} was cancelled"
    if main and all(o["state"] == "SUCCEEDED" for o in main):
        return "SUCCEEDED", ""
    for o in services:
        if o["state"] in TERMINAL:
            return "FAILED", _failure(o, "service role", early=True)
    if any(o["state"] == "RUNNING" for o in outcomes):
        return "RUNNING", ""
    return "PENDING", ""


def _failure(o: Dict[str, Any], kind: str, early: bool = False) -> str:
    what = "ended early" if early else "failed"
    code = f" with {exit_description(o['exit_code'])}" if o.get("exit_code") is not None else ""
    reason = f": {o['reason']}" if o.get("reason") else ""
    return f"{kind} '{o['role']}' replica {o['replica_id']} {what}{code}{reason}"


# ---------------------------------------------------------------------- retries -------
RETRY_POLICIES = ("REPLICA", "ROLE", "APPLICATION")
BACKOFF_CAP_S = 60.0


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


def exit_description(exit_code: Optional[int]) -> str:
    """``"exit code 1"``, or ``"signal SIGKILL"`` for a negative (Popen-style) code."""
    if exit_code is not None and exit_code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"
