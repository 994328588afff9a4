"""The Ray job entrypoint of every ``ray_jobs`` app: ``python -m ray_jobs_cluster.driver``.

It reads the app's spec (JSON in ``$TORCHX_EXT_RAY_SPEC``, written by the client's dry-run) and:

1. reserves the gang: a single-replica app runs in this process, whose resources Ray already
   reserved as the job's entrypoint resources; any other app gets one placement group with a
   bundle per replica, all or nothing, failing after ``placement_timeout_s`` with what is missing;
2. starts one process per replica (in a Ray actor pinned to its bundle), after learning every
   replica's node address so each gets the ``TORCHX_EXT_HOSTS_<ROLE>`` discovery variables;
3. polls the replicas, writes their output to the job log in frames (``FRAME_MARK role replica
   stream time length``, then the lines: the client demultiplexes them for ``torchx log``),
   performs the group engine's decisions (a service with ports starts first, and the others once
   the driver found those ports accepting connections at its node's address: :mod:`.readiness`)
   and, once the group is decided, stops what still runs and writes one verdict line;
4. on SIGTERM (``ray job stop``) stops every replica within Ray's grace period; likewise when
   Ray's job supervisor above it is gone (a lost head or node), so no replica runs on unowned.

Exit status: 0 when the group SUCCEEDED, 1 otherwise (Ray then reports the job FAILED and keeps
the verdict line in its message).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import DRIVER_ROLE, FRAME_MARK, FRAME_S, RESTART_MARK, RESTARTS_FILE, SPEC_ENV, VERDICT_MARK
from .gang import GangGroup, LocalGroup
from .readiness import Probes
from .replica import Line
from .supervision import watch_job

try:  # on the cluster: the group engine travels inside this package (ray_jobs.local.cluster_package)
    from . import engine  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # here, in the torchx_ext tree (the client's tests, a driver run locally)
    from torchx_ext import engine  # type: ignore[no-redef,unused-ignore]


def frames(role: str, replica: int, lines: List[Line]) -> str:
    """The job log's text for ``lines`` of one replica: a frame (see ``FRAME_MARK``) per run of
    lines of one stream spanning at most ``FRAME_S``."""
    out = []
    i, n = 0, len(lines)
    while i < n:
        stream, t0, _ = lines[i]
        j = i + 1
        while j < n and lines[j][0] == stream and lines[j][1] - t0 < FRAME_S:
            j += 1
        body = "\n".join([t for _, _, t in lines[i:j]]) + "\n"
        if "\r" in body:  # as Ray's reads will deliver it (universal newlines), so that the length holds
            body = body.replace("\r\n", "\n").replace("\r", "\n")
        out.append(f"{FRAME_MARK}{role} {replica} {stream} {t0:.6f} {len(body)}\n")
        out.append(body)
        i = j
    return "".join(out)


class Output:
    """Thread-safe writer of marked lines to the job log (the driver's stdout)."""

    def __init__(self, restarts_path: Optional[str] = None) -> None:
        self._lock = threading.Lock()
        self.restarts_path = restarts_path
        self.published: Dict[str, Any] = {"num_restarts": 0}

    def restarts(self, count: int) -> None:
        """Publishes the app's restart count (see ``RESTARTS_FILE``)."""
        self.publish(num_restarts=count)

    def publish(self, **fields: Any) -> None:
        """Publishes ``fields`` with those published before (``RESTARTS_FILE``: the restart count,
        the replicas held for the services): written whole, then renamed, so the dashboard never
        serves half of it. A failure costs describe what it would have read, not the app."""
        self.published.update(fields)
        if not self.restarts_path:
            return
        tmp = f"{self.restarts_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(self.published) + "\n")
            os.replace(tmp, self.restarts_path)
        except OSError as e:
            print(f"torchx-ext: could not publish the app's state to {self.restarts_path}: {e}",
                  file=sys.stderr, flush=True)

    def lines(self, role: str, replica: int, lines: List[Line]) -> None:
        if not lines:
            return
        text = frames(role, replica, lines)
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()

    def say(self, text: str) -> None:
        """A line of the driver's own log (``torchx log <app>/ray-driver``)."""
        self.lines(DRIVER_ROLE, 0, [("o", time.time(), text)])

    def verdict(self, state: str, msg: str, replicas: List[Dict[str, Any]], num_restarts: int = 0) -> int:
        if num_restarts:
            self.restarts(num_restarts)
        self.say(f"app {state}" + (f": {msg}" if msg else ""))
        with self._lock:
            sys.stdout.write(VERDICT_MARK + json.dumps({"state": state, "msg": msg, "replicas": replicas,
                                                        "num_restarts": num_restarts}) + "\n")
            sys.stdout.flush()
        return 0 if state == "SUCCEEDED" else 1


ATTEMPT_ENV = "TORCHX_EXT_ATTEMPT"  # torchx_ext.groups.ENV_ATTEMPT: 1, then 2, ... on each restart
SUPERVISOR_GONE = "Ray's job supervisor of this driver is gone (head or node lost)"
STOPPED = "stopped (the Ray job was stopped)"


class Launcher:
    """Performs the group engine's actions on Ray (the rules, budgets, backoff and messages are
    the engine's, as in every other backend): a Start is a replica's process in its actor (or in
    this driver), a Stop ends those processes, a Restart and a Mark are lines of the job log, the
    Verdict is the job's last line. Reports what it sees back to the engine, in its terms."""

    def __init__(self, spec: Dict[str, Any], group: Any, out: Output,
                 halted: Callable[[], Optional[engine.Event]] = lambda: None) -> None:
        self.spec, self.group, self.out = spec, group, out
        self.halted = halted  # the job was stopped or orphaned: what to tell the engine, else None
        self.replicas = [(ri, role, k, rep) for ri, role in enumerate(spec["roles"])
                         for k, rep in enumerate(role["replicas"])]
        self.keys: List[Tuple[str, int]] = [(role["name"], k) for _, role, k, _ in self.replicas]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.engine = engine.Engine(engine.GroupSpec.from_dicts(
            [{"role": role["name"], "replica_id": k, "service": bool(role.get("service")),
              "max_retries": int(role.get("max_retries", 0)), "retry_policy": role.get("retry_policy", "APPLICATION"),
              "ports": role.get("ports", [])}
             for _, role, k, _ in self.replicas], float(spec.get("retry_backoff_s", 0.0)), spec.get("ready_timeout_s")))
        self.probes = Probes()  # the services' readiness, found in threads, told to the engine by the loop
        self.running: Dict[int, int] = {}  # replica -> the attempt whose process runs
        self.hosts: List[str] = [""] * len(self.replicas)
        self.cmds: List[Tuple[List[str], Dict[str, str]]] = []
        self.verdict: Optional[engine.Verdict] = None
        self.held: Optional[List[List[Any]]] = None  # as last published

    def commands(self, ips: List[str]) -> None:
        """Each replica's argv and env, its discovery variables naming the nodes ``ips``."""
        hosts: Dict[str, List[str]] = {}
        for (_, role, _, _), ip in zip(self.replicas, ips):
            hosts.setdefault(role["hosts_env"], []).append(ip)
        self.cmds = []
        for _, role, _k, rep in self.replicas:
            env = dict(rep["env"])
            env.update({name: ",".join(h) for name, h in hosts.items()})
            env["TORCHX_RANK0_HOST"] = hosts[role["hosts_env"]][0]  # TorchX's rank0_env macro
            self.cmds.append((rep["cmd"], env))
        self.hosts = list(ips)
        self.out.say("hosts: " + json.dumps(hosts))

    def report(self, event: engine.Event) -> None:
        """Tells the engine ``event`` and performs its answer."""
        self.perform(self.engine.on(event, time.time()))

    def perform(self, actions: List[engine.Action]) -> None:
        """Performs ``actions`` in order; a run of Starts is one batch (the actors start at once)."""
        batch: List[engine.Start] = []
        for action in actions:
            if isinstance(action, engine.Start):
                batch.append(action)
                continue
            if batch:
                self.start(batch)
                batch = []
            if isinstance(action, engine.Restart):
                self.out.restarts(action.number)
                self.out.say(f"{RESTART_MARK}{action.number}: {action.why}")
            elif isinstance(action, engine.Stop):
                self.stop([self.index[k] for k in action.keys], action.final)
            elif isinstance(action, engine.Mark):
                ri, _, k, _ = self.replicas[self.index[action.key]]
                self.out.lines(str(ri), k, [("e", time.time(), action.line)])
            elif isinstance(action, engine.Probe):
                self.probe(action)
            elif isinstance(action, engine.Verdict):
                self.probes.cancel_all()
                self.verdict = action
            # Wait: the poll loop sends a Tick once engine.next_due is past
        if batch:
            self.start(batch)

    def start(self, batch: List[engine.Start]) -> None:
        if self.engine.verdict is not None:
            return  # decided while this batch was performed: start no more
        halt = self.halted()
        if halt is not None:  # stopped meanwhile: a restart due now never starts
            self.report(halt)
            return
        indices = [self.index[a.key] for a in batch]
        before = list(self.group.ips) if isinstance(self.group, GangGroup) else None
        unplaced = self.group.prepare(indices)  # a lost replica's actor is placed again
        if before is not None and self.group.ips != before:
            # a lost node's replica moves: the replicas started now learn its new node
            # (those still running keep the discovery variables they started with)
            self.commands(self.group.ips)
        attempt = {self.index[a.key]: a.attempt for a in batch}
        todo = [i for i in indices if i not in unplaced]
        cmds = [(c, {**e, ATTEMPT_ENV: str(attempt.get(i, 1))}) for i, (c, e) in enumerate(self.cmds)]
        errors = dict(zip(todo, self.group.start(cmds, todo)))
        errors.update(unplaced)
        for i in todo:  # the Starteds first: a start that raced a failure gets its Stop
            if not errors.get(i):
                self.running[i] = attempt[i]
        for i in todo:
            if not errors.get(i):
                self.report(engine.Started(self.keys[i], attempt[i]))
        for i in indices:
            if errors.get(i):
                self.report(engine.StartFailed(self.keys[i], str(errors[i]), attempt[i]))

    def probe(self, action: engine.Probe) -> None:
        """Connects to the service's ports at its node's address (``TORCHX_EXT_HOSTS_<ROLE>``'s)
        until each accepts; :meth:`ready` tells the engine."""
        i = self.index[action.key]
        ports = ", ".join(str(p) for p in action.ports)
        self.out.say(f"waiting for role '{action.key[0]}' replica {action.key[1]} to accept connections on "
                     f"{self.hosts[i]} port(s) {ports} (for {action.until - time.time():.0f} s at most)")
        self.probes.start(i, action.attempt, self.hosts[i], action.ports)

    def ready(self) -> None:
        """Tells the engine of the services found ready since the last call (from the loop, the
        one thread that calls the engine)."""
        for i, attempt in self.probes.ready():
            if self.verdict is not None:
                return
            role, k = self.keys[i]
            self.out.say(f"role '{role}' replica {k} accepts connections on every port of its role")
            self.report(engine.Ready(self.keys[i], attempt))

    def stop(self, indices: List[int], final: bool) -> None:
        self.probes.cancel(list(range(len(self.keys))) if final else indices)
        live = [i for i in (range(len(self.keys)) if final else indices) if i in self.running]
        if not live:
            return
        if final:
            self.out.say(f"group is {self.engine.verdict.state if self.engine.verdict else 'decided'}; "
                         f"stopping {len(live)} replica(s) still running")
        self.group.stop(live)
        for i in live:
            del self.running[i]
        if final:  # what they wrote until they stopped
            for i, (lines, _code, _err) in enumerate(self.group.poll()):
                self.out.lines(str(self.replicas[i][0]), self.replicas[i][2], lines)

    def poll(self) -> None:
        for i, (lines, code, err) in enumerate(self.group.poll()):
            ri, _, k, _ = self.replicas[i]
            self.out.lines(str(ri), k, lines)
            if code is None or i not in self.running:
                continue
            attempt = self.running.pop(i)
            self.probes.cancel([i])  # a service that ended is no longer waited for
            key = self.keys[i]
            # a lost actor (err) has no exit code of its own: its reason says what happened
            self.report(engine.Lost(key, err, attempt) if err else
                        engine.Exited(key, code, attempt) if code >= 0 else engine.Killed(key, -code, attempt))

    def outcomes(self) -> List[Dict[str, Any]]:
        out = []
        for i, key in enumerate(self.keys):
            view = self.engine.replicas[key]
            out.append({**view.outcome(), "host": self.hosts[i], "attempt": view.attempt})
        return out

    def publish_held(self) -> None:
        """Publishes which replicas wait for the services (not started: describe shows them
        PENDING while Ray has the job RUNNING), when that changed; only for an app whose services
        declare ports (no other app holds any)."""
        if not self.engine.spec.gated:
            return
        held = [[role, k] for (role, k), v in self.engine.replicas.items() if v.held]
        if held != self.held:
            self.held = held
            self.out.publish(held=held)

    def finish(self) -> int:
        assert self.verdict is not None
        self.publish_held()  # none is held once decided
        return self.out.verdict(self.verdict.state, self.verdict.msg, self.outcomes(), self.engine.num_restarts)


def run(spec: Dict[str, Any], out: Output, stopping: threading.Event,
        orphaned: Optional[threading.Event] = None, group: Any = None) -> int:
    """Runs the app of ``spec`` to its verdict; returns the exit status. ``group``: the replicas'
    runner (default: this process for a single replica, a gang of Ray actors otherwise)."""
    def stopped() -> Optional[engine.Event]:
        if orphaned is not None and orphaned.is_set():
            return engine.Fail(SUPERVISOR_GONE)
        return engine.Cancel(STOPPED) if stopping.is_set() else None

    if group is None:
        group = LocalGroup(spec) if spec["mode"] == "local" else GangGroup(spec)
    me = Launcher(spec, group, out, stopped)
    if any(role.get("max_retries") for role in spec["roles"]):
        out.restarts(0)  # so that describe finds a count (not Ray's "file not found") from the start

    try:
        out.say(f"reserving {len(me.replicas)} replica(s) of app {spec['app_id']}")
        error = group.reserve()
        if error:
            me.report(engine.Fail(error))
            return me.finish()
        me.commands(group.node_ips())
        interval = float(spec.get("poll_interval_s", 0.2))
        event = stopped()  # stopped while reserving: start nothing
        me.report(event if event is not None else engine.Begin())
        while me.verdict is None:
            me.poll()
            if me.verdict is None:
                me.ready()
            me.publish_held()
            event = stopped()
            if me.verdict is None and event is not None:
                me.report(event)
            due = me.engine.next_due  # a restart's backoff, or a service's readiness deadline
            if me.verdict is None and due is not None and due <= time.time():
                me.report(engine.Tick())
            due = me.engine.next_due
            if me.verdict is None:
                stopping.wait(interval if due is None else min(interval, max(0.0, due - time.time())))
        return me.finish()
    finally:
        me.probes.cancel_all()
        group.close()


def restarts_path(sid: str) -> Optional[str]:
    """Where this driver publishes its app's restart count: beside its job log in Ray's log
    directory of this node (Ray's job supervisor opens ``job-driver-<id>.log`` there as the
    driver's stdout), so the dashboard's state API serves it; None when stdout is not that log."""
    try:
        log = os.readlink("/proc/self/fd/1")
    except OSError:
        return None
    if not sid or os.path.basename(log) != f"job-driver-{sid}.log":
        return None
    return os.path.join(os.path.dirname(log), RESTARTS_FILE.format(sid))


def main() -> int:
    spec = json.loads(base64.b64decode(os.environ.pop(SPEC_ENV)))
    stopping = threading.Event()
    orphaned = threading.Event()
    sid = sys.argv[sys.argv.index("--app") + 1] if "--app" in sys.argv[:-1] else ""
    out = Output(restarts_path(sid))
    watch_job(sid, orphaned, stopping)
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S: the loop stops
    # the replicas (their process groups) in between
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        return run(spec, out, stopping, orphaned)
    except Exception as e:  # noqa: BLE001 - anything unexpected still ends in one verdict line
        return out.verdict("FAILED", f"the torchx-ext driver failed: {type(e).__name__}: {e}", [])


if __name__ == "__main__":
    sys.exit(main())
