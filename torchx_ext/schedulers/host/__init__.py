"""The ``host`` scheduler: detached processes on this machine whose state survives the shell.

* :mod:`.scheduler` — the TorchX-facing scheduler: dry-run, schedule, describe, list, log, cancel;
* :mod:`.supervisor` — the detached supervisor of one app
  (``python -m torchx_ext.schedulers.host.supervisor``), the group engine's launcher for processes;
* :mod:`.procs` — the processes this scheduler started, and the proof that a pid is still ours.
"""

from torchx_ext.schedulers import lazy_exports

# what the entry points name here (``torchx_ext.schedulers.host:create_scheduler``, the executor)
__getattr__, __all__ = lazy_exports(__name__, ("create_scheduler", "HostScheduler", "HostExecutor"))
