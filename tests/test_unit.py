"""Pure parts of the group contract, logs and compat: no backend needed."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

import pytest
from torchx.specs import AppDef, AppState, Role

from torchx_ext import compat
from torchx_ext.errors import InvalidAppError
from torchx_ext.groups import (
    ReplicaOutcome as R,
)
from torchx_ext.groups import (
    app_handle_id,
    discovery_env,
    group_state,
    hosts_env_name,
    mark_service,
    validate_app,
)
from torchx_ext.logs import filter_lines

S, F, C, RUN, P = AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED, AppState.RUNNING, AppState.PENDING


def test_env_names_and_discovery() -> None:
    assert hosts_env_name("vllm-server.v2") == "TORCHX_EXT_HOSTS_VLLM_SERVER_V2"
    env = discovery_env("app-1", "client", 1, 2, {"server": ["h1", "h2"], "client": ["c0", "c1"]})
    assert env == {
        "TORCHX_EXT_APP_ID": "app-1", "TORCHX_EXT_ROLE": "client", "TORCHX_EXT_REPLICA_ID": "1",
        "TORCHX_EXT_NUM_REPLICAS": "2", "TORCHX_EXT_HOSTS_SERVER": "h1,h2", "TORCHX_EXT_HOSTS_CLIENT": "c0,c1",
    }


@pytest.mark.parametrize("outcomes, state, msg", [
    ([R("c", 0, False, S), R("s", 0, True, RUN)], S, ""),
    ([R("c", 0, False, RUN), R("s", 0, True, F, 3)], F, "service role 's' replica 0 ended early with exit code 3"),
    ([R("c", 0, False, F, 2), R("c", 1, False, RUN)], F, "role 'c' replica 0 failed with exit code 2"),
    ([R("c", 0, False, S), R("c", 1, False, RUN)], RUN, ""),
    ([R("c", 0, False, P)], P, ""),
    ([R("c", 0, False, C)], C, "role 'c' replica 0 was cancelled"),
])
def test_group_state(outcomes: list, state: AppState, msg: str) -> None:
    assert group_state(outcomes) == (state, msg)


def test_validate_app_lists_every_problem() -> None:
    app = AppDef("x", roles=[
        mark_service(Role("a", image=".", entrypoint="x")),
        mark_service(Role("a", image=".", entrypoint="", num_replicas=0)),
    ])
    with pytest.raises(InvalidAppError) as e:
        validate_app(app)
    msg = str(e.value)
    for part in ("unique", "no entrypoint", "num_replicas=0", "every role is a service"):
        assert part in msg, msg
    with pytest.raises(InvalidAppError, match="no roles"):
        validate_app(AppDef("empty"))


def test_handles_lists_and_quoting() -> None:
    assert app_handle_id("host://s/app-1") == "app-1" and app_handle_id("app-1") == "app-1"
    assert compat.as_list("a, b;c,") == ["a", "b", "c"] and compat.as_list(None) == []


def test_filter_lines() -> None:
    lines = [(100.0, "a1"), (200.0, "b2"), (None, "c3"), (300.0, "a4\n")]
    assert list(filter_lines(lines, regex="^a")) == ["a1\n", "a4\n"]
    since, until = datetime.fromtimestamp(150), datetime.fromtimestamp(250)
    assert list(filter_lines(lines, since=since, until=until)) == ["b2\n", "c3\n"]


def test_every_error_is_ours_and_a_builtin() -> None:
    import inspect

    from torchx_ext import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.TorchxExtError), cls
        if cls is not errors.TorchxExtError:
            assert any(b in cls.__mro__ for b in (ValueError, ConnectionError, RuntimeError, OSError,
                                                   LookupError, ImportError)), cls


def test_engine_and_os_errors_leave_a_verb_as_ours(tmp_path: Any) -> None:
    from torchx_ext.errors import BackendError, StateError
    from torchx_ext.schedulers.host.scheduler import HostScheduler

    sched = HostScheduler("unit")
    with pytest.raises(StateError, match="no-such-dir"):
        with sched._translated("submit"):
            open(os.path.join(str(tmp_path), "no-such-dir", "x"), "w")
    with pytest.raises(BackendError, match="host submit failed: .*refused"):
        with sched._translated("submit"):
            raise ConnectionRefusedError(111, "refused")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        with sched._translated("submit"):
            1 / 0  # noqa: B018


def test_unwritable_home_is_one_state_error(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx.runner import get_runner

    from torchx_ext.errors import StateError

    blocker = os.path.join(str(tmp_path), "file")
    with open(blocker, "w") as f:
        f.write("x")
    monkeypatch.setenv("TORCHX_EXT_HOME", os.path.join(blocker, "home"))
    app = AppDef("h", roles=[Role("main", image=str(tmp_path), entrypoint="true")])
    with pytest.raises(StateError, match=r"cannot write .*TORCHX_EXT_HOME"):
        get_runner().run(app, "host", {})


def test_a_replica_that_never_started_ends_with_its_app() -> None:
    """A dependent app FAILED by its dependency (or cancelled while waiting) never started its
    replicas: they read as the app's final state, not PENDING forever (issue 21)."""
    from torchx.specs import AppState

    from torchx_ext.schedulers.base import describe_response

    roles = [{"name": "main", "num_replicas": 2}]
    for final in (AppState.FAILED, AppState.CANCELLED):
        resp = describe_response("a", final, "dependency 'x' ended FAILED", roles,
                                 lambda role, k: (AppState.PENDING if k else AppState.SUCCEEDED, ""))
        assert [r.state for r in resp.roles_statuses[0].replicas] == [AppState.SUCCEEDED, final]
    resp = describe_response("a", AppState.RUNNING, "", roles, lambda role, k: (AppState.PENDING, ""))
    assert {r.state for r in resp.roles_statuses[0].replicas} == {AppState.PENDING}


def test_a_follow_ends_once_its_app_read_unknown_long_enough(monkeypatch: Any) -> None:
    """UNKNOWN is not terminal: a follow ends on it only after ``unknown_ends_follow_s`` on end
    (a cluster silent for a moment does not end it; one that forgot the app does), on every backend."""
    from torchx.schedulers.api import DescribeAppResponse
    from torchx.specs import AppState

    from torchx_ext.schedulers import base
    from torchx_ext.schedulers.host.scheduler import create_scheduler

    sched = create_scheduler("t")
    now: dict[str, Any] = {"t": 0.0, "state": AppState.RUNNING}
    monkeypatch.setattr(base.time, "monotonic", lambda: now["t"])
    monkeypatch.setattr(sched, "describe", lambda app_id: DescribeAppResponse(app_id=app_id, state=now["state"]))
    over = sched._over_check("a")
    for t, st, expected in [(0, AppState.RUNNING, False), (1, AppState.UNKNOWN, False),
                            (10, AppState.RUNNING, False), (20, AppState.UNKNOWN, False),
                            (45, AppState.UNKNOWN, False), (50, AppState.UNKNOWN, True)]:
        now.update(t=float(t), state=st)
        assert over() is expected, (t, st)
    for final in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
        now.update(state=final)
        assert sched._over_check("a")()
    monkeypatch.setattr(sched, "describe", lambda app_id: None)
    assert sched._over_check("a")()
