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
import time
from contextlib import contextmanager
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
from torchx_ext.schedulers.retention import Leftover, Prunable, Warn
from torchx_ext.support import COMMON, Support, check_app

E = TypeVar("E", bound=Executor)
T = TypeVar("T")
ReadNew = Callable[[], Iterable[LogItem]]  # may stream: a generator is consumed whole per poll
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
        self._each(app_ids, done, self.delete)

    def _each(self, app_ids: Sequence[str], done: Callable[[str, Optional[Exception]], None],
              delete: Callable[[str], None]) -> None:
        """``delete(app_id)`` of each app, in the delete verb's error contract, then ``done``."""
        for app_id in app_ids:
            try:
                with self._translated("delete"):
                    delete(app_id)
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
