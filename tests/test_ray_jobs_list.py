"""``ray_jobs`` list through Ray's Jobs REST API (``GET /api/jobs/``), without Ray's client: every
app listed with its state, an unreachable dashboard warned once and skipped, and the cases that
go to Ray's own client (token authentication, an answer that is not the Jobs API's). A stub Jobs
API on a loopback port stands for the dashboard: no cluster is needed."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from typing import Any, Iterator

import pytest
from torchx.specs import AppState

from stub_http import StubHttp
from torchx_ext.schedulers.ray_jobs import adapter
from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = [  # as Ray 2.60's dashboard answers (other fields of JobDetails left out)
    {"type": "SUBMISSION", "submission_id": "app-1", "status": "RUNNING", "start_time": 3000, "metadata": {"torchx_ext_kind": "app",
                                                                                       "torchx_ext_app": "a"}},
    {"type": "SUBMISSION", "submission_id": "app-2", "status": "STOPPED", "start_time": 5000, "metadata": {"torchx_ext_kind": "app",
                                                                                       "torchx_ext_app": "b"}},
    {"type": "SUBMISSION", "submission_id": "app-3", "status": "SUCCEEDED", "start_time": 1000,
     "metadata": {"torchx_ext_kind": "verdict", "torchx_ext_verdict": "CANCELLED", "torchx_ext_app": "c"}},
    {"type": "SUBMISSION", "submission_id": "app-4--waiting", "status": "SUCCEEDED", "start_time": 4000,
     "metadata": {"torchx_ext_kind": "waiting", "torchx_ext_submission_id": "app-4", "torchx_ext_app": "d"}},
    {"type": "SUBMISSION", "submission_id": "other", "status": "RUNNING", "metadata": {}},
    {"type": "DRIVER", "submission_id": None, "status": "SUCCEEDED", "metadata": None},
]


def jobs_api(body: Any, code: int = 200) -> StubHttp:
    """A stub dashboard answering ``GET /api/jobs/`` with ``body`` and ``code`` (404 elsewhere)."""
    return StubHttp(lambda method, path: (code, body) if path == "/api/jobs/" else (404, {"detail": "not found"}))


@pytest.fixture
def stub() -> Iterator[StubHttp]:
    s = jobs_api(JOBS)
    yield s
    s.close()


@pytest.fixture
def home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.chdir(tmp_path)  # no .torchxconfig of the caller's
    return str(tmp_path / "home")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


def test_list_reads_the_rest_api_and_states_every_app(stub: StubHttp, home: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", stub.url)
    listed = [(a.app_id.rsplit("~", 1)[1], a.state) for a in RayJobsScheduler("t").list()]
    assert listed == [("app-2", AppState.CANCELLED), ("app-4", AppState.PENDING), ("app-1", AppState.RUNNING),
                      ("app-3", AppState.CANCELLED)]  # the newest submission first
    assert stub.paths == ["/api/jobs/"]  # one request: no version check, no job by job


def test_an_unreachable_dashboard_is_warned_once_and_the_others_listed(
        stub: StubHttp, home: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from torchx_ext.schedulers.ray_jobs import local as rl

    dead = closed_port_url()
    rl.remember_cluster(dead)
    monkeypatch.setenv("RAY_ADDRESS", stub.url)
    with caplog.at_level(logging.WARNING):
        listed = RayJobsScheduler("t").list()
    assert len(listed) == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and dead in warned[0] and "unreachable" in warned[0], warned


def test_what_is_not_the_jobs_api_goes_to_rays_client(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for body, code in ((JOBS, 404), ({"detail": "x"}, 200), (["not a job"], 200)):
        s = jobs_api(body, code)
        try:
            assert adapter.list_jobs(s.url, None, 5) is None, (body, code)
        finally:
            s.close()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray finds its own token: its client asks
    assert adapter.list_jobs("http://127.0.0.1:9", None, 5) is None


def test_the_token_variable_is_sent(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server = jobs_api([])
    monkeypatch.setenv("T_TOKEN", "tok")
    try:
        assert adapter.list_jobs(server.url, "T_TOKEN", 5) == []
    finally:
        server.close()
    assert [auth for _, _, auth in server.seen] == ["Bearer tok"]


def test_list_does_not_import_ray(stub: StubHttp, home: str) -> None:
    # importing ray is most of a `torchx list`'s client time (~0.35 s of ~0.6 s with 2,000 jobs)
    code = ("import sys; from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsScheduler; "
            "n = len(RayJobsScheduler('t').list()); print(n, 'ray' in sys.modules)")
    env = {**os.environ, "RAY_ADDRESS": stub.url, "PYTHONPATH": ROOT, "TORCHX_EXT_HOME": home}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["4", "False"], out.stdout + out.stderr
