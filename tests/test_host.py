"""``host`` beyond the shared contract: the CLI from new processes, concurrency, workspaces,
TorchX built-in components, GPU assignment, dry-runs, a killed supervisor, reused pids and the
modes of what it writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pytest
from torchx.runner import get_runner
from torchx.specs import AppDef, AppState, Resource, Role

from contract import wait_state, wait_terminal
from torchx_ext import state
from torchx_ext.components.group import roles, server_client
from torchx_ext.errors import InvalidAppError
from torchx_ext.schedulers.host import procs
from torchx_ext.schedulers.host.scheduler import assign_gpus, create_scheduler

TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
PY = sys.executable


def cli(*args: str, cwd: str | None = None, timeout: float = 120,
        env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def handle_of(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("host://"))


def cli_wait(handle: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = cli("status", handle)
        for final in ("SUCCEEDED", "FAILED", "CANCELLED"):
            if f"State: {final}" in out.stdout:
                return final
        time.sleep(0.3)
    raise AssertionError(f"{handle} did not finish: {out.stdout}")


def test_cli_run_returns_while_the_app_runs_and_state_survives_the_process(tmp_path: str) -> None:
    out = cli("run", "-s", "host", "utils.sh", "sh", "-c", "sleep 5; echo done-$TORCHX_EXT_ROLE $TORCHX_JOB_ID", cwd=str(tmp_path))
    handle = handle_of(out)
    status = cli("status", handle)  # a brand-new process; not over yet: `run` did not wait for it
    assert "State: RUNNING" in status.stdout or "State: PENDING" in status.stdout or "SUBMITTED" in status.stdout, status.stdout
    assert cli_wait(handle) == "SUCCEEDED"
    log = cli("log", handle)
    assert f"done-sh {handle}" in log.stdout, log.stdout + log.stderr  # macros substituted
    listed = cli("list", "-s", "host")
    assert handle in listed.stdout


def test_cli_cancel_kills_the_whole_tree(tmp_path: str) -> None:
    # the replica starts a grandchild; cancel must take it down too
    out = cli("run", "-s", "host", "utils.sh", "sh", "-c", "sleep 300 & echo $! > child.pid; wait", cwd=str(tmp_path))
    handle = handle_of(out)
    pidfile = os.path.join(str(tmp_path), "child.pid")
    deadline = time.time() + 20
    while not os.path.exists(pidfile) or not open(pidfile).read().strip():
        assert time.time() < deadline
        time.sleep(0.1)
    child = int(open(pidfile).read())
    assert procs.pid_alive(child)
    assert cli("cancel", handle).returncode == 0
    assert cli_wait(handle) == "CANCELLED"
    deadline = time.time() + 10
    while procs.pid_alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not procs.pid_alive(child), "grandchild survived cancel"
    assert cli("cancel", handle).returncode == 0  # idempotent


def test_cli_wait_and_dryrun_shows_services(tmp_path: str) -> None:
    dry = cli("run", "--dryrun", "-s", "host", "group.server_client", "--server", "sleep 60",
              "--client", "echo hi", cwd=str(tmp_path))
    assert dry.returncode == 0, dry.stderr
    assert '"service": true' in dry.stdout and '"service": false' in dry.stdout, dry.stdout
    run = cli("run", "--wait", "-s", "host", "group.server_client", "--server", "sleep 60",
              "--client", "echo hi", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "SUCCEEDED" in run.stdout + run.stderr


def test_builtin_components_run_unchanged(tmp_path: str) -> None:
    out = cli("run", "--wait", "--log", "-s", "host", "utils.echo", "--msg", "hello-builtin", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "hello-builtin" in out.stdout + out.stderr


def test_dist_ddp_runs_with_a_cpu_backend(tmp_path: str) -> None:
    pytest.importorskip("torch", reason="torch is installed by test.sh (CPU build)")
    script = os.path.join(str(tmp_path), "train.py")
    with open(script, "w") as f:
        f.write(
            "import os, torch, torch.distributed as dist\n"
            "dist.init_process_group('gloo')\n"
            "t = torch.ones(1) * (dist.get_rank() + 1)\n"
            "dist.all_reduce(t)\n"
            "print('RANK', dist.get_rank(), 'SUM', int(t.item()), flush=True)\n"
            # without it torch 2.13's gloo threads may abort the interpreter at exit
            # ("terminate called without an active exception"), after the work is done
            "dist.destroy_process_group()\n"
        )
    out = cli("run", "--wait", "-s", "host", "dist.ddp", "-j", "1x2", "--script", "train.py",
              cwd=str(tmp_path), timeout=300)
    handle = next(line for line in out.stdout.splitlines() if line.startswith("host://"))
    # on failure show what torchrun printed: the AppStatus alone does not say why it exited
    assert out.returncode == 0, out.stdout + out.stderr + cli("log", handle).stdout
    log = cli("log", handle)
    assert "SUM 3" in log.stdout, log.stdout + log.stderr


def test_workspace_runs_in_a_copy_honouring_torchxignore(tmp_path: str) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(os.path.join(ws, "skipme"))
    with open(os.path.join(ws, "data.txt"), "w") as f:
        f.write("from-workspace\n")
    with open(os.path.join(ws, "skipme", "x"), "w") as f:
        f.write("x")
    with open(os.path.join(ws, ".torchxignore"), "w") as f:
        f.write("skipme\n")
    out = cli("run", "--wait", "-s", "host", "--workspace", ws, "utils.sh",
              "sh", "-c", "cat data.txt; pwd; ls skipme 2>&1 || echo no-skipme", cwd=str(tmp_path))
    handle = handle_of(out)
    log = cli("log", handle).stdout
    assert "from-workspace" in log and "no-skipme" in log, log
    assert ws not in log.split("from-workspace", 1)[1], "ran in the workspace itself, not a copy"


def test_eight_concurrent_submissions_do_not_corrupt_state(tmp_path: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: cli("run", "-s", "host", "utils.echo", "--msg", f"m{i}", cwd=str(tmp_path)), range(8)))
    handles = [handle_of(o) for o in outs]
    assert len(set(handles)) == 8
    runner = get_runner()
    for h in handles:
        assert wait_terminal(runner, h, 60).state == AppState.SUCCEEDED
    listed = {a.app_handle for a in runner.list("host")}
    assert set(handles) <= listed


def test_log_streams_since_until_and_tail(tmp_path: str) -> None:
    runner = get_runner()
    code = "import sys, time; print('out1', flush=True); print('err1', file=sys.stderr, flush=True); time.sleep(1.5); print('out2', flush=True)"
    app = AppDef("logs", roles=[Role("main", image=str(tmp_path), entrypoint=PY, args=["-c", code])])
    handle = runner.run(app, "host", {})
    tailed = "".join(runner.log_lines(handle, "main", 0, should_tail=True))  # returns when the app ends
    assert "out1" in tailed and "err1" in tailed and "out2" in tailed
    from torchx.schedulers.api import Stream

    assert "err1" not in "".join(runner.log_lines(handle, "main", 0, streams=Stream.STDOUT))
    assert "out1" not in "".join(runner.log_lines(handle, "main", 0, streams=Stream.STDERR))
    from datetime import datetime, timedelta

    future = datetime.now() + timedelta(hours=1)
    assert "".join(runner.log_lines(handle, "main", 0, since=future)) == ""
    past = datetime.now() - timedelta(hours=1)
    assert "".join(runner.log_lines(handle, "main", 0, until=past)) == ""


def test_killed_supervisor_is_reported_and_cancel_still_cleans_up(tmp_path: str) -> None:
    runner = get_runner()
    app = AppDef("orphan", roles=[Role("main", image=str(tmp_path), entrypoint="sleep", args=["300"])])
    handle = runner.run(app, "host", {})
    app_id = handle.rsplit("/", 1)[-1]
    state_file = os.path.join(state.home(), "host", app_id, "state.json")
    deadline = time.time() + 20
    while (state.read_json(state_file) or {}).get("state") != "RUNNING":
        assert time.time() < deadline
        time.sleep(0.1)
    st = state.read_json(state_file)
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    time.sleep(0.5)
    status = runner.status(handle)
    # not FAILED yet: its replica still runs, and TorchX's cancel skips an app in a terminal state
    assert status.state == AppState.UNKNOWN and "is gone" in status.msg and "still run" in status.msg, status
    replica_pid = st["replicas"]["main/0"]["pid"]
    assert procs.pid_alive(replica_pid)  # orphaned, still running: cancel is how the user stops it
    runner.cancel(handle)
    # its outcome was the supervisor's loss: FAILED, and the cancel stopped the orphaned replica
    after = runner.status(handle)
    assert after.state == AppState.FAILED and "a cancel stopped what was left" in after.msg, after
    time.sleep(0.3)
    assert not procs.pid_alive(replica_pid)
    # the logs are kept
    assert os.path.isdir(os.path.join(state.home(), "host", app_id, "logs", "main", "0"))


def test_a_supervisor_that_crashes_stops_the_replicas_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in the supervisor, after its replicas started: FAILED saying so, no
    replica (nor a child of one) left running, the traceback kept in supervisor.log."""
    from conftest import live_processes

    crasher = ("import sys, time, torchx_ext.schedulers.host.supervisor as s\n"
               "first = []\n"
               "def crash(self):\n"
               "    first.append(time.time())\n"
               "    if time.time() - first[0] > 3:  # once the replicas and their children run\n"
               "        raise RuntimeError('injected crash')\n"
               "    return False\n"
               "s.Supervisor._poll_exits = crash\n"
               "sys.exit(s.main(sys.argv))\n")
    real_popen = subprocess.Popen

    def popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        if cmd[1:3] == ["-m", "torchx_ext.schedulers.host.supervisor"]:
            cmd = [cmd[0], "-c", crasher, *cmd[3:]]
        return real_popen(cmd, *args, **kwargs)  # type: ignore[call-overload, no-any-return]

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"
    app = AppDef("crash", roles=[Role("main", image=".", entrypoint=sys.executable, args=["-c", code], num_replicas=2)])
    runner = get_runner()
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", popen)
        handle = runner.run(app, "host", {})
    marker = f"TORCHX_EXT_APP_ID={handle.rsplit('/', 1)[-1]}\0".encode()
    deadline = time.time() + 3
    while len(live_processes((marker,))) < 4:  # two replicas and a child of each
        assert time.time() < deadline, f"replicas and children never all ran: {live_processes((marker,))}"
        time.sleep(0.05)
    status = wait_terminal(runner, handle, 30)
    assert status.state == AppState.FAILED and "supervisor crashed" in status.msg, status
    deadline = time.time() + 10
    while live_processes((marker,)):
        assert time.time() < deadline, f"replicas outlived their supervisor: {live_processes((marker,))}"
        time.sleep(0.1)
    with open(os.path.join(state.home(), "host", handle.rsplit("/", 1)[-1], "supervisor.log")) as f:
        assert "injected crash" in f.read()


def test_invalid_apps_get_one_readable_error() -> None:
    runner = get_runner()
    bad = AppDef("bad", roles=[Role("a-b", image=".", entrypoint="x"),
                               Role("a_b", image=".", entrypoint="x", env={"BAD NAME": "1"})])
    with pytest.raises(InvalidAppError) as e:
        runner.dryrun(bad, "host", {})
    msg = str(e.value)
    assert "TORCHX_EXT_HOSTS_A_B" in msg and "'BAD NAME'" in msg, msg
    with pytest.raises(InvalidAppError, match="at least one role must not be a service"):
        runner.dryrun(server_client("a", "b").__class__("svc", roles=[server_client("a", "b").roles[0]]), "host", {})


def test_cli_errors_are_one_line_and_nonzero(tmp_path: str) -> None:
    out = cli("run", "-s", "host", "-cfg", "dependencies=host://x/does-not-exist-1", "utils.echo", cwd=str(tmp_path))
    assert out.returncode != 0
    assert "does-not-exist-1" in out.stderr


def test_gpu_assignment_in_order() -> None:
    app = AppDef("g", roles=[
        Role("a", image=".", entrypoint="x", num_replicas=2, resource=Resource(cpu=1, gpu=2, memMB=1)),
        Role("b", image=".", entrypoint="x", resource=Resource(cpu=1, gpu=1, memMB=1)),
        Role("c", image=".", entrypoint="x", resource=Resource(cpu=1, gpu=0, memMB=1)),
    ])
    assert assign_gpus(app, 5) == {("a", 0): "0,1", ("a", 1): "2,3", ("b", 0): "4"}
    with pytest.raises(InvalidAppError, match="asks for 5 GPUs .* has 4"):
        assign_gpus(app, 4)
    info = get_runner().dryrun(app, "host", {"auto_set_cuda_visible_devices": True, "gpu_count": 5})
    envs = {(r.role, r.replica_id): r.env.get("CUDA_VISIBLE_DEVICES") for r in info.request.replicas}
    assert envs[("a", 1)] == "2,3" and envs[("c", 0)] is None


def test_roles_component_parses_commands_with_shell_quoting() -> None:
    app = roles("server=python3 -m http.server 8000", "client=sh -c 'echo \"$X\" a b'",
                services="server", replicas="client=3")
    server, client = app.roles
    assert server.entrypoint == "python3" and server.args == ["-m", "http.server", "8000"]
    assert client.args == ["-c", 'echo "$X" a b'] and client.num_replicas == 3
    assert server.metadata["torchx_ext/service"] and not client.metadata["torchx_ext/service"]
    with pytest.raises(ValueError, match="unknown role"):
        roles("a=x", services="b")
    dry = json.loads(repr(get_runner().dryrun(app, "host", {}).request))
    assert [r["service"] for r in dry["replicas"]] == [True, False, False, False]


def test_cancel_right_after_run_is_cancelled_and_leaves_nothing(tmp_path: str) -> None:
    from conftest import live_processes

    runner = get_runner()
    for delay in (0.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3):  # while the supervisor starts, and after
        app = AppDef("early", roles=[Role("main", image=str(tmp_path), entrypoint="sh",
                                          args=["-c", "sleep 60 & sleep 60"], num_replicas=2)])
        handle = runner.run(app, "host", {})
        time.sleep(delay)
        runner.cancel(handle)
        status = wait_terminal(runner, handle, 30)
        assert status.state == AppState.CANCELLED, (delay, status)
        app_id = handle.rsplit("/", 1)[-1]
        deadline = time.time() + 10  # replicas (and their children) are killed by process group
        while live_processes((f"TORCHX_EXT_APP_ID={app_id}\0".encode(),), (app_id.encode(),)):
            assert time.time() < deadline, f"processes of {app_id} outlived its cancel (delay {delay})"
            time.sleep(0.1)
    runner.close()


def test_a_replica_killed_from_outside_is_a_failed_attempt_under_its_policy() -> None:
    # `kill -9` of a running replica (as the OOM killer would): restarted in its slot
    code = ("import os, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; print('PID', os.getpid(), flush=True); "
            "time.sleep(600) if a == '1' else sys.exit(0)")
    runner = get_runner()
    role = Role("main", image=os.getcwd(), entrypoint=sys.executable, args=["-c", code], max_retries=1)
    handle = runner.run(AppDef("killed", roles=[role]), "host", {})
    deadline = time.time() + 60
    while not (pids := [x for x in "".join(runner.log_lines(handle, "main", 0)).splitlines() if x.startswith("PID ")]):
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(int(pids[0].split()[1]), signal.SIGKILL)
    status = wait_terminal(runner, handle, 60)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    log = "".join(runner.log_lines(handle, "main", 0))
    assert "ended with signal SIGKILL; APPLICATION policy, restart 1 of 1" in log, log


# ---------------------------------------------------------------- a pid is not an identity ----
def _running_app(tmp_path: str, name: str) -> tuple[str, str, dict[str, Any]]:
    """Starts a one-replica app that sleeps; returns its handle, state.json path and the record
    once it runs."""
    runner = get_runner()
    app = AppDef(name, roles=[Role("main", image=str(tmp_path), entrypoint="sleep", args=["300"])])
    handle = runner.run(app, "host", {})
    path = os.path.join(state.home(), "host", handle.rsplit("/", 1)[-1], "state.json")
    deadline = time.time() + 20
    while (st := state.read_json(path) or {}).get("state") != "RUNNING":
        assert time.time() < deadline, st
        time.sleep(0.05)
    return handle, path, st


def _wait_gone(pid: int) -> None:
    deadline = time.time() + 10
    while procs.pid_alive(pid):
        assert time.time() < deadline, f"pid {pid} did not die"
        time.sleep(0.02)


def _rewrite(path: str, **changes: Any) -> None:
    st = state.read_json(path)
    assert st is not None
    state.write_json(path, {**st, **changes})


def test_a_reused_supervisor_pid_is_not_the_supervisor(tmp_path: str) -> None:
    """After a reboot (or a crash) the supervisor's pid belongs to an unrelated process: the app
    is not RUNNING (UNKNOWN while its orphaned replica runs), and cancel succeeds, stops that
    replica and leaves the unrelated process alone; the app then reads FAILED."""
    handle, path, st = _running_app(tmp_path, "reused-sup")
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    _wait_gone(st["supervisor_pid"])
    replica_pid = st["replicas"]["main/0"]["pid"]
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            foreign = procs.identity(other.pid)
            assert foreign is not None
            # the same pid and start time on another boot (a reboot), then this boot but another
            # start time (a reused pid): neither is the supervisor
            for boot, start in (("another-boot", foreign["start"]), (foreign["boot"], st["supervisor_start"])):
                _rewrite(path, supervisor_pid=other.pid, boot_id=boot, supervisor_start=start)
                status = cli("status", handle)
                assert "State: UNKNOWN" in status.stdout, status.stdout
                assert f"supervisor (pid {other.pid}) is gone" in " ".join(status.stdout.split()), status.stdout
            _rewrite(path, boot_id=foreign["boot"])  # the replica's identity holds again
            out = cli("cancel", handle)
            assert out.returncode == 0, out.stderr
            assert other.poll() is None, "cancel signalled a process that only reused the supervisor's pid"
            _wait_gone(replica_pid)  # the replica, still provably the app's, was stopped
            assert "State: FAILED" in cli("status", handle).stdout
        finally:
            other.kill()


def test_a_reused_replica_group_is_left_alone(tmp_path: str) -> None:
    """A replica's process-group number now leads an unrelated group: cancel does not touch it."""
    handle, path, st = _running_app(tmp_path, "reused-group")
    os.kill(st["supervisor_pid"], signal.SIGKILL)
    replica_pid = st["replicas"]["main/0"]["pid"]
    os.killpg(replica_pid, signal.SIGKILL)
    _wait_gone(st["supervisor_pid"])
    _wait_gone(replica_pid)
    with subprocess.Popen(["sleep", "60"], start_new_session=True) as other:
        try:
            assert os.getpgid(other.pid) == other.pid
            _rewrite(path, replicas={"main/0": {**st["replicas"]["main/0"], "pid": other.pid, "pgid": other.pid}})
            status = cli("status", handle)
            assert "State: FAILED" in status.stdout and "were not seen to finish" in " ".join(status.stdout.split()), \
                status.stdout
            assert cli("cancel", handle).returncode == 0  # FAILED is terminal: TorchX asks nothing more
            # the scheduler's own cancel, which the CLI skips for a terminal app: still nothing foreign
            create_scheduler("test").cancel(handle.rsplit("/", 1)[-1])
            time.sleep(0.2)
            assert other.poll() is None, "cancel killed a group that only reused the replica's number"
            assert "State: FAILED" in cli("status", handle).stdout
        finally:
            other.kill()


# ---------------------------------------------------------------- dry-runs and file modes ----
def _listing(root: str) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, root), st.st_mode, st.st_size))
    return sorted(out)


def test_a_dryrun_with_a_workspace_writes_nothing(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "home")
    os.makedirs(os.path.join(home, "host"))
    with open(os.path.join(home, "host", "keep"), "w") as f:
        f.write("x")
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(ws)
    with open(os.path.join(ws, "data.txt"), "w") as f:
        f.write("from-workspace\n")
    before = _listing(home)
    out = cli("run", "--dryrun", "-s", "host", "--workspace", ws, "utils.sh", "cat", "data.txt",
              cwd=str(tmp_path), env={"TORCHX_EXT_HOME": home})
    assert out.returncode == 0, out.stderr
    assert '"workspace_copies"' in out.stdout and ws in out.stdout, out.stdout  # planned, printed
    assert _listing(home) == before


def test_what_holds_a_role_env_value_is_private_under_umask_022(tmp_path: str) -> None:
    home = os.path.join(str(tmp_path), "home")
    os.mkdir(home)
    os.chmod(home, 0o755)  # as a user would create it
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(os.path.join(ws, "sub"))
    with open(os.path.join(ws, "sub", "config.txt"), "w") as f:  # a workspace file holding it too
        f.write(secret)
    os.chmod(os.path.join(ws, "sub", "config.txt"), 0o644)
    cmd = (f"umask 022; exec {TORCHX} run --wait -s host --workspace {ws} utils.sh --env SECRET={secret} "
           "sh -c 'echo \"got $SECRET\"'")
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                         env={**os.environ, "TORCHX_EXT_HOME": home})
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout + out.stderr, out.stdout + out.stderr
    holders = []
    for dirpath, _dirs, files in os.walk(home):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                if secret.encode() in f.read():
                    holders.append(p)
    names = {os.path.basename(p) for p in holders}
    assert {"spec.json", "stdout.log", "combined.log", "config.txt"} <= names, holders  # not vacuous
    for p in holders:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, (p, oct(os.stat(p).st_mode))
        d = os.path.dirname(p)
        while d != home:
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, (d, oct(os.stat(d).st_mode))
            d = os.path.dirname(d)


# ---------------------------------------------------------------------- list's index --
def _own_home(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    home = os.path.join(str(tmp_path), "home")
    monkeypatch.setenv("TORCHX_EXT_HOME", home)  # this process and the CLI processes it starts
    return home


def _index_lines(home: str) -> list[dict[str, Any]]:
    with open(os.path.join(home, "host", "index.jsonl")) as f:
        return [json.loads(line) for line in f]


def _listed(runner: Any) -> list[str]:
    return [a.app_handle for a in runner.list("host")]


def test_list_shows_the_newest_first_and_not_deleted_or_pruned_apps(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _own_home(tmp_path, monkeypatch)
    runner = get_runner()
    handles = []
    for i in range(4):
        handles.append(runner.run(AppDef(f"n{i}", roles=[Role("main", image=str(tmp_path), entrypoint="true")]),
                                  "host", {}))
        wait_terminal(runner, handles[-1], 60)
    assert _listed(runner) == handles[::-1]
    assert [a.state for a in runner.list("host")] == [AppState.SUCCEEDED] * 4
    create_scheduler("torchx").delete(handles[1].rsplit("/", 1)[-1])  # what `torchx delete` does
    import shutil
    shutil.rmtree(os.path.join(home, "host", handles[2].rsplit("/", 1)[-1]))  # removed by hand
    assert _listed(runner) == [handles[3], handles[0]]
    pruned = subprocess.run([PY, "-m", "torchx_ext", "prune", "--older-than", "0s", "-s", "host"],
                            capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0 and "removed 2 app(s)" in pruned.stdout, pruned.stdout + pruned.stderr
    assert _listed(runner) == []
    assert "APP HANDLE" in cli("list", "-s", "host").stdout  # and the CLI lists an empty home
    again = runner.run(AppDef("again", roles=[Role("main", image=str(tmp_path), entrypoint="true")]), "host", {})
    assert _listed(runner) == [again]


def test_list_does_not_reopen_ended_apps_and_status_does_not_scan(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _own_home(tmp_path, monkeypatch)
    runner = get_runner()
    ended = runner.run(AppDef("ended", roles=[Role("main", image=str(tmp_path), entrypoint="true")]), "host", {})
    wait_terminal(runner, ended, 60)
    live = runner.run(AppDef("live", roles=[Role("main", image=str(tmp_path), entrypoint="sleep", args=["60"])]),
                      "host", {})
    try:
        wait_state(runner, live, AppState.RUNNING, 60)
        runner.list("host")  # caches the end
        assert {"id": ended.rsplit("/", 1)[-1], "end": "SUCCEEDED"} in _index_lines(home)
        # the ended app's record is damaged now: list does not read it again, status does
        state_json = os.path.join(home, "host", ended.rsplit("/", 1)[-1], "state.json")
        with open(state_json, "w") as f:
            f.write("{")
        assert {a.app_handle: a.state for a in runner.list("host")} == {
            live: AppState.RUNNING, ended: AppState.SUCCEEDED}
        assert "is damaged" in cli("status", ended).stderr
        # status reads its app's own directory only: not the index, not the other apps
        seen: list[str] = []
        real_listdir, real_open = os.listdir, open

        def listdir(path: Any = ".") -> list[str]:
            seen.append(str(path))
            return real_listdir(path)

        def opening(path: Any, *a: Any, **kw: Any) -> Any:
            seen.append(str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "listdir", listdir)
        monkeypatch.setattr("builtins.open", opening)
        assert runner.status(live).state == AppState.RUNNING  # type: ignore[union-attr]
        monkeypatch.undo()
        app_dir = os.path.join(home, "host", live.rsplit("/", 1)[-1])
        assert any(p.startswith(app_dir) for p in seen), seen  # not vacuous
        assert all(not p.startswith(os.path.join(home, "host")) or p.startswith(app_dir) for p in seen), seen
    finally:
        runner.cancel(live)


def test_a_missing_or_damaged_index_is_rebuilt_from_the_records(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _own_home(tmp_path, monkeypatch)
    runner = get_runner()
    handles = [runner.run(AppDef(f"r{i}", roles=[Role("main", image=str(tmp_path), entrypoint="true")]), "host", {})
               for i in range(3)]
    for h in handles:
        wait_terminal(runner, h, 60)
    expected = _listed(runner)
    assert expected == handles[::-1]
    index = os.path.join(home, "host", "index.jsonl")
    os.remove(index)  # e.g. a home written before the index existed
    assert _listed(runner) == expected
    assert {x["id"] for x in _index_lines(home)} == {h.rsplit("/", 1)[-1] for h in handles}
    with open(index, "w") as f:
        f.write('{"id": "x", "t": 1}\nnot json\n')
    assert _listed(runner) == expected
    lines = _index_lines(home)  # replaced: every line parses, one per app, ends included
    assert sorted(x["id"] for x in lines) == sorted(h.rsplit("/", 1)[-1] for h in handles)
    assert all(x.get("end") == "SUCCEEDED" for x in lines)
    assert stat.S_IMODE(os.stat(index).st_mode) == 0o600
    # an entry the index has but whose record is gone, and a record the index lacks
    with open(index, "a") as f:
        f.write(json.dumps({"id": "gone-0123456789", "t": time.time() + 10, "name": "gone"}) + "\n")
    with open(index, "w") as f:  # the index holds only the oldest app: the others are read back
        f.write(json.dumps({"id": handles[0].rsplit("/", 1)[-1], "t": 1.0, "name": "r0"}) + "\n")
    assert _listed(runner) == handles[:0:-1] + [handles[0]]


def test_two_concurrent_submitters_both_appear_in_list_and_index(
        tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _own_home(tmp_path, monkeypatch)
    cmd = [TORCHX, "run", "-s", "host", "utils.sh", "true"]
    procs_ = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
              for _ in range(4)]
    handles = []
    for p in procs_:
        out, err = p.communicate(timeout=120)
        handles.append(handle_of(subprocess.CompletedProcess(cmd, p.returncode, out, err)))
    ids = {h.rsplit("/", 1)[-1] for h in handles}
    added = [x["id"] for x in _index_lines(home) if "t" in x]
    assert sorted(added) == sorted(ids)  # each exactly once, every line whole
    runner = get_runner()
    assert set(_listed(runner)) == set(handles)
