"""A Ray bearer token goes only to the dashboard it was configured for (issue 20, item 1).

Two stub Jobs APIs on loopback ports record the headers they receive: one is the dashboard of
``.torchxconfig`` (with ``token_env``), the other is named only by a handle, as one pasted from a
chat would be. Each verb of the CLI is run against both, through TorchX's real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest

from stub_http import StubHttp

ray = pytest.importorskip("ray")
TOKEN = "sekrit-token-value"


class StubJobsApi:
    """A Jobs API that knows no job, or one running job (``job-1``, with one replica of role
    ``main``) whose log stream and tail are refused (404) and which ends then: enough for
    status/log/cancel/list to ask it, and for ``log -t`` to ask for both of a follow's transports."""

    def __init__(self, running: bool = False) -> None:
        self.status = "RUNNING" if running else ""
        self.http = StubHttp(self.answer)
        self.url, self.seen = self.http.url, self.http.seen  # seen: (method, path, Authorization header)

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        if path.startswith("/api/version"):
            return 200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "stub"}
        if path.rstrip("/") == "/api/jobs":
            return 200, []
        if self.status and path == "/api/jobs/job-1":
            return 200, {"type": "SUBMISSION", "submission_id": "job-1", "entrypoint": "e", "status": self.status,
                         "driver_node_id": "n1", "metadata": {"torchx_ext_kind": "app",
                                      "torchx_ext_roles": json.dumps([{"name": "main", "num_replicas": 1}])}}
        if self.status and path == "/api/jobs/job-1/logs/tail":
            self.status = "SUCCEEDED"
            return 404, {"detail": "no tail here"}
        if self.status and path == "/api/jobs/job-1/logs":
            return 200, {"logs": ""}
        return 404, {"detail": "not found"}

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def stubs() -> Iterator[tuple[StubJobsApi, StubJobsApi]]:
    configured, foreign = StubJobsApi(running=True), StubJobsApi(running=True)
    yield configured, foreign
    configured.close()
    foreign.close()


def torchx(cwd: str, home: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"TORCHX_EXT_HOME": home, "TXE_RAY_TOKEN": TOKEN})
    return subprocess.run([sys.executable, "-m", "torchx.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def handle(url: str, sid: str = "job-1") -> str:
    return f"ray_jobs://torchx/{url[len('http://'):]}~{sid}"


def test_a_handle_naming_another_dashboard_never_gets_the_token(
        tmp_path: Any, stubs: tuple[StubJobsApi, StubJobsApi]) -> None:
    configured, foreign = stubs
    home = str(tmp_path / "home")
    (tmp_path / ".torchxconfig").write_text(
        f"[ray_jobs]\ndashboard_url = {configured.url}\ntoken_env = TXE_RAY_TOKEN\n")
    cwd = str(tmp_path)
    for verb in ("status", "cancel"):
        out = torchx(cwd, home, verb, handle(foreign.url))
        assert "Traceback" not in out.stderr, out.stderr
    # a follow asks for the log stream (our request), then Ray's log tail (a websocket of Ray's client)
    out = torchx(cwd, home, "log", "-t", handle(foreign.url) + "/main/0")
    assert "Traceback" not in out.stderr, out.stderr
    torchx(cwd, home, "list", "-s", "ray_jobs")
    assert foreign.seen, "the foreign dashboard was never asked: the test proves nothing"
    assert ("GET", "/api/jobs/job-1/logs/tail", "") in foreign.seen, foreign.seen
    assert any(path.startswith("/api/v0/logs/stream?") for _, path, _ in foreign.seen), foreign.seen
    assert all(auth == "" for _, _, auth in foreign.seen), foreign.seen
    # the configured dashboard is still asked with its token (list asks it, and its own handles)
    torchx(cwd, home, "status", handle(configured.url))
    torchx(cwd, home, "log", "-t", handle(configured.url) + "/main/0")
    assert ("GET", "/api/jobs/job-1/logs/tail", f"Bearer {TOKEN}") in configured.seen, configured.seen
    assert any(path.startswith("/api/v0/logs/stream?") for _, path, _ in configured.seen), configured.seen
    assert configured.seen and all(auth == f"Bearer {TOKEN}" for _, _, auth in configured.seen), configured.seen
    # a foreign handle is never remembered: list asks only dashboards of this user
    clusters = os.path.join(home, "ray_jobs", "clusters.json")
    recorded = json.load(open(clusters)) if os.path.exists(clusters) else {}
    assert foreign.url not in recorded, recorded
    before = len(foreign.seen)
    torchx(cwd, home, "list", "-s", "ray_jobs")
    assert len(foreign.seen) == before, foreign.seen[before:]


def test_a_handle_naming_an_unknown_host_is_recorded_nowhere(tmp_path: Any) -> None:
    home = str(tmp_path / "home")
    # TorchX reads this handle's app id as 'x~job-1': the dashboard http://x, which does not exist
    out = torchx(str(tmp_path), home, "status", "ray_jobs://torchx/x%3A//x~job-1")
    assert "Traceback" not in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(home, "ray_jobs", "clusters.json"))


def test_only_http_dashboards_are_named_by_an_app_id() -> None:
    from torchx_ext.schedulers.ray_jobs import client as rc

    assert rc.split_app_id("127.0.0.1:8265~a") == ("http://127.0.0.1:8265", "a")
    assert rc.split_app_id("https%3A//head:443~a") == ("https://head:443", "a")
    for bad in ("file%3A///etc~a", "x%3A//x~a", "ray%3A//head:10001~a", "http%3A//~a"):
        assert rc.split_app_id(bad)[0] is None, bad


def test_token_is_bound_to_the_configured_dashboard(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx_ext.schedulers.ray_jobs import local as rl

    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    # TorchX fixes the directories it searches (home, cwd) at its import: name the file
    monkeypatch.setenv("TORCHXCONFIG", str(tmp_path / ".torchxconfig"))
    (tmp_path / ".torchxconfig").write_text("[ray_jobs]\ndashboard_url = http://head:8265/\ntoken_env = T\n")
    assert rl.token_env_for("http://head:8265") == "T"
    assert rl.token_env_for("http://HEAD:8265") == "T"
    for other in ("http://head:8266", "https://head:8265", "http://evil:8265", "http://head:8265/x"):
        assert rl.token_env_for(other) is None, other
    # no dashboard_url in the section: the token is bound to $RAY_ADDRESS, else to nothing
    (tmp_path / ".torchxconfig").write_text("[ray_jobs]\ntoken_env = T\n")
    assert rl.token_env_for("http://head:8265") is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert rl.token_env_for("http://head:8265") == "T"
    # a submission from this machine records its token variable with its dashboard
    rl.update_cluster("http://other:8265", token_env="U")
    assert rl.token_env_for("http://other:8265") == "U"
