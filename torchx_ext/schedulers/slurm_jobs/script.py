"""The pure half of ``slurm_jobs``: the sbatch script it submits and the reading of Slurm's answers.

Nothing here runs a command or touches the cluster, so all of it is tested without Slurm.

The script is what ``--dryrun`` prints and what ``sbatch`` receives, byte for byte; tests compare it
with reference files under ``tests/slurm_reference/``. Layout of what it writes, under
``<job_dir>/<job id>.<submission>/`` (``<job_dir>`` defaults to ``$TORCHX_EXT_HOME/slurm_jobs``;
``<submission>``: a token of the submission, ``$TORCHX_EXT_SUBMISSION`` in sbatch's environment,
because Slurm gives a job id again once its state is reset, and a new job must never append to
an old job's logs or read its exit codes)::

    <role>/<replica>/log    every output line as "<unix time> <O|E> <text>" (O: stdout, E: stderr)
    <role>/<replica>/exit   the replica's exit code (srun's: 128+N when killed by signal N)
    <role>/<replica>/host   "<node> <address>" it ran on
    <role>/<replica>/stopped present when the group stopped it (services at the end, or the
                            rest of the group after a failure)
    <role>/<replica>/attempt the number of its last started attempt (TORCHX_EXT_ATTEMPT)
    <role>/<replica>/reason  "after N attempts (...)" once its restarts are used up (a service stopped
                            because it was not ready in time: why)
    restarts                a line per restart inside the allocation: "<budget unit> <why>"
    requeues                how many times Slurm requeued the job (SLURM_RESTART_COUNT)
    result                  "<exit code> <role>/<replica that decided it>", written last
    verdict                 the engine's message when it decided without a replica's end (a service
                            not ready within ready_timeout_s), before result
    error                   one line: why the app failed before its engine could decide (no node
                            Python, no srun, a crash of the launcher)
    engine.json             the engine's snapshot (a requeued job goes on from it)
    node/txe_node/          what the script ships: the engine and its Slurm launcher

Every decision (restarts, budgets, backoff, the verdict and its messages) is made by the group
engine (:mod:`torchx_ext.engine`), run on the batch node by :mod:`.node` with the node's
Python (run option ``node_python``); the script itself only prepares the job directory and starts it.

The batch script's own output goes to ``<job_dir>/slurm-out/slurm-<job id>.out`` (Slurm needs an
existing directory for it before the job id is known: ``slurm-out`` is made 0700 before submission).

Privacy: the script's first command is ``umask 077``, so the job directory and everything in it are
0700/0600 from creation; ``sbatch`` runs under ``umask 077`` too, which Slurm applies to its own
output file. The replicas' processes get the submitter's umask back (``TORCHX_EXT_UMASK`` in
sbatch's environment, handed to each ``srun`` as ``SLURM_UMASK``): files a job writes for others
to read (a checkpoint in a shared project directory) are as shareable as without torchx-ext.

Quoting: the body is bash, every value in it goes through :func:`shlex.quote`; the replicas'
argv and env reach the launcher as JSON (a quoted heredoc: no expansion), exact to the byte; ``#SBATCH`` lines are
read by sbatch's own tokenizer (double quotes with backslash escapes, see :func:`sbatch_word`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torchx.specs import AppState

from torchx_ext.engine.rules import READY_TIMEOUT_S
from torchx_ext.schedulers.slurm_jobs.node import APP_ID_TOKEN as APP_ID_TOKEN  # (re-exported)

MARKER = "torchx-ext:slurm_jobs"  # --comment of our jobs: `list` finds them in one squeue call

_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]*$")


def sbatch_word(value: str) -> str:
    """One word of an ``#SBATCH`` line, as sbatch's tokenizer reads it back.

    sbatch splits ``#SBATCH`` lines on whitespace, honours double quotes and backslash escapes,
    and stops at ``#``. A newline cannot be carried at all, so it is an error.
    """
    if "\n" in value or "\r" in value:
        raise ValueError(f"an sbatch option cannot contain a line break: {value!r}")
    if _SBATCH_SAFE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sh_word(value: str) -> str:
    """A bash word for ``value``."""
    return shlex.quote(value)


@dataclass
class ReplicaCommand:
    """One replica: its command line and its own environment (discovery env is added at run time)."""

    replica_id: int
    argv: list[str]
    env: dict[str, str]


@dataclass
class RoleComponent:
    """One role = one component of the (heterogeneous) job."""

    name: str
    dirname: str  # the role's directory under the job dir (a filesystem-safe role name)
    env_suffix: str  # TORCHX_EXT_HOSTS_<env_suffix>
    service: bool
    num_replicas: int
    sbatch_opts: list[str]  # this component's resources and placement
    srun_opts: list[str]  # every replica's step options (resources, chdir, container, ...)
    replicas: list[ReplicaCommand] = field(default_factory=list)
    max_retries: int = 0  # Role.max_retries
    retry_policy: str = "APPLICATION"  # Role.retry_policy, by value
    ports: list[int] = field(default_factory=list)  # a service's: the others start once they accept


@dataclass
class ScriptSpec:
    """Everything the script is made of. ``job_opts`` go to the first component only."""

    app_name: str
    job_root: str
    job_opts: list[str]
    shared_opts: list[str]  # repeated in every component (partition, time, account, ...)
    dependencies: list[str]
    components: list[RoleComponent]
    container: bool = False  # replicas run in a container image (no watchdog: see node.STEP_TASK)
    retry_backoff_s: float = 0.0
    ready_timeout_s: float = READY_TIMEOUT_S
    # remote mode: the app id is "<login>:<job id>" (it names the cluster); "" (local): the job id
    app_id_prefix: str = ""
    node_python: str = "python3"  # the batch node's interpreter of the engine (run option node_python)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScriptSpec:
        """The inverse of ``dataclasses.asdict`` (a record's request, read back)."""
        comps = [RoleComponent(**{**c, "replicas": [ReplicaCommand(**r) for r in c["replicas"]]})
                 for c in d["components"]]
        return ScriptSpec(**{**d, "components": comps})

    @property
    def heterogeneous(self) -> bool:
        return len(self.components) > 1


# What the batch script ships to the node, by its path under <job dir>/node/: the group engine (with
# probe.py, the readiness connect) and its Slurm launcher, standard library only, run by the node's
# Python (nothing of torchx-ext need be installed there). The script holds their text, so a user reads
# (and can re-submit) exactly what ran.
_PKG = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # torchx_ext/
SHIPPED = {
    "txe_node/__init__.py": None,
    "txe_node/engine/__init__.py": os.path.join(_PKG, "engine", "__init__.py"),
    "txe_node/engine/machine.py": os.path.join(_PKG, "engine", "machine.py"),
    "txe_node/engine/probe.py": os.path.join(_PKG, "engine", "probe.py"),
    "txe_node/engine/rules.py": os.path.join(_PKG, "engine", "rules.py"),
    "txe_node/schedulers/__init__.py": None,
    "txe_node/schedulers/slurm_jobs/__init__.py": None,
    "txe_node/schedulers/slurm_jobs/node.py": os.path.join(_PKG, "schedulers", "slurm_jobs", "node.py"),
}
HEREDOC_END = "TXE_EOF"
# -I: the user's PYTHONPATH/PYTHONSTARTUP are the replicas' business, not the launcher's
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from txe_node.schedulers.slurm_jobs.node import main; sys.exit(main(sys.argv[2:]))")


def _heredoc(text: str) -> str:
    if f"\n{HEREDOC_END}\n" in f"\n{text}\n":
        raise ValueError(f"a line of the shipped text is {HEREDOC_END!r}")
    return f"<<'{HEREDOC_END}'\n{text.rstrip(chr(10))}\n{HEREDOC_END}"


def shipped_sources() -> dict[str, str]:
    """``{path under <job dir>/node: text}`` of what the script ships."""
    out = {}
    for rel, src in SHIPPED.items():
        if src is None:
            out[rel] = ""
        else:
            with open(src, encoding="utf-8") as f:
                out[rel] = f.read()
    return out


def launcher_spec(spec: ScriptSpec) -> dict[str, Any]:
    """What the node launcher reads (on its stdin): the replicas and how to start them."""
    keys = ("name", "dirname", "env_suffix", "service", "num_replicas", "srun_opts", "max_retries", "retry_policy",
            "ports")
    return {"components": [{**{k: getattr(c, k) for k in keys},
                            "replicas": [{"replica_id": r.replica_id, "argv": r.argv, "env": r.env}
                                         for r in c.replicas]} for c in spec.components],
            "container": spec.container, "retry_backoff_s": spec.retry_backoff_s,
            "ready_timeout_s": spec.ready_timeout_s,
            "app_id_prefix": spec.app_id_prefix}


def _sbatch_line(words: list[str]) -> str:
    return "#SBATCH " + " ".join(sbatch_word(w) for w in words)


# One function so that the generated script reads in the order it runs (header, options per het
# component, the node Python's check, the shipped engine, the launcher's start).
def render(spec: ScriptSpec) -> str:
    """The complete sbatch script of ``spec``."""
    out = [
        "#!/bin/bash",
        f"# torchx-ext slurm_jobs: app {spec.app_name!r}, "
        f"{len(spec.components)} role(s); generated from the AppDef, do not edit by hand.",
    ]
    first = list(spec.job_opts)
    if spec.dependencies:
        # afterok, and let Slurm cancel us at once if a dependency fails (never pending forever)
        first += [f"--dependency=afterok:{':'.join(spec.dependencies)}", "--kill-on-invalid-dep=yes"]
    for g, comp in enumerate(spec.components):
        if g:
            out.append("#SBATCH hetjob")
        if g == 0:
            out.extend(_sbatch_line([w]) for w in first)
        kind = "service role" if comp.service else "role"
        out.append(f"# {kind} {comp.name!r}: {comp.num_replicas} replica(s)")
        out.extend(_sbatch_line([w]) for w in [*spec.shared_opts, *comp.sbatch_opts])
    out.append("")
    # before anything else: the job directory, logs, exit codes and the script's copy (which holds
    # Role.env values) are the user's only from birth, whatever umask the job inherited
    # the replicas keep the submitter's umask (TORCHX_EXT_UMASK, passed by sbatch's environment;
    # sbatch itself runs under 077): their files are theirs to share, ours are not
    out.append("umask 077")
    # <job id>.<submission>: a job id Slurm gives again (its state was reset) gets a new directory
    out.append(f"_TXE_DIR={sh_word(spec.job_root)}/\"$SLURM_JOB_ID${{TORCHX_EXT_SUBMISSION:+.$TORCHX_EXT_SUBMISSION}}\"")
    out.append('mkdir -p "$_TXE_DIR" || exit 1')
    if spec.app_id_prefix:
        # remote: submitted from stdin in one round trip; the job keeps its script (Slurm's spooled
        # copy, $0) in its private directory, as local mode does at submission
        # (cat, not cp: a new file, 0600 under the umask; cp would keep the spooled copy's x bits)
        out.append('cat -- "$0" >"$_TXE_DIR/script.sbatch" 2>/dev/null || :')
    out.append("")
    out.append("# the node's Python runs the group engine (run option node_python); without it, one line says so")
    out.append(f"_TXE_PY={sh_word(spec.node_python)}")
    out.append('rm -f "$_TXE_DIR/error"')
    out.append('if ! command -v -- "$_TXE_PY" >/dev/null; then')
    out.append('  _TXE_WHY="the node Python \'$_TXE_PY\' (run option node_python) is not found on $(hostname)"')
    out.append("elif ! \"$_TXE_PY\" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then")
    out.append('  _TXE_WHY="the node Python \'$_TXE_PY\' (run option node_python) on $(hostname) is not Python >= 3.8"')
    out.append("fi")
    out.append('if [[ -n ${_TXE_WHY:-} ]]; then echo "torchx-ext: $_TXE_WHY" >&2; echo "$_TXE_WHY" >"$_TXE_DIR/error"; '
               "exit 1; fi")
    out.append("")
    out.append("# the engine and its launcher (torchx_ext/engine, torchx_ext/schedulers/slurm_jobs/node.py)")
    out.append('mkdir -p "$_TXE_DIR"/node/txe_node/{engine,schedulers/slurm_jobs} || exit 1')
    for rel, text in shipped_sources().items():
        out.append(f'cat >"$_TXE_DIR/node/{rel}" {_heredoc(text)}' if text else f': >"$_TXE_DIR/node/{rel}"')
    out.append("")
    out.append("# the replicas, and how each is started (srun); the launcher decides nothing, the engine does.")
    shown = "".join(c if c.isprintable() else "?" for c in spec.app_id_prefix)  # (a comment: one line)
    out.append(f"# Every replica gets TORCHX_EXT_APP_ID={shown}$SLURM_JOB_ID, TORCHX_EXT_HOSTS_<ROLE> (node addresses,")
    out.append("# by replica), TORCHX_RANK0_HOST, TORCHX_EXT_ROLE, _REPLICA_ID, _NUM_REPLICAS, _ATTEMPT; SLURM_UMASK.")
    out.append(f"exec \"$_TXE_PY\" -I -c {sh_word(_BOOT)} \"$_TXE_DIR/node\" \"$_TXE_DIR\" "
               + _heredoc(json.dumps(launcher_spec(spec), indent=1)))
    return "\n".join(out) + "\n"


def parse_result(text: Optional[str]) -> Optional[tuple[int, str]]:
    """``"137 main/0"`` → ``(137, "main/0")``; None when absent or malformed."""
    if not text:
        return None
    code, _, culprit = text.strip().partition(" ")
    try:
        return int(code), culprit
    except ValueError:
        return None


# ---------------------------------------------------------------------- Slurm's answers --------
# Slurm job state → AppState (one table, read with .get(state, UNKNOWN))
SLURM_STATES: Mapping[str, AppState] = {
    "BOOT_FAIL": AppState.FAILED,
    "CANCELLED": AppState.CANCELLED,
    "COMPLETED": AppState.SUCCEEDED,
    "COMPLETING": AppState.RUNNING,
    "CONFIGURING": AppState.PENDING,
    "DEADLINE": AppState.FAILED,
    "FAILED": AppState.FAILED,
    "NODE_FAIL": AppState.FAILED,
    "OUT_OF_MEMORY": AppState.FAILED,
    "PENDING": AppState.PENDING,
    "PREEMPTED": AppState.FAILED,
    "REQUEUED": AppState.PENDING,
    "REQUEUE_FED": AppState.PENDING,
    "REQUEUE_HOLD": AppState.PENDING,
    "RESIZING": AppState.RUNNING,
    "RUNNING": AppState.RUNNING,
    "SIGNALING": AppState.RUNNING,
    "STAGE_OUT": AppState.RUNNING,
    "STOPPED": AppState.RUNNING,
    "SUSPENDED": AppState.PENDING,
    "TIMEOUT": AppState.FAILED,
}
DEP_NEVER = "DependencyNeverSatisfied"


@dataclass
class SlurmJob:
    """What slurmctld (or sacct) says about a job: its (leader) state."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: int = 0  # the batch script's exit code
    signal: int = 0
    dependency: str = ""
    nodes: str = ""  # every component's NodeList, comma-separated (scontrol only)
    restarts: int = 0  # times Slurm requeued it (scontrol only)

    @property
    def app_state(self) -> AppState:
        return app_state_of(self.state, self.reason)


def app_state_of(state: str, reason: str = "") -> AppState:
    """A Slurm state (``"CANCELLED by 0"``, ``"RUNNING"``, ...) as an AppState.

    A job Slurm cancelled because a dependency failed is FAILED: nobody cancelled it.
    """
    base = state.split()[0].split("+")[0] if state else ""
    if base == "CANCELLED" and reason == DEP_NEVER:
        return AppState.FAILED
    return SLURM_STATES.get(base, AppState.UNKNOWN)


_SCONTROL_KEYS = re.compile(r"(?:^|\s)(JobId|HetJobId|JobState|Reason|ExitCode|Dependency|NodeList|Restarts)=(\S*)")


def parse_scontrol_job(text: str, job_id: str) -> Optional[SlurmJob]:
    """The line of ``scontrol show job -o`` output whose JobId is ``job_id`` (a het job's leader).

    The keys read here come before any free-text field (Comment, Command, WorkDir); the first
    occurrence of each key wins, so text inside later fields cannot fool the parser.
    """
    found, nodes = None, []
    for line in text.splitlines():
        fields: dict[str, str] = {}
        for key, value in _SCONTROL_KEYS.findall(line):
            fields.setdefault(key, value)
        if job_id in (fields.get("JobId"), fields.get("HetJobId")) and fields.get("NodeList", "(null)") != "(null)":
            nodes.append(fields["NodeList"])  # a heterogeneous job: one line per component
        if fields.get("JobId") != job_id:
            continue
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        dep = fields.get("Dependency", "")
        found = SlurmJob(
            job_id=job_id, state=fields.get("JobState", ""), reason=fields.get("Reason", ""),
            exit_code=int(code or 0), signal=int(sig or 0), dependency="" if dep == "(null)" else dep,
            restarts=int(fields.get("Restarts", "0") or 0),
        )
    if found is not None:
        found.nodes = ",".join(dict.fromkeys(nodes))
    return found


def parse_sacct(text: str, job_id: str) -> Optional[SlurmJob]:
    """``sacct -n -P -X -o JobID,State,ExitCode,Reason`` output → the job (its het leader row)."""
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0] in (job_id, f"{job_id}+0"):
            code, _, sig = parts[2].partition(":")
            return SlurmJob(job_id=job_id, state=parts[1], reason=parts[3] if len(parts) > 3 else "",
                            exit_code=int(code or 0), signal=int(sig or 0))
    return None


def signal_reason(code: Optional[int]) -> str:
    """``137`` → ``"killed by signal 9 (SIGKILL)"`` (srun reports 128+N); "" otherwise."""
    if code is None or code <= 128 or code > 128 + 64:
        return ""
    try:
        return f"killed by signal {code - 128} ({signal.Signals(code - 128).name})"
    except ValueError:
        return f"killed by signal {code - 128}"
