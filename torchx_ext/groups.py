"""Heterogeneous group semantics shared by every torchx-ext scheduler.

A multi-role AppDef is a *group*. Every scheduler of ours implements the same contract:

* **all or nothing**: if any role fails to start, the others are stopped and the app fails
  with the reason;
* **discovery**: every replica gets ``TORCHX_EXT_APP_ID``, ``TORCHX_EXT_ROLE``,
  ``TORCHX_EXT_REPLICA_ID``, ``TORCHX_EXT_NUM_REPLICAS`` and, for each role R of the app,
  ``TORCHX_EXT_HOSTS_<R>`` (comma-separated hosts of R's replicas in replica order; R upper-cased,
  non-alphanumerics as ``_``);
* **services**: a role marked with :func:`mark_service` runs next to the others; the app ends when
  all non-service roles have ended, services are then stopped, and the app's final state is the
  non-service roles' (a service that ends early fails the app, naming it);
* **dependencies**: apps listed in the ``dependencies`` run option must SUCCEED first (afterok);
  a failed or cancelled dependency fails the dependent with a message naming it.

This module holds the pure parts (validation, env names, final-state rules) so each backend
module only maps them onto its engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from torchx.specs import AppDef, AppState, Role

from torchx_ext.engine import rules
from torchx_ext.errors import InvalidAppError

SERVICE_KEY = "torchx_ext/service"

ENV_APP_ID = "TORCHX_EXT_APP_ID"
ENV_ROLE = "TORCHX_EXT_ROLE"
ENV_REPLICA_ID = "TORCHX_EXT_REPLICA_ID"
ENV_NUM_REPLICAS = "TORCHX_EXT_NUM_REPLICAS"
ENV_HOSTS_PREFIX = "TORCHX_EXT_HOSTS_"
ENV_ATTEMPT = "TORCHX_EXT_ATTEMPT"  # 1, then 2, ... on each restart (Role.max_retries)

_ENV_NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: a trailing newline is not a name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def mark_service(role: Role, service: bool = True) -> Role:
    """Marks ``role`` as a service of its group (kept in ``role.metadata``); returns it."""
    role.metadata[SERVICE_KEY] = bool(service)
    return role


def is_service(role: Role) -> bool:
    return bool(role.metadata.get(SERVICE_KEY, False))


def service_ports(role: Role) -> tuple[int, ...]:
    """The ports the group engine waits on before it starts the other roles (see :func:`ports_waited_on`)."""
    return ports_waited_on(is_service(role), role.port_map)


def ports_waited_on(service: bool, port_map: Mapping[str, Any]) -> tuple[int, ...]:
    """The rule of :func:`service_ports`, for a role known only by what a backend recorded of it
    (docker_jobs' role summary): a service role's ``port_map`` ports, sorted, each once; none for
    any other role.

    Args:
        service: whether the role is a service (:func:`mark_service`).
        port_map: the role's ``port_map`` (name -> port; a port may be recorded as text).
    """
    return tuple(sorted({int(p) for p in port_map.values()})) if service else ()


def role_env_suffix(role_name: str) -> str:
    """``"vllm-server"`` → ``"VLLM_SERVER"``."""
    return re.sub(r"[^A-Za-z0-9]", "_", role_name).upper()


def hosts_env_name(role_name: str) -> str:
    return ENV_HOSTS_PREFIX + role_env_suffix(role_name)


def discovery_env(
    app_id: str,
    role_name: str,
    replica_id: int,
    num_replicas: int,
    hosts_by_role: Mapping[str, Sequence[str]],
) -> dict[str, str]:
    """The discovery variables of one replica, given every role's hosts in replica order."""
    env = {
        ENV_APP_ID: app_id,
        ENV_ROLE: role_name,
        ENV_REPLICA_ID: str(replica_id),
        ENV_NUM_REPLICAS: str(num_replicas),
    }
    for name, hosts in hosts_by_role.items():
        env[hosts_env_name(name)] = ",".join(hosts)
    return env


def validate_app(app: AppDef) -> None:
    """Raises :class:`InvalidAppError` with every problem found, one per line."""
    problems: list[str] = []
    if not app.roles:
        problems.append("the app has no roles")
    seen: dict[str, str] = {}
    for i, role in enumerate(app.roles):
        label = f"role[{i}] '{role.name}'"
        if not role.name:
            problems.append(f"role[{i}] has an empty name")
        suffix = role_env_suffix(role.name)
        if suffix in seen and seen[suffix] != role.name:
            problems.append(
                f"{label} and role '{seen[suffix]}' both map to {hosts_env_name(role.name)}; "
                "rename one"
            )
        elif role.name in seen.values():
            problems.append(f"{label}: role names must be unique")
        seen[suffix] = role.name
        if role.name in (".", "..") or any(c in role.name for c in "/\\") or _CONTROL.search(role.name):
            problems.append(f"{label}: a role name is data, not a path: no '/', '\\', control characters, "
                            "'.' or '..'")
        if not role.entrypoint:
            problems.append(f"{label} has no entrypoint")
        if role.num_replicas < 1:
            problems.append(f"{label} has num_replicas={role.num_replicas}; it must be >= 1")
        for key, value in role.env.items():
            if not _ENV_NAME_OK.fullmatch(key):
                problems.append(f"{label} has an invalid environment variable name {key!r} "
                                "(letters, digits and '_', not starting with a digit)")
            elif "\0" in str(value):
                problems.append(f"{label}: the value of {key} holds a NUL byte, which no process can receive")
        for what, word in [("entrypoint", role.entrypoint), *((f"args[{i}]", a) for i, a in enumerate(role.args))]:
            if "\0" in str(word):
                problems.append(f"{label}: {what} holds a NUL byte, which no process can receive")
    if app.roles and all(is_service(r) for r in app.roles):
        problems.append("every role is a service; at least one role must not be a service")
    if problems:
        raise InvalidAppError(f"invalid AppDef '{app.name}':\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class ReplicaOutcome:
    """What a backend observed about one replica, for :func:`group_state`."""

    role: str
    replica_id: int
    service: bool
    state: AppState
    exit_code: Optional[int] = None
    reason: str = ""


def group_state(outcomes: Sequence[ReplicaOutcome]) -> tuple[AppState, str]:
    """The app's state and message from its replicas, by the group rules of
    :func:`torchx_ext.engine.rules.group_state` (written once, there):

    * any non-service replica FAILED → FAILED (naming it);
    * a service that ended while a non-service replica is still running → FAILED (naming it);
    * all non-service replicas SUCCEEDED → SUCCEEDED (services are then stopped by the backend);
    * otherwise RUNNING/PENDING.
    """
    st, msg = rules.group_state([rules.outcome(o.role, o.replica_id, o.service, o.state.name, o.exit_code, o.reason)
                                 for o in outcomes])
    return AppState[st], msg


def app_handle_id(handle_or_id: str) -> str:
    """``"host://session/app-123"`` → ``"app-123"``; a bare id is returned unchanged."""
    if "://" in handle_or_id:
        return handle_or_id.split("://", 1)[1].split("/", 1)[-1]
    return handle_or_id


def handle_scheduler(handle_or_id: str) -> Optional[str]:
    return handle_or_id.split("://", 1)[0] if "://" in handle_or_id else None
