"""Give torchx back its built-in schedulers once torchx-ext registers its own.

Why this exists: torchx 0.7.0's ``get_scheduler_factories()`` returns *only* the
``torchx.schedulers`` entry points as soon as one exists, so installing any plugin hides
``local_cwd``, ``local_docker``, ``slurm``, ``kubernetes``, ... Newer torchx (the nightly's
``torchx.plugins`` registry) merges plugins with its built-ins itself.

Static entry points cannot fix this: the set of built-ins differs between versions (the nightly
has no ``ray`` or ``gcp_batch`` module), and an entry point that names a missing module breaks
``torchx runopts``. So ``torchx_ext_builtins.pth`` installs :class:`BuiltinSchedulersFinder`, a
``sys.meta_path`` finder that finds no modules and contributes one synthetic distribution,
``torchx-ext-builtins``, whose entry points are exactly the built-in schedulers of the
*installed* torchx, each pointing at torchx's own ``create_scheduler``:

* torchx that replaces built-ins (0.7.x): every ``DEFAULT_SCHEDULER_MODULES`` entry whose module
  file exists is listed, so nothing points at a missing module;
* torchx that merges built-ins (has ``torchx/plugins``): nothing is listed, so nothing is
  listed twice or shadowed.

The same distribution carries torchx-ext's own schedulers (:data:`OURS`), on torchx 0.7.0 only:
the nightly finds them in the ``torchx_plugins.schedulers`` namespace package instead, and would
warn about a name registered through both channels. Every install ships the .pth, editable ones
included: setup.py adds it to the wheel that ``pip install -e`` builds, which otherwise holds only
setuptools' own path finder.

The finder imports nothing at interpreter start-up or when asked for a distribution by name; it
reads torchx's source with ``ast`` only when someone enumerates all distributions.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import os
import sys
from typing import Any, Iterable, Optional

DIST_NAME = "torchx-ext-builtins"
OURS = {name: f"torchx_ext.schedulers.{name}:create_scheduler"
        for name in ("host", "slurm_jobs", "docker_jobs", "ray_jobs")}


def _torchx_dir() -> Optional[str]:
    # PathFinder, not importlib.util.find_spec: the latter would import nothing either, but it
    # consults sys.meta_path again (us included).
    spec = importlib.machinery.PathFinder.find_spec("torchx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def builtin_scheduler_entry_points(torchx_dir: Optional[str]) -> dict[str, str]:
    """Returns ``{name: "module:create_scheduler"}`` for the built-ins torchx would hide.

    Args:
        torchx_dir: the installed ``torchx`` package directory (None: not installed).
    """
    if torchx_dir is None or os.path.exists(os.path.join(torchx_dir, "plugins", "__init__.py")):
        return {}
    init = os.path.join(torchx_dir, "schedulers", "__init__.py")
    try:
        with open(init, encoding="utf-8") as f:
            tree = ast.parse(f.read(), init)
    except (OSError, SyntaxError):
        return {}
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "DEFAULT_SCHEDULER_MODULES":
            value = getattr(node, "value", None)
            if isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values, strict=False):
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                        modules[str(k.value)] = str(v.value)
    entry_points = {}
    for name, module in modules.items():
        rel = module.split(".")[1:]  # drop the leading "torchx"
        if os.path.exists(os.path.join(torchx_dir, *rel) + ".py"):
            entry_points[name] = f"{module}:create_scheduler"
    return entry_points


class _BuiltinsDistribution(importlib.metadata.Distribution):
    def __init__(self, entry_points: dict[str, str]) -> None:
        self._entry_points = entry_points

    def read_text(self, filename: str) -> Optional[str]:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: 0\n"
        if filename == "entry_points.txt":
            lines = ["[torchx.schedulers]"]
            lines += [f"{name} = {target}" for name, target in self._entry_points.items()]
            return "\n".join(lines) + "\n"
        return None

    def locate_file(self, path: Any) -> Any:
        return path


class BuiltinSchedulersFinder:
    """A meta path finder that only contributes the synthetic distribution."""

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_distributions(
        self, context: Any = importlib.metadata.DistributionFinder.Context()  # noqa: B008 (as importlib's own)
    ) -> Iterable[importlib.metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is not None and name.replace("_", "-").lower() != DIST_NAME:
            return []
        builtins = builtin_scheduler_entry_points(_torchx_dir())
        # built-ins first: torchx 0.7.0's default scheduler is the first entry point
        return [_BuiltinsDistribution({**builtins, **OURS})] if builtins else []


def install() -> None:
    """Registers the finder once (called from ``torchx_ext_builtins.pth``)."""
    if not any(isinstance(f, BuiltinSchedulersFinder) for f in sys.meta_path):
        sys.meta_path.append(BuiltinSchedulersFinder())
