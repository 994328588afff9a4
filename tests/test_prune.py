"""Retention on the real engines: ``python -m torchx_ext prune`` and ``delete``.

Per scheduler: two short apps and one long one; once the short ones ended, a dry-run prune lists
them and removes nothing, a prune removes everything they left (listed before and after: files
under the home, the job directories, docker objects, Ray jobs), and the long app is untouched and
still runs. ``delete`` (what ``torchx delete`` calls on torchx-nightly; called here on the scheduler,
so on both TorchX versions) removes a running app and all it left. Each test has its own home.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, Role

from conftest import ROOT, require_backend
from contract import wait_state, wait_terminal
from torchx_ext import state
from torchx_ext.prune import parse_duration

SMALL = Resource(cpu=1, gpu=0, memMB=128)
TIMEOUT = 90.0


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A home of this test's own (short: ssh's control sockets live there): prune sees only its apps."""
    path = tempfile.mkdtemp(prefix="txp-", dir="/tmp")
    monkeypatch.setenv("TORCHX_EXT_HOME", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runner(home: str) -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


@pytest.fixture
def workspace() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="txp-ws-")
    with open(os.path.join(path, "hello.txt"), "w") as f:
        f.write("hello\n" * 100)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def prune(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m torchx_ext prune ARGS`` in a new process (the home is the test's)."""
    return subprocess.run([sys.executable, "-m", "torchx_ext", "prune", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ))


def app(name: str, image: str, cmd: list[str]) -> AppDef:
    return AppDef(name, roles=[Role("main", image=image, entrypoint=cmd[0], args=cmd[1:], resource=SMALL)])


def exercise(runner: Runner, scheduler: str, make: Callable[[bool], AppDef], cfg: dict[str, Any],
             left: Callable[[str], list[str]], workspace: Optional[str] = None) -> tuple[str, str]:
    """Runs the shared scenario (see the module docstring); returns (long app handle, prune's output).

    ``left(app_id)``: what the app left (paths, object names); empty once it is gone. The first short
    app is submitted with ``workspace`` (its copy or image must go too)."""
    shorts = [runner.run(make(True), scheduler, cfg, workspace=workspace if i == 0 else None) for i in range(2)]
    long = runner.run(make(False), scheduler, cfg)
    for h in shorts:
        assert wait_terminal(runner, h, TIMEOUT).state == AppState.SUCCEEDED
    wait_state(runner, long, AppState.RUNNING, TIMEOUT)
    ids = [h.rsplit("/", 1)[-1] for h in [*shorts, long]]
    settled(lambda: [left(i) for i in ids[:2]])  # an ended app's watcher may still be tidying up
    before = {i: left(i) for i in ids}
    assert all(before.values()), before

    dry = prune("--older-than", "0s", "-s", scheduler, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for h in shorts:
        assert f"would remove {h} (SUCCEEDED" in dry.stdout, dry.stdout
    assert long not in dry.stdout and "would remove 2 app(s)" in dry.stdout, dry.stdout
    assert {i: left(i) for i in ids} == before, "a dry-run removed something"

    started = time.monotonic()
    real = prune("--older-than", "0s", "-s", scheduler)
    took = time.monotonic() - started
    assert real.returncode == 0, real.stderr
    assert "removed 2 app(s)" in real.stdout and long not in real.stdout, real.stdout
    print(f"\n{scheduler}: prune of 2 apps took {took:.1f} s (process included):\n{real.stdout}")
    for i, h in zip(ids[:2], shorts, strict=True):
        assert f"removed {h} (SUCCEEDED" in real.stdout
        assert not left(i), f"{h} left {left(i)}"
        assert runner.status(h) is None
    assert left(ids[2]) == before[ids[2]], "the running app was touched"
    assert runner.status(long).state == AppState.RUNNING  # type: ignore[union-attr]
    return long, real.stdout


def assert_listed_after_prune(runner: Runner, scheduler: str, long: str, pruned_output: str) -> None:
    """``list`` (which reads an index, torchx_ext.index) shows the running app, not the pruned ones."""
    listed = [a.app_handle for a in runner.list(scheduler)]
    pruned = re.findall(rf"removed ({scheduler}://\S+) \(", pruned_output)
    assert len(pruned) == 2 and not set(pruned) & set(listed) and listed == [long], (listed, pruned)


def settled(read: Callable[[], Any], timeout: float = 30.0) -> None:
    """Waits until ``read()`` gives the same answer twice 1 s apart."""
    deadline, last = time.time() + timeout, read()
    while time.time() < deadline:
        time.sleep(1.0)
        now = read()
        if now == last:
            return
        last = now
    raise AssertionError(f"still changing after {timeout} s: {last}")


def delete_running(runner: Runner, scheduler: str, handle: str, left: Callable[[str], list[str]]) -> None:
    """``delete`` of a running app (what ``torchx delete`` calls): stopped, then nothing left."""
    from importlib import import_module

    app_id = handle.rsplit("/", 1)[-1]
    import_module(f"torchx_ext.schedulers.{scheduler}").create_scheduler("torchx").delete(app_id)
    assert runner.status(handle) is None
    assert not left(app_id), left(app_id)


def existing(*paths: str) -> list[str]:
    return [p for p in paths if os.path.lexists(p)]


# --------------------------------------------------------------------------- no backend ----
def test_durations_and_bad_arguments_are_one_line(home: str) -> None:
    assert [parse_duration(t) for t in ("0s", "30m", "12h", "7d", "1.5h", "90")] == [0, 1800, 43200, 604800, 5400, 90]
    for args, what in ((["--older-than", "7x"], "give a number and a unit"),
                       (["--older-than", "1d", "-s", "nope"], "valid: host, slurm_jobs, docker_jobs, ray_jobs")):
        proc = prune(*args)
        assert proc.returncode == 1 and what in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_host(runner: Runner, home: str, workspace: str) -> None:
    copies: dict[str, list[str]] = {}  # read while the app's record exists

    def left(app_id: str) -> list[str]:
        spec = state.read_json(os.path.join(home, "host", app_id, "spec.json")) or {}
        copies.setdefault(app_id, [c["target"] for c in spec.get("workspace_copies", [])])
        return existing(os.path.join(home, "host", app_id), *copies[app_id])

    def make(short: bool) -> AppDef:
        return app("p", "/tmp", ["sh", "-c", "echo hi" if short else "sleep 300"])

    long, out = exercise(runner, "host", make, {}, left, workspace)
    assert_listed_after_prune(runner, "host", long, out)
    # a copy no record names, older than the cutoff (and than the in-flight guard), goes too
    dangling = os.path.join(home, "host", "workspaces", "dangling")
    os.makedirs(dangling)
    os.utime(dangling, (time.time() - 3600, time.time() - 3600))
    out = prune("--older-than", "10m", "-s", "host")
    assert "removed workspace copy " + dangling in out.stdout and not os.path.exists(dangling), out.stdout
    assert runner.status(long).state == AppState.RUNNING  # type: ignore[union-attr]
    delete_running(runner, "host", long, left)


# --------------------------------------------------------------------------- slurm ---------
def test_slurm_jobs(runner: Runner, home: str, workspace: str) -> None:
    partition = require_backend("TORCHX_EXT_TEST_SLURM_PARTITION", "Slurm")

    from torchx_ext.schedulers.slurm_jobs.retention import app_paths

    paths: dict[str, list[str]] = {}  # read while the app's record exists

    def left(app_id: str) -> list[str]:
        record = state.read_json(os.path.join(home, "slurm_jobs", app_id, "app.json"))
        paths.setdefault(app_id, app_paths(record) if record else [])
        return existing(os.path.join(home, "slurm_jobs", app_id), *paths[app_id])

    def make(short: bool) -> AppDef:
        return app("p", "", ["sh", "-c", "echo hi" if short else "sleep 300"])

    long, out = exercise(runner, "slurm_jobs", make, {"partition": partition}, left, workspace)
    assert_listed_after_prune(runner, "slurm_jobs", long, out)
    delete_running(runner, "slurm_jobs", long, left)


def test_slurm_jobs_remote(runner: Runner, home: str, workspace: str) -> None:
    partition = require_backend("TORCHX_EXT_TEST_SLURM_PARTITION", "Slurm")
    cfg = {"partition": partition, "login": require_backend("TORCHX_EXT_TEST_SSH_HOST", "the sshd"),
           "ssh_config": require_backend("TORCHX_EXT_TEST_SSH_CONFIG", "the sshd")}

    from torchx_ext.schedulers.slurm_jobs.retention import app_paths

    paths: dict[str, list[str]] = {}  # read while the app's record exists

    def left(app_id: str) -> list[str]:
        record = state.read_json(os.path.join(home, "slurm_jobs", app_id, "app.json"))
        paths.setdefault(app_id, app_paths(record) if record else [])
        assert len(paths[app_id]) >= 2, paths  # the job directory and Slurm's output, at least
        proc = subprocess.run(["ssh", "-F", cfg["ssh_config"], cfg["login"], "--", "ls", "-d", "--",
                               *paths[app_id]], capture_output=True, text=True, timeout=30)
        return existing(os.path.join(home, "slurm_jobs", app_id)) + proc.stdout.split()

    def make(short: bool) -> AppDef:
        return app("p", "", ["sh", "-c", "echo hi" if short else "sleep 300"])

    long, _ = exercise(runner, "slurm_jobs", make, cfg, left, workspace)
    delete_running(runner, "slurm_jobs", long, left)


# --------------------------------------------------------------------------- many apps -----
def many_ended(runner: Runner, home: str, scheduler: str, cfg: dict[str, Any], live_cfg: dict[str, Any],
               make: Callable[[bool], AppDef], live_state: AppState, cancel: Callable[[list[str]], object]) -> None:
    """Prune of many ended apps beside running ones (bench/bench_prune.py at small size): 30 ended
    apps fabricated as bench/bench_list.py does (copies of a real ended app, ended 2 to 3 days
    ago, 1 KiB of log each), one app ended just now, 2 that run (slurm: held, PENDING). A prune
    older than 1 day removes exactly the 30, frees what it says, keeps the recent one; the running
    apps keep their state and every file; ``list`` then shows the running and the recent app, and
    after a prune of every ended app, the running ones only; prune's bulk delete (``delete_apps``)
    of the running apps cancels them before it removes them."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_list import fabricate_host, fabricate_slurm

    template = runner.run(make(True), scheduler, cfg)
    live: list[str] = []
    try:
        assert wait_terminal(runner, template, TIMEOUT).state == AppState.SUCCEEDED
        live += [runner.run(make(False), scheduler, live_cfg) for _ in range(2)]
        for h in live:
            wait_state(runner, h, live_state, TIMEOUT)
        root = os.path.join(home, scheduler)
        tid = template.rsplit("/", 1)[-1]
        if scheduler == "host":
            ids = fabricate_host(home, tid, 30, 2 * 86400, 86400, log_bytes=1024)
        else:
            ids = fabricate_slurm(home, tid, 30, 2 * 86400, 86400, log_bytes=1024, first_id=62_000_000)
        live_ids = [h.rsplit("/", 1)[-1] for h in live]

        def files() -> dict[str, dict[str, bytes]]:
            return {i: {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                        for d, _, fs in os.walk(os.path.join(root, i)) for f in fs} for i in live_ids}

        settled(files, timeout=TIMEOUT)  # a new app's supervisor may still be writing its state
        before = files()
        # (KiB or MiB: a slurm_jobs job directory holds the engine its script shipped, ~40 KiB)
        said = re.search(r"would remove 30 app\(s\) and 0 leftover\(s\), would free ([\d.]+) (KiB|MiB)",
                         prune("--older-than", "1d", "-s", scheduler, "--dry-run").stdout)
        assert said and all(os.path.isdir(os.path.join(root, i)) for i in ids)
        sizes = sum(os.lstat(os.path.join(d, f)).st_size for i in ids for d, _, fs in os.walk(os.path.join(root, i))
                    for f in fs)
        out = prune("--older-than", "1d", "-s", scheduler)
        assert out.returncode == 0 and "removed 30 app(s)" in out.stdout, out
        assert sorted(re.findall(rf"removed {scheduler}://torchx/(\S+) \(", out.stdout)) == sorted(ids), out.stdout
        assert not [i for i in ids if os.path.lexists(os.path.join(root, i))]
        unit = 1024 if said.group(2) == "KiB" else 1024 ** 2
        assert abs(float(said.group(1)) * unit - sizes) <= 0.05 * unit, (said.group(0), sizes)
        assert files() == before, "a running app's files changed"
        assert [getattr(runner.status(h), "state", None) for h in live] == [live_state] * 2
        assert {a.app_handle for a in runner.list(scheduler)} == {*live, template}
        out = prune("--older-than", "0s", "-s", scheduler)
        assert out.returncode == 0 and "removed 1 app(s)" in out.stdout and template in out.stdout, out
        assert {a.app_handle for a in runner.list(scheduler)} == set(live)
        assert files() == before, "a running app's files changed"
        # delete_apps (prune's bulk delete) given apps that still run: cancelled first, then gone
        from importlib import import_module

        errors: list[Any] = []
        import_module(f"torchx_ext.schedulers.{scheduler}").create_scheduler("torchx").delete_apps(
            live_ids, lambda app_id, e: errors.append(e) if e else None)
        assert not errors and not runner.list(scheduler) and not existing(*[os.path.join(root, i) for i in live_ids])
        if scheduler == "slurm_jobs":
            queued = subprocess.run(["squeue", "-h", "-t", "PD,R", "-o", "%i", "-j", ",".join(live_ids)],
                                    capture_output=True, text=True).stdout.split()
            assert not queued, queued
    finally:
        cancel(live)


def test_host_many_ended_apps(runner: Runner, home: str) -> None:
    def make(short: bool) -> AppDef:
        return app("p", "/tmp", ["true"] if short else ["sleep", "300"])

    many_ended(runner, home, "host", {}, {}, make, AppState.RUNNING, lambda hs: [runner.cancel(h) for h in hs])


def test_slurm_jobs_many_ended_apps(runner: Runner, home: str) -> None:
    partition = require_backend("TORCHX_EXT_TEST_SLURM_PARTITION", "Slurm")

    def make(short: bool) -> AppDef:
        return app("p", "", ["true"] if short else ["sleep", "300"])

    def cancel(handles: list[str]) -> None:  # this test's own jobs only: the cluster is shared
        if handles:
            subprocess.run(["scancel", *[h.rsplit("/", 1)[-1] for h in handles]], capture_output=True)

    # the running apps are held (PENDING until cancelled): the shared testbed's nodes stay free
    cfg = {"partition": partition}
    many_ended(runner, home, "slurm_jobs", cfg, {**cfg, "sbatch_args": ["--hold"]}, make, AppState.PENDING, cancel)


# --------------------------------------------------------------------------- docker --------
def test_docker_jobs(runner: Runner, home: str, workspace: str) -> None:
    require_backend("TORCHX_EXT_TEST_DOCKER", "Docker")
    image = require_backend("TORCHX_EXT_TEST_DOCKER_BUSYBOX", "Docker busybox image")
    from torchx_ext.schedulers.docker_jobs import daemon as d
    from torchx_ext.schedulers.docker_jobs import retention

    api = d.client()
    images: dict[str, list[str]] = {}
    seen: set[str] = set()  # workspace images the apps ran

    def left(app_id: str) -> list[str]:
        names = [s["Names"][0] for s in api.containers(all=True, filters=d.app_filter(app_id))]
        images.setdefault(app_id, retention.image_ids(api, app_id))
        # lease volumes as one name: a running app's epoch moves on every 2 s
        names += sorted({re.sub(r"watcher-[0-9]+$", "watcher-N", v["Name"])
                         for v in api.volumes().get("Volumes") or [] if v["Name"].startswith(app_id + ".")})
        names += [n["Name"] for n in api.networks(names=[app_id]) if n["Name"] == app_id]
        workspace_images = [i for i in images[app_id] if i in api.images(filters={"label": d.P + "workspace"},
                                                                          quiet=True)]
        seen.update(workspace_images)
        names += workspace_images
        return names + existing(*retention.local_files(app_id))

    def make(short: bool) -> AppDef:
        return app("p", image, ["sh", "-c", "echo hi" if short else "sleep 300"])

    try:
        long, _ = exercise(runner, "docker_jobs", make, {}, left, workspace)
        assert seen, "the app submitted with a workspace ran no workspace image"
        built = [i for i in seen if i in api.images(filters={"label": d.P + "workspace"}, quiet=True)]
        assert not built, f"workspace images left: {built}"
        delete_running(runner, "docker_jobs", long, left)
    finally:
        from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler

        s = create_scheduler("torchx")
        for a in s.app_ids():
            if d.fetch(api, a) is not None and d.fetch(api, a).submitter == d.submitter():  # type: ignore[union-attr]
                s.delete(a)


# --------------------------------------------------------------------------- ray -----------
def test_ray_jobs(runner: Runner, home: str) -> None:
    dashboard = require_backend("TORCHX_EXT_TEST_RAY_DASHBOARD", "Ray head")
    from ray.job_submission import JobSubmissionClient

    ray = JobSubmissionClient(dashboard)

    def left(app_id: str) -> list[str]:
        sid = app_id.rsplit("~", 1)[-1]
        return [j.submission_id for j in ray.list_jobs() if j.submission_id and j.submission_id.startswith(sid)]

    def make(short: bool) -> AppDef:
        return app("p", "", [sys.executable, "-c", "print('hi')" if short else "import time; time.sleep(300)"])

    long, _ = exercise(runner, "ray_jobs", make, {"dashboard_url": dashboard}, left)
    # a cluster unreachable for longer than the cutoff is dropped from clusters.json (with a
    # warning naming it); the reachable one stays
    path = os.path.join(home, "ray_jobs", "clusters.json")
    known = json.load(open(path))
    gone = "http://127.0.0.1:9"
    state.write_json(path, {**known, gone: {"unreachable_since": time.time() - 7200, "lost_contact_s": 600}})
    out = prune("--older-than", "1h", "-s", "ray_jobs")
    assert out.returncode == 0 and gone in out.stderr and f"removed cluster {gone}" in out.stdout, out
    assert set(json.load(open(path))) == set(known)
    delete_running(runner, "ray_jobs", long, left)
