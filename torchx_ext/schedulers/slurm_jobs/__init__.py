"""The ``slurm_jobs`` scheduler: Slurm through sbatch, multi-role apps as heterogeneous jobs, on this
machine or on a login node over SSH.

* :mod:`.scheduler` — the TorchX-facing scheduler;
* :mod:`.script` — the batch script: what it asks of Slurm, and what it ships and runs;
* :mod:`.node` — the group engine's launcher on the batch node (srun steps), run with the node's
  Python, standard library only;
* :mod:`.client` — Slurm's commands and their answers; :mod:`.ssh` — a cluster over SSH;
* :mod:`.retention` — what delete and prune remove.
"""

from __future__ import annotations

from typing import Any

# What the entry points name here (``torchx_ext.schedulers.slurm_jobs:create_scheduler`` and the
# executor), imported on first use: a process this package starts with ``python -m`` must not
# pay for the scheduler's imports (torchx) before it runs.
_EXPORTS = ("create_scheduler", "SlurmJobsScheduler", "SlurmJobsExecutor")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
