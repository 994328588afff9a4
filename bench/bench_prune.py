"""``python -m torchx_ext prune`` of thousands of ended apps (issue 24): completes, frees what it
says, and leaves every running app untouched.

Per scheduler (``host``; ``slurm_jobs`` on the testbed cluster, ``bash testbed/slurm.sh start``;
``docker_jobs`` and ``ray_jobs``: below), in a fresh ``$TORCHX_EXT_HOME``:

* ``--running`` apps that have not ended (host: ``sleep``; slurm_jobs: jobs submitted ``--hold``,
  PENDING until cancelled, so that the shared testbed's two nodes stay free), submitted for real;
* ``--ended`` ended apps, FABRICATED as ``bench/bench_list.py`` does (one real app, ended, copied
  under new ids; slurm: job ids slurmctld never had), each with ``--log-kb`` of log, ended 2 to 5
  days ago (host: ``ended`` in ``state.json``; slurm_jobs: the submission time and the ``result``
  file's time, which is what each ``_prunable`` reads); the real app they were copied from is
  then deleted, so that the home holds exactly the ended and the running apps;
* ``prune --older-than 1d -s SCHED --dry-run``, then the real prune, each a new process, timed
  (wall, and CPU of the process and its children);
* checks: both report ``--ended`` apps; the dry run removes nothing; the prune removes every
  ended app (its directory gone, the index says so) and the bytes it says (exactly, as computed
  in-process before it, and as printed) are the bytes gone from the home's files (``du`` before
  and after too); every running app is still there, in the same state (``describe``), with the
  same files and the same record; ``torchx list`` then shows exactly the running apps;
* the raw baseline in the same run: the same number of ended apps fabricated again and removed by
  hand, one ``rm -rf`` of their directories (for slurm_jobs nothing else: there is no job to
  cancel), and the prune's ratio to it.

``docker_jobs`` (the testbed's daemon, ``source testbed/.state/docker.env``; only the local
``$TORCHX_EXT_TEST_DOCKER_BUSYBOX`` image, never a pull) and ``ray_jobs`` (the testbed's head,
``source testbed/.state/ray.env``: ``--dashboard`` and ``--gcs``) keep an app on the backend, not
in directories of the home, so the same steps differ thus:

* docker_jobs: the ``--running`` apps are busybox ``sleep 600``, on docker's ``bridge`` network
  (an app's own network, the default, stops at ~30 apps: the daemon's default address pools run
  out). An ended app, as the real one shows it, is an exited container, its verdict volume
  ``<app>.verdict`` and ``<app>.request.json`` in the home; each fabricated one is a container made
  with ``docker create`` and NEVER STARTED (``created``, not ``exited``: starting 2,000 costs
  minutes, and prune reads only that it does not run) with the real container's ``torchx-ext.*``
  labels (new app id; ``network_mode=none``, the real app's network being gone), the verdict volume
  with the real verdict's labels and a FAKED verdict time 2 to 5 days ago (the ``torchx-ext.time``
  label: what ``docker_jobs_retention.prunable`` reads), and the request file (its mtime that time
  too), 4 at once. The home's watcher (running for the live apps) sees each created container,
  takes its lease and lets it go: the bench waits for that to settle. Checks: the containers and
  volumes of every ended app gone from the daemon; the home's files removed are exactly their
  request files, and their bytes are what prune says (prune counts no bytes on the daemon:
  containers, their logs and volumes are freed unsaid; the count of the daemon's vfs layer
  directories before and after is printed); every live app RUNNING, with the same containers
  (id, running, start time), no verdict, the same request file (its lease volumes are not
  compared: the watcher renews them every 2 s); ``torchx list`` shows the live apps and none
  pruned (it shows every docker_jobs app on the shared daemon: other users' are counted apart).
  Raw: the same objects fabricated again, removed one by one with the SDK in a new process
  (``remove_container(force=True)``, ``remove_volume``, ``os.remove``; the ids known, no listing).
* ray_jobs: the live apps are ``time.sleep(600)`` jobs, ``--ray-running`` of them (10 by default,
  not 50: each running app costs the head ~375 MB, driver, supervisor actor and replica: 50 would
  take ~19 GB of the shared machine's 23). An ended app is its Ray job record (JobInfo, which Ray's
  job manager keeps in the GCS KV, ``_ray_internal_job_info_<id>`` in namespace ``job``) plus a
  line of the home's manifest; each fabricated one is the real ended app's record, copied with a
  new submission id and FAKED ``start_time``/``end_time`` 2 to 5 days ago (``end_time``: what
  ``ray_jobs_retention.prunable`` reads), written with ``GcsClient.internal_kv_put`` (no driver:
  ``ray.init`` would add a job), plus the manifest line. No driver ever runs for them (a real job
  costs the head ~0.7 s): the Jobs API lists, gets and deletes them as any ended submission job,
  and ``delete_job`` removes exactly that record (not the driver's log, which a fabricated job does
  not have; the real template's stays on the head after delete, as printed). Checks: every ended
  app's record gone (the KV and ``list_jobs``); prune says its sizes are unknown, the bytes of the
  records gone are printed; every live app RUNNING with the same job record (status, times,
  metadata, entrypoint, driver); ``torchx list`` as for docker_jobs. Raw: the same records
  fabricated again, ``JobSubmissionClient.delete_job`` of each in a new process.

    PYTHONPATH=. .venv-test/bin/python bench/bench_prune.py [--ended 2000] [--running 50] [-s host]
    source testbed/.state/docker.env; source testbed/.state/ray.env
    PYTHONPATH=. .venv-test/bin/python bench/bench_prune.py -s docker_jobs -s ray_jobs [--ray-running 10]

Everything started is cancelled (only this benchmark's own jobs), and the homes removed, at the end,
also when the benchmark fails; on docker and Ray, every container, volume, network, job record and
driver log of this benchmark's apps (and only those) is removed. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from typing import Any, Callable, NamedTuple, Optional

from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

from torchx_ext.prune import SESSION

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_list import DAY, ROOT, TORCHX, _host_app, _run, _wait_ended, fabricate_host, fabricate_slurm  # noqa: E402

PRUNE = [sys.executable, "-m", "torchx_ext", "prune", "--older-than", "1d"]
NEWEST_AGE, SPAN = 2 * DAY, 3 * DAY  # the ended apps ended 2 to 5 days ago: all older than 1d
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        FAILED.append(what)


class Run(NamedTuple):
    wall: float
    cpu: float
    out: str


def timed(cmd: list[str], home: str) -> Run:
    return Run(*_run(cmd, home, ROOT))


def median_wall(cmd: list[str], home: str, n: int = 5) -> float:
    return statistics.median(timed(cmd, home).wall for _ in range(n))


def list_and_status(scheduler: str, home: str, one_app_status: float, live: str, ended: str) -> None:
    """Issue 24's list/status measure with the ended apps in place (``bench_list.py`` covers host and
    slurm_jobs): ``torchx list`` (goal <= 1 s) and ``torchx status`` of a live and of an ended app
    (goal <= 1.1x the status of this home when it held one app), median of 5 new processes each (the
    ratio of two 0.2 s figures on a shared 2-core machine: 3 left it at the mercy of one slow run)."""
    listed = median_wall([TORCHX, "list", "-s", scheduler], home)
    st_live, st_ended = median_wall([TORCHX, "status", live], home), median_wall([TORCHX, "status", ended], home)
    print(f"{scheduler}: torchx list {listed:.3f} s (goal <= 1 s); torchx status: a live app {st_live:.3f} s, "
          f"an ended one {st_ended:.3f} s, against {one_app_status:.3f} s in the one-app home "
          f"({st_live / one_app_status:.2f}x, {st_ended / one_app_status:.2f}x; goal <= 1.1x)")


def file_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (what prune counts: ``tree_bytes``)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def du(path: str, flag: str) -> int:
    return int(subprocess.run(["du", flag, path], capture_output=True, text=True, check=True).stdout.split()[0])


def snapshot(path: str) -> dict[str, str]:
    """Every file under ``path``: its content's hash (sizes alone would miss a rewrite)."""
    out = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha1(f.read()).hexdigest()
    return out


def said_bytes(summary: str) -> float:
    """The bytes the summary line prints (``freed 19.6 MiB``), and its rounding."""
    m = re.search(r"(?:freed|would free) ([\d.]+) (B|KiB|MiB|GiB)", summary)
    assert m, summary
    return float(m.group(1)) * {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}[m.group(2)]


def exact_totals(scheduler: str) -> Any:
    """The totals a dry run computes, in this process: the exact figures prune prints rounded."""
    from torchx_ext import prune

    with redirect_stdout(io.StringIO()):
        return prune.prune([scheduler], DAY, dry_run=True, out=lambda _: None, warn=lambda _: None)


def exact_said(scheduler: str) -> tuple[int, int]:
    """(apps, bytes) a dry run computes, in this process: the exact figure prune prints rounded."""
    totals = exact_totals(scheduler)
    return totals.apps, totals.bytes


def bench(scheduler: str, a: argparse.Namespace, runner: Runner, cleanup: list[Callable[[], object]]) -> dict[str, Any]:
    home = tempfile.mkdtemp(prefix=f"bench_prune_{scheduler}_")
    cleanup.append(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["TORCHX_EXT_HOME"] = home  # the schedulers read it at each call
    root = os.path.join(home, scheduler)
    res = Resource(cpu=1, gpu=0, memMB=100)
    if scheduler == "host":
        template = runner.run(_host_app("bench", "true"), "host", {})
        live_app, cfg = _host_app("live", "sleep", "600"), {}
        live_state = AppState.RUNNING
    else:
        cfg = {"partition": a.partition}
        template = runner.run(AppDef("bench", roles=[Role("main", image=ROOT, entrypoint="true", resource=res)]),
                              "slurm_jobs", cfg)
        live_app = AppDef("live", roles=[Role("main", image=ROOT, entrypoint="sleep", args=["600"], resource=res)])
        cfg = {**cfg, "sbatch_args": ["--hold"]}
        live_state = AppState.PENDING
    live: list[str] = []
    if scheduler == "host":
        cleanup.append(lambda: [runner.cancel(h) for h in live])
    else:  # this benchmark's own job ids only: other people's jobs run on the same cluster
        cleanup.append(lambda: subprocess.run(["scancel", *[h.rsplit("/", 1)[-1] for h in live]],
                                              capture_output=True) if live else None)
    _wait_ended(runner, template)
    for _ in range(a.running):
        live.append(runner.run(live_app, scheduler, cfg))
    tid = template.rsplit("/", 1)[-1]
    fabricate: Callable[..., list[str]] = fabricate_host if scheduler == "host" else fabricate_slurm
    t0 = time.perf_counter()
    ids = fabricate(home, tid, a.ended, NEWEST_AGE, SPAN, log_bytes=a.log_kb * 1024)
    fab_s = time.perf_counter() - t0
    # the template is no part of the set: kept aside for the baseline, removed as a user would
    # (what torchx delete calls)
    scratch = tempfile.mkdtemp(prefix=f"bench_prune_raw_{scheduler}_")
    cleanup.append(lambda: shutil.rmtree(scratch, ignore_errors=True))
    shutil.copytree(os.path.join(root, tid), os.path.join(scratch, scheduler, tid))
    if scheduler == "slurm_jobs":  # its job directory <id>.<token> too, into the same copy
        with open(os.path.join(root, tid, "app.json")) as f:
            shutil.copytree(json.load(f)["job_dir"], os.path.join(scratch, scheduler, tid), dirs_exist_ok=True)
    importlib.import_module(f"torchx_ext.schedulers.{scheduler}").create_scheduler(SESSION).delete(tid)
    deadline = time.time() + 120
    while time.time() < deadline:  # every live app in its steady state before the snapshot
        states = [runner.status(h) for h in live]
        if all(s is not None and s.state == live_state for s in states):
            break
        time.sleep(0.2)
    live_ids = [h.rsplit("/", 1)[-1] for h in live]
    records = {i: snapshot(os.path.join(root, i)) for i in live_ids}
    before_states = {h: runner.status(h).state for h in live}
    print(f"{scheduler}: {a.ended} ended apps fabricated in {fab_s:.1f} s, {a.running} {live_state.name}")
    check(all(s == live_state for s in before_states.values()), f"all {a.running} live apps {live_state.name}")

    index = os.path.join(root, "index.jsonl")
    bytes0, du_b0, du_k0 = file_bytes(home), du(home, "-sb"), du(home, "-sk")
    index0 = os.path.getsize(index) if os.path.exists(index) else 0
    said_apps, said = exact_said(scheduler)
    dry = timed([*PRUNE, "-s", scheduler, "--dry-run"], home)
    dry_sum = dry.out.strip().splitlines()[-1]
    check(said_apps == a.ended and f"would remove {a.ended} app(s)" in dry_sum,
          f"dry run lists {a.ended} apps: {dry_sum!r}")
    check(file_bytes(home) == bytes0 and all(os.path.isdir(os.path.join(root, i)) for i in ids),
          "dry run removes nothing")
    real = timed([*PRUNE, "-s", scheduler], home)
    summary = real.out.strip().splitlines()[-1]
    lines = [x for x in real.out.splitlines() if x.startswith("removed ") and "://" in x]
    check(f"removed {a.ended} app(s)" in summary and len(lines) == a.ended, f"prune: {summary!r}")
    gone_dirs = [i for i in ids if not os.path.lexists(os.path.join(root, i))]
    check(len(gone_dirs) == a.ended, f"{len(gone_dirs)} of {a.ended} ended apps' directories gone")
    bytes1, du_b1, du_k1 = file_bytes(home), du(home, "-sb"), du(home, "-sk")
    index1 = os.path.getsize(index) if os.path.exists(index) else 0
    gone = (bytes0 - index0) - (bytes1 - index1)  # the index grows by one line an app: counted apart
    check(said == gone, f"said {said} B (exact), gone from the home's files {gone} B (index.jsonl: "
          f"{index0} -> {index1} B)")
    printed = said_bytes(summary)
    check(abs(printed - gone) <= 0.05 * 1024 ** 2 + 0.0005 * gone, f"printed {printed:.0f} B ~ gone {gone} B")
    with open(index) as f:
        gone_lines = {json.loads(x)["id"] for x in f if '"gone":true' in x}
    check(set(ids) <= gone_lines, f"index.jsonl marks all {a.ended} pruned apps gone")

    after_states = {h: (runner.status(h) or AppState.UNKNOWN) for h in live}
    changed = [h for h, s in after_states.items() if getattr(s, "state", s) != before_states[h]]
    check(not changed, f"every live app still {live_state.name} (describe): {len(changed)} changed")
    touched = [i for i in live_ids if snapshot(os.path.join(root, i)) != records[i]]
    check(not touched, f"every live app's files intact (same names, same content): {len(touched)} touched")
    listed = timed([TORCHX, "list", "-s", scheduler], home)
    shown = {x.split()[0] for x in listed.out.splitlines() if x.startswith(f"{scheduler}://")}
    check(shown == set(live), f"torchx list shows exactly the {a.running} live apps ({len(shown)} shown)")

    # the raw baseline: the same apps fabricated again (in a scratch home), removed by hand
    again = fabricate(scratch, tid, a.ended, NEWEST_AGE, SPAN, log_bytes=a.log_kb * 1024,
                      **({} if scheduler == "host" else {"first_id": 61_000_000}))
    raw = timed(["rm", "-rf", *[os.path.join(scratch, scheduler, i) for i in again]], scratch)
    return {"scheduler": scheduler, "ended": a.ended, "running": a.running, "dry": dry, "real": real, "raw": raw,
            "raw_what": f"raw: one rm -rf of {a.ended} app directories",
            "notes": [f"{scheduler}: said {said} B, gone {gone} B of files (du -sb: {du_b0 - du_b1} B, du -sk: "
                      f"{du_k0 - du_k1} KiB gone; index.jsonl {index0} -> {index1} B)"]}


# ------------------------------------------------------------------------------ docker_jobs ----
BUSYBOX = os.environ.get("TORCHX_EXT_TEST_DOCKER_BUSYBOX", "torchx-ext-test/busybox:latest")
WORKERS = 4  # daemon calls at once while fabricating and cleaning up (2 cores, shared)
# the raw baseline: the same daemon objects and files, removed one by one with the SDK (the ids known)
# (an object already gone is counted, not an error: the daemon is shared, and a "docker container
# prune" by someone else removes never-started containers too; it happened once here)
def wait_running(runner: Runner, live: list[str], timeout: float) -> None:
    """Until every live app is RUNNING (the checks after the prune compare against that), or ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [runner.status(h) for h in live]
        if all(s is not None and s.state == AppState.RUNNING for s in states):
            return
        time.sleep(0.5)


def prune_twice(scheduler: str, home: str, ended: int, totals: Any,
                unchanged_after_dry: Callable[[], bool]) -> tuple[Run, Run, str]:
    """``prune --dry-run`` then ``prune`` of ``ended`` apps, each checked: the dry run lists them
    and removes nothing (``unchanged_after_dry``), the prune removes each once. Returns both runs
    and the prune's summary line."""
    dry = timed([*PRUNE, "-s", scheduler, "--dry-run"], home)
    dry_sum = dry.out.strip().splitlines()[-1]
    check(totals.apps == ended and f"would remove {ended} app(s)" in dry_sum,
          f"dry run lists {ended} apps: {dry_sum!r}")
    check(unchanged_after_dry(), "dry run removes nothing")
    real = timed([*PRUNE, "-s", scheduler], home)
    summary = real.out.strip().splitlines()[-1]
    lines = [x for x in real.out.splitlines() if x.startswith("removed ") and "://" in x]
    check(f"removed {ended} app(s)" in summary and len(lines) == ended, f"prune: {summary!r}")
    return dry, real, summary


def live_untouched(runner: Runner, scheduler: str, home: str, live: list[str], before_states: dict[str, Any],
                   touched: list[str], what: str) -> set[str]:
    """Checks that every live app is in its state of before and its backend record unchanged
    (``touched``: those that changed; ``what``: the record, as printed); returns the handles
    ``torchx list`` then shows."""
    after_states = {h: (runner.status(h) or AppState.UNKNOWN) for h in live}
    changed = [h for h, s in after_states.items() if getattr(s, "state", s) != before_states[h]]
    check(not changed, f"every live app still RUNNING (describe): {len(changed)} changed")
    check(not touched, f"every live app's {what}: {len(touched)} touched")
    listed = timed([TORCHX, "list", "-s", scheduler], home)
    return {x.split()[0] for x in listed.out.splitlines() if x.startswith(f"{scheduler}://")}


RAW_DOCKER = """import json, os, sys, docker
spec = json.load(open(sys.argv[1]))
api = docker.APIClient(version=os.environ.get("DOCKER_API_VERSION") or "auto")
missing = 0
for c in spec["containers"]:
    try:
        api.remove_container(c, force=True)
    except docker.errors.NotFound:
        missing += 1
for v in spec["volumes"]:
    try:
        api.remove_volume(v)
    except docker.errors.NotFound:
        missing += 1
for f in spec["files"]:
    os.remove(f)
print(f"missing {missing}")
"""


def gone_ok(fn: Callable[[], object]) -> None:
    """``fn``, an object already gone being no error (the daemon is shared)."""
    import docker

    try:
        fn()
    except docker.errors.NotFound:
        pass


def pool_map(fn: Callable[[Any], Any], items: list[Any], workers: int = WORKERS) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


class DockerTemplate(NamedTuple):
    """One real ended docker_jobs app, as the daemon and the home keep it."""

    app_id: str
    labels: dict[str, str]  # its container's torchx-ext.* labels
    verdict: dict[str, str]  # its verdict volume's labels
    request: str  # its <app>.request.json


def fabricate_docker(api: Any, home: str, tpl: DockerTemplate, n: int, newest_age: float, span: float) -> list[str]:
    """``n`` ended apps copied from ``tpl`` under new ids: per app a container made with ``docker
    create`` (never started) with the template container's labels, the verdict volume with the
    template's labels and a verdict time ``newest_age`` to ``newest_age + span`` ago (what
    ``docker_jobs_retention.prunable`` reads), and the request file (its mtime that time too)."""
    from torchx_ext.schedulers.docker_jobs import daemon as d

    now = time.time()
    ids = [f"{tpl.app_id.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    host_config = api.create_host_config(network_mode="none")  # the template's own network is gone

    def one(k: int) -> None:
        app_id, ended = ids[k], now - newest_age - span * k / max(n - 1, 1)
        labels = {**tpl.labels, d.L_APP_ID: app_id, d.L_NETWORK: app_id, d.L_CREATED: f"{ended - 1:.3f}"}
        api.create_container(BUSYBOX, command=["true"], name=f"{app_id}-main-0", labels=labels,
                             host_config=host_config, detach=True)
        api.create_volume(d.verdict_volume(app_id), driver="local",
                          labels={**tpl.verdict, d.L_APP_ID: app_id, d.L_NETWORK: app_id, d.L_TIME: f"{ended:.6f}"})
        path = os.path.join(home, "docker_jobs", f"{app_id}.request.json")
        with open(path, "w") as f:
            f.write(tpl.request.replace(tpl.app_id, app_id))
        os.utime(path, (ended, ended))

    pool_map(one, list(range(n)))
    return ids


def docker_objects(api: Any, ids: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The containers and volumes (verdicts, leases) on the daemon that belong to the apps ``ids``."""
    from torchx_ext.schedulers.docker_jobs import daemon as d
    from torchx_ext.schedulers.docker_jobs import lease as leases

    cs = [c for c in api.containers(all=True, filters={"label": f"{d.L_SCHEDULER}={d.SCHEDULER}"})
          if c["Labels"].get(d.L_APP_ID) in ids]
    vols = [v["Name"] for v in api.volumes().get("Volumes") or []
            if ((v.get("Labels") or {}).get(d.L_APP_ID) in ids or (v.get("Labels") or {}).get(leases.L_LEASE) in ids)]
    return cs, vols


def settled(api: Any, ids: list[str]) -> None:
    """Waits until the apps ``ids`` have only their verdict volumes: the home's watcher (running for
    the live apps) sees the fabricated containers' creation, takes each one's lease, finds the
    verdict and lets it go."""
    deadline = time.time() + 300
    while time.time() < deadline and len(docker_objects(api, set(ids))[1]) > len(ids):
        time.sleep(0.5)


def sizes(path: str) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, path)] = os.lstat(p).st_size
    return out


def vfs_dirs() -> Optional[int]:
    try:
        return len(os.listdir("/var/lib/docker/vfs/dir"))
    except OSError:
        return None


def bench_docker(a: argparse.Namespace, runner: Runner, cleanup: list[Callable[[], object]]) -> dict[str, Any]:
    from torchx_ext.schedulers.docker_jobs import create_scheduler
    from torchx_ext.schedulers.docker_jobs import daemon as d

    scheduler = "docker_jobs"
    home = tempfile.mkdtemp(prefix=f"bench_prune_{scheduler}_")
    cleanup.append(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["TORCHX_EXT_HOME"] = home
    root = os.path.join(home, scheduler)
    api = d.client(pool_size=WORKERS * 2)
    mine: set[str] = set()  # every app id of this benchmark: only these are ever removed by hand

    def sweep() -> None:  # cleanup, also after a failure: this benchmark's apps only
        live_now = [c for c in docker_objects(api, mine)[0] if c.get("State") == "running"]
        pool_map(lambda c: gone_ok(lambda: api.stop(c["Id"], timeout=2)), live_now)
        from torchx_ext.schedulers.docker_jobs import watching as w

        deadline = time.time() + 30
        while os.path.isdir(root) and w.watcher_running() and time.time() < deadline:
            time.sleep(0.2)  # the home's watcher pins the verdicts of what stopped, then exits
        cs, vols = docker_objects(api, mine)
        pool_map(lambda c: gone_ok(lambda: api.remove_container(c["Id"], force=True)), cs)
        pool_map(lambda v: gone_ok(lambda: api.remove_volume(v)), vols)
        for net in api.networks(filters={"label": f"{d.L_SCHEDULER}={d.SCHEDULER}"}):
            if net["Name"] in mine:
                gone_ok(lambda n=net: api.remove_network(n["Id"]))
    cleanup.append(sweep)

    cfg = {"pull_policy": "never", "stop_timeout": 2}
    res = Resource(cpu=1, gpu=0, memMB=100)
    template = runner.run(AppDef("bprune", roles=[Role("main", image=BUSYBOX, entrypoint="true", resource=res)]),
                          scheduler, cfg)
    tid = template.rsplit("/", 1)[-1]
    mine.add(tid)
    _wait_ended(runner, template)
    deadline = time.time() + 60
    while time.time() < deadline:  # over: its verdict pinned, its watcher lease given back
        cs, vols = docker_objects(api, {tid})
        if vols == [d.verdict_volume(tid)]:
            break
        time.sleep(0.2)
    one_app_status = median_wall([TORCHX, "status", template], home)  # the home holds this app alone
    tpl = DockerTemplate(tid, {k: v for k, v in cs[0]["Labels"].items() if k.startswith(d.P)},
                         api.inspect_volume(d.verdict_volume(tid))["Labels"],
                         open(os.path.join(root, f"{tid}.request.json")).read())
    live_app = AppDef("live", roles=[Role("main", image=BUSYBOX, entrypoint="sleep", args=["600"], resource=res)])
    live: list[str] = []
    # on docker's default bridge: a network of its own each (the default) stops at ~30 apps, the
    # daemon's default address pools then refuse ("could not find an available, non-overlapping
    # IPv4 address pool")
    live_cfg = {**cfg, "network_mode": "bridge"}
    for _ in range(a.running):
        live.append(runner.run(live_app, scheduler, live_cfg))
        mine.add(live[-1].rsplit("/", 1)[-1])
    t0 = time.perf_counter()
    ids = fabricate_docker(api, home, tpl, a.ended, NEWEST_AGE, SPAN)
    fab_s = time.perf_counter() - t0
    mine.update(ids)
    settled(api, ids)
    create_scheduler(SESSION).delete(tid)  # the template is no part of the set
    wait_running(runner, live, 120)
    live_ids = [h.rsplit("/", 1)[-1] for h in live]

    def live_record(app_id: str) -> Any:
        snap = d.fetch(api, app_id)
        conts = sorted((c["Id"], c["State"], api.inspect_container(c["Id"])["State"]["StartedAt"])
                       for c in docker_objects(api, {app_id})[0])
        path = os.path.join(root, f"{app_id}.request.json")
        with open(path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()
        # its lease volumes are not compared: the watcher renews them every 2 s (a new epoch's volume)
        return conts, snap is not None and snap.verdict is None, digest

    records = {i: live_record(i) for i in live_ids}
    before_states = {h: runner.status(h).state for h in live}
    print(f"{scheduler}: {a.ended} ended apps fabricated in {fab_s:.1f} s ({fab_s / a.ended * 1000:.0f} ms an app: "
          f"docker create + a verdict volume + a request file, {WORKERS} at once), {a.running} RUNNING")
    check(all(s == AppState.RUNNING for s in before_states.values()), f"all {a.running} live apps RUNNING")
    list_and_status(scheduler, home, one_app_status, live[0], f"{template.rsplit('/', 1)[0]}/{ids[0]}")

    fab = set(ids)
    cs0, vols0 = docker_objects(api, fab)
    check(len(cs0) == a.ended and len(vols0) == a.ended, f"{len(cs0)} containers and {len(vols0)} verdict volumes "
          f"of the {a.ended} ended apps on the daemon")
    files0, vfs0 = sizes(home), vfs_dirs()
    totals = exact_totals(scheduler)

    def nothing_removed() -> bool:  # containers, volumes, files
        cs1, vols1 = docker_objects(api, fab)
        return len(cs1) == a.ended and len(vols1) == a.ended and sizes(home).keys() >= files0.keys()

    dry, real, summary = prune_twice(scheduler, home, a.ended, totals, nothing_removed)
    cs2, vols2 = docker_objects(api, fab)
    check(not cs2 and not vols2, f"every ended app's containers and volumes gone from the daemon "
          f"({len(cs2)} containers, {len(vols2)} volumes left)")
    files1, vfs1 = sizes(home), vfs_dirs()
    removed = files0.keys() - files1.keys()
    expected = {os.path.join(scheduler, f"{i}.request.json") for i in ids}
    check(removed == expected, f"the home's files removed: exactly the {a.ended} ended apps' request files "
          f"({len(removed)} removed, {len(removed - expected)} others)")
    gone = sum(files0[p] for p in removed)
    check(totals.bytes == gone, f"said {totals.bytes} B (exact), gone from the home's files {gone} B")
    printed = said_bytes(summary)
    check(abs(printed - gone) <= 0.05 * 1024 ** 2 + 0.0005 * gone, f"printed {printed:.0f} B ~ gone {gone} B")

    touched = [i for i in live_ids if live_record(i) != records[i]]
    shown = live_untouched(runner, scheduler, home, live, before_states, touched,
                           "containers (same id, running, same start), no verdict, request file intact")
    # the daemon is shared: list shows every docker_jobs app on it, other users' too
    shown_mine = {h.rsplit("/", 1)[-1] for h in shown} & mine
    check(shown_mine == set(live_ids), f"torchx list shows the {a.running} live apps of this benchmark and none "
          f"pruned ({len(shown_mine)} of its apps shown; {len(shown) - len(shown_mine)} other users' apps)")

    again = fabricate_docker(api, home, tpl, a.ended, NEWEST_AGE, SPAN)
    mine.update(again)
    settled(api, again)
    cs3, vols3 = docker_objects(api, set(again))
    spec = os.path.join(home, "raw.json")
    with open(spec, "w") as f:
        json.dump({"containers": [c["Id"] for c in cs3], "volumes": vols3,
                   "files": [os.path.join(root, f"{i}.request.json") for i in again]}, f)
    raw = timed([sys.executable, "-c", RAW_DOCKER, spec], home)
    cs4, vols4 = docker_objects(api, set(again))
    check(not cs4 and not vols4, f"raw: everything removed ({raw.out.strip()}: already gone, removed by another "
          "user of the shared daemon)")
    vfs_note = (f"; the daemon's vfs layer directories {vfs0} -> {vfs1} (-{vfs0 - vfs1}, 2 a container)"
                if vfs0 is not None and vfs1 is not None else "")
    return {"scheduler": scheduler, "ended": a.ended, "running": a.running, "dry": dry, "real": real, "raw": raw,
            "raw_what": f"raw: SDK removes, {a.ended} apps (ctrs+vols+files)",
            "notes": [f"{scheduler}: said {totals.bytes} B, gone {gone} B of the home's files "
                      f"({len(removed)} request files); on the daemon {len(cs0)} containers and {len(vols0)} "
                      f"volumes removed (prune counts no daemon bytes){vfs_note}"]}


# --------------------------------------------------------------------------------- ray_jobs ----
JOB_KEY = "_ray_internal_job_info_"  # Ray's own key of a submission job's record in the GCS KV
JOB_NS = b"job"  # (ray.dashboard.modules.job.common.JobInfoStorageClient)
RAW_RAY = """import json, sys
from ray.job_submission import JobSubmissionClient
spec = json.load(open(sys.argv[1]))
client = JobSubmissionClient(spec["url"])
for sid in spec["ids"]:
    client.delete_job(sid)
"""


def gcs_client(address: str) -> Any:
    from ray._raylet import GcsClient  # no driver: ray.init would add a job of its own

    return GcsClient(address=address)


def job_records(gcs: Any, ids: list[str]) -> dict[str, bytes]:
    """The Ray job records (JobInfo JSON) among ``ids`` that exist."""
    got = gcs.internal_kv_multi_get([(JOB_KEY + i).encode() for i in ids], namespace=JOB_NS) if ids else {}
    return {k.decode()[len(JOB_KEY):]: v for k, v in got.items() if v is not None}


def fabricate_ray(gcs: Any, home: str, tid: str, tpl: tuple[dict[str, Any], str], n: int, newest_age: float,
                  span: float) -> list[str]:
    """``n`` ended apps copied from the real ended app ``tid`` (``tpl``: its record and manifest
    line): its Ray job record (Ray's JobInfo, as the job manager writes it to the GCS KV) under new
    submission ids, started and ended ``newest_age`` to ``newest_age + span`` ago (``end_time``:
    what ``ray_jobs_retention.prunable`` reads), and its manifest line. No driver ever runs: Ray's
    Jobs API lists, gets and deletes them as it does any ended submission job (delete_job removes
    exactly this record)."""
    now = time.time()
    record, line = tpl
    manifest = os.path.join(home, "ray_jobs", "manifest.jsonl")
    ids = [f"{tid.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    lines = []
    for k, sid in enumerate(ids):
        ended = now - newest_age - span * k / max(n - 1, 1)
        info = {**record, "entrypoint": record["entrypoint"].replace(tid, sid),
                "start_time": int((ended - 1) * 1000), "end_time": int(ended * 1000)}
        gcs.internal_kv_put((JOB_KEY + sid).encode(), json.dumps(info).encode(), True, namespace=JOB_NS)
        lines.append(line.replace(tid, sid))
    with open(manifest, "a") as f:
        f.writelines(lines)
    return ids


def ray_driver_log(sid: str) -> Optional[str]:
    """The head's log of a job's driver (testbed/.state/ray.vars names the head's temp dir)."""
    try:
        with open(os.path.join(ROOT, "testbed", ".state", "ray.vars")) as f:
            tmpd = dict(x.strip().split("=", 1) for x in f if "=" in x).get("TMPD")
    except OSError:
        return None
    return os.path.join(tmpd, "session_latest", "logs", f"job-driver-{sid}.log") if tmpd else None


def bench_ray(a: argparse.Namespace, runner: Runner, cleanup: list[Callable[[], object]]) -> dict[str, Any]:
    from ray.job_submission import JobSubmissionClient

    from torchx_ext.schedulers.ray_jobs import client as rc
    from torchx_ext.schedulers.ray_jobs import create_scheduler

    scheduler, url, running = "ray_jobs", a.dashboard, a.ray_running
    if not url or not a.gcs:
        raise SystemExit("ray_jobs: give --dashboard and --gcs (or source testbed/.state/ray.env)")
    home = tempfile.mkdtemp(prefix=f"bench_prune_{scheduler}_")
    cleanup.append(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["TORCHX_EXT_HOME"] = home
    gcs, client = gcs_client(a.gcs), JobSubmissionClient(url)
    mine: list[str] = []  # every submission id of this benchmark: only these are ever removed by hand
    real_ids: list[str] = []  # those that ran a driver (the head keeps each one's log)

    def sweep() -> None:  # cleanup, also after a failure: this benchmark's jobs only
        sched = create_scheduler(SESSION)
        for sid in real_ids:
            try:
                sched.delete(rc.make_app_id(url, sid))  # stops it first if it runs
            except Exception as e:  # noqa: BLE001 - clean up the rest
                print(f"cleanup: {sid}: {e}", file=sys.stderr)
        for sid in job_records(gcs, mine):
            gcs.internal_kv_del((JOB_KEY + sid).encode(), False, namespace=JOB_NS)
        for sid in real_ids:
            log = ray_driver_log(sid)
            if log and os.path.exists(log):
                os.remove(log)
    cleanup.append(sweep)

    cfg = {"dashboard_url": url, "preflight": False}
    res = Resource(cpu=0, gpu=0, memMB=0)  # a token 0.01 CPU: the live apps never queue for CPUs
    template = runner.run(AppDef("bprune", roles=[Role("bprune", image="", entrypoint="true", resource=res)]),
                          scheduler, cfg)
    tid = rc.split_app_id(template.rsplit("/", 1)[-1])[1]
    mine.append(tid)
    real_ids.append(tid)
    _wait_ended(runner, template)
    one_app_status = median_wall([TORCHX, "status", template], home)  # the home holds this app alone
    live_app = AppDef("live", roles=[Role("live", image="", entrypoint="python",
                                          args=["-c", "import time; time.sleep(600)"], resource=res)])
    live: list[str] = []
    for _ in range(running):
        live.append(runner.run(live_app, scheduler, cfg))
        mine.append(rc.split_app_id(live[-1].rsplit("/", 1)[-1])[1])
        real_ids.append(mine[-1])
    with open(os.path.join(home, scheduler, "manifest.jsonl")) as f:
        tpl = json.loads(job_records(gcs, [tid])[tid]), next(x for x in f if tid in x)
    t0 = time.perf_counter()
    ids = fabricate_ray(gcs, home, tid, tpl, a.ended, NEWEST_AGE, SPAN)
    fab_s = time.perf_counter() - t0
    mine.extend(ids)
    create_scheduler(SESSION).delete(template.rsplit("/", 1)[-1])  # the template is no part of the set
    tpl_log = ray_driver_log(tid)
    wait_running(runner, live, 180)
    live_sids = [rc.split_app_id(h.rsplit("/", 1)[-1])[1] for h in live]

    def live_record(sid: str) -> Any:
        j = client.get_job_info(sid)
        return j.status, j.start_time, j.end_time, j.entrypoint, j.metadata, j.driver_info, j.job_id

    records = {s: live_record(s) for s in live_sids}
    before_states = {h: runner.status(h).state for h in live}
    print(f"{scheduler}: {a.ended} ended apps fabricated in {fab_s:.2f} s ({fab_s / a.ended * 1000:.2f} ms an app: "
          f"one GCS KV put + a manifest line), {running} RUNNING")
    check(all(s == AppState.RUNNING for s in before_states.values()), f"all {running} live apps RUNNING")
    list_and_status(scheduler, home, one_app_status, live[0],
                    f"{template.rsplit('/', 1)[0]}/{rc.make_app_id(url, ids[0])}")

    kv0 = job_records(gcs, ids)
    kv_bytes = sum(len(JOB_KEY) + len(k) + len(v) for k, v in kv0.items())
    listed0 = {j.submission_id for j in client.list_jobs()}
    check(len(kv0) == a.ended and set(ids) <= listed0,
          f"the {a.ended} ended apps' job records in Ray ({len(kv0)}; Jobs API lists them)")
    files0 = sizes(home)
    totals = exact_totals(scheduler)
    dry, real, summary = prune_twice(
        scheduler, home, a.ended, totals,
        lambda: len(job_records(gcs, ids)) == a.ended and sizes(home).keys() >= files0.keys())
    left = job_records(gcs, ids)
    listed1 = {j.submission_id for j in client.list_jobs()}
    check(not left and not set(ids) & listed1, f"every ended app's Ray job gone ({len(left)} records left, "
          f"{len(set(ids) & listed1)} listed)")
    files1 = sizes(home)
    gone = sum(files0.values()) - sum(files1.values())
    check(totals.bytes == 0 and totals.unknown_sizes == a.ended and f"(and {a.ended} of unknown size)" in summary,
          f"said {totals.bytes} B and {totals.unknown_sizes} of unknown size; freed {kv_bytes} B of Ray job "
          f"records (GCS KV keys+values); the home's files {gone:+d} B")

    touched = [s for s in live_sids if live_record(s) != records[s]]
    shown = live_untouched(runner, scheduler, home, live, before_states, touched,
                           "Ray job record intact (status, times, metadata, driver)")
    ours = {rc.split_app_id(h.rsplit("/", 1)[-1])[1] for h in shown}
    check(set(live) <= shown and not ours & (set(ids) | {tid}),
          f"torchx list shows the {running} live apps and none pruned ({len(shown)} shown; "
          f"{len(shown) - len(set(live) & shown)} other users' apps on the shared head)")

    again = fabricate_ray(gcs, home, tid, tpl, a.ended, NEWEST_AGE, SPAN)
    mine.extend(again)
    spec = os.path.join(home, "raw.json")
    with open(spec, "w") as f:
        json.dump({"url": url, "ids": again}, f)
    raw = timed([sys.executable, "-c", RAW_RAY, spec], home)
    check(not job_records(gcs, again), "raw: every job deleted")
    log_note = (f"; the template's driver log stays on the head after delete ({os.path.getsize(tpl_log)} B: "
                f"Ray's delete_job removes only the record)" if tpl_log and os.path.exists(tpl_log) else "")
    return {"scheduler": scheduler, "ended": a.ended, "running": running, "dry": dry, "real": real, "raw": raw,
            "raw_what": f"raw: JobSubmissionClient.delete_job x {a.ended}",
            "notes": [f"{scheduler}: said {totals.bytes} B and {totals.unknown_sizes} app(s) of unknown size; "
                      f"gone: {kv_bytes} B of Ray job records from the GCS KV, the home's files {gone:+d} B{log_note}"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ended", type=int, default=2000)
    ap.add_argument("--running", type=int, default=50)
    ap.add_argument("--log-kb", type=int, default=10)
    ap.add_argument("-s", "--scheduler", action="append", choices=["host", "slurm_jobs", "docker_jobs", "ray_jobs"])
    ap.add_argument("--partition", default=os.environ.get("TORCHX_EXT_TEST_SLURM_PARTITION", "debug"))
    ap.add_argument("--dashboard", default=os.environ.get("TORCHX_EXT_TEST_RAY_DASHBOARD"), help="ray_jobs: its URL")
    ap.add_argument("--gcs", default=os.environ.get("TORCHX_EXT_TEST_RAY_ADDRESS"), help="ray_jobs: the GCS address")
    ap.add_argument("--ray-running", type=int, default=10,
                    help="ray_jobs' live apps (~375 MB of head memory each here: 50 would take 19 GB)")
    a = ap.parse_args()
    runner = get_runner()
    results = []
    for name in a.scheduler or ["host", "slurm_jobs"]:
        cleanup: list[Callable[[], object]] = []
        try:
            if name == "docker_jobs":
                results.append(bench_docker(a, runner, cleanup))
            elif name == "ray_jobs":
                results.append(bench_ray(a, runner, cleanup))
            else:
                results.append(bench(name, a, runner, cleanup))
        finally:
            for step in reversed(cleanup):
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - the other steps still run
                    print(f"cleanup step failed: {e!r}", file=sys.stderr)
    print(f"\n{'measure':<62} {'wall s':>7} {'CPU s':>6} {'vs raw (wall, CPU)':>22}")
    for r in results:
        raw = r["raw"]
        for what, t in ((f"{r['scheduler']}: prune --dry-run, {r['ended']} ended + {r['running']} live", r["dry"]),
                        (f"{r['scheduler']}: prune, {r['ended']} ended + {r['running']} live", r["real"]),
                        (f"{r['scheduler']}: {r['raw_what']}", raw)):
            ratio = f"{t.wall / raw.wall:10.1f}x {t.cpu / max(raw.cpu, 1e-3):9.1f}x"
            print(f"{what:<62} {t.wall:7.2f} {t.cpu:6.2f} {ratio}")
        for line in r["notes"]:
            print(line)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed: " + "; ".join(FAILED))
        sys.exit(1)


if __name__ == "__main__":
    main()
