"""The ``host`` scheduler: detached processes on this machine whose state survives the shell.

* :mod:`.scheduler` — the TorchX-facing scheduler: dry-run, schedule, describe, list, log, cancel;
* :mod:`.supervisor` — the detached supervisor of one app
  (``python -m torchx_ext.schedulers.host.supervisor``), the group engine's launcher for processes;
* :mod:`.procs` — the processes this scheduler started, and the proof that a pid is still ours.
"""

from __future__ import annotations

from typing import Any

# What the entry points name here (``torchx_ext.schedulers.host:create_scheduler`` and the
# executor), imported on first use: a process this package starts with ``python -m`` must not
# pay for the scheduler's imports (torchx) before it runs.
_EXPORTS = ("create_scheduler", "HostScheduler", "HostExecutor")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
