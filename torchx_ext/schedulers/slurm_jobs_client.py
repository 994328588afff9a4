"""Slurm's client commands as ``slurm_jobs`` calls them: running them, and reading their answers.

One place for what Slurm only tells in text: :func:`unreachable` is the single function that
decides "slurmctld did not answer" from a command's stderr (Slurm's clients exit 1 for that and
for every other error alike). It is tested against the real commands' messages.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Optional

from torchx.specs import AppState

from torchx_ext.errors import SchedulerUnavailable
from torchx_ext.schedulers.slurm_jobs_script import SlurmJob, parse_result, parse_sacct, parse_scontrol_job

# what Slurm's clients print when slurmctld cannot be reached (retrying is the caller's choice)
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                "Zero Bytes were transmitted", "Connection timed out")


def run(cmd: list[str], stdin: Optional[str] = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a Slurm command; a missing command or a hang is :class:`SchedulerUnavailable`."""
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SchedulerUnavailable(
            f"'{cmd[0]}' was not found: run torchx where Slurm's client commands are on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(f"'{' '.join(cmd[:3])}' did not answer within {timeout:.0f} s") from None


def unreachable(proc: subprocess.CompletedProcess[str]) -> bool:
    """Did the command fail because slurmctld could not be reached?"""
    return proc.returncode != 0 and any(s in proc.stderr for s in _UNREACHABLE)


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_int(path: str) -> Optional[int]:
    text = read_text(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def last_error(log_path: str) -> str:
    """The last stderr line of a replica log that is not srun's own summary (why it failed)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(os.path.getsize(log_path) - 16384, 0))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        _stamp, _, rest = line.partition(" ")
        tag, _, text = rest.partition(" ")
        if tag == "E" and text.strip() and not text.startswith("srun: "):
            return text.strip()[:300]
    return ""


def verdict_from_files(job_id: str, job_dir: str) -> tuple[AppState, str]:
    """The verdict the batch script left in the job directory (for jobs Slurm has forgotten)."""
    result = parse_result(read_text(os.path.join(job_dir, "result")))
    if result is not None:
        return (AppState.SUCCEEDED if result[0] == 0 else AppState.FAILED), ""
    if os.path.exists(os.path.join(job_dir, "cancelled")):
        return AppState.CANCELLED, "cancelled by user"
    return AppState.UNKNOWN, (f"Slurm no longer knows job {job_id} and has no accounting (sacct); "
                              f"its job directory {job_dir} has no result")


class SlurmClient:
    """Queries of slurmctld (and sacct, where accounting exists). Nothing here changes a job."""

    def __init__(self) -> None:
        self._accounting: Optional[bool] = None  # learnt on first use: sacct works or not

    def job(self, job_id: str) -> tuple[Optional[SlurmJob], Optional[str]]:
        """(job, None) if slurmctld knows it, (None, None) if not, (None, error) if unreachable."""
        proc = run(["scontrol", "show", "job", "-o", job_id])
        if proc.returncode == 0:
            return parse_scontrol_job(proc.stdout, job_id), None
        if unreachable(proc):
            return None, proc.stderr.strip()
        return None, None  # "Invalid job id specified": purged or never existed

    def sacct_job(self, job_id: str) -> Optional[SlurmJob]:
        if self._accounting is False:
            return None
        try:
            proc = run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Reason"])
        except SchedulerUnavailable:
            self._accounting = False
            return None
        self._accounting = proc.returncode == 0  # "accounting storage is disabled" (or no slurmdbd)
        return parse_sacct(proc.stdout, job_id) if self._accounting else None

    def squeue_jobs(self) -> list[dict[str, Any]]:
        """All jobs slurmctld knows, in ONE call: ``squeue --json`` (``-o`` fallback for old Slurm)."""
        proc = run(["squeue", "--json"])
        if proc.returncode == 0:
            return [
                {"job_id": str(j["job_id"]), "state": j.get("job_state", ""), "reason": j.get("state_reason", ""),
                 "comment": j.get("comment") or "",
                 "leader": j.get("het_job_id") in (0, None, j["job_id"]) and not j.get("het_job_offset")}
                for j in json.loads(proc.stdout).get("jobs", [])
            ]
        if unreachable(proc):
            raise SchedulerUnavailable(f"squeue could not reach slurmctld: {proc.stderr.strip()}")
        # %i is "<id>+<offset>" for het components; the comment is last (it may hold any text)
        proc = run(["squeue", "-h", "-a", "-t", "all", "-o", "%i|%T|%r|%k"])
        if proc.returncode != 0:
            raise SchedulerUnavailable(f"squeue failed: {proc.stderr.strip()}")
        out = []
        for line in proc.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) == 4:
                jid, _, offset = parts[0].partition("+")
                out.append({"job_id": jid, "state": parts[1], "reason": parts[2],
                            "comment": parts[3], "leader": offset in ("", "0")})
        return out
