"""The contract every torchx-ext scheduler passes, written once (fsspec's abstract test suite habit).

A backend's test module subclasses :class:`SchedulerContract` and provides a ``backend`` fixture
returning a :class:`Backend` (scheduler name, cfg, the image and python to run with). Everything
goes through ``torchx.runner.get_runner()`` — the Python API users call — against the real engine.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

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

    def test_unknown_option_lists_valid_ones(self, runner: Runner, backend: Backend) -> None:
        app = AppDef("opt", roles=[self.role(backend, "main", "print(1)")])
        # ours is a ValueError; the nightly's runopts rejects it first with its own exception type
        with pytest.raises(Exception, match=r"(?s)Valid options( are)?: .*dependencies"):
            self.run(runner, backend, app, dependencis=["x"])
