"""The shared contract against the ``host`` scheduler (real processes on this machine)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from conftest import live_processes
from contract import Backend, SchedulerContract
from torchx_ext import state
from torchx_ext.schedulers.host import procs


def _nothing_running(handle: str) -> bool:
    app_id = handle.rsplit("/", 1)[-1]
    st = state.read_json(os.path.join(state.home(), "host", app_id, "state.json")) or {}
    pids = [r.get("pid") for r in st.get("replicas", {}).values()] + [st.get("supervisor_pid")]
    # the supervisor records the verdict, then exits: give its exit a moment (a CI run at
    # 6b54dc5 saw it alive just after the app read SUCCEEDED)
    deadline = time.time() + 10
    while any(procs.pid_alive(p) for p in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def _no_process_left(handle: str) -> bool:
    """No replica (marked by its env) or supervisor (its app dir in argv) of the app is alive:
    unlike :func:`_nothing_running` it needs no record, so it also answers after a delete."""
    app_id = handle.rsplit("/", 1)[-1]
    env_marker = f"TORCHX_EXT_APP_ID={app_id}\0".encode()
    argv_marker = os.path.join("host", app_id).encode()
    deadline = time.time() + 10
    while live_processes((env_marker,), (argv_marker,)):
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


class TestHostContract(SchedulerContract):
    @pytest.fixture
    def backend(self, tmp_path: str) -> Backend:
        a_file = os.path.join(str(tmp_path), "a-regular-file")
        with open(a_file, "w") as f:
            f.write("not a directory\n")
        return Backend(scheduler="host", image=os.getcwd(), python=sys.executable,
                       timeout=60, nothing_running=_nothing_running,
                       nothing_running_after_delete=_no_process_left, retries=True,
                       # the home cannot be created: every state read or write fails
                       broken_env={"TORCHX_EXT_HOME": os.path.join(a_file, "home")})
