"""The four schedulers' support matrices together: the README's table and the tests that read them.

Apart from :mod:`torchx_ext.support` because it imports every backend, and the backends import
the support module for their own matrices: kept here, the import graph has no cycle.

``python -m torchx_ext.support_tables [--update README.md]``
"""

from __future__ import annotations

from typing import Mapping

from torchx_ext.schedulers.docker_jobs.scheduler import DockerJobsScheduler
from torchx_ext.schedulers.host.scheduler import HostScheduler
from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsScheduler
from torchx_ext.schedulers.slurm_jobs.scheduler import SlurmJobsScheduler
from torchx_ext.support import Support, markdown


def all_matrices() -> dict[str, Mapping[str, Support]]:
    """The matrices of torchx-ext's four schedulers (no engine is touched)."""
    return {c.executor_cls.scheduler: c.support
            for c in (HostScheduler, SlurmJobsScheduler, DockerJobsScheduler, RayJobsScheduler)}


def update_readme(path: str) -> None:
    """Rewrites the table between the README's support-matrix markers."""
    start, end = "<!-- support-matrix:start -->\n", "<!-- support-matrix:end -->"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(start, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + start + markdown(all_matrices()) + end + rest.split(end, 1)[1])


if __name__ == "__main__":  # python -m torchx_ext.support_tables [--update README.md]
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_readme(sys.argv[2])
    else:
        print(markdown(all_matrices()), end="")
