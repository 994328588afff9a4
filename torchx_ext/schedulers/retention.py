"""What every scheduler's retention shares (``torchx delete``, ``python -m torchx_ext prune``): an
ended app prune may remove (:class:`Prunable`), something no app owns any more (:class:`Leftover`),
and how their sizes and the dangling workspace copies are found."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import (
    Callable,
    Iterable,
    Optional,
)

from torchx.specs import AppState

Warn = Callable[[str], None]
# a workspace copy no record names yet may belong to a submission in progress (the copy is made
# before the record): prune leaves such copies alone for this long, whatever the cutoff
IN_FLIGHT_S = 600.0


@dataclass
class Prunable:
    """An ended app that ``prune`` may remove (see :meth:`ExtScheduler.prunable`)."""

    app_id: str
    state: AppState
    ended: float  # unix time it ended; where the engine does not say, when it was submitted
    bytes: Optional[int] = None  # what removing it frees on this machine (or the cluster), where known


@dataclass
class Leftover:
    """Something no app owns any more (a workspace copy no record names, a cluster that is gone)."""

    what: str  # shown to the user
    bytes: Optional[int]
    remove: Callable[[], None]


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a file or a directory; 0 if missing); links not followed."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size
    except OSError:
        return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def dangling_copies(root: str, referenced: Iterable[str], cutoff: float) -> list[Leftover]:
    """The directories under ``root`` that no record names (``referenced``), untouched since before
    ``cutoff`` and older than :data:`IN_FLIGHT_S` (a submission may be copying into one)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    keep = {os.path.realpath(r) for r in referenced}
    out = []
    for name in sorted(names):
        path = os.path.join(root, name)
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            continue
        if os.path.realpath(path) in keep or mtime >= min(cutoff, time.time() - IN_FLIGHT_S):
            continue
        out.append(Leftover(f"workspace copy {path} (no app refers to it)", tree_bytes(path),
                            lambda p=path: shutil.rmtree(p, ignore_errors=True)))  # type: ignore[misc]
    return out
