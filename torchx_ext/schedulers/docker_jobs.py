"""``docker_jobs``: a group of containers on a Docker engine, with the daemon as the only truth.

One container per replica, on a network of its own per app (replicas reach each other by the
short names in ``TORCHX_EXT_HOSTS_<ROLE>``, e.g. ``server-0``), labelled so that describe, log,
cancel and list work from any process without a side file. Group rules (all or nothing, services,
dependencies) are applied by :mod:`torchx_ext.schedulers.docker_jobs_watcher`: a detached
watcher process per app, and every ``describe`` as a fallback; see that module for why.

Choices where TorchX's ``local_docker`` differs:

* images present locally are never pulled (``pull_policy=if-not-present``);
* containers run with ``--init`` (``init=True``): signals reach the command, so cancel and
  stopping services are immediate even for a command that runs as PID 1;
* containers are kept after they exit (their logs stay readable); ``delete`` removes them and
  the network is removed as soon as the app is over;
* like ``docker run``, the role's entrypoint and args are the container's command (the image's
  own ENTRYPOINT, if any, still applies);
* ``torchx run`` without ``--workspace`` runs the image as given (``local_docker`` builds the
  current directory into a new image on every run); ``--workspace DIR`` builds DIR onto it;
* cancel records CANCELLED in the app's verdict volume before stopping the containers, so their
  exit codes (143/137) do not read as failures.

Resources: ``cpu`` → ``nano_cpus``, ``memMB`` → memory limit (no extra swap), ``gpu`` → a device
request for that many GPUs; ``role.mounts`` → bind/volume mounts and devices.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream
from torchx.specs import (
    AppDef, AppDryRunInfo, AppState, BindMount, DeviceMount, ReplicaStatus, Role, RoleStatus, VolumeMount,
    macros, runopts,
)
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import cli_errors, compat
from torchx_ext.errors import DependencyError
from torchx_ext.executors import Capabilities, Executor, check_options, option, runopts_for
from torchx_ext.groups import app_handle_id, discovery_env, handle_scheduler, is_service, validate_app
from torchx_ext.logs import TimedLine, filter_lines, follow
from torchx_ext.schedulers import docker_jobs_watcher as w
from torchx_ext.compat import launched_by_cli_without_workspace
from torchx_ext.schedulers.docker_jobs_images import build_workspace, ensure_image
from torchx_ext.schedulers.host_supervisor import home

SCHEDULER = w.SCHEDULER
PULL_POLICIES = ("never", "if-not-present", "always")
_EXTRA_HOST = re.compile(r"^[^:\s]+:\S+$")


@dataclass
class DockerJobsExecutor(Executor):
    """Run options of the ``docker_jobs`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = Capabilities(
        heterogeneous_groups=True, services=True, dependencies=True,
        persistent_status=True, discovery_env=True,
    )

    pull_policy: str = option(
        "if-not-present", help="when to pull role images: never | if-not-present | always "
        "(default: never pull an image that is present locally)"
    )
    network_mode: Optional[str] = option(
        None, help="default: a new network per app (replicas reach each other by name); "
        "'host', 'none', or the name of an existing network"
    )
    privileged: bool = option(False, help="run the containers privileged")
    user: Optional[str] = option(None, help="user (name|uid[:group|gid]) the commands run as")
    shm_size: Optional[str] = option(None, help="size of /dev/shm, e.g. '1g' (Docker's default: 64m)")
    tmpfs: Optional[list[str]] = option(
        None, help="tmpfs mounts for every container: PATH or PATH:OPTIONS (e.g. /scratch:size=64m)"
    )
    extra_hosts: Optional[list[str]] = option(None, help="extra /etc/hosts entries: HOST:IP")
    copy_env: Optional[list[str]] = option(
        None, help="glob patterns of variables copied from the submitting environment when the "
        "role does not set them (values are read at submission, never shown in dry-runs)"
    )
    init: bool = option(True, help="run an init process (docker --init) that forwards signals and reaps zombies")
    stop_timeout: int = option(10, help="seconds between SIGTERM and SIGKILL when containers are stopped")


@dataclass
class ContainerRequest:
    """One replica's container, as it will be created."""

    name: str
    role: str
    replica_id: int
    service: bool
    image: str
    command: list[str]
    env: dict[str, str]
    hostname: Optional[str]
    aliases: list[str]
    labels: dict[str, str]
    nano_cpus: Optional[int] = None
    mem_limit: Optional[str] = None
    gpus: int = 0
    mounts: list[dict[str, Any]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)


@dataclass
class DockerRequest:
    """What ``schedule`` performs; its JSON is what ``--dryrun`` prints."""

    app_id: str
    network: Optional[str]  # the network created for this app (None with host/none/existing)
    network_mode: str
    pull_policy: str
    dependencies: list[str]
    copy_env: list[str]
    host: dict[str, Any]  # options shared by every container (privileged, user, shm_size, ...)
    labels: dict[str, str]  # the app's labels (network, verdict)
    containers: list[ContainerRequest] = field(default_factory=list)

    def __repr__(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _make_app_id(name: str) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:30].strip("-") or "app"
    return f"{base}-{uuid.uuid4().hex[:10]}"


def dns_name(role_name: str) -> str:
    """A role's name as a DNS label: ``"Model_Server"`` → ``"model-server"``."""
    return re.sub(r"[^a-z0-9-]", "-", role_name.lower()).strip("-") or "role"


def _mounts(role: Role) -> tuple[list[dict[str, Any]], list[str]]:
    mounts: list[dict[str, Any]] = []
    devices: list[str] = []
    for m in role.mounts:
        if isinstance(m, BindMount):
            mounts.append({"type": "bind", "source": m.src_path, "target": m.dst_path, "read_only": m.read_only})
        elif isinstance(m, VolumeMount):
            mounts.append({"type": "volume", "source": m.src, "target": m.dst_path, "read_only": m.read_only})
        elif isinstance(m, DeviceMount):
            devices.append(f"{m.src_path}:{m.dst_path}:{m.permissions}")
        else:
            raise ValueError(f"role '{role.name}': unsupported mount {m!r}")
    return mounts, devices


def _host_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validated container options shared by every replica (one clear error per bad option)."""
    policy = cfg.get("pull_policy") or "if-not-present"
    if policy not in PULL_POLICIES:  # checked here so that --dryrun rejects it too
        raise ValueError(f"pull_policy={policy!r}; valid: {', '.join(PULL_POLICIES)}")
    tmpfs: dict[str, str] = {}
    for item in compat.as_list(cfg.get("tmpfs")):
        path, _, opts = item.partition(":")
        if not path.startswith("/"):
            raise ValueError(f"tmpfs {item!r}: expected an absolute PATH or PATH:OPTIONS")
        tmpfs[path] = opts
    extra_hosts = compat.as_list(cfg.get("extra_hosts"))
    for item in extra_hosts:
        if not _EXTRA_HOST.match(item):
            raise ValueError(f"extra_hosts {item!r}: expected HOST:IP")
    given = cfg.get("stop_timeout")
    stop_timeout = 10 if given is None else int(given)
    if stop_timeout < 0:
        raise ValueError(f"stop_timeout={stop_timeout}; it must be >= 0")
    return {
        "privileged": bool(cfg.get("privileged", False)), "user": cfg.get("user") or None,
        "shm_size": cfg.get("shm_size") or None, "tmpfs": tmpfs, "extra_hosts": extra_hosts,
        "init": bool(cfg.get("init", True)), "stop_timeout": stop_timeout,
    }


def _watcher_log(app_id: str) -> str:
    # diagnostics only (tracebacks of the watcher); never read back: the daemon is the truth
    return os.path.join(home(), SCHEDULER, f"{app_id}.watcher.log")


class DockerJobsScheduler(WorkspaceMixin[None], Scheduler[Mapping[str, Any]]):
    """Groups of containers on the local (or ``DOCKER_HOST``) Docker engine. See the module docstring."""

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__(SCHEDULER, session_name)
        self._client: Any = None  # created on first use: TorchX builds throwaway instances

    def _api(self) -> Any:
        if self._client is None:
            self._client = w.retrying(w.client)
        return self._client

    # ------------------------------------------------------------------ options -----
    def _run_opts(self) -> runopts:
        return runopts_for(DockerJobsExecutor)

    def _validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        validate_app(app)

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Builds an image from ``role.image`` plus ``workspace`` and makes it the role's image.

        TorchX's conventions: a ``Dockerfile.torchx`` in the workspace is used (build args
        ``IMAGE`` and ``WORKSPACE``), else ``FROM $IMAGE`` + ``COPY . .``; ``.dockerignore`` is
        honoured. The build never pulls (the base image follows ``pull_policy``). ``torchx run``
        without ``--workspace`` passes the current directory: that is not built, so a plain
        ``torchx run`` runs the image as given (pass ``--workspace .`` to build it).
        """
        if launched_by_cli_without_workspace():
            return
        api = self._api()
        ensure_image(api, role.image, str(cfg.get("pull_policy") or "if-not-present"))
        role.image = build_workspace(api, role.image, workspace)

    # ------------------------------------------------------------------ submit ------
    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> AppDryRunInfo:
        check_options(SCHEDULER, cfg, self.run_opts())
        validate_app(app)
        host = _host_options(cfg)
        app_id = _make_app_id(app.name)
        deps_given = compat.as_list(cfg.get("dependencies"))
        for d in deps_given:
            if handle_scheduler(d) not in (None, SCHEDULER):
                raise DependencyError(
                    f"dependency '{d}' belongs to scheduler '{handle_scheduler(d)}'; "
                    f"a {SCHEDULER} app can only depend on {SCHEDULER} apps"
                )
        deps = [app_handle_id(d) for d in deps_given]
        mode = (cfg.get("network_mode") or "").strip()
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
        roles_json = json.dumps([
            {"name": r.name, "num_replicas": r.num_replicas, "service": is_service(r),
             "image": r.image, "entrypoint": r.entrypoint} for r in app.roles
        ])
        labels = {
            w.L_SCHEDULER: SCHEDULER, w.L_APP_ID: app_id, w.L_APP_NAME: app.name,
            w.L_SESSION: self.session_name, w.L_DEPENDENCIES: ",".join(deps), w.L_ROLES: roles_json,
            w.L_NETWORK: network or "", w.L_STOP_TIMEOUT: str(host["stop_timeout"]),
            w.L_CREATED: f"{time.time():.3f}",
        }
        request = DockerRequest(
            app_id=app_id, network=network, network_mode=mode or app_id,
            pull_policy=str(cfg.get("pull_policy") or "if-not-present"), dependencies=deps,
            copy_env=compat.as_list(cfg.get("copy_env")), host=host, labels=labels,
        )
        for role in app.roles:
            mounts, devices = _mounts(role)
            res = role.resource
            for i in range(role.num_replicas):
                values = macros.Values(img_root="", app_id=app_id, replica_id=str(i), rank0_env="TORCHX_RANK0_HOST")
                r = values.apply(role)
                env = {"TORCHX_RANK0_HOST": hosts[role.name][0], **r.env}
                env.update(discovery_env(app_id, role.name, i, role.num_replicas, hosts))
                request.containers.append(ContainerRequest(
                    name=names[role.name][i], role=role.name, replica_id=i, service=is_service(role),
                    image=role.image, command=[r.entrypoint, *r.args], env=env,
                    hostname=None if mode == "host" else (aliases if network else names)[role.name][i][:63],
                    aliases=[aliases[role.name][i]] if network else [],
                    labels={**labels, w.L_ROLE: role.name, w.L_REPLICA: str(i),
                            w.L_SERVICE: "true" if is_service(role) else "false",
                            w.L_HOST: hosts[role.name][i]},
                    nano_cpus=int(res.cpu * 1e9) if res.cpu and res.cpu > 0 else None,
                    mem_limit=f"{int(res.memMB)}m" if res.memMB and res.memMB > 0 else None,
                    gpus=max(int(res.gpu or 0), 0), mounts=mounts, devices=devices,
                ))
        return compat.make_dryrun_info(request, repr)

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: DockerRequest = dryrun_info.request
        api = self._api()
        for dep in req.dependencies:
            # checked here, not in the dry-run (which stays pure); a new app can only name
            # existing apps, so dependency cycles cannot form
            if w.fetch(api, dep) is None:
                known = self.app_ids()[-10:]
                raise DependencyError(f"dependency '{dep}' is not a {SCHEDULER} app on this Docker "
                                      f"daemon; known apps: {', '.join(known) or 'none'}")
        for image in dict.fromkeys(c.image for c in req.containers):
            ensure_image(api, image, req.pull_policy)
        copied = {k: v for k, v in os.environ.items()
                  if any(fnmatch.fnmatchcase(k, p) for p in req.copy_env)}
        if req.network:
            api.create_network(req.network, driver="bridge", labels=req.labels, check_duplicate=True)
        ids: dict[str, str] = {}
        results = w.parallel(lambda c: ids.__setitem__(c.name, self._create(api, req, c, copied)),
                             req.containers)
        failed = [(c, e) for c, e in results if e is not None]
        if failed:
            # all or nothing: nothing of this app stays behind; the error says which replica
            self._remove(api, req.app_id, req.network)
            c, e = failed[0]
            raise RuntimeError(
                f"{SCHEDULER}: could not create the container of role '{c.role}' replica "
                f"{c.replica_id} (image '{c.image}'): {w.explain(e)}; nothing was started"
            )
        if not req.dependencies:
            snap = w.Snapshot(req.app_id, req.labels[w.L_APP_NAME], json.loads(req.labels[w.L_ROLES]),
                              [], req.network or "", req.host["stop_timeout"])
            reps = [w.Replica(c.role, c.replica_id, c.service, ids[c.name], c.name, "", "created")
                    for c in req.containers]
            if w.start_group(api, snap, reps) is not None:
                if req.network:
                    w.remove_network(api, req.network)
                return req.app_id  # decided (FAILED, all stopped): nothing left to watch
        self._spawn_watcher(req.app_id)
        return req.app_id

    @staticmethod
    def _create(api: Any, req: DockerRequest, c: "ContainerRequest", copied: dict[str, str]) -> str:
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
            user=h["user"], stop_timeout=h["stop_timeout"], detach=True,
        )
        return str(out["Id"])

    @staticmethod
    def _spawn_watcher(app_id: str) -> None:
        path = _watcher_log(app_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "torchx_ext.schedulers.docker_jobs_watcher", app_id],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            )

    @staticmethod
    def _remove(api: Any, app_id: str, network: Optional[str]) -> None:
        import docker

        for s in api.containers(all=True, filters=w.app_filter(app_id)):
            try:
                api.remove_container(s["Id"], force=True)
            except docker.errors.NotFound:
                pass
        if network:
            w.remove_network(api, network)
        try:
            api.remove_volume(w.verdict_volume(app_id))
        except docker.errors.NotFound:
            pass

    # ------------------------------------------------------------------ queries -----
    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        api = self._api()
        st = w.retrying(lambda: w.reconcile(api, app_id, acting=False))
        if st is None:
            return None
        snap = st.snapshot
        by_key = {(r.role, r.replica_id): r for r in snap.replicas}
        roles, statuses = [], []
        for summary in snap.roles:
            name, n = summary["name"], int(summary["num_replicas"])
            roles.append(Role(name=name, image=summary.get("image", ""),
                              entrypoint=summary.get("entrypoint", ""), num_replicas=n))
            replicas = []
            for i in range(n):
                rep = by_key.get((name, i))
                replicas.append(ReplicaStatus(
                    id=i, role=name, state=w.displayed_state(rep, snap.verdict) if rep else AppState.UNKNOWN,
                    hostname=rep.host if rep else "",
                ))
            statuses.append(RoleStatus(name, replicas))
        return DescribeAppResponse(app_id=app_id, state=st.state, msg=st.msg, roles=roles,
                                   roles_statuses=statuses)

    def app_ids(self) -> list[str]:
        """Ids of every docker_jobs app the daemon knows (containers or a verdict)."""
        api = self._api()
        marker = {"label": [f"{w.L_SCHEDULER}={SCHEDULER}"]}
        ids = {s["Labels"].get(w.L_APP_ID) for s in api.containers(all=True, filters=marker)}
        vols = api.volumes(filters={"label": f"{w.L_SCHEDULER}={SCHEDULER}"}).get("Volumes") or []
        ids |= {(v.get("Labels") or {}).get(w.L_APP_ID) for v in vols}
        return sorted(i for i in ids if i)

    def list(self, cfg: Any = None) -> list[ListAppResponse]:
        out = []
        for app_id in w.retrying(self.app_ids):
            resp = self.describe(app_id)
            if resp is not None:
                out.append(ListAppResponse(app_id=app_id, state=resp.state,
                                           app_handle=f"{SCHEDULER}://{self.session_name}/{app_id}"))
        return out

    def _cancel_existing(self, app_id: str) -> None:
        """Pins CANCELLED (unless the app already ended) and stops every container, waiting."""
        api = self._api()
        st = w.retrying(lambda: w.reconcile(api, app_id, acting=False))
        if st is None:
            return
        if st.snapshot.verdict is None:
            w.pin_verdict(api, st.snapshot, AppState.CANCELLED, "cancelled by user")
        for _ in range(3):  # a concurrent reconcile may have started a replica meanwhile
            snap = w.fetch(api, app_id)
            if snap is None or not snap.running:
                break
            w.stop(api, snap.running, snap.stop_timeout)
        if st.snapshot.network:
            w.remove_network(api, st.snapshot.network)

    def delete(self, app_id: str) -> None:
        """Cancels the app if it still runs, then removes its containers, network and verdict."""
        api = self._api()
        snap = w.fetch(api, app_id)
        if snap is None:
            return
        if snap.running or snap.verdict is None:
            self._cancel_existing(app_id)
        self._remove(api, app_id, snap.network)
        try:
            os.remove(_watcher_log(app_id))
        except OSError:
            pass

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
        api = self._api()
        found = w.retrying(lambda: api.containers(
            all=True, filters=w.app_filter(app_id, **{w.L_ROLE: role_name, w.L_REPLICA: str(k)})))
        if not found:
            snap = w.fetch(api, app_id)
            if snap is None:
                raise ValueError(f"unknown {SCHEDULER} app '{app_id}'")
            raise ValueError(
                f"app '{app_id}' has no replica {k} of role '{role_name}'; roles: "
                + ", ".join(f"{r['name']} (replicas 0..{int(r['num_replicas']) - 1})" for r in snap.roles)
            )
        reader = _LogReader(api, found[0]["Id"], streams, since, until)

        def done() -> bool:
            import docker

            try:
                state = api.inspect_container(reader.container_id)["State"]
            except docker.errors.NotFound:
                return True
            if state.get("Status") in ("exited", "dead"):
                return True
            if state.get("Status") == "created":  # not started yet: only over if the app is
                resp = self.describe(app_id)
                return resp is None or resp.state in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED)
            return False

        return filter_lines(follow(reader.read_new, done, should_tail), regex, since, until)


class _LogReader:
    """Reads new lines of one container's log via the daemon (``timestamps=True``)."""

    def __init__(self, api: Any, container_id: str, streams: Optional[Stream],
                 since: Optional[datetime], until: Optional[datetime]) -> None:
        self.api = api
        self.container_id = container_id
        self.stdout = streams in (None, Stream.COMBINED, Stream.STDOUT)
        self.stderr = streams in (None, Stream.COMBINED, Stream.STDERR)
        self.cursor: Optional[float] = since.timestamp() if since else None
        self.until = until.timestamp() if until else None
        self.recent: set[str] = set()  # raw lines at the cursor: docker's `since` is inclusive

    def read_new(self) -> list[TimedLine]:
        kwargs: dict[str, Any] = {"stdout": self.stdout, "stderr": self.stderr, "timestamps": True}
        if self.cursor is not None and self.cursor > 0.01:
            kwargs["since"] = self.cursor - 0.005  # a float loses ns: step back, dedupe below
        if self.until is not None:
            kwargs["until"] = self.until
        raw = w.retrying(lambda: self.api.logs(self.container_id, **kwargs))
        lines = [ln for ln in raw.decode("utf-8", errors="replace").split("\n") if ln]
        out: list[TimedLine] = []
        newest = self.cursor
        for line in lines:
            if line in self.recent:
                continue  # already yielded by the previous read
            stamp, _, text = line.partition(" ")
            ts = w.parse_ts(stamp)
            if ts is None:
                ts, text = None, line
            elif newest is None or ts > newest:
                newest = ts
            out.append((ts, text))
        if newest is not None:
            self.cursor = newest
            self.recent = {ln for ln in lines if (w.parse_ts(ln.partition(" ")[0]) or 0.0) >= newest - 0.01}
        return out


def create_scheduler(session_name: str, **kwargs: Any) -> DockerJobsScheduler:
    cli_errors.install()
    return DockerJobsScheduler(session_name, **kwargs)
