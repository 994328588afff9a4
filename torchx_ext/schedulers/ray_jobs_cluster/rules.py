"""The group rules on plain strings (the cluster side cannot import torchx).

Kept identical to :func:`torchx_ext.groups.group_state`; ``tests/test_ray_jobs_unit.py`` checks
the two agree on every combination of replica states.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

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
    code = f" with exit code {o['exit_code']}" if o.get("exit_code") is not None else ""
    reason = f": {o['reason']}" if o.get("reason") else ""
    return f"{kind} '{o['role']}' replica {o['replica_id']} {what}{code}{reason}"
