"""The few places where torchx 0.7.0 and torchx-nightly differ, in one module.

Differences handled (checked against 0.7.0 and the 2026-10 nightly):
- ``Scheduler._validate(app, scheduler)`` gained a ``cfg`` argument (our base accepts both);
- ``Scheduler.list()`` gained a ``cfg`` argument (our base accepts both);
- ``ListAppResponse`` gained ``name`` (``ExtScheduler.listed`` sets it where it exists);
- ``List[str]`` options may arrive as a string from Python callers: :func:`as_list` normalises.
The nightly's plugin registry is handled by ``torchx_plugins/schedulers`` and
:mod:`torchx_ext._builtin_entry_points`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from torchx.specs import AppDryRunInfo


def make_dryrun_info(request: Any, fmt: Callable[[Any], str] = repr) -> AppDryRunInfo[Any]:
    return AppDryRunInfo(request, fmt)


def as_list(value: Any) -> list[str]:
    """``None`` → [], ``"a,b;c"`` → [a, b, c], lists stay lists (items stripped, empties dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.replace(";", ",").split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def is_torchx_cli() -> bool:
    """Is this process the ``torchx`` CLI (``torchx ...`` or ``python -m torchx.cli.main ...``)?"""
    argv0 = sys.argv[0] if sys.argv else ""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return os.path.basename(argv0) == "torchx" or argv0.endswith(os.path.join("torchx", "cli", "main.py")) \
        or getattr(spec, "name", "") == "torchx.cli.main"
