"""The contract every torchx-ext scheduler passes, written once (fsspec's abstract test suite habit).

A backend's test module subclasses :class:`SchedulerContract` and provides a ``backend`` fixture
returning a :class:`Backend` (scheduler name, cfg, the image and python to run with). Everything
goes through ``torchx.runner.get_runner()`` — the Python API users call — against the real engine.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional

import pytest
from torchx.runner import Runner, get_runner
from torchx.schedulers import get_scheduler_factories
from torchx.schedulers.api import Stream
from torchx.specs import AppDef, AppState, Resource, Role, is_terminal, macros

from torchx_ext.errors import InvalidAppError
from torchx_ext.groups import mark_service

TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}

HOSTILE_ARGS = [
    "a'; echo x",
    "$(touch /tmp/torchx_ext_pwned)",
    "`id`",
    "with space",
    "new\nline",
    'dq"uote\\',
    "ünïcødé ✓ 😀",
    "--flag=$HOME",
    "",
    "*",
]

PRINT_ENV = (
    "import json, os, sys; "
    "print('ENV ' + json.dumps({k: v for k, v in os.environ.items() if k.startswith('TORCHX_EXT_')}), flush=True)"
)
PRINT_ARGV = "import json, sys; print('ARGV ' + json.dumps(sys.argv[1:]), flush=True)"
# prints its attempt and pid, then fails on its first attempt when it is replica 0 of its role
FLAKY = ("import os, sys; a = os.environ['TORCHX_EXT_ATTEMPT']; "
         "print('ATTEMPT', a, os.getpid(), flush=True); "
         "sys.exit(3 if a == '1' and os.environ['TORCHX_EXT_REPLICA_ID'] == '0' else 0)")
PRINT_TIME = "import time; print('T %.6f' % time.time(), flush=True)"
SERVER = (
    "import http.server, os, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers()\n"
    "        self.wfile.write(('hello from ' + os.environ['TORCHX_EXT_ROLE']).encode())\n"
    "http.server.HTTPServer(('0.0.0.0', int(sys.argv[1])), H).serve_forever()\n"
)
CLIENT = (
    "import os, sys, time, urllib.request\n"
    "host = os.environ['TORCHX_EXT_HOSTS_SERVER'].split(',')[0]\n"
    "url = 'http://%s:%s/' % (host, sys.argv[1])\n"
    "for _ in range(300):\n"
    "    try:\n"
    "        print('GOT ' + urllib.request.urlopen(url, timeout=5).read().decode(), flush=True); break\n"
    "    except OSError: time.sleep(0.2)\n"
    "else: sys.exit('server never answered at ' + url)\n"
)

# one try, at once: without readiness it races the server (and loses to a server that listens late)
CONNECT_ONCE = (
    "import os, sys, urllib.request\n"
    "host = os.environ['TORCHX_EXT_HOSTS_SERVER'].split(',')[0]\n"
    "url = 'http://%s:%s/' % (host, sys.argv[1])\n"
    "print('GOT ' + urllib.request.urlopen(url, timeout=10).read().decode(), flush=True)\n"
)


@dataclass
class Backend:
    """What a backend's test module gives the contract."""

    scheduler: str
    image: str
    python: str = "python3"
    cfg: dict[str, Any] = field(default_factory=dict)
    resource: Resource = field(default_factory=lambda: Resource(cpu=1, gpu=0, memMB=256))
    timeout: float = 90.0
    # a stop check: given a handle, True once nothing of the app runs any more (None: skip)
    nothing_running: Optional[Callable[[str], bool]] = None
    # the same check for after ``delete``, for a backend whose ``nothing_running`` reads the
    # records delete removes (None: ``nothing_running`` still sees the engine after a delete)
    nothing_running_after_delete: Optional[Callable[[str], bool]] = None
    # how to make the backend's engine calls fail, for the CLI error contract (None: not provided).
    # broken_env: environment of a `torchx` subprocess (given no -cfg) under which every engine
    # call fails; broken_cfg: run options (over ``cfg``) under which `torchx run` fails in the engine
    broken_env: Optional[dict[str, str]] = None
    broken_cfg: Optional[dict[str, Any]] = None
    # an app id of the right form that the (working) backend does not know
    missing_app_id: str = "no-such-app-42"
    # an app id of the right form for status/log/cancel under broken_env (None: missing_app_id)
    broken_app_id: Optional[str] = None
    # restarts (Role.max_retries) are honoured; False: refused with a message naming the field
    retries: bool = False
    # given discovery's hosts per role ({"MODEL_SERVER": [...], "CLIENT": [...]}, the same in every
    # replica), asserts what the backend promises of them: e.g. node addresses, not loopback (None: skip)
    check_hosts: Optional[Callable[[dict[str, list[str]]], None]] = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_terminal(runner: Runner, handle: str, timeout: float) -> Any:
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = runner.status(handle)
        if status is not None and status.state in TERMINAL:
            return status
        time.sleep(0.3)
    raise AssertionError(f"{handle} not terminal after {timeout}s; last status: {status}")


def wait_state(runner: Runner, handle: str, state: AppState, timeout: float) -> Any:
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = runner.status(handle)
        if status is not None and status.state == state:
            return status
        if status is not None and status.state in TERMINAL:
            break
        time.sleep(0.3)
    raise AssertionError(f"{handle} never reached {state}; last status: {status}")


def logs(runner: Runner, handle: str, role: str, k: int = 0, **kw: Any) -> str:
    return "".join(runner.log_lines(handle, role, k, **kw))


def log_words(runner: Runner, handle: str, role: str, k: int = 0, **kw: Any) -> list[str]:
    """The first word of each non-empty log line."""
    return [line.split()[0] for line in logs(runner, handle, role, k, **kw).splitlines() if line.strip()]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchx's own log lines on stderr ("torchx 2026-11-29 13:42:28 INFO     ...")
TORCHX_LOG_LINE = re.compile(r"^torchx \d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")
CLI_VERBS = ["run", "status", "log", "list", "cancel"]


def torchx_cli(args: list[str], env: Optional[dict[str, str]], cwd: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``torchx ARGS`` in a new process running this checkout's torchx_ext (not an installed copy)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full_env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torchx.cli.main", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`torchx {' '.join(args)}` did not return within {timeout:.0f} s; "
                             f"stderr so far: {e.stderr!r}") from None


def error_lines(stderr: str) -> list[str]:
    """stderr minus torchx's own INFO/WARNING log lines and blank lines."""
    return [line for line in stderr.splitlines() if line.strip() and not TORCHX_LOG_LINE.match(line)]


def contract_subset(*names: str) -> Callable[[type], type]:
    """A class decorator for a :class:`SchedulerContract` subclass that runs only the contract
    tests ``names`` (the rest of the contract runs elsewhere, e.g. on a single-node testbed).

    Every other inherited ``test_*`` becomes ``None``, which pytest does not collect; a name that
    is not a contract test is an error, so a renamed test cannot drop out silently.
    """
    contract = {n for n in dir(SchedulerContract) if n.startswith("test_")}
    unknown = sorted(set(names) - contract)
    if unknown:
        raise ValueError(f"not contract tests: {', '.join(unknown)}; valid: {', '.join(sorted(contract))}")

    def apply(cls: type) -> type:
        for name in contract - set(names):
            if name not in vars(cls):  # a test the subclass itself defines stays
                setattr(cls, name, None)
        return cls
    return apply


class SchedulerContract:
    """Subclass and provide a ``backend`` fixture. Every test runs against the real engine."""

    @pytest.fixture
    def runner(self) -> Runner:
        r = get_runner()
        yield r
        r.close()

    # -- helpers -----------------------------------------------------------------------
    def role(self, b: Backend, name: str, code: str, *args: str, replicas: int = 1,
             service: bool = False, entrypoint: Optional[str] = None,
             env: Optional[dict[str, str]] = None) -> Role:
        role = Role(
            name=name, image=b.image, entrypoint=entrypoint or b.python,
            args=[] if entrypoint else ["-c", code, *args], num_replicas=replicas,
            resource=b.resource, env=dict(env or {}),
        )
        return mark_service(role, service)

    def run(self, runner: Runner, b: Backend, app: AppDef, **cfg: Any) -> str:
        return runner.run(app, b.scheduler, {**b.cfg, **cfg})

    # -- the contract ------------------------------------------------------------------
    def test_submit_describe_log(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("hello", roles=[self.role(backend, "main", "import os; print('hello', os.environ['TORCHX_EXT_REPLICA_ID'])", replicas=2)])
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, status
        assert "hello 0" in logs(runner, handle, "main", 0)
        assert "hello 1" in logs(runner, handle, "main", 1)
        assert "hello 1" not in logs(runner, handle, "main", 0, regex="nomatch")

    def test_unknown_app_is_none(self, runner: Runner, backend: Backend) -> None:
        handle = f"{backend.scheduler}://torchx/no-such-app-{int(time.time())}"
        assert runner.status(handle) is None

    def test_cancel_and_list(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("sleeper", roles=[self.role(backend, "main", "import time; print('up', flush=True); time.sleep(600)")])
        handle = self.run(runner, backend, app)
        wait_state(runner, handle, AppState.RUNNING, backend.timeout)
        assert handle in {a.app_handle for a in runner.list(backend.scheduler)}
        runner.cancel(handle)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.CANCELLED, status
        runner.cancel(handle)  # idempotent
        assert runner.status(handle).state == AppState.CANCELLED
        if backend.nothing_running:
            assert backend.nothing_running(handle)

    def test_cancel_ends_every_process_the_replicas_started(self, runner: Runner, backend: Backend) -> None:
        from conftest import live_processes, process_lineage

        # each replica starts a child, and a daemon (double fork, own session) that leaves both
        # its process group and its parent: only its environment still says whose it is
        code = ("import os, subprocess, sys, time\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                "if os.fork() == 0:\n"
                "    os.setsid()\n"
                "    if os.fork() == 0:\n"
                "        time.sleep(300)\n"
                "    os._exit(0)\n"
                "print('up', flush=True); time.sleep(300)")
        handle = self.run(runner, backend, AppDef("tree", roles=[self.role(backend, "main", code, replicas=2)]))
        wait_state(runner, handle, AppState.RUNNING, backend.timeout)
        marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
        deadline = time.time() + backend.timeout
        while len(live_processes((marker,))) < 6:  # two replicas, a child and a daemon of each
            assert time.time() < deadline, f"replicas and their children never all ran: {live_processes((marker,))}"
            time.sleep(0.2)
        runner.cancel(handle)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.CANCELLED
        deadline = time.time() + 30
        while live_processes((marker,)):
            assert time.time() < deadline, f"processes outlived the cancel: {process_lineage(live_processes((marker,)))}"
            time.sleep(0.2)

    def test_two_shells_cancelling_at_once_both_succeed(self, runner: Runner, backend: Backend, tmp_path: Any) -> None:
        from conftest import live_processes, process_lineage

        code = ("import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)")
        handle = self.run(runner, backend, AppDef("twice", roles=[self.role(backend, "main", code, replicas=2)]))
        wait_state(runner, handle, AppState.RUNNING, backend.timeout)
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        shells = [subprocess.Popen([sys.executable, "-m", "torchx.cli.main", "cancel", handle], cwd=str(tmp_path),
                                   env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(2)]
        for shell in shells:
            out, err = shell.communicate(timeout=90)
            assert shell.returncode == 0 and "Traceback" not in err, (shell.returncode, out, err)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.CANCELLED
        marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
        deadline = time.time() + 30
        while live_processes((marker,)):
            assert time.time() < deadline, f"processes outlived the cancels: {process_lineage(live_processes((marker,)))}"
            time.sleep(0.2)

    def test_cancel_at_any_instant_of_the_first_two_seconds_ends_cancelled(
            self, runner: Runner, backend: Backend) -> None:
        from conftest import live_processes, process_lineage

        rng = random.Random(f"{backend.scheduler}-cancel")  # a fixed sequence: a failure can be replayed
        code = ("import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)")
        handles = []
        for i in range(20):
            handle = self.run(runner, backend, AppDef(f"early{i}", roles=[self.role(backend, "main", code)]))
            time.sleep(rng.uniform(0, 2.0))
            runner.cancel(handle)
            handles.append(handle)
        for handle in handles:
            status = wait_terminal(runner, handle, backend.timeout)
            assert status.state == AppState.CANCELLED, (handle, status)
        markers = tuple(f"TORCHX_EXT_APP_ID={h.rsplit('/', 1)[-1]}\0".encode() for h in handles)
        deadline = time.time() + 30
        while live_processes(markers):
            assert time.time() < deadline, f"processes outlived their cancel: {process_lineage(live_processes(markers))}"
            time.sleep(0.2)

    def test_a_replica_killed_from_outside_fails_the_app_naming_it(self, runner: Runner, backend: Backend) -> None:
        from conftest import live_processes, process_lineage

        code = "import time; print('up', flush=True); time.sleep(300)  # victim-mark"
        handle = self.run(runner, backend, AppDef("victim", roles=[self.role(backend, "main", code, replicas=2)]))
        wait_state(runner, handle, AppState.RUNNING, backend.timeout)
        marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
        deadline = time.time() + backend.timeout
        victims: list[int] = []
        while not victims:
            assert time.time() < deadline, "replica 1 never ran"
            for pid in set(live_processes((marker,))) & set(live_processes(argv=(b"victim-mark",))):
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if b"TORCHX_EXT_REPLICA_ID=1\0" in f.read():
                        victims.append(pid)
            time.sleep(0.2)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.FAILED and "main" in status.msg, status
        deadline = time.time() + 30
        while live_processes((marker,)):  # the other replica was stopped by the group rules
            assert time.time() < deadline, f"processes outlived the failure: {process_lineage(live_processes((marker,)))}"
            time.sleep(0.2)

    # -- retries (Role.max_retries x Role.retry_policy) ----------------------------------
    def _retry_app(self, backend: Backend, name: str, roles: list[Role], retries: int, policy: str) -> AppDef:
        for r in roles:
            r.max_retries, r.retry_policy = retries, policy  # type: ignore[assignment]  # a str: ROLE on 0.7.0
        return AppDef(name, roles=roles)

    def _run_or_refused(self, runner: Runner, backend: Backend, app: AppDef, **cfg: Any) -> Optional[str]:
        """The handle, or None on a backend without restarts, once it refused the app by name."""
        if backend.retries:
            return self.run(runner, backend, app, **cfg)
        with pytest.raises(InvalidAppError, match="max_retries"):
            self.run(runner, backend, app)  # without cfg: its options (retry_backoff_s) are not this backend's
        return None

    @staticmethod
    def _attempts(runner: Runner, handle: str, role: str, k: int) -> list[str]:
        return [x.split()[1] for x in logs(runner, handle, role, k).splitlines() if x.startswith("ATTEMPT ")]

    @pytest.mark.parametrize("policy", ["REPLICA", "ROLE", "APPLICATION"])
    def test_a_replica_failing_once_is_restarted_under_its_policy(
            self, runner: Runner, backend: Backend, policy: str) -> None:
        # role 'a': replica 0 fails its first attempt; role 'other': a service that must keep
        # its process unless the whole application restarts
        app = self._retry_app(backend, f"retry-{policy.lower()}", [
            self.role(backend, "a", FLAKY, replicas=2),
            self.role(backend, "other", "import os, time; print('ATTEMPT', os.environ['TORCHX_EXT_ATTEMPT'], "
                      "os.getpid(), flush=True); time.sleep(600)", service=True),
        ], 1, policy)
        handle = self._run_or_refused(runner, backend, app)
        if handle is None:
            return
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, status
        assert status.num_restarts == 1, status
        replicas = (("a", 0), ("a", 1), ("other", 0))
        seen = {f"{r}/{k}": self._attempts(runner, handle, r, k) for r, k in replicas}
        marked = {f"{r}/{k}" for r, k in replicas
                  if f"[torchx-ext] attempt 2 of role '{r}' replica {k} begins" in logs(runner, handle, r, k)}
        restarted = {"REPLICA": {"a/0"}, "ROLE": {"a/0", "a/1"}, "APPLICATION": {"a/0", "a/1", "other/0"}}[policy]
        assert marked == restarted, (marked, seen)
        # what the processes printed: a restarted replica's first attempt may be stopped before it
        # printed, its second (the service's, under APPLICATION) once the main roles are done
        assert all(set(v) <= {"1", "2"} if k in restarted else v == ["1"] for k, v in seen.items()), seen
        assert seen["a/0"] == ["1", "2"], seen

    def test_retries_exhausted_fail_naming_the_attempts_and_the_exit(self, runner: Runner, backend: Backend) -> None:
        app = self._retry_app(backend, "retry-exhausted", [self.role(backend, "main", "import sys; sys.exit(4)")],
                              2, "REPLICA")
        handle = self._run_or_refused(runner, backend, app)
        if handle is None:
            return
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.FAILED and status.num_restarts == 2, status
        assert "role 'main' replica 0 failed with exit code 4" in status.msg, status.msg
        assert "after 3 attempts (REPLICA policy, max_retries=2)" in status.msg, status.msg

    def test_a_service_that_dies_is_restarted_while_retries_last(self, runner: Runner, backend: Backend) -> None:
        # the client succeeds only once it has seen the service's second attempt
        app = self._retry_app(backend, "retry-service", [
            self.role(backend, "svc", "import os, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; "
                      "print('ATTEMPT', a, flush=True); sys.exit(0) if a == '1' else time.sleep(600)", service=True),
            self.role(backend, "main", "import time; time.sleep(1)"),
        ], 1, "REPLICA")
        handle = self._run_or_refused(runner, backend, app)
        if handle is None:
            return
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
        assert self._attempts(runner, handle, "svc", 0) == ["1", "2"]

    def test_cancel_while_a_restart_waits_ends_cancelled_and_nothing_restarts(
            self, runner: Runner, backend: Backend) -> None:
        from conftest import live_processes, process_lineage

        app = self._retry_app(backend, "retry-cancel", [
            self.role(backend, "main", "import os, sys, time; print('ATTEMPT', os.environ['TORCHX_EXT_ATTEMPT'], "
                      "flush=True); sys.exit(1) if os.environ['TORCHX_EXT_REPLICA_ID'] == '0' else time.sleep(600)",
                      replicas=2),
        ], 3, "REPLICA")
        handle = self._run_or_refused(runner, backend, app, retry_backoff_s=60.0)
        if handle is None:
            return
        deadline = time.time() + backend.timeout
        while "[torchx-ext] attempt 2 of role 'main' replica 0" not in logs(runner, handle, "main", 0):
            assert time.time() < deadline, runner.status(handle)
            time.sleep(0.2)
        runner.cancel(handle)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.CANCELLED, status
        marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
        deadline = time.time() + 30
        while live_processes((marker,)):
            assert time.time() < deadline, f"processes outlived the cancel: {process_lineage(live_processes((marker,)))}"
            time.sleep(0.2)
        assert self._attempts(runner, handle, "main", 0) == ["1"]
        assert runner.status(handle).num_restarts == 1  # type: ignore[union-attr]

    def test_group_all_or_nothing(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("aon", roles=[
            self.role(backend, "good", "import time; time.sleep(600)"),
            self.role(backend, "bad", "", entrypoint="/nonexistent/torchx-ext-binary"),
        ])
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.FAILED, status
        assert "bad" in status.msg, status.msg
        if backend.nothing_running:
            assert backend.nothing_running(handle)

    def test_discovery_env(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("disc", roles=[
            self.role(backend, "model-server", PRINT_ENV, replicas=2),
            self.role(backend, "client", PRINT_ENV),
        ])
        handle = self.run(runner, backend, app)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        app_id = handle.rsplit("/", 1)[-1]
        seen = []
        for role, k in (("model-server", 0), ("model-server", 1), ("client", 0)):
            line = next(x for x in logs(runner, handle, role, k).splitlines() if x.startswith("ENV "))
            env = json.loads(line[4:])
            assert env["TORCHX_EXT_APP_ID"] == app_id
            assert env["TORCHX_EXT_ROLE"] == role
            assert env["TORCHX_EXT_REPLICA_ID"] == str(k)
            assert len(env["TORCHX_EXT_HOSTS_MODEL_SERVER"].split(",")) == 2
            assert len(env["TORCHX_EXT_HOSTS_CLIENT"].split(",")) == 1
            seen.append((env["TORCHX_EXT_HOSTS_MODEL_SERVER"], env["TORCHX_EXT_HOSTS_CLIENT"]))
        assert len(set(seen)) == 1, f"replicas disagree on the hosts: {seen}"
        if backend.check_hosts:
            backend.check_hosts({"MODEL_SERVER": seen[0][0].split(","), "CLIENT": seen[0][1].split(",")})

    def test_service_stopped_when_main_roles_end(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("svc", roles=[
            self.role(backend, "server", "import time; time.sleep(600)", service=True),
            self.role(backend, "client", "print('done')"),
        ])
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, status
        if backend.nothing_running:
            assert backend.nothing_running(handle)

    def test_service_dying_early_fails_app(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("svcdie", roles=[
            self.role(backend, "server", "import sys; sys.exit(3)", service=True),
            self.role(backend, "client", "import time; time.sleep(600)"),
        ])
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.FAILED, status
        assert "server" in status.msg, status.msg

    def test_a_service_with_ports_accepts_connections_before_the_others_start(
            self, runner: Runner, backend: Backend) -> None:
        """The engine's readiness, not the component's waiter: the server listens 2 s after it
        starts, and the client tries once, at its start."""
        port = free_port()
        server = self.role(backend, "server", f"import time; time.sleep(2)\n{SERVER}", str(port), service=True)
        server.port_map = {"http": port}
        client = self.role(backend, "client", CONNECT_ONCE, str(port))
        handle = self.run(runner, backend, AppDef("ready", roles=[server, client]))
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, (status, logs(runner, handle, "client"))
        assert "GOT hello from server" in logs(runner, handle, "client")

    def test_a_service_not_ready_in_time_fails_the_app_naming_it(self, runner: Runner, backend: Backend) -> None:
        server = self.role(backend, "server", "import time; time.sleep(600)", service=True)
        server.port_map = {"http": free_port()}  # never listened on
        client = self.role(backend, "client", "print('client ran', flush=True)")
        handle = self.run(runner, backend, AppDef("notready", roles=[server, client]), ready_timeout_s=3.0)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.FAILED, status
        assert "service role 'server' replica 0 was not ready: port" in status.msg, status.msg
        assert "within 3 s (run option ready_timeout_s)" in status.msg, status.msg
        try:  # a replica that never started may have no log at all
            client_log = logs(runner, handle, "client")
        except Exception:  # noqa: BLE001  (any backend's "no such log" is fine here)
            client_log = ""
        assert "client ran" not in client_log
        if backend.nothing_running:
            assert backend.nothing_running(handle)

    def test_dependency_success(self, runner: Runner, backend: Backend) -> None:
        first = self.run(runner, backend, AppDef("first", roles=[
            self.role(backend, "main", f"import time; time.sleep(2); {PRINT_TIME}")]))
        second = self.run(runner, backend, AppDef("second", roles=[
            self.role(backend, "main", PRINT_TIME)]), dependencies=[first])
        assert wait_terminal(runner, second, backend.timeout * 2).state == AppState.SUCCEEDED
        assert runner.status(first).state == AppState.SUCCEEDED
        t_first = float(logs(runner, first, "main", regex="^T ").split()[1])
        t_second = float(logs(runner, second, "main", regex="^T ").split()[1])
        assert t_second > t_first, "the dependent started before its dependency finished"

    def test_dependency_failure_fails_dependent(self, runner: Runner, backend: Backend) -> None:
        first = self.run(runner, backend, AppDef("first", roles=[
            self.role(backend, "main", "import sys, time; time.sleep(1); sys.exit(4)")]))
        second = self.run(runner, backend, AppDef("second", roles=[
            self.role(backend, "main", "print('must not run')")]), dependencies=[first])
        status = wait_terminal(runner, second, backend.timeout * 2)
        assert status.state in (AppState.FAILED, AppState.CANCELLED), status
        assert first.rsplit("/", 1)[-1] in status.msg, status.msg
        # its replica never ran: it ends with the app, it does not read PENDING forever
        pending = [r for rs in status.roles for r in rs.replicas if not is_terminal(r.state)]
        assert not pending, status

    def test_unknown_dependency_rejected(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("orphan", roles=[self.role(backend, "main", "print(1)")])
        with pytest.raises(Exception, match="no-such-dep"):
            self.run(runner, backend, app, dependencies=[f"{backend.scheduler}://torchx/no-such-dep-42"])

    def test_hostile_arguments_arrive_verbatim(self, runner: Runner, backend: Backend) -> None:
        hostile_env = {"HOSTILE": HOSTILE_ARGS[0] + HOSTILE_ARGS[1] + HOSTILE_ARGS[4]}
        code = PRINT_ARGV + "; import os; print('HENV ' + json.dumps(os.environ['HOSTILE']), flush=True)"
        app = AppDef("hostile", roles=[self.role(backend, "main", code, *HOSTILE_ARGS, env=hostile_env)])
        handle = self.run(runner, backend, app)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        out = logs(runner, handle, "main")
        argv = next(x for x in out.splitlines() if x.startswith("ARGV "))
        assert json.loads(argv[5:]) == HOSTILE_ARGS
        henv = next(x for x in out.splitlines() if x.startswith("HENV "))
        assert json.loads(henv[5:]) == hostile_env["HOSTILE"]

    def test_server_client_component(self, runner: Runner, backend: Backend) -> None:
        from torchx_ext.components.group import server_client

        port = free_port()
        app = server_client(server="x", client="x", image=backend.image)
        server, client = app.roles
        server.entrypoint, server.args = backend.python, ["-c", SERVER, str(port)]
        client.entrypoint, client.args = backend.python, ["-c", CLIENT, str(port)]
        for r in app.roles:
            r.resource = backend.resource
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, (status, logs(runner, handle, "client"))
        assert "GOT hello from server" in logs(runner, handle, "client")

    def test_invalid_app_rejected_before_anything_starts(self, runner: Runner, backend: Backend) -> None:
        before = {a.app_handle for a in runner.list(backend.scheduler)}
        app = AppDef("dup", roles=[self.role(backend, "a", "print(1)"), self.role(backend, "a", "print(2)")])
        with pytest.raises(ValueError, match="unique"):
            self.run(runner, backend, app)
        assert {a.app_handle for a in runner.list(backend.scheduler)} == before

    def _refused_before_anything_starts(self, runner: Runner, backend: Backend, app: AppDef, match: str) -> None:
        before = {a.app_handle for a in runner.list(backend.scheduler)}
        with pytest.raises(InvalidAppError, match=match):
            self.run(runner, backend, app)
        assert {a.app_handle for a in runner.list(backend.scheduler)} == before, "something was started"

    def test_a_refused_field_fails_the_run_naming_it_before_anything_starts(self, runner: Runner, backend: Backend) -> None:
        role = self.role(backend, "main", "print('must not run')")
        role.max_retries = 3  # refused where restarts do not exist yet: never silently dropped
        if backend.retries:  # where they do: a policy no group can honour
            role.retry_policy = "HOT_SPARE"  # type: ignore[assignment]  # not in the nightly's enum
        field = r"Role\.retry_policy.*HOT_SPARE" if backend.retries else r"Role\.max_retries"
        self._refused_before_anything_starts(runner, backend, AppDef("retry", roles=[role]), field)

    def test_a_role_name_that_is_a_path_is_refused(self, runner: Runner, backend: Backend) -> None:
        for name in ("../escape", "/tmp/escape"):
            app = AppDef("path", roles=[self.role(backend, name, "print('must not run')")])
            self._refused_before_anything_starts(runner, backend, app, "a role name is data")

    def test_roles_whose_names_meet_on_the_backend_are_refused(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("meet", roles=[self.role(backend, "a-b", "print(1)"), self.role(backend, "a_b", "print(2)")])
        self._refused_before_anything_starts(runner, backend, app, "'a_b' and role 'a-b'|'a-b' and 'a_b'")

    def test_a_nul_byte_in_an_argument_or_env_value_is_refused(self, runner: Runner, backend: Backend) -> None:
        # the other replica of the group must not start either: refused before anything runs
        good = self.role(backend, "good", "import time; time.sleep(60)")
        for bad in (self.role(backend, "bad", "print(1)", "x\0y"),
                    self.role(backend, "bad", "print(1)", env={"V": "a\0b"})):
            self._refused_before_anything_starts(runner, backend, AppDef("nul", roles=[good, bad]), "NUL byte")

    def test_describe_native_reads_back_the_request_and_list_names_the_app(
            self, runner: Runner, backend: Backend) -> None:
        from torchx.schedulers import get_scheduler_factories

        app = AppDef("native", roles=[self.role(backend, "main", "print('x')", env={"MARK": "native-mark-1"})])
        handle = self.run(runner, backend, app)
        wait_terminal(runner, handle, backend.timeout)
        sched = get_scheduler_factories()[backend.scheduler]("test")
        info = sched.describe_native(handle.rsplit("/", 1)[-1])
        assert info is not None and "native-mark-1" in repr(info.request), info
        assert sched.describe_native(f"no-such-app-{int(time.time())}") is None
        listed = next(a for a in runner.list(backend.scheduler) if a.app_handle == handle)
        assert getattr(listed, "name", "native") == "native"  # torchx-nightly's ListAppResponse has a name

    def test_unknown_option_lists_valid_ones(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("opt", roles=[self.role(backend, "main", "print(1)")])
        # ours is a ValueError; the nightly's runopts rejects it first with its own exception type
        with pytest.raises(Exception, match=r"(?s)Valid options( are)?: .*dependencies"):
            self.run(runner, backend, app, dependencis=["x"])

    # -- logs --------------------------------------------------------------------------
    def test_log_streams_are_separated(self, runner: Runner, backend: Backend) -> None:
        code = ("import sys; print('out1', flush=True); print('err1', file=sys.stderr, flush=True); "
                "print('out2', flush=True)")
        handle = self.run(runner, backend, AppDef("streams", roles=[self.role(backend, "main", code)]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        assert log_words(runner, handle, "main", streams=Stream.STDOUT) == ["out1", "out2"]
        assert log_words(runner, handle, "main", streams=Stream.STDERR) == ["err1"]

    def test_log_regex_keeps_only_matching_lines(self, runner: Runner, backend: Backend) -> None:
        code = "print('keep-1'); print('drop-2'); print('keep-3'); print('alsokeep-4')"
        handle = self.run(runner, backend, AppDef("regex", roles=[self.role(backend, "main", code)]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        assert log_words(runner, handle, "main", regex="^keep") == ["keep-1", "keep-3"]
        assert log_words(runner, handle, "main", regex="keep-[0-9]$") == ["keep-1", "keep-3", "alsokeep-4"]

    def test_a_carriage_return_loses_no_text(self, runner: Runner, backend: Backend) -> None:
        # a progress bar's "\r": the backend may keep it or make it a line end (Ray's log reads
        # do), but the text on either side of it is the replica's and is shown
        code = "import sys; sys.stdout.write('p10%\\rp20%\\nafter\\r\\nend\\n')"
        handle = self.run(runner, backend, AppDef("cr", roles=[self.role(backend, "main", code)]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        assert logs(runner, handle, "main").replace("\r", "\n").split() == ["p10%", "p20%", "after", "end"]

    def test_log_since_until_select_lines_by_time(self, runner: Runner, backend: Backend) -> None:
        code = ("import time; print('early %.6f' % time.time(), flush=True); time.sleep(1.5); "
                "print('late %.6f' % time.time(), flush=True)")
        handle = self.run(runner, backend, AppDef("since", roles=[self.role(backend, "main", code)]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        stamps = {line.split()[0]: float(line.split()[1])
                  for line in logs(runner, handle, "main").splitlines() if line.strip()}
        assert set(stamps) == {"early", "late"}, stamps
        cut = datetime.fromtimestamp((stamps["early"] + stamps["late"]) / 2)
        assert log_words(runner, handle, "main", since=cut) == ["late"]
        assert log_words(runner, handle, "main", until=cut) == ["early"]

    def test_log_tail_follows_a_running_app_to_its_end(self, runner: Runner, backend: Backend) -> None:
        code = "import time; print('first', flush=True); time.sleep(3); print('last', flush=True)"
        handle = self.run(runner, backend, AppDef("tail", roles=[self.role(backend, "main", code)]))
        wait_state(runner, handle, AppState.RUNNING, backend.timeout)
        tailed = [line.strip() for line in runner.log_lines(handle, "main", 0, should_tail=True) if line.strip()]
        assert tailed == ["first", "last"]
        # the tail returned because the app ended, not before
        assert runner.status(handle).state == AppState.SUCCEEDED

    # -- macros ------------------------------------------------------------------------
    def test_app_id_and_replica_id_macros_are_substituted(self, runner: Runner, backend: Backend) -> None:
        role = self.role(backend, "main", PRINT_ARGV, macros.app_id, macros.replica_id,
                         f"r{macros.replica_id}-{macros.app_id}", replicas=2)
        handle = self.run(runner, backend, AppDef("macros", roles=[role]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        app_id = handle.rsplit("/", 1)[-1]
        for k in (0, 1):
            line = next(x for x in logs(runner, handle, "main", k).splitlines() if x.startswith("ARGV "))
            assert json.loads(line[5:]) == [app_id, str(k), f"r{k}-{app_id}"]

    # -- describe ----------------------------------------------------------------------
    def test_describe_returns_roles_with_replica_counts(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("shape", roles=[self.role(backend, "alpha", "print(1)", replicas=2),
                                     self.role(backend, "beta", "print(2)")])
        handle = self.run(runner, backend, app)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        with get_runner() as fresh:  # the submitting runner answers describe from its own cache
            described = fresh.describe(handle)
        assert described is not None
        assert [(r.name, r.num_replicas) for r in described.roles] == [("alpha", 2), ("beta", 1)]

    def test_status_has_a_terminal_replica_status_per_replica(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("replicas", roles=[self.role(backend, "alpha", "print(1)", replicas=2),
                                        self.role(backend, "beta", "print(2)")])
        handle = self.run(runner, backend, app)
        status = wait_terminal(runner, handle, backend.timeout)
        assert status.state == AppState.SUCCEEDED, status
        ids = {rs.role: [r.id for r in rs.replicas] for rs in status.roles}
        assert ids == {"alpha": [0, 1], "beta": [0]}, status.roles
        states = {(r.role, r.id): r.state for rs in status.roles for r in rs.replicas}
        assert all(s in TERMINAL for s in states.values()), states

    # -- delete ------------------------------------------------------------------------
    def scheduler(self, backend: Backend) -> Any:
        return get_scheduler_factories()[backend.scheduler]("test")

    def test_delete_of_a_finished_app_forgets_it(self, runner: Runner, backend: Backend) -> None:
        handle = self.run(runner, backend, AppDef("gone", roles=[self.role(backend, "main", "print(1)")]))
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        self.scheduler(backend).delete(handle.rsplit("/", 1)[-1])
        status = runner.status(handle)
        assert status is None, status

    def test_delete_of_a_running_app_stops_it(self, runner: Runner, backend: Backend) -> None:
        code = "import time; print('up', flush=True); time.sleep(300)"
        handle = self.run(runner, backend, AppDef("delrun", roles=[self.role(backend, "main", code, replicas=2)]))
        try:
            wait_state(runner, handle, AppState.RUNNING, backend.timeout)
            self.scheduler(backend).delete(handle.rsplit("/", 1)[-1])
            stopped = backend.nothing_running_after_delete or backend.nothing_running
            if stopped:
                assert stopped(handle), "something of the app still runs after delete"
            status = runner.status(handle)
            assert status is None, status
        finally:
            status = runner.status(handle)
            if status is not None and status.state not in TERMINAL:
                runner.cancel(handle)

    # -- log of what does not exist ----------------------------------------------------
    def test_log_of_unknown_role_or_replica_names_the_valid_roles(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("logerr", roles=[self.role(backend, "main", "print(1)", replicas=2),
                                      self.role(backend, "side", "print(2)")])
        handle = self.run(runner, backend, app)
        assert wait_terminal(runner, handle, backend.timeout).state == AppState.SUCCEEDED
        for role, k in (("nosuchrole", 0), ("main", 2), ("side", 1), ("main", -1)):
            with pytest.raises(ValueError) as e:
                list(runner.log_lines(handle, role, k))
            assert "main" in str(e.value) and "side" in str(e.value), (role, k, str(e.value))

    def test_log_of_unknown_app_is_a_value_error(self, backend: Backend) -> None:
        # through the scheduler: the runner answers an unknown app itself (UnknownAppException)
        with pytest.raises(ValueError):
            list(self.scheduler(backend).log_iter(backend.missing_app_id, "main", 0))

    # -- the CLI's error contract ------------------------------------------------------
    @pytest.mark.parametrize("verb", CLI_VERBS)
    def test_cli_verb_on_failing_backend_prints_no_traceback(self, backend: Backend, verb: str, tmp_path: Any) -> None:
        assert backend.broken_env is not None or backend.broken_cfg is not None, "the fixture gives no way to fail"
        handle = f"{backend.scheduler}://torchx/{backend.broken_app_id or backend.missing_app_id}"
        runs = []  # (how it was broken, args, env)
        if verb == "run":
            command = ["utils.sh", "--image", backend.image or "unused", "echo", "never-runs"]
            if backend.broken_env is not None:
                runs.append(("broken_env", ["run", "-s", backend.scheduler, *command], backend.broken_env))
            if backend.broken_cfg is not None:
                cfg = ",".join(f"{k}={v}" for k, v in {**backend.cfg, **backend.broken_cfg}.items())
                runs.append(("broken_cfg", ["run", "-s", backend.scheduler, "-cfg", cfg, *command], None))
        elif backend.broken_env is not None:
            args = {"status": ["status", handle], "log": ["log", f"{handle}/main/0"],
                    "list": ["list", "-s", backend.scheduler], "cancel": ["cancel", handle]}[verb]
            runs.append(("broken_env", args, backend.broken_env))
        problems = []
        for how, args, env in runs:
            out = torchx_cli(args, env, cwd=str(tmp_path))
            shown = f"[{how}] torchx {' '.join(args)} -> rc={out.returncode}\nstdout: {out.stdout}\nstderr: {out.stderr}"
            if "Traceback" in out.stderr:
                problems.append(f"traceback: {shown}")
            elif verb == "run" and (out.returncode == 0 or len(error_lines(out.stderr)) != 1):
                problems.append(f"not one line and non-zero: {shown}")
        assert not problems, "\n\n".join(problems)
