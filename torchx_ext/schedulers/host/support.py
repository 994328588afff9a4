"""What ``host`` does with every AppDef/Role/Resource field (:mod:`torchx_ext.support`): the
table in the README and docs, and the refusals before anything is submitted."""

from __future__ import annotations

from torchx_ext.support import COMMON, Support, honoured, ignored, refused

MATRIX: dict[str, Support] = {
    **COMMON,
    "Role.image": honoured("a directory is the replicas' working directory (a --workspace copy is one); "
                           "any other value, such as the container image TorchX's components name, is not "
                           "used: host runs no containers"),
    "Role.mounts": refused("host runs no containers: use paths on this host directly, or docker_jobs"),
    "Resource.cpu": ignored("advisory: replicas share this host, nothing is reserved or limited "
                            "(TorchX's components always set it)"),
    "Resource.memMB": ignored("advisory, as cpu"),
    "Resource.gpu": honoured("with auto_set_cuda_visible_devices each replica gets its own "
                             "CUDA_VISIBLE_DEVICES (more than the host has is refused); otherwise advisory"),
    "Resource.capabilities": refused("one host schedules nothing: there is no node to match them against"),
    "Resource.devices": refused("device requests need a container engine: use docker_jobs"),
}
