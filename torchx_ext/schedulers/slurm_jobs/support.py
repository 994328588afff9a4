"""What ``slurm_jobs`` does with every AppDef/Role/Resource field (:mod:`torchx_ext.support`): the
table in the README and docs, and the refusals before anything is submitted."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torchx.specs import BindMount, Role

from torchx_ext.support import COMMON, Support, check_retries, honoured, refused


def _pyxis_mount(mounts: list[Any], role: Role) -> Optional[str]:
    bad = [type(m).__name__ for m in mounts if not isinstance(m, BindMount)]
    return (f"{', '.join(sorted(set(bad)))} cannot be mounted by pyxis; use BindMount (with container_image)"
            if bad else None)


def _capability(caps: Mapping[str, Any], role: Role) -> Optional[str]:
    bad = {k: v for k, v in (caps or {}).items()
           if not (v is True or (isinstance(v, int) and not isinstance(v, bool) and v >= 0))}
    return (f"{bad}: a capability is a node feature (True, for --constraint) or a GRES count "
            "(a whole number, for --gres)" if bad else None)


MATRIX: dict[str, Support] = {
    **COMMON,
    "Role.max_retries": honoured("restarts inside the allocation, on the replica's own node, under "
                                 "Role.retry_policy; the job is then submitted --requeue: a requeue by Slurm "
                                 "(preemption, node failure, scontrol requeue) is a restart of the whole app "
                                 "that draws on no budget (see Retries)", check_retries),
    "Role.image": honoured("a directory is the replicas' working directory (--chdir; a --workspace copy "
                           "is one); with container_image an absolute path is the container's working "
                           "directory; other values (container image names) are not used: set container_image"),
    "Role.mounts": honoured("with container_image: pyxis --container-mounts (BindMount, read_only as ro); "
                            "without it, refused", _pyxis_mount),
    "Resource.cpu": honoured("--cpus-per-task, rounded up"),
    "Resource.gpu": honoured("--gpus-per-task, or --gpus-per-node with gpus_per_node"),
    "Resource.memMB": honoured("--mem-per-cpu, so that replicas packed on a node add up"),
    "Resource.capabilities": honoured("NAME: True is a node feature (--constraint, joined with the constraint "
                                      "option by &); NAME: N is a GRES count (--gres=NAME:N, per node)",
                                      _capability),
    "Resource.devices": refused("ask for devices as GRES through capabilities (e.g. {'gpu': 2}), or mount "
                                "them with container_image and Role.mounts"),
}
