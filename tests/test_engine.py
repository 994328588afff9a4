"""The group engine alone (torchx_ext.engine): exact messages, every small group exhaustively, and
property tests over random event sequences (stdlib random, fixed seeds)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from torchx_ext import engine as E
from torchx_ext.engine import probe, rules

Key = Tuple[str, int]
ENGINE_DIR = os.path.join(os.path.dirname(__file__), "..", "torchx_ext", "engine")


def group(*roles: Tuple[str, int, bool, int, str], backoff: float = 0.0,
          ports: Optional[Dict[str, Tuple[int, ...]]] = None, ready_timeout_s: float = 10.0) -> E.GroupSpec:
    """``(name, replicas, service, max_retries, policy)`` per role; ``ports``: a service role's."""
    return E.GroupSpec(tuple(E.ReplicaSpec(n, k, svc, mr, pol, (ports or {}).get(n, ()))
                             for n, count, svc, mr, pol in roles for k in range(count)), backoff, ready_timeout_s)


class Launcher:
    """Performs the engine's actions on pretend replicas and checks the protocol as it goes."""

    def __init__(self, spec: E.GroupSpec, fail_starts: Sequence[Tuple[Key, int]] = ()) -> None:
        self.engine = E.Engine(spec)
        self.spec = spec
        self.now = 0.0
        self.running: Dict[Key, int] = {}  # key -> attempt running
        self.attempts: Dict[Key, List[int]] = {}
        self.fail_starts = set(fail_starts)
        self.verdicts: List[E.Verdict] = []
        self.restarts: List[E.Restart] = []
        self.marks: List[E.Mark] = []
        self.charged: Dict[str, List[int]] = {}  # unit -> max_retries of each replica that charged it
        self.last_ended: Optional[Key] = None
        self.probing: Dict[Key, E.Probe] = {}  # services being probed (their current attempt's)
        self.twins = False  # check every decision against an engine restored from a snapshot

    def report(self, event: E.Event) -> None:
        twin = E.Engine.restore(self.spec, json.loads(json.dumps(self.engine.snapshot()))) if self.twins else None
        actions = self.engine.on(event, self.now)
        if twin is not None:  # an engine restored from a snapshot decides the same, and ends the same
            assert twin.on(event, self.now) == actions, event
            assert twin.snapshot() == self.engine.snapshot()
        for action in actions:
            self.perform(action)

    def perform(self, a: E.Action) -> None:
        if isinstance(a, E.Start):
            if self.engine.verdict is not None:
                return  # the protocol: no Start of a batch once the engine has decided
            assert not self.verdicts, f"start after the verdict: {a}"
            assert a.key not in self.running, f"{a.key} started twice"
            if not self.service(a.key):  # readiness: no other role starts while a service is not ready
                assert self.engine.services_ready, (a, self.probing)
            seen = self.attempts.setdefault(a.key, [])
            assert not seen or a.attempt > seen[-1], (a, seen)
            seen.append(a.attempt)
            if (a.key, a.attempt) in self.fail_starts:
                self.report(E.StartFailed(a.key, "no such file", a.attempt))
            else:
                self.running[a.key] = a.attempt
                self.report(E.Started(a.key, a.attempt))
        elif isinstance(a, E.Stop):
            for k in a.keys:
                self.running.pop(k, None)
                self.probing.pop(k, None)
        elif isinstance(a, E.Probe):
            assert self.service(a.key) and a.ports and self.running.get(a.key) == a.attempt, (a, self.running)
            assert a.until == self.now + self.spec.ready_timeout_s
            self.probing[a.key] = a
        elif isinstance(a, E.Restart):
            assert a.number == len(self.restarts) + 1
            assert self.last_ended is not None
            if not a.unit:  # a rerun: drawn from no budget
                self.restarts.append(a)
                return
            self.charged.setdefault(a.unit, []).append(self.max_retries(self.last_ended))
            self.restarts.append(a)
            assert a.due >= self.now
        elif isinstance(a, E.Mark):
            assert a.key not in self.running, "a marker is written once the old attempt is gone"
            self.marks.append(a)
        elif isinstance(a, E.Verdict):
            assert not self.verdicts, f"a second verdict: {a} after {self.verdicts}"
            assert not self.running, f"the verdict came with replicas still running: {self.running}"
            self.verdicts.append(a)
        elif isinstance(a, E.Wait):
            assert a.until >= self.now

    def service(self, key: Key) -> bool:
        return next(r.service for r in self.spec.replicas if r.key == key)

    def ready(self, key: Key) -> None:
        """The probe of ``key`` succeeds."""
        probe = self.probing.pop(key)
        self.report(E.Ready(key, probe.attempt))

    def max_retries(self, key: Key) -> int:
        return next(r.max_retries for r in self.spec.replicas if r.key == key)

    def end(self, key: Key, how: str) -> None:
        """``how``: "0", "3" (exit codes), "kill" (SIGKILL) or "lost"."""
        attempt = self.running.pop(key)
        self.probing.pop(key, None)
        self.last_ended = key
        if how == "kill":
            self.report(E.Killed(key, signal.SIGKILL, attempt))
        elif how == "lost":
            self.report(E.Lost(key, "its node died", attempt))
        else:
            self.report(E.Exited(key, int(how), attempt))

    def tick(self) -> None:
        due = self.engine.next_due
        if due is not None:
            self.now = max(self.now, due)
        self.report(E.Tick())

    def check(self) -> None:
        """The invariants that hold after every event."""
        for unit, limits in self.charged.items():
            # each restart is charged to a unit whose failing replica still had budget
            assert all(n <= lim for n, lim in enumerate(limits, 1)), (unit, limits)
        assert self.engine.num_restarts == len(self.restarts)
        assert len(self.verdicts) <= 1
        for m in self.marks:
            assert "Slurm requeued" in m.line or re.fullmatch(r"\[torchx-ext\] attempt \d+ of role '[^']+' replica \d+ begins: role '[^']+' "
                                r"replica \d+ ended(: .+| with (exit code \d+|signal SIG[A-Z]+)); "
                                r"(REPLICA|ROLE|APPLICATION) policy, restart \d+ of \d+", m.line), m.line
        for key, v in self.engine.replicas.items():
            assert v.state in rules.STATES
            if v.held:  # held only while a service is not ready, and never started meanwhile
                assert v.state == "PENDING" and not self.engine.services_ready and key not in self.running
            assert (key in self.running) == (v.state == "RUNNING"), (key, v, self.running)
        if self.verdicts:
            assert self.engine.verdict == self.verdicts[0]
            assert self.engine.next_due is None
            assert all(v.state != "RUNNING" and v.due is None for v in self.engine.replicas.values())


def started(spec: E.GroupSpec) -> Launcher:
    run = Launcher(spec)
    run.report(E.Begin())
    run.check()
    return run


# ------------------------------------------------------------------------ the rules ----
def test_engine_is_python38_and_standard_library_only() -> None:
    stdlib = set(sys.stdlib_module_names)
    for name in sorted(os.listdir(ENGINE_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ENGINE_DIR, name)) as f:
            tree = ast.parse(f.read(), name, feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # its own modules, relative: the package works under any name (Ray's py_modules)
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                assert mod.split(".")[0] in stdlib, f"{name} imports {mod}: the engine is standard library only"


def test_engine_runs_as_a_top_level_package_of_any_name(tmp_path: pathlib.Path) -> None:
    """Shipped alone (a Ray job's py_modules, a copy in a Slurm job's directory), it needs nothing else."""
    shutil.copytree(ENGINE_DIR, tmp_path / "group_engine")
    code = ("import sys; sys.modules['torchx_ext'] = sys.modules['torchx'] = None; import group_engine as E; e = E.Engine(E.GroupSpec((E.ReplicaSpec('a', 0),)));"
            "e.on(E.Begin(), 0); e.on(E.Started(('a', 0)), 0); print(e.on(E.Exited(('a', 0), 0), 0)[-1])")
    out = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "Verdict(state='SUCCEEDED', msg='')", out


def test_the_connect_check_says_whether_a_port_accepts_now() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert probe.accepts("127.0.0.1", port, 1.0)
    assert not probe.accepts("127.0.0.1", port, 1.0)


def test_a_probe_asks_each_port_until_it_accepted_once_and_gives_up_when_stopped() -> None:
    asked: List[Tuple[str, int, float]] = []
    pauses: List[float] = []

    def connect(host: str, port: int, timeout: float) -> bool:
        asked.append((host, port, timeout))
        return port == 2 or len(asked) > 2  # port 2 at once, port 1 in the second round

    assert probe.until_accepting("h", (1, 2), 0.5, 0.1, lambda: False, pauses.append, connect)
    assert asked == [("h", 1, 0.5), ("h", 2, 0.5), ("h", 1, 0.5)] and pauses == [0.1]
    assert not probe.until_accepting("h", (1,), 0.5, 0.1, lambda: True, pauses.append, connect)
    assert len(asked) == 3  # stopped: asked before the first round, so nothing connected
    ready = threading.Event()
    thread = probe.start_probe("h", (1,), 0.5, 0.1, lambda: False, ready.set, connect=connect, name="p-1")
    thread.join(5)
    assert ready.is_set() and thread.name == "p-1" and thread.daemon
    ready.clear()
    probe.start_probe("h", (1,), 0.5, 0.1, lambda: True, ready.set, connect=connect).join(5)
    assert not ready.is_set()


STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


def test_backoff_doubles_and_is_capped() -> None:
    assert [rules.backoff_s(0.5, n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert rules.backoff_s(10, 4) == 60.0 == rules.BACKOFF_CAP_S
    assert rules.backoff_s(0, 7) == 0.0


# ------------------------------------------------------------------- exact scenarios ----
def test_success_stops_everything_then_says_so() -> None:
    run = started(group(("a", 2, False, 0, "REPLICA"), ("svc", 1, True, 0, "REPLICA")))
    run.end(("a", 0), "0")
    assert not run.verdicts
    actions = run.engine.on(E.Exited(("a", 1), 0), 0.0)
    assert actions == [E.Stop((("a", 0), ("a", 1), ("svc", 0)), final=True), E.Verdict("SUCCEEDED", "")]
    assert run.engine.replicas[("svc", 0)].state == "CANCELLED"


def test_a_failure_without_retries_names_the_replica_and_its_exit() -> None:
    run = started(group(("a", 2, False, 0, "APPLICATION")))
    run.end(("a", 1), "3")
    assert run.verdicts == [E.Verdict("FAILED", "role 'a' replica 1 failed with exit code 3")]
    assert run.engine.replicas[("a", 0)].state == "CANCELLED"


def test_retries_exhausted_say_how_many_attempts() -> None:
    run = started(group(("a", 1, False, 2, "REPLICA")))
    for _ in range(3):
        run.end(("a", 0), "3")
        run.check()
    assert run.verdicts == [E.Verdict(
        "FAILED", "role 'a' replica 0 failed with exit code 3: after 3 attempts (REPLICA policy, max_retries=2)")]
    assert [m.line for m in run.marks] == [
        "[torchx-ext] attempt 2 of role 'a' replica 0 begins: role 'a' replica 0 ended with exit code 3; "
        "REPLICA policy, restart 1 of 2",
        "[torchx-ext] attempt 3 of role 'a' replica 0 begins: role 'a' replica 0 ended with exit code 3; "
        "REPLICA policy, restart 2 of 2"]
    assert run.attempts[("a", 0)] == [1, 2, 3] and run.engine.num_restarts == 2


def test_a_killed_replica_is_a_failed_attempt_named_by_its_signal() -> None:
    run = started(group(("a", 1, False, 1, "APPLICATION"), ("b", 1, False, 0, "APPLICATION")))
    run.end(("a", 0), "kill")
    assert run.restarts[0].why == "role 'a' replica 0 ended with signal SIGKILL; APPLICATION policy, restart 1 of 1"
    assert run.restarts[0].keys == (("a", 0), ("b", 0)) and run.restarts[0].unit == "app"
    assert run.running == {("a", 0): 2, ("b", 0): 2}


def test_a_lost_replica_restarts_saying_why() -> None:
    run = started(group(("a", 2, False, 1, "ROLE"), ("b", 1, False, 0, "REPLICA")))
    run.end(("a", 1), "lost")
    assert run.restarts[0].why == "role 'a' replica 1 ended: its node died; ROLE policy, restart 1 of 1"
    assert run.restarts[0].keys == (("a", 0), ("a", 1)) and ("b", 0) in run.running
    run.end(("a", 1), "lost")
    assert run.verdicts[0].msg == "role 'a' replica 1 failed: after 2 attempts (ROLE policy, max_retries=1)"


def test_a_service_ending_early_fails_the_app_naming_it() -> None:
    run = started(group(("main", 1, False, 0, "REPLICA"), ("svc", 1, True, 0, "REPLICA")))
    run.end(("svc", 0), "0")
    assert run.verdicts == [E.Verdict("FAILED", "service role 'svc' replica 0 ended early with exit code 0")]


def test_a_service_with_retries_restarts_even_after_exit_0() -> None:
    run = started(group(("main", 1, False, 0, "REPLICA"), ("svc", 1, True, 1, "REPLICA")))
    run.end(("svc", 0), "0")
    assert not run.verdicts and run.running[("svc", 0)] == 2
    run.end(("main", 0), "0")
    assert run.verdicts == [E.Verdict("SUCCEEDED", "")]


def test_backoff_waits_then_ticks_start_the_attempt() -> None:
    run = started(group(("a", 1, False, 3, "REPLICA"), backoff=1.0))
    actions = run.engine.on(E.Exited(("a", 0), 1), 10.0)
    run.running.clear()
    assert [type(a) for a in actions] == [E.Restart, E.Stop, E.Mark, E.Wait] and actions[-1] == E.Wait(11.0)
    assert run.engine.on(E.Tick(), 10.5) == [E.Wait(11.0)]
    assert run.engine.on(E.Tick(), 11.0) == [E.Start(("a", 0), 2)]
    run.engine.on(E.Started(("a", 0), 2), 11.0)
    assert run.engine.on(E.Exited(("a", 0), 1), 12.0)[-1] == E.Wait(14.0)  # doubled


def test_cancel_during_a_pending_restart_starts_nothing() -> None:
    run = started(group(("a", 2, False, 1, "ROLE"), backoff=5.0))
    run.end(("a", 0), "3")
    assert run.engine.next_due == 5.0 and not run.running
    run.report(E.Cancel())
    assert run.verdicts == [E.Verdict("CANCELLED", "cancelled by user")]
    assert {v.state for v in run.engine.replicas.values()} == {"CANCELLED"}
    run.now = 100.0
    assert run.engine.on(E.Tick(), 100.0) == [] and run.engine.on(E.Cancel(), 100.0) == []


def test_start_failures_fail_the_app_all_or_nothing() -> None:
    run = Launcher(group(("a", 3, False, 0, "REPLICA")), fail_starts=[(("a", 1), 1)])
    run.report(E.Begin())
    run.check()
    assert run.verdicts == [E.Verdict("FAILED", "role 'a' replica 1 failed to start: no such file; "
                                                "the group was stopped (all or nothing)")]
    assert ("a", 2) not in run.attempts  # nothing started after the verdict
    run = Launcher(group(("a", 1, False, 1, "REPLICA")), fail_starts=[(("a", 0), 2)])
    run.report(E.Begin())
    run.end(("a", 0), "1")
    assert run.verdicts == [E.Verdict("FAILED", "role 'a' replica 0 failed to restart: no such file")]


def test_stale_and_late_news_changes_nothing() -> None:
    eng = E.Engine(group(("a", 1, False, 1, "REPLICA"), backoff=1.0))
    eng.on(E.Begin(), 0)
    assert eng.on(E.Begin(), 0) == []
    eng.on(E.Started(("a", 0), 1), 0)
    eng.on(E.Exited(("a", 0), 1, 1), 0)
    assert eng.on(E.Exited(("a", 0), 1, 1), 0) == []  # the same attempt reported twice
    assert eng.on(E.Started(("a", 0), 1), 0) == []  # an earlier attempt
    assert eng.on(E.Exited(("a", 0), 0, 2), 0) == []  # attempt 2 has not started
    eng.on(E.Fail("dependency 'x' ended FAILED"), 0)
    assert eng.verdict == E.Verdict("FAILED", "dependency 'x' ended FAILED")
    # a start that raced the verdict is stopped at once
    assert eng.on(E.Started(("a", 0)), 0) == [E.Stop((("a", 0),), final=True)]


def test_cancel_before_begin_starts_nothing() -> None:
    eng = E.Engine(group(("a", 1, False, 0, "REPLICA")))
    assert eng.on(E.Cancel(rules.CANCELLED_BEFORE_START), 0) == [
        E.Stop((), final=True), E.Verdict("CANCELLED", "cancelled before start")]
    assert eng.on(E.Begin(), 0) == []


def test_spec_from_launcher_records() -> None:
    spec = E.GroupSpec.from_dicts([{"role": "a", "replica_id": 0, "service": True, "max_retries": 2,
                                    "retry_policy": "role", "cmd": ["x"]}], 0.5)
    assert spec == E.GroupSpec((E.ReplicaSpec("a", 0, True, 2, "ROLE"),), 0.5)
    with pytest.raises(ValueError, match="same"):
        E.Engine(E.GroupSpec((E.ReplicaSpec("a", 0), E.ReplicaSpec("a", 0))))


# --------------------------------------------------------- every small group, exhaustively ----
HOWS = ("0", "3", "kill", "lost")


def steps(run: Launcher, hows: Sequence[str]) -> List[Tuple[str, Optional[Key], str]]:
    """Everything that can happen next: a running replica ends, a timer fires, a cancel."""
    out: List[Tuple[str, Optional[Key], str]] = [("end", k, h) for k in sorted(run.running) for h in hows]
    out += [("ready", k, "") for k in sorted(run.probing)]
    if run.engine.next_due is not None:
        out.append(("tick", None, ""))
    out.append(("cancel", None, ""))
    return out


def apply(run: Launcher, step: Tuple[str, Optional[Key], str]) -> None:
    kind, key, how = step
    before = {k: v.state for k, v in run.engine.replicas.items()}
    if kind == "end":
        assert key is not None
        run.end(key, how)
    elif kind == "tick":
        run.tick()
    elif kind == "ready":
        assert key is not None
        run.ready(key)
    else:
        run.report(E.Cancel())
    run.check()
    if run.verdicts and kind == "end" and not restarted(run, before):
        check_verdict_is_todays(run)


def restarted(run: Launcher, before: Dict[Key, str]) -> bool:
    return any(v.state == "PENDING" and before[k] != "PENDING" for k, v in run.engine.replicas.items())


def check_verdict_is_todays(run: Launcher) -> None:
    """A verdict decided by an ending is today's rules on the replicas' outcomes, the ones its stop
    cancelled counted as still running."""
    if re.search(r"failed to (re)?start: |was not ready: ", run.verdicts[0].msg):
        return  # decided by the restart that could not start (or a deadline), not by the ending
    outcomes = [dict(v.outcome(), state="RUNNING" if v.state == "CANCELLED" else v.state)
                for v in run.engine.replicas.values()]
    assert (run.verdicts[0].state, run.verdicts[0].msg) == rules.group_state(outcomes)
    mains = [v for v in run.engine.replicas.values() if not v.spec.service]
    if all(v.state == "SUCCEEDED" for v in mains):
        assert run.verdicts[0] == E.Verdict("SUCCEEDED", "")
    elif run.verdicts[0].msg.startswith("service role"):
        assert run.verdicts[0].state == "FAILED" and " ended early" in run.verdicts[0].msg


def finish(run: Launcher) -> None:
    """Liveness: ending every main replica with 0 (and letting timers fire) always ends the app."""
    for _ in range(200):
        if run.verdicts:
            return
        mains = [k for k in sorted(run.running) if not any(r.service for r in run.spec.replicas if r.key == k)]
        if run.probing:
            apply(run, ("ready", sorted(run.probing)[0], ""))
        elif mains:
            apply(run, ("end", mains[0], "0"))
        else:
            assert run.engine.next_due is not None, "no verdict, nothing running, nothing due"
            apply(run, ("tick", None, ""))
    raise AssertionError("no verdict after 200 steps")


def explore(spec: E.GroupSpec, depth: int, hows: Sequence[str]) -> int:
    """Every sequence of ``depth`` steps (fewer where the verdict comes first); returns how many."""
    def walk(trail: List[Tuple[str, Optional[Key], str]]) -> int:
        run = started(spec)
        for step in trail:
            apply(run, step)
        if run.verdicts or len(trail) == depth:
            finish(run)
            return 1
        return sum(walk([*trail, s]) for s in steps(run, hows))
    return walk([])


SHAPES = {
    "one": [("a", 1, False)],
    "two-replicas": [("a", 2, False)],
    "main+service": [("m", 1, False), ("s", 1, True)],
    "two-roles": [("a", 1, False), ("b", 1, False)],
    "main+ported-service": [("m", 1, False), ("p", 1, True)],
}
SHAPE_PORTS = {"p": (8000,)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("policy", rules.RETRY_POLICIES)
def test_every_small_group_every_sequence(shape: str, policy: str) -> None:
    paths = 0
    for retries in (0, 1, 2):
        for backoff in (0.0, 1.0):
            spec = group(*[(n, c, svc, retries, policy) for n, c, svc in SHAPES[shape]], backoff=backoff,
                         ports=SHAPE_PORTS)
            paths += explore(spec, 5 if len(spec.replicas) == 1 else 4, HOWS)
    assert paths > 100


# ------------------------------------------------------------------- random sequences ----
def random_group(rng: random.Random) -> E.GroupSpec:
    roles = []
    for i in range(rng.randint(1, 3)):
        roles.append((f"r{i}", rng.randint(1, 3), i > 0 and rng.random() < 0.4, rng.choice((0, 0, 1, 2, 3)),
                      rng.choice(rules.RETRY_POLICIES)))
    ports = {r[0]: (8000 + i,) * rng.randint(1, 2) for i, r in enumerate(roles) if r[2] and rng.random() < 0.6}
    return group(*roles, backoff=rng.choice((0.0, 0.0, 0.5, 2.0, 40.0)), ports=ports,
                 ready_timeout_s=rng.choice((1.0, 30.0)))


@pytest.mark.parametrize("seed", range(0, 400, 40))
def test_random_event_sequences_keep_the_invariants(seed: int) -> None:
    for s in range(seed, seed + 40):
        rng = random.Random(s)
        spec = random_group(rng)
        fails = [(r.key, rng.randint(1, 3)) for r in spec.replicas if rng.random() < 0.05]
        run = Launcher(spec, fail_starts=fails)
        run.twins = s % 2 == 0
        run.report(E.Begin())
        run.check()
        for _ in range(rng.randint(0, 40)):
            if run.verdicts:
                # late news after the verdict: nothing but a Stop of a start that raced it
                key = rng.choice(list(run.engine.replicas))
                late: List[E.Event] = [E.Tick(), E.Cancel(), E.Exited(key, 1), E.Lost(key, "x"), E.Ready(key)]
                assert run.engine.on(rng.choice(late), run.now) == []
                break
            r = rng.random()
            if r < 0.02:
                run.report(E.Fail("the launcher cannot go on"))
                run.check()
            elif r < 0.04:
                apply(run, ("cancel", None, ""))
            elif r < 0.15 and run.probing:
                apply(run, ("ready", rng.choice(sorted(run.probing)), ""))
            elif r < 0.25 or not run.running:
                if run.engine.next_due is None and not run.running:
                    break
                run.now += rng.choice((0.0, 0.3, 1.0, 5.0))
                apply(run, ("tick", None, ""))
            else:
                apply(run, ("end", rng.choice(sorted(run.running)), rng.choice(HOWS)))
        finish(run)
        assert run.verdicts, s
        # attempts never repeat and each restarted replica got a marker per new attempt
        for key, seen in run.attempts.items():
            assert seen == sorted(set(seen))
            assert len([m for m in run.marks if m.key == key]) >= len(seen) - 1


def test_a_restored_engine_reruns_the_whole_group_from_no_budget() -> None:
    """Slurm's requeue: the job's next run restores the engine from its snapshot and starts every
    replica again, one restart more, no budget drawn."""
    spec = group(("a", 2, False, 1, "REPLICA"), ("b", 1, True, 0, "REPLICA"))
    first = started(spec)
    first.end(("a", 1), "3")
    snap = json.loads(json.dumps(first.engine.snapshot()))
    run = Launcher(spec)
    run.engine = E.Engine.restore(spec, snap)
    run.last_ended, run.restarts, run.charged = ("a", 1), first.restarts, first.charged
    run.report(E.Rerun("Slurm requeued the job (requeue 1)"))
    run.check()
    assert run.engine.num_restarts == 2 and run.engine.used == {"replica:a/1": 1}
    assert run.running == {("a", 0): 2, ("a", 1): 3, ("b", 0): 2}
    assert run.marks[1].line == ("[torchx-ext] attempt 3 of role 'a' replica 1 begins: "
                                 "Slurm requeued the job (requeue 1)")
    run.end(("a", 1), "3")  # its budget is spent: the requeue drew none
    assert run.verdicts[0].msg == "role 'a' replica 1 failed with exit code 3: after 2 attempts " \
                                  "(REPLICA policy, max_retries=1)"
    decided = E.Engine.restore(spec, run.engine.snapshot())
    assert decided.verdict == run.verdicts[0] and decided.on(E.Rerun("again"), 0) == []


def test_a_launchers_detail_leads_the_failure_reason_and_how_names_the_restart() -> None:
    """Docker's words on an exit (OOMKilled, the last line of stderr): ``how`` in a restart's
    description, ``detail`` first in the failure's reason, before the spent budget."""
    run = started(group(("a", 1, False, 1, "REPLICA")))
    acts = run.engine.on(E.Exited(("a", 0), 137, 1, how="OOMKilled", detail="OOMKilled"), 0.0)
    assert isinstance(acts[0], E.Restart) and "ended with OOMKilled; REPLICA policy" in acts[0].why
    run.engine.on(E.Started(("a", 0), 2), 0.0)
    acts = run.engine.on(E.Exited(("a", 0), 1, 2, detail="ZeroDivisionError: division by zero"), 0.0)
    assert acts[-1] == E.Verdict("FAILED", "role 'a' replica 0 failed with exit code 1: ZeroDivisionError: "
                                           "division by zero; after 2 attempts (REPLICA policy, max_retries=1)")
    lone = started(group(("b", 1, False, 0, "REPLICA")))
    assert lone.engine.on(E.Exited(("b", 0), 137, detail="OOMKilled"), 0.0)[-1] == E.Verdict(
        "FAILED", "role 'b' replica 0 failed with exit code 137: OOMKilled")


# ------------------------------------------------------------------------ readiness ----
def _ported(policy: str = "APPLICATION", retries: int = 0) -> E.GroupSpec:
    return group(("client", 2, False, retries, policy), ("server", 1, True, retries, policy),
                 ports={"server": (8000, 8001)}, ready_timeout_s=30.0)


def test_a_service_with_ports_starts_first_and_the_others_once_it_accepts() -> None:
    eng = E.Engine(_ported())
    assert eng.on(E.Begin(), 0.0) == [E.Start(("server", 0), 1)]
    assert eng.on(E.Started(("server", 0), 1), 1.0) == [E.Probe(("server", 0), 1, (8000, 8001), 31.0), E.Wait(31.0)]
    assert eng.next_due == 31.0
    assert eng.on(E.Ready(("server", 0), 1), 2.0) == [E.Start(("client", 0), 1), E.Start(("client", 1), 1)]
    assert eng.next_due is None and eng.on(E.Ready(("server", 0), 1), 3.0) == []


def test_a_group_without_ports_starts_at_once_as_before() -> None:
    eng = E.Engine(group(("client", 1, False, 0, "REPLICA"), ("server", 1, True, 0, "REPLICA")))
    assert eng.on(E.Begin(), 0.0) == [E.Start(("server", 0), 1), E.Start(("client", 0), 1)]
    assert eng.on(E.Started(("server", 0), 1), 0.0) == []
    # a non-service role's ports are not waited for
    assert E.ReplicaSpec.from_dict({"role": "c", "replica_id": 0, "ports": [80]}).ports == ()


def test_a_service_not_ready_in_time_fails_the_app_naming_it() -> None:
    eng = E.Engine(_ported())
    eng.on(E.Begin(), 0.0)
    eng.on(E.Started(("server", 0), 1), 1.0)
    assert eng.on(E.Tick(), 30.0) == [E.Wait(31.0)]  # not yet
    actions = eng.on(E.Tick(), 31.0)
    msg = ("service role 'server' replica 0 was not ready: ports 8000, 8001 did not accept connections "
           "within 30 s (run option ready_timeout_s); the other roles were not started")
    assert actions == [E.Stop((("server", 0),), final=True), E.Verdict("FAILED", msg)]
    assert [v.state for v in eng.replicas.values()] == ["CANCELLED", "CANCELLED", "FAILED"]
    assert eng.on(E.Ready(("server", 0), 1), 32.0) == []


def test_a_whole_group_restart_holds_the_others_until_the_service_is_ready_again() -> None:
    run = Launcher(_ported("APPLICATION", 1))
    run.report(E.Begin())
    run.ready(("server", 0))
    assert sorted(run.running) == [("client", 0), ("client", 1), ("server", 0)]
    run.end(("client", 0), "3")
    assert sorted(run.running) == [("server", 0)] and run.engine.replicas[("client", 1)].held
    assert run.probing[("server", 0)].attempt == 2
    run.ready(("server", 0))
    assert sorted(run.running) == [("client", 0), ("client", 1), ("server", 0)]
    run.check()


def test_a_service_restarting_alone_leaves_the_others_running_and_holds_new_starts() -> None:
    run = Launcher(_ported("REPLICA", 2))
    run.report(E.Begin())
    run.ready(("server", 0))
    run.end(("server", 0), "1")  # restarts alone: the clients run on
    assert sorted(run.running) == [("client", 0), ("client", 1), ("server", 0)]
    assert not run.engine.services_ready
    run.end(("client", 1), "3")  # its restart waits for the server's new attempt
    assert run.engine.replicas[("client", 1)].held and ("client", 1) not in run.running
    stale = E.Ready(("server", 0), 1)
    assert run.engine.on(stale, run.now) == []  # the first attempt's news
    run.ready(("server", 0))
    assert ("client", 1) in run.running
    run.check()


def test_readiness_survives_a_snapshot_and_reads_one_from_before_it() -> None:
    eng = E.Engine(_ported())
    eng.on(E.Begin(), 0.0)
    eng.on(E.Started(("server", 0), 1), 1.0)
    twin = E.Engine.restore(eng.spec, json.loads(json.dumps(eng.snapshot())))
    assert twin.on(E.Ready(("server", 0), 1), 2.0) == eng.on(E.Ready(("server", 0), 1), 2.0)
    old = eng.snapshot()
    old["replicas"] = [row[:8] for row in old["replicas"]]
    assert not E.Engine.restore(eng.spec, old).replicas[("server", 0)].ready
