"""The Ray job entrypoint of every ``ray_jobs`` app: ``python -m ray_jobs_cluster.driver``.

It reads the app's spec (JSON in ``$TORCHX_EXT_RAY_SPEC``, written by the client's dry-run) and:

1. reserves the gang: a single-replica app runs in this process, whose resources Ray already
   reserved as the job's entrypoint resources; any other app gets one placement group with a
   bundle per replica, all or nothing, failing after ``placement_timeout_s`` with what is missing;
2. starts one process per replica (in a Ray actor pinned to its bundle), after learning every
   replica's node address so each gets the ``TORCHX_EXT_HOSTS_<ROLE>`` discovery variables;
3. polls the replicas, writes their output to the job log as ``LINE_MARK role replica stream time
   text`` lines (the client demultiplexes them for ``torchx log``), applies the group rules and,
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
from typing import Any, Dict, List, Optional, Tuple

from . import DRIVER_ROLE, LINE_MARK, RESTART_MARK, RESTARTS_FILE, SPEC_ENV, VERDICT_MARK, rules
from .replica import Line, ReplicaRunner, node_ip

Result = Tuple[List[Line], Optional[int], str]  # (lines, exit code, error)


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
        text = "".join(f"{LINE_MARK}{role} {replica} {s} {ts:.6f} {t}\n" for s, ts, t in lines)
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


class Restarts:
    """Role.max_retries under Role.retry_policy (the rules are in :mod:`.rules`, shared with the
    other schedulers): which replicas restart when one ends, when, and the budgets used."""

    def __init__(self, spec: Dict[str, Any], replicas: List[Any], outcomes: List[Dict[str, Any]]) -> None:
        self.roles = [role for _, role, _, _ in replicas]
        self.keys = [(role["name"], k) for _, role, k, _ in replicas]
        self.outcomes = outcomes
        self.backoff = float(spec.get("retry_backoff_s", 0.0))
        self.used: Dict[str, int] = {}
        self.due: Dict[int, float] = {}
        self.count = 0
        self.why = ""

    def on_end(self, i: int, code: int, lost: str = "") -> List[int]:
        """The replicas to restart now that replica ``i`` ended with ``code`` (none: its outcome
        stands, with the attempts it had in its reason)."""
        role, o = self.roles[i], self.outcomes[i]
        limit, policy = int(role.get("max_retries", 0)), str(role.get("retry_policy", "APPLICATION"))
        if not rules.wants_restart(o["service"], code):
            return []
        unit = rules.retry_unit(policy, role["name"], o["replica_id"])
        used = self.used.get(unit, 0)
        if used >= limit:
            if limit:
                o["reason"] = f"after {used + 1} attempts ({policy} policy, max_retries={limit})"
            return []
        self.used[unit] = used + 1
        self.count += 1
        when = time.time() + rules.backoff_s(self.backoff, used + 1)
        scope = [self.keys.index(key) for key in rules.restart_scope(policy, role["name"], o["replica_id"], self.keys)]
        for x in scope:
            self.due[x] = when
        ended = f"ended: {lost}" if lost else f"ended with {rules.exit_description(code)}"
        self.why = (f"role '{role['name']}' replica {o['replica_id']} {ended}; "
                    f"{policy} policy, restart {used + 1} of {limit}")
        return scope

    def ready(self) -> List[int]:
        now = time.time()
        out = sorted(i for i, t in self.due.items() if t <= now)
        for i in out:
            del self.due[i]
        return out


# Over 60 lines: the driver's main loop still holds its own restart bookkeeping (Restarts); it
# shrinks to performing Engine actions when the driver adopts torchx_ext.engine (issue 22).
def run(spec: Dict[str, Any], out: Output, stopping: threading.Event,
        orphaned: Optional[threading.Event] = None) -> int:
    replicas = [(ri, role, k, rep) for ri, role in enumerate(spec["roles"]) for k, rep in enumerate(role["replicas"])]
    outcomes = [rules.outcome(role["name"], k, bool(role.get("service")), "PENDING") for _, role, k, _ in replicas]

    restarts: Optional[Restarts] = None

    def finish(state: str, msg: str) -> int:
        for o in outcomes:  # waiting for a restart when the group was decided: it never ran again
            if o["state"] == "PENDING" and o.get("attempt", 1) > 1:
                o["state"] = "CANCELLED"
        return out.verdict(state, msg, outcomes, restarts.count if restarts else 0)

    group = LocalGroup(spec) if spec["mode"] == "local" else GangGroup(spec)
    if any(role.get("max_retries") for role in spec["roles"]):
        out.restarts(0)  # so that describe finds a count (not Ray's "file not found") from the start
    try:
        out.say(f"reserving {len(replicas)} replica(s) of app {spec['app_id']}")
        error = group.reserve()
        if error:
            return finish("FAILED", error)
        def commands(ips: List[str]) -> List[Tuple[List[str], Dict[str, str]]]:
            """Each replica's argv and env, its discovery variables naming the nodes ``ips``."""
            hosts: Dict[str, List[str]] = {}
            for (_, role, _, _), ip in zip(replicas, ips):
                hosts.setdefault(role["hosts_env"], []).append(ip)
            cmds = []
            for (_, role, _k, rep), ip in zip(replicas, ips):
                env = dict(rep["env"])
                env.update({name: ",".join(h) for name, h in hosts.items()})
                env["TORCHX_RANK0_HOST"] = hosts[role["hosts_env"]][0]  # TorchX's rank0_env macro
                cmds.append((rep["cmd"], env))
                outcomes[len(cmds) - 1]["host"] = ip
            out.say("hosts: " + json.dumps(hosts))
            return cmds

        cmds = commands(group.node_ips())
        if stopping.is_set():  # stopped while reserving: start nothing
            if orphaned is not None and orphaned.is_set():
                return finish("FAILED", "Ray's job supervisor of this driver is gone (head or node lost)")
            return finish("CANCELLED", "stopped (the Ray job was stopped)")
        errors = group.start([(c, {**e, ATTEMPT_ENV: "1"}) for c, e in cmds], list(range(len(cmds))))
        failed = [i for i, e in enumerate(errors) if e]
        if failed:
            group.stop([i for i, e in enumerate(errors) if not e])
            for i in failed:
                outcomes[i].update(state="FAILED", reason=errors[i])
            first = outcomes[failed[0]]
            return finish(
                "FAILED", f"role '{first['role']}' replica {first['replica_id']} failed to start: {errors[failed[0]]}"
            )
        for o in outcomes:
            o.update(state="RUNNING", attempt=1)
        restarts = Restarts(spec, replicas, outcomes)
        interval = float(spec.get("poll_interval_s", 0.2))
        while True:
            for i, (lines, code, err) in enumerate(group.poll()):
                ri, _, k, _ = replicas[i]
                out.lines(str(ri), k, lines)
                if code is not None and outcomes[i]["state"] == "RUNNING":
                    # a lost actor (err) has no exit code of its own: its reason says what happened
                    outcomes[i].update(state="SUCCEEDED" if code == 0 else "FAILED",
                                       exit_code=None if err else code, reason=err)
                    scope = restarts.on_end(i, code, err)
                    if scope:
                        out.restarts(restarts.count)
                        out.say(f"{RESTART_MARK}{restarts.count}: {restarts.why}")
                        group.stop([x for x in scope if outcomes[x]["state"] == "RUNNING"])
                        for x in scope:
                            outcomes[x].update(state="PENDING", attempt=outcomes[x]["attempt"] + 1,
                                               exit_code=None, reason="")
                            out.lines(str(replicas[x][0]), replicas[x][2], [("e", time.time(), (
                                f"[torchx-ext] attempt {outcomes[x]['attempt']} of role '{outcomes[x]['role']}' "
                                f"replica {outcomes[x]['replica_id']} begins: {restarts.why}"))])
            ready = restarts.ready() if not stopping.is_set() else []
            if ready:
                before = [o.get("host") for o in outcomes]
                unplaced = group.prepare(ready)
                if isinstance(group, GangGroup) and group.ips != before:
                    # a lost node's replica moves: the replicas restarted now learn its new node
                    # (those still running keep the discovery variables they started with)
                    cmds = commands(group.ips)
                for i, why in unplaced.items():
                    outcomes[i].update(state="FAILED", reason=f"failed to restart: {why}")
                ready = [i for i in ready if i not in unplaced]
                started = group.start([(c, {**e, ATTEMPT_ENV: str(outcomes[i]["attempt"])})
                                       for i, (c, e) in enumerate(cmds)], ready)
                for i, error in zip(ready, started):
                    if error:
                        outcomes[i].update(state="FAILED", reason=f"failed to restart: {error}")
                    else:
                        outcomes[i]["state"] = "RUNNING"
            state, msg = rules.group_state(outcomes)
            if orphaned is not None and orphaned.is_set() and state not in rules.TERMINAL:
                state, msg = "FAILED", "Ray's job supervisor of this driver is gone (head or node lost)"
            elif stopping.is_set() and state not in rules.TERMINAL:
                state, msg = "CANCELLED", "stopped (the Ray job was stopped)"
            if state in rules.TERMINAL:
                live = [i for i, o in enumerate(outcomes) if o["state"] == "RUNNING"]
                if live:
                    out.say(f"group is {state}; stopping {len(live)} replica(s) still running")
                    group.stop(live)
                    for i, (lines, _code, _err) in enumerate(group.poll()):
                        out.lines(str(replicas[i][0]), replicas[i][2], lines)
                    for i in live:
                        outcomes[i]["state"] = "CANCELLED"
                return finish(state, msg)
            stopping.wait(interval)
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
