"""``slurm_jobs`` on the real two-node Slurm testbed (``bash testbed/slurm.sh start``).

The shared contract, then what only Slurm has: the CLI from new processes, one heterogeneous job
per group, slurmctld restarted under a running job, a replica killed on its node.
Pure script tests (reference scripts, quoting) live in ``test_slurm_jobs_unit.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from typing import Callable, Iterator, Optional

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource

from conftest import ROOT, live_processes, require_backend
from contract import CLIENT, SERVER, Backend, SchedulerContract, free_port, logs, wait_state, wait_terminal
from torchx_ext.errors import BackendError

SCHEDULER = "slurm_jobs"
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
RESOURCE = Resource(cpu=1, gpu=0, memMB=500)
TIMEOUT = 60.0


def _app_id(handle: str) -> str:
    return handle.rsplit("/", 1)[-1]


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout


def _processes_of(app_id: str) -> list[int]:
    """Pids on this host whose environment belongs to the app (its batch script or replicas)."""
    return live_processes((f"SLURM_JOB_ID={app_id}\0".encode(), f"TORCHX_EXT_APP_ID={app_id}\0".encode()))


def nothing_running(handle: str, timeout: float = 30.0) -> bool:
    """True once Slurm has finished the job (not COMPLETING) and none of its processes is left."""
    app_id = _app_id(handle)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = re.search(r"JobState=(\S+)", _scontrol(app_id))
        if state and state.group(1) not in ("RUNNING", "COMPLETING", "PENDING") and not _processes_of(app_id):
            return True
        time.sleep(0.3)
    return False


def _path_without(command: str) -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not os.path.exists(os.path.join(d, command)))


@pytest.fixture(scope="module")
def partition() -> str:
    return require_backend("TORCHX_EXT_TEST_SLURM_PARTITION", "Slurm")


@pytest.fixture(scope="module", autouse=True)
def no_leftover_jobs(partition: str) -> Iterator[None]:
    """Cancels what this session's apps left queued or running (also when a test fails)."""
    yield
    from torchx_ext import state

    try:
        ours = set(os.listdir(os.path.join(state.home(), SCHEDULER)))  # this session's records only
    except FileNotFoundError:
        return
    runner = get_runner()
    for app in runner.list(SCHEDULER):
        if app.app_id in ours and app.state not in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
            runner.cancel(app.app_handle)
    runner.close()


class TestSlurmContract(SchedulerContract):
    @pytest.fixture
    def backend(self, partition: str) -> Backend:
        return Backend(scheduler=SCHEDULER, image=os.getcwd(), python=sys.executable,
                       cfg={"partition": partition}, resource=RESOURCE, timeout=TIMEOUT,
                       nothing_running=nothing_running, missing_app_id="999999",
                       # sbatch rejects the job
                       broken_cfg={"partition": "no-such-partition"},
                       # Slurm's client commands (sbatch, squeue, scontrol, scancel) are not on PATH
                       broken_env={"PATH": _path_without("sbatch")}, retries=True)


@pytest.fixture
def runner(partition: str) -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


def _role_app(name: str, code: str, *roles: tuple[str, str]) -> AppDef:
    from torchx_ext.components.group import roles as group_roles

    specs = [f"main={sys.executable} -c {_sh(code)}"] + [f"{n}={sys.executable} -c {_sh(c)}" for n, c in roles]
    return group_roles(*specs, image=os.getcwd(), cpu=1, memMB=500, name=name)


def _sh(s: str) -> str:
    return shlex.quote(s)


# ---------------------------------------------------------------------- the CLI, new processes --
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _cli_ok(*args: str) -> str:
    proc = _cli(*args)
    assert proc.returncode == 0, f"torchx {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _cli_state(handle: str) -> str:
    out = _cli_ok("status", handle)
    m = re.search(r"State:\s*(\w+)", out)
    assert m, out
    return m.group(1)


def test_cli_end_to_end(partition: str) -> None:
    code = ("import sys, time; print('cli-hello', flush=True); "
            "print('cli-err', file=sys.stderr, flush=True); time.sleep(300)")
    out = _cli_ok("run", "-s", SCHEDULER, "-cfg", f"partition={partition}", "group.roles",
                  "--cpu", "1", "--memMB", "300", "--image", ROOT, f"main={sys.executable} -c {_sh(code)}")
    handle = next(line for line in out.splitlines() if line.startswith(f"{SCHEDULER}://"))
    deadline = time.time() + TIMEOUT
    while _cli_state(handle) != "RUNNING":
        assert time.time() < deadline, _cli_ok("status", handle)
        time.sleep(0.5)
    while "cli-hello" not in _cli_ok("log", handle):
        assert time.time() < deadline
        time.sleep(0.5)
    assert "cli-err" in _cli_ok("log", "--streams", "stderr", f"{handle}/main/0")
    assert "cli-err" not in _cli_ok("log", "--streams", "stdout", f"{handle}/main/0")
    assert handle in _cli_ok("list", "-s", SCHEDULER)
    _cli_ok("cancel", handle)
    while _cli_state(handle) != "CANCELLED":
        assert time.time() < deadline, _cli_ok("status", handle)
        time.sleep(0.5)
    _cli_ok("cancel", handle)  # idempotent
    assert nothing_running(handle)


def test_dryrun_prints_script_without_submitting(partition: str) -> None:
    before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    out = _cli_ok("run", "--dryrun", "-s", SCHEDULER, "-cfg",
                  f"partition={partition},container_image=nvcr.io#nvidia/pytorch:24.01-py3",
                  "group.server_client", "--server", "python3 -m http.server", "--client", "true")
    assert "#SBATCH hetjob" in out and "--container-image=nvcr.io#nvidia/pytorch:24.01-py3" in out
    after = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout
    # nothing new: ended jobs may meanwhile leave the list (MinJobAge), which a CI run saw
    assert set(after.split()) <= set(before.split()), (before, after)


# ---------------------------------------------------------------------- Slurm-specific ----------
def test_server_client_is_one_heterogeneous_job(runner: Runner, partition: str) -> None:
    from torchx_ext.components.group import server_client

    port = free_port()
    app = server_client(server="x", client="x", image=os.getcwd(), cpu=1, memMB=500)
    server, client = app.roles
    server.entrypoint, server.args = sys.executable, ["-c", SERVER, str(port)]
    client.entrypoint, client.args = sys.executable, ["-c", CLIENT, str(port)]
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED, (status, logs(runner, handle, "client"))
    assert "GOT hello from server" in logs(runner, handle, "client")
    text = _scontrol(_app_id(handle))
    lines = [line for line in text.splitlines() if line.startswith("JobId=")]
    assert len(lines) == 2, text  # one het job: a component per role, started together
    assert all(f"HetJobId={_app_id(handle)}" in line for line in lines), text
    assert [r.role for r in status.roles] == ["server", "client"]
    # the server was stopped once the client was done: shown as succeeded, the app too
    assert status.roles[0].replicas[0].state == AppState.SUCCEEDED


def test_failure_names_role_and_exit_code(runner: Runner, partition: str) -> None:
    app = _role_app("fail", "import sys; sys.exit(7)")
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.FAILED, status
    assert "'main'" in status.msg and "exit code 7" in status.msg, status.msg
    assert status.roles[0].replicas[0].state == AppState.FAILED


def test_a_node_without_the_engines_python_fails_the_app_with_one_line(runner: Runner, partition: str) -> None:
    """The batch script runs the group engine with ``node_python``; a node without it fails the
    app, and describe says so in one line (no traceback)."""
    app = _role_app("nopy", "print('never')")
    handle = runner.run(app, SCHEDULER, {"partition": partition, "node_python": "no-such-python3"})
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.FAILED, status
    assert re.match(r"the node Python 'no-such-python3' \(run option node_python\) is not found on \S+; see ",
                    status.msg), status.msg
    assert "Traceback" not in status.msg and "\n" not in status.msg


def _wait_for_line(runner: Runner, handle: str, role: str, needle: str) -> None:
    deadline = time.time() + TIMEOUT
    while needle not in logs(runner, handle, role):
        assert time.time() < deadline, f"{needle!r} never appeared in {role}'s log"
        time.sleep(0.3)


def test_slurmctld_restart_while_running(runner: Runner, partition: str) -> None:
    code = "import time; print('up', flush=True); time.sleep(6); print('finished', flush=True)"
    handle = runner.run(_role_app("restart", code), SCHEDULER, {"partition": partition})
    _wait_for_line(runner, handle, "main", "up")
    restart = subprocess.Popen(["bash", os.path.join(ROOT, "testbed", "slurm.sh"), "restart-ctld"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    while restart.poll() is None:  # status keeps answering while slurmctld is away
        seen.add(runner.status(handle).state)
        time.sleep(0.2)
    assert restart.returncode == 0, restart.stdout.read() if restart.stdout else ""
    assert seen <= {AppState.RUNNING, AppState.UNKNOWN}, seen
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED, status
    assert "finished" in logs(runner, handle, "main")


def test_a_crashed_slurmd_that_comes_back_leaves_the_app_running_to_its_end(runner: Runner, partition: str) -> None:
    """slurmd SIGKILLed on a node of a heterogeneous job, then started again: its steps kept
    running, slurmctld sees the node back, and the app SUCCEEDS with every line logged."""
    code = "import time; print('up', flush=True); time.sleep(10); print('finished', flush=True)"
    handle = runner.run(_role_app("slurmd", code, ("other", code)), SCHEDULER, {"partition": partition})
    _wait_for_line(runner, handle, "other", "up")
    nodes = re.findall(r"(?:^|\s)NodeList=(\S+)", _scontrol(_app_id(handle)))
    crashed = nodes[-1]  # a node of the second component
    script = os.path.join(ROOT, "testbed", "slurm.sh")
    try:
        subprocess.run(["bash", script, "crash-node", crashed], check=True, timeout=30)
        seen = {runner.status(handle).state}
        time.sleep(2)
        seen.add(runner.status(handle).state)
    finally:
        subprocess.run(["bash", script, "start-node", crashed], check=True, timeout=60)
    assert seen <= {AppState.RUNNING, AppState.UNKNOWN}, seen
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED, status
    assert "finished" in logs(runner, handle, "main") and "finished" in logs(runner, handle, "other")
    assert nothing_running(handle)


def _replica_pid(app_id: str, token: str) -> Optional[int]:
    """The replica's own process: its argv is the role's (``sys.executable -c ... token``). The
    ``srun`` that started it (and the child srun forks) carry the same words after their options;
    which comes first in /proc depends on where the pid counter (32768 here) has wrapped, and
    killing srun's child leaves srun waiting on the step: not the failure this test is about."""
    for pid in _processes_of(app_id):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0] == sys.executable.encode() and token.encode() in argv:
            return pid
    return None


def test_replica_killed_on_node_fails_app(runner: Runner, partition: str) -> None:
    token = f"victim-{time.time_ns()}"
    code = "import sys, time; print('up', flush=True); time.sleep(300)"
    app = _role_app("killed", code)
    app.roles[0].args.append(token)  # marks the replica's command line, to find its process
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    _wait_for_line(runner, handle, "main", "up")
    pid = _replica_pid(_app_id(handle), token)
    assert pid is not None, "the replica's process was not found on this host"
    os.kill(pid, signal.SIGKILL)
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.FAILED, status
    assert "exit code 137" in status.msg and "SIGKILL" in status.msg, status.msg
    assert nothing_running(handle)


def test_bad_partition_and_unknown_dependency_rejected(runner: Runner, partition: str) -> None:
    before = {a.app_handle for a in runner.list(SCHEDULER)}
    with pytest.raises(BackendError, match="sbatch rejected the job: .*partition"):
        runner.run(_role_app("badpart", "print(1)"), SCHEDULER, {"partition": "no-such-partition"})
    with pytest.raises(Exception, match="999999"):
        runner.run(_role_app("dep", "print(1)"), SCHEDULER, {"partition": partition, "dependencies": ["999999"]})
    assert {a.app_handle for a in runner.list(SCHEDULER)} == before


def _forgotten_app(job_id: str, result: str) -> None:
    """The record a finished app leaves once slurmctld has forgotten it (MinJobAge, no sacct)."""
    from torchx_ext import state

    record_dir = os.path.join(state.home(), SCHEDULER, job_id)
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, "result"), "w") as f:
        f.write(result)
    state.write_json(os.path.join(record_dir, "app.json"), {
        "app_id": job_id, "app_name": "old", "job_dir": record_dir, "job_root": os.path.dirname(record_dir),
        "roles": [{"name": "main", "dirname": "main", "image": "", "entrypoint": "x", "num_replicas": 1,
                   "service": False}], "dependencies": [],
    })


def test_dependency_slurm_has_forgotten(runner: Runner, partition: str) -> None:
    _forgotten_app("999990", "0 \n")
    _forgotten_app("999991", "3 main/0\n")
    assert runner.status(f"{SCHEDULER}://torchx/999990").state == AppState.SUCCEEDED
    assert runner.status(f"{SCHEDULER}://torchx/999991").state == AppState.FAILED
    with pytest.raises(Exception, match="999991 ended FAILED"):
        runner.run(_role_app("dep", "print(1)"), SCHEDULER, {"partition": partition, "dependencies": ["999991"]})
    # a dependency known to have succeeded is satisfied: the app runs at once
    handle = runner.run(_role_app("dep", "print('ran')"), SCHEDULER,
                        {"partition": partition, "dependencies": ["999990"]})
    assert wait_terminal(runner, handle, TIMEOUT).state == AppState.SUCCEEDED


def test_hostile_sbatch_values_and_job_dir_reach_slurm(runner: Runner, partition: str, tmp_path: str) -> None:
    comment = 'a "b" \\c #d $HOME it\'s'
    job_dir = os.path.join(str(tmp_path), "my jobs %x $HOME")
    handle = runner.run(_role_app("quoted", "print('in odd dir')"), SCHEDULER,
                        {"partition": partition, "sbatch_args": [f"--comment={comment}"], "job_dir": job_dir})
    assert wait_terminal(runner, handle, TIMEOUT).state == AppState.SUCCEEDED
    assert f"Comment={comment}" in _scontrol(_app_id(handle))
    assert "in odd dir" in logs(runner, handle, "main")
    assert os.path.isfile(os.path.join(job_dir, "slurm-out", f"slurm-{_app_id(handle)}.out"))
    assert handle in {a.app_handle for a in runner.list(SCHEDULER)}  # found by its record


def test_log_tail_since_until(runner: Runner, partition: str) -> None:
    from datetime import datetime

    code = ("import time\n"
            "for w in ('early', 'middle', 'late'):\n"
            "    print(w, '%.6f' % time.time(), flush=True); time.sleep(1.0)\n")
    handle = runner.run(_role_app("tail", code), SCHEDULER, {"partition": partition})
    wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
    tailed = "".join(runner.log_lines(handle, "main", 0, should_tail=True))  # returns when the app ends
    assert [line.split()[0] for line in tailed.splitlines()] == ["early", "middle", "late"]
    stamps = {line.split()[0]: float(line.split()[1]) for line in tailed.splitlines()}
    cut = datetime.fromtimestamp((stamps["early"] + stamps["middle"]) / 2)
    assert logs(runner, handle, "main", since=cut).split()[::2] == ["middle", "late"]
    assert logs(runner, handle, "main", until=cut).split()[::2] == ["early"]


def test_cli_workspace_runs_the_users_file_from_a_copy_on_the_cluster(partition: str, tmp_path: str) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(ws)
    with open(os.path.join(ws, "hello.py"), "w") as f:
        f.write("import os\nprint('from the workspace', os.getcwd(), os.path.exists('secret.txt'), flush=True)\n")
    for name, text in (("secret.txt", "not shipped\n"), (".torchxignore", "secret.txt\n")):
        with open(os.path.join(ws, name), "w") as f:
            f.write(text)
    out = _cli_ok("run", "--wait", "-s", SCHEDULER, "-cfg", f"partition={partition}", "--workspace", ws,
                  "utils.python", "--script", "hello.py")
    handle = next(line for line in out.splitlines() if line.startswith(f"{SCHEDULER}://"))
    assert _cli_state(handle) == "SUCCEEDED", _cli_ok("status", handle)
    log = _cli_ok("log", handle)
    line = next(x for x in log.splitlines() if "from the workspace" in x)
    cwd = line.split()[-2]
    assert line.endswith("False") and cwd != ws and os.path.basename(os.path.dirname(cwd)) == "workspaces", line


def test_capabilities_are_node_features(runner: Runner, partition: str) -> None:
    app = _role_app("feature", "print('on a testbed node')")
    app.roles[0].resource.capabilities = {"testbed": True}  # a Feature of both testbed nodes
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    assert wait_terminal(runner, handle, TIMEOUT).state == AppState.SUCCEEDED
    assert "on a testbed node" in logs(runner, handle, "main")
    app = _role_app("nofeature", "print('must not run')")
    app.roles[0].resource.capabilities = {"no_such_feature": True}
    with pytest.raises(BackendError, match="sbatch rejected the job: .*feature"):
        runner.run(app, SCHEDULER, {"partition": partition})


def test_a_lost_node_fails_the_app_naming_it_and_nothing_is_requeued(runner: Runner, partition: str) -> None:
    code = "import time; print('up', flush=True); time.sleep(300)"
    handle = runner.run(_role_app("nodeloss", code, ("other", code)), SCHEDULER, {"partition": partition})
    wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
    app_id = _app_id(handle)
    nodes = re.findall(r"(?:^|\s)NodeList=(\S+)", _scontrol(app_id))
    lost = nodes[-1]  # a node of the heterogeneous job's second component
    try:
        subprocess.run(["scontrol", "update", f"NodeName={lost}", "State=DOWN", "Reason=torchx-ext-test"], check=True)
        status = wait_terminal(runner, handle, TIMEOUT)
        assert status.state == AppState.FAILED, status  # not PENDING: --no-requeue, no retries asked for
        assert "NODE_FAIL" in status.msg and lost in status.msg, status.msg
        assert "Restarts=0" in _scontrol(app_id)
        assert nothing_running(handle)
    finally:
        _resume(lost)


def _resume(node: str) -> None:
    """Brings a node set DOWN by a test back, and waits (up to 60 s) until it is idle again."""
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True,
                                       text=True).stdout and time.time() < deadline:
        time.sleep(0.5)


def test_a_signal_before_the_time_limit_reaches_the_replica(runner: Runner, partition: str) -> None:
    """``signal=USR1@80`` with a 2-minute limit: Slurm signals the replica's process (its steps),
    whose handler's output is in ``torchx log``. slurmctld checks every 30 s and signals the steps
    that exist at that instant once ``80 + 30`` s or less are left: 10-40 s after the start here,
    when the step is surely up (with ``@50`` and 1 minute, the first check, which may come in the
    job's first second, already sends it, and the signal is lost if the step is not up yet)."""
    code = ("import signal, sys, time; "
            "signal.signal(signal.SIGUSR1, lambda *_: (print('GOT SIGUSR1', flush=True), sys.exit(0))); "
            "print('up', flush=True); time.sleep(300)")
    app = _role_app("sig", code)
    handle = runner.run(app, SCHEDULER, {"partition": partition, "time": "00:02:00", "signal": "USR1@80"})
    _wait_for_line(runner, handle, "main", "GOT SIGUSR1")
    assert wait_terminal(runner, handle, 120).state == AppState.SUCCEEDED


def test_a_signal_for_the_batch_shell_only_is_refused(runner: Runner, partition: str) -> None:
    from torchx_ext.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="B:"):
        runner.dryrun(_role_app("sig", "pass"), SCHEDULER, {"partition": partition, "signal": "B:USR1@50"})


@pytest.mark.parametrize("by", ["scontrol", "the replica"])
def test_a_requeued_app_reads_pending_then_runs_again_under_its_handle(runner: Runner, partition: str, by: str) -> None:
    """A job Slurm requeues (here ``scontrol requeue``, by an operator or by the replica itself after
    a checkpoint: the README's convention) is one restart: PENDING while it waits, never FAILED."""
    code = ("import os, subprocess, sys, time; a = os.environ['TORCHX_EXT_ATTEMPT']; "
            "print('ATTEMPT', a, os.environ.get('SLURM_RESTART_COUNT'), flush=True); "
            "sys.exit(0) if a == '2' else None; "
            + ("subprocess.run(['scontrol', 'requeue', os.environ['SLURM_JOB_ID']], check=True); "
               if by == "the replica" else "") + "time.sleep(300)")
    app = _role_app("requeue", code)
    app.roles[0].max_retries = 1
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    _wait_for_line(runner, handle, "main", "ATTEMPT 1")
    app_id = _app_id(handle)
    if by == "scontrol":
        subprocess.run(["scontrol", "requeue", app_id], check=True)
    seen, deadline = [], time.time() + TIMEOUT
    while True:
        status = runner.status(handle)
        assert status is not None and status.state != AppState.FAILED, status
        seen.append(status.state)
        if status.state == AppState.PENDING and "Restarts=1" in _scontrol(app_id):
            break
        assert time.time() < deadline, seen
        time.sleep(0.2)
    assert status.num_restarts == 1 and all(r.state == AppState.PENDING for r in status.roles[0].replicas), status
    # Slurm holds a requeued job ~2 minutes (BeginTime) before it may start again; released at
    # once, slurmd refuses a job credential made in the same second as the requeue ("Job
    # credential revoked": the job FAILS), so wait for the next second
    time.sleep(1.0 - time.time() % 1.0 + 0.1)
    subprocess.run(["scontrol", "update", f"JobId={app_id}", "StartTime=now"], check=True)
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    out = logs(runner, handle, "main")
    assert [x.split()[1:] for x in out.splitlines() if x.startswith("ATTEMPT ")] == [["1", "None"], ["2", "1"]], out
    assert "[torchx-ext] attempt 2 of role 'main' replica 0 begins: Slurm requeued the job (requeue 1)" in out, out


def test_a_lost_node_requeues_an_app_with_retries_which_reads_pending_then_runs_again(
        runner: Runner, partition: str) -> None:
    """With retries the job is requeue-able: a node failure is Slurm's requeue, one restart."""
    code = ("import os, time; print('ATTEMPT', os.environ['TORCHX_EXT_ATTEMPT'], flush=True); "
            "time.sleep(300 if os.environ['TORCHX_EXT_ATTEMPT'] == '1' else 0)")
    app = _role_app("nodeloss-retry", code)
    app.roles[0].max_retries = 1
    handle = runner.run(app, SCHEDULER, {"partition": partition})
    _wait_for_line(runner, handle, "main", "ATTEMPT 1")
    app_id = _app_id(handle)
    lost = re.findall(r"(?:^|\s)NodeList=(\S+)", _scontrol(app_id))[-1]
    try:
        subprocess.run(["scontrol", "update", f"NodeName={lost}", "State=DOWN", "Reason=torchx-ext-test"], check=True)
        deadline = time.time() + TIMEOUT
        while "Restarts=1" not in _scontrol(app_id):
            status = runner.status(handle)
            assert status is not None and status.state != AppState.FAILED, status
            assert time.time() < deadline, _scontrol(app_id)
            time.sleep(0.2)
        status = runner.status(handle)
        assert status is not None and status.state == AppState.PENDING and status.num_restarts == 1, status
    finally:
        _resume(lost)
    time.sleep(1.0 - time.time() % 1.0 + 0.1)  # see test_a_requeued_app_reads_pending_then_runs_again...
    subprocess.run(["scontrol", "update", f"JobId={app_id}", "StartTime=now"], check=True)
    status = wait_terminal(runner, handle, TIMEOUT)
    assert status.state == AppState.SUCCEEDED and status.num_restarts == 1, status
    assert "[torchx-ext] attempt 2 of role 'main' replica 0 begins: Slurm requeued the job" in logs(runner, handle, "main")


# ---------------------------------------------------------------------- trust (issue 20) ---------
def _cli_in(home: str, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """``torchx ARGS`` in a new process with its own TORCHX_EXT_HOME, under a permissive umask."""
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "TORCHX_EXT_HOME": home}, umask=umask)


def _open_home(tmp_path: object) -> str:
    """A TORCHX_EXT_HOME made as a careless user would: 0755."""
    home = os.path.join(str(tmp_path), "home")
    os.mkdir(home)
    os.chmod(home, 0o755)
    return home


def tree(root: str) -> list[tuple[str, int, int]]:
    """Every path under ``root``: (relative path, mode, size); nothing when it does not exist."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_mode, st.st_size))
    return sorted(out)


def cli_status_until_over(status: Callable[[], str], timeout: float = TIMEOUT) -> str:
    """``torchx status``'s output (from ``status()``) once it shows a final state."""
    deadline = time.time() + timeout
    while True:
        out = status()
        if re.search(r"State:\s*(SUCCEEDED|FAILED|CANCELLED)", out):
            return out
        assert time.time() < deadline, out
        time.sleep(0.5)


def assert_private(home: str, secret: bytes) -> list[str]:
    """Every file under ``home`` holding ``secret`` is 0600, each directory up to ``home`` 0700;
    and nothing under ``home`` is open to others. Returns the files that hold it."""
    holding = []
    for dirpath, dirs, files in os.walk(home):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode & 0o777
            assert not mode & 0o077, f"{path} is {oct(mode)}"
        for name in files:
            path = os.path.join(dirpath, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue  # ssh's control sockets
            with open(path, "rb") as f:
                if secret not in f.read():
                    continue
            holding.append(os.path.relpath(path, home))
            assert os.lstat(path).st_mode & 0o777 == 0o600, path
            up = os.path.dirname(path)
            while up != home:
                assert os.lstat(up).st_mode & 0o777 == 0o700, up
                up = os.path.dirname(up)
    return holding


def test_cli_dryrun_with_a_workspace_writes_nothing(partition: str, tmp_path: object) -> None:
    home = _open_home(tmp_path)
    ws = os.path.join(str(tmp_path), "ws")
    os.mkdir(ws)
    with open(os.path.join(ws, "main.py"), "w") as f:
        f.write("print('hi')\n")
    first = _cli_in(home, "run", "-s", SCHEDULER, "-cfg", f"partition={partition}", "--workspace", "", "group.roles",
                    "--image", ROOT, f"main={sys.executable} -c pass")  # a home with records and roots in it
    assert first.returncode == 0, first.stderr
    handle = next(line for line in first.stdout.splitlines() if line.startswith(f"{SCHEDULER}://"))
    # the first app's replicas write into the home while they run: compare only once it is over
    cli_status_until_over(lambda: _cli_in(home, "status", handle).stdout)
    before = tree(home)
    proc = _cli_in(home, "run", "--dryrun", "--workspace", ws, "-s", SCHEDULER, "-cfg", f"partition={partition}",
                   "group.roles", "--image", "unused", f"main={sys.executable} main.py")
    assert proc.returncode == 0, proc.stderr
    assert tree(home) == before
    assert f"# before sbatch: copy the workspace {ws} to {home}/slurm_jobs/workspaces/" in proc.stdout


def test_env_values_are_private_from_creation(partition: str, tmp_path: object) -> None:
    import uuid

    home = _open_home(tmp_path)
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    code = "import os; print('value', os.environ['TXE_SECRET'], 'umask', oct(os.umask(0)), flush=True)"
    proc = _cli_in(home, "run", "-s", SCHEDULER, "-cfg", f"partition={partition}", "--workspace", "",
                   "group.roles", "--cpu", "1", "--memMB", "300", "--image", ROOT, "--env", f"TXE_SECRET={secret}",
                   f"main={sys.executable} -c {_sh(code)}")
    assert proc.returncode == 0, proc.stderr
    handle = next(line for line in proc.stdout.splitlines() if line.startswith(f"{SCHEDULER}://"))
    out = cli_status_until_over(lambda: _cli_in(home, "status", handle).stdout)
    assert "SUCCEEDED" in out, out
    holding = assert_private(home, secret.encode())
    job = _app_id(handle)
    with open(os.path.join(home, "slurm_jobs", job, "app.json")) as f:
        job_dir = os.path.relpath(json.load(f)["job_dir"], home)  # slurm_jobs/<job id>.<token>
    # the record, the script and the replica's log hold it; Slurm's output sits in a private directory
    assert {f"slurm_jobs/{job}/app.json", f"{job_dir}/script.sbatch", f"{job_dir}/main/0/log"} \
        <= set(holding), holding
    assert os.path.isfile(os.path.join(home, "slurm_jobs", "slurm-out", f"slurm-{job}.out"))
    # what is ours is private; the replica itself runs under the submitter's umask (022), not 077
    with open(os.path.join(home, job_dir, "main", "0", "log")) as f:
        assert f"value {secret} umask 0o22" in f.read()


# ---------------------------------------------------------------------- list's index --
def _index_lines(home: str) -> list[dict]:
    import json

    with open(os.path.join(home, SCHEDULER, "index.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_list_shows_the_newest_first_from_its_index(
        partition: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx_ext.schedulers.slurm_jobs.scheduler import create_scheduler

    home = os.path.join(str(tmp_path), "home")
    monkeypatch.setenv("TORCHX_EXT_HOME", home)
    runner = get_runner()
    cfg = {"partition": partition}
    ended = [runner.run(_role_app(f"e{i}", "print(1)"), SCHEDULER, cfg) for i in range(3)]
    held = runner.run(_role_app("held", "print(1)"), SCHEDULER, {**cfg, "sbatch_args": ["--hold"]})
    try:
        for h in ended:
            assert wait_terminal(runner, h, TIMEOUT).state == AppState.SUCCEEDED
        listed = [(a.app_handle, a.state) for a in runner.list(SCHEDULER)]
        assert listed == [(held, AppState.PENDING)] + [(h, AppState.SUCCEEDED) for h in ended[::-1]]
        ends = {x["id"]: x["end"] for x in _index_lines(home) if "end" in x}
        assert ends == {_app_id(h): "SUCCEEDED" for h in ended}  # the pending one is asked again
        _forgotten_app("999980", "3 main/0\n")  # ended, and slurmctld no longer knows it
        create_scheduler("torchx").delete(_app_id(ended[1]))
        expected = [f"{SCHEDULER}://torchx/999980", held, ended[2], ended[0]]
        assert [a.app_handle for a in runner.list(SCHEDULER)] == expected
        assert runner.status(expected[0]).state == AppState.FAILED  # type: ignore[union-attr]
        index = os.path.join(home, SCHEDULER, "index.jsonl")
        os.remove(index)  # a home from before the index: rebuilt from the records
        assert [a.app_handle for a in runner.list(SCHEDULER)] == expected
        with open(index, "a") as f:
            f.write("{damaged\n")
        assert [(a.app_handle, a.state) for a in runner.list(SCHEDULER)] == [
            (expected[0], AppState.FAILED), (held, AppState.PENDING), (ended[2], AppState.SUCCEEDED),
            (ended[0], AppState.SUCCEEDED)]
        assert stat.S_IMODE(os.stat(index).st_mode) == 0o600
    finally:
        runner.cancel(held)
    assert wait_terminal(runner, held, TIMEOUT).state == AppState.CANCELLED
    assert {x["id"]: x["end"] for x in _index_lines(home) if "end" in x}.get(_app_id(held)) is None
    assert dict((a.app_handle, a.state) for a in runner.list(SCHEDULER))[held] == AppState.CANCELLED
    assert {x["id"]: x["end"] for x in _index_lines(home) if "end" in x}[_app_id(held)] == "CANCELLED"


def test_two_concurrent_submitters_both_appear_in_list(
        partition: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    home = os.path.join(str(tmp_path), "home")
    monkeypatch.setenv("TORCHX_EXT_HOME", home)
    cmd = [TORCHX, "run", "-s", SCHEDULER, "-cfg", f"partition={partition}", "group.roles", "--cpu", "1",
           "--memMB", "300", "--image", ROOT, f"main={sys.executable} -c pass"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    handles = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        handles.append(next(line for line in out.splitlines() if line.startswith(f"{SCHEDULER}://")))
    assert sorted(x["id"] for x in _index_lines(home) if "t" in x) == sorted(map(_app_id, handles))
    runner = get_runner()
    assert {a.app_handle for a in runner.list(SCHEDULER)} == set(handles)
    for h in handles:
        wait_terminal(runner, h, TIMEOUT)
