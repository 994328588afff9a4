"""``slurm_jobs`` against raw Slurm commands, in the same run, on the testbed cluster.

    bash testbed/slurm.sh start && .venv/bin/python bench/bench_slurm_jobs.py [--jobs 500] [--submits 10]

1. submit: ``get_runner().run(app, "slurm_jobs")`` (dry-run, script, sbatch, record) against
   ``sbatch --parsable`` of the very same script; median of N each (jobs are held, then cancelled);
2. status of many jobs: ``SlurmJobsScheduler.list()`` (ONE ``squeue --json`` call, target < 1 s)
   against one ``scontrol show job`` per job, over the same held jobs;
3. restart latency (a replica exits 1 -> its next attempt runs, both from the processes' own
   clocks): ``max_retries=1`` (a new step inside the allocation) against Slurm's own way back,
   ``scontrol requeue`` of a ``--requeue`` job, released with ``StartTime=now`` as soon as Slurm
   can start it (Slurm would hold it ~120 s; slurmd refuses it within the second of the requeue);
   median of ``--restarts`` each;
4. over SSH (run option ``login``; with testbed/sshd.sh's ``txe-login``, or ``--login``/``--ssh-config``):
   submit through the runner against a raw ``ssh <login> sbatch --parsable`` of the same script, both
   over the same warm master connection (goal <= 1.2x); status of ``--jobs`` jobs on that cluster,
   ``list()`` (one ``squeue --json`` round trip, goal < 1 s) against a raw ``ssh <login> squeue --json``.

    source testbed/.state/sshd.env && .venv/bin/python bench/bench_slurm_jobs.py

Everything submitted here is cancelled at the end, also when the benchmark fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

from restart_timing import RESTART_CODE, restart_gap
from torchx.runner import get_runner
from torchx.specs import AppDef, Resource, Role

from torchx_ext.schedulers.slurm_jobs.scheduler import create_scheduler


def _sbatch(script: str, *extra: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *extra], input=script, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def _wait(check, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def bench_restart_ours(runner, partition: str) -> float:
    from torchx.specs import AppState

    app = AppDef("restart", roles=[Role("r", image=os.getcwd(), entrypoint=sys.executable, max_retries=1,
                                        args=["-c", RESTART_CODE], resource=Resource(cpu=1, gpu=0, memMB=100))])
    handle = runner.run(app, "slurm_jobs", {"partition": partition})
    _wait(lambda: (st := runner.status(handle)) is not None and st.state == AppState.SUCCEEDED, handle)
    return restart_gap("".join(runner.log_lines(handle, "r", 0)))


def bench_restart_requeue(partition: str, out_dir: str) -> float:
    script = (f"#!/bin/bash\n{sys.executable} -c {shlex.quote(RESTART_CODE)} $((${{SLURM_RESTART_COUNT:-0}} + 1)) "
              "|| { scontrol requeue \"$SLURM_JOB_ID\"; sleep 60; }\n")
    job = _sbatch(script, f"--partition={partition}", "--requeue", "--cpus-per-task=1", "--mem=100",
                  f"--output={out_dir}/raw-%j.out", "--open-mode=append")
    show = lambda: subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout  # noqa: E731
    _wait(lambda: "JobState=PENDING" in show() and "Restarts=1" in show(), f"requeue of {job}")
    # slurmd refuses a credential made in the second its job was revoked (the requeue): release
    # it in the next second, the earliest Slurm can start it at all
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    _wait(lambda: "JobState=COMPLETED" in show(), f"second run of {job}")
    with open(f"{out_dir}/raw-{job}.out") as f:
        return restart_gap(f.read())


def bench_ssh(args: argparse.Namespace, rows: list[tuple[str, float, float]]) -> None:
    """Submit and status over SSH (the login node's Slurm), appended to ``rows``."""
    from torchx_ext import state
    from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin

    cfg = {"partition": args.partition, "sbatch_args": ["--hold"], "login": args.login}
    if args.ssh_config:
        cfg["ssh_config"] = args.ssh_config
    app = AppDef("bench", roles=[Role("main", image="/tmp", entrypoint="/usr/bin/python3", args=["-c", "pass"],
                                      resource=Resource(cpu=1, gpu=0, memMB=100))])
    login = SshLogin(args.login, config_file=args.ssh_config)
    runner = get_runner()
    sched = create_scheduler("bench")
    submitted: list[str] = []

    def raw_sbatch(script: str, *extra: str) -> str:
        argv = login.command(" ".join(shlex.quote(w) for w in ["sbatch", "--parsable", *extra]))
        return subprocess.run(argv, input=script, capture_output=True, text=True, check=True).stdout.strip()

    try:
        # warms the connection, resolves the remote root once
        submitted.append(runner.run(app, "slurm_jobs", cfg).rsplit(":", 1)[-1])
        root = state.read_json(state.scheduler_dir("slurm_jobs", "remote_roots.json")) or {}
        spec_root = next(iter(root.values()))
        script = repr(sched.submit_dryrun(app, {**cfg, "remote_dir": spec_root}).request)
        raw_ids: list[str] = []
        ours, raw = _interleaved(
            args.submits, lambda: submitted.append(runner.run(app, "slurm_jobs", cfg).rsplit(":", 1)[-1]),
            lambda: raw_ids.append(raw_sbatch(script)))
        submitted += raw_ids
        rows.append((f"submit over SSH, median of {args.submits}", statistics.median(ours), statistics.median(raw)))

        # list() shows the apps this home submitted (its index): the held jobs are submitted as apps
        more = args.jobs - len(submitted) + len(raw_ids)
        print(f"submitting {more} more held apps on {login.name} ...", file=sys.stderr)
        submitted += [runner.run(app, "slurm_jobs", cfg).rsplit(":", 1)[-1] for _ in range(more)]
        ids = {f"{login.name}:{j}" for j in submitted if j not in raw_ids}
        fresh = create_scheduler("bench")
        # as on a laptop: Slurm's commands are not on PATH here, so list() asks the cluster only
        bin_dir = tempfile.mkdtemp(prefix="bench-ssh-bin-")
        for tool in ("ssh", "rsync"):
            if shutil.which(tool):
                os.symlink(shutil.which(tool), os.path.join(bin_dir, tool))  # type: ignore[arg-type]
        saved = os.environ["PATH"]
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [d for d in saved.split(os.pathsep)
                                                          if not os.path.exists(os.path.join(d, "squeue"))])
        try:
            t0 = time.perf_counter()
            listed = {a.app_id for a in fresh.list()}
            t_list = time.perf_counter() - t0
        finally:
            os.environ["PATH"] = saved
            shutil.rmtree(bin_dir, ignore_errors=True)
        assert ids <= listed, f"{len(ids - listed)} of our jobs missing from list()"
        t0 = time.perf_counter()
        login.run(["squeue", "--json"])
        t_raw = time.perf_counter() - t0
        rows.append((f"status of {len(ids)} jobs over SSH (vs ssh squeue --json)", t_list, t_raw))
        print(f"list() over SSH of {len(listed)} apps took {t_list:.3f}s (target < 1 s): "
              f"{'OK' if t_list < 1 else 'TOO SLOW'}", file=sys.stderr)
    finally:
        runner.close()
        for i in range(0, len(submitted), 200):
            login.run(["scancel", *submitted[i:i + 200]])
        print(f"cancelled {len(submitted)} jobs on {login.name}", file=sys.stderr)


def _interleaved(n: int, ours: Callable[[], object], raw: Callable[[], object]) -> tuple[list[float], list[float]]:
    """``n`` timings of each side, interleaved, so that drift in slurmctld hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for side, call in zip(times, (ours, raw), strict=True):
            t0 = time.perf_counter()
            call()
            side.append(time.perf_counter() - t0)
    return times


def _table(rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{'measure':<44} {'slurm_jobs':>12} {'raw Slurm':>12} {'ratio':>8}")
    for name, ours, raw in rows:
        print(f"{name:<44} {ours * 1000:>10.1f}ms {raw * 1000:>10.1f}ms {ours / raw:>7.2f}x")
    print("(ratio = slurm_jobs / raw; below 1 means ours is faster)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=10, help="submissions timed on each side")
    parser.add_argument("--jobs", type=int, default=500, help="jobs whose status is read")
    parser.add_argument("--restarts", type=int, default=3, help="restarts timed on each side")
    parser.add_argument("--partition", default=os.environ.get("TORCHX_EXT_TEST_SLURM_PARTITION", "debug"))
    parser.add_argument("--login", default=os.environ.get("TORCHX_EXT_TEST_SSH_HOST"),
                        help="a login node for the SSH measures (default: the sshd testbed's, if running)")
    parser.add_argument("--ssh-config", default=os.environ.get("TORCHX_EXT_TEST_SSH_CONFIG"))
    parser.add_argument("--only-ssh", action="store_true", help="only the SSH measures")
    args = parser.parse_args()
    if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        print("Slurm is not running: bash testbed/slurm.sh start", file=sys.stderr)
        return 2
    own_home = "TORCHX_EXT_HOME" not in os.environ
    if own_home:  # records and job dirs of the benchmark's apps, removed at the end
        os.environ["TORCHX_EXT_HOME"] = tempfile.mkdtemp(prefix="bench_slurm_jobs_")
    cfg = {"partition": args.partition, "sbatch_args": ["--hold"]}  # held: nothing runs, nothing waits
    app = AppDef("bench", roles=[Role("main", image=os.getcwd(), entrypoint=sys.executable, args=["-c", "pass"],
                                      resource=Resource(cpu=1, gpu=0, memMB=100))])
    runner = get_runner()
    sched = create_scheduler("bench")
    script = repr(sched.submit_dryrun(app, cfg).request)
    submitted: list[str] = []
    if args.only_ssh:
        rows: list[tuple[str, float, float]] = []
        try:
            bench_ssh(args, rows)
            _table(rows)
        finally:
            if own_home:
                shutil.rmtree(os.environ["TORCHX_EXT_HOME"], ignore_errors=True)
        return 0
    try:
        ours, raw = _interleaved(args.submits,
                                 lambda: submitted.append(runner.run(app, "slurm_jobs", cfg).rsplit("/", 1)[-1]),
                                 lambda: submitted.append(_sbatch(script)))
        rows = [(f"submit, median of {args.submits}", statistics.median(ours), statistics.median(raw))]

        # list() shows the apps this home submitted (its index): the held jobs are submitted as apps
        raw_ids = set(submitted[1::2])  # (_interleaved: ours, then raw)
        more = args.jobs - len(submitted) + len(raw_ids)
        print(f"submitting {more} more held apps ...", file=sys.stderr)
        submitted += [runner.run(app, "slurm_jobs", cfg).rsplit("/", 1)[-1] for _ in range(more)]
        ids = {j for j in submitted if j not in raw_ids}

        t0 = time.perf_counter()
        listed = {a.app_id for a in sched.list()}
        t_list = time.perf_counter() - t0
        assert ids <= listed, f"{len(ids - listed)} of our jobs missing from list()"
        t0 = time.perf_counter()
        for job_id in submitted:
            subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, check=True)
        t_each = time.perf_counter() - t0
        rows.append((f"status of {len(ids)} jobs (1 squeue vs {len(ids)} scontrol)", t_list, t_each))
        for i in range(0, len(submitted), 200):  # the held jobs would keep the nodes' queue busy
            subprocess.run(["scancel", *submitted[i:i + 200]], capture_output=True)
        ours_r, raw_r = [], []
        for _ in range(args.restarts):
            ours_r.append(bench_restart_ours(runner, args.partition))
            raw_r.append(bench_restart_requeue(args.partition, os.environ["TORCHX_EXT_HOME"]))
        rows.append((f"restart, median of {args.restarts} (vs scontrol requeue)",
                     statistics.median(ours_r), statistics.median(raw_r)))
        if args.login:
            bench_ssh(args, rows)
        _table(rows)
        print(f"\nlist() of {len(listed)} apps took {t_list:.3f}s (target < 1 s): "
              f"{'OK' if t_list < 1 else 'TOO SLOW'}")
    finally:
        runner.close()
        for i in range(0, len(submitted), 200):
            subprocess.run(["scancel", *submitted[i:i + 200]], capture_output=True)
        print(f"cancelled {len(submitted)} jobs", file=sys.stderr)
        if own_home:
            shutil.rmtree(os.environ["TORCHX_EXT_HOME"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
