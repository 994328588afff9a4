"""``ray_jobs``: TorchX apps on a pre-provisioned Ray cluster (KubeRay or any), via the Jobs API.

Every app is one Ray job (submission id ``<app name>-<random>``) whose entrypoint is the small
driver of :mod:`ray_jobs_cluster <torchx_ext.schedulers.ray_jobs.cluster>`, uploaded with the job
(``py_modules``): the cluster needs Ray and nothing else of ours.

* a single-role, single-replica app runs inside the driver, and its role's ``cpu``/``gpu``/
  ``memMB``/numeric ``capabilities`` are the job's entrypoint resources;
* any other app is a *gang*: one placement group with a bundle per replica, reserved all or
  nothing, one actor per replica running its process, the ``TORCHX_EXT_HOSTS_<ROLE>`` discovery
  variables filled with the node addresses Ray chose, services, and the group rules;
* replica output goes to the job log as marked lines; ``torchx log`` shows each replica's own
  stdout/stderr (and ``ray-driver`` the driver's), with regex and since/until; ``-t`` follows
  the dashboard's log stream (else Ray's log tail), each byte of the log read once
  (:class:`.logs.JobLogReader`);
* the restart count of an app with retries, and the replicas held until its services are ready,
  are published by its driver in a small file that describe reads through the dashboard's state
  API, not from the log (``RESTARTS_FILE``);
* dependencies wait in the cluster (:mod:`ray_jobs_cluster.broker`): the submitter may exit;
* the app id is ``<dashboard address>~<submission id>``: status/log/cancel from any shell need
  no configuration;
* status queries only query, except that looking at a waiting app restarts the cluster's broker
  when none runs (:meth:`.deps.Brokers.waiting_state`), and an unreachable dashboard's
  first failure time is noted locally (:func:`.client.lost_contact`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import shutil
import uuid
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, Sequence

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, Role, macros
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import state
from torchx_ext.engine.rules import retry_policy_name
from torchx_ext.errors import (
    BackendError,
    DependencyError,
    InvalidAppError,
    InvalidOptionError,
    SchedulerUnavailable,
    TorchxExtError,
)
from torchx_ext.executors import engine_timings
from torchx_ext.groups import discovery_env, hosts_env_name, is_service, service_ports
from torchx_ext.progress import Progress
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, describe_response
from torchx_ext.schedulers.ray_jobs import adapter, cluster, preflight, retention
from torchx_ext.schedulers.ray_jobs import client as rc
from torchx_ext.schedulers.ray_jobs import local as rl
from torchx_ext.schedulers.ray_jobs import logs as ray_logs
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND
from torchx_ext.schedulers.ray_jobs.deps import Brokers
from torchx_ext.schedulers.ray_jobs.request import (
    DRIVER_ROLE,
    STRATEGIES,
    WORKING_DIR_KEY,
    RayJobsRequest,
)

# re-exported: the executor entry point and the package name it here
from torchx_ext.schedulers.ray_jobs.request import (
    RayJobsExecutor as RayJobsExecutor,
)
from torchx_ext.schedulers.ray_jobs.support import MATRIX
from torchx_ext.schedulers.workspace import copy_workspace

logger = logging.getLogger(__name__)


class RayJobsScheduler(WorkspaceMixin[None], ExtScheduler[RayJobsExecutor]):
    """TorchX scheduler over the Ray Jobs API. See the module docstring."""

    executor_cls = RayJobsExecutor
    support = MATRIX
    extra_log_roles = {DRIVER_ROLE: "the job's driver"}
    log_poll_s = 0.5

    def __init__(self, session_name: str, client_factory: Optional[Callable[[str, Optional[str], float], Any]] = None,
                 **kwargs: Any) -> None:
        """``client_factory(url, token_env, timeout)`` replaces :func:`.adapter.connect`
        (tests use it for clients that no installed Ray provides, e.g. an old one)."""
        super().__init__(session_name, **kwargs)
        self._connections = rl.Connections(client_factory or adapter.connect, float(RayJobsExecutor.request_timeout_s))
        # list asks the Jobs REST API itself (adapter.list_jobs) unless a test's clients stand in
        self._rest_list = client_factory is None
        self._brokers = Brokers()

    def _translate_error(self, e: Exception, verb: str) -> Optional[TorchxExtError]:
        if adapter.is_unreachable(e):
            return SchedulerUnavailable(f"the Ray dashboard is unreachable during {verb}: {e}")
        if isinstance(e, RuntimeError) and rc.from_ray(e):  # Ray's client: the dashboard said no
            return BackendError(f"the Ray Jobs API refused to {verb}: {e}")
        return None

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Names ``workspace`` as the job's working_dir. ``torchx run`` passes the current directory
        unless told otherwise; ``--workspace ""`` ships nothing. The copy without what
        ``.torchxignore`` lists is made by ``schedule``, just before Ray uploads it, and removed
        after: a dry-run copies nothing (and shows the directory that will be shipped)."""
        role.metadata[WORKING_DIR_KEY] = workspace

    def _workspace_copy(self, workspace: str) -> str:
        with self._translated("copy the workspace"):
            root = rl.local_dir("workspaces")
            rl.prune_workspace_copies(root)  # left by a submitter that was killed mid-upload
            target = os.path.join(root, uuid.uuid4().hex[:12])
            copy_workspace(workspace, target, max_bytes=500 * 2**20, skip_under=state.home())
        return target

    # ------------------------------------------------------------------ submit ------
    # Over 60 lines: it assembles the job's parts (the driver's spec, the runtime_env, the
    # entrypoint resources, the metadata) in order, each from the one before; a few lines each.
    def _build_request(self, app: AppDef, ex: RayJobsExecutor, dependencies: list[str]) -> RayJobsRequest:
        url = rc.resolve_dashboard(ex.dashboard_url)
        sid = f"{state.make_app_id(app.name)}"
        app_id = rc.make_app_id(url, sid)
        deps = [self._dependency_sid(d, url) for d in dependencies]
        strategy = ex.placement_strategy.upper()
        if strategy not in STRATEGIES:
            raise InvalidOptionError(f"placement_strategy={strategy}; valid: {', '.join(STRATEGIES)}")
        names = ex.env_forward or []
        missing = [n for n in names if n not in os.environ]
        if missing:
            raise InvalidOptionError(
                f"env_forward names variable(s) not set in this shell: {', '.join(missing)}; "
                "export them or remove them from env_forward")
        single = len(app.roles) == 1 and app.roles[0].num_replicas == 1
        backoff, ready = engine_timings(ex)
        spec: dict[str, Any] = {
            "version": 1, "app_id": app_id, "mode": "local" if single else "gang", "strategy": strategy,
            "placement_timeout_s": float(ex.placement_timeout_s), "label_selector": dict(ex.label_selector or {}),
            "retry_backoff_s": backoff, "ready_timeout_s": ready, "roles": [],
        }
        if not single:
            spec["placement_group"] = cluster.PG_PREFIX + sid
        for role in app.roles:
            # ports: the engine holds the other roles until the driver finds them accepting connections
            entry = {"name": role.name, "service": is_service(role), "ports": list(service_ports(role)),
                     "hosts_env": hosts_env_name(role.name),
                     "resources": preflight.role_resources(role) or {"CPU": 0.01}, "replicas": [],
                     "max_retries": role.max_retries, "retry_policy": retry_policy_name(role.retry_policy)}
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
        if len({r.metadata.get(WORKING_DIR_KEY) for r in app.roles if r.metadata.get(WORKING_DIR_KEY)}) > 1:
            raise InvalidAppError("roles ship different workspaces, but a Ray job has one working_dir: "
                                  "give the roles one workspace")
        if working_dir:
            runtime_env["working_dir"] = working_dir
        if ex.pip:
            runtime_env["pip"] = list(ex.pip)
        ep_res: dict[str, Any] = {}
        if single:
            res = dict(spec["roles"][0]["resources"])
            ep_res = {"entrypoint_num_cpus": res.pop("CPU", 0), "entrypoint_num_gpus": res.pop("GPU", 0),
                      "entrypoint_memory": int(res.pop("memory", 0)), "entrypoint_resources": res}
            needs = [spec["roles"][0]["resources"]]
        else:
            needs = [r["resources"] for r in spec["roles"] for _ in r["replicas"]]
        manifest = ex.manifest or rl.default_manifest()
        metadata = {
            KIND: "app", "torchx_ext_app": app.name, "torchx_ext_session": self.session_name,
            retention.SUBMITTER_KEY: rl.submitter(),  # prune removes only its caller's apps
            "torchx_ext_manifest": str(manifest), "torchx_ext_secret_names": json.dumps(names),
            **({"torchx_ext_placement_group": spec["placement_group"]} if not single else {}),
            # describe then reads num_restarts where the driver publishes it (ray_jobs.client.published),
            # and which replicas wait for the services (gated)
            **({"torchx_ext_retries": "1"} if any(r.max_retries for r in app.roles) else {}),
            **({"torchx_ext_gated": "1"} if any(service_ports(r) for r in app.roles) else {}),
            "torchx_ext_roles": json.dumps([{"name": r.name, "num_replicas": r.num_replicas, "service": is_service(r)}
                                            for r in app.roles]),
        }
        entrypoint = " ".join(shlex.quote(w) for w in [ex.python, "-m", "ray_jobs_cluster.driver", "--app", sid])
        return RayJobsRequest(
            dashboard_url=url, app_id=app_id, submission_id=sid, entrypoint=entrypoint,
            runtime_env=runtime_env, metadata=metadata, entrypoint_resources=ep_res,
            label_selector=spec["label_selector"], dependencies=deps, spec=spec, preflight_needs=needs,
            secret_names=names, token_env=ex.token_env, request_timeout_s=float(ex.request_timeout_s),
            lost_contact_s=float(ex.lost_contact_s), preflight=ex.preflight, manifest=str(manifest),
        )

    @staticmethod
    def _dependency_sid(dep: str, url: str) -> str:
        dep_url, sid = rc.split_app_id(dep)
        if rc.APP_SEP in dep and dep_url != url:
            raise DependencyError(f"dependency '{dep}' runs on the cluster at {dep_url}, not {url}")
        return sid

    def _schedule(self, req: RayJobsRequest) -> str:
        client = self._client(req.dashboard_url, req.token_env, req.request_timeout_s)
        submit_kwargs = dict(req.entrypoint_resources)
        if req.label_selector:
            if not rc.supports_label_selector(client):
                raise InvalidOptionError(
                    f"label_selector needs Ray >= 2.55's Jobs client (entrypoint_label_selector); the "
                    f"installed client ({rc.ray_version()}) has none. Upgrade ray locally or drop label_selector")
            submit_kwargs["entrypoint_label_selector"] = req.label_selector
        if req.preflight:
            preflight.preflight(client, req.dashboard_url, req.preflight_needs, req.label_selector,
                                         logger.warning)
        for dep in req.dependencies:
            if rc.get_job(client, dep) is None and rc.get_job(client, dep + "--waiting") is None:
                raise DependencyError(
                    f"dependency '{dep}' does not exist on the Ray cluster at {req.dashboard_url}")
        runtime_env = dict(req.runtime_env)
        copy = None
        if runtime_env.get("working_dir"):
            copy = runtime_env["working_dir"] = self._workspace_copy(runtime_env["working_dir"])
        # Ray uploads the working_dir inside submit_job and reports nothing meanwhile: the line's
        # clock shows that it is at work (only with a workspace, and only on a terminal)
        try:
            with Progress(f"uploading the workspace to {req.dashboard_url}", quiet=not copy).ticking(
                    "packing and uploading"):
                # the driver's package goes with the group engine inside it (rl.cluster_package)
                shipped = [rl.cluster_package() if p == os.path.dirname(cluster.__file__) else p
                           for p in runtime_env["py_modules"]]
                runtime_env["py_modules"] = adapter.package_uris(client, shipped)
                if req.dependencies:
                    self._brokers.submit_waiting(client, req.dashboard_url, req.submission_id, req.entrypoint,
                                                 runtime_env, req.metadata, req.dependencies, submit_kwargs)
                else:
                    client.submit_job(entrypoint=req.entrypoint, submission_id=req.submission_id,
                                      runtime_env=runtime_env, metadata=req.metadata, **submit_kwargs)
        except Exception as e:
            if adapter.is_unreachable(e):
                raise SchedulerUnavailable(adapter.unreachable_message(req.dashboard_url, e)) from None
            raise
        finally:
            if copy:
                shutil.rmtree(copy, ignore_errors=True)  # uploaded (or failed): the copy is done
        self._connections.submitted(req.submission_id)
        rl.remember_cluster(req.dashboard_url, token_env=req.token_env, lost_contact_s=req.lost_contact_s)
        rl.append_manifest(req.manifest, {
            "event": "submitted", "app_handle": self.handle(req.app_id),
            "job_id": req.submission_id, "dashboard_url": req.dashboard_url, "entrypoint": req.entrypoint,
            "resources": {r["name"]: r["resources"] for r in req.spec["roles"]},
            "replicas": {r["name"]: len(r["replicas"]) for r in req.spec["roles"]},
            "dependencies": req.dependencies, "env_forward": req.secret_names,
            "env_vars": sorted(req.runtime_env["env_vars"]),  # names only: no value is written
        })
        return req.app_id

    # ------------------------------------------------------------------ clients -----
    def _client(self, url: str, token_env: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        return self._connections.get(url, token_env, timeout)

    # ------------------------------------------------------------------ describe ----
    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        url, sid = rc.split_app_id(app_id)
        if url is None or not sid:
            return None
        try:
            client = self._client(url)
            marker = self._connections.marker(url, sid)
            job = rc.get_job(client, sid)
            if job is None:
                waiting = self._brokers.waiting_state(client, app_id, sid)
                resp = None if waiting is None else self._response(app_id, waiting[2], waiting[0], waiting[1], {})
            else:
                st, msg, verdict = rc.job_state(client, job, marker)
                meta = job.metadata or {}
                if ((meta.get("torchx_ext_retries") or meta.get("torchx_ext_gated")) and "num_restarts" not in verdict
                        and rc.job_status(job) != "PENDING"):
                    published = rc.published(client, job) or {}
                    verdict = {**verdict, "num_restarts": int(published.get("num_restarts", 0)),
                               "held": published.get("held", [])}
                resp = self._response(app_id, job.metadata or {}, st, msg, verdict)
        except Exception as e:
            if not adapter.is_unreachable(e):
                raise
            return self._unreachable(app_id, url, e)
        rl.in_contact(url)
        return resp

    def _describe_native(self, app_id: str) -> Optional[RayJobsRequest]:
        url, sid = rc.split_app_id(app_id)
        client = self._client(url) if url else None
        job = client and (rc.get_job(client, sid) or rc.get_job(client, sid + "--waiting"))
        return RayJobsRequest(**rc.request_fields(url or "", app_id, sid, job)) if job else None

    def _unreachable(self, app_id: str, url: str, e: BaseException) -> DescribeAppResponse:
        msg = str(e) if isinstance(e, SchedulerUnavailable) else adapter.unreachable_message(url, e)
        self._connections.drop(url)
        rl.lost_contact(url, msg, app_id, float(RayJobsExecutor.lost_contact_s))  # raises past lost_contact_s
        return DescribeAppResponse(app_id=app_id, state=AppState.UNKNOWN, msg=msg)

    @staticmethod
    def _response(app_id: str, meta: Mapping[str, str], st: AppState, msg: str,
                  verdict: Mapping[str, Any]) -> DescribeAppResponse:
        by_replica = {(r.get("role"), r.get("replica_id")): r for r in verdict.get("replicas", [])}
        held = {(role, k) for role, k in verdict.get("held", [])}  # not started: waiting for the services

        def replica(role: str, k: int) -> tuple[AppState, str]:
            if st == AppState.RUNNING and (role, k) in held:
                return AppState.PENDING, ""
            seen = by_replica.get((role, k), {})
            return (AppState[seen["state"]] if "state" in seen else st), seen.get("host", "")

        return describe_response(app_id, st, msg, json.loads(meta.get("torchx_ext_roles", "[]")), replica,
                                 num_restarts=int(verdict.get("num_restarts", 0)))

    # ------------------------------------------------------------------ list/cancel -
    def _list(self, cfg: Any) -> list[ListAppResponse]:
        urls: list[str] = []
        env = os.environ.get("RAY_ADDRESS", "")
        for candidate in ((cfg or {}).get("dashboard_url"), rl.torchxconfig().get("dashboard_url"),
                          env if env.startswith("http") else None, *rl.known_clusters()):
            if candidate and rc.resolve_dashboard(candidate) not in urls:
                urls.append(rc.resolve_dashboard(candidate))
        out: list[ListAppResponse] = []
        for url in urls:
            try:
                jobs = self._list_jobs(url)
            except Exception as e:
                if not adapter.is_unreachable(e):
                    raise
                msg = str(e) if isinstance(e, SchedulerUnavailable) else adapter.unreachable_message(url, e)
                logger.warning(msg + "; its apps are not listed")
                continue
            out += [self.listed(rc.make_app_id(url, sid), st, name) for sid, st, name in rc.listed_apps(jobs)]
        return out

    def _list_jobs(self, url: str) -> Sequence[Any]:
        """The cluster's jobs: from the REST API without Ray where it can (a ``torchx list`` then
        never imports ray), else from Ray's client."""
        listed = None
        if self._rest_list:
            listed = adapter.list_jobs(url, self._connections.token_env(url), float(RayJobsExecutor.request_timeout_s))
        return listed if listed is not None else self._client(url).list_jobs()

    def _cancel(self, app_id: str) -> None:
        url, sid = rc.split_app_id(app_id)
        if url is None:
            return
        client = self._client(url)
        job = rc.get_job(client, sid)
        if job is None:
            record = rc.get_job(client, sid + "--waiting")
            if record is None:
                return
            meta = json.loads((record.metadata or {}).get("torchx_ext_app_metadata", "{}"))
            meta.update({KIND: "verdict", "torchx_ext_verdict": "CANCELLED",
                         "torchx_ext_msg": "cancelled by user while waiting for its dependencies"})
            if rc.claim(client, sid, meta):  # the app's id, before the broker takes it
                return
            job = rc.get_job(client, sid)
        if job is None or rc.job_status(job) not in ("PENDING", "RUNNING"):
            return
        if rc.job_status(job) == "PENDING":
            self._connections.cancelled(url, sid)
        client.stop_job(sid)
        if rc.job_status(job) == "PENDING" and rc.get_job(client, sid + rc.CANCELLED_SUFFIX) is None:
            rc.claim(client, sid + rc.CANCELLED_SUFFIX, {KIND: "cancel-marker"})

    def _delete(self, app_id: str) -> None:
        url, sid = rc.split_app_id(app_id)
        if url is None or self._describe(app_id) is None:
            return
        self._cancel(app_id)
        if rc.delete_jobs(self._client(url), retention.job_ids(sid)):
            raise BackendError(f"Ray kept job {sid} after repeated deletes for a while; delete it again")
        retention.forget_app(url, sid)

    def delete_apps(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None]) -> None:
        retention.delete_apps(self, app_ids, done)

    def _prunable(self, cutoff: float, warn: retention.Warn) -> list[retention.Prunable]:
        return retention.prunable(self, cutoff, warn)

    def _leftovers(self, cutoff: float, warn: retention.Warn) -> list[retention.Leftover]:
        return retention.leftovers(cutoff, warn)

    # ------------------------------------------------------------------ logs --------
    def _replica_counts(self, app_id: str) -> Optional[dict[str, int]]:
        resp = self._describe(app_id) if rc.split_app_id(app_id)[0] else None
        if resp is None:
            return None
        if resp.state == AppState.UNKNOWN and "unreachable" in resp.msg:
            raise SchedulerUnavailable(resp.msg)
        return {r.name: r.num_replicas for r in resp.roles}

    def _log_source(
        self, app_id: str, role_name: str, k: int, streams: Optional[Stream],
        since: Optional[datetime], until: Optional[datetime],
    ) -> tuple[ReadNew, Optional[Callable[[], bool]]]:
        url, sid = rc.split_app_id(app_id)
        counts = self._replica_counts(app_id) or {}
        key = None if role_name == DRIVER_ROLE else (str(list(counts).index(role_name)), k)
        wanted = {Stream.STDOUT: "o", Stream.STDERR: "e"}.get(streams)

        # a follow streams the log (or Ray's tail), each byte once; a read without it, the log as it is now
        reader = ray_logs.JobLogReader(self._client(url or ""), sid, key, wanted, is_over=self._over_check(app_id),
                                 timed=since is not None or until is not None)
        return reader.read_new, reader.is_done


def create_scheduler(session_name: str, **kwargs: Any) -> RayJobsScheduler:
    return RayJobsScheduler(session_name, **kwargs)
