"""Following a long log to its end: our ``log_iter(should_tail=True)`` against the engine's own follow.

A replica writes ``--mb`` MB of 100-byte lines as fast as it can (then a last line ``END-OF-LOG``) and
ends. We follow it from the moment it is submitted to its end, once through the scheduler's
``log_iter`` (what ``torchx log -f`` runs) and once, for an identical app, the engine's own way:

- host and slurm_jobs (local): ``tail -c +1 -F`` of the file the replica's log is kept in;
- slurm_jobs over SSH (``--login``, default the sshd testbed's): ``ssh <login> tail -c +1 -F <file>``;
- docker_jobs: the docker SDK's ``logs(follow=True, stream=True)`` (what ``docker logs -f`` asks the daemon);
  bytes: what the daemon's answers to ``logs`` carried (the SDK reads its socket with recv, which
  ``rchar`` does not count).

Printed per backend: the log's size; bytes this process read while following (``rchar`` of
``/proc/thread-self/io``: file, pipe and socket reads alike; for ssh, what came through the
connection; for tail, what it handed on), ours against the raw follow's and as a multiple of the
log (goal <= 1.1x: each byte fetched once); client CPU
(this process plus its children) ours vs raw, where the raw follow's lines are read by Python as
any log consumer's are (goal <= 1.5x); lines seen (ours must see every line once). ray_jobs has
its row in bench_ray_jobs.py.

    for tb in slurm docker sshd; do bash testbed/$tb.sh start; done
    source testbed/.state/docker.env; source testbed/.state/sshd.env
    .venv/bin/python bench/bench_logs.py --mb 200 [--only host,slurm,slurm-ssh,docker] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from torchx.specs import AppDef, Resource, Role

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = b"END-OF-LOG"
WRITER = ("import sys\n"
          "w = sys.stdout.buffer\n"
          "body = b'x' * 89 + b'\\n'\n"
          "for i in range(int(sys.argv[1])):\n"
          "    w.write(b'%010d ' % i + body)\n"
          "w.write(b'END-OF-LOG\\n')\n"
          "w.flush()\n")


def _rchar() -> int:
    # this thread's own reads (files, pipes, sockets): /proc/self/io would add the reaped
    # children's (tail, ssh), counting a byte piped to us twice
    with open("/proc/thread-self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Measure:
    """CPU seconds and bytes read by this process (and reaped children) between enter and exit."""

    def __enter__(self) -> Measure:
        self.cpu0, self.read0, self.t0 = _cpu(), _rchar(), time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cpu, self.read, self.wall = _cpu() - self.cpu0, _rchar() - self.read0, time.time() - self.t0


def app(lines: int, image: str) -> AppDef:
    role = Role(name="w", image=image, entrypoint="python3", args=["-c", WRITER, str(lines)],
                resource=Resource(cpu=1, gpu=0, memMB=512))
    return AppDef(name="bench-logs", roles=[role])


def follow_ours(sched: Any, app_id: str) -> tuple[int, bool]:
    n, last = 0, ""
    for line in sched.log_iter(app_id, "w", 0, should_tail=True):
        n += 1
        last = line
    return n, last.strip() == END.decode()


def follow_pipe(argv: list[str]) -> int:
    """Runs a ``tail -F`` (here or over ssh) and reads its lines until the END line; returns lines."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    got = 0
    for line in proc.stdout:  # lines, as any consumer of a log (and log_iter) hands them on
        got += 1
        if line.endswith(END + b"\n"):  # stamped in our files: "<time> [O ]END-OF-LOG"
            break
    proc.terminate()
    proc.wait()
    return got


def wait_file(path_of: Callable[[], Optional[str]], timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = path_of()
        if path:
            return path
        time.sleep(0.05)
    raise TimeoutError("the replica's log file never appeared")


def wait_over(sched: Any, app_id: str, timeout: float = 600) -> None:
    from torchx.specs import is_terminal

    deadline = time.time() + timeout
    while time.time() < deadline:
        resp = sched.describe(app_id)
        if resp is not None and is_terminal(resp.state):
            return
        time.sleep(0.2)
    raise TimeoutError(app_id)


def row(name: str, size: int, ours: Measure, lines: int, exact: bool, raw: Measure, how: str) -> float:
    """Prints one run's row; returns its CPU ratio."""
    print(f"{name:10s} log {size / 1e6:7.1f} MB | bytes read ours/raw {ours.read / raw.read:5.2f}x | "
          f"ours: read {ours.read / size:5.2f}x the log, "
          f"cpu {ours.cpu:6.2f} s, {lines} lines{'' if exact else ' (END missing!)'}, wall {ours.wall:5.1f} s | "
          f"raw ({how}): read {raw.read / size:5.2f}x, cpu {raw.cpu:6.2f} s | "
          f"cpu ratio {ours.cpu / max(raw.cpu, 1e-3):5.2f}x",
          flush=True)
    return ours.cpu / max(raw.cpu, 1e-3)


# ---------------------------------------------------------------------------- backends ----------
def bench_host(lines: int) -> float:
    from torchx_ext import state
    from torchx_ext.schedulers.host import supervisor as sup
    from torchx_ext.schedulers.host.scheduler import create_scheduler

    sched = create_scheduler("bench")

    def submit() -> tuple[str, str]:
        app_id = sched.schedule(sched.submit_dryrun(app(lines, ROOT), {}))
        return app_id, os.path.join(sup.log_dir(state.scheduler_dir("host", app_id), "w", 0), "combined.log")

    app_id, path = submit()
    with Measure() as ours:
        n, exact = follow_ours(sched, app_id)
    size = os.path.getsize(path)
    app2, path2 = submit()
    with Measure() as raw:
        follow_pipe(["tail", "-c", "+1", "-F", path2])
    ratio = row("host", size, ours, n, exact, raw, "tail -F")
    for a in (app_id, app2):
        wait_over(sched, a)
        sched.delete(a)
    return ratio


def _slurm_log(sched: Any, app_id: str) -> Optional[str]:
    rec = sched._record(app_id) or {}  # noqa: SLF001 - the bench needs the file the raw follow tails
    roles = rec.get("roles") or []
    if not rec.get("job_dir") or not roles:
        return None
    return f"{rec['job_dir']}/{roles[0]['dirname']}/0/log"


def bench_slurm(lines: int, login: Optional[str], ssh_config: Optional[str]) -> float:
    from torchx_ext.schedulers.slurm_jobs.scheduler import create_scheduler

    sched = create_scheduler("bench")
    cfg: dict[str, Any] = {"partition": os.environ.get("TORCHX_EXT_TEST_SLURM_PARTITION", "debug")}
    if login:
        cfg["login"] = login
        if ssh_config:
            cfg["ssh_config"] = ssh_config
    image = ROOT if not login else ""  # remote: the job runs in the login user's home

    def submit() -> str:
        return sched.schedule(sched.submit_dryrun(app(lines, image), cfg))

    app_id = submit()
    with Measure() as ours:
        n, exact = follow_ours(sched, app_id)
    wait_over(sched, app_id)
    path = _slurm_log(sched, app_id)
    assert path
    if login:
        ssh = ["ssh", *(["-F", ssh_config] if ssh_config else []), login]
        size = int(subprocess.run([*ssh, "stat", "-c", "%s", shlex.quote(path)], capture_output=True, text=True,
                                  check=True).stdout)
    else:
        size = os.path.getsize(path)
    app2 = submit()
    path2 = wait_file(lambda: _slurm_log(sched, app2))
    with Measure() as raw:
        if login:
            follow_pipe([*ssh, f"tail -c +1 -F {shlex.quote(path2)}"])
        else:
            follow_pipe(["tail", "-c", "+1", "-F", path2])
    ratio = row("slurm-ssh" if login else "slurm", size, ours, n, exact, raw, "ssh tail -F" if login else "tail -F")
    for a in (app_id, app2):
        wait_over(sched, a)
        sched.delete(a)
    return ratio


def bench_docker(lines: int) -> float:
    import docker

    from torchx_ext.schedulers.docker_jobs.logs import AttemptsReader
    from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler

    sched = create_scheduler("bench")
    image = os.environ.get("TORCHX_EXT_TEST_DOCKER_PYTHON", "torchx-ext-test/python:latest")
    api = docker.APIClient()

    def submit() -> str:
        return sched.schedule(sched.submit_dryrun(app(lines, image), {"pull_policy": "never"}))

    def container(app_id: str) -> Optional[str]:
        found = AttemptsReader(api, app_id, "w", 0, None, None, None).containers()
        return found[0]["Id"] if found else None

    # the SDK reads the daemon's socket with recv, which rchar does not count: count what logs() hands on
    fetched = [0]
    logs = docker.APIClient.logs

    def counted(self: Any, *a: Any, **kw: Any) -> Any:
        out = logs(self, *a, **kw)
        if not kw.get("stream"):
            fetched[0] += len(out)
            return out
        return (fetched.__setitem__(0, fetched[0] + len(c)) or c for c in out)

    docker.APIClient.logs = counted  # type: ignore[method-assign]
    app_id = submit()
    with Measure() as ours:
        n, exact = follow_ours(sched, app_id)
    ours.read, fetched[0] = fetched[0], 0
    wait_over(sched, app_id)
    cid = container(app_id)
    size = sum(len(c) for c in logs(api, cid, stream=True, follow=False, timestamps=True))
    app2 = submit()
    cid2 = wait_file(lambda: container(app2))
    with Measure() as raw:
        for _ in api.logs(cid2, stream=True, follow=True, timestamps=True):
            pass
    raw.read = fetched[0]
    docker.APIClient.logs = logs
    ratio = row("docker", size, ours, n, exact, raw, "SDK logs(follow=True)")
    for a in (app_id, app2):
        wait_over(sched, a)
        sched.delete(a)
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=200.0, help="the log's size in MB (100-byte lines)")
    p.add_argument("--only", default="host,slurm,slurm-ssh,docker")
    p.add_argument("--login", default=os.environ.get("TORCHX_EXT_TEST_SSH_HOST"))
    p.add_argument("--ssh-config", default=os.environ.get("TORCHX_EXT_TEST_SSH_CONFIG"))
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per backend; the summary is the median of their CPU ratios (one run moves "
                        "by +-30%% with what the other core does meanwhile)")
    a = p.parse_args()
    lines = int(a.mb * 1e6 / 100)
    only = set(a.only.split(","))
    runs: list[tuple[str, Callable[[], float]]] = [
        ("host", lambda: bench_host(lines)),
        ("slurm", lambda: bench_slurm(lines, None, None)),
        ("slurm-ssh", lambda: bench_slurm(lines, a.login, a.ssh_config)),
        ("docker", lambda: bench_docker(lines)),
    ]
    summary = []
    for name, run in runs:
        if name in only:
            if name == "slurm-ssh" and not a.login:
                print("slurm-ssh: no --login (source testbed/.state/sshd.env)", file=sys.stderr)
                continue
            ratios = sorted(run() for _ in range(a.repeat))
            summary.append(f"{name}: cpu ratio median {statistics.median(ratios):.2f}x "
                           f"(runs: {', '.join(f'{r:.2f}x' for r in ratios)}; goal <= 1.5x)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
