"""What ``docker_jobs`` does with every AppDef/Role/Resource field (:mod:`torchx_ext.support`): the
table in the README and docs, and the refusals before anything is submitted."""

from __future__ import annotations

from typing import Mapping, Optional

from torchx.specs import Role

from torchx_ext.support import COMMON, Support, honoured, refused


def _named_devices(devices: Mapping[str, int], role: Role) -> Optional[str]:
    from torchx.schedulers.devices import DEVICES

    unknown = sorted(set(devices or {}) - set(DEVICES))
    return f"unknown named devices {unknown}; known: {', '.join(sorted(DEVICES))}" if unknown else None


MATRIX: dict[str, Support] = {
    **COMMON,
    "Role.image": honoured("the container image (pulled only as pull_policy says)"),
    "Role.port_map": honoured("a service role's ports: the other roles start once they accept connections "
                              "(run option ready_timeout_s). Each is published on publish_host (127.0.0.1) "
                              "at a free host port; describe's "
                              "roles show them as port_map {'NAME/k': host port, 'NAME': replica 0's}"),
    "Role.mounts": honoured("bind, volume and device mounts"),
    "Resource.cpu": honoured("a CPU limit (nano_cpus)"),
    "Resource.gpu": honoured("a device request for that many GPUs"),
    "Resource.memMB": honoured("a memory limit, with no swap beyond it"),
    "Resource.capabilities": refused("a Docker engine has no node capabilities to match; use the "
                                     "docker_jobs options (privileged, user, ...) or another scheduler"),
    "Resource.devices": honoured("TorchX's named devices, mounted as its get_device_mounts does",
                                 _named_devices),
}
