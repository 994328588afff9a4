"""``host``: detached processes on this machine whose state survives the launching process.

TorchX's ``local_cwd`` keeps its state in memory, so ``torchx status`` from a second shell says the
app does not exist, and the CLI blocks on any scheduler whose name starts with ``local``. ``host``
hands each app to a small detached supervisor (:mod:`.supervisor`) that
records everything under ``$TORCHX_EXT_HOME/host/<app_id>/``; ``torchx run`` returns the handle at
once and ``torchx status/log/cancel/list`` work from any shell.

Replicas: each is its own process group (so cancel kills the whole tree); the role's image is
used as working directory when it is a directory (``--workspace`` copies put one there),
otherwise the directory ``torchx run`` was started from, as with ``local_cwd``.

Processes are known by (pid, start time, boot id), never by a bare pid (see the supervisor
module): an app whose supervisor is gone reads FAILED, and a signal only goes to a process that is
still the one recorded. Everything under the app's directory, and workspace copies under the
home, are the user's only (directories 0700, files 0600).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Any, Callable, Mapping, Optional

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream
from torchx.specs import AppDef, AppState, Role, macros
from torchx.workspace.api import WorkspaceMixin

from torchx_ext import state
from torchx_ext.engine.rules import TERMINAL, retry_policy_name
from torchx_ext.errors import BackendError, DependencyError, InvalidAppError, InvalidOptionError, StateError
from torchx_ext.executors import engine_timings
from torchx_ext.groups import discovery_env, is_service, service_ports
from torchx_ext.index import INDEX, AppIndex, Entry
from torchx_ext.schedulers.base import ExtScheduler, ReadNew, describe_response, role_summaries
from torchx_ext.schedulers.host import procs
from torchx_ext.schedulers.host import records as sup
from torchx_ext.schedulers.host.request import (
    LOOPBACK,
    SCHEDULER,
    WORKSPACE_COPY_KEY,
    HostRequest,
    ReplicaRequest,
)

# re-exported: the executor entry point and the package name it here
from torchx_ext.schedulers.host.request import (
    HostExecutor as HostExecutor,
)
from torchx_ext.schedulers.host.supervisor import STOP_GRACE_S
from torchx_ext.schedulers.host.support import MATRIX
from torchx_ext.schedulers.retention import Leftover, Prunable, Warn, dangling_copies, tree_bytes
from torchx_ext.schedulers.workspace import copy_workspace, is_current_dir


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


class HostScheduler(WorkspaceMixin[None], ExtScheduler[HostExecutor]):
    """Detached, supervised processes on this host. See the module docstring."""

    executor_cls = HostExecutor
    support = MATRIX

    def build_workspace_and_update_role(self, role: Role, workspace: str, cfg: Mapping[str, Any]) -> None:
        """Runs the role in a copy of ``workspace`` (minus ``.torchxignore`` matches).

        The TorchX CLI passes the current directory as the workspace by default; like ``local_cwd``
        we then run in place. Any other workspace is copied, to ``job_dir`` when given (TorchX's
        DirWorkspace convention) or to a fresh directory under ``$TORCHX_EXT_HOME/host/workspaces``.

        Only planned here: TorchX calls this from ``dryrun`` too, and a dry-run writes nothing. The
        role's image becomes the target; ``schedule`` makes the copy.
        """
        job_dir = cfg.get("job_dir")
        if not job_dir and is_current_dir(workspace):
            return
        if job_dir and os.path.lexists(str(job_dir)):
            raise InvalidOptionError(f"job_dir={job_dir} exists; name a directory that does not exist yet "
                                     f"(the workspace is copied into it)")
        target = str(job_dir) if job_dir else state.scheduler_dir(SCHEDULER, "workspaces", uuid.uuid4().hex[:12])
        role.metadata[WORKSPACE_COPY_KEY] = {"source": workspace, "target": target}
        role.image = target

    @staticmethod
    def _planned_copy(role: Role) -> Optional[dict[str, str]]:
        plan = role.metadata.get(WORKSPACE_COPY_KEY)
        # only while the image is still the planned target (a caller may have changed it since)
        if isinstance(plan, dict) and plan.get("target") == role.image and plan.get("source"):
            return {"source": str(plan["source"]), "target": str(plan["target"])}
        return None

    # ------------------------------------------------------------------ submit ------
    def _build_request(self, app: AppDef, executor: HostExecutor, dependencies: list[str]) -> HostRequest:
        app_id = state.make_app_id(app.name)
        gpus: dict[tuple[str, int], str] = {}
        if executor.auto_set_cuda_visible_devices:
            total = executor.gpu_count
            gpus = assign_gpus(app, int(total) if total is not None else _gpu_count())
        hosts = {role.name: [LOOPBACK] * role.num_replicas for role in app.roles}
        backoff, ready = engine_timings(executor)
        request = HostRequest(app_id=app_id, app_name=app.name, app_dir=state.scheduler_dir(SCHEDULER, app_id),
                              dependencies=dependencies, roles=role_summaries(app),
                              retry_backoff_s=backoff, ready_timeout_s=ready)
        for role in app.roles:
            copy = self._planned_copy(role)
            if copy is not None:
                request.workspace_copies.append(copy)
            cwd = role.image if copy or (role.image and os.path.isdir(role.image)) else os.getcwd()
            for i in range(role.num_replicas):
                values = macros.Values(
                    img_root=cwd, app_id=app_id, replica_id=str(i), rank0_env="TORCHX_RANK0_HOST"
                )
                r = values.apply(role)
                env = {"TORCHX_RANK0_HOST": "localhost", **r.env}
                env.update(discovery_env(app_id, role.name, i, role.num_replicas, hosts))
                if (role.name, i) in gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[(role.name, i)]
                request.replicas.append(ReplicaRequest(
                    role.name, i, is_service(role), [r.entrypoint, *r.args], cwd, env,
                    max_retries=role.max_retries, retry_policy=retry_policy_name(role.retry_policy),
                    ports=list(service_ports(role)),
                ))
        return request

    def _schedule(self, req: HostRequest) -> str:
        root = os.path.dirname(req.app_dir)
        for dep in req.dependencies:
            # existence is checked here, not in the dry-run (which must stay pure); a new app id
            # can only name existing apps, so dependency cycles cannot form
            if self._load(dep) is None:
                raise DependencyError(
                    f"dependency '{dep}' does not exist under {root}; "
                    f"known apps: {', '.join(sorted(self._app_ids())[-10:]) or 'none'}"
                )
        for copy in req.workspace_copies:  # planned by the dry-run (build_workspace_and_update_role)
            # its parent is created 0700: a workspace can hold scripts and secrets
            state.makedirs(os.path.dirname(os.path.abspath(copy["target"])), mode=0o700)
            copy_workspace(copy["source"], copy["target"])
        state.makedirs(req.app_dir, mode=0o700, exist_ok=False)  # host/ too, if new: 0700
        state.write_json(os.path.join(req.app_dir, "spec.json"), asdict(req))
        # spec first (the supervisor reads it), then the supervisor, then state.json with its
        # identity (sup.claim): a state.json never exists without a supervisor to check
        with sup.open_private_log(os.path.join(req.app_dir, "supervisor.log")) as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "torchx_ext.schedulers.host.supervisor", req.app_dir],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
            )
        # our child, not reaped: its pid cannot have changed hands before this read
        ident = procs.identity(proc.pid)
        if ident is None:
            raise BackendError(f"cannot read /proc/{proc.pid}/stat of the host supervisor just started; "
                               f"host needs a Linux /proc")
        st = sup.claim(req.app_dir, ident)
        _INDEX.add(Entry(req.app_id, float(st.get("created") or time.time()), req.app_name))
        return req.app_id

    # ------------------------------------------------------------------ queries -----
    @staticmethod
    def _app_ids() -> list[str]:
        root = state.scheduler_dir(SCHEDULER)
        try:
            return [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "state.json"))]
        except FileNotFoundError:
            return []

    @staticmethod
    def _load(app_id: str) -> Optional[tuple[str, dict[str, Any], dict[str, Any]]]:
        if not state.is_plain_name(app_id):
            return None
        app_dir = state.scheduler_dir(SCHEDULER, app_id)
        st = state.read_json(os.path.join(app_dir, "state.json"))
        spec = state.read_json(os.path.join(app_dir, "spec.json"))
        if st is None or spec is None:
            return None
        if st.get("state") not in TERMINAL and not procs.running(procs.supervisor_of(st)):
            # re-read: the supervisor may have written its verdict just before exiting
            st = state.read_json(os.path.join(app_dir, "state.json")) or st
            if st.get("state") not in TERMINAL:
                # it would have recorded any verdict: without one, what became of the replicas is
                # not known, and the app cannot go on (nothing restarts or reports them). FAILED,
                # unless some of them provably still run: then UNKNOWN, because TorchX's
                # Runner.cancel skips an app in a terminal state and they could never be stopped
                orphans = sup.orphans(app_dir, spec, st)
                replicas = {k: dict(rs, state="UNKNOWN") if rs.get("state") not in TERMINAL else rs
                            for k, rs in st.get("replicas", {}).items()}
                st = dict(st, state="UNKNOWN" if orphans else "FAILED", replicas=replicas,
                          msg=sup.gone_message(st, app_dir, orphans))
        return app_dir, spec, st

    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        loaded = self._load(app_id)
        if loaded is None:
            return None
        _app_dir, spec, st = loaded
        replicas = st.get("replicas", {})

        def replica(role: str, k: int) -> tuple[AppState, str]:
            rs = replicas.get(f"{role}/{k}", {})
            return AppState[rs.get("state", "PENDING")], rs.get("host", LOOPBACK)

        return describe_response(app_id, AppState[st.get("state", "UNKNOWN")], st.get("msg", ""),
                                 spec.get("roles", []), replica, num_restarts=int(st.get("num_restarts", 0)))

    def _describe_native(self, app_id: str) -> Optional[HostRequest]:
        loaded = self._load(app_id)
        if loaded is None:
            return None
        spec = dict(loaded[1])
        return HostRequest(**{**spec, "replicas": [ReplicaRequest(**r) for r in spec.get("replicas", [])]})

    def _list(self, cfg: Any) -> list[ListAppResponse]:
        """Every app of the home, newest first, from the index (:mod:`torchx_ext.index`): an app
        whose end the index holds is not opened again; the others are read (and their end cached)."""
        out, ended = [], {}
        for entry in _INDEX.entries():
            if entry.end:
                out.append(self.listed(entry.app_id, AppState[entry.end], entry.name))
                continue
            try:
                loaded = self._load(entry.app_id)
            except StateError as e:  # one damaged record must not hide every other app
                out.append(self.listed(entry.app_id, AppState.UNKNOWN, str(e)))
                continue
            if loaded is None:
                continue  # deleted meanwhile
            st = loaded[2].get("state", "UNKNOWN")
            if st in TERMINAL:
                ended[entry.app_id] = st
            out.append(self.listed(entry.app_id, AppState[st], loaded[1].get("app_name", "")))
        _INDEX.ended(ended)
        return out

    def _cancel(self, app_id: str) -> None:
        """Asks the supervisor to stop the app (it records CANCELLED). An app whose supervisor was
        gone before the cancel (it read UNKNOWN, or FAILED) ends FAILED, its outcome being the
        supervisor's loss; the cancel stops its replicas that provably still run, and nothing else."""
        loaded = self._load(app_id)
        if loaded is None:
            return
        app_dir, spec, _ = loaded
        path = os.path.join(app_dir, "state.json")
        st = state.read_json(path) or {}
        if st.get("state") in TERMINAL:
            return
        supervisor = procs.supervisor_of(st)
        was_gone = not procs.running(supervisor)
        if was_gone:
            st = state.read_json(path) or st  # it may have recorded a verdict just before exiting
            if st.get("state") in TERMINAL:
                return
        else:
            procs.signal_process(supervisor, signal.SIGTERM)
            deadline = time.time() + STOP_GRACE_S + 5
            while time.time() < deadline and procs.running(supervisor):
                time.sleep(0.05)
            if procs.running(supervisor) and procs.signal_process(supervisor, signal.SIGKILL):
                while procs.running(supervisor):  # stuck: it must not outlive the cancel
                    time.sleep(0.02)
            st = state.read_json(path) or st
            if st.get("state") in TERMINAL:
                return  # it recorded its verdict
            # killed before it could handle the signal (cancel right after run), or stuck
        # the supervisor is gone: stop what its record says is still the app's, nothing else
        sup.stop_recorded(app_dir, spec, st)
        replicas = {k: dict(rs, state="CANCELLED") if rs.get("state") not in TERMINAL else rs
                    for k, rs in st.get("replicas", {}).items()}
        if was_gone:
            verdict = {"state": "FAILED", "msg": sup.gone_message(st, app_dir, 0) + "; a cancel stopped what was left"}
        else:
            verdict = {"state": "CANCELLED", "msg": "cancelled by user"}
        with state.locked(app_dir):  # a verdict recorded meanwhile is final: keep it
            now = state.read_json(path) or st
            if now.get("state") not in TERMINAL:
                state.write_json(path, {**now, **verdict, "replicas": replicas, "ended": time.time()})

    def _delete(self, app_id: str) -> None:
        """Cancels the app if it runs, then removes its directory and the workspace copies made for
        it under the home (a ``job_dir`` the user named is the user's: it is kept)."""
        loaded = self._load(app_id)
        if loaded is None:
            return
        self._cancel(app_id)
        for copy in self._own_copies(loaded[1]):
            shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(loaded[0], ignore_errors=True)
        _INDEX.forget(app_id)

    @staticmethod
    def _own_copies(spec: Mapping[str, Any]) -> list[str]:
        """The workspace copies of an app's spec that live under the home's workspaces directory."""
        root = os.path.realpath(state.scheduler_dir(SCHEDULER, "workspaces"))
        targets = [os.path.realpath(str(c.get("target", ""))) for c in spec.get("workspace_copies", [])]
        return [t for t in targets if os.path.dirname(t) == root]

    # ------------------------------------------------------------------ retention ---
    def _prunable(self, cutoff: float, warn: Warn) -> list[Prunable]:
        out = []
        for app_id in self._app_ids():
            try:
                loaded = self._load(app_id)
            except StateError as e:
                warn(f"{SCHEDULER}: {e}; left alone")
                continue
            if loaded is None or loaded[2].get("state") not in TERMINAL:
                continue
            app_dir, spec, st = loaded
            ended = st.get("ended") or os.path.getmtime(os.path.join(app_dir, "state.json"))
            if float(ended) < cutoff:
                size = tree_bytes(app_dir) + sum(tree_bytes(c) for c in self._own_copies(spec))
                out.append(Prunable(app_id, AppState[st["state"]], float(ended), size))
        return out

    def _leftovers(self, cutoff: float, warn: Warn) -> list[Leftover]:
        referenced = []
        try:
            names = os.listdir(state.scheduler_dir(SCHEDULER))
        except FileNotFoundError:
            names = []
        for name in names:  # every app directory, a half-made one too
            try:
                spec = state.read_json(state.scheduler_dir(SCHEDULER, name, "spec.json")) or {}
            except StateError as e:  # what it refers to is not known: remove no copy
                warn(f"{SCHEDULER}: {e}; no dangling workspace copy is removed")
                return []
            referenced += [str(c.get("target", "")) for c in spec.get("workspace_copies", [])]
        return dangling_copies(state.scheduler_dir(SCHEDULER, "workspaces"), referenced, cutoff)

    # ------------------------------------------------------------------ logs --------
    def _replica_counts(self, app_id: str) -> Optional[dict[str, int]]:
        loaded = self._load(app_id)
        return None if loaded is None else {r["name"]: r["num_replicas"] for r in loaded[1].get("roles", [])}

    def _log_source(
        self, app_id: str, role_name: str, k: int, streams: Optional[Stream],
        since: Optional[datetime], until: Optional[datetime],
    ) -> tuple[ReadNew, Optional[Callable[[], bool]]]:
        name = {Stream.STDOUT: "stdout", Stream.STDERR: "stderr"}.get(streams, "combined")
        app_dir = state.scheduler_dir(SCHEDULER, app_id)
        reader = state.StampedLineReader(os.path.join(sup.log_dir(app_dir, role_name, k), f"{name}.log"),
                                         plain=since is None and until is None)
        return reader.read_new, None  # over: as on every backend (Scheduler._over_check)


def _is_app_dir(name: str) -> bool:
    """A name under ``host/`` that may be an app's directory (no file opened)."""
    return state.is_plain_name(name) and name not in ("workspaces", "lock", INDEX)


def _entry(app_id: str) -> Optional[Entry]:
    """An app's index entry from its records; None: no whole app there (yet)."""
    app_dir = state.scheduler_dir(SCHEDULER, app_id)
    try:
        st = state.read_json(os.path.join(app_dir, "state.json"))
        if st is None:
            return None  # being submitted, or not an app
        spec = state.read_json(os.path.join(app_dir, "spec.json")) or {}
        created = st.get("created") or os.path.getmtime(app_dir)
    except StateError:  # listed with its error (list reads it again: it is not ended)
        return Entry(app_id, _mtime(app_dir))
    except OSError:  # deleted meanwhile
        return None
    # a verdict recorded is final (one made up for a vanished supervisor is not cached here)
    end = st["state"] if st.get("state") in TERMINAL else None
    return Entry(app_id, float(created), str(spec.get("app_name", "")), end)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


# list's index of this home's host apps (see torchx_ext.index)
_INDEX = AppIndex(SCHEDULER, _is_app_dir, _entry)


def create_scheduler(session_name: str, **kwargs: Any) -> HostScheduler:
    return HostScheduler(session_name, **kwargs)
