"""The ``docker_jobs`` scheduler: one container per replica on a per-app network (the docker SDK).

* :mod:`.scheduler` — the TorchX-facing scheduler;
* :mod:`.daemon` — the daemon: the SDK client, labels, names and snapshots of an app's containers;
* :mod:`.launcher` — the group engine's launcher: containers started, stopped and reported;
* :mod:`.watcher` — one watcher per daemon, user, machine and home, which performs the engine's
  decisions while apps run (``python -m torchx_ext.schedulers.docker_jobs.watcher``);
* :mod:`.lease` — which watcher acts for an app (a lease held by the daemon);
* :mod:`.retries`, :mod:`.logs`, :mod:`.images`, :mod:`.retention` — attempts, log reading,
  workspace images, and what prune removes.
"""

from __future__ import annotations

from typing import Any

# What the entry points name here (``torchx_ext.schedulers.docker_jobs:create_scheduler`` and the
# executor), imported on first use: a process this package starts with ``python -m`` must not
# pay for the scheduler's imports (torchx) before it runs.
_EXPORTS = ("create_scheduler", "DockerJobsScheduler", "DockerJobsExecutor")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
