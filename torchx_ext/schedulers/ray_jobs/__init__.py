"""The ``ray_jobs`` scheduler: a pre-provisioned Ray cluster through the Ray Jobs API.

* :mod:`.scheduler` — the TorchX-facing scheduler;
* :mod:`.client` — the Jobs API side: addresses and app ids, the client, jobs, states and logs;
* :mod:`.local` — this machine's side: the cluster package, connections, cancel records;
* :mod:`.deps`, :mod:`.preflight`, :mod:`.retention` — dependencies (the broker), the checks
  before a submission, and what prune removes;
* :mod:`.cluster` — what runs inside the Ray cluster (the driver, the replicas, the broker),
  shipped there as the package ``ray_jobs_cluster``.
"""

from torchx_ext.schedulers import lazy_exports

# what the entry points name here (``torchx_ext.schedulers.ray_jobs:create_scheduler``, the executor)
__getattr__, __all__ = lazy_exports(__name__, ("create_scheduler", "RayJobsScheduler", "RayJobsExecutor"))
