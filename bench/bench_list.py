"""``torchx list`` and ``torchx status`` in a home with thousands of ended apps (issue 24).

Per scheduler (``host``; ``slurm_jobs`` on the testbed cluster, ``bash testbed/slurm.sh start``),
each in a fresh ``$TORCHX_EXT_HOME``:

* a home with ONE app (submitted for real, ended): ``torchx status`` of it, and ``torchx list``;
* a home with ``--ended`` ended apps and ``--running`` apps that have not ended: ``torchx list``
  (goal <= 1 s) and ``torchx status`` of one ended and one running app (goal <= 1.1x the status in
  the one-app home);
* the raw engine in the same run: ``python -c pass`` (a new interpreter, the floor of any CLI call)
  and, for slurm_jobs, ``squeue --json``.

The running apps are real (host: ``sleep``; slurm_jobs: jobs submitted ``--hold``, PENDING until
cancelled, so that the shared testbed's two nodes stay free). The ended apps are FABRICATED, in the
exact format the scheduler writes: one app is submitted for real and left to end, then its record
(host: the app directory; slurm_jobs: ``app.json`` and the job directory with the script's
``result``) is copied ``--ended`` times under new ids (slurm: job ids slurmctld never had, i.e. jobs
it has forgotten), with creation times spread over the past days. Every command is a new ``torchx``
process with ``PYTHONPATH`` set to this checkout.

    PYTHONPATH=. .venv-test/bin/python bench/bench_list.py [--ended 2000] [--running 50] [-s host]
        [--baseline /tmp/before]   # also time another checkout's code, run for run (before/after)

Everything started is cancelled, and the homes removed, at the end (also when the benchmark fails).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable, NamedTuple

from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
DAY = 86400.0


# --baseline: another checkout (e.g. ``git worktree add /tmp/before HEAD``) whose code is timed
# too, each run right after the same run of this checkout's, in the same homes: a before/after
# that a loaded machine's drift affects alike
BASELINE: list[str] = []


def _env(home: str, root: str = ROOT) -> dict[str, str]:
    return {**os.environ, "TORCHX_EXT_HOME": home, "PYTHONPATH": root}


class T(NamedTuple):
    """Median wall and CPU seconds (user + system of the process and its children): on a loaded
    machine the wall time varies 2x, the CPU time much less. ``before_*``: the baseline's."""

    wall: float
    cpu: float
    before_wall: float = float("nan")
    before_cpu: float = float("nan")


def _run(cmd: list[str], home: str, root: str) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(home, root), cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, proc.stdout


def timed(cmd: list[str], home: str, repeat: int) -> tuple[T, str]:
    """``cmd`` in a new process, ``repeat`` times (the last run's stdout, checked); a ``torchx``
    command alternately with the baseline's code, if one is given."""
    roots = [ROOT, *BASELINE] if cmd[0] == TORCHX else [ROOT]
    runs: dict[str, list[tuple[float, float, str]]] = {r: [] for r in roots}
    for _ in range(repeat):
        for root in roots:
            runs[root].append(_run(cmd, home, root))
    med = {r: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for r, v in runs.items()}
    before = med.get(BASELINE[0] if len(roots) > 1 else "", (float("nan"), float("nan")))
    return T(*med[ROOT], *before), runs[ROOT][-1][2]


def vs(a: T, b: T) -> str:
    return f"wall {a.wall / b.wall:.2f}x, CPU {a.cpu / b.cpu:.2f}x"


def _wait_ended(runner: Runner, handle: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = runner.status(handle)
        if st is not None and st.state in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
            return
        time.sleep(0.1)
    raise TimeoutError(handle)


def raw_print(rows: int, repeat: int) -> T:
    """A new process printing ``rows`` rows with tabulate, as TorchX's ``torchx list`` does: the
    floor of listing that many apps (0.2 ms a row here), whatever the scheduler does."""
    code = (f"import tabulate; rows = [['host://torchx/app-0123456789', 'SUCCEEDED']] * {rows}; "
            "print(tabulate.tabulate(rows, headers=['APP HANDLE', 'APP STATUS']))")
    return timed([sys.executable, "-c", code], tempfile.gettempdir(), repeat)[0]


def _rebuilt_list(home: str, scheduler: str) -> T:
    """One ``torchx list`` after the index is removed: it reads every record once (and rebuilds it);
    before the index existed, every list read every record."""
    index = os.path.join(home, scheduler, "index.jsonl")
    if os.path.exists(index):
        os.remove(index)
    return timed([TORCHX, "list", "-s", scheduler], home, 1)[0]


# ---------------------------------------------------------------------- host --
def _host_app(name: str, *args: str) -> AppDef:
    return AppDef(name, roles=[Role(name, image=ROOT, entrypoint=args[0], args=list(args[1:]))])


def fabricate_host(home: str, tid: str, n: int, newest_age: float, span: float, log_bytes: int = 0) -> list[str]:
    """``n`` copies of the ended host app ``tid`` of ``home`` under new ids, created (and ended 1 s
    later) ``newest_age`` to ``newest_age + span`` seconds ago, oldest first; ``log_bytes``: each
    copy's replica log gets that many bytes (what a prune should free). Returns the new ids."""
    root = os.path.join(home, "host")
    now = time.time()
    ids = []
    for i in range(n):
        app_id = f"bench-{uuid.uuid4().hex[:10]}"
        src, dst = os.path.join(root, tid), os.path.join(root, app_id)
        shutil.copytree(src, dst)
        created = now - newest_age - span * (n - i) / n
        if log_bytes:
            log = os.path.join(dst, "logs")
            replica = os.path.join(log, *sorted(os.listdir(log))[:1])
            replica = os.path.join(replica, sorted(os.listdir(replica))[0])
            with open(os.path.join(replica, "stdout.log"), "ab") as f:
                f.write(b"x" * (log_bytes - 1) + b"\n")
        for name in ("spec.json", "state.json"):
            path = os.path.join(dst, name)
            with open(path) as f:
                text = f.read().replace(tid, app_id)
            data = json.loads(text)
            if name == "state.json":
                data.update(created=created, started=created, ended=created + 1)
            with open(path, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.utime(path, (created, created))
        ids.append(app_id)
    return ids


def host_home(ended: int, running: int, runner_for: Callable[[str], Runner]) -> tuple[str, str, str, list[str]]:
    """A home with ``ended`` fabricated ended apps and ``running`` real ones: (home, an ended
    handle, a running handle, handles to cancel)."""
    home = tempfile.mkdtemp(prefix="bench_list_host_")
    runner = runner_for(home)
    template = runner.run(_host_app("bench", "true"), "host", {})
    _wait_ended(runner, template)
    ids = fabricate_host(home, template.rsplit("/", 1)[-1], ended, newest_age=0.0, span=3 * DAY)
    app_id = ids[-1]
    ended_handle = f"host://torchx/{app_id}"
    live = [runner.run(_host_app("live", "sleep", "600"), "host", {}) for _ in range(running)]
    return home, ended_handle, (live[-1] if live else ended_handle), live


def bench_host(a: argparse.Namespace, runner_for: Callable[[str], Runner]) -> list[tuple[str, T, T]]:
    rows = []
    raw, _ = timed([sys.executable, "-c", "pass"], tempfile.gettempdir(), a.repeat)
    small = tempfile.mkdtemp(prefix="bench_list_host1_")
    runner = runner_for(small)
    one = runner.run(_host_app("one", "true"), "host", {})
    _wait_ended(runner, one)
    one_live = runner.run(_host_app("one", "sleep", "600"), "host", {})
    big, ended_h, live_h, live = host_home(a.ended, a.running, runner_for)
    try:
        st1, _ = timed([TORCHX, "status", one], small, a.repeat)
        st1r, _ = timed([TORCHX, "status", one_live], small, a.repeat)
        ls1, _ = timed([TORCHX, "list", "-s", "host"], small, a.repeat)
        ls, out = timed([TORCHX, "list", "-s", "host"], big, a.repeat)
        stn, _ = timed([TORCHX, "status", ended_h], big, a.repeat)
        stnr, _ = timed([TORCHX, "status", live_h], big, a.repeat)
        rebuild = _rebuilt_list(big, "host")
        shown = [line.split()[0] for line in out.splitlines() if line.startswith("host://")]
        printing = raw_print(len(shown), a.repeat)
        rows += [
            ("raw: python -c pass", raw, raw),
            (f"raw: python printing {len(shown)} rows with tabulate (as torchx list does)", printing, raw),
            ("host: status, home of 1 app (ended)", st1, raw),
            ("host: status, home of 1 app (running)", st1r, raw),
            ("host: list, home of 2 apps", ls1, raw),
            (f"host: list, {a.ended} ended + {a.running} running ({len(shown)} shown)", ls, raw),
            ("host: list, big home, index removed (rebuilt from the records; once)", rebuild, raw),
            (f"host: status of an ended app, big home (vs 1-app home: {vs(stn, st1)})", stn, raw),
            (f"host: status of a running app, big home (vs 1-app home: {vs(stnr, st1r)})", stnr, raw),
        ]
        print(f"host list order, first 3: {shown[:3]} (newest submitted last: {live_h})")
    finally:
        for home, handles in ((small, [one_live]), (big, live)):
            r = runner_for(home)
            for h in handles:
                r.cancel(h)
            shutil.rmtree(home, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------- slurm_jobs --
def fabricate_slurm(home: str, tid: str, n: int, newest_age: float, span: float, log_bytes: int = 0,
                    first_id: int = 60_000_000) -> list[str]:
    """``n`` copies of the ended slurm_jobs app ``tid`` of ``home`` (its record and its job
    directory ``<id>.<token>`` beside it, copied into one directory per copy, which its record
    names as its job directory) under job ids ``first_id``.. that slurmctld never had (jobs it
    has forgotten), submitted (and ended: the ``result`` file's time) ``newest_age`` to
    ``newest_age + span`` seconds ago, oldest first; ``log_bytes``: each job directory gets a log of
    that many bytes. Returns the new ids."""
    root = os.path.join(home, "slurm_jobs")
    with open(os.path.join(root, tid, "app.json")) as f:
        record = json.load(f)
    now = time.time()
    ids = []
    for i in range(n):
        job_id = str(first_id + i)
        dst = os.path.join(root, job_id)
        shutil.copytree(os.path.join(root, tid), dst)
        if os.path.isdir(record["job_dir"]):  # (gone when the template was deleted: its record dir holds both)
            shutil.copytree(record["job_dir"], dst, dirs_exist_ok=True)
        created = now - newest_age - span * (n - i) / n
        data = json.loads(json.dumps(record).replace(record["job_dir"], dst))
        data.update(app_id=job_id, submitted=created)
        path = os.path.join(dst, "app.json")
        with open(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        if log_bytes:
            with open(os.path.join(dst, "bench.log"), "wb") as f:
                f.write(b"x" * (log_bytes - 1) + b"\n")
        for name in os.listdir(dst):  # the job's files as old as the job (prune reads result's time)
            os.utime(os.path.join(dst, name), (created + 1, created + 1))
        os.utime(path, (created, created))
        ids.append(job_id)
    return ids


def slurm_home(a: argparse.Namespace, runner_for: Callable[[str], Runner]) -> tuple[str, str, str, list[str]]:
    home = tempfile.mkdtemp(prefix="bench_list_slurm_")
    runner = runner_for(home)
    cfg = {"partition": a.partition}
    res = Resource(cpu=1, gpu=0, memMB=100)
    template = runner.run(AppDef("bench", roles=[Role("main", image=ROOT, entrypoint="true", resource=res)]),
                          "slurm_jobs", cfg)
    _wait_ended(runner, template)
    ids = fabricate_slurm(home, template.rsplit("/", 1)[-1], a.ended, newest_age=0.0, span=3 * DAY)
    job_id = ids[-1]
    held = {**cfg, "sbatch_args": ["--hold"]}
    live = [runner.run(AppDef("live", roles=[Role("main", image=ROOT, entrypoint="sleep", args=["600"],
                                                  resource=res)]), "slurm_jobs", held)
            for _ in range(a.running)]
    return home, f"slurm_jobs://torchx/{job_id}", (live[-1] if live else template), live


def bench_slurm(a: argparse.Namespace, runner_for: Callable[[str], Runner]) -> list[tuple[str, T, T]]:
    rows = []
    raw, _ = timed([sys.executable, "-c", "pass"], tempfile.gettempdir(), a.repeat)
    squeue, _ = timed(["squeue", "--json"], tempfile.gettempdir(), a.repeat)
    small = tempfile.mkdtemp(prefix="bench_list_slurm1_")
    runner = runner_for(small)
    res = Resource(cpu=1, gpu=0, memMB=100)
    one = runner.run(AppDef("one", roles=[Role("main", image=ROOT, entrypoint="true", resource=res)]),
                     "slurm_jobs", {"partition": a.partition})
    _wait_ended(runner, one)
    one_live = runner.run(AppDef("one", roles=[Role("main", image=ROOT, entrypoint="sleep", args=["600"],
                                                    resource=res)]),
                          "slurm_jobs", {"partition": a.partition, "sbatch_args": ["--hold"]})
    live: list[str] = []
    big = ""
    try:
        big, ended_h, live_h, live = slurm_home(a, runner_for)
        st1, _ = timed([TORCHX, "status", one], small, a.repeat)
        st1r, _ = timed([TORCHX, "status", one_live], small, a.repeat)
        ls1, _ = timed([TORCHX, "list", "-s", "slurm_jobs"], small, a.repeat)
        ls, out = timed([TORCHX, "list", "-s", "slurm_jobs"], big, a.repeat)
        stn, _ = timed([TORCHX, "status", ended_h], big, a.repeat)
        stnr, _ = timed([TORCHX, "status", live_h], big, a.repeat)
        rebuild = _rebuilt_list(big, "slurm_jobs")
        shown = [line.split()[0] for line in out.splitlines() if line.startswith("slurm_jobs://")]
        printing = raw_print(len(shown), a.repeat)
        rows += [
            ("raw: python -c pass", raw, raw),
            (f"raw: python printing {len(shown)} rows with tabulate (as torchx list does)", printing, raw),
            ("raw: squeue --json", squeue, raw),
            ("slurm_jobs: status, home of 1 app (ended)", st1, raw),
            ("slurm_jobs: status, home of 1 app (pending)", st1r, raw),
            ("slurm_jobs: list, home of 2 apps", ls1, raw),
            (f"slurm_jobs: list, {a.ended} ended + {a.running} pending ({len(shown)} shown)", ls, raw),
            ("slurm_jobs: list, big home, index removed (rebuilt from the records; once)", rebuild, raw),
            (f"slurm_jobs: status of an ended app, big home (vs 1-app home: {vs(stn, st1)})", stn, raw),
            (f"slurm_jobs: status of a pending app, big home (vs 1-app home: {vs(stnr, st1r)})", stnr, raw),
        ]
        print(f"slurm_jobs list order, first 3: {shown[:3]} (newest submitted last: {live_h})")
    finally:
        ids = [h.rsplit("/", 1)[-1] for h in [one_live, *live]]
        subprocess.run(["scancel", *ids], capture_output=True)
        for home in (small, big):
            if home:
                shutil.rmtree(home, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ended", type=int, default=2000)
    ap.add_argument("--running", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-s", "--scheduler", action="append", choices=["host", "slurm_jobs"])
    ap.add_argument("--partition", default=os.environ.get("TORCHX_EXT_TEST_SLURM_PARTITION", "debug"))
    ap.add_argument("--baseline", help="another checkout whose torchx-ext is timed alongside (before/after)")
    a = ap.parse_args()
    if a.baseline:
        BASELINE.append(os.path.abspath(a.baseline))
    runners: dict[str, Runner] = {}

    def runner_for(home: str) -> Runner:
        # the schedulers read $TORCHX_EXT_HOME at each call: one runner serves every home
        os.environ["TORCHX_EXT_HOME"] = home
        return runners.setdefault("r", get_runner())

    rows = []
    for name in a.scheduler or ["host", "slurm_jobs"]:
        rows += (bench_host if name == "host" else bench_slurm)(a, runner_for)
    title = f"measure (median of {a.repeat}, new processes)"
    extra = f" {'before: wall s':>14} {'CPU s':>6}" if BASELINE else ""
    print(f"{title:<84} {'wall s':>7} {'vs raw':>7} {'CPU s':>6} {'vs raw':>7}{extra}")
    for name, t, raw in rows:
        extra = f" {t.before_wall:14.3f} {t.before_cpu:6.3f}" if BASELINE else ""
        print(f"{name:<84} {t.wall:7.3f} {t.wall / raw.wall:6.2f}x {t.cpu:6.3f} {t.cpu / raw.cpu:6.2f}x{extra}")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

if __name__ == "__main__":
    main()
