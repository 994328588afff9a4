"""What a ``host`` submission asks: its run options (:class:`HostExecutor`) and the request a dry-run
prints and ``schedule`` performs (:class:`HostRequest`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torchx_ext.engine.rules import READY_TIMEOUT_S
from torchx_ext.executors import GROUP_CAPABILITIES, Executor, option, ready_timeout_option, retry_backoff_option

SCHEDULER = "host"
LOOPBACK = "127.0.0.1"
# Role.metadata key of a workspace copy planned by build_workspace_and_update_role: a dry-run
# only plans it ({"source": ..., "target": ...}); schedule performs it
WORKSPACE_COPY_KEY = "torchx_ext/workspace_copy"


@dataclass
class HostExecutor(Executor):
    """Run options of the ``host`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = GROUP_CAPABILITIES

    job_dir: Optional[str] = option(
        None, help="directory to copy the workspace into (must not exist; default: a new "
        "directory under $TORCHX_EXT_HOME/host/workspaces when --workspace is not the current dir)"
    )
    auto_set_cuda_visible_devices: bool = option(
        False, help="give each replica of a GPU role its own CUDA_VISIBLE_DEVICES, in order"
    )
    gpu_count: Optional[int] = option(
        None, help="GPUs on this host for auto_set_cuda_visible_devices (default: nvidia-smi -L)"
    )
    retry_backoff_s: float = retry_backoff_option()
    ready_timeout_s: float = ready_timeout_option()


@dataclass
class ReplicaRequest:
    role: str
    replica_id: int
    service: bool
    cmd: list[str]
    cwd: str
    env: dict[str, str]
    max_retries: int = 0
    retry_policy: str = "APPLICATION"
    ports: list[int] = field(default_factory=list)  # a service's: the others start once they accept


@dataclass
class HostRequest:
    """What ``schedule`` performs; its JSON is what ``--dryrun`` prints."""

    app_id: str
    app_name: str
    app_dir: str
    dependencies: list[str]
    roles: list[dict[str, Any]]
    replicas: list[ReplicaRequest] = field(default_factory=list)
    retry_backoff_s: float = 0.0
    ready_timeout_s: float = READY_TIMEOUT_S
    # workspaces to copy before the app starts: {"source": dir or URL, "target": new dir}
    workspace_copies: list[dict[str, str]] = field(default_factory=list)

    def __repr__(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)
