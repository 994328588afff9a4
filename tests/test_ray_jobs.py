"""``ray_jobs`` against the real Ray head of ``testbed/ray.sh``: the shared contract, the CLI end to
end from new processes, a server/client group, env forwarding with masking, working_dir upload,
dependencies with the submitter gone, an unreachable dashboard, and the head killed mid-job.

The head-killing test runs last in this module and restarts the head for whatever follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any, Iterator, Optional

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

from conftest import ROOT, live_processes, require_backend
from contract import TERMINAL, Backend, SchedulerContract, free_port, logs, wait_state, wait_terminal
from torchx_ext.errors import SchedulerUnavailable
from torchx_ext.groups import mark_service
from torchx_ext.schedulers.ray_jobs.client import make_app_id
from torchx_ext.schedulers.ray_jobs.scheduler import create_scheduler

TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
SMALL = Resource(cpu=1, gpu=0, memMB=128)
TIMEOUT = 90.0
DEAD_DASHBOARD = "http://127.0.0.1:9"


def dashboard() -> str:
    return require_backend("TORCHX_EXT_TEST_RAY_DASHBOARD", "Ray head")


def sid(handle: str) -> str:
    return handle.rsplit("~", 1)[-1]


def app_processes(handle: str) -> list[int]:
    """PIDs of this app's driver and replicas (found by their marker env / argv)."""
    app_id = handle.rsplit("/", 1)[-1]
    driver = f"ray_jobs_cluster.driver\0--app\0{sid(handle)}\0".encode()
    return live_processes((f"TORCHX_EXT_APP_ID={app_id}\0".encode(),), (driver,))


def nothing_running(handle: str) -> bool:
    deadline = time.time() + 15  # Ray reaps a stopped job's processes asynchronously
    while app_processes(handle) and time.time() < deadline:
        time.sleep(0.3)
    return not app_processes(handle)


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


class TestRayJobsContract(SchedulerContract):
    @pytest.fixture
    def backend(self) -> Backend:
        return Backend(scheduler="ray_jobs", image="", python=sys.executable,
                       cfg={"dashboard_url": dashboard()}, resource=SMALL, timeout=TIMEOUT,
                       nothing_running=nothing_running,
                       missing_app_id=make_app_id(dashboard(), "no-such-app-42"),
                       # nothing listens on 127.0.0.1:9: every Jobs API call fails
                       broken_cfg={"dashboard_url": DEAD_DASHBOARD, "request_timeout_s": 3},
                       broken_env={"RAY_ADDRESS": DEAD_DASHBOARD},
                       broken_app_id=make_app_id(DEAD_DASHBOARD, "no-such-app-42"), retries=True)


# ------------------------------------------------------------------------------ helpers -----
def role(name: str, code: str, *args: str, **kw: object) -> Role:
    return Role(name=name, image="", entrypoint=sys.executable, args=["-c", code, *args],
                resource=kw.pop("resource", SMALL), **kw)  # type: ignore[arg-type]


def cli(*args: str, cwd: str = "/tmp", env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    if args[:1] == ("run",) and "--workspace" not in args:
        args = ("run", "--workspace", "", *args[1:])  # TorchX's way to run without a workspace
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def cli_handle(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("ray_jobs://"))


def cli_state(handle: str) -> str:
    out = cli("status", handle)
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("State:"))


def cli_wait(handle: str, want: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = cli_state(handle)
        if state == want:
            return
        assert state not in {"SUCCEEDED", "FAILED", "CANCELLED"} - {want}, f"{handle}: {state}"
        time.sleep(0.5)
    raise AssertionError(f"{handle} never reached {want}; last {state}")


# ------------------------------------------------------------------------------ CLI ---------
def test_cli_end_to_end(tmp_path: str) -> None:
    """run, status from a new process, log (per replica and the driver), list, cancel."""
    cfg = f"dashboard_url={dashboard()}"
    out = cli("run", "-s", "ray_jobs", "-cfg", cfg, "utils.echo", "--msg", "hello from ray_jobs", cwd=str(tmp_path))
    handle = cli_handle(out)
    cli_wait(handle, "SUCCEEDED")
    log = cli("log", f"{handle}/echo/0")
    assert log.returncode == 0, log.stderr
    assert "hello from ray_jobs" in log.stdout
    assert "Running entrypoint" not in log.stdout  # Ray's own lines belong to the driver log
    driver = cli("log", f"{handle}/ray-driver/0")
    assert "app SUCCEEDED" in driver.stdout, driver.stdout + driver.stderr
    sleeper = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", cfg, "utils.sh", "sleep", "600", cwd=str(tmp_path)))
    cli_wait(sleeper, "RUNNING")
    listed = cli("list", "-s", "ray_jobs")  # no -cfg: the clusters this user submitted to
    assert listed.returncode == 0, listed.stderr
    assert handle.rsplit("/", 1)[-1] in listed.stdout and sid(sleeper) in listed.stdout
    assert listed.stdout.index(sid(sleeper)) < listed.stdout.index(handle.rsplit("/", 1)[-1]), "not the newest first"
    assert cli("cancel", sleeper).returncode == 0
    cli_wait(sleeper, "CANCELLED")
    assert cli("cancel", sleeper).returncode == 0  # idempotent
    assert nothing_running(sleeper)


def test_dryrun_masks_forwarded_env_and_imports_no_ray(tmp_path: str) -> None:
    code = (
        "import sys; from torchx.runner import get_runner; from torchx.specs import AppDef, Role\n"
        "app = AppDef('dry', roles=[Role('main', image='', entrypoint='python', args=['-c', 'pass'])])\n"
        f"info = get_runner().dryrun(app, 'ray_jobs', {{'dashboard_url': {dashboard()!r}, 'env_forward': ['MY_SECRET']}})\n"
        "print(info)\n"
        "print('RAY IMPORTED' if 'ray' in sys.modules else 'NO RAY')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "MY_SECRET": "s3cr3t-value"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "NO RAY" in out.stdout
    assert "s3cr3t-value" not in out.stdout + out.stderr
    assert '"MY_SECRET": "****"' in out.stdout


def test_env_forwarding_reaches_replicas_masked_everywhere(runner: Runner, tmp_path: str) -> None:
    secret = "tok-$HOME-${USER}-" + os.urandom(6).hex()  # Ray would expand $ in env_vars
    manifest = f"file://{tmp_path}/manifest.jsonl"
    os.environ["TORCHX_EXT_TEST_SECRET"] = secret
    try:
        app = AppDef("fwd", roles=[role("main", "import os; print('LEN', len(os.environ['TORCHX_EXT_TEST_SECRET']))", num_replicas=2)])
        handle = runner.run(app, "ray_jobs", {"dashboard_url": dashboard(), "env_forward": ["TORCHX_EXT_TEST_SECRET"],
                                               "manifest": manifest})
        status = wait_terminal(runner, handle, TIMEOUT)
        assert status.state == AppState.SUCCEEDED, status
        assert f"LEN {len(secret)}" in logs(runner, handle, "main", 1)
        with pytest.raises(Exception, match="NOT_SET_ANYWHERE"):
            runner.dryrun(app, "ray_jobs", {"dashboard_url": dashboard(), "env_forward": ["NOT_SET_ANYWHERE"]})
    finally:
        del os.environ["TORCHX_EXT_TEST_SECRET"]
    with open(f"{tmp_path}/manifest.jsonl") as f:
        text = f.read()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["event"] for r in records] == ["submitted"], records
    assert records[0]["job_id"] == sid(handle)
    assert secret not in text
    assert secret not in logs(runner, handle, "ray-driver")


def test_working_dir_upload_honours_torchxignore(tmp_path: str) -> None:
    (tmp_path / "mymod.py").write_text("VALUE = 'from the workspace'\n")  # type: ignore[operator]
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)  # type: ignore[operator]
    (tmp_path / ".torchxignore").write_text("big.bin\n")  # type: ignore[operator]
    code = "import os, mymod; print(mymod.VALUE, os.path.exists('big.bin'))"
    out = cli("run", "-s", "ray_jobs", "-cfg", f"dashboard_url={dashboard()}", "--workspace", str(tmp_path),
              "utils.python", "-c", code, cwd=str(tmp_path))
    handle = cli_handle(out)
    cli_wait(handle, "SUCCEEDED")
    assert "from the workspace False" in cli("log", f"{handle}/python/0").stdout


def test_dependencies_wait_in_the_cluster_with_submitter_gone(runner: Runner) -> None:
    cfg = f"dashboard_url={dashboard()}"
    first = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", cfg, "utils.sh", "sleep", "3"))
    ok = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", f"{cfg},dependencies={first}", "utils.echo", "--msg", "after first"))
    bad = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", cfg, "utils.sh", "exit", "3"))
    never = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", f"{cfg},dependencies={bad}", "utils.echo", "--msg", "never"))
    chained = cli_handle(cli("run", "-s", "ray_jobs", "-cfg", f"{cfg},dependencies={never}", "utils.echo"))
    # every submitting process has exited; the cluster alone carries on
    assert runner.status(ok).state in (AppState.PENDING, AppState.RUNNING, AppState.SUCCEEDED)
    assert wait_terminal(runner, ok, TIMEOUT).state == AppState.SUCCEEDED
    assert wait_terminal(runner, first, TIMEOUT).state == AppState.SUCCEEDED
    assert "after first" in logs(runner, ok, "echo")
    status = wait_terminal(runner, never, TIMEOUT)
    assert status.state == AppState.FAILED and sid(bad) in status.msg, status
    status = wait_terminal(runner, chained, TIMEOUT)
    assert status.state == AppState.FAILED and sid(never) in status.msg, status
    sched = create_scheduler("test")
    for handle in (ok, chained):  # delete removes the app's jobs (the waiting record too)
        sched.delete(handle.rsplit("/", 1)[-1])
        assert runner.status(handle) is None


def test_cancel_while_waiting_for_dependency(runner: Runner) -> None:
    cfg = {"dashboard_url": dashboard()}
    first = runner.run(AppDef("slow", roles=[role("main", "import time; time.sleep(600)")]), "ray_jobs", cfg)
    second = runner.run(AppDef("waiter", roles=[role("main", "print('must not run')")]), "ray_jobs",
                        {**cfg, "dependencies": [first]})
    third = runner.run(AppDef("after-waiter", roles=[role("main", "print('must not run either')")]), "ray_jobs",
                       {**cfg, "dependencies": [second]})
    assert runner.status(second).state == AppState.PENDING
    assert second in {a.app_handle for a in runner.list("ray_jobs")}
    runner.cancel(second)
    assert wait_terminal(runner, second, 30).state == AppState.CANCELLED
    # a cancelled dependency fails its dependent (the cancel's claim job itself exits 0, SUCCEEDED
    # for Ray: the broker reads the verdict, not Ray's status)
    status = wait_terminal(runner, third, 60)
    assert status.state == AppState.FAILED and sid(second) in status.msg and "stopped" in status.msg, status
    runner.cancel(first)
    assert wait_terminal(runner, first, 30).state == AppState.CANCELLED


def test_status_of_a_waiting_app_restarts_a_killed_broker(runner: Runner) -> None:
    from ray.job_submission import JobSubmissionClient

    from torchx_ext.schedulers.ray_jobs import deps

    cfg = {"dashboard_url": dashboard()}
    first = runner.run(AppDef("first", roles=[role("main", "import time; time.sleep(8)")]), "ray_jobs", cfg)
    second = runner.run(AppDef("second", roles=[role("main", "print('second ran')")]), "ray_jobs",
                        {**cfg, "dependencies": [first]})
    client = JobSubmissionClient(dashboard())

    def brokers() -> list[str]:
        return [j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(
            deps.broker_prefix()) and str(j.status).split(".")[-1] in ("PENDING", "RUNNING")]

    assert brokers(), "submitting a dependent starts a broker"
    for broker in brokers():
        client.stop_job(broker)  # the broker is killed while `second` waits
    deadline = time.time() + 30
    while brokers():
        assert time.time() < deadline, "the broker did not stop"
        time.sleep(0.2)
    # a new process looks at the waiting app: that is enough to start a new broker
    status = get_runner().status(second)
    assert status.state == AppState.PENDING and "started one" in status.msg, status
    assert wait_terminal(runner, second, TIMEOUT).state == AppState.SUCCEEDED
    assert wait_terminal(runner, first, TIMEOUT).state == AppState.SUCCEEDED
    assert "second ran" in logs(runner, second, "main")


def test_unplaceable_gang_fails_naming_missing_resources(runner: Runner) -> None:
    app = AppDef("huge", roles=[role("main", "pass", num_replicas=2, resource=Resource(cpu=1, gpu=0, memMB=128,
                                                                                   capabilities={"sandbox": 3}))])
    cfg = {"dashboard_url": dashboard(), "placement_timeout_s": 3}
    with pytest.raises(Exception, match="no-such-label"):  # preflight: no node has the label
        runner.run(AppDef("nolabel", roles=[role("main", "pass")]), "ray_jobs",
                   {**cfg, "label_selector": {"testbed": "no-such-label"}})
    cfg["placement_timeout_s"] = 8
    handle = runner.run(app, "ray_jobs", cfg)  # each replica fits a node, the pair does not
    seen = []  # while the driver waits for the placement group, the app and its replicas are PENDING
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and (not seen or seen[-1].state not in (
            AppState.FAILED, AppState.SUCCEEDED, AppState.CANCELLED)):
        seen.append(runner.status(handle))
        time.sleep(0.2)
    waiting = [s for s in seen if "placement group" in s.msg]
    assert waiting and all(s.state == AppState.PENDING for s in waiting), seen
    assert all(r.state == AppState.PENDING for s in waiting for r in s.roles[0].replicas), waiting
    status = seen[-1]
    assert status.state == AppState.FAILED, status
    assert "could not be placed within 8 s" in status.msg and "sandbox" in status.msg, status.msg


def test_cancel_of_a_job_ray_cannot_place(runner: Runner) -> None:
    # Ray keeps a stopped job PENDING while its entrypoint resources cannot be found (15 min)
    app = AppDef("unplaceable", roles=[role("main", "pass", resource=Resource(cpu=1, gpu=0, memMB=128,
                                                                               capabilities={"sandbox": 5}))])
    handle = runner.run(app, "ray_jobs", {"dashboard_url": dashboard(), "preflight": False})
    assert runner.status(handle).state == AppState.PENDING
    runner.cancel(handle)
    assert runner.status(handle).state == AppState.CANCELLED
    with pytest.raises(Exception, match="sandbox"):  # with preflight: refused, saying what is missing
        runner.run(app, "ray_jobs", {"dashboard_url": dashboard()})


def test_a_cancel_whose_stop_never_reaches_the_driver_still_ends_the_app(runner: Runner) -> None:
    """A cancel of a PENDING job writes a marker besides Ray's stop; if the stop is lost (Ray
    signals only the processes it saw at that instant), the driver reads the marker and ends
    itself and its replicas. Simulated here: the marker alone, no stop."""
    from torchx_ext.schedulers.ray_jobs import client as rc

    code = ("import subprocess, sys, time; print('up', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)")
    handle = runner.run(AppDef("lost-stop", roles=[role("main", code)]), "ray_jobs", {"dashboard_url": dashboard()})
    wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
    client = create_scheduler("t")._client(dashboard())
    assert rc.claim(client, sid(handle) + "--cancelled", {"torchx_ext_kind": "cancel-marker"})
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.CANCELLED, status
    assert nothing_running(handle), app_processes(handle)


def test_a_replica_whose_actor_is_killed_is_restarted_in_its_bundle(runner: Runner) -> None:
    """SIGKILL of the Ray worker running a gang replica (as a lost node does to it): the driver
    counts an attempt and starts the replica again in a new actor on the same bundle."""
    code = ("import os, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; "
            "print('PPID', os.getppid(), a, flush=True); "
            "time.sleep(600) if a == '1' and os.environ['TORCHX_EXT_REPLICA_ID'] == '0' else sys.exit(0)")
    app = AppDef("lost-actor", roles=[role("main", code, num_replicas=2, max_retries=1, retry_policy="REPLICA")])
    handle = runner.run(app, "ray_jobs", {"dashboard_url": dashboard()})
    deadline = time.time() + TIMEOUT
    while not (lines := [x for x in logs(runner, handle, "main", 0).splitlines() if x.startswith("PPID ")]):
        assert time.time() < deadline, runner.status(handle)
        time.sleep(0.2)
    os.kill(int(lines[0].split()[1]), 9)  # the actor's worker process
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    assert "its Ray actor was lost" in logs(runner, handle, "main", 0)


def counting_client(seen: list[str]) -> Any:
    """A client factory whose clients note the endpoint of every Jobs API request they make."""
    from torchx_ext.schedulers.ray_jobs import adapter

    def factory(url: str, token_env: Optional[str], timeout: float) -> Any:
        client = adapter.connect(url, token_env, timeout)
        real = client._do_request

        def do(method: str, endpoint: str, **kw: Any) -> Any:
            seen.append(endpoint)
            return real(method, endpoint, **kw)

        client._do_request = do
        return client
    return factory


def test_following_a_replica_to_the_end_yields_every_line_once_in_order(runner: Runner) -> None:
    """A follow of a gang replica while it writes 20000 numbered lines, beside another replica
    writing as much: each of its lines once, in order, through Ray's log tail (the whole log is
    never asked for, as it was on every poll before)."""
    code = ("import os, sys, time; k = os.environ['TORCHX_EXT_REPLICA_ID']\n"
            "for b in range(20):\n"
            "    for i in range(b * 1000, (b + 1) * 1000): print(k, '%05d' % i, 'y' * 40)\n"
            "    sys.stdout.flush(); time.sleep(0.1)")
    handle = runner.run(AppDef("follow", roles=[role("w", code, num_replicas=2)]), "ray_jobs",
                        {"dashboard_url": dashboard()})
    seen: list[str] = []
    sched = create_scheduler("t", client_factory=counting_client(seen))
    lines = list(sched.log_iter(handle.rsplit("/", 1)[-1], "w", 1, should_tail=True))
    assert lines == [f"1 {i:05d} {'y' * 40}\n" for i in range(20000)], (len(lines), lines[:2], lines[-2:])
    assert f"/api/jobs/{sid(handle)}/logs" not in seen, seen
    assert wait_terminal(runner, handle, TIMEOUT).state == AppState.SUCCEEDED
    # a follow of an app that ended reads its log once, and the regex/since/until filters still apply
    assert len(list(runner.log_lines(handle, "w", 0, should_tail=True))) == 20000
    assert list(runner.log_lines(handle, "w", 0, regex="^0 19999 ", should_tail=True)) == [f"0 19999 {'y' * 40}\n"]
    from datetime import datetime, timedelta

    assert not list(runner.log_lines(handle, "w", 0, since=datetime.now() + timedelta(hours=1)))


def test_describe_of_a_running_app_reports_its_restarts_without_reading_its_log(runner: Runner) -> None:
    code = ("import os, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; print('ATTEMPT', a, flush=True); "
            "sys.exit(1) if a == '1' else time.sleep(600)")
    app = AppDef("restarts", roles=[role("main", code, num_replicas=2, max_retries=2, retry_policy="REPLICA")])
    handle = runner.run(app, "ray_jobs", {"dashboard_url": dashboard()})
    seen: list[str] = []
    sched = create_scheduler("t", client_factory=counting_client(seen))
    app_id = handle.rsplit("/", 1)[-1]
    deadline = time.time() + TIMEOUT
    while (status := sched.describe(app_id)) is not None and status.num_restarts < 2:
        assert time.time() < deadline and status.state not in {AppState.FAILED, AppState.SUCCEEDED}, status
        time.sleep(0.3)
    assert status is not None and status.state == AppState.RUNNING and status.num_restarts == 2, status
    assert not [e for e in seen if e.endswith("/logs")], seen  # the job log is never read for it
    runner.cancel(handle)
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.CANCELLED and status.num_restarts == 2, status


def test_describe_shows_the_replicas_held_for_a_service_pending(runner: Runner) -> None:
    """Ray has the job RUNNING while the client waits for a server that never listens: describe
    shows the server RUNNING and the client PENDING (published by the driver), then the verdict."""
    server = mark_service(role("server", "import time; time.sleep(600)"))
    server.port_map = {"http": free_port()}  # never listened on
    app = AppDef("held", roles=[server, role("client", "print('client ran')")])
    handle = runner.run(app, "ray_jobs", {"dashboard_url": dashboard(), "ready_timeout_s": 8.0})
    deadline = time.time() + TIMEOUT
    while True:
        status = runner.status(handle)
        assert status is not None and status.state not in TERMINAL and time.time() < deadline, status
        states = [rs.replicas[0].state for rs in status.roles]
        if status.state == AppState.RUNNING and states == [AppState.RUNNING, AppState.PENDING]:
            break
        time.sleep(0.3)
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.FAILED and "service role 'server' replica 0 was not ready" in status.msg, status
    assert nothing_running(handle)


def test_unreachable_dashboard_is_one_clear_error() -> None:
    out = cli("run", "-s", "ray_jobs", "-cfg", "dashboard_url=http://127.0.0.1:9,request_timeout_s=3", "utils.echo")
    assert out.returncode != 0
    assert "unreachable" in out.stderr and "127.0.0.1:9" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_zz_head_killed_mid_job(runner: Runner) -> None:
    """Runs last: kills GCS and dashboard under a running app, then restarts the head."""
    handle = runner.run(AppDef("victim", roles=[role("main", "import time; print('up', flush=True); time.sleep(600)")]),
                        "ray_jobs", {"dashboard_url": dashboard(), "lost_contact_s": 2})
    wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
    script = os.path.join(ROOT, "testbed", "ray.sh")
    try:
        subprocess.run(["bash", script, "kill-head"], check=True, timeout=60)
        deadline = time.time() + 30  # SIGKILLed processes take a moment to let go of their sockets
        while subprocess.run(["bash", script, "status"]).returncode == 0 and time.time() < deadline:
            time.sleep(0.2)
        out = cli("status", handle)
        assert "UNKNOWN" in out.stdout and "unreachable" in out.stdout, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        for args in (("log", f"{handle}/main/0"), ("cancel", handle)):
            out = cli(*args)
            assert out.returncode != 0, (args, out.stdout, out.stderr)
            assert "unreachable" in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        # UNKNOWN (above) until the dashboard has been away for lost_contact_s, counted from the
        # first failure any process saw; then a wait ends saying so instead of polling forever
        time.sleep(2.5)
        with pytest.raises(SchedulerUnavailable, match="lost_contact_s=2.*given up on here"):
            runner.wait(handle, wait_interval=0.5)
        # no replica runs on unowned: once Ray's job supervisor is gone (the raylet took it
        # along), the driver stops its replicas, and the watchdogs sweep what they started
        marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
        deadline = time.time() + 90
        while live_processes((marker,)):
            assert time.time() < deadline, f"the app's processes outlived the head: {live_processes((marker,))}"
            time.sleep(0.5)
    finally:
        env = {**os.environ, "VENV": os.path.dirname(os.path.dirname(sys.executable))}
        subprocess.run(["bash", script, "stop"], timeout=120, env=env)
        subprocess.run(["bash", script, "start"], check=True, timeout=180, env=env, capture_output=True)
        with open(os.path.join(ROOT, "testbed", ".state", "ray.env")) as f:
            for line in f:
                key, _, value = line.split(" ", 1)[1].strip().partition("=")
                os.environ[key] = value


def test_engine_answers_are_read_by_type_where_ray_gives_one() -> None:
    """A missing job is told by HTTP 404 (even when its id holds "404"); a taken submission id
    only by Ray's text, read in one function, checked here against the real dashboard."""
    from torchx_ext.schedulers.ray_jobs import adapter, cluster
    from torchx_ext.schedulers.ray_jobs import client as rc

    client = adapter.connect(dashboard())
    assert rc.get_job(client, f"no-such-job-404-{uuid.uuid4().hex[:6]}") is None
    taken = f"txe-taken-{uuid.uuid4().hex[:8]}"
    assert rc.claim(client, taken, {"torchx_ext_kind": "test"})
    with pytest.raises(RuntimeError) as raised:
        client.submit_job(entrypoint="exit 0", submission_id=taken)
    assert cluster.already_exists(raised.value), raised.value
    assert not rc.claim(client, taken, {"torchx_ext_kind": "test"})
    with pytest.raises(RuntimeError) as other:  # another refusal of the dashboard's
        client.stop_job(f"no-such-job-{uuid.uuid4().hex[:6]}")
    assert not cluster.already_exists(other.value), other.value
    rc.delete_jobs(client, [taken])
