"""The Ray job entrypoint of every ``ray_jobs`` app: ``python -m ray_jobs_cluster.driver``.

It reads the app's spec (JSON in ``$TORCHX_EXT_RAY_SPEC``, written by the client's dry-run) and:

1. reserves the gang: a single-replica app runs in this process, whose resources Ray already
   reserved as the job's entrypoint resources; any other app gets one placement group with a
   bundle per replica, all or nothing, failing after ``placement_timeout_s`` with what is missing;
2. starts one process per replica (in a Ray actor pinned to its bundle), after learning every
   replica's node address so each gets the ``TORCHX_EXT_HOSTS_<ROLE>`` discovery variables;
3. polls the replicas, writes their output to the job log in frames (``FRAME_MARK role replica
   stream time length``, then the lines: the client demultiplexes them for ``torchx log``),
   performs the group engine's decisions and,
   once the group is decided, stops what still runs and writes one verdict line;
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
from .replica import Line, ReplicaRunner, node_ip

try:  # on the cluster: the group engine travels inside this package (ray_jobs.local.cluster_package)
    from . import engine  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # here, in the torchx_ext tree (the client's tests, a driver run locally)
    from torchx_ext import engine  # type: ignore[no-redef,unused-ignore]

Result = Tuple[List[Line], Optional[int], str]  # (lines, exit code, error)


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

    def restarts(self, count: int) -> None:
        """Publishes the app's restart count (see ``RESTARTS_FILE``): written whole, then renamed,
        so the dashboard never serves half of it. A failure costs describe the count, not the app."""
        if not self.restarts_path:
            return
        tmp = f"{self.restarts_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps({"num_restarts": count}) + "\n")
            os.replace(tmp, self.restarts_path)
        except OSError as e:
            print(f"torchx-ext: could not publish the restart count to {self.restarts_path}: {e}",
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


class LocalGroup:
    """A single replica run by the driver itself (it holds the entrypoint resources)."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        self.runners = [ReplicaRunner()]

    def reserve(self) -> Optional[str]:
        return None

    def node_ips(self) -> List[str]:
        return [node_ip()]

    def prepare(self, indices: List[int]) -> Dict[int, str]:
        return {}

    def start(self, cmds: List[Tuple[List[str], Dict[str, str]]], indices: List[int]) -> List[Optional[str]]:
        return [self.runners[i].start(*cmds[i]) for i in indices]

    def poll(self) -> List[Result]:
        return [(*r.poll(), "") for r in self.runners]

    def stop(self, indices: List[int]) -> None:
        for i in indices:
            self.runners[i].stop()

    def close(self) -> None:
        pass


# How long an actor may stay unreachable (ActorUnavailableError) before its replica counts as lost
# although Ray has not declared its node dead.
UNREACHABLE_S = 90.0


class GangGroup:
    """One placement group bundle and one actor per replica."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        import ray

        self.ray = ray
        self.spec = spec
        self.bundles = [dict(role["resources"]) for role in spec["roles"] for _ in role["replicas"]]
        # log_to_driver=False: the actors print nothing; replica output comes through poll()
        ray.init(log_to_driver=False)
        self.pg: Any = None
        self.actors: List[Any] = []
        self.ips: List[str] = []
        self.lost: set[int] = set()
        self.unreachable: Dict[int, float] = {}  # replica -> when its actor first did not answer

    def reserve(self) -> Optional[str]:
        from ray.util.placement_group import placement_group

        ray = self.ray
        kwargs: Dict[str, Any] = {"strategy": self.spec.get("strategy", "PACK")}
        if self.spec.get("label_selector"):
            kwargs["bundle_label_selector"] = [self.spec["label_selector"]] * len(self.bundles)
        if self.spec.get("placement_group"):
            kwargs["name"] = self.spec["placement_group"]
        self.pg = placement_group(self.bundles, **kwargs)
        timeout = float(self.spec["placement_timeout_s"])  # always set by the submitter: its default is the one
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            return f"the group could not be placed within {timeout:g} s: {self._missing()}"
        self.actors = [self._actor(i) for i in range(len(self.bundles))]
        return None

    def _actor(self, i: int) -> Any:
        """A replica actor pinned to bundle ``i`` of the gang's placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        b = self.bundles[i]
        custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU", "memory")}
        return self.ray.remote(ReplicaRunner).options(
            num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), memory=b.get("memory"),
            resources=custom, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote()

    def _missing(self) -> str:
        ray = self.ray
        need: Dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        total, avail = ray.cluster_resources(), ray.available_resources()
        short = {k: (v, total.get(k, 0)) for k, v in need.items() if v > total.get(k, 0)}
        if short:
            return "the cluster has too little " + ", ".join(
                f"{k} (the group needs {_fmt(k, v)}, the cluster has {_fmt(k, t)})"
                for k, (v, t) in sorted(short.items())
            )
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for b in self.bundles:
            if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes):
                strategy = self.spec.get("strategy", "PACK")
                return f"no node can hold a replica needing {_fmt_res(b)} (strategy {strategy})"
        busy = {k: (v, avail.get(k, 0)) for k, v in need.items() if v > avail.get(k, 0)}
        return "resources are in use by other jobs: " + ", ".join(
            f"{k} (the group needs {_fmt(k, v)}, available now {_fmt(k, a)})" for k, (v, a) in sorted(busy.items())
        ) if busy else f"the group needs {_fmt_res(need)} with strategy {self.spec.get('strategy', 'PACK')}"

    def node_ips(self) -> List[str]:
        self.ips = self.ray.get([a.node_ip.remote() for a in self.actors], timeout=120)
        return list(self.ips)

    def prepare(self, indices: List[int]) -> Dict[int, str]:
        """Before a restart of ``indices``: a lost replica (its worker or node died) gets a new
        actor in its bundle, which Ray moves to a surviving node once it knows the old one is
        dead, and its node address is learnt again (``ips``), so that the restarted replicas'
        discovery variables name where it runs now. A restart of a replica that was not lost
        reuses its actor (same node). Returns the replicas that could not be placed, with why."""
        ray = self.ray
        errors: Dict[int, str] = {}
        timeout = float(self.spec["placement_timeout_s"])  # always set by the submitter: its default is the one
        for i in indices:
            if i not in self.lost:
                continue
            self.lost.discard(i)
            deadline = time.time() + timeout
            while True:
                self._replace(i)
                try:
                    self.ips[i] = ray.get(self.actors[i].node_ip.remote(), timeout=max(1.0, deadline - time.time()))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    # its bundle was still on the dead node (the new actor died with it): again
                    if time.time() >= deadline:
                        self.lost.add(i)
                        errors[i] = (f"no node took it within {timeout:g} s: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0]}")
                        break
                    time.sleep(1.0)
        return errors

    def _replace(self, i: int) -> None:
        try:  # the lost actor must not come back with its replica when its node does
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone with its node: nothing left to kill
            pass
        self.actors[i] = self._actor(i)

    def start(self, cmds: List[Tuple[List[str], Dict[str, str]]], indices: List[int]) -> List[Optional[str]]:
        ray = self.ray
        refs = [self.actors[i].start.remote(*cmds[i]) for i in indices]
        out: List[Optional[str]] = []
        for i, ref in zip(indices, refs):
            try:
                out.append(ray.get(ref, timeout=120))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                self.lost.add(i)
                out.append(f"its Ray actor was lost (node {self.ips[i]}): {type(e).__name__}: {str(e).splitlines()[0]}")
        return out

    def poll(self) -> List[Result]:
        ray = self.ray
        refs = [a.poll.remote() for a in self.actors]
        out: List[Result] = []
        now = time.time()
        for i, ref in enumerate(refs):
            try:
                lines, code = ray.get(ref, timeout=60)
                self.unreachable.pop(i, None)
                out.append((lines, code, ""))
            except ray.exceptions.ActorUnavailableError as e:
                # not lost yet: its node may be partitioned, or dead but not declared so (Ray's
                # health checks take ~15 s); a replica restarted now could run twice. Ray raises
                # ActorDiedError once it declares the node dead; a bound for an actor it never does.
                since = self.unreachable.setdefault(i, now)
                if now - since < UNREACHABLE_S:
                    out.append(([], None, ""))
                    continue
                self.lost.add(i)
                out.append(([], -1, f"its node {self.ips[i]} did not answer for {UNREACHABLE_S:g} s: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0]}"))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                # the node or worker died: the replica is lost (its process died with it)
                self.lost.add(i)
                self.unreachable.pop(i, None)
                out.append(([], -1, f"its Ray actor was lost (node {self.ips[i]}): "
                                    f"{type(e).__name__}: {str(e).splitlines()[0]}"))
        return out

    def stop(self, indices: List[int]) -> None:
        refs = [self.actors[i].stop.remote() for i in indices]
        try:
            self.ray.get(refs, timeout=15)
        except Exception:  # noqa: BLE001 - best effort: the actors die with this job anyway
            pass

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - best effort: Ray removes a job's placement groups with it
                pass


def _fmt(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:g}"


def _fmt_res(res: Dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_fmt(k, v)}" for k, v in sorted(res.items())) + "}"


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
              "max_retries": int(role.get("max_retries", 0)), "retry_policy": role.get("retry_policy", "APPLICATION")}
             for _, role, k, _ in self.replicas], float(spec.get("retry_backoff_s", 0.0))))
        self.running: Dict[int, int] = {}  # replica -> the attempt whose process runs
        self.hosts: List[str] = [""] * len(self.replicas)
        self.cmds: List[Tuple[List[str], Dict[str, str]]] = []
        self.verdict: Optional[engine.Verdict] = None

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
            elif isinstance(action, engine.Verdict):
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

    def stop(self, indices: List[int], final: bool) -> None:
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

    def finish(self) -> int:
        assert self.verdict is not None
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
            event = stopped()
            if me.verdict is None and event is not None:
                me.report(event)
            due = me.engine.next_due
            if me.verdict is None and due is not None and due <= time.time():
                me.report(engine.Tick())
            if me.verdict is None:
                stopping.wait(interval)
        return me.finish()
    finally:
        group.close()


def _ray_ancestor() -> int:
    """The Ray worker that started this driver (Ray's job supervisor actor); else the parent.

    Ray runs the entrypoint under a shell, which may or may not exec us, hence the walk up."""
    pid = os.getppid()
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::"):
                    return pid
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return os.getppid()


# Ray's job table, as its job manager keeps it in the GCS KV store (ray.dashboard.modules.job
# .common.JobInfoStorageClient): the driver reads its own record there, no ray.init needed.
_JOB_KEY = "_ray_internal_job_info_{}"
# The GCS client is ray._raylet: importing it costs ~0.35 s of CPU, as much again as the rest of a
# short job's driver, and it competes with the replica's start. A job that ends sooner never
# imports it; a lost stop or a cancel marker is then seen ~1.5 s after the driver starts at the
# latest, instead of ~0.5 s (the supervisor watch above it runs from the first instant)
GCS_WATCH_AFTER_S = 1.0
_JOB_NAMESPACE = b"job"
_ENDED = ("STOPPED", "SUCCEEDED", "FAILED")


def _job_records(sid: str) -> Optional[Any]:
    """A function returning (this job's Ray status, whether a cancel marker exists), or None
    when the GCS cannot be read from here (then only the supervisor watch guards the driver)."""
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        gcs = GcsClient(address=os.environ["RAY_ADDRESS"])
    except Exception:  # noqa: BLE001 - a private API (any Ray version may differ): then the supervisor watch guards
        return None

    def read() -> Tuple[Optional[str], bool]:
        info = gcs.internal_kv_get(_JOB_KEY.format(sid).encode(), namespace=_JOB_NAMESPACE, timeout=5)
        marker = gcs.internal_kv_get(_JOB_KEY.format(sid + "--cancelled").encode(), namespace=_JOB_NAMESPACE,
                                     timeout=5)
        return (json.loads(info).get("status") if info else None), marker is not None
    return read


def _watch_job(sid: str, orphaned: threading.Event, stopping: threading.Event) -> None:
    """Sets ``stopping`` when this driver must not run on, whatever did or did not reach it:

    * Ray's job supervisor above it is gone (the head or node was lost, its raylet took the
      workers with it): no ``ray job stop`` will ever come (sets ``orphaned`` too);
    * Ray's record of this job says it ended (STOPPED) while the driver still runs: the stop's
      SIGTERM missed it (Ray signals the process tree it saw at that instant, which a process
      started just after escapes);
    * the client's cancel marker exists: the app was cancelled while Ray still had it PENDING,
      and a stop sent then may never reach the driver (its verdict is then CANCELLED and the
      client reports CANCELLED, although Ray records the exit as FAILED).
    """
    supervisor = _ray_ancestor()
    started = time.monotonic()

    def watch() -> None:
        records: Optional[Any] = None
        last_read = 0.0
        while not stopping.is_set():
            if sid and last_read == 0.0 and time.monotonic() - started >= GCS_WATCH_AFTER_S:
                last_read = -1.0  # tried once: None means this node cannot read the GCS
                records = _job_records(sid)
            try:
                os.kill(supervisor, 0)
                with open(f"/proc/{supervisor}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        raise ProcessLookupError
            except (ProcessLookupError, FileNotFoundError):
                orphaned.set()
                stopping.set()
                return
            except OSError:
                pass  # not ours to signal (PermissionError): it is alive
            if records is not None and time.time() - last_read >= 1.0:
                last_read = time.time()
                try:
                    status, marked = records()
                except Exception:  # noqa: BLE001 - the GCS is slow or restarting: the next round asks again
                    status, marked = None, False
                if marked or status in _ENDED:
                    stopping.set()
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, name="job-watch", daemon=True).start()


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
    _watch_job(sid, orphaned, stopping)
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
