"""The Docker launcher of the group engine (:mod:`torchx_ext.engine`): what the daemon shows of an
app becomes the engine's events, and the engine's actions become container operations.

**One engine per app, restored every pass.** A pass (a watcher's reconcile, or a describe)
restores the app's engine from the newest snapshot the daemon holds (label
:data:`~.daemon.L_ENGINE` of the attempts a restart created; none yet: a new engine)
and replays what the containers show since: which attempts started or could not, which ended,
with what exit code and when (``FinishedAt``: a backoff counts from the exit whoever reads it),
which containers were removed. The daemon stays the only truth: a watcher that takes over from a
dead one goes on with the same attempts and budgets, a pass cut short (the daemon away) is decided
again from what the daemon holds, and a describe computes exactly what the watcher will do.

**Performing** (``acting``: the watcher, holding the app's lease; a describe performs nothing):
  * ``Restart``: the scope's next attempts are created at once (labels: attempt, restart number,
    budget unit, end of the backoff, why, the engine's snapshot), before the old attempts are
    stopped, so a reader sees each replica running or about to restart, never a failed group,
    and the decision outlives the watcher. A next attempt that cannot be created fails the app
    (the engine's "failed to restart" message).
  * ``Stop``: the earlier attempts of those replicas still running are stopped.
  * ``Mark``: nothing more to do: the log reader writes the marker line from the why label the
    attempt's container was created with (the same words, :func:`rules.attempt_marker`).
  * ``Start``: the attempt's container is started (created first if a pass cut short did not);
    a batch at once, its Starteds reported before its StartFaileds.
  * ``Probe``: ``Ready`` at once if the attempt was seen ready (a record on the daemon), else the
    acting watcher connects once per pass until it is (:mod:`.readiness`: where, how; its
    ``Started`` is reported at the container's ``StartedAt``, so every pass has the same deadline).
  * ``Wait``: the watcher looks again by then (:attr:`AppStatus.next_due`; a pending probe: soon).
  * ``Verdict``: pinned (the verdict volume) *before* the final ``Stop``: the verdict is what makes
    the exit codes of the stopped containers read as stops to any later reader; stopped first, a
    successor would read them as failures. A failed first start stops the others at once (nothing
    of the group ever did any work).

**What the launcher still decides** (none of it an app's fate): when its dependencies let the
group begin (and the message naming a failed one, as the host supervisor does); that a verdict
pinned by someone else (``torchx cancel``) stops whatever of the app still runs; that docker's
exit codes are reported as exits (``exit code 137``, as ``docker ps`` shows it) with docker's own
words (OOMKilled, a dead container) as ``how``/``detail``; and that the last line of a replica's
stderr is read only when the engine ends the app for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

from torchx.specs import AppState

from torchx_ext import engine
from torchx_ext.engine import rules
from torchx_ext.schedulers.docker_jobs import readiness, retries
from torchx_ext.schedulers.docker_jobs.daemon import (
    L_ENGINE,
    L_RESTART,
    L_RESTART_UNIT,
    L_RESTART_WHY,
    L_START_AFTER,
    Replica,
    Snapshot,
    Verdict,
    explain,
    fetch,
    last_stderr_line,
    parallel,
    pin_verdict,
    remove_network,
    stop,
    transient,
)

Key = tuple[str, int]
REMOVED = "its container was removed"
_RESTART_LABELS = (L_RESTART, L_RESTART_UNIT, L_START_AFTER, L_RESTART_WHY, L_ENGINE)


@dataclass
class AppStatus:
    """The reported state of an app (what describe shows)."""

    snapshot: Snapshot
    state: AppState
    msg: str
    engine: Optional[engine.Engine] = None  # as this pass left it (None once a verdict was pinned)

    @property
    def over(self) -> bool:
        """Decided (verdict pinned) and nothing runs any more: no watcher is needed."""
        return self.snapshot.verdict is not None and not self.snapshot.running

    @property
    def next_due(self) -> Optional[float]:
        """When the engine wants to be asked again (the end of a backoff)."""
        return self.engine.next_due if self.engine is not None else None

    @property
    def probing(self) -> bool:
        """A service's readiness is pending: the watcher looks again soon (each look probes it)."""
        return self.engine is not None and any(v.ready_by is not None for v in self.engine.replicas.values())


def group_spec(snap: Snapshot) -> engine.GroupSpec:
    """The app's group for the engine: its roles as submitted (with a service's ports), each
    replica's retry policy and budget from its containers' labels."""
    latest = {(r.role, r.replica_id): r for r in sorted((*snap.previous, *snap.replicas), key=lambda r: r.attempt)}
    keys = [((str(s["name"]), k), bool(s.get("service")), readiness.ports(s))
            for s in snap.roles for k in range(int(s["num_replicas"]))]
    specs = []
    for key, service, ports in keys or [(k, r.service, ()) for k, r in sorted(latest.items())]:
        rep = latest.get(key)
        specs.append(engine.ReplicaSpec(key[0], key[1], service, rep.max_retries if rep else 0,
                                        rules.retry_policy_name(rep.policy if rep else "APPLICATION"), ports))
    return engine.GroupSpec(tuple(specs), snap.retry_backoff_s, snap.ready_timeout_s)


class Pass:
    """One look at an app: its engine restored, what the daemon shows replayed into it, and (when
    ``acting``) the actions performed. See the module docstring."""

    def __init__(self, api: Any, snap: Snapshot, acting: bool,
                 died: Optional[dict[str, tuple[int, float]]] = None) -> None:
        self.api, self.snap, self.acting, self.died = api, snap, acting, died or {}
        self.spec = group_spec(snap)
        keys = {r.key for r in self.spec.replicas}
        # every attempt's container by (replica, attempt); attempts this pass creates join it
        self.attempts = {((r.role, r.replica_id), r.attempt): r for r in (*snap.previous, *snap.replicas)
                         if (r.role, r.replica_id) in keys}
        self.engine = self._restored()
        self.restart_labels: dict[Key, dict[str, str]] = {}  # of the restarts this pass decided
        self.verdict: Optional[Verdict] = None
        self.kill_at_once = False
        self.changed = False  # something was performed: the daemon's view is worth reading again
        self.readiness = readiness.Readiness(api, snap, self.spec.gated, probing=acting)

    def _restored(self) -> engine.Engine:
        """The engine as the newest snapshot on the daemon left it (a new one if there is none)."""
        best: Optional[tuple[int, dict[str, Any]]] = None
        for rep in self.attempts.values():
            if rep.engine:
                try:
                    snap = json.loads(rep.engine)
                    number = int(snap["num_restarts"])
                except (ValueError, KeyError, TypeError):
                    continue  # not one of ours: the replay from the start decides without it
                if best is None or number > best[0]:
                    best = (number, snap)
        if best is not None:
            try:
                return engine.Engine.restore(self.spec, best[1])
            except (KeyError, ValueError, TypeError):
                pass  # a snapshot of another group shape (the roles label edited?): replayed from the start
        return engine.Engine(self.spec)

    # -- events in ----------------------------------------------------------------------
    def report(self, event: engine.Event, now: float) -> None:
        if isinstance(event, engine.StartFailed) and (event.attempt or 1) == 1:
            self.kill_at_once = True  # all or nothing: the others never did any work
        if isinstance(event, engine.Started) and self.engine.replicas[event.key].spec.ports:
            attempt = (event.key, event.attempt or self.engine.replicas[event.key].attempt)
            now = self.readiness.started_at(attempt, self.attempts.get(attempt), now)  # the deadline's start
        self.perform(self.engine.on(event, now))

    def replay(self) -> None:
        """Reports what the containers show that the engine has not heard yet, oldest exit first
        (a scope's exit before the stops it caused), until nothing is new or the app is decided."""
        eng = self.engine
        for key, v in eng.replicas.items():  # a restored engine's probes, before any Tick: a service
            if v.state == "RUNNING" and v.ready_by is not None:  # past its deadline is looked at first
                self._probe(engine.Probe(key, v.attempt, v.spec.ports, v.ready_by))
        while eng.verdict is None:
            self._tick(time.time())
            for key, v in list(eng.replicas.items()):
                rep = self.attempts.get((key, v.attempt))
                if v.state != "PENDING" or v.due is not None or not eng.begun or rep is None:
                    continue
                if rep.started:
                    self.report(engine.Started(key, v.attempt), time.time())
                elif rep.error:
                    self.report(engine.StartFailed(key, rep.error, v.attempt), time.time())
            ended = sorted(self._ended(), key=lambda x: (x[0], x[1].key))
            if eng.verdict is not None or not ended:
                break
            at, event = ended[0]
            self.report(self._with_detail(event, at), at)

    def _tick(self, now: float) -> None:
        # a restarted attempt that runs already was due, whatever this machine's clock says
        late = [v.due for k, v in self.engine.replicas.items()
                if v.due is not None and getattr(self.attempts.get((k, v.attempt)), "started", False)]
        at = max([now, *late])
        due = self.engine.next_due
        if due is not None and due <= at:
            self.report(engine.Tick(), at)

    def _ended(self) -> list[tuple[float, Union[engine.Exited, engine.Lost]]]:
        out: list[tuple[float, Union[engine.Exited, engine.Lost]]] = []
        for key, v in self.engine.replicas.items():
            if v.state != "RUNNING":
                continue
            rep = self.attempts.get((key, v.attempt))
            if rep is None:
                out.append((time.time(), engine.Lost(key, REMOVED, v.attempt)))
            elif rep.running and rep.container_id in self.died:
                # the daemon's "die" event comes some 50-90 ms before a snapshot shows the exit
                code, at = self.died[rep.container_id]
                oom = code == 137 and bool(self.api.inspect_container(rep.container_id)["State"].get("OOMKilled"))
                how = "OOMKilled" if oom else ""
                out.append((at, engine.Exited(key, code, v.attempt, how=how, detail=how)))
            elif rep.status in ("exited", "dead"):
                how = "OOMKilled" if rep.oom_killed else ""
                detail = how or rep.error or ("container is dead" if rep.status == "dead" else "")
                code = rep.exit_code if rep.exit_code is not None else 255  # dead, and no code said
                out.append((rep.finished_at or time.time(), engine.Exited(key, code, v.attempt, how, detail)))
        return out

    def _with_detail(self, event: Union[engine.Exited, engine.Lost], at: float) -> engine.Event:
        """``event`` with the last line of the replica's stderr as its detail when the engine ends
        the replica for it (tried on a copy of the engine first: a restart never waits for the read)."""
        if not isinstance(event, engine.Exited) or event.code == 0 or event.detail:
            return event
        trial = engine.Engine.restore(self.spec, self.engine.snapshot())
        if any(isinstance(a, engine.Restart) for a in trial.on(event, at)):
            return event
        rep = self.attempts[(event.key, self.engine.replicas[event.key].attempt)]
        return replace(event, detail=last_stderr_line(self.api, rep))

    # -- actions out --------------------------------------------------------------------
    def perform(self, actions: Sequence[engine.Action]) -> None:
        for action in actions:
            if isinstance(action, engine.Verdict):
                self._pin(action)  # before the final Stop: see the module docstring
        i = 0
        while i < len(actions):
            j = i
            while j < len(actions) and isinstance(actions[j], engine.Start):
                j += 1
            if j > i:  # a batch of Starts, performed at once
                self.start([a for a in actions[i:j] if isinstance(a, engine.Start)])
                i = j
                continue
            action = actions[i]
            if isinstance(action, engine.Restart):
                self._restart(action)
            elif isinstance(action, engine.Stop):
                self._stop(action)
            elif isinstance(action, engine.Probe):
                self._probe(action)
            i += 1

    def _probe(self, probe: engine.Probe) -> None:
        # Ready if seen ready (readiness.Readiness.ready); else pending: the watcher looks again soon
        if self.readiness.ready(probe, self.attempts.get((probe.key, probe.attempt))):
            self.report(engine.Ready(probe.key, probe.attempt), time.time())

    def _pin(self, v: engine.Verdict) -> None:
        state = AppState.__members__[v.state]
        if self.acting:
            self.verdict = pin_verdict(self.api, self.snap, state, v.msg)  # the first verdict stands
            self.changed = True
        else:
            self.verdict = Verdict(state, v.msg, time.time())

    def _restart(self, action: engine.Restart) -> None:
        labels = {L_RESTART: str(action.number), L_RESTART_UNIT: action.unit, L_START_AFTER: f"{action.due:.3f}",
                  L_RESTART_WHY: action.why, L_ENGINE: json.dumps(self.engine.snapshot(), separators=(",", ":"))}
        for key in action.keys:
            self.restart_labels[key] = labels
        if not self.acting:
            return
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.snap.app_id}: restart {action.number}: {action.why}",
              flush=True)
        missing = [k for k in action.keys if (k, self.engine.replicas[k].attempt) not in self.attempts]
        failed = self._create(missing)
        if failed:
            key, why = failed[0]
            msg = rules.start_failed_message(key[0], key[1], why, self.engine.replicas[key].attempt)
            self.report(engine.Fail(msg), time.time())

    def _create(self, keys: list[Key]) -> list[tuple[Key, str]]:
        """Creates the current attempt of each of ``keys`` from its latest earlier one; those that
        could not be created, and why (the daemon being away ends the pass instead)."""
        def one(key: Key) -> None:
            attempt = self.engine.replicas[key].attempt
            earlier = [r for (k, n), r in self.attempts.items() if k == key and n < attempt]
            if not earlier:
                raise LookupError(REMOVED)
            source = max(earlier, key=lambda r: r.attempt)
            labels = self.restart_labels.get(key) or {L_ENGINE: json.dumps(self.engine.snapshot())}
            cid = retries.recreate(self.api, source, attempt, labels)
            self.attempts[(key, attempt)] = replace(
                source, container_id=cid, status="created", started=False, exit_code=None, error="",
                oom_killed=False, finished_at=None, attempt=attempt, engine=labels.get(L_ENGINE, ""))
        if keys:
            self.changed = True
        failed = [(k, e) for k, e in parallel(one, keys) if e is not None]
        for _, e in failed:
            if transient(e):
                raise e  # the daemon is away: this pass ends; the next one decides again
        return [(k, REMOVED if isinstance(e, LookupError) else explain(e)) for k, e in failed]

    def _stop(self, action: engine.Stop) -> None:
        if not self.acting:
            return
        if action.final:  # everything of the app that still runs, whatever its attempt
            reps = [r for r in self.attempts.values() if r.running]
        else:  # the attempts before the current one (the engine moved past them)
            reps = [r for (k, n), r in self.attempts.items()
                    if k in action.keys and n < self.engine.replicas[k].attempt and r.running]
        reps = [r for r in reps if r.container_id not in self.died]  # exited already (a "die" event)
        stop(self.api, reps, 0 if action.final and self.kill_at_once else self.snap.stop_timeout)
        for r in reps:
            r.status = "exited"
        self.changed = self.changed or bool(reps)

    def start(self, batch: Sequence[engine.Start]) -> None:
        """Performs a batch of Starts at once (an attempt that started already is only reported);
        reports its Starteds, then its StartFaileds."""
        if self.engine.verdict is not None or not batch:
            return  # decided meanwhile (all or nothing): start no more
        news: list[engine.Event] = []
        todo: list[engine.Start] = []
        for a in batch:
            rep = self.attempts.get((a.key, a.attempt))
            if rep is not None and rep.started:
                news.append(engine.Started(a.key, a.attempt))
            elif rep is not None and rep.error:
                news.append(engine.StartFailed(a.key, rep.error, a.attempt))
            elif self.acting:
                todo.append(a)
            elif not any(k == a.key for k, _ in self.attempts):
                news.append(engine.StartFailed(a.key, REMOVED, a.attempt))  # nothing to create it from
        if todo:
            failed = dict(self._create([a.key for a in todo if (a.key, a.attempt) not in self.attempts]))
            news += [engine.StartFailed(a.key, failed[a.key], a.attempt) for a in todo if a.key in failed]
            todo = [a for a in todo if a.key not in failed]
            for a, e in parallel(lambda a: self.api.start(self.attempts[(a.key, a.attempt)].container_id), todo):
                if e is not None and transient(e):
                    raise e
                if e is None:
                    rep = self.attempts[(a.key, a.attempt)]
                    rep.status, rep.started = "running", True
                    self.readiness.started[(a.key, a.attempt)] = time.time()
                    news.append(engine.Started(a.key, a.attempt))
                else:
                    news.append(engine.StartFailed(a.key, explain(e), a.attempt))
            self.changed = True
        news.sort(key=lambda ev: isinstance(ev, engine.StartFailed))  # Starteds first (the protocol)
        for ev in news:
            self.report(ev, time.time())

    def stop_superseded(self) -> None:
        """Stops the earlier attempts still running (acting): a pass cut short after a restart's
        new attempts were created did not stop them."""
        if self.acting and self.engine.verdict is None:
            self._stop(engine.Stop(tuple(self.engine.replicas)))

    def finish(self) -> None:
        """Performs the Starts a pass cut short did not (acting)."""
        eng = self.engine
        if self.acting and eng.verdict is None and eng.begun:
            self.start([engine.Start(k, v.attempt) for k, v in eng.replicas.items()
                        if v.state == "PENDING" and v.due is None and not v.held])


# ------------------------------------------------------------------------- the app ------
def start_group(api: Any, snap: Snapshot, reps: list[Replica]) -> Optional[Verdict]:
    """Starts ``reps`` (the group's first attempts) all or nothing: the engine's Begin, performed;
    the verdict if one failed to start (pinned, the others stopped)."""
    p = Pass(api, replace(snap, replicas=list(reps), previous=[]), acting=True)
    p.readiness.probing = False  # the services started a moment ago: the watcher probes them
    p.report(engine.Begin(), time.time())
    return p.verdict


def dependency_verdict(api: Any, deps: list[str]) -> tuple[bool, str]:
    """(all succeeded, failure message or "")."""
    for dep in deps:
        st = reconcile(api, dep, acting=False)
        if st is None:
            return False, f"dependency '{dep}' no longer exists"
        if st.state in (AppState.FAILED, AppState.CANCELLED):
            return False, f"dependency '{dep}' ended {st.state.name}" + (f" ({st.msg})" if st.msg else "")
        if st.state != AppState.SUCCEEDED:
            return False, ""
    return True, ""


def _begin(p: Pass) -> Optional[AppStatus]:
    """The group's Begin, once it may (its dependencies succeeded), or the status while it may not."""
    snap = p.snap
    if any(r.started or r.error or r.attempt > 1 for r in p.attempts.values()):
        p.report(engine.Begin(), time.time())  # it began (schedule, or an earlier watcher, started it)
        return None
    ok, why = dependency_verdict(p.api, snap.dependencies)
    if why:
        p.report(engine.Fail(why), time.time())
    elif not ok:
        return AppStatus(snap, AppState.PENDING, "waiting for dependencies: " + ", ".join(snap.dependencies))
    elif not p.acting:
        return AppStatus(snap, AppState.PENDING, "its dependencies succeeded; starting")
    else:
        p.report(engine.Begin(), time.time())
    return None


def reconcile(api: Any, app_id: str, acting: bool, died: Optional[dict[str, tuple[int, float]]] = None,
              snap: Optional[Snapshot] = None) -> Optional[AppStatus]:
    """Reads the app from the daemon, lets the engine decide, and reports its state.

    Args:
        api: a docker ``APIClient``
        app_id: the app; ``snap``: it as just read (``list``: :mod:`.inventory`), else read here
        acting: True in the watcher: perform what the engine decides (start, restart, pin, stop)
            and clean up. False in describe: the same decisions, computed only; nothing on the
            daemon changes
        died: container id -> (exit code, unix time), from the daemon's "die" events: the daemon
            sends them some 50-90 ms before a snapshot shows those containers exited
    """
    snap = snap or fetch(api, app_id)
    if snap is None:
        return None
    verdict = snap.verdict
    p: Optional[Pass] = None
    if verdict is None:
        p = Pass(api, snap, acting, died)
        if not p.engine.begun:
            waiting = _begin(p)
            if waiting is not None:
                return waiting
        p.stop_superseded()
        p.replay()
        p.finish()
        if p.changed:
            snap = fetch(api, app_id) or snap
        verdict = p.verdict
        if verdict is None:
            st, msg = rules.group_state([v.outcome() for v in p.engine.replicas.values()])
            return AppStatus(snap, AppState.__members__[st], msg, p.engine)
    # decided (by this pass, or pinned before: a cancel, an earlier watcher): nothing may run any more
    if snap.running and acting:
        stop(api, snap.running, snap.stop_timeout)
        snap = fetch(api, app_id) or snap
    if snap.running:
        names = ", ".join(f"{r.role}/{r.replica_id}" for r in snap.running)
        return AppStatus(snap, AppState.RUNNING,
                         f"stopping {names}; then {verdict.state.name}" + (f": {verdict.msg}" if verdict.msg else ""),
                         p.engine if p else None)
    if acting and snap.network:
        remove_network(api, snap.network)
    return AppStatus(snap, verdict.state, verdict.msg)
