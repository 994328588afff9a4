"""The ``slurm_jobs`` scheduler: Slurm through sbatch, multi-role apps as heterogeneous jobs, on this
machine or on a login node over SSH.

* :mod:`.scheduler` — the TorchX-facing scheduler;
* :mod:`.script` — the batch script: what it asks of Slurm, and what it ships and runs;
* :mod:`.node` — the group engine's launcher on the batch node (srun steps), run with the node's
  Python, standard library only;
* :mod:`.client` — Slurm's commands and their answers; :mod:`.ssh` — a cluster over SSH;
* :mod:`.retention` — what delete and prune remove.
"""

from torchx_ext.schedulers import lazy_exports

# what the entry points name here (``torchx_ext.schedulers.slurm_jobs:create_scheduler``, the executor)
__getattr__, __all__ = lazy_exports(__name__, ("create_scheduler", "SlurmJobsScheduler", "SlurmJobsExecutor"))
