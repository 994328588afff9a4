"""What a ``ray_jobs`` submission asks: its run options (:class:`RayJobsExecutor`) and the request a
dry-run prints and ``schedule`` performs (:class:`RayJobsRequest`, secrets masked)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torchx_ext.executors import GROUP_CAPABILITIES, Executor, option, ready_timeout_option, retry_backoff_option
from torchx_ext.schedulers.ray_jobs import cluster

SCHEDULER = "ray_jobs"
DRIVER_ROLE = "ray-driver"
WORKING_DIR_KEY = "torchx_ext/working_dir"
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MASK = "****"


@dataclass
class RayJobsExecutor(Executor):
    """Run options of the ``ray_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = GROUP_CAPABILITIES

    dashboard_url: Optional[str] = option(
        None, help="Ray dashboard (Jobs API) address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS when it is http(s))")
    token_env: Optional[str] = option(
        None, help="name of an environment variable holding a bearer token for a dashboard behind a proxy "
        "(sent as 'Authorization: Bearer ...'; the value is never printed)")
    env_forward: Optional[list[str]] = option(
        None, help="names of local environment variables (e.g. HF_TOKEN) forwarded into the job's "
        "runtime_env env_vars; their values are masked in dry-runs, the manifest and logs")
    pip: Optional[list[str]] = option(None, help="pip requirements installed for the job (runtime_env pip)")
    label_selector: Optional[dict[str, str]] = option(
        None, help="node labels the app must run on (entrypoint_label_selector and bundle label "
        "selectors; needs Ray >= 2.55 on the client)")
    placement_strategy: str = option("PACK", help=f"placement group strategy of a gang: {', '.join(STRATEGIES)}")
    placement_timeout_s: int = option(
        120, help="seconds a gang may wait for its resources before the app fails saying what is missing")
    python: str = option("python", help="interpreter that runs the driver on the cluster")
    preflight: bool = option(
        True, help="before submitting, check the dashboard answers, the Ray versions, and that a node "
        "can hold every replica (and has the labels)")
    request_timeout_s: int = option(10, help="timeout of each Jobs API request, in seconds")
    lost_contact_s: int = option(
        30, help="seconds the dashboard may stay unreachable before status of its apps is an error "
        "instead of UNKNOWN (so `torchx run --wait` and `runner.wait` end; the apps may still run)")
    manifest: Optional[str] = option(
        None, help="fsspec URL of the JSONL manifest of submissions "
        "(default: $TORCHX_EXT_HOME/ray_jobs/manifest.jsonl)")
    retry_backoff_s: float = retry_backoff_option()
    ready_timeout_s: float = ready_timeout_option()


@dataclass
class RayJobsRequest:
    """What ``schedule`` performs; its masked JSON is what ``--dryrun`` prints."""

    dashboard_url: str
    app_id: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_resources: dict[str, Any]
    label_selector: dict[str, str]
    dependencies: list[str]
    spec: dict[str, Any]
    preflight_needs: list[dict[str, float]]
    secret_names: list[str] = field(default_factory=list)
    token_env: Optional[str] = None
    request_timeout_s: float = 10.0
    lost_contact_s: float = 30.0
    preflight: bool = True
    manifest: str = ""

    def masked(self) -> dict[str, Any]:
        """The request without secret values (dry-run, manifest)."""
        out = asdict(self)
        env = dict(out["runtime_env"].get("env_vars", {}))
        for name in self.secret_names:
            for key in (name, cluster.ENV_B64_PREFIX + name):
                if key in env:
                    env[key] = MASK
        env[cluster.SPEC_ENV] = "<the spec below, as JSON>"
        out["runtime_env"] = {**out["runtime_env"], "env_vars": env}
        return out

    def __repr__(self) -> str:
        return json.dumps(self.masked(), indent=2, ensure_ascii=False)
