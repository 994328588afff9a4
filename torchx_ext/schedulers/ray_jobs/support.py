"""What ``ray_jobs`` does with every AppDef/Role/Resource field (:mod:`torchx_ext.support`): the
table in the README and docs, and the refusals before anything is submitted."""

from __future__ import annotations

from torchx_ext.support import COMMON, Support, honoured, ignored, refused

MATRIX: dict[str, Support] = {
    **COMMON,
    "Role.workspace": honoured("(torchx-nightly) one working_dir per Ray job: every role that names a "
                               "workspace must name the first role's"),
    "Role.image": ignored("the app runs in the Ray cluster's own environment; TorchX's components always "
                          "name a container image, which a Ray job cannot use: ship code with --workspace "
                          "and packages with pip="),
    "Role.mounts": refused("a Ray job runs on the nodes as they are: ship files with --workspace "
                           "(working_dir) or use storage the nodes share"),
    "Resource.cpu": honoured("Ray CPUs of the job's entrypoint, or of the replica's bundle in a gang"),
    "Resource.gpu": honoured("Ray GPUs, as cpu"),
    "Resource.memMB": honoured("Ray memory (bytes), as cpu"),
    "Resource.capabilities": honoured("numbers are custom Ray resources (e.g. {'sandbox': 1}); use "
                                      "label_selector for node labels"),
    "Resource.devices": refused("Ray has no device requests: ask for them as custom resources through "
                                "capabilities"),
}
