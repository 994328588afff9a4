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
    <role>/<replica>/reason  "after N attempts (...)" once its restarts are used up
    restarts                a line per restart inside the allocation: "<budget unit> <why>"
    requeues                how many times Slurm requeued the job (SLURM_RESTART_COUNT)
    result                  "<exit code> <role>/<replica that decided it>", written last

The batch script's own output goes to ``<job_dir>/slurm-out/slurm-<job id>.out`` (Slurm needs an
existing directory for it before the job id is known: ``slurm-out`` is made 0700 before submission).

Privacy: the script's first command is ``umask 077``, so the job directory and everything in it are
0700/0600 from creation; ``sbatch`` runs under ``umask 077`` too, which Slurm applies to its own
output file. The replicas' processes get the submitter's umask back (``TORCHX_EXT_UMASK`` in
sbatch's environment, handed to each ``srun`` as ``SLURM_UMASK``): files a job writes for others
to read (a checkpoint in a shared project directory) are as shareable as without torchx-ext.

Quoting: the body is bash, every user value goes through :func:`shlex.quote`; ``#SBATCH`` lines are
read by sbatch's own tokenizer (double quotes with backslash escapes, see :func:`sbatch_word`).
"""

from __future__ import annotations

import re
import shlex
import signal
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torchx.specs import AppState

from torchx_ext.engine import rules

# Stands for the Slurm job id in argv/env until the script is rendered (TorchX's ${app_id} macro):
# the id only exists once sbatch has answered, so the script reads it from $SLURM_JOB_ID.
APP_ID_TOKEN = "\x00TORCHX_EXT_APP_ID\x00"
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
    """A bash word for ``value``; :data:`APP_ID_TOKEN` becomes ``"$SLURM_JOB_ID"``."""
    if APP_ID_TOKEN not in value:
        return shlex.quote(value)
    parts = value.split(APP_ID_TOKEN)
    return '"$SLURM_JOB_ID"'.join(shlex.quote(p) if p else "" for p in parts)


def _readable_word(value: str) -> str:
    """:func:`sh_word`, double-quoted where that needs no escape (a name with single quotes)."""
    return f'"{value}"' if re.fullmatch(r"[^\x00-\x1f$`\"\\!]*", value) else sh_word(value)


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


@dataclass
class ScriptSpec:
    """Everything the script is made of. ``job_opts`` go to the first component only."""

    app_name: str
    job_root: str
    job_opts: list[str]
    shared_opts: list[str]  # repeated in every component (partition, time, account, ...)
    dependencies: list[str]
    components: list[RoleComponent]
    container: bool = False  # replicas run in a container image (no watchdog: see _TXE_TASK)
    retry_backoff_s: float = 0.0
    # remote mode: the app id is "<login>:<job id>" (it names the cluster); "" (local): the job id
    app_id_prefix: str = ""

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScriptSpec:
        """The inverse of ``dataclasses.asdict`` (a record's request, read back)."""
        comps = [RoleComponent(**{**c, "replicas": [ReplicaCommand(**r) for r in c["replicas"]]})
                 for c in d["components"]]
        return ScriptSpec(**{**d, "components": comps})

    @property
    def heterogeneous(self) -> bool:
        return len(self.components) > 1


# The runtime part of every script: plain bash (4.2+), no Python needed on the nodes. Kept
# verbatim in the script so a user can read (and re-submit) exactly what ran.
RUNTIME = r"""
# ---- torchx-ext runtime: identical in every script -----------------------------------------
_TXE_SRUN=$(command -v srun) || { echo "torchx-ext: srun not found on $(hostname)" >&2; exit 1; }
_TXE_PERL=$(command -v perl || true)

# _txe_stamp TAG: prefixes each line of stdin with "<unix time> TAG " (perl if present: fast).
_txe_stamp() {
  if [[ -n $_TXE_PERL ]]; then
    "$_TXE_PERL" -MTime::HiRes=time -e '$|=1; my $t = shift;
      while (<STDIN>) { $_ .= "\n" unless /\n\z/; printf "%.6f %s %s", time, $t, $_ }' "$1"
  else
    local LC_ALL=C line
    while IFS= read -r line || [[ -n $line ]]; do
      printf '%s %s %s\n' "${EPOCHREALTIME:-$(date +%s)}" "$1" "$line"
    done
  fi
}

# _txe_nodes NODELIST TASKS_PER_NODE N: the node of each of N replicas, one per line, in the
# block order Slurm allocated the tasks (TASKS_PER_NODE looks like "2(x3),1").
_txe_nodes() {
  local nodes=() counts=() part k i=0 c
  mapfile -t nodes < <(scontrol show hostnames "$1")
  IFS=, read -ra parts <<<"$2"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((k = 0; k < BASH_REMATCH[2]; k++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
      counts+=("$part")
    fi
  done
  for ((k = 0; k < ${#nodes[@]} && i < $3; k++)); do
    for ((c = 0; c < ${counts[k]:-1} && i < $3; c++, i++)); do echo "${nodes[k]}"; done
  done
  for ((; i < $3; i++)); do echo "${nodes[i % ${#nodes[@]}]}"; done  # layout unknown: round robin
}

# _txe_addr NODE: the address others reach NODE at (its NodeAddr; the name if unknown).
declare -A _TXE_ADDR_CACHE
_txe_addr() {
  if [[ -z ${_TXE_ADDR_CACHE[$1]:-} ]]; then
    local out; out=$(scontrol show node -o "$1" 2>/dev/null)
    if [[ $out =~ (^|[[:space:]])NodeAddr=([^[:space:]]+) ]]; then
      _TXE_ADDR_CACHE[$1]=${BASH_REMATCH[2]}
    else
      _TXE_ADDR_CACHE[$1]=$1
    fi
  fi
  echo "${_TXE_ADDR_CACHE[$1]}"
}

# _txe_hosts NODE...: comma-separated addresses of the nodes, in order.
_txe_hosts() {
  local out=() n
  for n in "$@"; do out+=("$(_txe_addr "$n")"); done
  (IFS=,; echo "${out[*]}")
}

# The step's task: `bash -c "$_TXE_TASK" torchx-ext COMMAND...` starts a watchdog outside the
# step's process tree, then becomes COMMAND (exec: same pid, argv exactly as given). Slurm's
# proctrack/linuxproc (clusters without cgroups) follows parent pids, so a child forked at the
# instant of a cancel, or one that daemonizes, escapes scancel. The watchdog waits for the
# replica's process to end, then kills every process carrying the replica's token in its
# environment, wherever it went. Under proctrack/cgroup it is redundant and harmless.
_TXE_TASK='
if [[ $0 == torchx-ext-watchdog ]]; then
  mark="TORCHX_EXT_REPLICA_TOKEN=$2"
  while { read -r s <"/proc/$1/stat"; } 2>/dev/null; do
    read -ra f <<<"${s##*) }"
    [[ ${f[0]} != Z && ${f[19]} == "$3" ]] || break  # a zombie, or the pid was reused
    sleep 0.5
  done
  for ((i = 0; i < 50; i++)); do
    mapfile -t left < <(grep -lzxF -- "$mark" /proc/[0-9]*/environ 2>/dev/null)
    ((${#left[@]})) || break
    for e in "${left[@]}"; do e=${e#/proc/}; kill -KILL "${e%/environ}" 2>/dev/null; done
    sleep 0.1
  done
  exit 0
fi
export TORCHX_EXT_REPLICA_TOKEN="${SLURM_JOB_ID:-}.${SLURM_STEP_ID:-}.$$.$RANDOM$RANDOM"
read -r s <"/proc/$$/stat"; read -ra f <<<"${s##*) }"
# ( ... & ) returns once the watchdog is orphaned: from then on no kill of this tree reaches it
( env -i PATH="$PATH" setsid bash -c "$BASH_EXECUTION_STRING" torchx-ext-watchdog \
    "$$" "$TORCHX_EXT_REPLICA_TOKEN" "${f[19]}" </dev/null >/dev/null 2>&1 & )
unset s f
command -v -- "$1" >/dev/null || { echo "torchx-ext: $1: command not found on $(hostname)" >&2; exit 127; }
exec -- "$@"'

# _txe_replica DIR NODE COMMAND...: starts one replica's step in the background; its output is
# stamped into DIR/log, its exit code lands in DIR/exit (written last, atomically).
_txe_replica() {
  local dir=$1 node=$2; shift 2
  mkdir -p "$dir"
  echo "$node $(_txe_addr "$node")" >"$dir/host"
  (
    set -o pipefail
    { { "$@" 2>&1 1>&3 3>&- </dev/null & echo "$!" >"$dir/pid"; wait "$!"; } \
        | _txe_stamp E >>"$dir/log"; } 3>&1 | _txe_stamp O >>"$dir/log"
    echo "$?" >"$dir/exit.tmp" && mv -f "$dir/exit.tmp" "$dir/exit"
  ) &
}

# Restarts (Role.max_retries x retry_policy). Per replica i the script's tables give: _TXE_D[i]
# its directory, _TXE_NAME[i] "role 'a' replica 0", _TXE_SVC[i] 1 for a service, _TXE_MAXR[i] and
# _TXE_POL[i] its role's budget and policy, _TXE_UNIT[i] the budget it draws on, _TXE_SCOPE[i] the
# replicas that restart with it; _TXE_DELAY_US[n] is the wait before a unit's n-th restart. A
# budget's use is the job directory's "restarts" file (a line per restart), so it survives a
# requeue; each replica's "attempt" file holds the number of its last started attempt.
declare -a _TXE_ATT=() _TXE_USED=() _TXE_DUE=()

_txe_us() { _TXE_US=${EPOCHREALTIME//[.,]/}; [[ -n $_TXE_US ]] || _TXE_US=$(date +%s%6N); }

# _txe_mark I TEXT: "[torchx-ext] attempt N of <replica I> TEXT" in replica I's log, as stderr.
_txe_mark() {
  local d=${_TXE_D[$1]}
  mkdir -p "$d"
  printf '%s E [torchx-ext] attempt %s of %s %s\n' "${EPOCHREALTIME:-$(date +%s)}" \
    "$((${_TXE_ATT[$1]:-0} + 1))" "${_TXE_NAME[$1]}" "$2" >>"$d/log"
}

# _txe_start I: starts replica I's next attempt (its step function _txe_r_I).
_txe_start() {
  _TXE_ATT[$1]=$((${_TXE_ATT[$1]:-0} + 1))
  mkdir -p "${_TXE_D[$1]}"
  echo "${_TXE_ATT[$1]}" >"${_TXE_D[$1]}/attempt"
  _TXE_ATTEMPT=${_TXE_ATT[$1]}
  "_txe_r_$1"
}

# _txe_begin: the first start of every replica, in this run of the job (Slurm may requeue it).
_txe_begin() {
  local i u rest n=0
  for i in "${!_TXE_D[@]}"; do
    read -r _TXE_ATT[i] 2>/dev/null <"${_TXE_D[i]}/attempt" || _TXE_ATT[i]=0
  done
  if [[ -f $_TXE_DIR/restarts ]]; then
    while read -r u rest; do _TXE_USED[u]=$((${_TXE_USED[u]:-0} + 1)); done <"$_TXE_DIR/restarts"
  fi
  read -r n 2>/dev/null <"$_TXE_DIR/requeues" || n=0
  if ((${SLURM_RESTART_COUNT:-0} > n)); then  # a requeue: counted, not drawn from any budget
    echo "$SLURM_RESTART_COUNT" >"$_TXE_DIR/requeues"
    for i in "${!_TXE_D[@]}"; do
      _txe_mark "$i" "begins: Slurm requeued the job (requeue $SLURM_RESTART_COUNT)"
    done
  fi
  for i in "${!_TXE_D[@]}"; do _txe_start "$i"; done
}

# _txe_ended I: replica I's attempt has ended (code in _TXE_C) and no restart of it is pending.
_txe_ended() {
  [[ -z ${_TXE_DUE[$1]:-} && -f ${_TXE_D[$1]}/exit ]] || return 1
  read -r _TXE_C <"${_TXE_D[$1]}/exit"
}

# _txe_settle I...: waits (up to 60 s; srun ends a step with SIGTERM, then SIGKILL after
# KillWait) until these replicas have no step left running.
_txe_settle() {
  local i k pending
  for ((k = 0; k < 300; k++)); do
    pending=0
    for i in "$@"; do [[ -n ${_TXE_DUE[i]:-} || -f ${_TXE_D[i]}/exit ]] || pending=1; done
    ((pending)) || return 0
    sleep 0.2
  done
}

# _txe_restart I CODE: replica I ended with CODE and wants a restart. Schedules its scope's
# restart if I's budget has one left (returns 0); otherwise records the attempts (returns 1).
_txe_restart() {
  local i=$1 c=$2 u=${_TXE_UNIT[$1]} n j why
  n=${_TXE_USED[u]:-0}
  if ((n >= _TXE_MAXR[i])); then
    ((_TXE_MAXR[i])) &&
      echo "after $((n + 1)) attempts (${_TXE_POL[i]} policy, max_retries=${_TXE_MAXR[i]})" >"${_TXE_D[i]}/reason"
    return 1
  fi
  _TXE_USED[u]=$((n + 1))
  if ((c > 128 && c <= 192)) && j=$(kill -l "$((c - 128))" 2>/dev/null); then
    why="${_TXE_NAME[i]} ended with signal SIG$j"
  else
    why="${_TXE_NAME[i]} ended with exit code $c"
  fi
  echo "$u $why" >>"$_TXE_DIR/restarts"
  # from here on describe shows I waiting for its restart, not failed (the scope may take a while)
  _TXE_DUE[i]=0; rm -f "${_TXE_D[i]}"/{exit,pid,host}
  for j in ${_TXE_SCOPE[i]}; do
    [[ -z ${_TXE_DUE[j]:-} && ! -f ${_TXE_D[j]}/exit && -f ${_TXE_D[j]}/pid ]] &&
      kill -TERM "$(<"${_TXE_D[j]}/pid")" 2>/dev/null
  done
  _txe_settle ${_TXE_SCOPE[i]}
  _txe_us
  for j in ${_TXE_SCOPE[i]}; do
    rm -f "${_TXE_D[j]}"/{exit,pid,stopped,host,reason}
    _TXE_DUE[j]=$((_TXE_US + ${_TXE_DELAY_US[n + 1]:-0}))
    _txe_mark "$j" "begins: $why; ${_TXE_POL[i]} policy, restart $((n + 1)) of ${_TXE_MAXR[i]}"
  done
}

_txe_start_due() {
  local j
  ((${#_TXE_DUE[@]})) || return 0
  _txe_us
  for j in "${!_TXE_DUE[@]}"; do
    ((_TXE_DUE[j] <= _TXE_US)) || continue
    unset '_TXE_DUE[j]'
    _txe_start "$j"
  done
}

# _txe_group: the group rules. Ends when every main replica succeeded, or a main replica failed
# (or a service ended) with no restart left; stops what still runs; records the verdict; exits
# with its code. _TXE_MAIN and _TXE_SERVICES list replica numbers.
_txe_group() {
  local i code=0 culprit= pending
  _txe_begin
  while :; do
    pending=0
    for i in "${_TXE_MAIN[@]}"; do
      _txe_ended "$i" || { pending=1; continue; }
      [[ $_TXE_C == 0 ]] && continue
      _txe_restart "$i" "$_TXE_C" && { pending=1; continue; }
      code=$_TXE_C; culprit=${_TXE_D[i]}; break 2
    done
    [[ $pending == 0 ]] && break
    for i in "${_TXE_SERVICES[@]}"; do
      _txe_ended "$i" || continue
      _txe_restart "$i" "$_TXE_C" && continue
      code=$_TXE_C; [[ $code == 0 ]] && code=1; culprit=${_TXE_D[i]}; break 2
    done
    _txe_start_due
    sleep 0.2
  done
  for i in "${!_TXE_D[@]}"; do
    [[ -n ${_TXE_DUE[i]:-} || -f ${_TXE_D[i]}/exit ]] && continue
    : >"${_TXE_D[i]}/stopped"
    [[ -f ${_TXE_D[i]}/pid ]] && kill -TERM "$(<"${_TXE_D[i]}/pid")" 2>/dev/null
  done
  _txe_settle "${!_TXE_D[@]}"
  echo "$code ${culprit#"$_TXE_DIR/"}" >"$_TXE_DIR/result.tmp" && mv -f "$_TXE_DIR/result.tmp" "$_TXE_DIR/result"
  if ((code > 255)); then code=1; fi
  exit "$code"
}
# ---- end of the runtime --------------------------------------------------------------------
"""


def _sbatch_line(words: list[str]) -> str:
    return "#SBATCH " + " ".join(sbatch_word(w) for w in words)


# Over 60 lines: one function so that the generated script reads in the order it runs (header,
# options per het component, tables, runtime, steps); each piece is a helper call or a line.
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
    out.append('umask 077; _TXE_UMASK=${TORCHX_EXT_UMASK:-0077}')
    # <job id>.<submission>: a job id Slurm gives again (its state was reset) gets a new directory
    out.append(f"_TXE_DIR={sh_word(spec.job_root)}/\"$SLURM_JOB_ID${{TORCHX_EXT_SUBMISSION:+.$TORCHX_EXT_SUBMISSION}}\"")
    out.append('mkdir -p "$_TXE_DIR" || exit 1')
    if spec.app_id_prefix:
        # remote: submitted from stdin in one round trip; the job keeps its script (Slurm's spooled
        # copy, $0) in its private directory, as local mode does at submission
        # (cat, not cp: a new file, 0600 under the umask; cp would keep the spooled copy's x bits)
        out.append('cat -- "$0" >"$_TXE_DIR/script.sbatch" 2>/dev/null || :')
    out.append(RUNTIME.strip("\n"))
    out.append("")
    out.append("# a requeued job starts over: forget the previous run's exit codes (logs are kept)")
    dirs = " ".join(f'"$_TXE_DIR"/{sh_word(c.dirname)}' for c in spec.components)
    out.append(f'rm -f "$_TXE_DIR/result"; for _d in {dirs}; do rm -f "$_d"/*/{{exit,pid,stopped,host,reason}}; done')
    out.append("")
    out.append("# where each replica runs, and the discovery environment every replica gets")
    env_words = [sh_word(f"TORCHX_EXT_APP_ID={spec.app_id_prefix}{APP_ID_TOKEN}") if spec.app_id_prefix
                 else 'TORCHX_EXT_APP_ID="$SLURM_JOB_ID"']
    for g, comp in enumerate(spec.components):
        sfx = f"_HET_GROUP_{g}" if spec.heterogeneous else ""
        out.append(
            f'mapfile -t _TXE_NODES_{g} < <(_txe_nodes "$SLURM_JOB_NODELIST{sfx}" '
            f'"$SLURM_TASKS_PER_NODE{sfx}" {comp.num_replicas})'
        )
        out.append(f'_TXE_HOSTS_{g}=$(_txe_hosts "${{_TXE_NODES_{g}[@]}}")')
        env_words.append(f'TORCHX_EXT_HOSTS_{comp.env_suffix}="$_TXE_HOSTS_{g}"')
    out.append("_TXE_ENV=(" + " ".join(env_words) + ")")
    out.append("")
    main: list[str] = []
    services: list[str] = []
    table: dict[str, list[str]] = {k: [] for k in ("D", "NAME", "SVC", "MAXR", "POL", "UNIT", "SCOPE")}
    pairs = [(c.name, r.replica_id) for c in spec.components for r in c.replicas]
    units: dict[str, int] = {}
    i = 0
    for g, comp in enumerate(spec.components):
        het = [f"--het-group={g}"] if spec.heterogeneous else []
        for rep in comp.replicas:
            rdir = f'"$_TXE_DIR"/{sh_word(comp.dirname)}/{rep.replica_id}'
            (services if comp.service else main).append(str(i))
            unit = rules.retry_unit(comp.retry_policy, comp.name, rep.replica_id)
            scope = rules.restart_scope(comp.retry_policy, comp.name, rep.replica_id, pairs)
            for key, value in (("D", rdir), ("NAME", _readable_word(f"role '{comp.name}' replica {rep.replica_id}")),
                               ("SVC", str(int(comp.service))), ("MAXR", str(comp.max_retries)),
                               ("POL", comp.retry_policy), ("UNIT", str(units.setdefault(unit, len(units)))),
                               ("SCOPE", sh_word(" ".join(str(pairs.index(p)) for p in scope)))):
                table[key].append(value)
            # the discovery variables come last: `env` applies assignments in order, so they win
            env = [
                f'TORCHX_RANK0_HOST="${{_TXE_HOSTS_{g}%%,*}}"',
                *[sh_word(f"{k}={v}") for k, v in rep.env.items()],
                '"${_TXE_ENV[@]}"',
                f"TORCHX_EXT_ROLE={sh_word(comp.name)}",
                f"TORCHX_EXT_REPLICA_ID={rep.replica_id}",
                f"TORCHX_EXT_NUM_REPLICAS={comp.num_replicas}",
                'TORCHX_EXT_ATTEMPT="$_TXE_ATTEMPT"',
                'SLURM_UMASK="$_TXE_UMASK"',  # srun gives the step's tasks this umask, not the script's 077
            ]
            # in a container (pyxis) the image need not have bash; its clusters track by cgroup
            task = "" if spec.container else 'bash -c "$_TXE_TASK" torchx-ext '
            srun = [*het, f'--nodelist="${{_TXE_NODES_{g}[{rep.replica_id}]}}"',
                    *[sh_word(o) for o in comp.srun_opts]]
            out.append(f"# role {comp.name!r} replica {rep.replica_id}: replica {i} of the tables below")
            out.append(
                f"_txe_r_{i}() {{\n"
                f'  _txe_replica {rdir} "${{_TXE_NODES_{g}[{rep.replica_id}]}}" \\\n'
                f'    env -- {" ".join(env)} \\\n'
                f'    "$_TXE_SRUN" {" ".join(srun)} \\\n'
                f"    {task}{' '.join(sh_word(a) for a in rep.argv)}\n"
                "}"
            )
            i += 1
    out.append("")
    out.append("# per replica: directory, name, service?, its role's max_retries and retry_policy, the budget")
    out.append("# it draws on and the replicas that restart with it (see _txe_restart)")
    for key, values in table.items():
        out.append(f"_TXE_{key}=(" + " ".join(values) + ")")
    most = max((c.max_retries for c in spec.components), default=0)
    delays = [0] + [round(rules.backoff_s(spec.retry_backoff_s, n) * 1e6) for n in range(1, most + 1)]
    out.append("_TXE_DELAY_US=(" + " ".join(map(str, delays)) + ")  # before a unit's restart n (retry_backoff_s)")
    out.append("_TXE_MAIN=(" + " ".join(main) + ")")
    out.append("_TXE_SERVICES=(" + " ".join(services) + ")")
    out.append("_txe_group")
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
