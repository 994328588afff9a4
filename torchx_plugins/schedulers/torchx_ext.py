"""torchx-ext's schedulers in torchx-nightly's plugin registry (``torchx_plugins.schedulers``).

The nightly finds plugins in this namespace package and in the deprecated ``torchx.schedulers``
entry points, and warns when a name comes through both. So torchx-ext registers here for the
nightly only; on torchx 0.7.0 (no ``torchx.plugins``) the same factories are entry points of the
synthetic distribution in :mod:`torchx_ext._builtin_entry_points`. Nothing is listed twice.

The nightly puts plugins before its built-ins and takes the first scheduler as the default
(``torchx.schedulers.get_default_scheduler_name``), so installing any plugin changes what
``torchx run`` uses when no ``-s`` is given. To keep TorchX's default, the first plugin of this
module is TorchX's own default scheduler under its own name, delegating to TorchX's own factory;
the registry collects a module's plugins in ``dir()`` order, hence the leading ``_0``.
"""

from __future__ import annotations

import importlib
from typing import Any

from torchx.plugins import register
from torchx.schedulers import DEFAULT_SCHEDULER_MODULES

_DEFAULT = next(iter(DEFAULT_SCHEDULER_MODULES))


@register.scheduler(name=_DEFAULT)
def _0_torchx_default(session_name: str, **kwargs: Any) -> Any:
    """TorchX's own default scheduler, unchanged (see the module docstring)."""
    return importlib.import_module(DEFAULT_SCHEDULER_MODULES[_DEFAULT]).create_scheduler(session_name, **kwargs)


def _ours(name: str) -> Any:
    @register.scheduler(name=name)
    def create_scheduler(session_name: str, **kwargs: Any) -> Any:
        # the module is imported on first use only: listing schedulers stays cheap
        return importlib.import_module(f"torchx_ext.schedulers.{name}").create_scheduler(session_name, **kwargs)

    return create_scheduler


host = _ours("host")
slurm_jobs = _ours("slurm_jobs")
docker_jobs = _ours("docker_jobs")
ray_jobs = _ours("ray_jobs")
