"""The shared contract against the ``host`` scheduler (real processes on this machine)."""

from __future__ import annotations

import os
import sys

import pytest

from contract import Backend, SchedulerContract
from torchx_ext import state
from torchx_ext.schedulers import host_supervisor as sup


def _nothing_running(handle: str) -> bool:
    app_id = handle.rsplit("/", 1)[-1]
    st = state.read_json(os.path.join(state.home(), "host", app_id, "state.json")) or {}
    pids = [r.get("pid") for r in st.get("replicas", {}).values()] + [st.get("supervisor_pid")]
    return not any(sup.pid_alive(p) for p in pids)


class TestHostContract(SchedulerContract):
    @pytest.fixture
    def backend(self) -> Backend:
        return Backend(scheduler="host", image=os.getcwd(), python=sys.executable,
                       timeout=60, nothing_running=_nothing_running)
