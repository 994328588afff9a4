"""``docker_jobs``: a group of containers on a Docker engine, with the daemon as the only truth.

One container per replica, on a network of its own per app (replicas reach each other by the
short names in ``TORCHX_EXT_HOSTS_<ROLE>``, e.g. ``server-0``), labelled so that describe, log,
cancel and list work from any process without a side file. Group rules (all or nothing, services,
dependencies) are applied by :mod:`.watcher`: one detached
watcher process per daemon, user and ``$TORCHX_EXT_HOME`` watches all the apps submitted from
there, and exits when none is left; ``describe`` only computes the state (:mod:`.daemon`)
and restarts the watcher if it died.

Choices where TorchX's ``local_docker`` differs:

* images present locally are never pulled (``pull_policy=if-not-present``);
* containers run with ``--init`` (``init=True``): signals reach the command, so cancel and
  stopping services are immediate even for a command that runs as PID 1;
* containers are kept after they exit (their logs stay readable); ``delete`` removes them and
  the network is removed as soon as the app is over;
* like ``docker run``, the role's entrypoint and args are the container's command (the image's
  own ENTRYPOINT, if any, still applies);
* as with ``local_docker``, the workspace TorchX passes (by default the current directory) is
  built onto the role's image; ``--workspace ""`` runs the image as given. The build is planned by
  ``build_workspace_and_update_role`` (it only notes the workspace on the role: a dry-run builds
  nothing, writes nothing and connects nowhere) and performed by ``schedule``;
* one watcher acts per app, wherever status is asked from (a lease on the daemon, see
  :mod:`.watcher`); status and list restart a dead watcher only for the apps the
  caller submitted (one watcher process for all of them);
* cancel records CANCELLED in the app's verdict volume before stopping the containers, so their
  exit codes (143/137) do not read as failures.

Resources: ``cpu`` → ``nano_cpus``, ``memMB`` → memory limit (no extra swap), ``gpu`` → a device
request for that many GPUs; ``role.mounts`` → bind/volume mounts and devices.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import time
from dataclasses import asdict
from datetime import datetime
from typing import Any, Callable, Mapping, Optional, Sequence

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, Role, macros
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import state
from torchx_ext.engine.rules import retry_policy_name
from torchx_ext.errors import BackendError, DependencyError, TorchxExtError
from torchx_ext.executors import engine_timings
from torchx_ext.groups import ENV_ATTEMPT, discovery_env, is_service
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, describe_response, role_summaries
from torchx_ext.schedulers.docker_jobs import daemon as d
from torchx_ext.schedulers.docker_jobs import inventory, retention, retries, watching
from torchx_ext.schedulers.docker_jobs import lease as leases
from torchx_ext.schedulers.docker_jobs import watcher as w
from torchx_ext.schedulers.docker_jobs.images import build_workspace, ensure_image
from torchx_ext.schedulers.docker_jobs.logs import AttemptsReader
from torchx_ext.schedulers.docker_jobs.request import (
    SCHEDULER,
    WORKSPACE_KEY,
    ContainerRequest,
    DockerRequest,
    container_mounts,
    dns_name,
    host_options,
)

# re-exported: the executor entry point and the package name it here
from torchx_ext.schedulers.docker_jobs.request import (
    DockerJobsExecutor as DockerJobsExecutor,
)
from torchx_ext.schedulers.docker_jobs.support import MATRIX
from torchx_ext.schedulers.retention import Leftover, Prunable, Warn


class DockerJobsScheduler(WorkspaceMixin[None], ExtScheduler[DockerJobsExecutor]):
    """Groups of containers on the local (or ``DOCKER_HOST``) Docker engine. See the module docstring."""

    executor_cls = DockerJobsExecutor
    support = MATRIX
    name_forms = {"container name and DNS alias": dns_name}

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__(session_name, **kwargs)
        self._client: Any = None  # created on first use: TorchX builds throwaway instances

    def _api(self) -> Any:
        if self._client is None:
            self._client = d.retrying(d.client)
        return self._client

    def _translate_error(self, e: Exception, verb: str) -> Optional[TorchxExtError]:
        return d.translate_error(e, verb)

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Plans an image built from ``role.image`` plus ``workspace``, to run as the role's image.

        Only a plan: TorchX calls this for dry-runs too, which must build, write and connect to
        nothing. The workspace is noted on the role (``Role.metadata``); the dry-run's request
        lists the build and ``schedule`` performs it. TorchX's conventions: a ``Dockerfile.torchx``
        in the workspace is used (build args ``IMAGE`` and ``WORKSPACE``), else ``FROM $IMAGE`` +
        ``COPY . .``; ``.dockerignore`` is honoured. The build never pulls (the base image follows
        ``pull_policy``). As with TorchX's own container schedulers, ``torchx run`` builds the
        current directory unless told not to: ``--workspace ""`` runs the image as given.
        """
        role.metadata[WORKSPACE_KEY] = workspace

    # ------------------------------------------------------------------ submit ------
    def _build_request(self, app: AppDef, ex: DockerJobsExecutor, dependencies: list[str]) -> DockerRequest:
        host = host_options(ex, app)
        app_id = state.make_app_id(app.name, max_len=30)
        mode = (ex.network_mode or "").strip()
        network = None if mode else app_id
        names = {role.name: [f"{app_id}-{dns_name(role.name)}-{i}" for i in range(role.num_replicas)]
                 for role in app.roles}
        aliases = {role.name: [f"{dns_name(role.name)}-{i}" for i in range(role.num_replicas)]
                   for role in app.roles}
        if mode == "host":
            hosts = {r.name: ["127.0.0.1"] * r.num_replicas for r in app.roles}
        elif mode and mode != "none":
            hosts = names  # a shared network: only container names are unique on it
        else:
            hosts = aliases
        backoff, ready = engine_timings(ex)
        labels = {
            d.L_SCHEDULER: SCHEDULER, d.L_APP_ID: app_id, d.L_APP_NAME: app.name,
            d.L_SESSION: self.session_name, d.L_DEPENDENCIES: ",".join(dependencies),
            d.L_ROLES: json.dumps(role_summaries(app)), d.L_NETWORK: network or "",
            d.L_STOP_TIMEOUT: str(host["stop_timeout"]), d.L_CREATED: f"{time.time():.3f}",
            d.L_RETRY_BACKOFF: str(backoff), d.L_SUBMITTER: d.submitter(), d.L_READY_TIMEOUT: str(ready),
        }
        request = DockerRequest(
            app_id=app_id, network=network, network_mode=mode or app_id, pull_policy=ex.pull_policy,
            dependencies=dependencies, copy_env=ex.copy_env or [], host=host, labels=labels,
            builds={r.name: {"image": r.image, "workspace": str(r.metadata[WORKSPACE_KEY])}
                    for r in app.roles if r.metadata.get(WORKSPACE_KEY)},
        )
        for role in app.roles:
            mounts, devices = container_mounts(role)
            res = role.resource
            for i in range(role.num_replicas):
                values = macros.Values(img_root="", app_id=app_id, replica_id=str(i), rank0_env="TORCHX_RANK0_HOST")
                r = values.apply(role)
                env = {"TORCHX_RANK0_HOST": hosts[role.name][0], **r.env}
                env.update(discovery_env(app_id, role.name, i, role.num_replicas, hosts))
                env[ENV_ATTEMPT] = "1"
                request.containers.append(ContainerRequest(
                    name=names[role.name][i], role=role.name, replica_id=i, service=is_service(role),
                    image=role.image, command=[r.entrypoint, *r.args], env=env,
                    hostname=None if mode == "host" else (aliases if network else names)[role.name][i][:63],
                    aliases=[aliases[role.name][i]] if network else [],
                    labels={**labels, d.L_ROLE: role.name, d.L_REPLICA: str(i),
                            d.L_SERVICE: "true" if is_service(role) else "false",
                            d.L_HOST: hosts[role.name][i], d.L_ATTEMPT: "1",
                            d.L_MAX_RETRIES: str(role.max_retries),
                            d.L_RETRY_POLICY: retry_policy_name(role.retry_policy)},
                    nano_cpus=int(res.cpu * 1e9) if res.cpu and res.cpu > 0 else None,
                    mem_limit=f"{int(res.memMB)}m" if res.memMB and res.memMB > 0 else None,
                    gpus=max(int(res.gpu or 0), 0), mounts=mounts, devices=devices,
                    ports=dict(role.port_map) if mode != "host" else {},  # host mode: ports are the host's
                ))
        return request

    def _schedule(self, req: DockerRequest) -> str:
        api = self._api()
        for dep in req.dependencies:
            # checked here, not in the dry-run (which stays pure); a new app can only name
            # existing apps, so dependency cycles cannot form
            if d.fetch(api, dep) is None:
                known = self.app_ids()[:10]
                raise DependencyError(f"dependency '{dep}' is not a {SCHEDULER} app on this Docker "
                                      f"daemon; known apps: {', '.join(known) or 'none'}")
        if req.builds:
            req = self._build_workspaces(api, req)
        for image in dict.fromkeys(c.image for c in req.containers):
            ensure_image(api, image, req.pull_policy)
        # the app's lease, before any of its containers exists: no status query anywhere can start
        # a watcher for it meanwhile (see docker_jobs/watcher.py)
        lease = leases.take_lease(api, req.app_id)
        if lease is None:
            raise BackendError(f"{SCHEDULER}: the watcher lease of new app '{req.app_id}' is held already")
        copied = {k: v for k, v in os.environ.items()
                  if any(fnmatch.fnmatchcase(k, p) for p in req.copy_env)}
        if req.network:
            try:
                api.create_network(req.network, driver="bridge", labels=req.labels, check_duplicate=True)
            except Exception:
                leases.remove_leases(api, req.app_id)
                raise
        ids: dict[str, str] = {}
        results = d.parallel(lambda c: ids.__setitem__(c.name, self._create(api, req, c, copied)),
                             req.containers)
        failed = [(c, e) for c, e in results if e is not None]
        if failed:
            # all or nothing: nothing of this app stays behind; the error says which replica
            w.remove_app(api, req.app_id, req.network)
            c, e = failed[0]
            raise BackendError(
                f"{SCHEDULER}: could not create the container of role '{c.role}' replica "
                f"{c.replica_id} (image '{c.image}'): {d.explain(e)}; nothing was started"
            )
        if not req.dependencies:
            snap = d.Snapshot(req.app_id, req.labels[d.L_APP_NAME], json.loads(req.labels[d.L_ROLES]),
                              [], req.network or "", req.host["stop_timeout"],
                              ready_timeout_s=float(req.labels[d.L_READY_TIMEOUT]))
            reps = [d.Replica(c.role, c.replica_id, c.service, ids[c.name], c.name, "", "created")
                    for c in req.containers]
            self._keep_request(req)
            if w.start_group(api, snap, reps) is not None:
                if req.network:
                    d.remove_network(api, req.network)
                leases.remove_leases(api, req.app_id)
                return req.app_id  # decided (FAILED, all stopped): nothing left to watch
        self._keep_request(req)
        watching.hand_over(api, lease)
        return req.app_id

    @staticmethod
    def _build_workspaces(api: Any, req: DockerRequest) -> DockerRequest:
        """Performs the planned workspace builds; the request with the built images (a copy)."""
        req = copy.deepcopy(req)
        built = {}
        for role_name, b in req.builds.items():
            ensure_image(api, b["image"], req.pull_policy)
            built[role_name] = build_workspace(api, b["image"], b["workspace"])
        roles = json.loads(req.labels[d.L_ROLES])
        for summary in roles:
            summary["image"] = built.get(summary["name"], summary["image"])
        req.labels[d.L_ROLES] = json.dumps(roles)
        for c in req.containers:
            c.image = built.get(c.role, c.image)
            c.labels[d.L_ROLES] = req.labels[d.L_ROLES]
        return req

    @staticmethod
    def _create(api: Any, req: DockerRequest, c: ContainerRequest, copied: dict[str, str]) -> str:
        import docker

        h = req.host
        host_config = api.create_host_config(
            nano_cpus=c.nano_cpus, mem_limit=c.mem_limit,
            memswap_limit=c.mem_limit,  # no swap beyond the limit: OOM is OOM
            shm_size=h["shm_size"], privileged=h["privileged"], init=h["init"],
            tmpfs=h["tmpfs"] or None, devices=c.devices or None,
            extra_hosts=dict(x.split(":", 1) for x in h["extra_hosts"]) or None,
            mounts=[docker.types.Mount(m["target"], m["source"], type=m["type"], read_only=m["read_only"])
                    for m in c.mounts] or None,
            device_requests=[docker.types.DeviceRequest(count=c.gpus, capabilities=[["gpu"]])] if c.gpus else None,
            network_mode=req.network_mode,
            port_bindings={port: (h["publish_host"], None) for port in c.ports.values()} or None,
        )
        networking = None
        if req.network_mode not in ("host", "none"):
            networking = api.create_networking_config({
                req.network_mode: api.create_endpoint_config(aliases=c.aliases or None)
            })
        env = {**{k: v for k, v in copied.items() if k not in c.env}, **c.env}
        out = api.create_container(
            c.image, command=c.command, name=c.name, hostname=c.hostname, environment=env,
            labels=c.labels, host_config=host_config, networking_config=networking,
            user=h["user"], stop_timeout=h["stop_timeout"], detach=True, ports=list(c.ports.values()) or None,
        )
        return str(out["Id"])

    # ------------------------------------------------------------------ queries -----
    def _status(self, app_id: str, heal: bool = True, snap: Optional[d.Snapshot] = None) -> Optional[w.AppStatus]:
        """The app's state by the group rules, computed only (from ``snap`` if given, just read);
        with ``heal``, restarts a dead watcher of an app this caller submitted (see
        :func:`watching.ensure_watcher`)."""
        api = self._api()
        st = d.retrying(lambda: w.reconcile(api, app_id, acting=False, snap=snap))
        if st is not None and heal:
            watching.ensure_watcher(st)
        return st

    @staticmethod
    def _keep_request(req: DockerRequest) -> None:
        # for describe_native, on this machine (the daemon keeps the containers, not the request)
        state.makedirs(state.scheduler_dir(SCHEDULER))
        state.write_json(state.scheduler_dir(SCHEDULER, f"{req.app_id}.request.json"), asdict(req))

    def _describe_native(self, app_id: str) -> Optional[DockerRequest]:
        kept = state.read_json(state.scheduler_dir(SCHEDULER, f"{app_id}.request.json")) if state.is_plain_name(
            app_id) else None
        if kept is None or self._status(app_id) is None:
            return None
        return DockerRequest(**{**kept, "containers": [ContainerRequest(**c) for c in kept["containers"]]})

    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        st = self._status(app_id)
        if st is None:
            return None
        snap = st.snapshot
        by_key = {(r.role, r.replica_id): r for r in snap.replicas}

        def replica(role: str, k: int) -> tuple[AppState, str]:
            rep = by_key.get((role, k))
            return (d.displayed_state(rep, snap.verdict), rep.host) if rep else (AppState.UNKNOWN, "")

        return describe_response(app_id, st.state, st.msg, d.published_roles(snap), replica,
                                 num_restarts=retries.num_restarts(snap))

    def app_ids(self) -> list[str]:
        """Ids of every docker_jobs app the daemon knows (containers or a verdict)."""
        return inventory.read(self._api()).app_ids

    def _list(self, cfg: Any) -> list[ListAppResponse]:
        """Every app from the daemon's two reads for all (:mod:`.inventory`): one that is over from
        its verdict; the others reconciled from their part of the reads, as describe does (which
        heals a dead watcher)."""
        api = self._api()
        inv = inventory.read(api)
        over = inv.ended()
        out = []
        for app_id in inv.app_ids:
            e = over.get(app_id)
            if e is not None and e.verdict.get(d.L_APP_NAME) is not None:  # (the verdict names the app)
                out.append(self.listed(app_id, e.state, e.verdict[d.L_APP_NAME]))
                continue
            st = self._status(app_id, snap=inv.snapshot(api, app_id))  # heals: at most one watcher starts
            if st is not None:
                out.append(self.listed(app_id, st.state, st.snapshot.app_name))
        return out

    def _cancel(self, app_id: str) -> None:
        """Pins CANCELLED (unless the app already ended) and stops every container, waiting."""
        api = self._api()
        snap = d.retrying(lambda: d.fetch(api, app_id))
        if snap is None:
            return
        if snap.verdict is None:
            d.pin_verdict(api, snap, AppState.CANCELLED, "cancelled by user")
        for _ in range(3):  # the watcher may have started a replica meanwhile
            now = d.fetch(api, app_id)
            if now is None or not now.running:
                break
            d.stop(api, now.running, now.stop_timeout)
        if snap.network:
            d.remove_network(api, snap.network)

    def _delete(self, app_id: str) -> None:
        api = self._api()
        snap = d.fetch(api, app_id)
        if snap is None:
            return
        if snap.running or snap.verdict is None:
            self._cancel(app_id)
        images = retention.image_ids(api, app_id)  # read before its containers go
        w.remove_app(api, app_id, snap.network)  # containers, network, verdict, leases
        watching.unrequest(app_id)
        retention.remove_workspace_images(api, images)
        retention.remove_local_files(app_id)

    def delete_apps(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None]) -> None:
        """Prune's deletes from one read of the daemon (:mod:`.inventory`, ``retention.app_volumes``):
        an app that is over has its objects removed by the ids read; any other is deleted as
        ``delete`` does. A ``delete`` each re-reads the app's containers three times and its volumes
        twice, scans of everything the daemon keeps: 2,000 apps took 89 s (``bench_prune.py``)."""
        try:
            with self._translated("delete"):
                api = self._api()
                over, volumes = inventory.read(api).ended(), retention.app_volumes(api)
        except TorchxExtError as e:  # the daemon cannot be asked: none is touched
            for app_id in app_ids:
                done(app_id, e)
            return

        def delete(app_id: str) -> None:
            if app_id in over:
                retention.remove_ended(api, app_id, over[app_id], volumes.get(app_id, []))
            else:
                self._delete(app_id)

        self._each(app_ids, done, delete)

    def _prunable(self, cutoff: float, warn: Warn) -> list[Prunable]:
        return retention.prunable(inventory.read(self._api()), cutoff)

    def _leftovers(self, cutoff: float, warn: Warn) -> list[Leftover]:
        return retention.leftovers(self._api(), set(self.app_ids()), cutoff, warn)

    # ------------------------------------------------------------------ logs --------
    def _replica_counts(self, app_id: str) -> Optional[dict[str, int]]:
        snap = d.retrying(lambda: d.fetch(self._api(), app_id))
        return None if snap is None else {r["name"]: int(r["num_replicas"]) for r in snap.roles}

    def _log_source(
        self, app_id: str, role_name: str, k: int, streams: Optional[Stream],
        since: Optional[datetime], until: Optional[datetime],
    ) -> tuple[ReadNew, Optional[Callable[[], bool]]]:
        import docker

        api = self._api()
        reader = AttemptsReader(api, app_id, role_name, k, streams, since, until)
        if not reader.containers():  # removed by hand: nothing to read
            return (lambda: []), None
        over = self._over_check(app_id)

        def done() -> bool:
            last = reader.containers()
            if not last:
                return True
            try:
                status = api.inspect_container(last[-1]["Id"])["State"].get("Status")
            except docker.errors.NotFound:
                return True
            if status == "created" or last[-1]["Labels"].get(d.L_MAX_RETRIES, "0") != "0":
                # not started yet, or another attempt may follow: only over if the app is
                return over()
            return status in ("exited", "dead")

        return reader.read_new, done


def create_scheduler(session_name: str, **kwargs: Any) -> DockerJobsScheduler:
    return DockerJobsScheduler(session_name, **kwargs)
