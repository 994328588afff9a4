"""``slurm_jobs``' launcher on the batch node (:mod:`torchx_ext.schedulers.slurm_jobs.node`) without
a cluster: with fake steps (what it performs for the engine, what it leaves in the job directory),
and the rendered script run end to end with a fake ``srun``/``scontrol`` on PATH (the shipped engine
runs on the standard library alone; a node without its Python fails with one line)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import IO, Any

import pytest
from torchx.specs import AppDef, AppState, Resource, Role

from torchx_ext.groups import mark_service
from torchx_ext.schedulers.slurm_jobs import node
from torchx_ext.schedulers.slurm_jobs.scheduler import create_scheduler


@pytest.mark.parametrize("tasks,n,expected", [
    ("2(x2),1", 5, "n1 n1 n2 n2 n3"),
    ("1,3,1", 5, "n1 n2 n2 n2 n3"),
    ("", 4, "n1 n2 n3 n1"),  # unknown layout: round robin
])
def test_replica_placement_follows_slurm_layout(tasks: str, n: int, expected: str) -> None:
    assert " ".join(node.layout(["n1", "n2", "n3"], tasks, n)) == expected


# ---------------------------------------------------------------------- fake steps ----------------
class FakeStep:
    """A step that runs until the test ends it (``end``) or the launcher stops it (exit 143)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: IO[bytes], ended: threading.Event) -> None:
        self.argv, self.env, self.ended = argv, env, ended
        self.done = threading.Event()
        self.returncode: int | None = None
        self.reported = False
        self.terminated = False

    def end(self, code: int) -> None:
        self.returncode = code
        self.done.set()
        self.ended.set()

    def terminate(self) -> None:
        self.terminated = True
        if not self.done.is_set():
            self.end(143)


def _spec(*roles: tuple[str, int, bool, int, str], backoff: float = 0.0) -> dict[str, Any]:
    comps = [{"name": name, "dirname": name, "env_suffix": name.upper(), "service": svc, "num_replicas": n,
              "srun_opts": ["--exact", f"--job-name={node.APP_ID_TOKEN}"], "max_retries": retries,
              "retry_policy": policy,
              "replicas": [{"replica_id": k, "argv": ["python3", "-c", "x", f"id={node.APP_ID_TOKEN}", "a b", ""],
                            "env": {"K": f"v{node.APP_ID_TOKEN}"}} for k in range(n)]}
             for name, n, svc, retries, policy in roles]
    return {"components": comps, "container": False, "retry_backoff_s": backoff, "app_id_prefix": ""}


def _launcher(tmp_path: Any, spec: dict[str, Any], **environ: str) -> node.Launcher:
    steps: list[FakeStep] = []

    def new_step(argv: list[str], env: dict[str, str], log: IO[bytes], ended: threading.Event) -> Any:
        steps.append(FakeStep(argv, env, log, ended))
        return steps[-1]

    la = node.Launcher(str(tmp_path), spec, {"SLURM_JOB_ID": "42", "TORCHX_EXT_UMASK": "0022", **environ},
                       "/usr/bin/srun", step=new_step)
    la.hosts = [f"10.0.0.{g}" for g in range(len(spec["components"]))]
    for r in la.replicas:
        r.node = f"n{r.group}"
        node._ADDR[r.node] = f"10.0.0.{r.group}"
    la.steps = steps  # type: ignore[attr-defined]
    return la


def _current(la: node.Launcher, key: tuple[str, int]) -> FakeStep:
    step = la.by_key[key].step
    assert isinstance(step, FakeStep)
    return step


def _read(tmp_path: Any, rel: str) -> str | None:
    path = os.path.join(str(tmp_path), rel)
    return open(path).read() if os.path.exists(path) else None


def test_a_step_is_srun_on_its_node_with_exact_argv_and_the_discovery_env(tmp_path: Any) -> None:
    la = _launcher(tmp_path, _spec(("a", 1, False, 0, "APPLICATION"), ("b", 2, True, 0, "APPLICATION")))
    la.report(node.engine.Begin())
    step = _current(la, ("b", 1))
    assert step.argv == ["/usr/bin/srun", "--het-group=1", "--nodelist=n1", "--exact", "--job-name=42",
                         "bash", "-c", node.STEP_TASK, "torchx-ext", "python3", "-c", "x", "id=42", "a b", ""]
    env = step.env
    assert (env["K"], env["TORCHX_EXT_APP_ID"], env["TORCHX_EXT_ROLE"], env["TORCHX_EXT_REPLICA_ID"]) == ("v42", "42", "b", "1")
    assert (env["TORCHX_EXT_HOSTS_A"], env["TORCHX_EXT_HOSTS_B"], env["TORCHX_RANK0_HOST"]) == ("10.0.0.0", "10.0.0.1", "10.0.0.1")
    assert (env["TORCHX_EXT_ATTEMPT"], env["SLURM_UMASK"], env["TORCHX_EXT_NUM_REPLICAS"]) == ("1", "0022", "2")
    assert _read(tmp_path, "b/1/host") == "n1 10.0.0.1\n" and _read(tmp_path, "b/1/attempt") == "1\n"


def test_a_restart_then_success_leaves_the_files_describe_reads(tmp_path: Any) -> None:
    la = _launcher(tmp_path, _spec(("a", 2, False, 1, "REPLICA")))
    la.report(node.engine.Begin())
    _current(la, ("a", 1)).end(3)
    la.poll()
    assert _read(tmp_path, "restarts") == ("replica:a/1 role 'a' replica 1 ended with exit code 3; "
                                           "REPLICA policy, restart 1 of 1\n")
    assert _read(tmp_path, "a/1/attempt") == "2\n" and _read(tmp_path, "a/1/exit") is None
    assert "[torchx-ext] attempt 2 of role 'a' replica 1 begins: role 'a' replica 1 ended with exit code 3" \
        in (_read(tmp_path, "a/1/log") or "")
    assert not _current(la, ("a", 0)).terminated  # REPLICA: the other one goes on
    _current(la, ("a", 1)).end(0)
    _current(la, ("a", 0)).end(0)
    la.poll()
    assert la.engine.verdict is not None and la.code == 0 and _read(tmp_path, "result") == "0 \n"
    assert _read(tmp_path, "a/0/exit") == "0\n" and _read(tmp_path, "a/1/exit") == "0\n"


def test_a_spent_budget_fails_with_the_culprits_code_and_stops_the_rest(tmp_path: Any) -> None:
    la = _launcher(tmp_path, _spec(("a", 2, False, 1, "APPLICATION")))
    la.report(node.engine.Begin())
    _current(la, ("a", 0)).end(137)  # srun: the task was killed by SIGKILL
    la.poll()
    assert "ended with signal SIGKILL" in (_read(tmp_path, "restarts") or "")
    assert _read(tmp_path, "a/1/attempt") == "2\n"  # APPLICATION: both restarted
    _current(la, ("a", 1)).end(5)
    la.poll()
    assert la.code == 5 and _read(tmp_path, "result") == "5 a/1\n"
    assert _read(tmp_path, "a/1/reason") == "after 2 attempts (APPLICATION policy, max_retries=1)\n"
    assert _read(tmp_path, "a/0/stopped") == "" and _read(tmp_path, "a/0/exit") == "143\n"


def test_a_service_is_stopped_when_the_mains_succeed_and_one_ending_early_fails(tmp_path: Any) -> None:
    la = _launcher(tmp_path, _spec(("srv", 1, True, 0, "APPLICATION"), ("m", 1, False, 0, "APPLICATION")))
    la.report(node.engine.Begin())
    _current(la, ("m", 0)).end(0)
    la.poll()
    assert la.code == 0 and _read(tmp_path, "srv/0/stopped") == ""
    (tmp_path / "2").mkdir()
    la = _launcher(tmp_path / "2", _spec(("srv", 1, True, 0, "APPLICATION"), ("m", 1, False, 0, "APPLICATION")))
    la.report(node.engine.Begin())
    _current(la, ("srv", 0)).end(0)
    la.poll()
    assert la.code == 1 and _read(tmp_path / "2", "result") == "1 srv/0\n"  # a service that ended 0: 1


def test_a_requeued_job_goes_on_from_the_snapshot_without_drawing_a_budget(tmp_path: Any) -> None:
    spec = _spec(("a", 1, False, 2, "REPLICA"))
    la = _launcher(tmp_path, spec)
    la.report(node.engine.Begin())
    _current(la, ("a", 0)).end(1)
    la.poll()  # restart 1: attempt 2 runs when Slurm requeues the job
    again = _launcher(tmp_path, spec, SLURM_RESTART_COUNT="1")
    again.report(again.first_event())
    assert _read(tmp_path, "requeues") == "1\n" and _read(tmp_path, "a/0/attempt") == "3\n"
    assert (_read(tmp_path, "restarts") or "").count("\n") == 1  # the requeue drew no budget
    assert "attempt 3 of role 'a' replica 0 begins: Slurm requeued the job (requeue 1)" in (_read(tmp_path, "a/0/log") or "")
    assert _current(again, ("a", 0)).env["TORCHX_EXT_ATTEMPT"] == "3"
    assert again.engine.used == {"replica:a/0": 1}


def test_a_step_that_cannot_start_fails_the_group(tmp_path: Any) -> None:
    la = _launcher(tmp_path, _spec(("a", 2, False, 0, "APPLICATION")))

    def broken(*_: Any) -> Any:
        raise FileNotFoundError("no srun")

    la.new_step = broken
    la.report(node.engine.Begin())
    assert la.engine.verdict is not None and "failed to start: no srun" in la.engine.verdict.msg
    assert _read(tmp_path, "result") == "1 a/0\n"


# ---------------------------------------------------------------------- readiness ----------------
def _ported_launcher(tmp_path: Any, port: int, timeout: float) -> node.Launcher:
    """A service ``srv`` that declares ``port`` on 127.0.0.1 and a role ``m`` held until it accepts."""
    spec = _spec(("srv", 1, True, 0, "APPLICATION"), ("m", 1, False, 0, "APPLICATION"))
    spec["components"][0]["ports"], spec["ready_timeout_s"] = [port], timeout
    la = _launcher(tmp_path, spec)
    la.by_key[("srv", 0)].node = "local"
    node._ADDR["local"] = "127.0.0.1"
    return la


def _loop(la: node.Launcher, until: Any, timeout: float = 10.0) -> None:
    """The launcher's main loop (Launcher.run without Slurm's placement) until ``until()``."""
    deadline = time.time() + timeout
    while not until() and la.engine.verdict is None:
        assert time.time() < deadline, "the launcher's loop never got there"
        due = la.engine.next_due
        la.ended.wait(max(0.0, min(node.POLL_S, due - time.time())) if due is not None else node.POLL_S)
        la.ended.clear()
        la.poll()


def test_the_others_start_once_the_services_port_accepts_connections(tmp_path: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening yet: connections are refused
        la = _ported_launcher(tmp_path, sock.getsockname()[1], timeout=30)
        la.report(node.engine.Begin())
        assert [s.argv[2] for s in la.steps] == ["--nodelist=local"]  # type: ignore[attr-defined]
        assert la.by_key[("m", 0)].step is None and _read(tmp_path, "m/0/host") is None
        time.sleep(0.5)  # the probe is refused meanwhile, and tries again
        la.poll()
        assert la.by_key[("m", 0)].step is None
        sock.listen()
        _loop(la, lambda: la.by_key[("m", 0)].step is not None)
    assert la.engine.verdict is None and la.engine.replicas[("srv", 0)].ready
    assert _read(tmp_path, "m/0/attempt") == "1\n"


def test_a_service_not_ready_in_time_fails_the_app_and_describe_says_so(tmp_path: Any) -> None:
    from torchx_ext.schedulers.slurm_jobs import client, status
    from torchx_ext.schedulers.slurm_jobs.script import SlurmJob

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # never listens
        port = sock.getsockname()[1]
        la = _ported_launcher(tmp_path, port, timeout=0.5)
        la.report(node.engine.Begin())
        roles = [{"name": n, "dirname": n, "service": n == "srv", "num_replicas": 1, "image": "", "entrypoint": "x"}
                 for n in ("srv", "m")]
        record = {"app_id": "42", "job_dir": str(tmp_path), "job_root": str(tmp_path), "roles": roles}
        files = client.read_job_files(str(tmp_path), client.job_file_names(roles))
        shown = status.replicas(record, SlurmJob("42", "RUNNING"), files)[1]
        assert [r.replicas[0].state for r in shown] == [AppState.RUNNING, AppState.PENDING]  # m is held
        _loop(la, lambda: False)
    assert la.engine.verdict is not None
    msg = (f"service role 'srv' replica 0 was not ready: port {port} did not accept connections within 0.5 s "
           "(run option ready_timeout_s); the other roles were not started")
    assert la.engine.verdict.msg == msg and _read(tmp_path, "verdict") == msg + "\n"
    assert la.code == 1 and _read(tmp_path, "result") == "1 \n"
    assert _current(la, ("srv", 0)).terminated and _read(tmp_path, "srv/0/stopped") == ""
    assert len(la.steps) == 1 and _read(tmp_path, "m/0/log") is None  # type: ignore[attr-defined]
    files = client.read_job_files(str(tmp_path), client.job_file_names(roles))
    for job in (SlurmJob("42", "FAILED", exit_code=1), None):  # Slurm knows the job; forgot it
        _, statuses, outcomes = status.replicas(record, job, files)
        assert status.app_state("42", record, job, None, outcomes, files, lambda: None)[1] == msg  # type: ignore
        assert statuses[0].replicas[0].state == AppState.FAILED


def test_a_probe_gives_up_once_its_attempt_is_over(tmp_path: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        la = _ported_launcher(tmp_path, sock.getsockname()[1], timeout=30)
        la.start(la.by_key[("srv", 0)], 1)  # its step, without the engine's Probe (no probe thread)
        r, probe = la.by_key[("srv", 0)], node.engine.Probe(("srv", 0), 1, (sock.getsockname()[1],), 0.0)
        step = r.step
        _current(la, ("srv", 0)).end(1)  # ended (or stopped): its port is no news
        la.probe(r, step, "127.0.0.1", probe).join(5)
        r.step = None  # superseded by another attempt
        la.probe(r, step, "127.0.0.1", probe).join(5)
        r.step = step
        step.done.clear()  # type: ignore[union-attr]
        la.engine.verdict = node.engine.Verdict("FAILED", "x")  # decided
        la.probe(r, step, "127.0.0.1", probe).join(5)
        assert la.readies.empty()
        la.engine.verdict = None
        la.probe(r, step, "127.0.0.1", probe).join(5)  # its own attempt, listening: Ready
        assert la.readies.get_nowait() == node.engine.Ready(("srv", 0), 1)


def test_a_real_step_stamps_both_streams_and_keeps_the_last_partial_line(tmp_path: Any) -> None:
    ended = threading.Event()
    with open(tmp_path / "log", "ab", buffering=0) as log:
        step = node.Step(["sh", "-c", "printf 'o1\\n'; printf 'e1\\n\\377 no newline' >&2; exit 3"],
                         dict(os.environ), log, ended)
        assert ended.wait(10) and step.returncode == 3
    lines = sorted(line.split(b" ", 1)[1] for line in (tmp_path / "log").read_bytes().splitlines())
    assert lines == [b"E e1", b"E \xff no newline", b"O o1"]


# ---------------------------------------------------------------------- the whole script ---------
def _fake_bin(tmp_path: Any) -> str:
    """``srun`` that drops its options and runs the rest; ``scontrol`` for hostnames and nodes."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    (bindir / "scontrol").write_text(textwrap.dedent("""\
        #!/bin/bash
        if [[ $1 == show && $2 == hostnames ]]; then echo n1
        elif [[ $1 == show && $2 == node ]]; then echo "NodeName=$4 NodeAddr=10.0.0.1 X=y"
        fi
    """))
    for f in bindir.iterdir():
        f.chmod(0o755)
    return str(bindir)


def _run_script(tmp_path: Any, app: AppDef, **cfg: Any) -> tuple[subprocess.CompletedProcess[str], str]:
    text = repr(create_scheduler("t").submit_dryrun(app, {"job_dir": str(tmp_path / "jobs"), **cfg}).request)
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2",
           "TORCHX_EXT_SUBMISSION": "tok"}
    proc = subprocess.run(["bash", "-s"], input=text, capture_output=True, text=True, env=env, timeout=120)
    return proc, str(tmp_path / "jobs" / "7.tok")


def test_the_script_runs_the_shipped_engine_on_the_standard_library_alone(tmp_path: Any) -> None:
    code = "import os, sys; print(os.environ['TORCHX_EXT_APP_ID'], sys.argv[1:]); sys.exit(int(os.environ['TORCHX_EXT_ATTEMPT']) < 2)"
    role = Role("main", image=str(tmp_path), entrypoint=sys.executable, args=["-c", code, "a b", "$HOME"],
                num_replicas=2, max_retries=1, resource=Resource(cpu=1, gpu=0, memMB=100))
    proc, job_dir = _run_script(tmp_path, AppDef("e2e", roles=[mark_service(role, False)]))
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(job_dir, "main", "1", "log")) as f:
        log = f.read()
    assert "7 ['a b', '$HOME']" in log and "[torchx-ext] attempt 2 of role 'main' replica 1 begins" in log
    with open(os.path.join(job_dir, "result")) as f:
        assert f.read() == "0 \n"
    modes = {oct(os.stat(os.path.join(d, n)).st_mode & 0o777) for d, _, ns in os.walk(job_dir) for n in ns}
    assert modes == {"0o600"}, modes
    with open(os.path.join(job_dir, "engine.json")) as f:
        assert json.load(f)["num_restarts"] == 1


def test_a_node_without_its_python_fails_with_one_line(tmp_path: Any) -> None:
    role = Role("main", image=str(tmp_path), entrypoint="true", resource=Resource(cpu=1, gpu=0, memMB=100))
    proc, job_dir = _run_script(tmp_path, AppDef("nopy", roles=[role]), node_python="no-such-python3")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    with open(os.path.join(job_dir, "error")) as f:
        assert f.read() == f"the node Python 'no-such-python3' (run option node_python) is not found on {os.uname().nodename}\n"
