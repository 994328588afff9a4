"""Slurm's client commands as ``slurm_jobs`` calls them: running them, and reading their answers.

One place for what Slurm only tells in text: :func:`unreachable` is the single function that
decides "slurmctld did not answer" from a command's stderr (Slurm's clients exit 1 for that and
for every other error alike). It is tested against the real commands' messages.

:class:`SlurmClient` runs the commands here; :class:`RemoteSlurmClient` on a login node over SSH,
where describe's query and the job directory's files come back in one round trip
(:meth:`RemoteSlurmClient.snapshot`) and are parsed by the same code as the local ones
(:func:`read_job_files` returns the same ``{relative path: text}`` dict).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from typing import Any, Optional

from torchx.specs import AppState

from torchx_ext import state
from torchx_ext.errors import InvalidOptionError, SchedulerUnavailable
from torchx_ext.schedulers.slurm_jobs.script import SlurmJob, parse_result, parse_sacct, parse_scontrol_job
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin

JOB_ID = re.compile(r"^[0-9]+$")
# remote mode: "<login>:<job id>", the login as SshLogin.name writes it (never a "/": no path)
REMOTE_ID = re.compile(r"^(?P<login>[^/\s\0]+):(?P<job>[0-9]+)$")


def split_app_id(app_id: str) -> Optional[tuple[str, str]]:
    """``(login, job id)`` of an app id; login "" for a local one; None: not an app id of ours.

    An accepted id is always a plain directory name (never a path)."""
    if JOB_ID.match(app_id or ""):
        return "", app_id
    m = REMOTE_ID.match(app_id or "")
    if not m or not state.is_plain_name(app_id):
        return None
    try:
        if SshLogin(m.group("login")).name != m.group("login"):
            return None
    except InvalidOptionError:
        return None
    return m.group("login"), m.group("job")

# what Slurm's clients print when slurmctld cannot be reached (retrying is the caller's choice)
_SACCT_ARGS = ["-n", "-P", "-X", "-o", "JobID,State,ExitCode,Reason", "-j"]
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                "Zero Bytes were transmitted", "Connection timed out")


def run(cmd: list[str], stdin: Optional[str] = None, timeout: float = 60,
        umask: int = -1, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Runs a Slurm command; a missing command or a hang is :class:`SchedulerUnavailable`.

    ``umask``: the command's (e.g. sbatch's, which Slurm applies to the job's output file); -1: ours.
    ``env``: variables added to this process's environment for the command.
    """
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, umask=umask,
                              env={**os.environ, **env} if env else None)
    except FileNotFoundError:
        raise SchedulerUnavailable(
            f"'{cmd[0]}' was not found: run torchx where Slurm's client commands are on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(f"'{' '.join(cmd[:3])}' did not answer within {timeout:.0f} s") from None


def current_umask() -> str:
    """This process's umask as 4 octal digits, read without changing it (``os.umask`` sets it:
    a race with other threads creating files); "0022" where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return line.split()[1]
    except OSError:
        pass
    return "0022"


def unreachable(proc: subprocess.CompletedProcess[str]) -> bool:
    """Did the command fail because slurmctld could not be reached?"""
    return proc.returncode != 0 and any(s in proc.stderr for s in _UNREACHABLE)


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


#: how much of a failed replica's log end is read for its last error line
LOG_TAIL_BYTES = 16384


def last_error_in(tail: str) -> str:
    """The last stderr line of a replica log's end (read locally or from a login node) that is not
    srun's own summary: why it failed."""
    for line in reversed(tail.splitlines()):
        _stamp, _, rest = line.partition(" ")
        tag, _, text = rest.partition(" ")
        if tag == "E" and text.strip() and not text.startswith("srun: "):
            return text.strip()[:300]
    return ""


def job_file_names(roles: list[dict[str, Any]]) -> list[str]:
    """The small files of a job directory that describe reads (relative; see script.py)."""
    names = ["result", "verdict", "cancelled", "restarts", "requeues", "error"]
    for role in roles:
        for k in range(int(role["num_replicas"])):
            names += [f"{role['dirname']}/{k}/{name}" for name in ("exit", "host", "reason", "stopped")]
    return names


def read_job_files(job_dir: str, names: list[str]) -> dict[str, str]:
    """``{name: text}`` of the files of ``names`` that exist in ``job_dir``, read here.

    Beside a replica's non-zero ``exit``, its log's last :data:`LOG_TAIL_BYTES` as ``<dir>/log``.
    :meth:`RemoteSlurmClient.snapshot` answers the same dict from a login node.
    """
    files: dict[str, str] = {}
    for name in names:
        text = read_text(os.path.join(job_dir, name))
        if text is None:
            continue
        files[name] = text
        if name.endswith("/exit") and text.strip() not in ("", "0"):
            log = name[: -len("exit")] + "log"
            try:
                with open(os.path.join(job_dir, log), "rb") as f:
                    f.seek(max(os.path.getsize(os.path.join(job_dir, log)) - LOG_TAIL_BYTES, 0))
                    files[log] = f.read().decode("utf-8", errors="replace")
            except OSError:
                pass
    return files


def file_int(files: dict[str, str], name: str) -> Optional[int]:
    try:
        return int(files[name].strip()) if files.get(name) else None
    except ValueError:
        return None


def verdict_from_files(job_id: str, job_dir: str, files: Optional[dict[str, str]] = None) -> tuple[AppState, str]:
    """The verdict the batch script left in the job directory (for jobs Slurm has forgotten).

    Args:
        job_id: the Slurm job id
        job_dir: the job directory (named in the message)
        files: its files as :func:`read_job_files` returns them; None: read them here
    """
    if files is None:
        files = read_job_files(job_dir, ["result", "cancelled", "error"])
    result = parse_result(files.get("result"))
    if result is not None:
        return (AppState.SUCCEEDED if result[0] == 0 else AppState.FAILED), ""
    error = (files.get("error") or "").strip()
    if error:  # the app failed before its engine could decide (no node Python, no srun)
        return AppState.FAILED, error
    if "cancelled" in files:
        return AppState.CANCELLED, "cancelled by user"
    return AppState.UNKNOWN, (f"Slurm no longer knows job {job_id} and has no accounting (sacct); "
                              f"its job directory {job_dir} has no result")


# %i is "<id>+<offset>" for het components; the comment is last (it may hold any text)
_SQUEUE_FORMAT = ["-h", "-a", "-t", "all", "-o", "%i|%T|%r|%k"]


def replicas_on(nodes: list[str], roles: list[dict[str, Any]], files: dict[str, str]) -> list[str]:
    """The replicas (``role 'r' replica k``) whose ``host`` file names one of ``nodes``."""
    out = []
    for role in roles:
        for k in range(int(role["num_replicas"])):
            host = (files.get(f"{role['dirname']}/{k}/host") or "").split()
            if host and host[0] in nodes:
                out.append(f"role '{role['name']}' replica {k}")
    return out


def node_fail_text(nodes: str, lost: list[str], roles: list[dict[str, Any]], files: dict[str, str]) -> str:
    """The NODE_FAIL part of a failed app's message: the lost node(s) and the replicas that ran
    there. The replicas on the other nodes are not named: Slurm ended them with the job (their
    SIGTERM is its doing, not their failure). ``lost`` empty: Slurm no longer says which node."""
    which = f"node {', '.join(lost)}" if lost else "a node"
    there = replicas_on(lost, roles, files)
    on_it = f" ({', '.join(there)} ran there)" if there else ""
    return f"{which} of the job ({nodes or 'unknown'}) failed{on_it}, so Slurm ended the job"


def parse_squeue_format(text: str) -> list[dict[str, Any]]:
    """:meth:`SlurmClient.squeue_jobs`'s rows from ``squeue -o "%i|%T|%r|%k"``."""
    out = []
    for line in text.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4:
            jid, _, offset = parts[0].partition("+")
            out.append({"job_id": jid, "state": parts[1], "reason": parts[2],
                        "comment": parts[3], "leader": offset in ("", "0")})
    return out


class SlurmClient:
    """Queries of slurmctld (and sacct, where accounting exists). Nothing here changes a job.

    This one runs Slurm's commands here; :class:`RemoteSlurmClient` on a login node over SSH.
    """

    def __init__(self) -> None:
        self._accounting: Optional[bool] = None  # learnt on first use: sacct works or not

    def run(self, cmd: list[str], stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
        """Runs one Slurm command where the cluster is."""
        return run(cmd, stdin=stdin)

    def snapshot(self, job_id: str, job_dir: str, names: list[str]
                 ) -> tuple[Optional[SlurmJob], Optional[str], dict[str, str]]:
        """What describe needs of a job: ``(job, error, files)``.

        ``job``: from scontrol, else sacct where accounting exists (None: Slurm forgot it);
        ``error``: slurmctld unreachable; ``files``: :func:`read_job_files` of ``names``.
        """
        job, err = self.job(job_id)
        if job is None and err is None:
            job = self.sacct_job(job_id)
        return job, err, read_job_files(job_dir, names)

    def failed_nodes(self, nodes: str) -> list[str]:
        """Those of ``nodes`` (a Slurm host list) that slurmctld holds down, failed or not
        responding (naming a lost node; [] when it cannot tell, e.g. the node is back)."""
        proc = self.run(["sinfo", "-h", "-N", "-n", nodes, "-t", "down,fail,no_respond", "-o", "%N"])
        return sorted(set(proc.stdout.split())) if proc.returncode == 0 else []

    def node_fail_detail(self, nodes: str, roles: list[dict[str, Any]], files: dict[str, str]) -> str:
        """Why a job ended NODE_FAIL: :func:`node_fail_text` with the nodes Slurm holds lost."""
        return node_fail_text(nodes, self.failed_nodes(nodes) if nodes else [], roles, files)

    def job(self, job_id: str) -> tuple[Optional[SlurmJob], Optional[str]]:
        """(job, None) if slurmctld knows it, (None, None) if not, (None, error) if unreachable."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id])
        if proc.returncode == 0:
            return parse_scontrol_job(proc.stdout, job_id), None
        if unreachable(proc):
            return None, proc.stderr.strip()
        return None, None  # "Invalid job id specified": purged or never existed

    def sacct_job(self, job_id: str) -> Optional[SlurmJob]:
        if self._accounting is False:
            return None
        try:
            proc = self.run(["sacct", *_SACCT_ARGS, job_id])
        except SchedulerUnavailable:
            self._accounting = False
            return None
        self._accounting = proc.returncode == 0  # "accounting storage is disabled" (or no slurmdbd)
        return parse_sacct(proc.stdout, job_id) if self._accounting else None

    def squeue_jobs(self) -> list[dict[str, Any]]:
        """All jobs slurmctld knows, in ONE call: ``squeue --json`` (``-o`` fallback for old Slurm)."""
        proc = self.run(["squeue", "--json"])
        if proc.returncode == 0:
            return [
                {"job_id": str(j["job_id"]), "state": j.get("job_state", ""), "reason": j.get("state_reason", ""),
                 "comment": j.get("comment") or "",
                 "leader": j.get("het_job_id") in (0, None, j["job_id"]) and not j.get("het_job_offset")}
                for j in json.loads(proc.stdout).get("jobs", [])
            ]
        if unreachable(proc):
            raise SchedulerUnavailable(f"squeue could not reach slurmctld: {proc.stderr.strip()}")
        proc = self.run(["squeue", *_SQUEUE_FORMAT])
        if proc.returncode != 0:
            raise SchedulerUnavailable(f"squeue failed: {proc.stderr.strip()}")
        return parse_squeue_format(proc.stdout)


def no_slurm_on_remote(proc: subprocess.CompletedProcess[str]) -> bool:
    """Did the login node's shell not find a Slurm command ("sbatch: command not found", 127)?"""
    return proc.returncode == 127


# describe on a login node in ONE round trip: scontrol's answer (sacct's when scontrol does not know
# the job) and the job directory's small files, each after a line "<separator> <kind> <name>".
# $1: the separator (random: no file holds it), $2: the job id, $3: the job directory, $4...: files.
_SNAPSHOT = r"""
sep=$1 jid=$2 dir=$3; shift 3
out=$(scontrol show job -o "$jid" 2>&1); rc=$?
printf '%s scontrol %s\n%s\n' "$sep" "$rc" "$out"
if [ "$rc" != 0 ] && [ "$rc" != 127 ]; then
  out=$(sacct -n -P -X -o JobID,State,ExitCode,Reason -j "$jid" 2>&1); rc=$?
  printf '%s sacct %s\n%s\n' "$sep" "$rc" "$out"
fi
for f in "$@"; do
  [ -f "$dir/$f" ] || continue
  printf '%s file %s\n' "$sep" "$f"; cat -- "$dir/$f"; printf '\n'
  case $f in
    */exit)
      c=$(cat -- "$dir/$f")
      if [ -n "$c" ] && [ "$c" != 0 ] && [ -f "$dir/${f%exit}log" ]; then
        printf '%s file %s\n' "$sep" "${f%exit}log"; tail -c TAIL -- "$dir/${f%exit}log"; printf '\n'
      fi ;;
  esac
done
""".replace("TAIL", str(LOG_TAIL_BYTES))


def parse_sections(text: str, sep: str) -> list[tuple[str, str]]:
    """``[(header, body)]`` of an answer of :data:`_SNAPSHOT` (each body without the newline added)."""
    parts = ("\n" + text).split("\n" + sep + " ")[1:]
    out = []
    for i, part in enumerate(parts):
        header, _, body = part.partition("\n")
        if i == len(parts) - 1 and body.endswith("\n"):
            body = body[:-1]
        out.append((header, body))
    return out


class RemoteSlurmClient(SlurmClient):
    """:class:`SlurmClient` on a login node, over an :class:`~.ssh.SshLogin`.

    Slurm's commands run there; a command the remote shell cannot find (exit 127) is
    :class:`SchedulerUnavailable` naming the host.
    """

    def __init__(self, login: SshLogin) -> None:
        super().__init__()
        self.login = login

    def no_slurm(self, what: str) -> SchedulerUnavailable:
        return SchedulerUnavailable(
            f"{self.login.name}: {what}: Slurm's commands are not on the remote PATH (exit 127); check that "
            f"`ssh {self.login.name} sbatch --version` works (a non-interactive shell reads ~/.bashrc, "
            "not ~/.bash_profile)")

    def run(self, cmd: list[str], stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
        proc = self.login.run(cmd, stdin=stdin)
        if no_slurm_on_remote(proc):
            if cmd[0] == "sacct":  # accounting is optional: as a missing sacct here
                raise SchedulerUnavailable("no sacct")
            raise self.no_slurm(_last_line(proc.stderr) or f"{cmd[0]}: command not found")
        return proc

    def snapshot(self, job_id: str, job_dir: str, names: list[str]
                 ) -> tuple[Optional[SlurmJob], Optional[str], dict[str, str]]:
        sep = f"__txe_{uuid.uuid4().hex}__"
        proc = self.login.run_script(_SNAPSHOT, [sep, job_id, job_dir, *names])
        if proc.returncode != 0 or not proc.stdout.startswith(sep):
            raise SchedulerUnavailable(f"{self.login.name}: reading job {job_id} failed: {_last_line(proc.stderr)}")
        job: Optional[SlurmJob] = None
        err: Optional[str] = None
        files: dict[str, str] = {}
        for header, body in parse_sections(proc.stdout, sep):
            kind, _, rest = header.partition(" ")
            if kind == "scontrol":
                done = subprocess.CompletedProcess(["scontrol"], int(rest), body, body)
                if no_slurm_on_remote(done):
                    raise self.no_slurm(_last_line(body))
                if done.returncode == 0:
                    job = parse_scontrol_job(body, job_id)
                elif unreachable(done):
                    err = body.strip()
            elif kind == "sacct" and rest == "0" and self._accounting is not False:
                job = parse_sacct(body, job_id)
            elif kind == "file":
                files[rest] = body
        return job, err, files

    def squeue_jobs(self) -> list[dict[str, Any]]:
        """The login user's jobs in ONE round trip: ``squeue --me`` in the compact format.

        Not ``--json`` here: Slurm 22.05's ``squeue --json`` ignores its filters, so it would carry
        every user's jobs over the connection (~3 kB each); this sends ~50 bytes per job of ours.
        A Slurm without ``--me`` (before 20.11) gets the local path's ``--json`` call instead.
        """
        proc = self.run(["squeue", "--me", *_SQUEUE_FORMAT])
        if proc.returncode == 0:
            return parse_squeue_format(proc.stdout)
        if unreachable(proc):
            raise SchedulerUnavailable(f"squeue on {self.login.name} could not reach slurmctld: {proc.stderr.strip()}")
        return super().squeue_jobs()

    def read_bytes_from(self, path: str, offset: int, limit: int) -> bytes:
        """At most ``limit`` bytes of the remote file ``path`` from ``offset`` on (b"" while it does
        not exist): a long log comes in bounded answers, each well within the command timeout."""
        # GNU dd's byte-addressed skip/count: one process, no shell pipe (tail -c | head -c)
        proc = self.login.run_bytes(["dd", f"if={path}", "iflag=skip_bytes,count_bytes", f"skip={offset}",
                                     f"count={limit}", f"bs={min(limit, 1 << 20)}", "status=none"])
        return proc.stdout if proc.returncode == 0 else b""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
