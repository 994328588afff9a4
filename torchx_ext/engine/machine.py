"""The group engine: a pure state machine that decides an app's fate from what its launcher saw.

``Engine(spec).on(event, now) -> [Action, ...]``: the launcher (host supervisor, Slurm batch job,
Ray driver, Docker watcher) reports what happened to the replicas, in the engine's terms, and
performs the actions it gets back, **in order**, each to completion (a ``Stop`` returns once
nothing of those replicas' current attempts runs). The engine never touches a process, a clock or
a file: ``now`` comes with every event, and timers are ``Wait`` actions the launcher answers with
a ``Tick`` when they are due (or sooner: a Tick starts only what is due).

Protocol:
  * ``Begin``: the group may start (dependencies met, resources held) -> ``Start`` for every
    replica, attempt 1. Each performed Start is answered with ``Started`` or ``StartFailed``; a
    launcher that reports them one by one performs no further Start of a batch once
    ``Engine.verdict`` is set (one that starts a batch at once reports its Starteds first: those
    that raced the verdict get a Stop).
  * ``Exited``/``Killed``/``Lost`` of a running attempt -> nothing, a restart (``Restart``, then
    ``Stop`` of its scope, a ``Mark`` per replica, then ``Start``s now or a ``Wait``), or the verdict.
  * ``Cancel``/``Fail`` -> the verdict. ``Tick`` -> the ``Start``s whose backoff is over.
  * ``Rerun`` (after :meth:`Engine.restore`): the whole group again, drawn from no budget.
  * Readiness: a service replica that declares ports (``ReplicaSpec.ports``, from the role's
    ``port_map``) is ready once every one of them accepts TCP connections on its host. While any
    such replica's current attempt is not ready, no non-service replica starts: ``Begin`` (and a
    ``Rerun``, or a restart whose scope holds a service) starts the services and holds the others.
    A performed Start of such a service is answered with ``Started``, which gets a ``Probe``; the
    launcher connects to those ports where the replica runs until they accept and then reports
    ``Ready``; the held replicas start on the last one. A service not ready ready_timeout_s after
    its Started fails the app, naming it (the deadline is in ``next_due``: the launcher Ticks).
  * The verdict is always ``Stop(final=True)`` of every replica ever started, then ``Verdict``;
    it comes once; after it every event gets no action, except a ``Started`` (a start that raced
    the verdict), which gets a Stop of that replica.
  * An event naming an attempt that is not the replica's current one is stale: ignored.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import rules

Key = Tuple[str, int]  # (role, replica id)


# ------------------------------------------------------------------------------ spec ----
@dataclass(frozen=True)
class ReplicaSpec:
    role: str
    replica_id: int
    service: bool = False
    max_retries: int = 0
    retry_policy: str = "APPLICATION"
    ports: Tuple[int, ...] = ()  # a service's: it is ready once they accept connections

    @property
    def key(self) -> Key:
        return (self.role, self.replica_id)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReplicaSpec:
        """From a launcher's JSON replica record (keys role, replica_id, service, max_retries,
        retry_policy, ports; the others are the launcher's). A non-service's ports are not waited for."""
        return cls(str(d["role"]), int(d["replica_id"]), bool(d.get("service", False)),
                   int(d.get("max_retries", 0)), rules.retry_policy_name(d.get("retry_policy", "APPLICATION")),
                   tuple(int(p) for p in d.get("ports", ())) if d.get("service") else ())


@dataclass(frozen=True)
class GroupSpec:
    replicas: Tuple[ReplicaSpec, ...]
    retry_backoff_s: float = 0.0
    ready_timeout_s: float = rules.READY_TIMEOUT_S  # how long a service may take to accept connections

    @classmethod
    def from_dicts(cls, replicas: Sequence[Mapping[str, Any]], retry_backoff_s: float = 0.0,
                   ready_timeout_s: Optional[float] = None) -> GroupSpec:
        return cls(tuple(ReplicaSpec.from_dict(r) for r in replicas), float(retry_backoff_s),
                   rules.READY_TIMEOUT_S if ready_timeout_s is None else float(ready_timeout_s))

    @property
    def gated(self) -> bool:
        """Does a service declare ports (so the other roles wait for it)?"""
        return any(r.service and r.ports for r in self.replicas)


# ---------------------------------------------------------------------------- events ----
@dataclass(frozen=True)
class Begin:
    """The group may start now."""


@dataclass(frozen=True)
class Started:
    key: Key
    attempt: Optional[int] = None  # None: the current attempt


@dataclass(frozen=True)
class StartFailed:
    key: Key
    error: str
    attempt: Optional[int] = None


@dataclass(frozen=True)
class Exited:
    """The attempt ended with ``code`` (>= 0; a launcher with shell-style codes reports
    128+n as ``Killed(n)``); ``how``: the launcher's own word for it (docker: "OOMKilled"), said
    in place of the exit code when a restart names it; ``detail``: what the launcher knows of why
    (docker: OOMKilled, the last line of its stderr), the first words of the failure's reason."""
    key: Key
    code: int
    attempt: Optional[int] = None
    how: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Killed:
    key: Key
    signum: int
    attempt: Optional[int] = None


@dataclass(frozen=True)
class Lost:
    """The attempt's process is gone with its node or worker; ``why`` says how it was seen."""
    key: Key
    why: str
    attempt: Optional[int] = None


@dataclass(frozen=True)
class Cancel:
    msg: str = rules.CANCELLED_BY_USER


@dataclass(frozen=True)
class Fail:
    """The app cannot go on for a reason outside its replicas (a dependency failed, the
    launcher's own supervisor is gone, no resources)."""
    msg: str


@dataclass(frozen=True)
class Rerun:
    """The whole group starts over from outside the engine (Slurm requeued the job): one more
    restart in ``num_restarts`` and in every replica's attempt, drawn from no budget. Nothing of
    the earlier run is alive (the launcher restored the engine from its last snapshot)."""
    why: str


@dataclass(frozen=True)
class Ready:
    """Every port of the service's attempt (``Probe``) accepts connections."""
    key: Key
    attempt: Optional[int] = None


@dataclass(frozen=True)
class Tick:
    """A timer the engine asked for (``Wait``) may be due."""


Event = Union[Begin, Started, StartFailed, Exited, Killed, Lost, Cancel, Fail, Rerun, Ready, Tick]


# --------------------------------------------------------------------------- actions ----
@dataclass(frozen=True)
class Start:
    key: Key
    attempt: int


@dataclass(frozen=True)
class Stop:
    """End these replicas' current attempts (whatever of them still runs, and what they left
    behind) and return once nothing of them runs. ``final``: the group is decided."""
    keys: Tuple[Key, ...]
    final: bool = False


@dataclass(frozen=True)
class Restart:
    """Restart ``number`` of the app was decided: ``keys`` restart, drawn from ``unit``'s budget,
    not before ``due``. For the launcher's own records (a log line, labels, a budget file)."""
    number: int
    unit: str
    why: str
    keys: Tuple[Key, ...]
    due: float


@dataclass(frozen=True)
class Mark:
    """Write ``line`` (the attempt marker) to the replica's stderr, before attempt ``attempt``."""
    key: Key
    attempt: int
    line: str


@dataclass(frozen=True)
class Probe:
    """Connect to ``ports`` where attempt ``attempt`` of service ``key`` runs, until each accepts
    (or the attempt is stopped, or a verdict comes); then report ``Ready(key, attempt)``. The
    deadline is the engine's (``until``, for the launcher's own records)."""
    key: Key
    attempt: int
    ports: Tuple[int, ...]
    until: float


@dataclass(frozen=True)
class Wait:
    """Send a Tick at ``until`` (or sooner)."""
    until: float


@dataclass(frozen=True)
class Verdict:
    state: str
    msg: str


Action = Union[Start, Stop, Restart, Mark, Probe, Wait, Verdict]


# ---------------------------------------------------------------------------- engine ----
@dataclass
class ReplicaView:
    """What the engine holds about one replica (the launcher records it as it likes)."""
    spec: ReplicaSpec
    state: str = "PENDING"
    attempt: int = 1
    exit_code: Optional[int] = None
    reason: str = ""
    ever_started: bool = False
    due: Optional[float] = None  # when its pending restart starts
    ready: bool = False  # a service with ports: its attempt accepts connections (else: ready_by)
    ready_by: Optional[float] = None
    held: bool = False  # a non-service whose start waits for the services to be ready

    def outcome(self) -> Dict[str, Any]:
        s = self.spec
        return rules.outcome(s.role, s.replica_id, s.service, self.state, self.exit_code, self.reason)


@dataclass
class Engine:
    spec: GroupSpec
    replicas: Dict[Key, ReplicaView] = field(init=False)
    used: Dict[str, int] = field(init=False, default_factory=dict)  # restarts per budget unit
    num_restarts: int = field(init=False, default=0)
    verdict: Optional[Verdict] = field(init=False, default=None)
    begun: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.replicas = {r.key: ReplicaView(r) for r in self.spec.replicas}
        if len(self.replicas) != len(self.spec.replicas):
            raise ValueError("two replicas of the group have the same (role, replica id)")

    @property
    def next_due(self) -> Optional[float]:
        """When the next pending restart starts or a service's readiness deadline passes (None:
        neither pending, or decided): a Tick is due then."""
        due = [t for v in self.replicas.values() for t in (v.due, v.ready_by) if t is not None]
        return min(due) if due and self.verdict is None else None

    @property
    def services_ready(self) -> bool:
        """Is every service that declares ports ready (its current attempt)? Until then the
        others are held."""
        return all(v.ready for v in self.replicas.values() if v.spec.service and v.spec.ports)

    def on(self, event: Event, now: float) -> List[Action]:
        """The actions ``event`` asks for, in the order they must be performed."""
        if self.verdict is not None:
            if isinstance(event, Started):  # raced the verdict: it must not outlive it
                return [Stop((event.key,), final=True)]
            return []
        if isinstance(event, Begin):
            return self._begin(now)
        if isinstance(event, (Cancel, Fail)):
            state = "CANCELLED" if isinstance(event, Cancel) else "FAILED"
            return self._decide(state, event.msg)
        if isinstance(event, Tick):
            return self._not_ready(now) or self._start_due(now)
        if isinstance(event, Rerun):
            return self._rerun(event.why, now)
        view = self.replicas[event.key]
        if event.attempt is not None and event.attempt != view.attempt:
            return []  # an earlier attempt's news: that attempt was stopped already
        if isinstance(event, Started):
            return self._started(view, now)
        if isinstance(event, Ready):
            return self._ready(view, now)
        if isinstance(event, StartFailed):
            return self._start_failed(view, event.error)
        return self._ended(view, event, now)

    # -- a launcher that outlives its engine (a requeued job, a restarted watcher) --------
    def snapshot(self) -> Dict[str, Any]:
        """Everything the engine knows, as JSON-able data: :meth:`restore` goes on from it."""
        return {"used": dict(self.used), "num_restarts": self.num_restarts, "begun": self.begun,
                "verdict": [self.verdict.state, self.verdict.msg] if self.verdict else None,
                "replicas": [[v.spec.role, v.spec.replica_id, v.state, v.attempt, v.exit_code, v.reason,
                              v.ever_started, v.due, v.ready, v.ready_by, v.held]
                             for v in self.replicas.values()]}

    @classmethod
    def restore(cls, spec: GroupSpec, snap: Mapping[str, Any]) -> Engine:
        """The engine of ``spec`` as :meth:`snapshot` left it."""
        eng = cls(spec)
        eng.used = {str(k): int(n) for k, n in snap["used"].items()}
        eng.num_restarts, eng.begun = int(snap["num_restarts"]), bool(snap["begun"])
        eng.verdict = Verdict(*snap["verdict"]) if snap.get("verdict") else None
        for row in snap["replicas"]:  # (8 fields before readiness: nothing was held then)
            role, k, state, attempt, code, reason, ever, due, ready, ready_by, held = [*row, False, None, False][:11]
            v = eng.replicas[(role, k)]
            v.state, v.attempt, v.exit_code, v.reason, v.ever_started, v.due = state, attempt, code, reason, ever, due
            v.ready, v.ready_by, v.held = bool(ready), ready_by, bool(held)
        return eng

    # -- the events ---------------------------------------------------------------------
    def _rerun(self, why: str, now: float) -> List[Action]:
        self.begun = True
        self.num_restarts += 1
        keys = tuple(self.replicas)
        actions: List[Action] = [Restart(self.num_restarts, "", why, keys, now)]
        for key, v in self.replicas.items():
            v.state, v.attempt, v.exit_code, v.reason, v.due = "PENDING", v.attempt + 1, None, "", now
            v.ready, v.ready_by, v.held = False, None, False
            actions.append(Mark(key, v.attempt, rules.attempt_marker(v.attempt, key[0], key[1], why)))
        return actions + self._start_due(now)

    def _begin(self, now: float) -> List[Action]:
        if self.begun:
            return []
        self.begun = True
        for v in self.replicas.values():
            v.due = now
        return self._start_due(now)

    def _started(self, view: ReplicaView, now: float) -> List[Action]:
        if view.state != "PENDING" or view.due is not None or view.held:
            return []
        view.state, view.ever_started = "RUNNING", True
        s = view.spec
        if not (s.service and s.ports):
            return []
        view.ready_by = now + self.spec.ready_timeout_s
        return [Probe(s.key, view.attempt, s.ports, view.ready_by), Wait(view.ready_by)]

    def _ready(self, view: ReplicaView, now: float) -> List[Action]:
        if view.state != "RUNNING" or view.ready or not (view.spec.service and view.spec.ports):
            return []
        view.ready, view.ready_by = True, None
        return self._start_due(now)

    def _not_ready(self, now: float) -> List[Action]:  # the verdict, once a readiness deadline passed
        for v in self.replicas.values():
            if v.ready_by is not None and v.ready_by <= now and not v.ready:
                s = v.spec
                v.reason = rules.not_ready_reason(s.ports, self.spec.ready_timeout_s)
                actions = self._decide("FAILED", rules.not_ready_message(s.role, s.replica_id, v.reason))
                v.state = "FAILED"  # the culprit, not one the verdict stopped (it is stopped all the same)
                return actions
        return []

    def _start_failed(self, view: ReplicaView, error: str) -> List[Action]:
        if view.state != "PENDING" or view.due is not None:
            return []
        view.state, view.reason = "FAILED", f"failed to start: {error}"
        s = view.spec
        return self._decide("FAILED", rules.start_failed_message(s.role, s.replica_id, error, view.attempt))

    def _ended(self, view: ReplicaView, event: Union[Exited, Killed, Lost], now: float) -> List[Action]:
        if view.state != "RUNNING":
            return []
        lost = how = detail = ""
        if isinstance(event, Exited):
            code: Optional[int] = event.code
            how, detail = event.how, event.detail
        elif isinstance(event, Killed):
            code = -event.signum
        else:
            code, lost = None, event.why
        view.state = "SUCCEEDED" if code == 0 else "FAILED"
        view.exit_code, view.reason, view.ready_by = code, lost, None
        actions: List[Action] = []
        if rules.wants_restart(view.spec.service, -1 if lost else code):
            actions = self._restart(view, rules.ended_description(code, lost, how), now)
        if actions:
            return actions
        if detail:  # before the budget's words ("...: OOMKilled; after 3 attempts (...)")
            view.reason = "; ".join(x for x in (detail, view.reason) if x)
        state, msg = rules.group_state([v.outcome() for v in self.replicas.values()])
        return self._decide(state, msg) if state in rules.TERMINAL else []

    def _restart(self, view: ReplicaView, ended: str, now: float) -> List[Action]:
        """A restart of ``view``'s scope if its budget has one left (else its reason says how
        many attempts it had, and no action)."""
        s = view.spec
        unit = rules.retry_unit(s.retry_policy, s.role, s.replica_id)
        used = self.used.get(unit, 0)
        if used >= s.max_retries:
            if s.max_retries:  # (replaces a lost replica's reason, as the Ray driver does today)
                view.reason = rules.exhausted_reason(used + 1, s.retry_policy, s.max_retries)
            return []
        self.used[unit] = used + 1
        self.num_restarts += 1
        due = now + rules.backoff_s(self.spec.retry_backoff_s, used + 1)
        why = rules.restart_why(s.role, s.replica_id, ended, s.retry_policy, used + 1, s.max_retries)
        scope = tuple(rules.restart_scope(s.retry_policy, s.role, s.replica_id, list(self.replicas)))
        actions: List[Action] = [Restart(self.num_restarts, unit, why, scope, due),
                                 Stop(tuple(k for k in scope if self.replicas[k].ever_started))]
        for key in scope:
            x = self.replicas[key]
            x.state, x.attempt, x.exit_code, x.reason, x.due = "PENDING", x.attempt + 1, None, "", due
            x.ready, x.ready_by, x.held = False, None, False
            actions.append(Mark(key, x.attempt, rules.attempt_marker(x.attempt, key[0], key[1], why)))
        return actions + self._start_due(now)

    def _start_due(self, now: float) -> List[Action]:
        """Starts what is due, services first; holds the others until every service is ready."""
        actions: List[Action] = []
        ready = self.services_ready
        for service in (True, False):
            for key, v in self.replicas.items():
                if v.spec.service != service:
                    continue
                if v.due is not None and v.due <= now:
                    v.due, v.held = None, not (service or ready)
                    if not v.held:
                        actions.append(Start(key, v.attempt))
                elif v.held and ready:
                    v.held = False
                    actions.append(Start(key, v.attempt))
        nxt = self.next_due
        return actions + ([Wait(nxt)] if nxt is not None else [])

    def _decide(self, state: str, msg: str) -> List[Action]:
        """The verdict: stop everything ever started, then say it (once)."""
        for v in self.replicas.values():
            if v.state == "RUNNING" or v.due is not None or v.held:  # stopped, or never (re)started
                v.state, v.due, v.held = "CANCELLED", None, False
            v.ready_by = None
        self.verdict = Verdict(state, msg)
        started = tuple(k for k, v in self.replicas.items() if v.ever_started)
        return [Stop(started, final=True), self.verdict]
