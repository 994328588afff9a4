"""Restart latency as the processes themselves see it, shared by the benches of host and slurm_jobs.

A replica runs :data:`RESTART_CODE`: it prints its start time; its first attempt then prints its
exit time and exits 1. :func:`restart_gap` reads both from the log: the first attempt's exit to
the second attempt's start, on the processes' own clocks (no polling of ours in the measure).
"""

from __future__ import annotations

# the attempt: TORCHX_EXT_ATTEMPT, else the first argument (a raw loop passes it), else 1
RESTART_CODE = ("import os, sys, time; print('START %.6f' % time.time(), flush=True); "
                "a = os.environ.get('TORCHX_EXT_ATTEMPT', sys.argv[1] if len(sys.argv) > 1 else '1'); "
                "(print('EXIT %.6f' % time.time(), flush=True), sys.exit(1)) if a == '1' else None")


def restart_gap(text: str) -> float:
    """Seconds from the first attempt's EXIT line to the second attempt's START line."""
    exit_t = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("EXIT "))
    return [float(x.split()[1]) for x in text.splitlines() if x.startswith("START ")][1] - exit_t
