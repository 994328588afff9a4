"""``python -m torchx_ext prune``: removes ended apps and what no app owns any more, on any TorchX.

TorchX's ``torchx delete`` exists on its nightly only, and removes one app; this removes every app
of this user that ended before a cutoff, with everything ``delete`` removes (each scheduler's
``delete`` is what runs), on the schedulers asked (default: all four)::

    python -m torchx_ext prune --older-than 7d --dry-run     # what would go
    python -m torchx_ext prune --older-than 7d -s host -s slurm_jobs

An app that runs or waits is never touched. Each scheduler says what is prunable
(:meth:`~torchx_ext.schedulers.base.ExtScheduler.prunable`) and what is left over
(:meth:`~torchx_ext.schedulers.base.ExtScheduler.leftovers`: workspace copies no record names,
clusters unreachable for longer than the cutoff); this module only drives them and reports: one
line per app (or leftover) removed, or that would be, and a total. A scheduler whose backend is
absent (no docker SDK or daemon, no ray) is skipped with one warning; so is a cluster that cannot
be reached, and the rest goes on. Errors are one line and make the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torchx_ext.errors import InvalidOptionError, MissingExtraError, SchedulerUnavailable, TorchxExtError
from torchx_ext.schedulers.base import ExtScheduler
from torchx_ext.schedulers.retention import Prunable

SCHEDULERS = ("host", "slurm_jobs", "docker_jobs", "ray_jobs")
SESSION = "torchx"  # the TorchX CLI's session name: the handles printed are the ones `torchx` showed
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit s, m, h, d or w (``30m``, ``12h``, ``7d``)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        raise InvalidOptionError(f"--older-than {text!r}: give a number and a unit, one of s, m, h, d, w "
                                 "(e.g. 30m, 12h, 7d; 0s: every ended app)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def size_text(n: Optional[int]) -> str:
    if n is None:
        return "size unknown"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def age_text(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{seconds / _UNITS[unit]:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


@dataclass
class Totals:
    """What a prune removed (or would): counts, bytes where known, errors."""

    apps: int = 0
    leftovers: int = 0
    bytes: int = 0
    unknown_sizes: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, size: Optional[int]) -> None:
        if size is None:
            self.unknown_sizes += 1
        else:
            self.bytes += size


def prune(schedulers: Sequence[str], older_than_s: float, dry_run: bool,
          out: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> Totals:
    """Removes (``dry_run``: lists) the ended apps and leftovers of ``schedulers`` older than
    ``older_than_s``; see the module docstring. Errors are collected in the totals, not raised."""
    cutoff = time.time() - older_than_s
    totals = Totals()
    for name in schedulers:
        module = importlib.import_module(f"torchx_ext.schedulers.{name}")
        _prune_one(name, module.create_scheduler(SESSION), cutoff, dry_run, totals, out, warn)
    return totals


def _prune_one(name: str, scheduler: ExtScheduler[Any], cutoff: float, dry_run: bool, totals: Totals,
               out: Callable[[str], None], warn: Callable[[str], None]) -> None:
    verb = "would remove" if dry_run else "removed"
    try:
        apps = scheduler.prunable(cutoff, warn)
        extra = scheduler.leftovers(cutoff, warn)
    except (MissingExtraError, SchedulerUnavailable) as e:
        warn(f"{name}: skipped: {e}")
        return
    except TorchxExtError as e:
        totals.errors.append(f"{name}: {e}")
        return
    by_id: dict[str, Prunable] = {p.app_id: p for p in apps}

    def done(app_id: str, error: Optional[Exception]) -> None:
        if error is not None:
            totals.errors.append(f"{scheduler.handle(app_id)}: {error}")
            return
        p = by_id[app_id]
        totals.apps += 1
        totals.add(p.bytes)
        out(f"{verb} {scheduler.handle(p.app_id)} ({p.state.name}, ended {age_text(time.time() - p.ended)} ago, "
            f"{size_text(p.bytes)})")

    if dry_run:
        for p in apps:
            done(p.app_id, None)
    else:
        scheduler.delete_apps([p.app_id for p in apps], done)
    for left in extra:
        if not dry_run:
            try:
                with scheduler._translated("prune"):  # noqa: SLF001 - engine and OS errors as ours: one line
                    left.remove()
            except TorchxExtError as e:
                totals.errors.append(f"{left.what}: {e}")
                continue
        totals.leftovers += 1
        totals.add(left.bytes)
        out(f"{verb} {left.what} ({size_text(left.bytes)})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchx_ext prune",
        description="Removes this user's apps that ended before a cutoff (records, logs, job directories, "
        "workspace copies and images, remote workspaces, Ray jobs) and what no app owns any more. "
        "Apps that run or wait are never touched. Run with --dry-run first.")
    parser.add_argument("--older-than", required=True, metavar="DURATION",
                        help="ended at least this long ago: a number and a unit s, m, h, d, w (e.g. 7d)")
    parser.add_argument("-s", "--scheduler", action="append", metavar="SCHEDULER",
                        help=f"only this scheduler (repeatable, or comma-separated); default: {', '.join(SCHEDULERS)}")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    args = parser.parse_args(argv)
    try:
        older_than = parse_duration(args.older_than)
        chosen = [s.strip() for v in (args.scheduler or SCHEDULERS) for s in v.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SCHEDULERS]
        if unknown:
            raise InvalidOptionError(
                f"unknown scheduler {', '.join(map(repr, unknown))}; valid: {', '.join(SCHEDULERS)}")
        started = time.monotonic()
        totals = prune(list(dict.fromkeys(chosen)), older_than, args.dry_run,
                       warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    except TorchxExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; what was removed so far is gone, the rest is kept (run prune again)",
              file=sys.stderr)
        return 130
    for err in totals.errors:
        print(f"error: {err}", file=sys.stderr)
    unknown_note = f" (and {totals.unknown_sizes} of unknown size)" if totals.unknown_sizes else ""
    print(f"{'would remove' if args.dry_run else 'removed'} {totals.apps} app(s) and {totals.leftovers} "
          f"leftover(s), {'would free' if args.dry_run else 'freed'} {size_text(totals.bytes)}{unknown_note}, "
          f"in {time.monotonic() - started:.1f} s")
    return 1 if totals.errors else 0
