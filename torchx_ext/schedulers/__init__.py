"""A package per backend: ``host``, ``slurm_jobs``, ``docker_jobs``, ``ray_jobs``, on the shared
TorchX-facing base (:mod:`.base`) and the group engine (:mod:`torchx_ext.engine`).

Each package exposes ``create_scheduler(session_name, **kwargs)`` and its typed executor class (what
the entry points name), imported on first use; heavy dependencies (ray, docker) are imported inside
the code that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence


def lazy_exports(package: str, names: Sequence[str]) -> tuple[Callable[[str], Any], list[str]]:
    """A backend package's module ``__getattr__`` (and ``__all__``): ``names`` come from its
    ``scheduler`` module, imported on first use, so that a process the package starts with
    ``python -m`` (the host supervisor, the docker watcher) does not pay for the scheduler's
    imports (torchx) before it runs."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.scheduler"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(names)
