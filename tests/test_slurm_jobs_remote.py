"""``slurm_jobs`` on a remote cluster over SSH (run option ``login``), end to end.

The login node is testbed/sshd.sh's sshd (127.0.0.1, user ``txe``, Host alias ``txe-login``) in
front of the real two-node Slurm testbed. The client side of every test runs with a PATH that has
ssh and rsync but none of Slurm's commands (:func:`client_path`), so only the remote path can pass;
the replicas run as ``txe`` with the system ``/usr/bin/python3`` (the contract's replica code is
stdlib only; the repository's venv under /root is not readable by ``txe``).

The shared contract first, then what only the remote mode has: workspace shipping (a new remote
copy per submission, the second sending only what changed), ``torchx log --tail``/status/cancel/list
from new processes with only the handle, and the faults (unreachable host, refused key, no Slurm on
the remote PATH, a full remote disk, a connection dropped mid-tail), each one readable line.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

from conftest import IN_CI, ROOT, live_processes, require_backend
from contract import Backend, SchedulerContract, logs, wait_state, wait_terminal
from test_slurm_jobs import assert_private, cli_status_until_over
from torchx_ext import state
from torchx_ext.errors import BackendError, SchedulerUnavailable

SCHEDULER = "slurm_jobs"
RESOURCE = Resource(cpu=1, gpu=0, memMB=500)
TIMEOUT = 60.0
REMOTE_PYTHON = "/usr/bin/python3"  # what the remote user can run (the venv lives under /root)
SLURM_COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sacct", "srun")
# the test process itself may look at Slurm here (the cluster is on this machine): the client may not
SCONTROL = shutil.which("scontrol") or "/usr/bin/scontrol"
SCANCEL = shutil.which("scancel") or "/usr/bin/scancel"
# tools of the tests themselves, found before the client PATH hides /usr/bin
KEYGEN, MOUNT, UMOUNT = (shutil.which(t) or t for t in ("ssh-keygen", "mount", "umount"))


def _sshd(name: str) -> str:
    return require_backend(f"TORCHX_EXT_TEST_SSH_{name}", "the sshd")


@pytest.fixture(scope="module")
def partition() -> str:
    return require_backend("TORCHX_EXT_TEST_SLURM_PARTITION", "Slurm")


@pytest.fixture(scope="module")
def ssh_config() -> str:
    return _sshd("CONFIG")


@pytest.fixture(scope="module")
def remote_cfg(partition: str, ssh_config: str) -> dict[str, str]:
    return {"partition": partition, "login": _sshd("HOST"), "ssh_config": ssh_config}


def _client_path_value(bin_dir: str) -> str:
    """A PATH with ssh and rsync (linked into ``bin_dir``) and none of Slurm's commands."""
    for tool in ("ssh", "rsync"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, os.path.join(bin_dir, tool))
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, c)) for c in SLURM_COMMANDS)]
    return os.pathsep.join([os.path.dirname(sys.executable), bin_dir, *dirs])


@pytest.fixture(scope="module", autouse=True)
def client_path(partition: str) -> Iterator[str]:
    """The whole module runs with Slurm's commands off PATH: only the login node has them."""
    bin_dir = tempfile.mkdtemp(prefix="txe-client-bin-")
    saved = os.environ["PATH"]
    os.environ["PATH"] = _client_path_value(bin_dir)
    assert not any(shutil.which(c) for c in SLURM_COMMANDS), os.environ["PATH"]
    try:
        yield os.environ["PATH"]
    finally:
        os.environ["PATH"] = saved
        shutil.rmtree(bin_dir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def no_leftover_jobs(partition: str, client_path: str) -> Iterator[None]:
    """Cancels what this module's apps left queued or running (also when a test fails)."""
    yield
    runner = get_runner()
    try:
        try:
            apps = runner.list(SCHEDULER)
        except SchedulerUnavailable:
            return  # no remote app recorded (a subset ran), and no local Slurm to list
        for app in apps:
            if ":" in app.app_id and app.state not in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
                runner.cancel(app.app_handle)
    finally:
        runner.close()


def _job_id(handle: str) -> str:
    return handle.rsplit("/", 1)[-1].rpartition(":")[2]


def nothing_running(handle: str, timeout: float = 30.0) -> bool:
    """True once Slurm has finished the job and none of its processes is left (same machine)."""
    app_id, job_id = handle.rsplit("/", 1)[-1], _job_id(handle)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([SCONTROL, "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        st = re.search(r"JobState=(\S+)", out)
        procs = live_processes((f"SLURM_JOB_ID={job_id}\0".encode(), f"TORCHX_EXT_APP_ID={app_id}\0".encode()))
        if st and st.group(1) not in ("RUNNING", "COMPLETING", "PENDING") and not procs:
            return True
        time.sleep(0.3)
    return False


def _txe_home() -> str:
    return pwd.getpwnam(_sshd("USER")).pw_dir


@pytest.fixture(scope="module")
def broken_app(remote_cfg: dict[str, str]) -> str:
    """An app of the remote cluster as its record has it; the broken env has no ssh to reach it."""
    app_id = f"{remote_cfg['login']}:999999"
    record_dir = os.path.join(state.home(), SCHEDULER, app_id)
    os.makedirs(record_dir, exist_ok=True)
    state.write_json(os.path.join(record_dir, "app.json"), {
        "app_id": app_id, "app_name": "broken", "job_dir": "/nonexistent/999999", "job_root": "/nonexistent",
        "roles": [{"name": "main", "dirname": "main", "image": "", "entrypoint": "x", "num_replicas": 1,
                   "service": False}], "dependencies": [], "login": remote_cfg["login"],
        "identity_file": None, "ssh_config": remote_cfg["ssh_config"],
    })
    return app_id


class TestRemoteSlurmContract(SchedulerContract):
    @pytest.fixture
    def backend(self, remote_cfg: dict[str, str], client_path: str, broken_app: str) -> Backend:
        no_ssh = os.pathsep.join(d for d in client_path.split(os.pathsep)
                                 if not os.path.exists(os.path.join(d, "ssh")))
        return Backend(scheduler=SCHEDULER, image=_txe_home(), python=REMOTE_PYTHON, cfg=dict(remote_cfg),
                       resource=RESOURCE, timeout=TIMEOUT, nothing_running=nothing_running,
                       missing_app_id=f"{remote_cfg['login']}:999998",
                       # sbatch on the login node rejects the job
                       broken_cfg={"partition": "no-such-partition"},
                       # neither Slurm's commands nor ssh: no way to any cluster
                       broken_env={"PATH": no_ssh}, broken_app_id=broken_app, retries=True)


# ---------------------------------------------------------------------- helpers ------------------
def _app(name: str, code: str, image: str = "", replicas: int = 1) -> AppDef:
    return AppDef(name, roles=[Role("main", image=image or _txe_home(), entrypoint=REMOTE_PYTHON, args=["-c", code],
                                    num_replicas=replicas, resource=RESOURCE)])


def _record(handle: str) -> dict:
    return state.read_json(os.path.join(state.home(), SCHEDULER, handle.rsplit("/", 1)[-1], "app.json")) or {}


def _ssh(cfg: dict[str, str], *argv: str) -> str:
    proc = subprocess.run(["ssh", "-F", cfg["ssh_config"], cfg["login"], "--", *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchx ARGS`` in a new process (no options: the handle must be enough)."""
    cmd = [sys.executable, "-m", "torchx.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _error_lines(stderr: str) -> list[str]:
    from contract import error_lines

    return error_lines(stderr)


@pytest.fixture
def runner(client_path: str) -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


@pytest.fixture
def fresh_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A TORCHX_EXT_HOME of the test's own (short: ssh's control sockets live there): no master
    connection of another test is reused."""
    path = tempfile.mkdtemp(prefix="txr")
    monkeypatch.setenv("TORCHX_EXT_HOME", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- the app id ----------------
def test_the_handle_names_the_cluster_and_the_replica_sees_it(runner: Runner, remote_cfg: dict[str, str]) -> None:
    code = "import os; print('ID', os.environ['TORCHX_EXT_APP_ID'], os.environ['SLURM_JOB_ID'])"
    handle = runner.run(_app("named", code), SCHEDULER, remote_cfg)
    app_id = handle.rsplit("/", 1)[-1]
    assert re.fullmatch(rf"{re.escape(remote_cfg['login'])}:\d+", app_id), handle
    assert wait_terminal(runner, handle, TIMEOUT).state == AppState.SUCCEEDED
    assert f"ID {app_id} {_job_id(handle)}" in logs(runner, handle, "main")
    record = _record(handle)
    assert record["login"] == remote_cfg["login"] and record["ssh_config"] == remote_cfg["ssh_config"]
    assert record["job_dir"].startswith(_txe_home() + "/"), record["job_dir"]  # ~ resolved on the remote
    # the job directory lives on the cluster, not here; the job kept its script there, privately
    assert "script.sbatch" in _ssh(remote_cfg, "ls", record["job_dir"])
    assert _ssh(remote_cfg, "stat", "-c", "%a", record["job_dir"]).strip() == "700"
    assert "#SBATCH --comment=torchx-ext:slurm_jobs" in _ssh(remote_cfg, "cat", f"{record['job_dir']}/script.sbatch")


def test_an_app_id_is_never_a_path() -> None:
    from torchx_ext.schedulers.slurm_jobs.scheduler import split_app_id

    assert split_app_id("123") == ("", "123")
    assert split_app_id("txe-login:123") == ("txe-login", "123")
    assert split_app_id("txe@127.0.0.1:2222:77") == ("txe@127.0.0.1:2222", "77")
    for bad in ("../x:1", "a/b:1", ".hidden:1", "host:", "host:1a", "a b:1", "-oProxy=x:1", "", "x\0:1"):
        assert split_app_id(bad) is None, bad


# ---------------------------------------------------------------------- workspace -----------------
def test_workspace_is_shipped_and_a_resubmit_sends_only_what_changed(
        runner: Runner, remote_cfg: dict[str, str], tmp_path: object) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(os.path.join(ws, "pkg"))
    with open(os.path.join(ws, "pkg", "weights.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    with open(os.path.join(ws, "main.py"), "w") as f:
        f.write("import os; print('VERSION 1', os.path.getsize('pkg/weights.bin'), os.path.exists('secret.txt'))\n")
    with open(os.path.join(ws, "secret.txt"), "w") as f:
        f.write("not shipped")
    with open(os.path.join(ws, ".torchxignore"), "w") as f:
        f.write("secret.txt\n")

    app = AppDef("ws", roles=[Role("main", image="unused", entrypoint=REMOTE_PYTHON, args=["main.py"],
                                   resource=RESOURCE)])
    first = runner.run(app, SCHEDULER, remote_cfg, workspace=ws)
    assert wait_terminal(runner, first, TIMEOUT).state == AppState.SUCCEEDED
    assert "VERSION 1 300000 False" in logs(runner, first, "main")
    (copy1, sent1), = _record(first)["workspace_bytes_sent"].items()
    assert sent1 >= 300_000, sent1

    with open(os.path.join(ws, "main.py"), "w") as f:
        f.write("import os; print('VERSION 2', os.path.getsize('pkg/weights.bin'))\n")
    app.roles[0].image = "unused"
    second = runner.run(app, SCHEDULER, remote_cfg, workspace=ws)
    assert wait_terminal(runner, second, TIMEOUT).state == AppState.SUCCEEDED
    assert "VERSION 2 300000" in logs(runner, second, "main")
    (copy2, sent2), = _record(second)["workspace_bytes_sent"].items()
    assert sent2 < 1000, f"the resubmit sent {sent2} bytes; only main.py changed"
    # a new copy per submission: the first job's files never changed under it; unchanged files
    # are hard links into the previous copy (no second 300 kB on the remote disk)
    assert copy1 != copy2
    assert "VERSION 1" in _ssh(remote_cfg, "cat", f"{copy1}/main.py")
    links = _ssh(remote_cfg, "stat", "-c", "%h", f"{copy2}/pkg/weights.bin").strip()
    assert links == "2", links


# ---------------------------------------------------------------------- the CLI, new shells -------
def test_cli_from_new_shells_needs_only_the_handle(runner: Runner, remote_cfg: dict[str, str]) -> None:
    code = ("import sys, time\n"
            "for i in range(4):\n"
            "    print('line', i, flush=True); time.sleep(0.7)\n"
            "print('to-stderr', file=sys.stderr, flush=True)\n")
    handle = runner.run(_app("clitail", code), SCHEDULER, remote_cfg)
    wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
    started = time.time()
    tail = _cli("log", "--tail", f"{handle}/main/0")
    assert tail.returncode == 0, tail.stderr
    assert [x.split(" ", 1)[-1] for x in tail.stdout.splitlines() if "line" in x] == [f"line {i}" for i in range(4)]
    assert "to-stderr" in tail.stdout
    assert time.time() - started < 30
    assert "SUCCEEDED" in _cli("status", handle).stdout
    stderr_only = _cli("log", "--streams", "stderr", f"{handle}/main/0").stdout
    assert "to-stderr" in stderr_only and "line 0" not in stderr_only

    sleeper = runner.run(_app("clicancel", "import time; print('up', flush=True); time.sleep(300)"),
                         SCHEDULER, remote_cfg)
    wait_state(runner, sleeper, AppState.RUNNING, TIMEOUT)
    listed = _cli("list", "-s", SCHEDULER)
    assert listed.returncode == 0 and sleeper in listed.stdout, listed.stdout + listed.stderr
    cancel = _cli("cancel", sleeper)
    assert cancel.returncode == 0, cancel.stderr
    assert wait_terminal(runner, sleeper, TIMEOUT).state == AppState.CANCELLED
    assert nothing_running(sleeper)


def test_status_is_one_round_trip(fresh_home: str, runner: Runner, remote_cfg: dict[str, str]) -> None:
    # a home of its own: list asks every cluster the home knows (other tests' login nodes too)
    from torchx_ext.schedulers.slurm_jobs import ssh as slurm_jobs_ssh

    handle = runner.run(_app("rt", "print(1)"), SCHEDULER, remote_cfg)
    wait_terminal(runner, handle, TIMEOUT)
    calls = []
    real = slurm_jobs_ssh.SshLogin._call

    def counting(self: slurm_jobs_ssh.SshLogin, *a: object, **kw: object) -> object:
        calls.append(a[0])
        return real(self, *a, **kw)  # type: ignore[arg-type]

    slurm_jobs_ssh.SshLogin._call = counting  # type: ignore[assignment,method-assign]
    try:
        with get_runner() as fresh:
            assert fresh.status(handle).state == AppState.SUCCEEDED  # type: ignore[union-attr]
            assert len(calls) == 1, calls
            calls.clear()
            fresh.list(SCHEDULER)
            assert len(calls) == 1, calls  # one squeue --json for the one cluster
    finally:
        slurm_jobs_ssh.SshLogin._call = real  # type: ignore[method-assign]


# ---------------------------------------------------------------------- faults --------------------
def _one_line(e: pytest.ExceptionInfo[Exception], *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_host_is_one_line(runner: Runner, partition: str, fresh_home: str) -> None:
    login = f"txe@127.0.0.1:{_free_port()}"
    with pytest.raises(SchedulerUnavailable) as e:
        runner.run(_app("unreach", "print(1)"), SCHEDULER, {"partition": partition, "login": login})
    _one_line(e, "cannot reach", login)


def test_refused_key_is_one_line(runner: Runner, partition: str, fresh_home: str, tmp_path: object) -> None:
    key = os.path.join(str(tmp_path), "unauthorized_key")
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    config = os.path.join(str(tmp_path), "ssh_config")
    known_hosts = os.path.join(os.path.dirname(_sshd("CONFIG")), "known_hosts")
    with open(config, "w") as f:
        f.write(f"Host *\n  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n")
    login = f"{_sshd('USER')}@127.0.0.1:{_sshd('PORT')}"
    with pytest.raises(SchedulerUnavailable) as e:
        runner.run(_app("refused", "print(1)"), SCHEDULER, {"partition": partition, "login": login,
                                                             "identity_file": key, "ssh_config": config})
    _one_line(e, "refused", login)


def test_no_slurm_on_the_remote_path_is_one_line(runner: Runner, partition: str, ssh_config: str) -> None:
    login = _sshd("NOSLURM_HOST")
    cfg = {"partition": partition, "login": login, "ssh_config": ssh_config, "remote_dir": "/tmp/txe-noslurm-jobs"}
    with pytest.raises(SchedulerUnavailable) as e:
        runner.run(_app("noslurm", "print(1)"), SCHEDULER, cfg)
    _one_line(e, login, "not on the remote PATH")
    leftovers = subprocess.run(["ssh", "-F", ssh_config, login, "--", "ls", "-A", "/tmp/txe-noslurm-jobs"],
                               capture_output=True, text=True).stdout
    # no script, no job directory (Slurm's output directory, shared by every job, may be there, empty)
    assert set(leftovers.split()) <= {".torchx_ext_writable", "slurm-out"}, leftovers
    assert _ssh_sh({"ssh_config": ssh_config, "login": login},
                   "ls -A /tmp/txe-noslurm-jobs/slurm-out 2>/dev/null || :") == ""


def test_full_remote_disk_is_one_line_and_leaves_nothing(
        runner: Runner, remote_cfg: dict[str, str], tmp_path: object) -> None:
    mnt = tempfile.mkdtemp(prefix="txe-full-")
    proc = subprocess.run([MOUNT, "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"cannot mount a small tmpfs for a full disk: {proc.stderr.strip()}"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    try:
        user = pwd.getpwnam(_sshd("USER"))
        os.chown(mnt, user.pw_uid, user.pw_gid)
        fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        jobs_before = subprocess.run([SCONTROL, "show", "job", "-o"], capture_output=True, text=True).stdout
        with pytest.raises(BackendError) as e:
            runner.run(_app("full", "print(1)"), SCHEDULER, {**remote_cfg, "remote_dir": mnt})
        _one_line(e, "No space left on device", "nothing was submitted")
        # nothing left behind (but Slurm's output directory, shared by every job, empty)
        assert sorted(os.listdir(mnt)) in (["filler"], ["filler", "slurm-out"])
        assert not os.path.isdir(os.path.join(mnt, "slurm-out")) or not os.listdir(os.path.join(mnt, "slurm-out"))
        jobs_after = subprocess.run([SCONTROL, "show", "job", "-o"], capture_output=True, text=True).stdout
        assert "JobName=full " not in jobs_after.replace(jobs_before, "")
    finally:
        subprocess.run([UMOUNT, mnt], check=False)
        os.rmdir(mnt)


class _Proxy:
    """A TCP forwarder to the sshd that the test can cut: all connections and the listener."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.closed = True
        try:  # wakes the accept() of the other thread (a close alone would leave it listening)
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def _proxied_login(tmp: str, alias: str, extra: str = "") -> tuple[_Proxy, str]:
    """A login ``alias`` (in the returned ssh_config) that reaches the testbed's sshd through a
    :class:`_Proxy` the test can cut."""
    proxy = _Proxy(int(_sshd("PORT")))
    known_hosts = os.path.join(tmp, "known_hosts")
    with open(os.path.join(os.path.dirname(_sshd("CONFIG")), "known_hosts")) as f:
        key = f.readline().split(" ", 1)[1]
    with open(known_hosts, "w") as f:
        f.write(f"[127.0.0.1]:{proxy.port} {key}")
    config = os.path.join(tmp, "ssh_config")
    with open(config, "w") as f:
        f.write(f"Host {alias}\n  HostName 127.0.0.1\n  Port {proxy.port}\n  User {_sshd('USER')}\n"
                f"  IdentityFile {_sshd('KEY')}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n"
                f"  StrictHostKeyChecking yes\n{extra}")
    return proxy, config


def test_connection_dropped_mid_tail_is_one_line(
        runner: Runner, partition: str, fresh_home: str, tmp_path: object) -> None:
    proxy, config = _proxied_login(str(tmp_path), "txe-proxied")
    cfg = {"partition": partition, "login": "txe-proxied", "ssh_config": config}
    handle = runner.run(_app("dropped", "import time\nwhile True: print('tick', flush=True); time.sleep(0.3)"),
                        SCHEDULER, cfg)
    try:
        wait_state(runner, handle, AppState.RUNNING, TIMEOUT)
        tail = subprocess.Popen([sys.executable, "-m", "torchx.cli.main", "log", "--tail", f"{handle}/main/0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert tail.stdout is not None
        assert "tick" in tail.stdout.readline()  # it follows the log over the proxied connection
        proxy.cut()
        out, err = tail.communicate(timeout=90)
        assert tail.returncode != 0, (out[-2000:], err)
        lines = _error_lines(err)
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "txe-proxied" in lines[0] and ("lost" in lines[0] or "cannot reach" in lines[0]), lines
    finally:
        subprocess.run([SCANCEL, _job_id(handle)], check=False)


def test_dependencies_between_apps_of_one_cluster(runner: Runner, remote_cfg: dict[str, str]) -> None:
    first = runner.run(_app("first", "import sys, time; time.sleep(1); sys.exit(4)"), SCHEDULER, remote_cfg)
    second = runner.run(_app("second", "print('must not run')"), SCHEDULER,
                        {**remote_cfg, "dependencies": [first]})
    status = wait_terminal(runner, second, TIMEOUT * 2)
    assert status.state in (AppState.FAILED, AppState.CANCELLED), status
    assert first.rsplit("/", 1)[-1] in status.msg, status.msg
    # a local job id is not an app of this cluster
    with pytest.raises(Exception, match="own cluster"):
        runner.run(_app("x", "print(1)"), SCHEDULER, {**remote_cfg, "dependencies": ["12345"]})


def test_record_keeps_what_a_new_shell_needs(runner: Runner, remote_cfg: dict[str, str]) -> None:
    handle = runner.run(_app("rec", "print(1)"), SCHEDULER, remote_cfg)
    record = _record(handle)
    assert {k: record[k] for k in ("login", "identity_file", "ssh_config")} == {
        "login": remote_cfg["login"], "identity_file": None, "ssh_config": remote_cfg["ssh_config"]}
    # <job id>.<token>: a job id the cluster gives again after a reset gets a directory of its own
    assert re.search(r"/" + _job_id(handle) + r"\.[0-9a-f]{12}$", json.loads(json.dumps(record))["job_dir"]), record
    wait_terminal(runner, handle, TIMEOUT)


# ---------------------------------------------------------------------- trust (issue 20) ---------
def _cli_in(home: str, *args: str) -> subprocess.CompletedProcess:
    """``torchx ARGS`` in a new process with its own TORCHX_EXT_HOME, under umask 022."""
    return subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "TORCHX_EXT_HOME": home}, umask=0o022)


def _open_home() -> str:
    """A short TORCHX_EXT_HOME (ssh's sockets live there) made 0755, as a careless user would."""
    home = tempfile.mkdtemp(prefix="txp")
    os.chmod(home, 0o755)
    return home


def _ssh_sh(cfg: dict[str, str], script: str, *args: str) -> str:
    """``sh -c SCRIPT sh ARGS`` on the login node (ssh joins its words into one shell line: quoted here)."""
    return _ssh(cfg, " ".join(shlex.quote(w) for w in ["sh", "-c", script, "sh", *args]))


def _remote_tree(cfg: dict[str, str], path: str) -> str:
    """Every path under ``path`` on the login node with its mode, size and time ("" if missing)."""
    return _ssh_sh(cfg, 'cd -- "$1" 2>/dev/null && find . -printf "%p %m %s %T@\\n" | sort || :', path)


def _plain_cfg(cfg: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def test_cli_dryruns_write_nothing_and_connect_nowhere(remote_cfg: dict[str, str], tmp_path: object) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    os.mkdir(ws)
    with open(os.path.join(ws, "main.py"), "w") as f:
        f.write("print('hi')\n")
    home = _open_home()
    try:
        remote_before = _remote_tree(remote_cfg, ".torchx_ext")
        args = ["group.roles", "--image", "unused", f"main={REMOTE_PYTHON} main.py"]
        # the testbed's login node: not contacted, nothing shipped, neither to the default remote
        # directory nor to one of the dry-run's own
        proc = _cli_in(home, "run", "--dryrun", "--workspace", ws, "-s", SCHEDULER, "-cfg", _plain_cfg(remote_cfg),
                       *args)
        assert proc.returncode == 0, proc.stderr
        assert f"# before sbatch: copy the workspace {ws} to {remote_cfg['login']}:~/.torchx_ext/slurm_jobs/" \
            in proc.stdout
        own = f"txe-dryrun-{os.getpid()}"
        proc = _cli_in(home, "run", "--dryrun", "--workspace", ws, "-s", SCHEDULER, "-cfg",
                       _plain_cfg({**remote_cfg, "remote_dir": f"{own}/jobs"}), *args)
        assert proc.returncode == 0, proc.stderr
        assert f"copy the workspace {ws} to {remote_cfg['login']}:{own}/jobs/workspaces/" in proc.stdout
        assert _ssh_sh(remote_cfg, 'ls -d -- "$1" 2>/dev/null || :', own) == ""
        # an unreachable login (a closed port): the dry-run works offline
        closed = f"nobody@127.0.0.1:{_free_port()}"
        proc = _cli_in(home, "run", "--dryrun", "--workspace", ws, "-s", SCHEDULER, "-cfg",
                       f"partition={remote_cfg['partition']},login={closed}", *args)
        assert proc.returncode == 0, proc.stderr
        assert f"TORCHX_EXT_APP_ID={closed}:" in proc.stdout
        assert os.listdir(home) == []  # no record, no copy, no ssh control socket
        assert _remote_tree(remote_cfg, ".torchx_ext") == remote_before
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_env_values_are_private_from_creation_here_and_on_the_login_node(remote_cfg: dict[str, str]) -> None:
    import uuid

    home = _open_home()
    top = f".torchx_ext_priv_{uuid.uuid4().hex[:8]}"  # under the remote home, made by this test's app
    cfg = {**remote_cfg, "remote_dir": f"{top}/slurm_jobs"}
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    code = "import os; print('value', os.environ['TXE_SECRET'], flush=True)"
    try:
        proc = _cli_in(home, "run", "-s", SCHEDULER, "-cfg", _plain_cfg(cfg), "--workspace", "", "group.roles",
                       "--cpu", "1", "--memMB", "300", "--image", _txe_home(), "--env", f"TXE_SECRET={secret}",
                       f"main={REMOTE_PYTHON} -c \"{code}\"")
        assert proc.returncode == 0, proc.stderr
        handle = next(line for line in proc.stdout.splitlines() if line.startswith(f"{SCHEDULER}://"))
        out = cli_status_until_over(lambda: _cli_in(home, "status", handle).stdout)
        assert "SUCCEEDED" in out, out
        app_id = handle.rsplit("/", 1)[-1]
        assert f"slurm_jobs/{app_id}/app.json" in assert_private(home, secret.encode())
        # on the login node: every file holding it 0600, every directory up to {top} (included) 0700;
        # nothing under {top} open to others
        script = ('cd -- "$1" || exit 1; find . -perm /077 -printf "OPEN %p %m\\n"; '
                  'grep -rl -- "$2" . | while IFS= read -r f; do printf "HOLDS %s %s\\n" "$f" "$(stat -c %a "$f")"; '
                  'd=$(dirname "$f"); while [ "$d" != . ]; do printf "DIR %s %s\\n" "$d" "$(stat -c %a "$d")"; '
                  'd=$(dirname "$d"); done; done; printf "TOP %s\\n" "$(stat -c %a .)"')
        report = _ssh_sh(cfg, script, top, secret).splitlines()
        assert not [ln for ln in report if ln.startswith("OPEN")], report
        holds = [ln.split() for ln in report if ln.startswith("HOLDS")]
        assert {(h[1].rsplit("/", 1)[-1], h[2]) for h in holds} >= {("script.sbatch", "600"), ("log", "600")}, holds
        assert all(h[2] == "600" for h in holds), holds
        assert all(ln.split()[2] == "700" for ln in report if ln.startswith("DIR")), report
        assert "TOP 700" in report, report
    finally:
        shutil.rmtree(home, ignore_errors=True)
        _ssh(remote_cfg, "rm", "-rf", "--", top)


def test_list_warns_for_a_cluster_it_cannot_ask_and_lists_the_others(
        runner: Runner, remote_cfg: dict[str, str], fresh_home: str, tmp_path: object,
        caplog: pytest.LogCaptureFixture) -> None:
    """A cluster that cannot be asked (here: its login node behind a cut link) is one warning;
    the apps of every other cluster are still listed (issue 24)."""
    proxy, config = _proxied_login(str(tmp_path), "txe-gone", "  ConnectTimeout 3\n")
    sleep = "import time; time.sleep(60)"
    gone = runner.run(_app("gone", sleep), SCHEDULER, {"partition": remote_cfg["partition"], "login": "txe-gone",
                                                        "ssh_config": config})
    here = runner.run(_app("here", sleep), SCHEDULER, remote_cfg)
    try:
        proxy.cut()
        with get_runner() as fresh:  # no master connection of the submissions is reused
            listed = {a.app_handle for a in fresh.list(SCHEDULER)}
        assert here in listed and gone not in listed, listed
        warnings = [r.getMessage() for r in caplog.records if "could not be asked" in r.getMessage()]
        assert len(warnings) == 1 and "txe-gone" in warnings[0], warnings
    finally:
        subprocess.run([SCANCEL, _job_id(gone), _job_id(here)], check=False)
