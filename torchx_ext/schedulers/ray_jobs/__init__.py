"""The ``ray_jobs`` scheduler: a pre-provisioned Ray cluster through the Ray Jobs API.

* :mod:`.scheduler` — the TorchX-facing scheduler;
* :mod:`.client` — the Jobs API side: addresses and app ids, the client, jobs, states and logs;
* :mod:`.local` — this machine's side: the cluster package, connections, cancel records;
* :mod:`.deps`, :mod:`.preflight`, :mod:`.retention` — dependencies (the broker), the checks
  before a submission, and what prune removes;
* :mod:`.cluster` — what runs inside the Ray cluster (the driver, the replicas, the broker),
  shipped there as the package ``ray_jobs_cluster``.
"""

from __future__ import annotations

from typing import Any

# What the entry points name here (``torchx_ext.schedulers.ray_jobs:create_scheduler`` and the
# executor), imported on first use: a process this package starts with ``python -m`` must not
# pay for the scheduler's imports (torchx) before it runs.
_EXPORTS = ("create_scheduler", "RayJobsScheduler", "RayJobsExecutor")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
