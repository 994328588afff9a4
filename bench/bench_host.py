"""``host`` scheduler vs raw subprocess.Popen and TorchX's local_cwd, timed in the same run.

1. 8-replica start: submit an 8-replica app and wait until every replica runs (each replica
   prints a line at start and sleeps), vs 8 ``subprocess.Popen`` of the same command (until each
   printed its line), vs ``local_cwd`` through the same runner (until it reports the app
   RUNNING, which it does as soon as Popen returns: a signal that favours local_cwd).
2. A ``torchx status`` in a new process: ``host`` (reads the state dir) vs ``local_cwd`` (which,
   in a new process, can only say the app does not exist) vs a raw ``python -c pass`` process.
3. Restart latency (``Role.max_retries``): from the instant a replica exits 1 to the instant its
   next attempt runs (both read from the processes' own clocks), vs a bare Popen loop that starts
   the same command again as soon as ``wait`` returns.

Run: ``python bench/bench_host.py [--repeat N]``. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from restart_timing import RESTART_CODE, restart_gap
from torchx.runner import get_runner
from torchx.specs import AppDef, AppState, Role

REPLICAS = 8
CODE = "import time; print('up', flush=True); time.sleep(30)"
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")


def _all_running(runner, handle: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # local_cwd reports no per-replica states; its schedule() starts every replica before
        # returning, so the app-level RUNNING means all 8 were started
        st = runner.status(handle)
        if st is not None and st.state == AppState.RUNNING:
            return
        time.sleep(0.01)
    raise TimeoutError(handle)


def _host_printed(handle: str, timeout: float = 60) -> None:
    """All replicas printed 'up' (same signal as the Popen baseline), read from the log files."""
    from torchx_ext import state
    from torchx_ext.schedulers.host import supervisor as sup

    app_dir = os.path.join(state.home(), "host", handle.rsplit("/", 1)[-1])
    deadline = time.time() + timeout
    while time.time() < deadline:
        ok = 0
        for i in range(REPLICAS):
            try:
                with open(os.path.join(sup.log_dir(app_dir, "bench", i), "stdout.log"), "rb") as f:
                    ok += b" up" in f.read()
            except FileNotFoundError:
                pass
        if ok == REPLICAS:
            return
        time.sleep(0.01)
    raise TimeoutError(handle)


def bench_start_host(runner) -> float:
    app = AppDef("bench", roles=[Role("bench", image=os.getcwd(), entrypoint=sys.executable,
                                      args=["-c", CODE], num_replicas=REPLICAS)])
    t0 = time.perf_counter()
    handle = runner.run(app, "host", {})
    _host_printed(handle)
    took = time.perf_counter() - t0
    runner.cancel(handle)
    return took


def bench_start_local_cwd(runner) -> float:
    app = AppDef("bench", roles=[Role("bench", image=os.getcwd(), entrypoint=sys.executable,
                                      args=["-c", CODE], num_replicas=REPLICAS)])
    t0 = time.perf_counter()
    handle = runner.run(app, "local_cwd", {})
    _all_running(runner, handle)
    took = time.perf_counter() - t0
    runner.cancel(handle)
    return took


def bench_start_popen() -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CODE], stdout=subprocess.PIPE) for _ in range(REPLICAS)]
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()
    took = time.perf_counter() - t0
    for p in procs:
        p.kill()
        p.wait()
    return took


def bench_restart_host(runner) -> float:
    app = AppDef("restart", roles=[Role("r", image=os.getcwd(), entrypoint=sys.executable,
                                        args=["-c", RESTART_CODE], max_retries=1)])
    handle = runner.run(app, "host", {})
    deadline = time.time() + 60
    while (st := runner.status(handle)) is None or st.state != AppState.SUCCEEDED:
        if time.time() > deadline:
            raise TimeoutError(handle)
        time.sleep(0.01)
    return restart_gap("".join(runner.log_lines(handle, "r", 0)))


def bench_restart_popen() -> float:
    out = ""
    for attempt in ("1", "2"):
        p = subprocess.run([sys.executable, "-c", RESTART_CODE, attempt], capture_output=True, text=True)
        out += p.stdout
    return restart_gap(out)


def bench_cmd(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    os.environ.setdefault("TORCHX_EXT_HOME", tempfile.mkdtemp(prefix="bench_host_"))
    runner = get_runner()
    rows = []
    popen = statistics.median(bench_start_popen() for _ in range(a.repeat))
    host = statistics.median(bench_start_host(runner) for _ in range(a.repeat))
    lcwd = statistics.median(bench_start_local_cwd(runner) for _ in range(a.repeat))
    rows += [
        (f"{REPLICAS}-replica start: raw subprocess.Popen", popen, 1.0),
        (f"{REPLICAS}-replica start: host", host, host / popen),
        (f"{REPLICAS}-replica start: local_cwd", lcwd, lcwd / popen),
    ]
    app = AppDef("st", roles=[Role("st", image=os.getcwd(), entrypoint=sys.executable, args=["-c", "pass"])])
    handle = runner.run(app, "host", {})
    raw = statistics.median(bench_cmd([sys.executable, "-c", "pass"]) for _ in range(a.repeat))
    st_host = statistics.median(bench_cmd([TORCHX, "status", handle]) for _ in range(a.repeat))
    st_lcwd = statistics.median(bench_cmd([TORCHX, "status", "local_cwd://torchx/bench-x"]) for _ in range(a.repeat))
    rows += [
        ("new-process status: raw python -c pass", raw, 1.0),
        ("new-process status: torchx status host://", st_host, st_host / raw),
        ("new-process status: torchx status local_cwd://", st_lcwd, st_lcwd / raw),
    ]
    popen_restart = statistics.median(bench_restart_popen() for _ in range(a.repeat))
    host_restart = statistics.median(bench_restart_host(runner) for _ in range(a.repeat))
    rows += [
        ("restart (exit 1 -> next attempt runs): Popen loop", popen_restart, 1.0),
        ("restart (exit 1 -> next attempt runs): host", host_restart, host_restart / popen_restart),
    ]
    runner.close()
    title = f"measure (median of {a.repeat})"
    print(f"{title:<50} {'seconds':>9} {'ratio':>7}")
    for name, secs, ratio in rows:
        print(f"{name:<50} {secs:9.3f} {ratio:6.2f}x")
    print(f"host vs local_cwd start: {host / lcwd:.2f}x; host status vs local_cwd status: {st_host / st_lcwd:.2f}x")


if __name__ == "__main__":
    main()
