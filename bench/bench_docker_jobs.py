"""Group start on Docker: ``docker_jobs`` vs the same containers started directly with the docker SDK.

    python bench/bench_docker_jobs.py [--reps 5] [--image IMAGE]

Measures, in the same run and alternating, the time from submission until all 4 containers of a
group (1 service + 3 workers, on a network of their own, reachable by name) are running, as the
daemon reports it:

* ``docker_jobs``: ``Runner.run(app, "docker_jobs")`` (dry-run, image checks, network, 4 creates,
  all-or-nothing start, detached watcher);
* ``sdk (sequential)``: network + 4 ``create_container`` + 4 ``start`` with the low-level SDK, one
  after the other (the straightforward script);
* ``sdk (threaded)``: the same with creates and starts in threads (what docker_jobs does).

Prints medians and the ratio docker_jobs / sdk; removes everything it made.

Then restart latency (``Role.max_retries=1``): from the instant a replica exits 1 to the instant
its next attempt runs (both from the processes' own clocks, in the container logs), for
``docker_jobs`` (the watcher creates and starts a new container) vs Docker's own restart policy
(``on-failure:1``: the daemon restarts the same container), on the testbed's python image.

Then client-side memory with many apps running (``--apps``, default 100 tiny busybox ``sleep``
apps): the total RSS of every process torchx-ext keeps running for them (read from /proc: the
processes of the bench's own ``$TORCHX_EXT_HOME``, the bench itself excluded), per app, and the
restart latency of one more app while they all run. ``--rows`` picks rows (e.g. ``--rows memory``).
Run with ``PYTHONPATH`` set to an older checkout to measure that one's figure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CONTAINERS = 4


def load_testbed_env() -> None:
    path = os.path.join(ROOT, "testbed", ".state", "docker.env")
    if os.path.exists(path):
        for line in open(path):
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                key, _, value = words[1].partition("=")
                os.environ.setdefault(key, value)


def wait_running(api: Any, label: str, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while len(api.containers(filters={"label": label, "status": "running"})) < n:
        if time.time() > deadline:
            raise RuntimeError(f"{label}: {n} containers not running after {timeout}s")
        time.sleep(0.01)


def run_ours(api: Any, image: str) -> tuple[float, Callable[[], None]]:
    from torchx.runner import get_runner
    from torchx.specs import AppDef, Role

    from torchx_ext.groups import mark_service
    from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler

    app = AppDef("bench", roles=[
        mark_service(Role("server", image=image, entrypoint="sleep", args=["300"]), True),
        Role("worker", image=image, entrypoint="sleep", args=["300"], num_replicas=N_CONTAINERS - 1),
    ])
    runner = get_runner()
    t0 = time.perf_counter()
    handle = runner.run(app, "docker_jobs", {"stop_timeout": 1})
    app_id = handle.rsplit("/", 1)[-1]
    wait_running(api, f"torchx-ext.app-id={app_id}", N_CONTAINERS)
    took = time.perf_counter() - t0
    runner.close()
    return took, lambda: create_scheduler("bench").delete(app_id)


def run_sdk(api: Any, image: str, threaded: bool) -> tuple[float, Callable[[], None]]:
    tag = f"bench-{uuid.uuid4().hex[:10]}"
    label = f"torchx-ext-bench={tag}"
    names = ["server-0"] + [f"worker-{i}" for i in range(N_CONTAINERS - 1)]
    env = {"TORCHX_EXT_HOSTS_SERVER": "server-0", "TORCHX_EXT_HOSTS_WORKER": ",".join(names[1:])}
    t0 = time.perf_counter()
    api.create_network(tag, driver="bridge", labels={"torchx-ext-bench": tag})

    def create(name: str) -> str:
        return str(api.create_container(
            image, command=["sleep", "300"], name=f"{tag}-{name}", hostname=name, environment=env,
            labels={"torchx-ext-bench": tag}, stop_timeout=1,
            host_config=api.create_host_config(init=True, network_mode=tag),
            networking_config=api.create_networking_config({tag: api.create_endpoint_config(aliases=[name])}),
        )["Id"])

    if threaded:
        with ThreadPoolExecutor(N_CONTAINERS) as pool:
            ids = list(pool.map(create, names))
            list(pool.map(api.start, ids))
    else:
        ids = [create(n) for n in names]
        for cid in ids:
            api.start(cid)
    wait_running(api, label, N_CONTAINERS)
    took = time.perf_counter() - t0

    def cleanup() -> None:
        for cid in ids:
            api.remove_container(cid, force=True)
        api.remove_network(tag)
    return took, cleanup


# the first attempt runs a second before it fails, on both sides: a restart, not a replica dying
# while the app's watcher is still starting, is what is measured
RESTART_CODE = ("import os, sys, time; print('START %.6f' % time.time(), flush=True); "
                "first = os.environ.get('TORCHX_EXT_ATTEMPT', '1') == '1' and not os.path.exists('/tmp/ran'); "
                "open('/tmp/ran', 'w').close(); time.sleep(1) if first else None; "
                "(print('EXIT %.6f' % time.time(), flush=True), sys.exit(1)) if first else None")


def _gap(text: str) -> float:
    lines = text.splitlines()
    exit_t = next(float(x.split()[1]) for x in lines if x.startswith("EXIT "))
    return [float(x.split()[1]) for x in lines if x.startswith("START ")][1] - exit_t


def restart_ours(image: str) -> float:
    from torchx.runner import get_runner
    from torchx.specs import AppDef, AppState, Role

    from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler

    runner = get_runner()
    handle = runner.run(AppDef("bench-restart", roles=[Role("r", image=image, entrypoint="python3",
                                                            args=["-c", RESTART_CODE], max_retries=1)]),
                        "docker_jobs", {"stop_timeout": 1})
    deadline = time.time() + 120
    while (st := runner.status(handle)) is None or st.state != AppState.SUCCEEDED:
        if time.time() > deadline:
            raise RuntimeError(f"{handle}: {st}")
        time.sleep(0.05)
    gap = _gap("".join(runner.log_lines(handle, "r", 0)))
    runner.close()
    create_scheduler("bench").delete(handle.rsplit("/", 1)[-1])
    return gap


def restart_raw(api: Any, image: str) -> float:
    cid = api.create_container(image, command=["python3", "-c", RESTART_CODE], labels={"torchx-ext-bench": "1"},
                               host_config=api.create_host_config(restart_policy={"Name": "on-failure",
                                                                                  "MaximumRetryCount": 1}))["Id"]
    api.start(cid)
    deadline = time.time() + 120
    while api.inspect_container(cid)["State"]["Status"] != "exited" or \
            api.inspect_container(cid)["RestartCount"] < 1:
        if time.time() > deadline:
            raise RuntimeError("the container did not restart")
        time.sleep(0.05)
    gap = _gap(api.logs(cid).decode())
    api.remove_container(cid, force=True)
    return gap


def home_processes(home: str) -> list[tuple[int, int, str]]:
    """(pid, RSS in kB, command) of the live processes started for ``home`` (by their
    environment or command line), the bench's own process excluded."""
    home = os.path.realpath(home)
    marks = (f"TORCHX_EXT_HOME={home}\0".encode(), f"--home\0{home}\0".encode())
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/status") as f:
                rss = next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        except (OSError, StopIteration, ValueError):
            continue
        if rss and any(m in environ + b"\0" + cmdline for m in marks):
            out.append((int(entry), rss, cmdline.replace(b"\0", b" ").decode(errors="replace")[:100]))
    return out


def memory_many(api: Any, image: str, py: str, n: int, reps: int) -> None:
    from torchx.runner import get_runner
    from torchx.specs import AppDef, Role

    from torchx_ext.schedulers.docker_jobs.scheduler import create_scheduler

    home = os.environ["TORCHX_EXT_HOME"]
    runner = get_runner()
    handles = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            app = AppDef(f"mem{i}", roles=[Role("main", image=image, entrypoint="sleep", args=["600"])])
            # no network of its own: the daemon has address pools for ~30 bridge networks
            handles.append(runner.run(app, "docker_jobs", {"stop_timeout": 1, "network_mode": "none"}))
        ids = [h.rsplit("/", 1)[-1] for h in handles]
        deadline = time.time() + 300
        while True:
            running = {c["Labels"].get("torchx-ext.app-id") for c in
                       api.containers(filters={"label": "torchx-ext.scheduler=docker_jobs", "status": "running"})}
            if running >= set(ids):
                break
            if time.time() > deadline:
                raise RuntimeError(f"{len(set(ids) - running)} of {n} apps not running after 300 s")
            time.sleep(0.5)
        submitted = time.perf_counter() - t0
        time.sleep(5.0)  # watchers up, leases taken, first renewals done
        procs = home_processes(home)
        total = sum(rss for _, rss, _ in procs) / 1024
        print(f"\nclient-side memory with {n} docker_jobs apps running (busybox sleep; "
              f"submitted in {submitted:.1f} s):")
        print(f"processes torchx-ext keeps running: {len(procs)}; total RSS {total:.1f} MB; "
              f"per app {total / n:.2f} MB")
        for pid, rss, cmd in sorted(procs, key=lambda x: -x[1])[:3]:
            print(f"  pid {pid} {rss / 1024:.1f} MB  {cmd}")
        gaps = [restart_ours(py) for _ in range(reps)]
        print(f"restart latency with the {n} apps watched (median of {reps}): {statistics.median(gaps):.3f} s")
        procs = home_processes(home)
        print(f"after the restarts: {len(procs)} processes, total RSS {sum(r for _, r, _ in procs) / 1024:.1f} MB")
    finally:
        sched = create_scheduler("bench")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda h: sched.delete(h.rsplit("/", 1)[-1]), handles))
        runner.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--image", default=None, help="default: the testbed's busybox image")
    parser.add_argument("--apps", type=int, default=100, help="apps running at once for the memory row")
    parser.add_argument("--rows", default="start,restart,memory", help="rows to run: start, restart, memory")
    args = parser.parse_args()
    rows = set(args.rows.split(","))
    load_testbed_env()
    image = args.image or os.environ.get("TORCHX_EXT_TEST_DOCKER_BUSYBOX") or "torchx-ext-test/busybox:latest"
    # an isolated home: the watchers' diagnostics logs do not land in the user's
    home = tempfile.mkdtemp(prefix="torchx_ext_bench_")
    os.environ["TORCHX_EXT_HOME"] = home
    from torchx_ext.schedulers.docker_jobs.daemon import client

    api = client()
    api.inspect_image(image)  # fail early (and never pull) if the image is missing
    paths: dict[str, Callable[[], tuple[float, Callable[[], None]]]] = {
        "docker_jobs": lambda: run_ours(api, image),
        "sdk (sequential)": lambda: run_sdk(api, image, threaded=False),
        "sdk (threaded)": lambda: run_sdk(api, image, threaded=True),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    if "start" in rows:
        run_ours(api, image)[1]()  # warm-up: imports, first network, page cache
    for rep in range(args.reps if "start" in rows else 0):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for name in order:
            took, cleanup = paths[name]()
            times[name].append(took)
            cleanup()
    if "start" in rows:
        print(f"4-container group start (1 service + 3 workers, own network), image {image}, "
              f"{args.reps} reps, median seconds (submit -> all {N_CONTAINERS} running)")
        print(f"{'path':<18} {'median':>8} {'min':>8} {'max':>8}")
        for name, ts in times.items():
            print(f"{name:<18} {statistics.median(ts):8.3f} {min(ts):8.3f} {max(ts):8.3f}")
        ours = statistics.median(times["docker_jobs"])
        for base in ("sdk (sequential)", "sdk (threaded)"):
            print(f"ratio docker_jobs / {base}: {ours / statistics.median(times[base]):.2f}")
    py = os.environ.get("TORCHX_EXT_TEST_DOCKER_PYTHON") or "torchx-ext-test/python:latest"
    api.inspect_image(py)
    if "restart" in rows:
        ours_r = statistics.median(restart_ours(py) for _ in range(args.reps))
        raw_r = statistics.median(restart_raw(api, py) for _ in range(args.reps))
        print(f"\nrestart latency (exit 1 -> next attempt runs), image {py}, median of {args.reps}:")
        print(f"docker_jobs (new container): {ours_r:.3f} s; docker restart policy on-failure:1: {raw_r:.3f} s; "
              f"ratio {ours_r / raw_r:.2f}")
    if "memory" in rows:
        memory_many(api, image, py, args.apps, args.reps)
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
