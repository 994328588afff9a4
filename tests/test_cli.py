"""The way in, as a newcomer meets it through the ``torchx`` CLI: the headline example, ``-cfg``
typos and bad values, Ctrl-C; and the service waiter the group components use (host only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest
from torchx.schedulers import get_scheduler_factories
from torchx.specs import runopts

from torchx_ext import wait_for
from torchx_ext.components.group import roles, server_client
from torchx_ext.errors import InvalidOptionError, UnknownOptionError
from torchx_ext.executors import runopts_for
from torchx_ext.schedulers.host.scheduler import HostExecutor

CLI = [sys.executable, "-m", "torchx.cli.main"]


def cli(*args: str, cwd: Optional[str] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def handle_in(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("host://"))


# ---------------------------------------------------------------- the headline example ----------
def test_headline_example_passes_20_times_in_a_row(tmp_path: str) -> None:
    def once(i: int) -> tuple[int, str]:
        port = free_port()
        out = cli("run", "-s", "host", "--wait", "group.server_client", "--port", str(port),
                  "--server", f"python -m http.server {port}",
                  "--client", f"sh -c 'curl -sf http://$TORCHX_EXT_HOSTS_SERVER:{port}/ >/dev/null'",
                  cwd=str(tmp_path), timeout=180)
        return out.returncode, out.stdout[-500:] + out.stderr[-1500:]

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=5) as pool:  # 2 cores: a CLI process is mostly import time
        results = list(pool.map(once, range(20)))
    failed = [(i, text) for i, (rc, text) in enumerate(results) if rc != 0]
    assert not failed, f"{len(failed)} of 20 failed; first: {failed[0]}"
    print(f"20 headline runs in {time.monotonic() - start:.1f}s")


def test_group_roles_help_example_waits_for_its_service(tmp_path: str) -> None:
    port = free_port()
    out = cli("run", "-s", "host", "--wait", "group.roles", "--services", "server", "--ports", f"server={port}",
              f"server=python3 -m http.server {port}",
              f"client=sh -c 'curl -sf http://$TORCHX_EXT_HOSTS_SERVER:{port}/ >/dev/null'", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_service_that_never_listens_fails_the_app_in_one_line(tmp_path: str) -> None:
    port = free_port()
    out = cli("run", "-s", "host", "-cfg", "ready_timeout_s=1", "--wait", "group.roles", "--services", "server",
              "--ports", f"server={port}", "server=sleep 30", "client=echo never", cwd=str(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    status = cli("status", handle_in(out.stdout))
    assert (f"service role 'server' replica 0 was not ready: port {port} did not accept connections within 1 s "
            "(run option ready_timeout_s); the other roles were not started") in status.stdout, status.stdout
    log = cli("log", handle_in(out.stdout) + "/client/0")
    assert "never" not in log.stdout


# ---------------------------------------------------------------- the waiter itself -------------
def _run_waiter(port: int, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The waiter as a role runs it (``python3 -c PROGRAM ...``), for service 'my-svc' on ``port``."""
    entrypoint, argv = wait_for.wrap(args[0], args[1:], {"my-svc": port}, 5)
    return subprocess.run([entrypoint, *argv], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_waiter_waits_then_execs_the_command_with_its_arguments_exactly() -> None:
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later() -> None:
        time.sleep(0.5)
        server.bind(("127.0.0.1", port))
        server.listen()

    t = threading.Thread(target=listen_later)
    t.start()
    try:
        words = ["a b", "$HOME", "'q\"", "--", "-c", "ünï", ""]
        start = time.monotonic()
        out = _run_waiter(port, ["printf", "[%s]\n", *words],
                          {"TORCHX_EXT_HOSTS_MY_SVC": "127.0.0.1,127.0.0.1", "X": "1"})
        assert out.returncode == 0, out.stderr
        assert out.stdout == "".join(f"[{w}]\n" for w in words)
        assert out.stderr == ""
        assert time.monotonic() - start >= 0.4  # it did wait for the listener
    finally:
        t.join()
        server.close()


def test_waiter_failures_are_one_line() -> None:
    no_host = _run_waiter(free_port(), ["true"], {"TORCHX_EXT_HOSTS_MY_SVC": ""})
    assert no_host.returncode == 1
    assert no_host.stderr == "torchx-ext: cannot wait for service 'my-svc': $TORCHX_EXT_HOSTS_MY_SVC names no host\n"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        missing = _run_waiter(s.getsockname()[1], ["/nonexistent/prog", "x"], {"TORCHX_EXT_HOSTS_MY_SVC": "127.0.0.1"})
    assert missing.returncode == 127
    assert missing.stderr == "torchx-ext: cannot run '/nonexistent/prog': No such file or directory\n"


def test_components_map_the_port_and_leave_the_commands_as_given() -> None:
    """The engine waits on a service's port_map: the commands are the user's, unwrapped."""
    app = server_client(server="python3 -m http.server 8000", client="curl -s http://x:8000/", port=8000)
    srv, cl = app.roles
    assert srv.entrypoint == "python3" and srv.args == ["-m", "http.server", "8000"]
    assert srv.port_map == {"server": 8000} and cl.port_map == {}
    assert cl.entrypoint == "curl" and cl.args == ["-s", "http://x:8000/"]
    assert server_client(server="a", client="b c").roles[0].port_map == {}  # no port: nothing waits

    app = roles("db=serve", "vllm=serve2", "judge=run x", services="db,vllm", ports="db=5432,vllm=8000")
    db, vllm, judge = app.roles
    assert (db.entrypoint, vllm.entrypoint, db.port_map, vllm.port_map) == ("serve", "serve2", {"db": 5432},
                                                                           {"vllm": 8000})
    assert (judge.entrypoint, judge.args, judge.port_map) == ("run", ["x"], {})
    with pytest.raises(ValueError, match=r"ports: \['judge'\] not in --services"):
        roles("db=serve", "judge=run", services="db", ports="judge=1")
    with pytest.raises(ValueError, match="expected a TCP port"):
        roles("db=serve", "judge=run", services="db", ports="db=http")
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['nope'\]"):
        roles("db=serve", "judge=run", services="db", ports="nope=1")


# ---------------------------------------------------------------- -cfg ----------------------------
@pytest.mark.parametrize("cfg, line", [
    ("retry_backof_s=1", "torchx: error: Unknown option 'retry_backof_s' for scheduler 'host' "
                         "(did you mean 'retry_backoff_s'?). Valid options: auto_set_cuda_visible_devices, "
                         "dependencies, gpu_count, job_dir, ready_timeout_s, retry_backoff_s"),
    ("dependency=host://torchx/x-1", "torchx: error: Unknown option 'dependency' for scheduler 'host' "
                                     "(did you mean 'dependencies'?). Valid options: "),
    ("retry_backoff_s=abc", "torchx: error: option 'retry_backoff_s' of scheduler 'host' cannot be 'abc': "
                            "expected float (a number)"),
    ("gpu_count=two", "torchx: error: option 'gpu_count' of scheduler 'host' cannot be 'two': "
                      "expected int (a whole number)"),
    ("auto_set_cuda_visible_devices=maybe", "torchx: error: option 'auto_set_cuda_visible_devices' of scheduler "
                                            "'host' cannot be 'maybe': expected bool (true/false, 1/0, yes/no)"),
])
def test_bad_cfg_is_one_line_through_the_cli(cfg: str, line: str, tmp_path: str) -> None:
    out = cli("run", "-s", "host", "--dryrun", "-cfg", cfg, "utils.echo", cwd=str(tmp_path))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr


def test_cfg_values_are_parsed_strictly_and_typed() -> None:
    opts = runopts_for(HostExecutor)
    assert opts.cfg_from_str("auto_set_cuda_visible_devices=YES,gpu_count=2,retry_backoff_s=1.5,"
                             "dependencies=host://s/a-1;host://s/b-2") == {
        "auto_set_cuda_visible_devices": True, "gpu_count": 2, "retry_backoff_s": 1.5,
        "dependencies": ["host://s/a-1", "host://s/b-2"]}
    for word, value in [("true", True), ("1", True), ("no", False), ("False", False), ("0", False)]:
        assert opts.cfg_from_str(f"auto_set_cuda_visible_devices={word}") == {"auto_set_cuda_visible_devices": value}
    with pytest.raises(UnknownOptionError, match="did you mean 'gpu_count'"):
        opts.cfg_from_str("gpu_cont=1")
    with pytest.raises(InvalidOptionError, match="option 'gpu_count' of scheduler 'host' cannot be 'two'"):
        opts.resolve({"gpu_count": "two"})  # a Python caller's cfg
    assert opts.resolve({"gpu_count": 1})["gpu_count"] == 1


def test_torchx_builtin_schedulers_keep_their_own_runopts() -> None:
    opts = get_scheduler_factories()["local_cwd"]("t").run_opts()
    assert type(opts) is runopts


# ---------------------------------------------------------------- Ctrl-C --------------------------
def _interrupt(args: list[str], ready: str, cwd: str, merge: bool = False) -> tuple[int, str, list[str]]:
    """Starts the CLI, sends SIGINT once its stderr (or, merged, its output) shows ``ready``;
    returns its exit status, its stdout and the lines it wrote after the signal."""
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, text=True, cwd=cwd,
                         stderr=subprocess.STDOUT if merge else subprocess.PIPE)
    stream = p.stdout if merge else p.stderr
    assert stream is not None
    seen = []
    for line in stream:
        seen.append(line)
        if ready in line:
            break
    else:
        raise AssertionError(f"never saw {ready!r}: {''.join(seen)}")
    time.sleep(0.5)  # inside the wait loop
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, (out if merge else err).splitlines()


def _expected(handle: str) -> str:
    return (f"torchx: interrupted; the app keeps running: {handle} (see it with: torchx status {handle}; "
            f"cancel it with: torchx cancel {handle})")


def test_ctrl_c_names_the_handle_and_the_cancel_command(tmp_path: str) -> None:
    rc, out, after = _interrupt(["run", "-s", "host", "--wait", "utils.sh", "sh", "-c", "echo started; sleep 60"],
                                "Waiting for the app to finish", str(tmp_path))
    handle = handle_in(out)
    try:
        assert rc == -signal.SIGINT, (rc, after)
        assert after == [_expected(handle)], after
        assert "State: RUNNING" in cli("status", handle).stdout

        # `torchx log --tail` of the same app, interrupted once it has shown the app's output
        rc, _, after = _interrupt(["log", "--tail", handle], "started", str(tmp_path), merge=True)
        assert rc == -signal.SIGINT and after == [_expected(handle)], after
        assert "State: RUNNING" in cli("status", handle).stdout
    finally:
        cli("cancel", handle)
