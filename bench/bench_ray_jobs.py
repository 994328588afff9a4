"""``ray_jobs`` vs the raw Ray Jobs API (``JobSubmissionClient``), timed in the same run.

    python bench/bench_ray_jobs.py [--dashboard URL] [--repeat 9] [--apps 64] [--dag 100] [--log-mb 200]
                                   [--log-write-s 30] [--only dryrun,submit,throughput,dag,memory,restart,log]

The dashboard: ``--dashboard``, else ``$TORCHX_EXT_TEST_RAY_DASHBOARD`` (``testbed/.state/ray.env``
is read when present). Every job the bench makes is deleted at the end; the shared broker job
(``torchx-ext-broker-*``) is left alone.

1. ``dryrun``: ``torchx run --dryrun -s ray_jobs utils.echo`` vs ``-s local_cwd``, new processes
   from an empty temporary cwd; and whether ``ray`` gets imported on that path (the CLI under
   ``-X importtime``; ``sys.modules`` after ``Runner.dryrun`` in a fresh interpreter).
2. ``submit``: ``Runner.run`` + first ``Runner.status`` of a single-role app vs ``submit_job`` +
   ``get_job_status`` on a client made beforehand, ``--repeat`` pairs in alternating order; the
   ratio is the median of the pairs' ratios. Each job ends (untimed) before the next submit, so
   that no measure pays for the head starting the previous one's driver.
3. ``throughput``: ``--apps`` trivial apps from ``--threads`` threads on both sides: a Runner per
   thread (default options) vs ``submit_job`` on one shared client, in two rounds a side, in the
   order raw, ours, ours, raw. Only submission is timed; after each round its jobs end, untimed,
   so that no round runs against another's backlog.
4. ``dag``: ``--dag`` trivial apps in layers of ``--dag-width`` (each depends on up to two apps of
   the layer before), all submitted up front with ``dependencies``. Latency from the last
   dependency's end (``JobDetails.end_time``) to the dependent's job being submitted (its
   ``start_time``, set by the broker) and to its first log line. Raw: a client-side orchestrator
   polling every 0.5 s (the broker's interval) over ``--raw-dag-layers`` layers of that width.
   Layers, not a chain: a 100-app chain takes ~5 min here, one job start after another.
5. ``memory``: RSS per app waiting on a dependency (``--waiters`` apps waiting on a sleeper) vs per
   naive waiting job (``--naive`` raw jobs running ``time.sleep``: the cheapest waiting driver,
   which flatters the naive way), over the local head's process tree (from the dashboard's
   ``--temp-dir``): a job's driver counts though its command line does not say "ray".
6. ``restart``: restart latency (``Role.max_retries``): from the instant a replica exits 1 to the
   instant its next attempt runs (both from the processes' own clocks), for a gang replica
   (restarted in its actor) vs Ray's own mechanism, an actor with ``max_restarts=1`` that exits
   (time to the restarted actor's ``__init__``).
7. ``log``: following a replica that writes ``--log-mb`` MB (``$TORCHX_EXT_BENCH_LOG_MB``; 200 by
   default) in 100 bursts over ``--log-write-s`` seconds, to the end: ``log_iter(should_tail=True)``
   vs Ray's ``JobSubmissionClient.tail_job_logs``, each in a process of its own, both started at
   submission and following the same job. Bytes: what the dashboard sent each follower over TCP,
   counted by a relay in front of the dashboard (one per follower: HTTP headers, websocket frames
   and status queries included), against the job log's size (what Ray's tail delivered). CPU: each
   follower's process time from its first request to the end (imports excluded), writing what it
   follows to a file; ours then checks, untimed, that every numbered line came once and in order.
   A third follower, ``raw-lines``, hands Ray's tail on as lines (split with one regular
   expression, as ours and as every raw row of ``bench/bench_logs.py``): ``log_iter`` must yield
   lines, while Ray's tail writes its chunks whole, so both ratios are printed.

Runtime: the head starts ~1.4 jobs/s on the 2-core testbed; the defaults make ~240 jobs that
run (waiting records never start), most of the run is the cluster draining them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from torchx.runner import get_runner
from torchx.specs import AppDef, Resource, Role

from torchx_ext.schedulers.ray_jobs.client import make_app_id
from torchx_ext.schedulers.ray_jobs.cluster import FRAME_MARK
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND
from torchx_ext.schedulers.ray_jobs.scheduler import create_scheduler

LINES = re.compile(".*\n")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
BROKER_POLL_S = 0.5  # the broker's default interval (TORCHX_EXT_BROKER_POLL_S), also the raw orchestrator's
SETTLE_S = 3.0  # Ray's job monitor polls every second; give it a few to see a job's end
BENCHES = ("dryrun", "submit", "throughput", "dag", "memory", "restart", "log")


# ------------------------------------------------------------------------------- helpers --
def load_testbed_env() -> None:
    path = os.path.join(ROOT, "testbed", ".state", "ray.env")
    if os.path.exists(path):
        for line in open(path):
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                key, _, value = words[1].partition("=")
                os.environ.setdefault(key, value)


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def status_of(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def sid_of(handle: str) -> str:
    """The Ray submission id of an app handle ``ray_jobs://torchx/<addr>~<sid>``."""
    return handle.rsplit("~", 1)[-1]


def table(title: str, rows: list[tuple[str, float, float, str]], ratio_of_pairs: Optional[float] = None) -> None:
    """``ratio_of_pairs``: the ratio of a one-row table, when it is the median of paired samples'
    ratios (steadier than the ratio of the medians when the head drifts between samples)."""
    print(f"\n== {title} ==")
    print(f"{'measure':<58} {'ours':>9} {'raw':>9} {'ours/raw':>11}")
    for name, ours, raw, unit in rows:
        r = ratio_of_pairs if ratio_of_pairs is not None else (ours / raw if raw else None)
        ratio = f"{r:10.2f}x" if r is not None else "       n/a"
        print(f"{name + ' (' + unit + ')':<58} {ours:9.3f} {raw:9.3f} {ratio:>11}")
    sys.stdout.flush()


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trivial_app(name: str, code: str = "pass") -> AppDef:
    # cpu=0 means "no CPU asked": the driver's entrypoint_num_cpus becomes a token 0.01, so
    # hundreds of these never queue for CPUs
    return AppDef(name, roles=[Role(name, image="", entrypoint="python", args=["-c", code],
                                    resource=Resource(cpu=0, gpu=0, memMB=0))])


class Jobs:
    """Every submission id this bench made, so that all of them are deleted in the end."""

    def __init__(self, client: Any, url: str) -> None:
        self.client, self.url = client, url
        self.ids: set[str] = set()
        self.deleted: set[str] = set()
        self.scheduler = create_scheduler("bench")

    def add(self, *sids: str) -> None:
        self.ids.update(sids)

    def add_app(self, handle: str) -> None:
        sid = sid_of(handle)
        self.add(sid, sid + "--waiting", sid + "--cancelled")

    def drain(self, timeout: float, only: Optional[Iterable[str]] = None) -> list[str]:
        """Waits (bounded) until the jobs end and deletes them; stops laggards; returns leftovers.

        A job that does not exist counts as done, except an app still waiting for its
        dependencies: it is cancelled first (which claims its id), else deleting its waiting
        record could race with the broker starting it. A job is deleted only once it ended
        ``SETTLE_S`` ago: Ray's job monitor re-creates a job deleted before it noticed its
        supervisor exit, as FAILED ("Job supervisor actor died").
        """
        remaining = set(self.ids if only is None else only) & self.ids
        deadline, stopped = time.time() + timeout, False
        while remaining:
            listed = {j.submission_id: j for j in self.client.list_jobs()}
            waiting = [r[:-len("--waiting")] for r in remaining if r.endswith("--waiting")
                       and r in listed and r[:-len("--waiting")] not in listed]
            for sid in waiting:
                self.scheduler.cancel(make_app_id(self.url, sid))
            now_ms = time.time() * 1000
            for sid in [] if waiting else sorted(remaining):
                job = listed.get(sid)
                if job is not None and status_of(job) in TERMINAL and now_ms - (job.end_time or 0) > SETTLE_S * 1000:
                    try:
                        self.client.delete_job(sid)
                    except RuntimeError:
                        pass
                    self.deleted.add(sid)
                    job = None
                if job is None:
                    remaining.discard(sid)
                    self.ids.discard(sid)
            if remaining and time.time() > deadline:
                if stopped:
                    break
                progress(f"cleanup: {len(remaining)} job(s) not done after {timeout:.0f} s; stopping them")
                for sid in remaining:
                    try:
                        self.client.stop_job(sid)
                    except RuntimeError:
                        pass
                deadline, stopped = time.time() + 120, True
            time.sleep(1.0 if remaining else 0)
        return sorted(remaining)

    def sweep(self) -> int:
        """Deletes the jobs deleted before that Ray re-created anyway (see ``drain``)."""
        time.sleep(2 * SETTLE_S)
        back = [j.submission_id for j in self.client.list_jobs() if j.submission_id in self.deleted]
        for sid in back:
            self.client.delete_job(sid)
        return len(back)


def wait_terminal(client: Any, sids: Iterable[str], timeout: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Waits until every submission id exists and is terminal; returns their JobDetails. One job
    is asked for alone, every 0.2 s; several through one listing, every ``poll_s``."""
    sids = set(sids)
    deadline = time.time() + timeout
    while True:
        if len(sids) == 1:
            sid = next(iter(sids))
            try:
                listed = {sid: client.get_job_info(sid)}
            except RuntimeError:  # not there (yet)
                listed = {}
        else:
            listed = {j.submission_id: j for j in client.list_jobs()}
        done = {s: listed[s] for s in sids if s in listed and status_of(listed[s]) in TERMINAL}
        if len(done) == len(sids) or time.time() > deadline:
            return done
        time.sleep(0.2 if len(sids) == 1 else poll_s)


# ------------------------------------------------------------------------ 1. dry-run ------
def bench_dryrun(url: str, repeat: int) -> None:
    cwd = tempfile.mkdtemp(prefix="bench_ray_cwd_")
    env = dict(os.environ)
    ours_cmd = [TORCHX, "run", "--dryrun", "-s", "ray_jobs", "-cfg", f"dashboard_url={url}", "utils.echo"]
    raw_cmd = [TORCHX, "run", "--dryrun", "-s", "local_cwd", "utils.echo"]

    def once(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{p.stderr[-2000:]}")
        return took

    ws = os.path.join(os.environ["TORCHX_EXT_HOME"], "ray_jobs", "workspaces")

    def copies() -> int:
        return len(os.listdir(ws)) if os.path.isdir(ws) else 0

    once(ours_cmd), once(raw_cmd)  # warm the page cache for both
    ours: list[float] = []
    raw: list[float] = []
    for i in range(repeat):  # a pair at a time, in alternating order: a drift hits both
        for cmd, out in ((ours_cmd, ours), (raw_cmd, raw)) if i % 2 == 0 else ((raw_cmd, raw), (ours_cmd, ours)):
            out.append(once(cmd))
    table(f"1. torchx run --dryrun utils.echo, new process, median of {repeat} (raw = -s local_cwd; the ratio: "
          "the median of the pairs' ratios)", [("wall time", statistics.median(ours), statistics.median(raw), "s")],
          ratio_of_pairs=statistics.median(a / b for a, b in zip(ours, raw, strict=True)))

    cli_copies = copies()
    # (a) the CLI itself: any module named ray or ray.* in -X importtime's report
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchx.cli.main", *ours_cmd[1:]],
                       cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the -X importtime dry-run failed:\n{p.stderr[-2000:]}")
    cli_ray = [line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()
               if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().split(".")[0] == "ray"]
    # (b) the Python API: sys.modules after Runner.dryrun in a fresh interpreter
    code = (
        "import sys, json\n"
        "from torchx.runner import get_runner\n"
        "from torchx.specs import AppDef, Role\n"
        "app = AppDef('echo', roles=[Role('echo', image='', entrypoint='echo', args=['hi'])])\n"
        f"get_runner().dryrun(app, 'ray_jobs', cfg={{'dashboard_url': {url!r}}})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))\n"
    )
    q = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if q.returncode != 0:
        raise RuntimeError(f"Runner.dryrun in a new interpreter failed:\n{q.stderr[-2000:]}")
    api_ray = json.loads(q.stdout.strip().splitlines()[-1])
    imported = bool(cli_ray or api_ray)
    print(f"ray imported on dryrun path: {'yes' if imported else 'no'} "
          f"(CLI -X importtime: {len(cli_ray)} ray module(s){', e.g. ' + cli_ray[0] if cli_ray else ''}; "
          f"Runner.dryrun sys.modules: {len(api_ray)})")
    print(f"workspace copies left in TORCHX_EXT_HOME: {cli_copies} by {repeat + 1} `torchx run --dryrun -s "
          f"ray_jobs`, {copies() - cli_copies} by 1 `python -m torchx.cli.main run --dryrun -s ray_jobs` (same "
          "cwd, no --workspace)")
    shutil.rmtree(cwd, ignore_errors=True)


# ---------------------------------------------------------------------- 2. submit+status --
def bench_submit(url: str, client: Any, jobs: Jobs, repeat: int) -> None:
    runner = get_runner()
    env = {"env_vars": {"TORCHX_EXT_BENCH": "1"}}

    def ours() -> float:
        app = trivial_app("bench-submit")
        t0 = time.perf_counter()
        handle = runner.run(app, "ray_jobs", {"dashboard_url": url})
        runner.status(handle)
        took = time.perf_counter() - t0
        jobs.add_app(handle)
        wait_terminal(client, [sid_of(handle)], 120)  # untimed: the next one meets an idle head
        return took

    def raw() -> float:
        t0 = time.perf_counter()
        sid = client.submit_job(entrypoint="python -c pass", runtime_env=env, metadata={"bench": "raw"})
        client.get_job_status(sid)
        took = time.perf_counter() - t0
        jobs.add(sid)
        wait_terminal(client, [sid], 120)
        return took

    ours(), raw()  # warm-up: our client's connect, the driver package upload (once per content)
    pairs: list[tuple[float, float]] = []
    for i in range(repeat):  # a pair at a time, in alternating order: a drift of the head hits both
        if i % 2 == 0:
            a = ours()
            b = raw()
        else:
            b = raw()
            a = ours()
        pairs.append((a, b))
    runner.close()
    o, r = [p[0] for p in pairs], [p[1] for p in pairs]
    print(f"\n(single samples move by +-30% with what the head does meanwhile; the ratio is the median of the "
          f"{repeat} pairs' ratios: ours {min(o) * 1e3:.1f}-{max(o) * 1e3:.1f} ms, raw {min(r) * 1e3:.1f}-"
          f"{max(r) * 1e3:.1f} ms)")
    table(f"2. submit + first status of a single-role app (preflight on, the default), median of {repeat}", [
        ("Runner.run + Runner.status vs submit_job + get_job_status", statistics.median(o), statistics.median(r),
         "s"),
    ], ratio_of_pairs=statistics.median(a / b for a, b in pairs))
    jobs.drain(120)


# ------------------------------------------------------------------------ 3. throughput ---
def bench_throughput(url: str, client: Any, jobs: Jobs, n: int, threads: int) -> None:
    """``n`` apps from ``threads`` threads on both sides: a Runner per thread (defaults: preflight
    on) vs ``submit_job`` on one client shared by the threads, as a user of Ray would fan out."""
    env = {"env_vars": {"TORCHX_EXT_BENCH": "1"}}
    runners = [get_runner() for _ in range(threads)]
    # warm-up, untimed: each runner's client connects once, as the raw client did (a status
    # connects; one app, not one per runner: each would be a job start for the head to drain)
    warm = runners[0].run(trivial_app("tp-warm"), "ray_jobs", {"dashboard_url": url})
    jobs.add_app(warm)
    for r in runners[1:]:
        r.status(warm)

    def ours(k: int, count: int) -> float:
        def submit(i: int) -> str:
            return runners[i % threads].run(trivial_app(f"tp-{k}-{i}"), "ray_jobs", {"dashboard_url": url})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            handles = list(pool.map(submit, range(count)))
        took = time.perf_counter() - t0
        for h in handles:
            jobs.add_app(h)
        return took

    def raw(k: int, count: int) -> float:
        def submit(_: int) -> str:
            return str(client.submit_job(entrypoint="python -c pass", runtime_env=env, metadata={"bench": "raw"}))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            sids = list(pool.map(submit, range(count)))
        took = time.perf_counter() - t0
        jobs.add(*sids)
        return took

    # rounds in the order raw, ours, ours, raw (ABBA): a drift of the head over the bench (it
    # moves by +-20% between runs here) weighs on both sides alike
    rounds = 2 if n >= 2 * threads else 1
    sizes = [n // rounds + (1 if k < n % rounds else 0) for k in range(rounds)]
    order = [("raw", 0), ("ours", 0)] + ([("ours", 1), ("raw", 1)] if rounds == 2 else [])
    spent: dict[str, float] = {"raw": 0.0, "ours": 0.0}
    jobs.drain(300)
    for name, k in order:
        progress(f"throughput: {name}, round {k + 1} of {rounds} ({sizes[k]} apps) ...")
        before = set(jobs.ids)
        took = (raw if name == "raw" else ours)(k, sizes[k])
        spent[name] += took
        t0 = time.time()
        # untimed: the next round starts on an idle cluster (the jobs are deleted at the end)
        mine = [sid for sid in jobs.ids - before if not sid.endswith(("--waiting", "--cancelled"))]
        left = len(mine) - len(wait_terminal(client, mine, 900, poll_s=0.5))
        progress(f"throughput: {name} {sizes[k] / took:.1f} apps/s; its jobs ended {time.time() - t0:.0f} s later"
                 + (f" ({left} still running)" if left else ""))
    for r in runners:
        r.close()
    table(f"3. submission throughput, {rounds} round(s) a side (ratio < 1: ours slower)", [
        (f"{n} apps from {threads} threads: Runner.run vs submit_job", n / spent["ours"], n / spent["raw"], "apps/s"),
    ])


# ------------------------------------------------------------------------ 4. DAG ----------
def dag_shape(n: int, width: int) -> list[list[int]]:
    """parents of each app, by index: app i in layer L depends on apps j, j+1 (mod width) of L-1."""
    parents: list[list[int]] = []
    for i in range(n):
        layer, j = divmod(i, width)
        if layer == 0:
            parents.append([])
        else:
            base = (layer - 1) * width
            prev = min(width, n - base)
            parents.append(sorted({base + j % prev, base + (j + 1) % prev}))
    return parents


def first_driver_line_ms(client: Any, sid: str) -> Optional[float]:
    """Unix ms of the first marked line the job printed (our driver's, or the raw child's)."""
    for line in client.get_job_logs(sid).split("\n"):
        if line.startswith(FRAME_MARK):  # a frame's header: "<mark>role replica stream time length"
            parts = line[len(FRAME_MARK):].split(" ")
            if len(parts) == 5:
                return float(parts[3]) * 1000
        elif line.startswith("up "):  # the raw child: "up <time.time()>"
            return float(line.split()[1]) * 1000
    return None


def latencies(client: Any, details: dict[str, Any], sids: list[str],
              parents: list[list[int]]) -> dict[int, tuple[float, Optional[float]]]:
    """App index -> (last dependency's end -> its job submitted, -> its first line), in s."""
    out: dict[int, tuple[float, Optional[float]]] = {}
    for i, ps in enumerate(parents):
        if not ps or sids[i] not in details or any(sids[p] not in details for p in ps):
            continue
        ready = max(details[sids[p]].end_time for p in ps)
        first = first_driver_line_ms(client, sids[i])
        out[i] = ((details[sids[i]].start_time - ready) / 1000, None if first is None else (first - ready) / 1000)
    return out


def bench_dag(url: str, client: Any, jobs: Jobs, n: int, width: int, raw_layers: int, timeout: float) -> None:
    runner = get_runner()
    parents = dag_shape(n, width)
    progress(f"dag: submitting {n} apps ({(n + width - 1) // width} layers of {width}) ...")
    handles: list[str] = []
    t0 = time.perf_counter()
    for i, ps in enumerate(parents):
        cfg: dict[str, Any] = {"dashboard_url": url, "preflight": False}
        if ps:
            cfg["dependencies"] = [handles[p] for p in ps]
        handles.append(runner.run(trivial_app(f"dag-{i}"), "ray_jobs", cfg))
        jobs.add_app(handles[-1])
    submit_s = time.perf_counter() - t0
    runner.close()
    sids = [sid_of(h) for h in handles]
    details = wait_terminal(client, sids, timeout)
    run_s = time.perf_counter() - t0
    failed = sum(1 for d in details.values() if status_of(d) != "SUCCEEDED")
    progress(f"dag: ours done in {run_s:.0f} s ({len(details)}/{n} ended, {failed} not SUCCEEDED)")
    ours = latencies(client, details, sids, parents)

    # raw: the client polls and submits each app once its parents succeeded
    rn = min(n, raw_layers * width)
    rparents = dag_shape(rn, width)
    rsids: list[Optional[str]] = [None] * rn
    code = "import time; print('up', time.time(), flush=True)"
    t1 = time.perf_counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed = {j.submission_id: status_of(j) for j in client.list_jobs()}
        for i, ps in enumerate(rparents):
            if rsids[i] is None and all(rsids[p] is not None and listed.get(rsids[p]) == "SUCCEEDED" for p in ps):
                rsids[i] = str(client.submit_job(entrypoint=f"python -c {shlex.quote(code)}",
                                                 metadata={"bench": "raw-dag"}))
                jobs.add(rsids[i])
        if all(s is not None and listed.get(s) in TERMINAL for s in rsids):
            break
        time.sleep(BROKER_POLL_S)
    rdetails = wait_terminal(client, [s for s in rsids if s], 5)
    raw_s = time.perf_counter() - t1
    raw = latencies(client, rdetails, [s or "" for s in rsids], rparents)
    progress(f"dag: raw done in {raw_s:.0f} s")
    layers = (n + width - 1) // width
    print(f"\n(ours: {n} apps in {layers} layers of {width}, each depending on up to 2 apps of the layer before, "
          f"submitted up front in {submit_s:.1f} s ({n - min(n, width)} of them waiting records: no supervisor), "
          f"all ended after {run_s:.0f} s, {failed} not SUCCEEDED; raw: a client-side orchestrator polling every "
          f"{BROKER_POLL_S} s, {rn} apps in {min(layers, raw_layers)} layers, {raw_s:.0f} s)")
    rows = []
    for label, k in (("dep end -> dependent submitted", 0), ("dep end -> dependent's driver up", 1)):
        o = [v[k] for v in ours.values() if v[k] is not None]
        r = [v[k] for v in raw.values() if v[k] is not None]
        if o and r:
            rows += [(f"{label}, median", statistics.median(o), statistics.median(r), "s"),
                     (f"{label}, p95", p95(o), p95(r), "s")]
    table(f"4. dependency success -> dependent start latency ({len(ours)} / {len(raw)} dependents)", rows)
    by_layer = {}
    for i, (_sub, up) in ours.items():
        if up is not None:
            by_layer.setdefault(i // width, []).append(up)
    print("ours, driver-up latency by layer (median s): "
          + ", ".join(f"L{layer} {statistics.median(v):.1f}" for layer, v in sorted(by_layer.items())))
    jobs.drain(300)


# ------------------------------------------------------------------------ 5. memory -------
def _procs() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, cmdline, rss bytes) of every process we can read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            rss = 0
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
        out[int(name)] = (ppid, cmd, rss)
    return out


def cluster_temp_dir(url: str) -> Optional[str]:
    """The --temp-dir of the local dashboard serving ``url`` (None: not on this machine)."""
    port = urllib.parse.urlparse(url).port
    for _pid, (_ppid, cmd, _rss) in _procs().items():
        if "dashboard/dashboard.py" in cmd and f"--port={port} " in cmd + " ":
            for word in cmd.split():
                if word.startswith("--temp-dir="):
                    return word.split("=", 1)[1]
    return None


def cluster_usage(temp_dir: str) -> tuple[int, int]:
    """(RSS sum in bytes, process count) of the head's processes and all their descendants."""
    procs = _procs()
    members = {pid for pid, (_pp, cmd, _r) in procs.items() if temp_dir in cmd}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _c, _r) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return sum(procs[p][2] for p in members), len(members)


def sample_usage(temp_dir: str, settle: float = 2.0, samples: int = 3) -> tuple[float, float]:
    """Median (RSS MB, process count) over a few samples, after letting idle workers go."""
    time.sleep(settle)
    got = []
    for _ in range(samples):
        got.append(cluster_usage(temp_dir))
        time.sleep(0.5)
    return statistics.median(g[0] for g in got) / 2**20, statistics.median(g[1] for g in got)


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def attributed(match: Callable[[int, str], bool]) -> tuple[float, int]:
    """(RSS MB, processes) of the matching processes and their ancestors up to the job supervisor.

    A Ray job's own processes are its driver (``match``), the shell Ray wraps it in, and its
    ``JobSupervisor`` actor; everything above is the head's and shared.
    """
    procs = _procs()
    seen: set[int] = set()
    for pid, (_pp, cmd, _r) in procs.items():
        if not match(pid, cmd):
            continue
        cur = pid
        while cur in procs and cur not in seen and "raylet" not in procs[cur][1]:
            seen.add(cur)
            if "JobSupervisor" in procs[cur][1]:
                break
            cur = procs[cur][0]
    return sum(procs[p][2] for p in seen) / 2**20, len(seen)


def wait_status(client: Any, sid: str, want: tuple[str, ...], timeout: float) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            st = status_of(client.get_job_info(sid))
        except RuntimeError:
            st = "MISSING"
        if st in want or time.time() > deadline:
            return st
        time.sleep(0.5)


def bench_memory(url: str, client: Any, jobs: Jobs, waiters: int, naive: int) -> None:
    temp_dir = cluster_temp_dir(url)
    if temp_dir is None:
        print("\n== 5. memory: skipped (the dashboard's processes are not on this machine) ==")
        return
    others: list[int] = []

    def sample() -> tuple[float, float]:  # counting others' active jobs: they are noise here
        others.append(sum(1 for j in client.list_jobs() if j.submission_id not in jobs.ids and status_of(j)
                          in ("PENDING", "RUNNING") and (j.metadata or {}).get(KIND) != "broker"))
        return sample_usage(temp_dir)

    # naive: one waiting job per app, the cheapest kind (a sleeping python, no ray import)
    progress(f"memory: {naive} naive waiting jobs ...")
    mark = f"TORCHX_EXT_BENCH_MARK={uuid.uuid4().hex}"
    base_rss, base_n = sample()
    code = "import time; time.sleep(120)"
    naive_ids = [str(client.submit_job(
        entrypoint=f"python -c {shlex.quote(code)}", metadata={"bench": "naive-wait"},
        runtime_env={"env_vars": dict([mark.split("=", 1)])})) for _ in range(naive)]
    jobs.add(*naive_ids)
    for sid in naive_ids:
        wait_status(client, sid, ("RUNNING",) + TERMINAL, 120)
    naive_rss, naive_n = sample()
    naive_attr = attributed(lambda pid, cmd: "time.sleep" in cmd and mark.encode() in _environ(pid))
    for sid in naive_ids:
        client.stop_job(sid)
    jobs.drain(120, naive_ids)

    # ours: a sleeper, one warm-up dependent (starts the shared broker if needed), then the waiters
    runner = get_runner()
    cfg = {"dashboard_url": url, "preflight": False}
    parent = runner.run(trivial_app("mem-parent", "import time; time.sleep(600)"), "ray_jobs", cfg)
    jobs.add_app(parent)
    wait_status(client, sid_of(parent), ("RUNNING",) + TERMINAL, 120)
    dep_cfg = {**cfg, "dependencies": [parent]}
    handles = [runner.run(trivial_app("mem-warm"), "ray_jobs", dep_cfg)]
    jobs.add_app(handles[0])
    deadline = time.time() + 120  # the broker's own start is a cost per cluster, not per app
    while time.time() < deadline and not any((j.metadata or {}).get(KIND) == "broker" and status_of(j) == "RUNNING"
                                             for j in client.list_jobs()):
        time.sleep(0.5)
    progress(f"memory: {waiters} apps waiting on a sleeper ...")
    ours_base_rss, ours_base_n = sample()
    for i in range(waiters):
        handles.append(runner.run(trivial_app(f"mem-wait-{i}"), "ray_jobs", dep_cfg))
        jobs.add_app(handles[-1])
    for h in handles[1:]:  # the waiting records never start: Ray holds them PENDING
        wait_status(client, sid_of(h) + "--waiting", ("PENDING",) + TERMINAL, 300)
    ours_rss, ours_n = sample()
    waiting_sids = [sid_of(h) for h in handles[1:]]
    ours_attr = attributed(lambda pid, cmd: any(s in cmd for s in waiting_sids))
    states = [runner.status(h) for h in handles[1:]]
    still_waiting = sum(1 for s in states if s is not None and s.state.name == "PENDING")
    brokers = [j.submission_id for j in client.list_jobs()
               if (j.metadata or {}).get(KIND) == "broker" and status_of(j) in ("PENDING", "RUNNING")]
    broker_rss, broker_n = attributed(lambda pid, cmd: "ray_jobs_cluster.broker" in cmd and "sh -c" not in cmd)
    runner.cancel(parent)  # the broker then fails every waiter (a verdict job each)
    runner.close()
    wait_terminal(client, [sid_of(h) for h in handles], 300)
    jobs.drain(300)

    print(f"\n== 5. cluster memory per waiting app ({waiters} apps waiting on a sleeper vs {naive} raw "
          f"jobs sleeping; RSS of the head's process tree, median of 3 samples) ==")
    print(f"cluster-wide: naive {base_rss:.0f} -> {naive_rss:.0f} MB, {base_n:.0f} -> {naive_n:.0f} processes; "
          f"ours {ours_base_rss:.0f} -> {ours_rss:.0f} MB, {ours_base_n:.0f} -> {ours_n:.0f} processes "
          f"({still_waiting}/{waiters} reported PENDING; other users' jobs active while sampling: max {max(others)})")
    print(f"shared broker job(s) (a fixed cost per cluster, not per app): {len(brokers)} running "
          f"({', '.join(brokers)}), {broker_rss:.0f} MB in {broker_n} processes on this machine")
    table("naive = a raw sleeping job per waiting app (ours/raw < 1: ours cheaper)", [
        ("cluster RSS delta per waiting app", (ours_rss - ours_base_rss) / waiters, (naive_rss - base_rss) / naive,
         "MB"),
        ("cluster processes delta per waiting app", (ours_n - ours_base_n) / waiters, (naive_n - base_n) / naive, "n"),
        ("RSS of the waiting app's own processes", ours_attr[0] / waiters, naive_attr[0] / naive, "MB"),
        ("own processes per waiting app", ours_attr[1] / waiters, naive_attr[1] / naive, "n"),
    ])
    if ours_rss > ours_base_rss:
        ratio = (naive_rss - base_rss) / naive / ((ours_rss - ours_base_rss) / waiters)
        print(f"naive / ours, cluster RSS per waiting app: {ratio:.0f}x")


# ---------------------------------------------------------------------------- 6. restart ---
RESTART_CODE = ("import os, sys, time; print('START %.6f' % time.time(), flush=True); "
                "(print('EXIT %.6f' % time.time(), flush=True), sys.exit(1)) "
                "if os.environ['TORCHX_EXT_ATTEMPT'] == '1' else None")


class _Dying:
    """Ray's own restart: an actor with max_restarts=1 that exits; __init__ time on each start."""

    def __init__(self, mark: str) -> None:
        self.started, self.mark = time.time(), mark

    def started_at(self) -> float:
        return self.started

    def die(self) -> None:
        with open(self.mark, "w") as f:
            f.write(f"{time.time():.6f}")
        os._exit(1)


def bench_restart(url: str, client: Any, jobs: Jobs, repeat: int) -> None:
    import ray

    runner = get_runner()
    ours: list[float] = []
    for _ in range(repeat):
        role = Role("r", image="", entrypoint="python", args=["-c", RESTART_CODE], num_replicas=2, max_retries=1,
                    resource=Resource(cpu=0, gpu=0, memMB=0))
        role.retry_policy = "REPLICA"  # type: ignore[assignment]  # by value: also on torchx 0.7.0
        handle = runner.run(AppDef("bench-restart", roles=[role]), "ray_jobs", {"dashboard_url": url})
        jobs.add_app(handle)
        wait_terminal(client, [sid_of(handle)], 180)
        text = "".join(runner.log_lines(handle, "r", 0))
        exit_t = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("EXIT "))
        ours.append([float(x.split()[1]) for x in text.splitlines() if x.startswith("START ")][1] - exit_t)
    runner.close()
    ray.init(address=os.environ["TORCHX_EXT_TEST_RAY_ADDRESS"], log_to_driver=False, logging_level=logging.WARNING)
    raw: list[float] = []
    try:
        dying = ray.remote(max_restarts=1, num_cpus=0)(_Dying)
        for _ in range(repeat):
            mark = tempfile.mktemp(prefix="bench_restart_")
            actor = dying.remote(mark)
            ray.get(actor.started_at.remote())
            actor.die.remote()
            deadline = time.time() + 120
            while True:
                try:
                    started = ray.get(actor.started_at.remote(), timeout=30)
                    if os.path.exists(mark) and started > float(open(mark).read() or 0):
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                if time.time() > deadline:
                    raise TimeoutError("the actor did not restart")
                time.sleep(0.01)
            raw.append(started - float(open(mark).read()))
            ray.kill(actor)
            os.unlink(mark)
    finally:
        ray.shutdown()
    table(f"6. restart latency, exit 1 -> next attempt runs, median of {repeat}", [
        ("gang replica restarted by the driver vs actor max_restarts", statistics.median(ours),
         statistics.median(raw), "s"),
    ])
    jobs.drain(120)


# -------------------------------------------------------------------------------- 7. log ---
LOG_LINE = 100  # characters of each numbered line the replica writes (newline included)


class CountingRelay:
    """A TCP relay in front of the dashboard that counts the bytes it sends to its client."""

    def __init__(self, url: str) -> None:
        import socket
        import threading

        parts = urllib.parse.urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.received = 0  # bytes from the dashboard to the follower
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(conn, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, conn, True), daemon=True).start()

    def _pipe(self, src: Any, dst: Any, count: bool) -> None:
        import socket

        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


def follow_child(side: str, url: str, ident: str, lines: int) -> None:
    """One follower (a process of its own) writes what it follows to a file, as a user's
    ``torchx log -f > f`` or ``ray job logs -f > f`` would; prints a JSON line with its CPU time.
    Ours then checks (untimed) that every numbered line came once and in order."""
    # a write-only sink, as a redirected stdout is: a "w+" file resets its decoder at every write,
    # a cost per write that weighed on the side writing a line at a time (ours), not a chunk (raw)
    fd, path = tempfile.mkstemp()
    with open(fd, "w") as sink, open(path) as back:
        os.unlink(path)
        if side == "ours":
            import ray.job_submission  # noqa: F401  # imported before the clock starts, as on the raw side

            from torchx_ext.schedulers.ray_jobs.scheduler import create_scheduler as make

            t0 = time.process_time()
            sink.writelines(make("bench-log").log_iter(ident, "log", 0, should_tail=True))
            cpu = time.process_time() - t0
            sink.flush()
            n, in_order = 0, True
            for n, text in enumerate(back):  # noqa: B007
                in_order = in_order and text.startswith(f"{n:08d} ")
            out = {"cpu_s": cpu, "lines": n + 1, "in_order": in_order and n + 1 == lines}
        else:
            import asyncio

            from ray.job_submission import JobSubmissionClient

            t0 = time.process_time()
            client = JobSubmissionClient(url)

            async def tail() -> None:
                async for chunk in client.tail_job_logs(ident):
                    sink.write(chunk)

            async def tail_lines() -> None:
                # a consumer that hands on lines, as every other backend's raw row in
                # bench/bench_logs.py reads them (and as log_iter must)
                rest = ""
                async for chunk in client.tail_job_logs(ident):
                    data = rest + chunk
                    cut = data.rfind("\n") + 1
                    sink.writelines(LINES.findall(data, 0, cut))
                    rest = data[cut:]
                sink.write(rest)

            asyncio.run(tail() if side == "raw" else tail_lines())
            cpu = time.process_time() - t0
            out = {"cpu_s": cpu, "bytes": sink.tell()}
    print(json.dumps(out), flush=True)


def bench_log(url: str, client: Any, jobs: Jobs, log_mb: float, write_s: float) -> None:
    lines = max(1, int(log_mb * 1e6 / LOG_LINE))
    # in 100 bursts over write_s: a log that grows while it is followed, as a training's does
    code = (f"import sys, time; w = sys.stdout.write; pad = 'x' * {LOG_LINE - 10}; n = {lines}\n"
            f"for b in range(100):\n"
            f"    for i in range(b * n // 100, (b + 1) * n // 100): w('%08d %s\\n' % (i, pad))\n"
            f"    sys.stdout.flush(); time.sleep({write_s / 100})")
    app = AppDef("bench-log", roles=[Role("log", image="", entrypoint="python", args=["-c", code],
                                          resource=Resource(cpu=0, gpu=0, memMB=0))])
    relays = {side: CountingRelay(url) for side in ("ours", "raw", "raw-lines")}
    runner = get_runner()
    try:
        handle = runner.run(app, "ray_jobs", {"dashboard_url": url})
        jobs.add_app(handle)
        sid = sid_of(handle)
        t0 = time.time()
        procs = {}
        for side, ident in (("ours", make_app_id(relays["ours"].url, sid)), ("raw", sid), ("raw-lines", sid)):
            procs[side] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--follow-child", side, relays[side].url, ident,
                 str(lines)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        results = {}
        for side, proc in procs.items():
            out, _ = proc.communicate(timeout=3600)
            results[side] = json.loads(out.strip().splitlines()[-1])
        wall = time.time() - t0
    finally:
        runner.close()
        for relay in relays.values():
            relay.close()
    size = results["raw"]["bytes"]
    ours, raw = results["ours"], results["raw"]
    print(f"\njob log: {size / 1e6:.1f} MB ({lines} lines of {LOG_LINE} characters from the replica in 100 bursts "
          f"over {write_s:g} s, marked by the driver); followed in {wall:.0f} s; ours got {ours['lines']} lines, "
          f"every one once and in order: {ours['in_order']}")
    table(f"7. following a replica's log of {log_mb:g} MB to the end", [
        ("bytes from the dashboard / job log size", relays["ours"].received / size, relays["raw"].received / size,
         "x"),
        ("client CPU of the follower", ours["cpu_s"], raw["cpu_s"], "s"),
        ("client CPU, raw = Ray's tail handed on as lines", ours["cpu_s"], results["raw-lines"]["cpu_s"], "s"),
    ])
    jobs.drain(120)


# ------------------------------------------------------------------------------- main -----
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard", default=None, help="Ray dashboard URL (default: $TORCHX_EXT_TEST_RAY_DASHBOARD)")
    parser.add_argument("--repeat", type=int, default=9, help="repetitions of benches 1 and 2 (median)")
    parser.add_argument("--restart-repeat", type=int, default=3, help="repetitions of bench 6 (median)")
    parser.add_argument("--apps", type=int, default=64, help="apps of the throughput bench")
    parser.add_argument("--threads", type=int, default=8, help="threads submitting, on both sides")
    parser.add_argument("--dag", type=int, default=100, help="apps of the dependency DAG")
    parser.add_argument("--dag-width", type=int, default=10, help="apps per layer of the DAG")
    parser.add_argument("--raw-dag-layers", type=int, default=3, help="layers of the raw orchestrator's DAG")
    parser.add_argument("--dag-timeout", type=float, default=420, help="seconds the DAG may take")
    parser.add_argument("--waiters", type=int, default=20, help="apps waiting on a sleeper (memory bench)")
    parser.add_argument("--naive", type=int, default=5, help="raw sleeping jobs (memory bench)")
    parser.add_argument("--log-mb", type=float, default=float(os.environ.get("TORCHX_EXT_BENCH_LOG_MB", "200")),
                        help="MB the replica of bench 7 writes (default: $TORCHX_EXT_BENCH_LOG_MB or 200)")
    parser.add_argument("--log-write-s", type=float, default=30.0,
                        help="seconds over which the replica of bench 7 writes them (at least)")
    parser.add_argument("--follow-child", nargs=4, metavar=("SIDE", "URL", "ID", "LINES"), help=argparse.SUPPRESS)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    args = parser.parse_args()
    if args.follow_child:  # bench 7's follower processes
        side, child_url, ident, n = args.follow_child
        follow_child(side, child_url, ident, int(n))
        return 0
    load_testbed_env()
    url = args.dashboard or os.environ.get("TORCHX_EXT_TEST_RAY_DASHBOARD")
    if not url:
        parser.error("no dashboard: pass --dashboard http://HEAD:8265 or set TORCHX_EXT_TEST_RAY_DASHBOARD")
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench(es) {', '.join(unknown)}; valid: {', '.join(BENCHES)}")
    # an isolated home: manifests, known clusters and workspace copies do not land in the user's
    home = tempfile.mkdtemp(prefix="torchx_ext_bench_ray_")
    os.environ["TORCHX_EXT_HOME"] = home
    os.environ.pop("RAY_ADDRESS", None)  # the apps' cluster is --dashboard's, nothing else
    t_start = time.time()
    phases: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.time()
        try:
            fn()
        finally:
            phases[name] = time.time() - t0

    if "dryrun" in only:
        timed("dryrun", lambda: bench_dryrun(url, args.repeat))  # before anything in this process imports ray

    from ray.job_submission import JobSubmissionClient

    # Ray's INFO lines per submit ("Package ... already exists, skipping upload")
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = JobSubmissionClient(url)
    jobs = Jobs(client, url)
    version = client._do_request("GET", "/api/version").json().get("ray_version", "?")
    print(f"\ncluster: {url}, Ray {version}; this machine: {os.cpu_count()} cores", flush=True)
    try:
        if "submit" in only:
            timed("submit", lambda: bench_submit(url, client, jobs, args.repeat))
        if "throughput" in only:
            timed("throughput", lambda: bench_throughput(url, client, jobs, args.apps, args.threads))
        if "dag" in only:
            timed("dag", lambda: bench_dag(url, client, jobs, args.dag, args.dag_width, args.raw_dag_layers,
                                           args.dag_timeout))
        if "memory" in only:
            timed("memory", lambda: bench_memory(url, client, jobs, args.waiters, args.naive))
        if "restart" in only:
            timed("restart", lambda: bench_restart(url, client, jobs, args.restart_repeat))
        if "log" in only:
            timed("log", lambda: bench_log(url, client, jobs, args.log_mb, args.log_write_s))
    finally:
        t0 = time.time()
        try:
            left = jobs.drain(300)
            back = jobs.sweep()
            if back:
                print(f"note: Ray re-created {back} deleted job(s) as FAILED; deleted them again")
            if left:
                print(f"WARNING: {len(left)} job(s) could not be deleted: {', '.join(left[:10])}")
        except Exception as e:  # e.g. the head went away (the shared testbed head can be restarted)
            print(f"WARNING: cleanup failed ({type(e).__name__}: {str(e)[:200]}); "
                  f"{len(jobs.ids)} job id(s) may be left: {', '.join(sorted(jobs.ids)[:10])}")
        shutil.rmtree(home, ignore_errors=True)
        phases["cleanup"] = time.time() - t0
    print(f"\ntotal bench time: {time.time() - t_start:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
