"""The Slurm launcher of the group engine: it runs on the batch node, inside the allocation.

The batch script (:func:`.script.render`) writes this module and the engine
(:mod:`torchx_ext.engine`) into the job directory (``<job dir>/node/txe_node/``) and runs them
with the node's Python (run option ``node_python``), so the nodes need no torchx-ext: this module
imports the standard library and the engine only, relatively, and runs on Python >= 3.8.

It performs the engine's actions with ``srun`` steps (one step per replica attempt, placed on the
node Slurm allocated for that task; a heterogeneous job's component by ``--het-group``) and
reports what the steps did as the engine's events; every decision (restart scopes, budgets,
backoff, the verdict and its messages) is the engine's. What it leaves in the job directory is
described in :mod:`.script`; ``engine.json`` holds the engine's snapshot, so a job that
Slurm requeues goes on from it (a ``Rerun``: every replica's next attempt, drawn from no budget).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ... import engine
from ...engine.probe import start_probe

# Stands for the Slurm job id in argv/env until the job runs (TorchX's ${app_id} macro): the id
# only exists once sbatch has answered, so the launcher reads it from $SLURM_JOB_ID.
APP_ID_TOKEN = "\x00TORCHX_EXT_APP_ID\x00"
SETTLE_S = 60.0  # a stop waits this long for its steps (srun: SIGTERM, then SIGKILL after KillWait)
DRAIN_S = 5.0  # after a step ends, how long its output may still come (a daemonised child's pipes)
POLL_S = 0.2
PROBE_S = 0.1  # a readiness probe tries each port this often (a connect gives up after CONNECT_S)
CONNECT_S = 1.0

# The step's task: `bash -c STEP_TASK torchx-ext COMMAND...` starts a watchdog outside the
# step's process tree, then becomes COMMAND (exec: same pid, argv exactly as given). Slurm's
# proctrack/linuxproc (clusters without cgroups) follows parent pids, so a child forked at the
# instant of a cancel, or one that daemonizes, escapes scancel. The watchdog waits for the
# replica's process to end, then kills every process carrying the replica's token in its
# environment, wherever it went. Under proctrack/cgroup it is redundant and harmless.
STEP_TASK = r"""
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
exec -- "$@"
""".strip("\n")

Key = Tuple[str, int]


# ------------------------------------------------------------------------ placement ----
def layout(nodes: Sequence[str], tasks_per_node: str, n: int) -> List[str]:
    """The node of each of ``n`` replicas, in the block order Slurm allocated the tasks
    (``tasks_per_node`` looks like ``"2(x3),1"``; unknown: round robin for the rest)."""
    counts: List[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        m = re.fullmatch(r"(\d+)\(x(\d+)\)", part)
        counts += [int(m.group(1))] * int(m.group(2)) if m else [int(part)]
    out: List[str] = []
    for k, node in enumerate(nodes):
        out += [node] * max(0, min(counts[k] if k < len(counts) else 1, n - len(out)))
    return out + [nodes[i % len(nodes)] for i in range(len(out), n)] if nodes else out


def _scontrol(*args: str) -> str:
    proc = subprocess.run(["scontrol", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    return proc.stdout


def hostnames(nodelist: str) -> List[str]:
    """``n[1-3]`` as Slurm expands it."""
    return _scontrol("show", "hostnames", nodelist).split() if nodelist else []


_ADDR: Dict[str, str] = {}


def address(node: str) -> str:
    """The address others reach ``node`` at (its NodeAddr; the name if unknown)."""
    if node not in _ADDR:
        m = re.search(r"(?:^|\s)NodeAddr=(\S+)", _scontrol("show", "node", "-o", node))
        _ADDR[node] = m.group(1) if m else node
    return _ADDR[node]


# ------------------------------------------------------------------------- the files ----
def write(path: str, text: str) -> None:
    """``path`` replaced atomically by ``text`` (a reader never sees half of it)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def remove(directory: str, *names: str) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def end_event(key: Key, returncode: int, attempt: int) -> Tuple[int, engine.Event]:
    """(bash's ``$?``, the engine's event) of a step whose ``srun`` ended with ``returncode``
    (Popen's: -N when srun itself was killed by signal N; srun reports a task killed by signal N
    as 128+N)."""
    code = 128 - returncode if returncode < 0 else returncode
    if 128 < code <= 128 + 64:
        return code, engine.Killed(key, code - 128, attempt)
    return code, engine.Exited(key, code, attempt)


class Step:
    """One replica attempt: its ``srun`` and the threads that stamp its output into the log."""

    def __init__(self, argv: List[str], env: Dict[str, str], log: IO[bytes], ended: threading.Event) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.done = threading.Event()
        self.returncode: Optional[int] = None
        self.reported = False  # its end was told to the engine (or made moot by a stop)
        self.readers = [threading.Thread(target=self._stamp, args=(pipe, tag, log), daemon=True)
                        for pipe, tag in ((self.proc.stdout, b"O"), (self.proc.stderr, b"E"))]
        for t in self.readers:
            t.start()
        threading.Thread(target=self._wait, args=(ended,), daemon=True).start()

    @staticmethod
    def _stamp(pipe: IO[bytes], tag: bytes, log: IO[bytes]) -> None:
        """Each line as ``<unix time> <O|E> <text>`` (the bytes as they came; the last partial
        line gets its newline); one write per line, to a log opened for appending."""
        for line in iter(pipe.readline, b""):
            log.write(b"%.6f %s %s" % (time.time(), tag, line if line.endswith(b"\n") else line + b"\n"))
        pipe.close()

    def _wait(self, ended: threading.Event) -> None:
        code = self.proc.wait()
        deadline = time.time() + DRAIN_S
        for t in self.readers:
            t.join(max(0.0, deadline - time.time()))
        self.returncode = code
        self.done.set()
        ended.set()

    def terminate(self) -> None:
        if not self.done.is_set():
            try:
                self.proc.send_signal(signal.SIGTERM)  # srun ends the step: SIGTERM, then SIGKILL
            except OSError:  # it ended meanwhile
                pass


class Replica:
    """One replica of the group: where it runs, its directory, its current step."""

    def __init__(self, comp: Mapping[str, Any], group: int, rep: Mapping[str, Any], job_dir: str) -> None:
        self.key: Key = (str(comp["name"]), int(rep["replica_id"]))
        self.relpath = f"{comp['dirname']}/{rep['replica_id']}"
        self.dir = os.path.join(job_dir, str(comp["dirname"]), str(rep["replica_id"]))
        self.comp, self.rep, self.group = comp, rep, group
        self.node = ""
        self.step: Optional[Step] = None
        self._log: Optional[IO[bytes]] = None

    @property
    def log(self) -> IO[bytes]:
        if self._log is None:
            os.makedirs(self.dir, exist_ok=True)
            # unbuffered: each stamped line is one write(2) to an O_APPEND file
            self._log = open(os.path.join(self.dir, "log"), "ab", buffering=0)
        return self._log

    @property
    def running(self) -> bool:
        return self.step is not None and not self.step.done.is_set()


StepFactory = Callable[[List[str], Dict[str, str], IO[bytes], threading.Event], Step]


class Launcher:
    """Performs the engine's actions with ``srun`` steps; reports what the steps did."""

    def __init__(self, job_dir: str, spec: Mapping[str, Any], environ: Mapping[str, str], srun: str,
                 step: StepFactory = Step) -> None:
        self.job_dir, self.spec, self.environ, self.srun, self.new_step = job_dir, spec, environ, srun, step
        self.job_id = environ.get("SLURM_JOB_ID", "")
        self.replicas = [Replica(c, g, r, job_dir) for g, c in enumerate(spec["components"])
                         for r in c["replicas"]]
        self.by_key = {r.key: r for r in self.replicas}
        records = [{"role": c["name"], "replica_id": r["replica_id"], "service": c["service"],
                    "max_retries": c["max_retries"], "retry_policy": c["retry_policy"], "ports": c.get("ports", [])}
                   for c in spec["components"] for r in c["replicas"]]
        self.group = engine.GroupSpec.from_dicts(records, float(spec.get("retry_backoff_s", 0.0)),
                                                 spec.get("ready_timeout_s"))
        self.engine = engine.Engine(self.group)
        self.ended = threading.Event()  # a step ended or a probe found its ports ready: the main loop wakes
        self.readies: queue.SimpleQueue[engine.Ready] = queue.SimpleQueue()  # from the probes, for the main loop
        self.deciding: Optional[Tuple[Replica, int]] = None  # the last end told: (replica, $?)
        self.hosts: List[str] = []  # per component, comma-separated addresses
        self.code = 1  # the batch script's exit code: the deciding replica's

    def sub(self, value: str) -> str:
        return value.replace(APP_ID_TOKEN, self.job_id)

    # -- placement and environment -------------------------------------------------------
    def place(self) -> None:
        het = len(self.spec["components"]) > 1
        for g, comp in enumerate(self.spec["components"]):
            sfx = f"_HET_GROUP_{g}" if het else ""
            nodes = layout(hostnames(self.environ.get(f"SLURM_JOB_NODELIST{sfx}", "")),
                           self.environ.get(f"SLURM_TASKS_PER_NODE{sfx}", ""), int(comp["num_replicas"]))
            for r in self.replicas:
                if r.group == g:
                    r.node = nodes[r.key[1]] if r.key[1] < len(nodes) else ""
            self.hosts.append(",".join(address(n) for n in nodes))

    def argv(self, r: Replica) -> List[str]:
        het = [f"--het-group={r.group}"] if len(self.spec["components"]) > 1 else []
        # in a container (pyxis) the image need not have bash; its clusters track by cgroup
        task = [] if self.spec.get("container") else ["bash", "-c", STEP_TASK, "torchx-ext"]
        return [self.srun, *het, f"--nodelist={r.node}", *(self.sub(o) for o in r.comp["srun_opts"]),
                *task, *(self.sub(a) for a in r.rep["argv"])]

    def env(self, r: Replica, attempt: int) -> Dict[str, str]:
        env = dict(self.environ)
        env["TORCHX_RANK0_HOST"] = self.hosts[r.group].split(",")[0]
        env.update({k: self.sub(v) for k, v in r.rep["env"].items()})
        # the discovery variables come last, so they win over a role's own env
        env["TORCHX_EXT_APP_ID"] = self.spec.get("app_id_prefix", "") + self.job_id
        for g, comp in enumerate(self.spec["components"]):
            env[f"TORCHX_EXT_HOSTS_{comp['env_suffix']}"] = self.hosts[g]
        env.update(TORCHX_EXT_ROLE=r.key[0], TORCHX_EXT_REPLICA_ID=str(r.key[1]),
                   TORCHX_EXT_NUM_REPLICAS=str(r.comp["num_replicas"]), TORCHX_EXT_ATTEMPT=str(attempt),
                   # srun gives the step's tasks this umask, not the batch script's 077
                   SLURM_UMASK=self.environ.get("TORCHX_EXT_UMASK") or "0077")
        return env

    # -- the engine ----------------------------------------------------------------------
    def report(self, event: engine.Event) -> None:
        """Tells the engine ``event`` and performs what it answers, in order."""
        actions = self.engine.on(event, time.time())
        write(os.path.join(self.job_dir, "engine.json"), json.dumps(self.engine.snapshot()))
        for action in actions:
            self.perform(action)

    def perform(self, action: engine.Action) -> None:
        if isinstance(action, engine.Start):
            if self.engine.verdict is not None:
                return  # decided while this batch was performed: start no more
            r = self.by_key[action.key]
            error = self.start(r, action.attempt)
            if error is not None:
                self.deciding = (r, 1)
            self.report(engine.StartFailed(action.key, error, action.attempt) if error is not None
                        else engine.Started(action.key, action.attempt))
        elif isinstance(action, engine.Restart):
            if action.unit:  # (a requeue's Rerun draws on no budget: Slurm counts those)
                with open(os.path.join(self.job_dir, "restarts"), "a") as f:
                    f.write(f"{action.unit} {action.why}\n")
            for key in action.keys:  # describe shows it waiting for its restart, not failed
                if not self.by_key[key].running:
                    remove(self.by_key[key].dir, "exit", "host")
        elif isinstance(action, engine.Stop):
            self.stop([self.by_key[k] for k in action.keys], action.final)
        elif isinstance(action, engine.Mark):
            self.by_key[action.key].log.write(b"%.6f E %s\n" % (time.time(), action.line.encode()))
        elif isinstance(action, engine.Probe):
            r = self.by_key[action.key]
            self.probe(r, r.step, address(r.node), action)
        elif isinstance(action, engine.Verdict):
            self.conclude(action)
        # Wait: the main loop never sleeps past engine.next_due

    # -- the actions -----------------------------------------------------------------------
    def start(self, r: Replica, attempt: int) -> Optional[str]:
        """Starts attempt ``attempt`` of ``r`` as a step; None, or why it could not start."""
        os.makedirs(r.dir, exist_ok=True)
        write(os.path.join(r.dir, "host"), f"{r.node} {address(r.node)}\n")
        write(os.path.join(r.dir, "attempt"), f"{attempt}\n")
        try:
            r.step = self.new_step(self.argv(r), self.env(r, attempt), r.log, self.ended)
        except OSError as e:
            return str(e)
        return None

    def probe(self, r: Replica, step: Optional[Step], host: str, probe: engine.Probe) -> threading.Thread:
        """Starts a thread that connects to the probe's ports at ``host`` (the node's address, as the
        other replicas reach it) until each accepts, then hands ``Ready`` to the main loop (it alone
        reports to the engine, and Ticks at the deadline); it gives up once the attempt ended, was
        stopped or superseded, or the group is decided."""
        def over() -> bool:
            return step is None or step.done.is_set() or r.step is not step or self.engine.verdict is not None

        def ready() -> None:
            self.readies.put(engine.Ready(r.key, probe.attempt))
            self.ended.set()

        return start_probe(host, probe.ports, CONNECT_S, PROBE_S, over, ready)

    def stop(self, scope: List[Replica], final: bool) -> None:
        """Ends these replicas' steps (SIGTERM to srun, which ends the step) and waits for them.
        A verdict records them as stopped, with their codes; a restart's scope forgets what its
        stopped attempts left."""
        running = [r for r in scope if r.running]
        for r in running:
            if final:
                write(os.path.join(r.dir, "stopped"), "")
            r.step.terminate()  # type: ignore[union-attr]
        deadline = time.time() + SETTLE_S
        for r in running:
            r.step.done.wait(max(0.0, deadline - time.time()))  # type: ignore[union-attr]
        for r in scope:
            if r.step is not None and not r.step.reported and r.step.returncode is not None:
                r.step.reported = True  # what ends now is the stop's doing, not news for the engine
                if final:  # (an end not told yet, the verdict came first: its code is its own)
                    write(os.path.join(r.dir, "exit"), f"{end_event(r.key, r.step.returncode, 0)[0]}\n")
            if not final:
                remove(r.dir, "exit", "stopped", "host", "reason")

    def conclude(self, verdict: engine.Verdict) -> None:
        """Each replica's reason, then the result file, written last: ``<exit code> <role
        dir>/<replica that decided>``."""
        for r in self.replicas:
            reason = self.engine.replicas[r.key].reason  # "after 3 attempts (...)", a failed start
            if reason:
                write(os.path.join(r.dir, "reason"), reason + "\n")
        code, culprit = 0, ""
        if verdict.state != "SUCCEEDED":
            code = 1
            if self.deciding is not None:
                code, culprit = self.deciding[1] or 1, self.deciding[0].relpath  # a service ended 0: 1
            else:  # the engine's own (a service not ready in time): no replica's end tells describe why
                write(os.path.join(self.job_dir, "verdict"), verdict.msg + "\n")
        self.code = code if code <= 255 else 1
        write(os.path.join(self.job_dir, "result"), f"{code} {culprit}\n")

    # -- the run ---------------------------------------------------------------------------
    def first_event(self) -> engine.Event:
        """Begin, or after a requeue by Slurm, a Rerun of the engine as it last was."""
        seen = int(read(os.path.join(self.job_dir, "requeues")).strip() or 0)
        count = int(self.environ.get("SLURM_RESTART_COUNT") or 0)
        if count <= seen:
            return engine.Begin()
        write(os.path.join(self.job_dir, "requeues"), f"{count}\n")
        snap = read(os.path.join(self.job_dir, "engine.json"))
        if snap:
            self.engine = engine.Engine.restore(self.group, json.loads(snap))
            self.engine.verdict = None  # this run of the job decides anew
        return engine.Rerun(f"Slurm requeued the job (requeue {count})")

    def poll(self) -> None:
        """Tells the engine of every step that ended since the last poll, then the probes'
        Readies, then a due Tick."""
        for r in self.replicas:
            if self.engine.verdict is not None:
                return
            if r.step is None or r.step.reported or r.step.returncode is None:
                continue
            r.step.reported = True
            code, event = end_event(r.key, r.step.returncode, self.engine.replicas[r.key].attempt)
            write(os.path.join(r.dir, "exit"), f"{code}\n")
            self.deciding = (r, code)
            self.report(event)
        while not self.readies.empty() and self.engine.verdict is None:
            self.report(self.readies.get())
        due = self.engine.next_due
        if self.engine.verdict is None and due is not None and due <= time.time():
            self.deciding = None  # a verdict now is the engine's own (a readiness deadline), no end's
            self.report(engine.Tick())

    def run(self) -> int:
        # a requeued job starts over: forget the previous run's exit codes (logs are kept)
        remove(self.job_dir, "result", "verdict")
        for r in self.replicas:
            remove(r.dir, "exit", "stopped", "host", "reason")
        self.place()
        self.report(self.first_event())
        while self.engine.verdict is None:
            due = self.engine.next_due
            self.ended.wait(max(0.0, min(POLL_S, due - time.time())) if due is not None else POLL_S)
            self.ended.clear()
            self.poll()
        return self.code


def main(argv: Sequence[str]) -> int:
    """``<job dir>``; the launcher's spec (JSON, see ``script.launcher_spec``) on stdin."""
    job_dir = argv[0]
    spec = json.load(sys.stdin)
    srun = shutil.which("srun")
    if srun is None:
        why = f"srun not found on {os.uname().nodename}"
        write(os.path.join(job_dir, "error"), why + "\n")
        print(f"torchx-ext: {why}", file=sys.stderr)
        return 1
    launcher = Launcher(job_dir, spec, dict(os.environ), srun)
    try:
        return launcher.run()
    except BaseException as e:  # any crash: no step may outlive the launcher, and describe says why
        write(os.path.join(job_dir, "error"), f"the torchx-ext launcher on {os.uname().nodename} "
              f"failed: {type(e).__name__}: {e}\n")
        for r in launcher.replicas:
            if r.step is not None:
                r.step.terminate()
        raise
