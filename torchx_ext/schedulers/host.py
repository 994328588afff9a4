"""``host``: detached processes on this machine whose state survives the launching process.

TorchX's ``local_cwd`` keeps its state in memory, so ``torchx status`` from a second shell says the
app does not exist, and the CLI blocks on any scheduler whose name starts with ``local``. ``host``
hands each app to a small detached supervisor (:mod:`torchx_ext.schedulers.host_supervisor`) that
records everything under ``$TORCHX_EXT_HOME/host/<app_id>/``; ``torchx run`` returns the handle at
once and ``torchx status/log/cancel/list`` work from any shell.

Replicas: each is its own process group (so cancel kills the whole tree); the role's image is
used as working directory when it is a directory (``--workspace`` copies put one there),
otherwise the directory ``torchx run`` was started from, as with ``local_cwd``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, macros, runopts
from torchx.workspace.api import WorkspaceMixin, walk_workspace

from torchx_ext import cli_errors, compat
from torchx_ext.errors import DependencyError, InvalidAppError
from torchx_ext.executors import Capabilities, Executor, check_options, option, runopts_for
from torchx_ext.groups import app_handle_id, discovery_env, handle_scheduler, is_service, validate_app
from torchx_ext.logs import TimedLine, filter_lines, follow
from torchx_ext.schedulers import host_supervisor as sup

SCHEDULER = "host"
LOOPBACK = "127.0.0.1"


@dataclass
class HostExecutor(Executor):
    """Run options of the ``host`` scheduler (also usable as a typed executor)."""

    scheduler = SCHEDULER
    capabilities = Capabilities(
        heterogeneous_groups=True, services=True, dependencies=True,
        persistent_status=True, discovery_env=True,
    )

    job_dir: Optional[str] = option(
        None, help="directory to copy the workspace into (must not exist; default: a new "
        "directory under $TORCHX_EXT_HOME/host/workspaces when --workspace is not the current dir)"
    )
    auto_set_cuda_visible_devices: bool = option(
        False, help="give each replica of a GPU role its own CUDA_VISIBLE_DEVICES, in order"
    )
    gpu_count: Optional[int] = option(
        None, help="GPUs on this host for auto_set_cuda_visible_devices (default: nvidia-smi -L)"
    )


@dataclass
class ReplicaRequest:
    role: str
    replica_id: int
    service: bool
    cmd: list[str]
    cwd: str
    env: dict[str, str]


@dataclass
class HostRequest:
    """What ``schedule`` performs; its JSON is what ``--dryrun`` prints."""

    app_id: str
    app_dir: str
    dependencies: list[str]
    replicas: list[ReplicaRequest] = field(default_factory=list)

    def __repr__(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)


def _state_root() -> str:
    # one place per user, not per option: status/log/cancel from a new shell must find the app
    return os.path.join(sup.home(), SCHEDULER)


def _make_app_id(name: str) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:40] or "app"
    return f"{base}-{uuid.uuid4().hex[:10]}"


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def assign_gpus(app: AppDef, total: int) -> dict[tuple[str, int], str]:
    """CUDA_VISIBLE_DEVICES per (role, replica) for roles asking for GPUs, in order."""
    needed = sum(max(r.resource.gpu, 0) * r.num_replicas for r in app.roles)
    if needed > total:
        raise InvalidAppError(
            f"the app asks for {needed} GPUs (resource.gpu x num_replicas) but this host has {total}"
        )
    out, nxt = {}, 0
    for role in app.roles:
        for i in range(role.num_replicas):
            if role.resource.gpu > 0:
                out[(role.name, i)] = ",".join(str(g) for g in range(nxt, nxt + role.resource.gpu))
                nxt += role.resource.gpu
    return out


class HostScheduler(WorkspaceMixin[None], Scheduler[Mapping[str, Any]]):
    """Detached, supervised processes on this host. See the module docstring."""

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        super().__init__(SCHEDULER, session_name)

    # ------------------------------------------------------------------ options -----
    def _run_opts(self) -> runopts:
        return runopts_for(HostExecutor)

    def _validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        validate_app(app)

    # ------------------------------------------------------------------ workspace ---
    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Runs the role in a copy of ``workspace`` (minus ``.torchxignore`` matches).

        The TorchX CLI passes the current directory as the workspace by default; like ``local_cwd``
        we then run in place. Any other workspace is copied, to ``job_dir`` when given (TorchX's
        DirWorkspace convention) or to a fresh directory under ``$TORCHX_EXT_HOME/host/workspaces``.
        """
        import fsspec

        fs, root = fsspec.core.url_to_fs(workspace)
        job_dir = cfg.get("job_dir")
        if not job_dir and fs.protocol in ("file", ("file", "local")) and \
                os.path.realpath(root) == os.path.realpath(os.getcwd()):
            return
        target = str(job_dir) if job_dir else os.path.join(_state_root(), "workspaces", uuid.uuid4().hex[:12])
        os.makedirs(target, exist_ok=False)
        for dirpath, _dirs, files in walk_workspace(fs, root):
            rel = os.path.relpath(dirpath, root)
            for name, info in files.items():
                if info.get("type") != "file":
                    continue
                dst = os.path.normpath(os.path.join(target, rel, name))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with fs.open(info["name"], "rb") as src, open(dst, "wb") as out:
                    shutil.copyfileobj(src, out)
                if info.get("mode") is not None:
                    os.chmod(dst, info["mode"] & 0o777)
        role.image = target

    # ------------------------------------------------------------------ submit ------
    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> AppDryRunInfo:
        opts = self.run_opts()
        check_options(SCHEDULER, cfg, opts)
        validate_app(app)
        app_id = _make_app_id(app.name)
        root = _state_root()
        deps = [app_handle_id(d) for d in compat.as_list(cfg.get("dependencies"))]
        for d in compat.as_list(cfg.get("dependencies")):
            if handle_scheduler(d) not in (None, SCHEDULER):
                raise DependencyError(
                    f"dependency '{d}' belongs to scheduler '{handle_scheduler(d)}'; "
                    f"a {SCHEDULER} app can only depend on {SCHEDULER} apps"
                )
        gpus: dict[tuple[str, int], str] = {}
        if cfg.get("auto_set_cuda_visible_devices"):
            total = cfg.get("gpu_count")
            gpus = assign_gpus(app, int(total) if total is not None else _gpu_count())
        hosts = {role.name: [LOOPBACK] * role.num_replicas for role in app.roles}
        request = HostRequest(app_id=app_id, app_dir=os.path.join(root, app_id), dependencies=deps)
        for role in app.roles:
            cwd = role.image if role.image and os.path.isdir(role.image) else os.getcwd()
            for i in range(role.num_replicas):
                values = macros.Values(
                    img_root=cwd, app_id=app_id, replica_id=str(i), rank0_env="TORCHX_RANK0_HOST"
                )
                r = values.apply(role)
                env = {"TORCHX_RANK0_HOST": "localhost", **r.env}
                env.update(discovery_env(app_id, role.name, i, role.num_replicas, hosts))
                if (role.name, i) in gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[(role.name, i)]
                request.replicas.append(
                    ReplicaRequest(role.name, i, is_service(role), [r.entrypoint, *r.args], cwd, env)
                )
        return compat.make_dryrun_info(request, repr)

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: HostRequest = dryrun_info.request
        root = os.path.dirname(req.app_dir)
        for dep in req.dependencies:
            # existence is checked here, not in the dry-run (which must stay pure); a new app id
            # can only name existing apps, so dependency cycles cannot form
            if sup.read_json(os.path.join(root, dep, "state.json")) is None:
                raise DependencyError(
                    f"dependency '{dep}' does not exist under {root}; "
                    f"known apps: {', '.join(sorted(self._app_ids(root))[-10:]) or 'none'}"
                )
        os.makedirs(req.app_dir, mode=0o700)
        spec = asdict(req)
        spec["app_name"] = (compat.dryrun_app(dryrun_info) or AppDef(req.app_id)).name
        spec["roles"] = self._role_summaries(compat.dryrun_app(dryrun_info))
        sup.write_json(os.path.join(req.app_dir, "spec.json"), spec)
        sup.write_json(
            os.path.join(req.app_dir, "state.json"),
            {"state": "SUBMITTED", "msg": "", "created": time.time(), "replicas": {}},
        )
        with open(os.path.join(req.app_dir, "supervisor.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "torchx_ext.schedulers.host_supervisor", req.app_dir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
            )
        # recorded now so that a supervisor dying before its first write is still detected
        sup.update_state(req.app_dir, supervisor_pid=proc.pid)
        return req.app_id

    @staticmethod
    def _role_summaries(app: Optional[AppDef]) -> list[dict[str, Any]]:
        if app is None:
            return []
        return [
            {"name": r.name, "image": r.image, "entrypoint": r.entrypoint,
             "num_replicas": r.num_replicas, "service": is_service(r)}
            for r in app.roles
        ]

    # ------------------------------------------------------------------ queries -----
    def _root(self) -> str:
        return _state_root()

    @staticmethod
    def _app_ids(root: str) -> list[str]:
        try:
            return [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "state.json"))]
        except FileNotFoundError:
            return []

    def _load(self, app_id: str) -> Optional[tuple[str, dict[str, Any], dict[str, Any]]]:
        if not app_id or "/" in app_id or app_id.startswith("."):
            return None
        app_dir = os.path.join(self._root(), app_id)
        state = sup.read_json(os.path.join(app_dir, "state.json"))
        spec = sup.read_json(os.path.join(app_dir, "spec.json"))
        if state is None or spec is None:
            return None
        if state.get("state") not in sup.TERMINAL and not sup.pid_alive(state.get("supervisor_pid")):
            # re-read: the supervisor may have written its verdict just before exiting
            state = sup.read_json(os.path.join(app_dir, "state.json")) or state
            if state.get("state") not in sup.TERMINAL:
                state = dict(state, state="UNKNOWN",
                             msg=f"the supervisor (pid {state.get('supervisor_pid')}) is gone; "
                             f"see {app_dir}/supervisor.log")
        return app_dir, spec, state

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        loaded = self._load(app_id)
        if loaded is None:
            return None
        _app_dir, spec, state = loaded
        roles, statuses = [], []
        for summary in spec.get("roles", []):
            role = Role(name=summary["name"], image=summary["image"],
                        entrypoint=summary["entrypoint"], num_replicas=summary["num_replicas"])
            roles.append(role)
            replicas = []
            for i in range(summary["num_replicas"]):
                rs = state.get("replicas", {}).get(f"{summary['name']}/{i}", {})
                replicas.append(ReplicaStatus(
                    id=i, state=AppState[rs.get("state", "PENDING")], role=summary["name"],
                    hostname=rs.get("host", LOOPBACK),
                ))
            statuses.append(RoleStatus(summary["name"], replicas))
        resp = DescribeAppResponse(
            app_id=app_id, state=AppState[state.get("state", "UNKNOWN")], msg=state.get("msg", ""),
            roles=roles, roles_statuses=statuses,
        )
        return resp

    def list(self, cfg: Any = None) -> list[ListAppResponse]:
        out = []
        root = self._root()
        for app_id in sorted(self._app_ids(root)):
            resp = self.describe(app_id)
            if resp is not None:
                out.append(ListAppResponse(
                    app_id=app_id, state=resp.state, app_handle=f"{SCHEDULER}://{self.session_name}/{app_id}"
                ))
        return out

    def _cancel_existing(self, app_id: str) -> None:
        loaded = self._load(app_id)
        if loaded is None:
            return
        app_dir, _spec, state = loaded
        if state.get("state") in sup.TERMINAL:
            return
        pid = state.get("supervisor_pid")
        if sup.pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + sup.STOP_GRACE_S + 5
            while time.time() < deadline and sup.pid_alive(pid):
                time.sleep(0.05)
            if not sup.pid_alive(pid):
                return
        # the supervisor is gone (or stuck): stop what it recorded ourselves
        for rs in state.get("replicas", {}).values():
            sup.kill_group(rs.get("pgid"), signal.SIGKILL)
            if rs.get("state") == "RUNNING":
                rs["state"] = "CANCELLED"
        sup.update_state(app_dir, state="CANCELLED", replicas=state.get("replicas", {}),
                         msg="cancelled by user (supervisor was not running)", ended=time.time())

    def delete(self, app_id: str) -> None:
        """Cancels the app if needed and removes its state and logs."""
        loaded = self._load(app_id)
        if loaded is None:
            return
        self._cancel_existing(app_id)
        shutil.rmtree(loaded[0], ignore_errors=True)

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
        loaded = self._load(app_id)
        if loaded is None:
            raise ValueError(f"unknown {SCHEDULER} app '{app_id}'")
        app_dir, spec, _ = loaded
        roles = {r["name"]: r["num_replicas"] for r in spec.get("roles", [])}
        if role_name not in roles or not 0 <= k < roles[role_name]:
            raise ValueError(
                f"app '{app_id}' has no replica {k} of role '{role_name}'; roles: "
                + ", ".join(f"{n} (replicas 0..{c - 1})" for n, c in roles.items())
            )
        name = {Stream.STDOUT: "stdout", Stream.STDERR: "stderr"}.get(streams, "combined")  # type: ignore[arg-type]
        path = os.path.join(sup.log_dir(app_dir, role_name, k), f"{name}.log")
        reader = _LineReader(path)

        def done() -> bool:
            loaded_now = self._load(app_id)
            return loaded_now is None or loaded_now[2].get("state") in (*sup.TERMINAL, "UNKNOWN")

        return filter_lines(follow(reader.read_new, done, should_tail), regex, since, until)


class _LineReader:
    """Reads complete new lines of a supervisor log file, splitting off the timestamp."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[TimedLine]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self.offset += end
        out: list[TimedLine] = []
        for raw in data[:end].splitlines():
            stamp, _, text = raw.partition(b" ")
            try:
                ts: Optional[float] = float(stamp)
            except ValueError:
                ts, text = None, raw
            out.append((ts, text.decode("utf-8", errors="replace")))
        return out


def create_scheduler(session_name: str, **kwargs: Any) -> HostScheduler:
    cli_errors.install()
    return HostScheduler(session_name, **kwargs)
