"""``ray_jobs``: TorchX apps on a pre-provisioned Ray cluster (KubeRay or any), via the Jobs API.

Every app is one Ray job (submission id ``<app name>-<random>``) whose entrypoint is the small
driver of :mod:`ray_jobs_cluster <torchx_ext.schedulers.ray_jobs_cluster>`, uploaded with the job
(``py_modules``): the cluster needs Ray and nothing else of ours.

* a single-role, single-replica app runs inside the driver, and its role's ``cpu``/``gpu``/
  ``memMB``/numeric ``capabilities`` are the job's entrypoint resources;
* any other app is a *gang*: one placement group with a bundle per replica, reserved all or
  nothing, one actor per replica running its process, the ``TORCHX_EXT_HOSTS_<ROLE>`` discovery
  variables filled with the node addresses Ray chose, services, and the group rules;
* replica output goes to the job log as marked lines; ``torchx log`` shows each replica's own
  stdout/stderr (and ``ray-driver`` the driver's), with tailing, regex and since/until;
* dependencies wait in the cluster (one broker job per cluster, see
  :mod:`ray_jobs_cluster.broker`), so the submitting process may exit;
* the app id is ``<dashboard address>~<submission id>``: status/log/cancel from any shell need
  no configuration.
"""

from __future__ import annotations

import base64
import configparser
import json
import logging
import os
import re
import shlex
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, macros, runopts
from torchx.workspace.api import WorkspaceMixin, walk_workspace

from torchx_ext import cli_errors, compat
from torchx_ext.errors import DependencyError, InvalidAppError, SchedulerUnavailable
from torchx_ext.executors import Capabilities, Executor, check_options, option, runopts_for
from torchx_ext.groups import app_handle_id, discovery_env, handle_scheduler, hosts_env_name, is_service, validate_app
from torchx_ext.logs import filter_lines, follow
from torchx_ext.schedulers import ray_jobs_client as rc
from torchx_ext.schedulers import ray_jobs_cluster as cluster
from torchx_ext.schedulers.ray_jobs_cluster.broker import KIND

SCHEDULER = "ray_jobs"
DRIVER_ROLE = "ray-driver"
WORKING_DIR_KEY = "torchx_ext/working_dir"
STATES = {"PENDING": AppState.PENDING, "RUNNING": AppState.RUNNING, "SUCCEEDED": AppState.SUCCEEDED,
          "FAILED": AppState.FAILED, "STOPPED": AppState.CANCELLED}
MASK = "****"
logger = logging.getLogger(__name__)


@dataclass
class RayJobsExecutor(Executor):
    """Run options of the ``ray_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = Capabilities(
        heterogeneous_groups=True, services=True, dependencies=True,
        persistent_status=True, discovery_env=True,
    )

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
    placement_strategy: str = option("PACK", help="placement group strategy of a gang: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
    placement_timeout_s: int = option(
        120, help="seconds a gang may wait for its resources before the app fails saying what is missing")
    python: str = option("python", help="interpreter that runs the driver on the cluster")
    preflight: bool = option(
        True, help="before submitting, check the dashboard answers, the Ray versions, and that a node "
        "can hold every replica (and has the labels)")
    request_timeout_s: int = option(10, help="timeout of each Jobs API request, in seconds")
    lost_contact_s: int = option(
        30, help="seconds the dashboard may stay unreachable while the submitting process waits for the "
        "app (--wait) before it stops the app, best effort, and fails saying so")
    manifest: Optional[str] = option(
        None, help="fsspec URL of the JSONL manifest of submissions (default: $TORCHX_EXT_HOME/ray_jobs/manifest.jsonl)")


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


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:40] or "app"


def role_resources(role: Role) -> dict[str, float]:
    """Ray resources of one replica: CPU, GPU, memory (bytes) and numeric capabilities."""
    res = role.resource
    out: dict[str, float] = {}
    if res.cpu and res.cpu > 0:
        out["CPU"] = float(res.cpu)
    if res.gpu and res.gpu > 0:
        out["GPU"] = float(res.gpu)
    if res.memMB and res.memMB > 0:
        out["memory"] = float(int(res.memMB) * 2**20)
    for key, value in (res.capabilities or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidAppError(
                f"role '{role.name}': capability {key}={value!r} is not a number; on ray_jobs, "
                "capabilities are custom Ray resources (e.g. {'sandbox': 1}); use label_selector for node labels"
            )
        if value > 0:
            out[str(key)] = float(value)
    return out


def _known_clusters_path() -> str:
    home = os.environ.get("TORCHX_EXT_HOME") or os.path.join(os.path.expanduser("~"), ".torchx_ext")
    return os.path.join(home, "ray_jobs", "clusters.json")


def _torchxconfig() -> dict[str, str]:
    """The ``[ray_jobs]`` section of the .torchxconfig files TorchX reads (for status/list/log)."""
    try:
        from torchx.runner.config import find_configs

        parser = configparser.ConfigParser()
        parser.read(find_configs())
        return dict(parser[SCHEDULER]) if parser.has_section(SCHEDULER) else {}
    except Exception:
        return {}


class RayJobsScheduler(WorkspaceMixin[None], Scheduler[Mapping[str, Any]]):
    """TorchX scheduler over the Ray Jobs API. See the module docstring."""

    def __init__(self, session_name: str, client_factory: Optional[Callable[[str, Optional[str], float], Any]] = None,
                 **kwargs: Any) -> None:
        """``client_factory(url, token_env, timeout)`` replaces :func:`ray_jobs_client.connect`
        (tests use it for clients that no installed Ray provides, e.g. an old one)."""
        super().__init__(SCHEDULER, session_name)
        self._connect = client_factory or rc.connect
        self._clients: dict[str, Any] = {}
        self._brokers: dict[str, str] = {}  # dashboard url -> the broker job this process last saw run
        # app ids this instance submitted -> [lost_contact_s, first failed poll or None] (--wait)
        self._submitted: dict[str, list[Any]] = {}

    # ------------------------------------------------------------------ options -----
    def _run_opts(self) -> runopts:
        return runopts_for(RayJobsExecutor)

    def _validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        validate_app(app)

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Copies ``workspace`` minus ``.torchxignore`` matches; it becomes the job's working_dir.

        As with ``docker_jobs``, ``torchx run`` without ``--workspace`` (TorchX then passes the
        current directory) uploads nothing: pass ``--workspace .`` to ship the current directory.
        """
        import fsspec

        if compat.launched_by_cli_without_workspace():
            return
        fs, root = fsspec.core.url_to_fs(workspace)
        home = os.path.dirname(_known_clusters_path())
        _prune_workspace_copies(os.path.join(home, "workspaces"))
        target = os.path.join(home, "workspaces", uuid.uuid4().hex[:12])
        os.makedirs(target)
        size = 0
        for dirpath, _dirs, files in walk_workspace(fs, root):
            rel = os.path.relpath(dirpath, root)
            if os.path.realpath(os.path.join(root, rel)).startswith(os.path.realpath(home)):
                continue  # a workspace containing $TORCHX_EXT_HOME must not copy into itself
            for name, info in files.items():
                if info.get("type") != "file":
                    continue
                size += int(info.get("size") or 0)
                if size > 500 * 2**20:
                    shutil.rmtree(target, ignore_errors=True)
                    raise InvalidAppError(
                        f"the workspace {workspace} is over 500 MiB, Ray's working_dir limit; list what "
                        "the job does not need (virtualenvs, data, checkpoints) in a .torchxignore file"
                    )
                dst = os.path.normpath(os.path.join(target, rel, name))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with fs.open(info["name"], "rb") as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out)
        role.metadata[WORKING_DIR_KEY] = target

    # ------------------------------------------------------------------ submit ------
    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> AppDryRunInfo:
        check_options(SCHEDULER, cfg, self.run_opts())
        validate_app(app)
        url = rc.resolve_dashboard(cfg.get("dashboard_url"))
        sid = f"{_sanitize(app.name)}-{uuid.uuid4().hex[:10]}"
        app_id = rc.make_app_id(url, sid)
        deps = [self._dependency_sid(d, url) for d in compat.as_list(cfg.get("dependencies"))]
        strategy = str(cfg.get("placement_strategy") or "PACK").upper()
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise InvalidAppError(f"placement_strategy={strategy}; valid: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
        names = compat.as_list(cfg.get("env_forward"))
        missing = [n for n in names if n not in os.environ]
        if missing:
            raise InvalidAppError(
                f"env_forward names variable(s) not set in this shell: {', '.join(missing)}; "
                "export them or remove them from env_forward")
        single = len(app.roles) == 1 and app.roles[0].num_replicas == 1
        spec: dict[str, Any] = {
            "version": 1, "app_id": app_id, "mode": "local" if single else "gang",
            "strategy": strategy, "placement_timeout_s": float(cfg.get("placement_timeout_s") or 120),
            "label_selector": dict(cfg.get("label_selector") or {}), "roles": [],
        }
        if not single:
            spec["placement_group"] = cluster.PG_PREFIX + sid
        for role in app.roles:
            res = role_resources(role)
            entry = {"name": role.name, "service": is_service(role), "hosts_env": hosts_env_name(role.name),
                     "resources": res or {"CPU": 0.01}, "replicas": []}
            for k in range(role.num_replicas):
                r = macros.Values(img_root="", app_id=app_id, replica_id=str(k),
                                  rank0_env="TORCHX_RANK0_HOST").apply(role)
                env = dict(r.env)
                env.update(discovery_env(app_id, role.name, k, role.num_replicas, {}))
                entry["replicas"].append({"cmd": [r.entrypoint, *r.args], "env": env})
            spec["roles"].append(entry)
        # base64: Ray runs os.path.expandvars on env_vars values (see ray_jobs_cluster.ENV_B64_PREFIX)
        env_vars = {cluster.SPEC_ENV: base64.b64encode(json.dumps(spec).encode()).decode(),
                    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
        for n in names:
            value = os.environ[n]
            if "$" in value:
                env_vars[cluster.ENV_B64_PREFIX + n] = base64.b64encode(value.encode()).decode()
            else:
                env_vars[n] = value
        runtime_env: dict[str, Any] = {"env_vars": env_vars, "py_modules": [os.path.dirname(cluster.__file__)]}
        working_dir = app.roles[0].metadata.get(WORKING_DIR_KEY)
        if working_dir:
            runtime_env["working_dir"] = working_dir
        if compat.as_list(cfg.get("pip")):
            runtime_env["pip"] = compat.as_list(cfg.get("pip"))
        ep_res: dict[str, Any] = {}
        if single:
            res = dict(spec["roles"][0]["resources"])
            ep_res = {"entrypoint_num_cpus": res.pop("CPU", 0), "entrypoint_num_gpus": res.pop("GPU", 0),
                      "entrypoint_memory": int(res.pop("memory", 0)), "entrypoint_resources": res}
            needs = [spec["roles"][0]["resources"]]
        else:
            needs = [r["resources"] for r in spec["roles"] for _ in r["replicas"]]
        manifest = cfg.get("manifest") or rc.default_manifest()
        metadata = {
            KIND: "app", "torchx_ext_app": app.name, "torchx_ext_session": self.session_name,
            "torchx_ext_manifest": str(manifest),
            **({"torchx_ext_placement_group": spec["placement_group"]} if not single else {}),
            "torchx_ext_roles": json.dumps([{"name": r.name, "num_replicas": r.num_replicas, "service": is_service(r)}
                                            for r in app.roles]),
        }
        entrypoint = " ".join(shlex.quote(w) for w in [
            str(cfg.get("python") or "python"), "-m", "ray_jobs_cluster.driver", "--app", sid])
        request = RayJobsRequest(
            dashboard_url=url, app_id=app_id, submission_id=sid, entrypoint=entrypoint,
            runtime_env=runtime_env, metadata=metadata, entrypoint_resources=ep_res,
            label_selector=spec["label_selector"], dependencies=deps, spec=spec, preflight_needs=needs,
            secret_names=names, token_env=cfg.get("token_env"),
            request_timeout_s=float(cfg.get("request_timeout_s") or 10),
            lost_contact_s=float(cfg.get("lost_contact_s") if cfg.get("lost_contact_s") is not None else 30),
            preflight=bool(cfg.get("preflight", True)), manifest=str(manifest),
        )
        return compat.make_dryrun_info(request, repr)

    @staticmethod
    def _dependency_sid(dep: str, url: str) -> str:
        if handle_scheduler(dep) not in (None, SCHEDULER):
            raise DependencyError(
                f"dependency '{dep}' belongs to scheduler '{handle_scheduler(dep)}'; "
                f"a {SCHEDULER} app can only depend on {SCHEDULER} apps")
        dep_url, sid = rc.split_app_id(app_handle_id(dep))
        if rc.APP_SEP in app_handle_id(dep) and dep_url != url:
            raise DependencyError(f"dependency '{dep}' runs on the cluster at {dep_url}, not {url}")
        return sid

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: RayJobsRequest = dryrun_info.request
        client = self._client(req.dashboard_url, req.token_env, req.request_timeout_s)
        submit_kwargs = dict(req.entrypoint_resources)
        if req.label_selector:
            if not rc.supports_label_selector(client):
                raise InvalidAppError(
                    f"label_selector needs Ray >= 2.55's Jobs client (entrypoint_label_selector); the "
                    f"installed client ({rc.ray_version()}) has none. Upgrade ray locally or drop label_selector")
            submit_kwargs["entrypoint_label_selector"] = req.label_selector
        if req.preflight:
            rc.preflight(client, req.dashboard_url, req.preflight_needs, req.label_selector, logger.warning)
        for dep in req.dependencies:
            if self._job(client, dep) is None and self._job(client, dep + "--waiting") is None:
                raise DependencyError(
                    f"dependency '{dep}' does not exist on the Ray cluster at {req.dashboard_url}")
        try:
            if req.dependencies:
                python = req.entrypoint.split()[0]
                self._ensure_broker(client, req.dashboard_url, python)
                meta = {KIND: "waiting", "torchx_ext_submission_id": req.submission_id,
                        "torchx_ext_dependencies": json.dumps(req.dependencies),
                        "torchx_ext_dependency_names": json.dumps(
                            {d: rc.make_app_id(req.dashboard_url, d) for d in req.dependencies}),
                        "torchx_ext_entrypoint": req.entrypoint,
                        "torchx_ext_submit_kwargs": json.dumps(submit_kwargs),
                        "torchx_ext_app_metadata": json.dumps(req.metadata),
                        "torchx_ext_app": req.metadata["torchx_ext_app"]}
                runtime_env = {k: v for k, v in req.runtime_env.items() if k != "pip"}
                if "pip" in req.runtime_env:
                    meta["torchx_ext_pip"] = json.dumps(req.runtime_env["pip"])
                # the record itself only has to exist: it exits at once and holds no resources
                client.submit_job(entrypoint="exit 0", submission_id=req.submission_id + "--waiting",
                                  runtime_env=runtime_env, metadata=meta)
                # again: an idle broker may have exited between its last look and this record
                self._ensure_broker(client, req.dashboard_url, python)
            else:
                client.submit_job(entrypoint=req.entrypoint, submission_id=req.submission_id,
                                  runtime_env=req.runtime_env, metadata=req.metadata, **submit_kwargs)
        except Exception as e:
            if rc.is_unreachable(e):
                raise SchedulerUnavailable(rc._unreachable(req.dashboard_url, e)) from None
            raise
        finally:
            wd = req.runtime_env.get("working_dir")
            if wd and os.path.dirname(os.path.dirname(wd)) == os.path.dirname(_known_clusters_path()):
                shutil.rmtree(wd, ignore_errors=True)  # uploaded (or failed): the copy is done
        self._submitted[req.app_id] = [req.lost_contact_s, None]
        self._remember_cluster(req.dashboard_url, req.token_env)
        masked = req.masked()
        rc.append_manifest(req.manifest, {
            "event": "submitted", "app_handle": f"{SCHEDULER}://{self.session_name}/{req.app_id}",
            "job_id": req.submission_id, "dashboard_url": req.dashboard_url, "entrypoint": req.entrypoint,
            "resources": {r["name"]: r["resources"] for r in req.spec["roles"]},
            "replicas": {r["name"]: len(r["replicas"]) for r in req.spec["roles"]},
            "dependencies": req.dependencies, "env_forward": req.secret_names,
            "env_vars": sorted(masked["runtime_env"]["env_vars"]),
        })
        return req.app_id

    def _ensure_broker(self, client: Any, url: str, python: str) -> bool:
        """Starts the cluster's dependency broker job unless one runs; returns whether it started
        one. Two submitters racing may start two: harmless, every decision claims a unique id."""
        found = rc.running_broker(client, self._brokers.get(url))
        self._brokers[url] = found or rc.start_broker(client, python, os.path.dirname(cluster.__file__))
        return not found

    # ------------------------------------------------------------------ clients -----
    def _client(self, url: str, token_env: Optional[str] = None, timeout: float = 10.0) -> Any:
        key = f"{url}|{token_env}"
        if key not in self._clients:
            self._clients[key] = self._connect(url, token_env or self._token_env_for(url), timeout)
        return self._clients[key]

    def _token_env_for(self, url: str) -> Optional[str]:
        known = self._known_clusters().get(url, {})
        return known.get("token_env") or _torchxconfig().get("token_env") or None

    @staticmethod
    def _known_clusters() -> dict[str, dict[str, Any]]:
        try:
            with open(_known_clusters_path()) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def _remember_cluster(self, url: str, token_env: Optional[str]) -> None:
        known = self._known_clusters()
        if known.get(url) == {"token_env": token_env}:
            return
        known[url] = {"token_env": token_env}  # the variable's name, never its value
        path = _known_clusters_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)

    @staticmethod
    def _job(client: Any, sid: str) -> Any:
        return rc.get_job(client, sid)

    # ------------------------------------------------------------------ describe ----
    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        url, sid = rc.split_app_id(app_id)
        if url is None or not sid:
            return None
        try:
            client = self._client(url)
            job = self._job(client, sid)
            if job is None:
                return self._describe_waiting(client, app_id, sid)
            state, msg, verdict = self._job_state(client, job)
        except (SchedulerUnavailable, Exception) as e:
            if not rc.is_unreachable(e):
                raise
            return self._unreachable(app_id, url, e)
        if app_id in self._submitted:
            self._submitted[app_id][1] = None  # in contact again
        self._record_terminal(job, app_id, state, msg)
        return self._response(app_id, job.metadata or {}, state, msg, verdict)

    def _job_state(self, client: Any, job: Any) -> tuple[AppState, str, dict[str, Any]]:
        meta = job.metadata or {}
        status = rc.job_status(job)
        if meta.get(KIND) == "verdict":  # decided without running: cancelled or failed dependency
            state = AppState[meta.get("torchx_ext_verdict", "FAILED")]
            return state, meta.get("torchx_ext_msg", ""), {}
        state = STATES.get(status, AppState.UNKNOWN)
        verdict = rc.parse_verdict(job.message or "")
        msg = verdict.get("msg") or ("" if state == AppState.SUCCEEDED else (job.message or ""))
        if state == AppState.PENDING and self._job(client, job.submission_id + "--cancelled") is not None:
            # Ray keeps a stopped job PENDING while it cannot be placed (up to 15 min)
            return AppState.CANCELLED, "cancelled by user before it could be placed", verdict
        if state == AppState.CANCELLED:
            msg = "stopped (cancelled)"
        if state == AppState.RUNNING and meta.get("torchx_ext_placement_group"):
            # the driver runs, but the gang's replicas start only once its placement group is
            # reserved: until then the app is PENDING, as TorchX means it (waiting for resources)
            pg = rc.placement_state(client, meta["torchx_ext_placement_group"])
            if pg in ("ABSENT", "PENDING", "PREPARED"):
                return AppState.PENDING, (
                    f"waiting for the cluster to reserve the group's resources (placement group "
                    f"{meta['torchx_ext_placement_group']}: {pg.lower()})"), verdict
        return state, msg, verdict

    def _describe_waiting(self, client: Any, app_id: str, sid: str) -> Optional[DescribeAppResponse]:
        record = self._job(client, sid + "--waiting")
        if record is None:
            return None
        meta = record.metadata or {}
        app_meta = json.loads(meta.get("torchx_ext_app_metadata", "{}"))
        if rc.job_status(record) == "FAILED":
            return self._response(app_id, app_meta, AppState.FAILED,
                                  f"could not set up the job's runtime_env: {record.message}", {})
        names = json.loads(meta.get("torchx_ext_dependency_names", "{}"))
        deps = [names.get(d, d) for d in json.loads(meta.get("torchx_ext_dependencies", "[]"))]
        try:  # the broker may have been killed: looking at a waiting app is enough to restart it
            started = self._ensure_broker(client, rc.split_app_id(app_id)[0] or "",
                                          str(meta.get("torchx_ext_entrypoint") or "python").split()[0])
        except Exception as e:
            if rc.is_unreachable(e):
                raise
            return self._response(app_id, app_meta, AppState.UNKNOWN, (
                f"waiting for {', '.join(deps)}, but no torchx-ext broker job ({rc.broker_prefix()}-*) "
                f"runs on the cluster and starting one failed: {e}"), {})
        note = " (no torchx-ext broker job was running; started one)" if started else ""
        return self._response(app_id, app_meta, AppState.PENDING,
                              f"waiting for dependencies: {', '.join(deps)}{note}", {})

    def _unreachable(self, app_id: str, url: str, e: BaseException) -> DescribeAppResponse:
        msg = str(e) if isinstance(e, SchedulerUnavailable) else rc._unreachable(url, e)
        self._clients = {k: v for k, v in self._clients.items() if not k.startswith(url + "|")}
        tracked = self._submitted.get(app_id)
        if tracked is not None:
            # this process submitted the app and is polling it (--wait): once the dashboard has
            # stayed away for lost_contact_s, stop the app, best effort, rather than wait forever
            tracked[1] = tracked[1] or time.time()
            if time.time() - tracked[1] < tracked[0]:
                return DescribeAppResponse(app_id=app_id, state=AppState.UNKNOWN, msg=msg)
            try:
                self._client(url).stop_job(rc.split_app_id(app_id)[1])
                stopped = "it was stopped"
            except Exception as stop_error:
                stopped = f"stopping it failed too ({type(stop_error).__name__}); it may still run"
            raise SchedulerUnavailable(
                f"{msg} for {tracked[0]:g} s; lost track of {app_id} while waiting for it: {stopped}")
        return DescribeAppResponse(app_id=app_id, state=AppState.UNKNOWN, msg=msg)

    def _response(self, app_id: str, meta: Mapping[str, str], state: AppState, msg: str,
                  verdict: Mapping[str, Any]) -> DescribeAppResponse:
        roles, statuses = [], []
        by_replica = {(r.get("role"), r.get("replica_id")): r for r in verdict.get("replicas", [])}
        for summary in json.loads(meta.get("torchx_ext_roles", "[]")):
            name = summary["name"]
            roles.append(Role(name=name, image="", num_replicas=summary["num_replicas"]))
            replicas = []
            for k in range(summary["num_replicas"]):
                seen = by_replica.get((name, k), {})
                replicas.append(ReplicaStatus(
                    id=k, role=name, state=AppState[seen["state"]] if "state" in seen else state,
                    hostname=seen.get("host", "")))
            statuses.append(RoleStatus(name, replicas))
        return DescribeAppResponse(app_id=app_id, state=state, msg=msg, roles=roles, roles_statuses=statuses)

    def _record_terminal(self, job: Any, app_id: str, state: AppState, msg: str) -> None:
        """Appends the terminal state to the app's manifest once per machine (marker file)."""
        if state not in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
            return
        manifest = (job.metadata or {}).get("torchx_ext_manifest")
        if not manifest:
            return
        marker = os.path.join(os.path.dirname(_known_clusters_path()), "recorded", job.submission_id)
        try:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            return
        except OSError:
            return
        rc.append_manifest(manifest, {
            "event": "terminal", "app_handle": f"{SCHEDULER}://{self.session_name}/{app_id}",
            "job_id": job.submission_id, "state": state.name, "msg": msg[:2000],
        })

    # ------------------------------------------------------------------ list/cancel -
    def list(self, cfg: Any = None) -> list[ListAppResponse]:
        urls: list[str] = []
        for candidate in ((cfg or {}).get("dashboard_url"), _torchxconfig().get("dashboard_url"),
                          os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None,
                          *self._known_clusters()):
            if candidate:
                url = rc.resolve_dashboard(candidate)
                if url not in urls:
                    urls.append(url)
        out: list[ListAppResponse] = []
        for url in urls:
            try:
                jobs = self._client(url).list_jobs()
            except Exception as e:
                if not rc.is_unreachable(e):
                    raise
                logger.warning(rc._unreachable(url, e) + "; its apps are not listed")
                continue
            ids = {j.submission_id for j in jobs}
            for job in jobs:
                meta = job.metadata or {}
                kind = meta.get(KIND)
                if kind in ("app", "verdict"):
                    sid = job.submission_id
                    state = AppState[meta["torchx_ext_verdict"]] if kind == "verdict" else STATES.get(rc.job_status(job), AppState.UNKNOWN)
                elif kind == "waiting" and meta.get("torchx_ext_submission_id") not in ids:
                    sid, state = meta["torchx_ext_submission_id"], AppState.PENDING
                else:
                    continue
                app_id = rc.make_app_id(url, sid)
                out.append(ListAppResponse(app_id=app_id, state=state,
                                           app_handle=f"{SCHEDULER}://{self.session_name}/{app_id}"))
        return out

    def _cancel_existing(self, app_id: str) -> None:
        url, sid = rc.split_app_id(app_id)
        if url is None:
            return
        client = self._client(url)
        job = self._job(client, sid)
        if job is None:
            record = self._job(client, sid + "--waiting")
            if record is None:
                return
            meta = json.loads((record.metadata or {}).get("torchx_ext_app_metadata", "{}"))
            meta.update({KIND: "verdict", "torchx_ext_verdict": "CANCELLED",
                         "torchx_ext_msg": "cancelled by user while waiting for its dependencies"})
            try:  # claim the app's id before the broker starts it
                client.submit_job(entrypoint="exit 0", submission_id=sid, metadata=meta)
                return
            except RuntimeError as e:
                if "already exists" not in str(e):
                    raise
            job = self._job(client, sid)
        if job is None or rc.job_status(job) not in ("PENDING", "RUNNING"):
            return
        client.stop_job(sid)
        if rc.job_status(job) == "PENDING" and self._job(client, sid + "--cancelled") is None:
            try:
                client.submit_job(entrypoint="exit 0", submission_id=sid + "--cancelled", metadata={KIND: "cancel-marker"})
            except RuntimeError as e:
                if "already exists" not in str(e):
                    raise

    def delete(self, app_id: str) -> None:
        """Cancels the app if needed and removes its jobs (and logs) from the cluster."""
        url, sid = rc.split_app_id(app_id)
        if url is None or self.describe(app_id) is None:
            return
        self._cancel_existing(app_id)
        client = self._client(url)
        ids = [sid, sid + "--waiting", sid + "--cancelled"]
        # Ray's job monitor can write a just-ended job back (FAILED, "supervisor actor died")
        # after delete_job: delete once it has been over for a while, and again if it returns
        deadline = time.time() + 40
        while ids and time.time() < deadline:
            for job_id in list(ids):
                job = self._job(client, job_id)
                if job is None:
                    ids.remove(job_id)
                elif rc.job_status(job) not in ("PENDING", "RUNNING") and \
                        time.time() - (job.end_time or 0) / 1000 > 3:
                    client.delete_job(job_id)
            time.sleep(1.0)

    # ------------------------------------------------------------------ logs --------
    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: Optional[str] = None,
        since: Optional[datetime] = None,
        until: Optional[datetime] = None,
        should_tail: bool = False,
        streams: Optional[Stream] = None,
    ) -> Iterable[str]:
        url, sid = rc.split_app_id(app_id)
        resp = self.describe(app_id)
        if url is None or resp is None:
            raise ValueError(f"unknown {SCHEDULER} app '{app_id}'")
        if resp.state == AppState.UNKNOWN and "unreachable" in resp.msg:
            raise SchedulerUnavailable(resp.msg)
        counts = {r.name: r.num_replicas for r in resp.roles}
        if role_name == DRIVER_ROLE:
            key: Optional[tuple[str, int]] = None
        elif role_name in counts and 0 <= k < counts[role_name]:
            key = (str(list(counts).index(role_name)), k)
        else:
            raise ValueError(
                f"app '{app_id}' has no replica {k} of role '{role_name}'; roles: "
                + ", ".join(f"{n} (replicas 0..{c - 1})" for n, c in counts.items())
                + f", and {DRIVER_ROLE} (the job's driver)")
        wanted = {Stream.STDOUT: "o", Stream.STDERR: "e"}.get(streams)  # type: ignore[arg-type]
        reader = rc.JobLogReader(self._client(url), sid, key, wanted)

        def done() -> bool:
            now = self.describe(app_id)
            return now is None or now.state in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED, AppState.UNKNOWN)

        return filter_lines(follow(reader.read_new, done, should_tail, interval=0.5), regex, since, until)


def _prune_workspace_copies(root: str, max_age_s: float = 3600) -> None:
    """Removes copies a dry-run left behind (``schedule`` removes its own once uploaded)."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return
    for name in entries:
        path = os.path.join(root, name)
        try:
            if time.time() - os.path.getmtime(path) > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def create_scheduler(session_name: str, **kwargs: Any) -> RayJobsScheduler:
    cli_errors.install()
    return RayJobsScheduler(session_name, **kwargs)
