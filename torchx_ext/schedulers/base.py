"""What every torchx-ext scheduler shares, written once: the skeleton a backend module fills in.

A backend subclasses :class:`ExtScheduler`, names its executor class, and implements its engine:

* ``_build_request(app, executor, dependencies)``: the AppDef → request translation (pure: it is
  what ``--dryrun`` prints);
* ``_schedule(request)``: performs the request, returns the app id;
* ``_describe(app_id)`` / ``_list(cfg)`` / ``_cancel(app_id)`` / ``_delete(app_id)``: queries
  and actions on the engine (queries only query);
* ``_replica_counts(app_id)`` and ``_log_source(...)``: what ``log_iter`` reads;
* ``_translate_error(e)``: the engine's exceptions as our typed errors;
* ``_prunable(cutoff, warn)`` / ``_leftovers(cutoff, warn)``: for ``python -m torchx_ext prune``
  (:mod:`torchx_ext.prune`), the ended apps and the orphans; removal is ``delete``'s.

The base owns the rest: run options generated from the executor dataclass; the dry-run prelude
(unknown options rejected with the valid list, the typed executor built by
:meth:`Executor.from_cfg` so each default exists once, the group checks of
:func:`torchx_ext.groups.validate_app`, the dependency ownership check); handles and app ids;
``log_iter``'s argument checks and the shared filter/follow; and the error contract: every public
verb turns engine and OS errors into a :class:`~torchx_ext.errors.TorchxExtError`, which the
``torchx`` CLI prints as one line (:mod:`torchx_ext.cli_errors`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import (
    Any,
    Callable,
    ClassVar,
    Generic,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
)

from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, is_terminal, runopts
from torchx.specs.builders import make_app_handle

from torchx_ext import cli_errors, compat
from torchx_ext.errors import (
    BackendError,
    DependencyError,
    InvalidAppError,
    StateError,
    TorchxExtError,
    UnknownAppError,
)
from torchx_ext.executors import Executor, runopts_for
from torchx_ext.groups import app_handle_id, handle_scheduler, is_service, validate_app
from torchx_ext.logs import LogItem, filter_batches, follow
from torchx_ext.support import COMMON, Support, check_app

E = TypeVar("E", bound=Executor)
T = TypeVar("T")
ReadNew = Callable[[], Iterable[LogItem]]  # may stream: a generator is consumed whole per poll
Warn = Callable[[str], None]
# a workspace copy no record names yet may belong to a submission in progress (the copy is made
# before the record): prune leaves such copies alone for this long, whatever the cutoff
IN_FLIGHT_S = 600.0


@dataclass
class Prunable:
    """An ended app that ``prune`` may remove (see :meth:`ExtScheduler.prunable`)."""

    app_id: str
    state: AppState
    ended: float  # unix time it ended; where the engine does not say, when it was submitted
    bytes: Optional[int] = None  # what removing it frees on this machine (or the cluster), where known


@dataclass
class Leftover:
    """Something no app owns any more (a workspace copy no record names, a cluster that is gone)."""

    what: str  # shown to the user
    bytes: Optional[int]
    remove: Callable[[], None]


class ExtScheduler(Scheduler[Mapping[str, Any]], Generic[E]):
    """Base of the torchx-ext schedulers. See the module docstring for what a backend provides."""

    executor_cls: ClassVar[Type[Executor]]
    # what this scheduler does with every AppDef/Role/Resource field (torchx_ext.support)
    support: ClassVar[Mapping[str, Support]] = COMMON
    # the backend's names for roles (directory, DNS alias, ...): two roles must never share one
    name_forms: ClassVar[Mapping[str, Callable[[str], str]]] = {}
    # roles ``log`` accepts besides the app's own (e.g. ray_jobs' driver); name -> description
    extra_log_roles: ClassVar[Mapping[str, str]] = {}
    log_poll_s: ClassVar[float] = 0.2
    # a follow (``log -f``) ends once the app has read UNKNOWN this long on end: a cluster that did
    # not answer for a moment does not end it, one that forgot the app does (all backends alike)
    unknown_ends_follow_s: ClassVar[float] = 30.0

    def __init__(self, session_name: str, **kwargs: Any) -> None:
        # nothing touches the engine here: TorchX builds throwaway instances to read run options
        super().__init__(self.executor_cls.scheduler, session_name)
        cli_errors.install()

    # ------------------------------------------------------------------ options -----
    def _run_opts(self) -> runopts:
        return runopts_for(self.executor_cls)

    def _validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        # TorchX's own check refuses roles without resources (NULL_RESOURCE); ours accept them on
        # purpose (TorchX's utils.echo has none): such a role runs with the engine's defaults
        self._check_app(app)

    def _pre_build_validate(self, app: AppDef, scheduler: str, cfg: Any = None) -> None:
        # torchx-nightly calls this before building workspaces: an app that cannot run builds nothing
        self._check_app(app)

    def _check_app(self, app: AppDef) -> None:
        """The group rules, the support matrix, and names that would collide on this backend."""
        validate_app(app)
        check_app(app, self.backend, self.support)
        for what, form in self.name_forms.items():
            seen: dict[str, str] = {}
            for role in app.roles:
                other = seen.setdefault(form(role.name), role.name)
                if other != role.name:
                    raise InvalidAppError(
                        f"roles '{other}' and '{role.name}' would share the {what} '{form(role.name)}' on "
                        f"{self.backend}; rename one")

    # ------------------------------------------------------------------ dry-run -----
    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, Any]) -> AppDryRunInfo:
        executor: E = self.executor_cls.from_cfg(cfg)  # type: ignore[assignment]
        self._check_app(app)
        with self._translated("dry-run"):
            request = self._build_request(app, executor, self._dependency_ids(executor))
        return compat.make_dryrun_info(request, repr)

    def _dependency_ids(self, executor: Executor) -> list[str]:
        """The app ids of ``executor.dependencies``, refusing another scheduler's handles."""
        ids = []
        for dep in executor.dependencies or []:
            owner = handle_scheduler(dep)
            if owner not in (None, self.backend):
                raise DependencyError(
                    f"dependency '{dep}' belongs to scheduler '{owner}'; "
                    f"a {self.backend} app can only depend on {self.backend} apps"
                )
            ids.append(app_handle_id(dep))
        return ids

    def _build_request(self, app: AppDef, executor: E, dependencies: list[str]) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ verbs -------
    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        with self._translated("submit"):
            return self._schedule(dryrun_info.request)

    def _schedule(self, request: Any) -> str:
        raise NotImplementedError

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        with self._translated("describe"):
            return self._describe(app_id)

    def _describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        raise NotImplementedError

    def describe_native(self, app_id: str) -> Optional[AppDryRunInfo]:
        """The request an app was submitted with, read back (torchx-nightly's API); None if unknown."""
        with self._translated("describe"):
            request = self._describe_native(app_id)
        return None if request is None else compat.make_dryrun_info(request, repr)

    def _describe_native(self, app_id: str) -> Any:
        return None

    def list(self, cfg: Any = None) -> List[ListAppResponse]:
        with self._translated("list"):
            return self._list(cfg)

    def _list(self, cfg: Any) -> List[ListAppResponse]:
        raise NotImplementedError

    def _cancel_existing(self, app_id: str) -> None:
        with self._translated("cancel"):
            self._cancel(app_id)

    def _cancel(self, app_id: str) -> None:
        raise NotImplementedError

    def delete(self, app_id: str) -> None:
        """Cancels the app if it still runs, then removes what the engine and we keep of it."""
        with self._translated("delete"):
            self._delete(app_id)

    def _delete(self, app_id: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ retention ---
    def prunable(self, cutoff: float, warn: Warn) -> List[Prunable]:
        """This user's apps that ended before ``cutoff`` (unix time), oldest first; never one that
        runs or waits. A cluster that cannot be asked is one ``warn`` and its apps are left alone."""
        with self._translated("prune"):
            return sorted(self._prunable(cutoff, warn), key=lambda p: p.ended)

    def _prunable(self, cutoff: float, warn: Warn) -> List[Prunable]:
        raise NotImplementedError

    def delete_apps(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None]) -> None:
        """Deletes each app (``delete``), calling ``done(app_id, error or None)`` after each; a
        backend that can remove many at once for less overrides it."""
        for app_id in app_ids:
            try:
                self.delete(app_id)
            except TorchxExtError as e:
                done(app_id, e)
                continue
            done(app_id, None)

    def leftovers(self, cutoff: float, warn: Warn) -> List[Leftover]:
        """What no app owns any more, unused since before ``cutoff`` (see :class:`Leftover`)."""
        with self._translated("prune"):
            return self._leftovers(cutoff, warn)

    def _leftovers(self, cutoff: float, warn: Warn) -> List[Leftover]:
        return []

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
        with self._translated("log"):
            counts = self._replica_counts(app_id)
            if counts is None:
                raise UnknownAppError(f"unknown {self.backend} app '{app_id}'")
            if role_name not in self.extra_log_roles and not (role_name in counts and 0 <= k < counts[role_name]):
                valid = [f"{n} (replicas 0..{c - 1})" for n, c in counts.items()]
                valid += [f"{n} ({what})" for n, what in self.extra_log_roles.items()]
                raise UnknownAppError(
                    f"app '{app_id}' has no replica {k} of role '{role_name}'; roles: {', '.join(valid)}")
            read_new, done = self._log_source(app_id, role_name, k, streams, since, until)
        lines = follow(read_new, done or self._over_check(app_id), should_tail, self.log_poll_s)
        # errors are translated per batch; the lines of a batch are handed on by chain, in C
        return itertools.chain.from_iterable(self._translating_iter(filter_batches(lines, regex, since, until), "log"))

    def _replica_counts(self, app_id: str) -> Optional[dict[str, int]]:
        """Replicas per role of a known app; None if the app is unknown."""
        raise NotImplementedError

    def _log_source(
        self, app_id: str, role_name: str, k: int, streams: Optional[Stream],
        since: Optional[datetime], until: Optional[datetime],
    ) -> tuple[ReadNew, Optional[Callable[[], bool]]]:
        """``(read_new, is_done)`` for one replica's log; ``is_done`` None: "the app is over"."""
        raise NotImplementedError

    def _over_check(self, app_id: str) -> Callable[[], bool]:
        """"Is the app over?" for one follow: gone, terminal, or UNKNOWN for
        :attr:`unknown_ends_follow_s` on end (UNKNOWN is not terminal: without this a follow of an
        app its cluster forgot polled forever)."""
        unknown_since: list[float] = []

        def over() -> bool:
            resp = self.describe(app_id)
            if resp is None or is_terminal(resp.state):
                return True
            if resp.state != AppState.UNKNOWN:
                unknown_since.clear()
                return False
            if not unknown_since:
                unknown_since.append(time.monotonic())
            return time.monotonic() - unknown_since[0] >= self.unknown_ends_follow_s

        return over

    # ------------------------------------------------------------------ helpers -----
    def handle(self, app_id: str) -> str:
        return str(make_app_handle(self.backend, self.session_name, app_id))

    def listed(self, app_id: str, state: AppState, name: str = "") -> ListAppResponse:
        resp = ListAppResponse(app_id=app_id, state=state, app_handle=self.handle(app_id))
        if name and hasattr(resp, "name"):  # torchx-nightly's `torchx list` shows the app's name
            resp.name = name
        return resp

    # ------------------------------------------------------------------ errors ------
    def _translate_error(self, e: Exception, verb: str) -> Optional[TorchxExtError]:
        """The engine's exception as one of ours (None: not an engine error). Backends extend it."""
        return None

    @contextmanager
    def _translated(self, verb: str) -> Iterator[None]:
        """Runs a verb so that only our typed errors leave it (one line in the CLI).

        Engine errors go through :meth:`_translate_error`; an ``OSError`` on our path (an
        unwritable or full home, a missing tool) becomes :class:`StateError` or
        :class:`BackendError`. Anything else (a bug) keeps its traceback.
        """
        try:
            yield
        except TorchxExtError:
            raise
        except Exception as e:
            ours = self._translate_error(e, verb)
            if ours is None and isinstance(e, OSError):
                where = f" ({e.filename})" if e.filename else ""
                cls = StateError if e.filename else BackendError
                ours = cls(f"{self.backend} {verb} failed{where}: {e.strerror or e}")
            if ours is None:
                raise
            raise ours from e

    def _translating_iter(self, it: Iterable[T], verb: str) -> Iterator[T]:
        with self._translated(verb):
            yield from it


# ---------------------------------------------------------------------- shared pieces -------
def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a file or a directory; 0 if missing); links not followed."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size
    except OSError:
        return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def dangling_copies(root: str, referenced: Iterable[str], cutoff: float) -> list[Leftover]:
    """The directories under ``root`` that no record names (``referenced``), untouched since before
    ``cutoff`` and older than :data:`IN_FLIGHT_S` (a submission may be copying into one)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    keep = {os.path.realpath(r) for r in referenced}
    out = []
    for name in sorted(names):
        path = os.path.join(root, name)
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            continue
        if os.path.realpath(path) in keep or mtime >= min(cutoff, time.time() - IN_FLIGHT_S):
            continue
        out.append(Leftover(f"workspace copy {path} (no app refers to it)", tree_bytes(path),
                            lambda p=path: shutil.rmtree(p, ignore_errors=True)))  # type: ignore[misc]
    return out


def role_summaries(app: AppDef) -> list[dict[str, Any]]:
    """What describe shows of each role later, recorded at submission (JSON-able)."""
    return [
        {"name": r.name, "image": r.image, "entrypoint": r.entrypoint,
         "num_replicas": r.num_replicas, "service": is_service(r), "port_map": dict(r.port_map)}
        for r in app.roles
    ]


_NOT_STARTED = (AppState.UNSUBMITTED, AppState.SUBMITTED, AppState.PENDING)


def end_unstarted_replicas(state: AppState, statuses: Sequence[RoleStatus]) -> None:
    """A replica of an ended app that never started (a failed dependency, a cancel while it
    waited) will never run: it reads as the app's final state instead of PENDING forever."""
    if not is_terminal(state):
        return
    for role in statuses:
        for r in role.replicas:
            if r.state in _NOT_STARTED:
                r.state = state


def describe_response(
    app_id: str, state: AppState, msg: str, summaries: Sequence[Mapping[str, Any]],
    replica: Callable[[str, int], tuple[AppState, str]], num_restarts: int = 0,
) -> DescribeAppResponse:
    """A describe answer: roles from ``summaries``, each replica's (state, hostname) from ``replica``."""
    roles, statuses = [], []
    for s in summaries:
        name, n = str(s["name"]), int(s["num_replicas"])
        roles.append(Role(name=name, image=str(s.get("image", "")), entrypoint=str(s.get("entrypoint", "")),
                          num_replicas=n, port_map=dict(s.get("port_map") or {})))
        replicas = []
        for k in range(n):
            rstate, host = replica(name, k)
            replicas.append(ReplicaStatus(id=k, state=rstate, role=name, hostname=host))
        statuses.append(RoleStatus(name, replicas))
    end_unstarted_replicas(state, statuses)
    return DescribeAppResponse(app_id=app_id, state=state, msg=msg, roles=roles, roles_statuses=statuses,
                               num_restarts=num_restarts)


def is_current_dir(workspace: str) -> bool:
    """Is ``workspace`` (a path or ``file://`` URL) the current directory, TorchX CLI's default?"""
    local = workspace[len("file://"):] if workspace.startswith("file://") else workspace
    return "://" not in local and os.path.realpath(local) == os.path.realpath(os.getcwd())


def copy_workspace(workspace: str, target: str, ignore_file: str = ".torchxignore",
                   max_bytes: Optional[int] = None, skip_under: Optional[str] = None) -> int:
    """Copies ``workspace`` (an fsspec URL) into the new directory ``target``, minus what
    ``ignore_file`` excludes (TorchX's DirWorkspace rules); returns the bytes copied.

    Args:
        workspace: the source directory
        target: created; must not exist
        ignore_file: the ignore file's name in the workspace
        max_bytes: raise :class:`~torchx_ext.errors.InvalidAppError` (and remove ``target``) past this
        skip_under: a local directory never copied (e.g. our home inside the workspace)
    """
    import fsspec
    from torchx.workspace.api import walk_workspace

    from torchx_ext.progress import Progress, mib
    from torchx_ext.state import FILE_MODE, makedirs

    fs, root = fsspec.core.url_to_fs(workspace)
    makedirs(target, exist_ok=False)
    size = files_copied = 0
    by_entry: dict[str, int] = {}  # bytes per top-level entry: what to name when over max_bytes
    skip = os.path.realpath(skip_under) if skip_under else None
    with Progress(f"copying the workspace {workspace}") as progress:
        for dirpath, _dirs, files in walk_workspace(fs, root, ignore_file):
            rel = os.path.relpath(dirpath, root)
            if skip and os.path.realpath(os.path.join(root, rel)).startswith(skip):
                continue
            for name, info in files.items():
                if info.get("type") != "file":
                    continue
                nbytes = int(info.get("size") or 0)
                size += nbytes
                top = os.path.normpath(os.path.join(rel, name)).split(os.sep, 1)
                entry = top[0] + ("/" if len(top) > 1 else "")
                by_entry[entry] = by_entry.get(entry, 0) + nbytes
                if max_bytes is not None and size > max_bytes:
                    # refused at the first byte over the limit, not after a scan of the whole tree
                    shutil.rmtree(target, ignore_errors=True)
                    biggest = sorted(by_entry.items(), key=lambda kv: -kv[1])[:3]
                    raise InvalidAppError(
                        f"the workspace {workspace} is over {max_bytes // 2**20} MiB (largest so far: "
                        + ", ".join(f"{k} {mib(v)}" for k, v in biggest)
                        + f"); list what the job does not need (virtualenvs, data, checkpoints) in a "
                        f"{ignore_file} file in it"
                    )
                dst = os.path.normpath(os.path.join(target, rel, name))
                makedirs(os.path.dirname(dst))
                # private from creation (0600); then the source's owner bits only (a script stays
                # executable), never group/other: the copy lives in the user's private state
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                with os.fdopen(fd, "wb") as out, fs.open(info["name"], "rb") as src:
                    shutil.copyfileobj(src, out)
                if info.get("mode") is not None:
                    os.chmod(dst, info["mode"] & 0o700)
                files_copied += 1
                progress.update(files=files_copied, nbytes=size)
    return size
