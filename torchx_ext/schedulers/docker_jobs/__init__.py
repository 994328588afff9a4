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

from torchx_ext.schedulers import lazy_exports

# what the entry points name here (``torchx_ext.schedulers.docker_jobs:create_scheduler``, the executor)
__getattr__, __all__ = lazy_exports(__name__, ("create_scheduler", "DockerJobsScheduler", "DockerJobsExecutor"))
