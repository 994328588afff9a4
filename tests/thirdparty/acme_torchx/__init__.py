"""A third-party plugin as a downstream project would write it: its own Executor and Scheduler,
registered only through its own dist-info entry points (nothing in torchx-ext names it)."""

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from torchx.schedulers.api import DescribeAppResponse, Scheduler
from torchx.specs import AppDryRunInfo, AppState, runopts

from torchx_ext.executors import Capabilities, Executor, option, runopts_for


@dataclass
class AcmeExecutor(Executor):
    """Runs the first role to completion at submit time (a toy, but a real scheduler)."""

    scheduler = "acme"
    capabilities = Capabilities(heterogeneous_groups=False, dependencies=False, persistent_status=True)

    greeting: str = option("hi", help="prefix added to the recorded message")


def _dir() -> str:
    d = os.path.join(os.environ.get("TORCHX_EXT_HOME", os.path.expanduser("~/.torchx_ext")), "acme")
    os.makedirs(d, exist_ok=True)
    return d


class AcmeScheduler(Scheduler):
    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__("acme", session_name)

    def _run_opts(self) -> runopts:
        return runopts_for(AcmeExecutor)

    def _submit_dryrun(self, app: Any, cfg: Any) -> AppDryRunInfo:
        role = app.roles[0]
        return AppDryRunInfo({"cmd": [role.entrypoint, *role.args], "greeting": cfg.get("greeting")}, repr)

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        app_id = f"acme-{uuid.uuid4().hex[:8]}"
        proc = subprocess.run(dryrun_info.request["cmd"], capture_output=True, text=True)
        with open(os.path.join(_dir(), app_id), "w") as f:
            json.dump({"rc": proc.returncode, "out": proc.stdout}, f)
        return app_id

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        try:
            with open(os.path.join(_dir(), app_id)) as f:
                rec = json.load(f)
        except FileNotFoundError:
            return None
        state = AppState.SUCCEEDED if rec["rc"] == 0 else AppState.FAILED
        return DescribeAppResponse(app_id=app_id, state=state, msg=rec["out"].strip())

    def _validate(self, app: Any, scheduler: str, cfg: Any = None) -> None:
        pass

    def _cancel_existing(self, app_id: str) -> None:
        pass

    def list(self, cfg: Any = None) -> list:
        return []


def create_scheduler(session_name: str, **kwargs: Any) -> AcmeScheduler:
    return AcmeScheduler(session_name, **kwargs)
