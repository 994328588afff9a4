"""What a ``docker_jobs`` submission asks: its run options (:class:`DockerJobsExecutor`), the request a
dry-run prints and ``schedule`` performs (:class:`DockerRequest`, a :class:`ContainerRequest` per
replica), and the container options made of them."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torchx.schedulers.devices import get_device_mounts
from torchx.specs import AppDef, BindMount, DeviceMount, Role, VolumeMount

from torchx_ext.errors import InvalidAppError, InvalidOptionError
from torchx_ext.executors import GROUP_CAPABILITIES, Executor, option, ready_timeout_option, retry_backoff_option
from torchx_ext.schedulers.docker_jobs import daemon as d

SCHEDULER = d.SCHEDULER
PULL_POLICIES = ("never", "if-not-present", "always")
WORKSPACE_KEY = "torchx_ext.docker_jobs.workspace"  # Role.metadata: the workspace to build on its image
_EXTRA_HOST = re.compile(r"^[^:\s]+:\S+$")


@dataclass
class DockerJobsExecutor(Executor):
    """Run options of the ``docker_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = GROUP_CAPABILITIES

    pull_policy: str = option(
        "if-not-present", help="when to pull role images: never | if-not-present | always "
        "(default: never pull an image that is present locally)"
    )
    network_mode: Optional[str] = option(
        None, help="default: a new network per app (replicas reach each other by name); "
        "'host', 'none', or the name of an existing network"
    )
    privileged: bool = option(False, help="run the containers privileged")
    user: Optional[str] = option(None, help="user (name|uid[:group|gid]) the commands run as")
    shm_size: Optional[str] = option(None, help="size of /dev/shm, e.g. '1g' (Docker's default: 64m)")
    tmpfs: Optional[list[str]] = option(
        None, help="tmpfs mounts for every container: PATH or PATH:OPTIONS (e.g. /scratch:size=64m)"
    )
    extra_hosts: Optional[list[str]] = option(None, help="extra /etc/hosts entries: HOST:IP")
    copy_env: Optional[list[str]] = option(
        None, help="glob patterns of variables copied from the submitting environment when the "
        "role does not set them (values are read at submission, never shown in dry-runs)"
    )
    init: bool = option(True, help="run an init process (docker --init) that forwards signals and reaps zombies")
    stop_timeout: int = option(10, help="seconds between SIGTERM and SIGKILL when containers are stopped")
    publish_host: str = option(
        "127.0.0.1", help="address on which the ports of Role.port_map are published, each at a free host port "
        "that describe shows (0.0.0.0: every interface)")
    retry_backoff_s: float = retry_backoff_option()
    ready_timeout_s: float = ready_timeout_option()


@dataclass
class ContainerRequest:
    """One replica's container, as it will be created."""

    name: str
    role: str
    replica_id: int
    service: bool
    image: str
    command: list[str]
    env: dict[str, str]
    hostname: Optional[str]
    aliases: list[str]
    labels: dict[str, str]
    nano_cpus: Optional[int] = None
    mem_limit: Optional[str] = None
    gpus: int = 0
    mounts: list[dict[str, Any]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # Role.port_map: name -> container port


@dataclass
class DockerRequest:
    """What ``schedule`` performs; its JSON is what ``--dryrun`` prints."""

    app_id: str
    network: Optional[str]  # the network created for this app (None with host/none/existing)
    network_mode: str
    pull_policy: str
    dependencies: list[str]
    copy_env: list[str]
    host: dict[str, Any]  # options shared by every container (privileged, user, shm_size, ...)
    labels: dict[str, str]  # the app's labels (network, verdict)
    containers: list[ContainerRequest] = field(default_factory=list)
    # workspace builds ``schedule`` performs first: role name -> {"image": base image, "workspace": ...}
    builds: dict[str, dict[str, str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def dns_name(role_name: str) -> str:
    """A role's name as a DNS label: ``"Model_Server"`` → ``"model-server"``."""
    return re.sub(r"[^a-z0-9-]", "-", role_name.lower()).strip("-") or "role"


def container_mounts(role: Role) -> tuple[list[dict[str, Any]], list[str]]:
    mounts: list[dict[str, Any]] = []
    devices: list[str] = []
    for m in [*role.mounts, *get_device_mounts(dict(role.resource.devices or {}))]:
        if isinstance(m, BindMount):
            mounts.append({"type": "bind", "source": m.src_path, "target": m.dst_path, "read_only": m.read_only})
        elif isinstance(m, VolumeMount):
            mounts.append({"type": "volume", "source": m.src, "target": m.dst_path, "read_only": m.read_only})
        elif isinstance(m, DeviceMount):
            devices.append(f"{m.src_path}:{m.dst_path}:{m.permissions}")
        else:
            raise InvalidAppError(f"role '{role.name}': unsupported mount {m!r}; valid: BindMount, "
                                  "VolumeMount, DeviceMount")
    return mounts, devices


def host_options(ex: DockerJobsExecutor, app: AppDef) -> dict[str, Any]:
    """Validated container options shared by every replica (one clear error per bad option)."""
    if ex.pull_policy not in PULL_POLICIES:  # checked here so that --dryrun rejects it too
        raise InvalidOptionError(f"pull_policy={ex.pull_policy!r}; valid: {', '.join(PULL_POLICIES)}")
    tmpfs: dict[str, str] = {}
    for item in ex.tmpfs or []:
        path, _, opts = item.partition(":")
        if not path.startswith("/"):
            raise InvalidOptionError(f"tmpfs {item!r}: expected an absolute PATH or PATH:OPTIONS")
        tmpfs[path] = opts
    for item in ex.extra_hosts or []:
        if not _EXTRA_HOST.match(item):
            raise InvalidOptionError(f"extra_hosts {item!r}: expected HOST:IP")
    if ex.stop_timeout < 0:
        raise InvalidOptionError(f"stop_timeout={ex.stop_timeout}; it must be >= 0")
    if (ex.network_mode or "").strip() == "none" and any(r.port_map for r in app.roles):
        raise InvalidAppError("Role.port_map needs a network to publish on; network_mode=none has none")
    return {
        "privileged": ex.privileged, "user": ex.user or None, "shm_size": ex.shm_size or None, "tmpfs": tmpfs,
        "extra_hosts": ex.extra_hosts or [], "init": ex.init, "stop_timeout": ex.stop_timeout,
        "publish_host": ex.publish_host,
    }
