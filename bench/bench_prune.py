"""``python -m torchx_ext prune`` of thousands of ended apps (issue 24): completes, frees what it
says, and leaves every running app untouched.

Per scheduler (``host``; ``slurm_jobs`` on the testbed cluster, ``bash testbed/slurm.sh start``), in
a fresh ``$TORCHX_EXT_HOME``:

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

    PYTHONPATH=. .venv-test/bin/python bench/bench_prune.py [--ended 2000] [--running 50] [-s host]

Everything started is cancelled (only this benchmark's own jobs), and the homes removed, at the end,
also when the benchmark fails. Exit status 1 if a check fails.
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
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from typing import Any, Callable, NamedTuple

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


def exact_said(scheduler: str) -> tuple[int, int]:
    """(apps, bytes) a dry run computes, in this process: the exact figure prune prints rounded."""
    from torchx_ext import prune

    with redirect_stdout(io.StringIO()):
        totals = prune.prune([scheduler], DAY, dry_run=True, out=lambda _: None, warn=lambda _: None)
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
    return {"scheduler": scheduler, "dry": dry, "real": real, "raw": raw, "said": said, "gone": gone,
            "du_b": du_b0 - du_b1, "du_k": du_k0 - du_k1, "index": (index0, index1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ended", type=int, default=2000)
    ap.add_argument("--running", type=int, default=50)
    ap.add_argument("--log-kb", type=int, default=10)
    ap.add_argument("-s", "--scheduler", action="append", choices=["host", "slurm_jobs"])
    ap.add_argument("--partition", default=os.environ.get("TORCHX_EXT_TEST_SLURM_PARTITION", "debug"))
    a = ap.parse_args()
    runner = get_runner()
    results = []
    for name in a.scheduler or ["host", "slurm_jobs"]:
        cleanup: list[Callable[[], object]] = []
        try:
            results.append(bench(name, a, runner, cleanup))
        finally:
            for step in reversed(cleanup):
                step()
    print(f"\n{'measure':<62} {'wall s':>7} {'CPU s':>6} {'vs rm -rf (wall, CPU)':>22}")
    for r in results:
        raw = r["raw"]
        for what, t in ((f"{r['scheduler']}: prune --dry-run, {a.ended} ended + {a.running} live", r["dry"]),
                        (f"{r['scheduler']}: prune, {a.ended} ended + {a.running} live", r["real"]),
                        (f"{r['scheduler']}: raw: one rm -rf of {a.ended} app directories", raw)):
            ratio = f"{t.wall / raw.wall:10.1f}x {t.cpu / max(raw.cpu, 1e-3):9.1f}x"
            print(f"{what:<62} {t.wall:7.2f} {t.cpu:6.2f} {ratio}")
        print(f"{r['scheduler']}: said {r['said']} B, gone {r['gone']} B of files (du -sb: {r['du_b']} B, du -sk: "
              f"{r['du_k']} KiB gone; index.jsonl {r['index'][0]} -> {r['index'][1]} B)")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if FAILED:
        print(f"{len(FAILED)} check(s) failed: " + "; ".join(FAILED))
        sys.exit(1)


if __name__ == "__main__":
    main()
