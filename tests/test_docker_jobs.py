"""``docker_jobs`` on the real Docker engine of ``testbed/docker.sh``: the shared contract, the CLI
from new processes (dependencies included), a daemon restart, OOM, a dead watcher, workspaces,
mounts, and no pulls of local images. Every app, network and volume made here is removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from typing import Any, Iterator

import pytest
from torchx.runner import Runner, get_runner
from torchx.schedulers.api import Stream
from torchx.specs import AppDef, AppState, BindMount, Resource, Role, VolumeMount

from conftest import ROOT, live_processes, require_backend
from contract import Backend, SchedulerContract, logs, wait_state, wait_terminal
from torchx_ext.groups import mark_service
from torchx_ext.schedulers.docker_jobs import daemon as d
from torchx_ext.schedulers.docker_jobs.scheduler import DockerJobsScheduler, create_scheduler
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts

TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
SMALL = Resource(cpu=1, gpu=0, memMB=256)


def python_image() -> str:
    require_backend("TORCHX_EXT_TEST_DOCKER", "Docker")
    return require_backend("TORCHX_EXT_TEST_DOCKER_PYTHON", "Docker python image")


def app_id(handle: str) -> str:
    return handle.rsplit("/", 1)[-1]


def running_containers(app: str) -> list[dict[str, Any]]:
    return d.client().containers(filters=d.app_filter(app))  # running only


def nothing_running(handle: str) -> bool:
    return not running_containers(app_id(handle))


def watcher_pids(home: str = "") -> list[int]:
    """Live watcher processes (of the home ``home``: "." for this test session's)."""
    if home == ".":
        home = os.path.realpath(os.environ["TORCHX_EXT_HOME"])
    return live_processes(argv=(f"torchx_ext.schedulers.docker_jobs.watcher\0{'--home' + chr(0) + home + chr(0) if home else ''}".encode(),))


def wait_watchers(n: int, home: str = ".", timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    while len(pids := watcher_pids(home)) != n and time.time() < deadline:
        time.sleep(0.05)  # right after exec, /proc/PID/cmdline can still be empty for a moment
    assert len(pids) == n, pids
    return pids


@pytest.fixture(scope="module")
def sched() -> Iterator[DockerJobsScheduler]:
    """Leaves the daemon as it found it: apps made by this module are deleted at the end."""
    python_image()
    s = create_scheduler("test")
    before = set(s.app_ids())
    yield s
    for a in set(s.app_ids()) - before:
        s.delete(a)
    leftovers = set(s.app_ids()) - before
    api = d.client()
    nets = [n["Name"] for n in api.networks(filters={"label": f"{d.L_SCHEDULER}={d.SCHEDULER}"})
            if n["Labels"].get(d.L_APP_ID) not in before]
    deadline = time.time() + 10
    while watcher_pids(".") and time.time() < deadline:
        time.sleep(0.2)
    assert not leftovers and not nets, f"left behind: apps {leftovers}, networks {nets}"
    assert not watcher_pids("."), "the watcher outlived its deleted apps"


@pytest.fixture(autouse=True)
def delete_apps_of_each_test(sched: DockerJobsScheduler) -> Iterator[None]:
    # per test, not per module: every container costs a full rootfs copy with the vfs driver,
    # and bridge networks come from a small address pool
    before = set(sched.app_ids())
    yield
    for a in set(sched.app_ids()) - before:
        sched.delete(a)


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


class TestDockerContract(SchedulerContract):
    @pytest.fixture
    def backend(self) -> Backend:
        return Backend(scheduler="docker_jobs", image=python_image(), python="python3",
                       resource=SMALL, timeout=90, nothing_running=nothing_running,
                       # nothing listens there: every call to the daemon fails
                       broken_env={"DOCKER_HOST": "tcp://127.0.0.1:9"}, retries=True)


# ------------------------------------------------------------------------------ helpers -----
def role(name: str, code: str, *args: str, service: bool = False, **kw: Any) -> Role:
    r = Role(name=name, image=python_image(), entrypoint="python3", args=["-c", code, *args],
             resource=kw.pop("resource", SMALL), **kw)
    return mark_service(r, service)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    if args[:1] == ("run",) and "--workspace" not in args:
        args = ("run", "--workspace", "", *args[1:])  # TorchX's way to run without a workspace
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=timeout, cwd="/tmp")


def cli_handle(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("docker_jobs://"))


def cli_state(handle: str) -> str:
    out = cli("status", handle)
    assert out.returncode == 0, out.stderr
    return next(line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("State:"))


def cli_wait(handle: str, want: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = cli_state(handle)
        if state == want:
            return
        assert state not in {"SUCCEEDED", "FAILED", "CANCELLED"} - {want}, f"{handle}: {state}"
        time.sleep(0.3)
    raise AssertionError(f"{handle} never reached {want}; last {state}")


# -------------------------------------------------------------------------------- tests -----
def test_cli_end_to_end_from_new_processes() -> None:
    img = python_image()
    first = cli_handle(cli("run", "-s", "docker_jobs", "group.roles", "--image", img,
                           "main=sh -c 'sleep 6; echo first-done-$TORCHX_EXT_ROLE'"))
    # the dependant is submitted by a process that exits at once: the watcher starts it later
    second = cli_handle(cli("run", "-s", "docker_jobs", "-cfg", f"dependencies={first}", "group.roles",
                            "--image", img, "main=python3 -c \"import time; print('T', time.time())\""))
    assert cli_state(second) == "PENDING"
    sleeper = cli_handle(cli("run", "-s", "docker_jobs", "group.roles", "--image", img,
                             "main=sh -c 'echo up; sleep 300'"))
    cli_wait(sleeper, "RUNNING")
    listed = cli("list", "-s", "docker_jobs").stdout
    assert first in listed and second in listed and sleeper in listed, listed
    assert listed.index(sleeper) < listed.index(second) < listed.index(first), f"not the newest first: {listed}"
    assert cli("cancel", sleeper).returncode == 0
    assert cli_state(sleeper) == "CANCELLED"
    assert cli("cancel", sleeper).returncode == 0  # idempotent
    assert nothing_running(sleeper)
    cli_wait(second, "SUCCEEDED")
    assert cli_state(first) == "SUCCEEDED"
    out = cli("log", f"{first}/main/0")
    assert "first-done-main" in out.stdout, out.stdout + out.stderr
    t_second = float(cli("log", "--regex", "^T ", f"{second}/main/0").stdout.split()[-1])
    finished = d.client().inspect_container(f"{app_id(first)}-main-0")["State"]["FinishedAt"]
    assert t_second > parse_ts(finished), "the dependant started before its dependency ended"  # type: ignore[operator]
    assert "up" in cli("log", f"{sleeper}/main/0").stdout


def test_cli_dryrun_imports_no_docker_and_hides_copied_env() -> None:
    code = (
        "import sys; from torchx.runner import get_runner; from torchx.specs import AppDef, Role\n"
        "app = AppDef('d', roles=[Role('main', image='img', entrypoint='echo', args=['hi'])])\n"
        "info = get_runner().dryrun(app, 'docker_jobs', {'copy_env': ['TXE_SECRET*']})\n"
        "assert 'TXE_SECRET' in repr(info.request) and 'hunter2' not in repr(info.request)\n"
        "assert 'docker' not in sys.modules, 'dry-run imported docker'\n"
    )
    env = dict(os.environ, TXE_SECRET_TOKEN="hunter2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr


def test_secret_copied_into_the_container_only(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TXE_SECRET_TOKEN", "hunter2")
    app = AppDef("secret", roles=[role("main", "import os; print('len', len(os.environ['TXE_SECRET_TOKEN']))")])
    handle = runner.run(app, "docker_jobs", {"copy_env": ["TXE_SECRET*"]})
    assert wait_terminal(runner, handle, 60).state == AppState.SUCCEEDED
    assert "len 7" in logs(runner, handle, "main")
    labels = json.dumps(d.client().inspect_container(f"{app_id(handle)}-main-0")["Config"]["Labels"])
    assert "hunter2" not in labels


def test_logs_streams_since_until_and_tail(runner: Runner) -> None:
    code = ("import sys, time; print('out1', flush=True); print('err1', file=sys.stderr, flush=True); "
            "time.sleep(1.5); print('out2', flush=True)")
    handle = runner.run(AppDef("logs", roles=[role("main", code)]), "docker_jobs", {})
    tailed = "".join(runner.log_lines(handle, "main", 0, should_tail=True))  # follows until the end
    assert sorted(tailed.split()) == ["err1", "out1", "out2"], tailed  # out2 came 1.5 s later
    assert wait_terminal(runner, handle, 60).state == AppState.SUCCEEDED
    assert logs(runner, handle, "main", streams=Stream.STDERR).split() == ["err1"]
    assert logs(runner, handle, "main", streams=Stream.STDOUT).split() == ["out1", "out2"]
    raw = d.client().logs(f"{app_id(handle)}-main-0", timestamps=True).decode().splitlines()
    t_out2 = parse_ts(next(x for x in raw if x.endswith(" out2")).split()[0])
    assert t_out2 is not None
    middle = datetime.fromtimestamp(t_out2 - 0.5)
    assert logs(runner, handle, "main", since=middle).split() == ["out2"]
    assert sorted(logs(runner, handle, "main", until=middle).split()) == ["err1", "out1"]
    assert logs(runner, handle, "main", regex="^out").split() == ["out1", "out2"]


def test_daemon_restart_while_the_app_runs(runner: Runner) -> None:
    app = AppDef("restart", roles=[
        role("server", "import time; time.sleep(600)", service=True),
        role("main", "import time; print('before', flush=True); time.sleep(8); print('after', flush=True)"),
    ])
    handle = runner.run(app, "docker_jobs", {})
    wait_state(runner, handle, AppState.RUNNING, 60)
    restart = subprocess.Popen(["bash", os.path.join(ROOT, "testbed", "docker.sh"), "restart"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    states = []
    while restart.poll() is None:  # describe during the gap retries instead of failing
        states.append(runner.status(handle).state)
        time.sleep(0.2)
    assert restart.returncode == 0, restart.stdout.read()  # type: ignore[union-attr]
    assert set(states) <= {AppState.RUNNING}, states
    assert runner.status(handle).state == AppState.RUNNING
    status = wait_terminal(runner, handle, 60)
    assert status.state == AppState.SUCCEEDED, status
    out = logs(runner, handle, "main")
    assert "before" in out and "after" in out
    assert nothing_running(handle)


def test_oom_killed_container_fails_the_app_with_the_reason(runner: Runner) -> None:
    tiny = Resource(cpu=1, gpu=0, memMB=32)
    app = AppDef("oom", roles=[role("hog", "x = bytearray(200 * 1024 * 1024); print('survived')", resource=tiny)])
    handle = runner.run(app, "docker_jobs", {})
    status = wait_terminal(runner, handle, 60)
    assert status.state == AppState.FAILED, status
    assert "OOMKilled" in status.msg and "hog" in status.msg, status.msg


def test_dead_watcher_describe_still_converges(runner: Runner) -> None:
    app = AppDef("orphan", roles=[
        role("server", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
             service=True),
        role("main", "import time; time.sleep(2)"),
    ])
    handle = runner.run(app, "docker_jobs", {"stop_timeout": 1})
    os.kill(wait_watchers(1)[0], signal.SIGKILL)
    status = wait_terminal(runner, handle, 60)  # describe restarts the watcher, which finishes the job
    assert status.state == AppState.SUCCEEDED, status
    assert nothing_running(handle)


def test_a_watcher_killed_during_a_backoff_is_followed_with_the_same_budget(runner: Runner) -> None:
    """A restart's decision, budget and backoff are on the daemon (the group engine's snapshot on the
    attempt it created): the watcher that replaces a killed one (started by a status query) starts
    that attempt when its backoff ends and, the budget spent, fails the app on its next failure."""
    code = "import os, sys; print('ATTEMPT', os.environ['TORCHX_EXT_ATTEMPT'], flush=True); sys.exit(3)"
    app = AppDef("takeover", roles=[role("main", code, max_retries=1, retry_policy="REPLICA")])
    handle = runner.run(app, "docker_jobs", {"retry_backoff_s": 5.0})
    deadline = time.time() + 60
    while "[torchx-ext] attempt 2 of role 'main' replica 0 begins" not in logs(runner, handle, "main"):
        assert time.time() < deadline, runner.status(handle)
        time.sleep(0.1)
    os.kill(wait_watchers(1)[0], signal.SIGKILL)
    nxt = d.client().containers(all=True, filters=d.app_filter(app_id(handle), **{d.L_ATTEMPT: "2"}))
    assert [c["State"] for c in nxt] == ["created"], nxt  # killed while the backoff ran
    status = wait_terminal(runner, handle, 60)
    assert status.state == AppState.FAILED and status.num_restarts == 1, status
    assert "after 2 attempts (REPLICA policy, max_retries=1)" in status.msg, status.msg
    assert [x for x in logs(runner, handle, "main").splitlines() if x.startswith("ATTEMPT")] == [
        "ATTEMPT 1", "ATTEMPT 2"]


def test_workspace_builds_an_image_locally(runner: Runner, tmp_path: Any) -> None:
    api = d.client()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "hello.py").write_text("print('hello from the workspace')\n")
    (plain / "big.bin").write_text("x" * 1000)
    (plain / ".dockerignore").write_text("big.bin\n")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "hello.py").write_text("import os; print('custom', os.getcwd(), os.environ['FROM_DOCKERFILE'])\n")
    (custom / "Dockerfile.torchx").write_text(
        "ARG IMAGE\nFROM $IMAGE\nCOPY . /app\nWORKDIR /app\nENV FROM_DOCKERFILE=yes\n")
    images = []
    try:
        for ws, code, want in (
            (plain, "import os, runpy; print(os.path.exists('/big.bin')); runpy.run_path('/hello.py')",
             "False\nhello from the workspace"),
            (custom, "import runpy; runpy.run_path('hello.py')", "custom /app yes"),
        ):
            app = AppDef("ws", roles=[role("main", code)])
            handle = runner.run(app, "docker_jobs", {}, workspace=str(ws))
            # what the app runs, from the daemon (torchx-nightly builds on a copy of the AppDef)
            built = d.fetch(api, app_id(handle)).roles[0]["image"]  # type: ignore[union-attr]
            assert built.startswith("sha256:"), built
            images.append(built)
            assert wait_terminal(runner, handle, 60).state == AppState.SUCCEEDED, logs(runner, handle, "main")
            assert want in logs(runner, handle, "main")
    finally:
        s = create_scheduler("t")
        for a in s.app_ids():
            snap = d.fetch(api, a)
            if snap and any(r.get("image") in images for r in snap.roles):
                s.delete(a)  # before the images it runs
        left = set(api.images(quiet=True))
        for img in images:
            # delete removed each with its app (the image it built is the app's); never the base image
            if img.startswith("sha256:") and img in left:
                api.remove_image(img, force=True)
    assert not set(images) & set(api.images(quiet=True)), "delete left the workspace images behind"


def test_mounts_bind_volume_tmpfs(runner: Runner, tmp_path: Any) -> None:
    (tmp_path / "data.txt").write_text("bound data\n")
    vol = f"txe-test-{uuid.uuid4().hex[:8]}"
    code = (
        "import os\n"
        "print(open('/data/data.txt').read().strip())\n"
        "try:\n    open('/data/new', 'w')\nexcept OSError as e:\n    print('read-only', e.errno)\n"
        "open('/vol/x', 'w').write('v'); print('volume ok')\n"
        "line = [l for l in open('/proc/mounts') if ' /scratch ' in l][0]; print('scratch', line.split()[2])\n"
    )
    r = role("main", code)
    r.mounts = [BindMount(src_path=str(tmp_path), dst_path="/data", read_only=True),
                VolumeMount(src=vol, dst_path="/vol")]
    handle = runner.run(AppDef("mounts", roles=[r]), "docker_jobs", {"tmpfs": ["/scratch:size=8m"]})
    try:
        assert wait_terminal(runner, handle, 60).state == AppState.SUCCEEDED, logs(runner, handle, "main")
        out = logs(runner, handle, "main")
        assert "bound data" in out and "read-only 30" in out and "volume ok" in out and "scratch tmpfs" in out, out
    finally:
        create_scheduler("t").delete(app_id(handle))  # the volume is in use until then
        d.client().remove_volume(vol, force=True)


def test_create_failure_leaves_nothing(runner: Runner, sched: DockerJobsScheduler) -> None:
    before = set(sched.app_ids())
    r = role("broken", "print(1)")
    r.mounts = [BindMount(src_path="/nonexistent/torchx-ext-src", dst_path="/x")]
    app = AppDef("createfail", roles=[role("fine", "print(1)"), r])
    with pytest.raises(RuntimeError, match="role 'broken'.*nothing was started"):
        runner.run(app, "docker_jobs", {})
    assert set(sched.app_ids()) == before
    api = d.client()
    assert not [n for n in api.networks(filters={"label": f"{d.L_SCHEDULER}={d.SCHEDULER}"})
                if n["Labels"].get(d.L_APP_NAME) == "createfail"]


def test_local_images_are_never_pulled() -> None:
    s = create_scheduler("nopull")
    api = s._api()
    pulls: list[Any] = []
    real_pull = api.pull

    def spy(*a: Any, **k: Any) -> Any:  # records, then lets the real client do it
        pulls.append((a, k))
        return real_pull(*a, **k)

    api.pull = spy
    since = int(time.time()) - 1
    info = s.submit_dryrun(AppDef("nopull", roles=[role("main", "print('ran')")]), {})
    app = s.schedule(info)
    deadline = time.time() + 60
    while s.describe(app).state != AppState.SUCCEEDED:  # type: ignore[union-attr]
        assert time.time() < deadline
        time.sleep(0.3)
    events = list(api.events(since=since, until=int(time.time()) + 1, decode=True, filters={"type": "image"}))
    assert not pulls and not [e for e in events if e.get("Action") == "pull"], (pulls, events)
    absent = Role("main", image="torchx-ext-test/absent:1", entrypoint="true")
    missing = s.submit_dryrun(AppDef("missing", roles=[absent]), {"pull_policy": "never"})
    with pytest.raises(ValueError, match="not present locally"):
        s.schedule(missing)
    assert not pulls


def test_port_map_is_published_on_loopback_and_shown_by_describe(runner: Runner) -> None:
    import urllib.request

    server = role("web", "import http.server as h; h.HTTPServer(('0.0.0.0', 8080), h.SimpleHTTPRequestHandler)"
                  ".serve_forever()", port_map={"http": 8080})
    handle = runner.run(AppDef("ports", roles=[server]), "docker_jobs", {})
    wait_state(runner, handle, AppState.RUNNING, 60)
    described = create_scheduler("test").describe(app_id(handle))
    assert described is not None
    port = described.roles[0].port_map["http"]
    assert described.roles[0].port_map["http/0"] == port > 0
    published = d.client().inspect_container(f"{app_id(handle)}-web-0")["NetworkSettings"]["Ports"]["8080/tcp"]
    assert published == [{"HostIp": "127.0.0.1", "HostPort": str(port)}], published  # loopback only
    deadline = time.time() + 30
    while True:
        try:
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status == 200
            break
        except OSError:
            assert time.time() < deadline, "the published port never answered"
            time.sleep(0.3)
    runner.cancel(handle)


def test_missing_image_that_cannot_be_pulled_is_one_line() -> None:
    out = cli("run", "-s", "docker_jobs", "-cfg", "pull_policy=never", "utils.echo", "--image",
              "torchx-ext-test/no-such-image:1", "--msg", "x")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    errors = [x for x in out.stderr.splitlines() if x.startswith("torchx: error:")]
    assert len(errors) == 1 and "not present locally" in errors[0], out.stderr


def test_a_container_killed_from_outside_is_a_failed_attempt(runner: Runner) -> None:
    """`docker kill` of a running replica (as the OOM killer would): a new container takes its
    place under the same alias, and its log follows the first attempt's."""
    code = ("import os, sys, time; print('ATTEMPT', os.environ['TORCHX_EXT_ATTEMPT'], flush=True); "
            "time.sleep(600) if os.environ['TORCHX_EXT_ATTEMPT'] == '1' else sys.exit(0)")
    app = AppDef("killed", roles=[role("main", code, max_retries=1, retry_policy="REPLICA")])
    handle = runner.run(app, "docker_jobs", {})
    wait_state(runner, handle, AppState.RUNNING, 90)
    app_id = handle.rsplit("/", 1)[-1]
    deadline = time.time() + 90
    while "ATTEMPT 1" not in logs(runner, handle, "main"):
        assert time.time() < deadline
        time.sleep(0.2)
    subprocess.run(["docker", "kill", f"{app_id}-main-0"], check=True, capture_output=True)
    status = wait_terminal(runner, handle, 90)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    log = logs(runner, handle, "main")
    assert log.index("ATTEMPT 1") < log.index("ended with exit code 137") < log.index("ATTEMPT 2"), log


# ---------------------------------------------------------- trust: watchers, dry-runs, modes -----
def _in_home(home: str, code: str, *args: str, umask: int = 0o022) -> subprocess.Popen:
    """A Python process with ``home`` as its $TORCHX_EXT_HOME (and ``umask``), running ``code``."""
    env = dict(os.environ, TORCHX_EXT_HOME=home, PYTHONPATH=os.pathsep.join(
        x for x in (ROOT, os.environ.get("PYTHONPATH", "")) if x))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: os.umask(umask))


_POLL_STATUS = """
import sys, time
from torchx.specs import is_terminal
from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler
s = create_scheduler("other-home")
while True:
    st = s.describe(sys.argv[1])
    if st is None or is_terminal(st.state):
        print("END", st and st.state.name, flush=True)
        break
    time.sleep(0.05)
"""


def test_one_acting_watcher_wherever_status_is_asked_from(runner: Runner, tmp_path: Any) -> None:
    """Issue 20, item 6: processes of other homes ask status while watchers of their own try to act:
    the replica that fails once is restarted exactly once and the app succeeds."""
    code = ("import os, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; print('ATTEMPT', a, flush=True); "
            "time.sleep(4); sys.exit(3 if a == '1' else 0)")
    app = AppDef("lease", roles=[role("main", code, max_retries=2, retry_policy="REPLICA")])
    handle = runner.run(app, "docker_jobs", {})
    app = app_id(handle)
    homes = [str(tmp_path / f"home{i}") for i in range(2)]
    procs = [_in_home(h, _POLL_STATUS, app) for h in homes]
    # watchers started by hand in the other homes: before the lease, each would have acted
    procs += [_in_home(h, "import sys; from torchx_ext.schedulers.docker_jobs.watcher import main; "
                          "sys.exit(main(['w', '--app', sys.argv[1]]))", app) for h in homes]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert all("END SUCCEEDED" in o for o in outs[:2]), outs
    assert all("another watcher holds the lease" in o for o in outs[2:]), outs
    status = wait_terminal(runner, handle, 60)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    attempts = sorted(c["Labels"][d.L_ATTEMPT] for c in d.client().containers(all=True, filters=d.app_filter(app)))
    assert attempts == ["1", "2"], attempts
    assert logs(runner, handle, "main").count("ATTEMPT") == 2


def test_status_and_list_heal_only_the_apps_this_home_submitted(runner: Runner, tmp_path: Any) -> None:
    from torchx_ext.schedulers.docker_jobs import lease as leases

    handle = runner.run(AppDef("heal", roles=[role("main", "import time; time.sleep(300)")]), "docker_jobs", {})
    app = app_id(handle)
    wait_state(runner, handle, AppState.RUNNING, 60)
    os.kill(wait_watchers(1)[0], signal.SIGKILL)
    wait_watchers(0)
    leases.remove_leases(d.client(), app)  # as if its lease had expired
    other = _in_home(str(tmp_path / "other"), "import sys; from torchx_ext.schedulers.docker_jobs.scheduler import "
                     "create_scheduler as c; s = c('x'); print([x.app_id for x in s.list()]); "
                     "print(s.describe(sys.argv[1]).state.name)", app)
    out = other.communicate(timeout=60)[0]
    assert other.returncode == 0 and app in out and "RUNNING" in out, out
    assert not watcher_pids(".") and not watcher_pids(os.path.realpath(tmp_path / "other")) and not d.client().volumes(filters={"label": [f"{leases.L_LEASE}={app}"]})["Volumes"]
    assert runner.status(handle).state == AppState.RUNNING  # the submitter's home heals it
    wait_watchers(1)
    runner.cancel(handle)


def _daemon_objects() -> dict[str, set[str]]:
    api = d.client()
    return {"images": {i["Id"] for i in api.images(all=True)}, "containers": {c["Id"] for c in api.containers(all=True)},
            "networks": {n["Id"] for n in api.networks()},
            "volumes": {v["Name"] for v in api.volumes().get("Volumes") or []}}


def _listing(home: str) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirs, files in os.walk(home):
        for name in dirs + files:
            st = os.stat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_mode, st.st_size))
    return sorted(out)


def test_dryrun_with_a_workspace_writes_builds_and_connects_nothing(tmp_path: Any) -> None:
    home, ws = tmp_path / "home", tmp_path / "ws"
    home.mkdir(mode=0o755)
    ws.mkdir()
    (ws / "hello.py").write_text("print('hi')\n")
    before, listed = _daemon_objects(), _listing(str(home))
    code = ("import sys; from torchx.runner import get_runner; from torchx.specs import AppDef, Role\n"
            f"app = AppDef('d', roles=[Role('main', image={python_image()!r}, entrypoint='true')])\n"
            "info = get_runner().dryrun(app, 'docker_jobs', {}, workspace=sys.argv[1])\n"
            "print(repr(info.request))\n"
            "assert 'docker' not in sys.modules, 'the dry-run imported docker'\n")
    p = _in_home(str(home), code, str(ws))
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0 and '"workspace": "' + str(ws) in out, out
    assert _listing(str(home)) == listed and _daemon_objects() == before


def test_request_and_logs_are_private_from_creation(tmp_path: Any) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    code = ("import sys; from torchx.runner import get_runner; from torchx.specs import AppDef, Role\n"
            f"r = Role('main', image={python_image()!r}, entrypoint='true', env={{'TOKEN': 'txe-secret-42'}})\n"
            "print(get_runner().run(AppDef('modes', roles=[r]), 'docker_jobs', {}), flush=True)\n")
    p = _in_home(str(home), code)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 0, out
    app = app_id(out.strip().splitlines()[-1])
    sched_dir = home / "docker_jobs"
    request = sched_dir / f"{app}.request.json"
    assert "txe-secret-42" in request.read_text()
    deadline = time.time() + 10
    while not list(sched_dir.glob("watcher-*.log")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(sched_dir.glob("watcher-*.log")) and os.stat(sched_dir).st_mode & 0o777 == 0o700
    files = [x for x in sched_dir.rglob("*")]  # the request, the watcher's log, lock and requests
    assert files and {f.name: f.stat().st_mode & 0o777 for f in files} == {
        f.name: 0o700 if f.is_dir() else 0o600 for f in files}


def test_many_apps_one_watcher_heals_all_and_a_failing_replica_restarts_once(runner: Runner, tmp_path: Any) -> None:
    """Issue 24: the apps of one home are watched by one process; killed, a status query starts one
    again, which takes over every app's lease at once (its predecessor is proven dead by the home's
    lock) and restarts a replica that fails afterwards exactly once."""
    from torchx_ext.schedulers.docker_jobs import lease as leases
    from torchx_ext.schedulers.docker_jobs import watching

    busybox = require_backend("TORCHX_EXT_TEST_DOCKER_BUSYBOX", "Docker busybox image")
    flaky = Role("main", image=busybox, entrypoint="sh", max_retries=1, retry_policy="REPLICA", args=[
        "-c", 'echo ATTEMPT $TORCHX_EXT_ATTEMPT; if [ "$TORCHX_EXT_ATTEMPT" = 1 ]; then '
              "while [ ! -e /m/go ]; do sleep 0.1; done; exit 3; fi; sleep 300"],
        mounts=[BindMount(str(tmp_path), "/m")])
    handles = [runner.run(AppDef(f"many{i}", roles=[Role("main", image=busybox, entrypoint="sleep", args=["300"])]),
                          "docker_jobs", {"stop_timeout": 1}) for i in range(9)]
    handles.append(runner.run(AppDef("flaky", roles=[flaky]), "docker_jobs", {"stop_timeout": 1}))
    for h in handles:
        wait_state(runner, h, AppState.RUNNING, 60)
    first = wait_watchers(1)
    api = d.client()

    def holders() -> set[str]:
        vols = [v for h in handles for v in
                api.volumes(filters={"label": [f"{leases.L_LEASE}={app_id(h)}"]}).get("Volumes") or []]
        return {v["Labels"][leases.L_HOLDER] for v in vols} if len(vols) >= len(handles) else set()

    deadline = time.time() + 10
    while holders() != {watching.current_holder()} and time.time() < deadline:
        time.sleep(0.1)
    old = watching.current_holder()
    assert holders() == {old}  # the one watcher process holds every app's lease
    os.kill(first[0], signal.SIGKILL)
    wait_watchers(0)
    assert runner.status(handles[0]).state == AppState.RUNNING  # heals: the home's watcher again
    second = wait_watchers(1)
    assert second != first
    deadline = time.time() + 5  # far less than the lease's TTL: taken over at once
    while holders() != {watching.current_holder()} and time.time() < deadline:
        time.sleep(0.1)
    assert holders() == {watching.current_holder()} and watching.current_holder() != old
    (tmp_path / "go").write_text("")
    deadline = time.time() + 30
    while (st := runner.status(handles[-1])) and st.num_restarts < 1 and time.time() < deadline:
        time.sleep(0.1)
    wait_state(runner, handles[-1], AppState.RUNNING, 30)
    time.sleep(1.0)  # a second restart, if any, would have happened by now
    attempts = sorted(c["Labels"][d.L_ATTEMPT] for c in api.containers(all=True, filters=d.app_filter(app_id(handles[-1]))))
    assert attempts == ["1", "2"], attempts
    assert all(runner.status(h).state == AppState.RUNNING for h in handles)
    assert watcher_pids(".") == second
    for h in handles:
        runner.cancel(h)
