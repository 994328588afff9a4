"""``docker_jobs`` without a daemon: the dry-run request, container options, and the group rules of
:func:`reconcile` on a small in-memory fake of the daemon's low-level API (edge cases that are
slow or awkward to provoke on a real engine). The real engine is tested in test_docker_jobs.py."""

from __future__ import annotations

import builtins
import email.utils
import json
import os
import re
import time
from typing import Any, Optional

import pytest
from torchx.specs import AppDef, AppState, BindMount, DeviceMount, Resource, Role, VolumeMount

from contract import HOSTILE_ARGS
from torchx_ext import engine
from torchx_ext.errors import DependencyError
from torchx_ext.executors import capabilities, scheduler_for
from torchx_ext.groups import mark_service
from torchx_ext.schedulers.docker_jobs import daemon, inventory, launcher, readiness, timestamps, watching
from torchx_ext.schedulers.docker_jobs import lease as leases
from torchx_ext.schedulers.docker_jobs import watcher as w
from torchx_ext.schedulers.docker_jobs.logs import LogReader
from torchx_ext.schedulers.docker_jobs.request import DockerJobsExecutor, DockerRequest
from torchx_ext.schedulers.docker_jobs.scheduler import DockerJobsScheduler

docker = pytest.importorskip("docker")


def request(app: AppDef, **cfg: Any) -> DockerRequest:
    return DockerJobsScheduler("s").submit_dryrun(app, cfg).request


def two_roles() -> AppDef:
    server = mark_service(Role("Model_Server", image="img", entrypoint="serve", num_replicas=2,
                               resource=Resource(cpu=2, gpu=1, memMB=512)), True)
    client = Role("client", image="img", entrypoint="python3", args=["-c", "x", *HOSTILE_ARGS],
                  env={"A": "1"}, resource=Resource(cpu=0.5, gpu=0, memMB=64))
    client.mounts = [BindMount("/src", "/dst", read_only=True), VolumeMount("vol", "/v"),
                     DeviceMount("/dev/fuse", "/dev/fuse")]
    return AppDef("My App!", roles=[server, client])


# --------------------------------------------------------------------------- dry-run ------
def test_dryrun_names_hosts_labels_and_resources() -> None:
    req = request(two_roles())
    assert req.app_id.startswith("my-app-") and req.network == req.app_id == req.network_mode
    s0, s1, c0 = req.containers
    assert (s0.name, s0.aliases, s0.hostname) == (f"{req.app_id}-model-server-0", ["model-server-0"], "model-server-0")
    assert c0.env["TORCHX_EXT_HOSTS_MODEL_SERVER"] == "model-server-0,model-server-1"
    assert c0.env["TORCHX_EXT_HOSTS_CLIENT"] == "client-0" and c0.env["A"] == "1"
    assert c0.command == ["python3", "-c", "x", *HOSTILE_ARGS]  # exec form: verbatim, no shell
    assert (s0.nano_cpus, s0.mem_limit, s0.gpus) == (2_000_000_000, "512m", 1)
    assert (c0.nano_cpus, c0.mem_limit, c0.gpus) == (500_000_000, "64m", 0)
    assert c0.mounts == [{"type": "bind", "source": "/src", "target": "/dst", "read_only": True},
                         {"type": "volume", "source": "vol", "target": "/v", "read_only": False}]
    assert c0.devices == ["/dev/fuse:/dev/fuse:rwm"]
    assert s1.labels[daemon.L_SERVICE] == "true" and c0.labels[daemon.L_SERVICE] == "false"
    assert s1.labels[daemon.L_REPLICA] == "1" and s1.labels[daemon.L_ROLE] == "Model_Server"
    roles = json.loads(c0.labels[daemon.L_ROLES])
    summary = [(r["name"], r["num_replicas"], r["service"]) for r in roles]
    assert summary == [("Model_Server", 2, True), ("client", 1, False)]
    assert json.loads(repr(req))["app_id"] == req.app_id  # --dryrun prints JSON


def test_dryrun_network_modes() -> None:
    host = request(two_roles(), network_mode="host")
    assert host.network is None and host.containers[0].hostname is None and not host.containers[0].aliases
    assert host.containers[2].env["TORCHX_EXT_HOSTS_MODEL_SERVER"] == "127.0.0.1,127.0.0.1"
    shared = request(two_roles(), network_mode="my-net")
    assert shared.network is None and shared.network_mode == "my-net"
    assert shared.containers[2].env["TORCHX_EXT_HOSTS_CLIENT"] == shared.containers[2].name


@pytest.mark.parametrize("cfg, match", [
    ({"pull_policy": "sometimes"}, "pull_policy='sometimes'; valid: never, if-not-present, always"),
    ({"extra_hosts": ["nohost"]}, "expected HOST:IP"),
    ({"tmpfs": ["relative"]}, "absolute PATH"),
    ({"stop_timeout": -1}, "must be >= 0"),
    ({"ready_timeout_s": 0}, r"ready_timeout_s=0.0: a time in seconds, > 0 \(how long a service may take to accept connections\)"),
])
def test_bad_options_are_one_clear_error(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        request(two_roles(), **cfg)


def test_unknown_option_and_foreign_dependency() -> None:
    # ours is UnknownOptionError; the nightly's runopts rejects it first with its own type
    with pytest.raises(Exception, match=r"Valid options( are)?: .*pull_policy"):
        request(two_roles(), pul_policy="never")
    with pytest.raises(DependencyError, match="belongs to scheduler 'host'"):
        request(two_roles(), dependencies=["host://s/app-1"])
    assert request(two_roles(), dependencies=["docker_jobs://s/a-1", "b-2"]).dependencies == ["a-1", "b-2"]


def test_executor_is_registered_with_capabilities() -> None:
    assert scheduler_for(DockerJobsExecutor()) == "docker_jobs"
    caps = capabilities("docker_jobs")
    assert caps.heterogeneous_groups and caps.services and caps.dependencies and caps.persistent_status
    name, cfg = DockerJobsExecutor(pull_policy="never", tmpfs=["/t"]).to_run_args()
    assert name == "docker_jobs" and cfg["pull_policy"] == "never" and not cfg["privileged"]


class Recorder:
    """Records the low-level calls ``_create`` makes (the SDK's helpers are real)."""

    def __init__(self) -> None:
        self.api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
        self.created: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    def create_container(self, image: str, **kw: Any) -> dict[str, str]:
        self.created = dict(kw, image=image)
        return {"Id": "abc"}


def test_container_options_reach_the_daemon_call() -> None:
    req = request(two_roles(), tmpfs=["/scratch:size=8m"], extra_hosts=["db:10.0.0.1"], user="1000",
                  shm_size="1g", copy_env=["TOKEN*"])
    rec = Recorder()
    DockerJobsScheduler._create(rec, req, req.containers[0], {"TOKEN_X": "s3cret", "A": "host"})
    hc = rec.created["host_config"]
    assert (hc["NanoCpus"], hc["Memory"], hc["MemorySwap"]) == (2_000_000_000, 512 * 2**20, 512 * 2**20)
    assert hc["DeviceRequests"][0]["Count"] == 1 and hc["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert hc["Tmpfs"] == {"/scratch": "size=8m"} and hc["ExtraHosts"] == ["db:10.0.0.1"]
    assert hc["Init"] is True and not hc.get("Privileged") and hc["ShmSize"] == 2**30
    assert hc["NetworkMode"] == req.app_id
    assert rec.created["user"] == "1000" and rec.created["stop_timeout"] == 10
    assert rec.created["environment"]["TOKEN_X"] == "s3cret"
    DockerJobsScheduler._create(rec, req, req.containers[2], {"A": "host"})
    assert rec.created["environment"]["A"] == "1"  # the role's own value wins over copy_env
    assert [m["Type"] for m in rec.created["host_config"]["Mounts"]] == ["bind", "volume"]
    assert rec.created["host_config"]["Devices"][0]["PathOnHost"] == "/dev/fuse"


def test_parse_ts() -> None:
    assert timestamps.parse_ts("1970-01-01T00:00:01.5Z") == 1.5
    assert timestamps.parse_ts("2026-11-21T09:54:37.113819260Z") == pytest.approx(1795254877.113819, abs=1e-6)
    assert timestamps.parse_ts("2026-11-21T10:54:37+01:00") == timestamps.parse_ts("2026-11-21T09:54:37Z")
    assert timestamps.parse_ts("0001-01-01T00:00:00Z") is None and timestamps.parse_ts("garbage") is None


# ----------------------------------------------------------------------- group rules ------
class FakeDaemon:
    """Just enough of ``docker.APIClient`` for :func:`w.reconcile`."""

    def __init__(self) -> None:
        self.containers_: dict[str, dict[str, Any]] = {}
        self.vols: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.fail_start: set[str] = set()

    def add(self, app: str, role: str, i: int, status: str, code: Optional[int] = None, service: bool = False,
            roles: Optional[list[dict[str, Any]]] = None, deps: str = "", oom: bool = False, started: bool = True,
            finished: str = "2026-01-01T00:00:00Z") -> str:
        cid = f"{app}-{role}-{i}"
        labels = {daemon.L_SCHEDULER: daemon.SCHEDULER, daemon.L_APP_ID: app, daemon.L_ROLE: role, daemon.L_REPLICA: str(i),
                  daemon.L_SERVICE: "true" if service else "false", daemon.L_DEPENDENCIES: deps, daemon.L_STOP_TIMEOUT: "5",
                  daemon.L_ROLES: json.dumps(roles or []), daemon.L_HOST: f"{role}-{i}"}
        self.containers_[cid] = {"Id": cid, "Names": [f"/{cid}"], "Labels": labels, "Created": len(self.containers_), "State": {
            "Status": status, "ExitCode": code, "OOMKilled": oom, "Error": "",
            "StartedAt": "2026-01-01T00:00:00Z" if started else "0001-01-01T00:00:00Z", "FinishedAt": finished}}
        return cid

    def containers(self, all: bool = False, filters: Optional[dict[str, list[str]]] = None) -> list[dict[str, Any]]:
        want = dict(x.split("=", 1) for x in (filters or {}).get("label", []))
        return [{"Id": c["Id"], "Names": c["Names"], "Labels": c["Labels"], "State": c["State"]["Status"], "Created": c.get("Created", 0)}
                for c in self.containers_.values() if builtins.all(c["Labels"].get(k) == v for k, v in want.items())]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        return {"State": dict(self.containers_[cid]["State"])}

    def inspect_volume(self, name: str) -> dict[str, Any]:
        if name not in self.vols:
            raise docker.errors.NotFound("no volume")
        return self.vols[name]

    def create_volume(self, name: str, driver: str = "local",
                      labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
        return self.vols.setdefault(name, {"Name": name, "Labels": dict(labels or {})})

    def volumes(self, filters: dict[str, list[str]]) -> dict[str, Any]:
        want = [x.split("=", 1) for x in filters["label"]]  # "key=value", or "key": has the label
        return {"Volumes": [v for v in self.vols.values() if builtins.all(
            v["Labels"].get(k[0]) == k[1] if len(k) == 2 else k[0] in v["Labels"] for k in want)]}

    def remove_volume(self, name: str) -> None:
        if self.vols.pop(name, None) is None:
            raise docker.errors.NotFound("no volume")

    def start(self, cid: str) -> None:
        self.calls.append(("start", cid, None))
        if cid in self.fail_start:
            self.containers_[cid]["State"]["Error"] = "exec: no such file"
            raise docker.errors.APIError("400", explanation="exec: no such file")
        self.containers_[cid]["State"].update(Status="running", StartedAt="2026-01-01T00:00:01Z")

    def stop(self, cid: str, timeout: Optional[int] = None) -> None:
        self.calls.append(("stop", cid, timeout))
        st = self.containers_[cid]["State"]
        if st["Status"] == "running":
            st.update(Status="exited", ExitCode=137 if timeout == 0 else 143, FinishedAt="2030-01-01T00:00:00Z")

    def logs(self, cid: str, **kw: Any) -> bytes:
        return b"Traceback...\nZeroDivisionError: division by zero\n"

    def remove_network(self, name: str) -> None:
        self.calls.append(("remove_network", name, None))

    def remove_container(self, cid: str, force: bool = False) -> None:
        self.calls.append(("remove_container", cid, None))
        if self.containers_.pop(cid, None) is None:
            raise docker.errors.NotFound("no container")


ROLES = [{"name": "server", "num_replicas": 1, "service": True},
         {"name": "client", "num_replicas": 1, "service": False}]


def test_service_ending_early_fails_the_app_and_stops_the_rest() -> None:
    d = FakeDaemon()
    d.add("a", "server", 0, "exited", 3, service=True, roles=ROLES)
    d.add("a", "client", 0, "running", roles=ROLES)
    st = w.reconcile(d, "a", acting=True)
    assert st is not None and st.state == AppState.FAILED and st.over
    assert "service role 'server' replica 0 ended early with exit code 3" in st.msg
    assert ("stop", "a-client-0", 5) in d.calls
    assert daemon.displayed_state(st.snapshot.replicas[0], st.snapshot.verdict) == AppState.CANCELLED  # client
    assert w.reconcile(d, "a", acting=False).state == AppState.FAILED  # type: ignore[union-attr]


def test_describe_computes_the_state_but_never_acts() -> None:
    d = FakeDaemon()
    d.add("a", "server", 0, "running", service=True, roles=ROLES)
    d.add("a", "client", 0, "exited", 0, roles=ROLES)
    d.add("dep", "main", 0, "exited", 4, roles=[{"name": "main", "num_replicas": 1}])
    d.add("b", "main", 0, "created", roles=[{"name": "main", "num_replicas": 1}], deps="dep", started=False)
    st = w.reconcile(d, "a", acting=False)
    assert st is not None and st.state == AppState.RUNNING and "stopping server/0; then SUCCEEDED" in st.msg
    assert not st.over  # no verdict pinned yet: the watcher (restarted if dead) still has work
    failed = w.reconcile(d, "b", acting=False)
    assert failed is not None and failed.state == AppState.FAILED and "dependency 'dep' ended FAILED" in failed.msg
    assert not d.calls and not d.vols  # nothing stopped, started or pinned by a query
    st = w.reconcile(d, "a", acting=True)  # the watcher's turn
    assert ("stop", "a-server-0", 5) in d.calls and st is not None and st.state == AppState.SUCCEEDED and st.over


def test_failed_replica_reason_oom_and_last_stderr_line() -> None:
    d = FakeDaemon()
    roles = [{"name": "main", "num_replicas": 2, "service": False}]
    d.add("a", "main", 0, "exited", 137, roles=roles, oom=True)
    d.add("a", "main", 1, "exited", 1, roles=roles)
    st = w.reconcile(d, "a", acting=True)
    assert st.state == AppState.FAILED and "replica 0 failed with exit code 137: OOMKilled" in st.msg  # type: ignore[union-attr]
    d2 = FakeDaemon()
    d2.add("b", "main", 0, "exited", 1, roles=[{"name": "main", "num_replicas": 1}])
    assert w.reconcile(d2, "b", acting=True).msg.endswith("ZeroDivisionError: division by zero")  # type: ignore[union-attr]


def test_start_failure_is_all_or_nothing() -> None:
    d = FakeDaemon()
    roles = [{"name": "good", "num_replicas": 1}, {"name": "bad", "num_replicas": 1}]
    d.add("a", "good", 0, "created", roles=roles, started=False)
    bad = d.add("a", "bad", 0, "created", roles=roles, started=False)
    d.fail_start.add(bad)
    st = w.reconcile(d, "a", acting=True)
    assert st.state == AppState.FAILED and "role 'bad' replica 0 failed to start: exec: no such file" in st.msg  # type: ignore[union-attr]
    assert ("stop", "a-good-0", 0) in d.calls and not st.snapshot.running  # type: ignore[union-attr]


def test_dependencies_pending_failed_and_succeeded() -> None:
    d = FakeDaemon()
    one = [{"name": "main", "num_replicas": 1}]
    d.add("dep", "main", 0, "running", roles=one)
    d.add("a", "main", 0, "created", roles=one, deps="dep", started=False)
    st = w.reconcile(d, "a", acting=True)
    assert st.state == AppState.PENDING and "waiting for dependencies: dep" in st.msg  # type: ignore[union-attr]
    d.containers_["dep-main-0"]["State"].update(Status="exited", ExitCode=0)
    assert w.reconcile(d, "a", acting=True).state == AppState.RUNNING  # type: ignore[union-attr]
    d.add("b", "main", 0, "created", roles=one, deps="gone", started=False)
    st = w.reconcile(d, "b", acting=True)
    assert st.state == AppState.FAILED and "dependency 'gone' no longer exists" in st.msg  # type: ignore[union-attr]
    d.add("bad", "main", 0, "exited", 4, roles=one)
    d.add("c", "main", 0, "created", roles=one, deps="bad", started=False)
    st = w.reconcile(d, "c", acting=True)
    assert st.state == AppState.FAILED and st.msg.startswith("dependency 'bad' ended FAILED")  # type: ignore[union-attr]
    assert not [c for c in d.calls if c[0] == "start" and c[1].startswith(("b-", "c-"))]


def test_first_verdict_wins_and_missing_container_fails() -> None:
    d = FakeDaemon()
    d.add("a", "main", 0, "running", roles=[{"name": "main", "num_replicas": 2}])
    st = w.reconcile(d, "a", acting=True)
    assert st.state == AppState.FAILED and "replica 1" in st.msg and "removed" in st.msg  # type: ignore[union-attr]
    snap = daemon.fetch(d, "a")
    assert daemon.pin_verdict(d, snap, AppState.CANCELLED, "late").state == AppState.FAILED  # type: ignore[arg-type]
    assert daemon.fetch(d, "nope") is None and w.reconcile(d, "nope", acting=True) is None


class FakeLogs:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.calls = chunks, []  # type: ignore[var-annotated]

    def logs(self, cid: str, **kw: Any) -> Any:
        self.calls.append(kw)
        data = self.chunks.pop(0)
        assert kw["stream"] and not kw["follow"]
        return iter([data[i:i + 7] for i in range(0, len(data), 7)])  # a stream cuts lines anywhere


def test_log_reader_resumes_without_duplicates_or_losses() -> None:
    t = "2026-01-01T00:00:0"
    fake = FakeLogs([
        f"{t}1.000000001Z a\n{t}2.000000001Z b\n".encode(),
        # the daemon's `since` is inclusive and the float cursor is rounded: b comes again
        f"{t}2.000000001Z b\n{t}2.000000001Z b2 same instant\n{t}3.5Z c\nno timestamp\n".encode(),
        b"",
    ])
    reader = LogReader(fake, "cid", None, None, None)
    assert [x[1] for x in reader.read_new()] == ["a", "b"]
    assert [x[1] for x in reader.read_new()] == ["b2 same instant", "c", "no timestamp"]
    assert list(reader.read_new()) == []
    assert fake.calls[1]["since"] == pytest.approx(timestamps.parse_ts(f"{t}2.000000001Z") - 0.005)  # type: ignore[operator]
    assert fake.calls[0]["stdout"] and fake.calls[0]["stderr"] and fake.calls[0]["timestamps"]


def _with_retries(d: FakeDaemon, cid: str, attempt: int = 1, restart: int = 0, unit: str = "",
                  max_retries: int = 1, policy: str = "APPLICATION") -> str:
    d.containers_[cid]["Labels"].update({daemon.L_MAX_RETRIES: str(max_retries), daemon.L_RETRY_POLICY: policy,
                                         daemon.L_ATTEMPT: str(attempt), daemon.L_RESTART: str(restart),
                                         daemon.L_RESTART_UNIT: unit})
    return cid


def _fake_recreate(d: FakeDaemon, fail: tuple[str, int] = ("", -1)) -> Any:
    """launcher.retries.recreate on the fake: the next attempt, created with the labels it is given."""
    def recreate(api: Any, rep: daemon.Replica, attempt: int, labels: dict[str, str]) -> str:
        if (rep.role, rep.replica_id) == fail:
            raise docker.errors.APIError("409", explanation="Conflict. The container name is already in use")
        old = d.containers_[rep.container_id]
        cid = f"{re.sub(r'-a[0-9]+$', '', rep.container_id)}-a{attempt}"
        d.containers_[cid] = {"Id": cid, "Names": [f"/{cid}"], "State": {
            "Status": "created", "ExitCode": 0, "OOMKilled": False, "Error": "",
            "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"},
            "Labels": {**old["Labels"], **labels, daemon.L_ATTEMPT: str(attempt)}}
        d.calls.append(("create", cid, None))
        return cid
    return recreate


RETRY_ROLES = [{"name": "a", "num_replicas": 2, "service": False}, {"name": "other", "num_replicas": 1, "service": True}]


def test_describe_in_the_middle_of_a_restart_sees_it_coming_not_a_spent_budget() -> None:
    # the watcher creates an APPLICATION restart's attempts one by one: a describe that reads the
    # daemon after the service's next attempt exists but before the failed replica's does must not
    # charge that restart to the failed replica (a clean-clone CI run read FAILED "after 2 attempts")
    d = FakeDaemon()
    _with_retries(d, d.add("x", "a", 0, "exited", 3, roles=RETRY_ROLES))
    _with_retries(d, d.add("x", "a", 1, "exited", 0, roles=RETRY_ROLES))
    nxt = d.add("x", "other", 0, "created", service=True, roles=RETRY_ROLES, started=False)
    d.containers_["x-other-0-a2"] = {**d.containers_.pop(nxt), "Id": "x-other-0-a2", "Names": ["/x-other-0-a2"]}
    _with_retries(d, "x-other-0-a2", attempt=2, restart=1, unit="app")
    _with_retries(d, d.add("x", "other", 0, "running", service=True, roles=RETRY_ROLES))  # attempt 1, stopped next
    st = w.reconcile(d, "x", acting=False)
    assert st is not None and st.state == AppState.PENDING and not d.calls, st
    assert [daemon.replica_outcome(r)[0] for r in st.snapshot.replicas] == [
        AppState.FAILED, AppState.SUCCEEDED, AppState.PENDING]  # a/0 reads FAILED, but its restart is due
    assert st.engine is not None and st.engine.used == {"app": 1} and st.engine.num_restarts == 1
    assert {v.attempt for v in st.engine.replicas.values()} == {2}


def test_a_restart_that_cannot_create_an_attempt_fails_the_app_and_starts_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx_ext.schedulers.docker_jobs import retries

    d = FakeDaemon()
    _with_retries(d, d.add("x", "a", 0, "exited", 3, roles=RETRY_ROLES))
    _with_retries(d, d.add("x", "a", 1, "exited", 0, roles=RETRY_ROLES))
    _with_retries(d, d.add("x", "other", 0, "running", service=True, roles=RETRY_ROLES))
    monkeypatch.setattr(retries, "recreate", _fake_recreate(d, fail=("a", 0)))
    st = w.reconcile(d, "x", acting=True)
    assert st is not None and st.state == AppState.FAILED and st.over, st
    assert "role 'a' replica 0 failed to restart: Conflict. The container name is already in use" in st.msg
    assert not [c for c in d.calls if c[0] == "start"] and ("stop", "x-other-0", 5) in d.calls


def _exit(d: FakeDaemon, cid: str, code: int, at: str = "2026-01-01T00:00:09Z") -> None:
    d.containers_[cid]["State"].update(Status="exited", ExitCode=code, FinishedAt=at)


def test_a_new_watcher_goes_on_with_the_same_attempts_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pass restores the app's engine from the snapshot its last restart left on the attempts
    it created: a watcher that takes over (a new process) draws from the same budget."""
    from torchx_ext.schedulers.docker_jobs import retries

    d = FakeDaemon()
    monkeypatch.setattr(retries, "recreate", _fake_recreate(d))
    roles = [{"name": "a", "num_replicas": 2, "service": False}]
    _with_retries(d, d.add("x", "a", 0, "exited", 3, roles=roles), policy="REPLICA")
    _with_retries(d, d.add("x", "a", 1, "running", roles=roles), policy="REPLICA")
    st = w.reconcile(d, "x", acting=True)  # the first watcher: restart 1 of a/0, started at once
    assert st is not None and st.state == AppState.RUNNING and ("start", "x-a-0-a2", None) in d.calls, st
    labels = d.containers_["x-a-0-a2"]["Labels"]
    assert labels[daemon.L_RESTART] == "1" and labels[daemon.L_RESTART_UNIT] == "replica:a/0"
    assert json.loads(labels[daemon.L_ENGINE])["used"] == {"replica:a/0": 1}
    assert labels[daemon.L_RESTART_WHY] == "role 'a' replica 0 ended with exit code 3; REPLICA policy, restart 1 of 1"
    _exit(d, "x-a-0-a2", 3)  # its second attempt fails too, while no watcher lives
    assert "stopping a/1; then FAILED" in w.reconcile(d, "x", acting=False).msg  # type: ignore[union-attr]
    st = w.reconcile(d, "x", acting=True)  # a new watcher: the budget is spent, the app fails
    assert st is not None and st.state == AppState.FAILED and st.over, st
    assert st.msg.startswith("role 'a' replica 0 failed with exit code 3") and st.msg.endswith(
        "after 2 attempts (REPLICA policy, max_retries=1)"), st.msg
    assert ("stop", "x-a-1", 5) in d.calls and len([c for c in d.calls if c[0] == "create"]) == 1


def test_a_pass_cut_short_is_finished_by_the_next_and_a_backoff_counts_from_the_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchx_ext.schedulers.docker_jobs import retries

    d = FakeDaemon()
    monkeypatch.setattr(retries, "recreate", _fake_recreate(d))
    roles = [{"name": "a", "num_replicas": 2, "service": False}]
    just_now = time.strftime("%Y-%m-%dT%H:%M:%S.5Z", time.gmtime(time.time() - 1))
    _with_retries(d, d.add("x", "a", 0, "exited", 3, roles=roles, finished=just_now), max_retries=2)
    _with_retries(d, d.add("x", "a", 1, "running", roles=roles), max_retries=2)
    for c in d.containers_.values():
        c["Labels"][daemon.L_RETRY_BACKOFF] = "30"
    st = w.reconcile(d, "x", acting=True)  # APPLICATION: both restart, after 30 s from the exit
    due = timestamps.parse_ts(just_now) + 30  # type: ignore[operator]
    assert st is not None and st.state == AppState.PENDING and st.next_due == pytest.approx(due), st
    assert d.containers_["x-a-1-a2"]["Labels"][daemon.L_START_AFTER] == f"{due:.3f}"
    assert ("stop", "x-a-1", 5) in d.calls and not [c for c in d.calls if c[0] == "start"]
    assert w.reconcile(d, "x", acting=False).state == AppState.PENDING  # type: ignore[union-attr]
    for c in d.containers_.values():  # 30 s later (the engine's snapshot on the new attempts says when)
        if daemon.L_ENGINE in c["Labels"]:
            snap = json.loads(c["Labels"][daemon.L_ENGINE])
            snap["replicas"] = [[*r[:7], r[7] - 30 if r[7] else r[7]] for r in snap["replicas"]]
            c["Labels"][daemon.L_ENGINE] = json.dumps(snap)
    # a pass cut short: a/1's next attempt was never created, and its old one still runs
    del d.containers_["x-a-1-a2"]
    d.containers_["x-a-1"]["State"].update(Status="running")
    d.calls.clear()
    st = w.reconcile(d, "x", acting=True)
    assert ("create", "x-a-1-a2", None) in d.calls and ("stop", "x-a-1", 5) in d.calls, d.calls
    assert {c[1] for c in d.calls if c[0] == "start"} == {"x-a-0-a2", "x-a-1-a2"}
    assert st is not None and st.state == AppState.RUNNING and st.engine is not None, st
    assert st.engine.used == {"app": 1} and st.engine.num_restarts == 1


# ------------------------------------------------------------------------ watcher lease ------
class LeaseDaemon:
    """Just enough of the daemon for the watcher lease: volumes (first creator's labels stand,
    whole-second CreatedAt) and a settable clock answering /_ping."""

    base_url = "http+docker://fake"

    def __init__(self) -> None:
        self.vols: dict[str, dict[str, Any]] = {}
        self.now = 1_800_000_000.0

    def create_volume(self, name: str, driver: str = "local",
                      labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now))
        return self.vols.setdefault(name, {"Name": name, "Labels": dict(labels or {}), "CreatedAt": stamp})

    def volumes(self, filters: dict[str, list[str]]) -> dict[str, Any]:
        want = dict(x.split("=", 1) for x in filters["label"])
        return {"Volumes": [v for v in self.vols.values()
                            if builtins.all(v["Labels"].get(k) == x for k, x in want.items())]}

    def remove_volume(self, name: str) -> None:
        if self.vols.pop(name, None) is None:
            raise docker.errors.NotFound("no volume")

    def get(self, url: str, timeout: float = 0) -> Any:
        date = email.utils.formatdate(self.now, usegmt=True)
        return type("Res", (), {"headers": {"Date": date}, "raise_for_status": lambda self: None})()

    def epochs(self, app: str) -> list[int]:
        return sorted(int(v["Labels"][leases.L_EPOCH]) for v in self.vols.values() if v["Labels"].get(leases.L_LEASE) == app)


def test_lease_one_winner_renewal_expiry_and_takeover() -> None:
    api = LeaseDaemon()
    first = leases.take_lease(api, "a", "h1")
    assert first is not None and first.epoch == 0 and first.valid_for(leases.LEASE_TTL_S - 2)
    assert leases.take_lease(api, "a", "h2") is None  # held: nobody else gets it
    api.now += leases.LEASE_TTL_S - 1
    assert leases.renew(api, first) and first.epoch == 1 and api.epochs("a") == [1]  # older epochs removed
    api.now += leases.LEASE_TTL_S  # renewed 10 s ago: not yet expired (whole-second stamps, + 1)
    assert leases.take_lease(api, "a", "h2") is None
    api.now += 2
    second = leases.take_lease(api, "a", "h2")
    assert second is not None and second.epoch == 2 and second.holder == "h2"
    assert not leases.renew(api, first)  # the late holder finds its next epoch taken: it stops acting
    assert leases.take_lease(api, "a", "h3") is None and api.epochs("a") == [2]


def test_lease_claim_of_a_reused_name_yields_to_the_newer_epoch() -> None:
    api = LeaseDaemon()
    lease = leases.take_lease(api, "a", "h1")
    assert lease is not None
    for _ in range(3):
        assert leases.renew(api, lease)
    assert api.epochs("a") == [3]
    # a taker that read the lease long ago claims epoch 1, whose name the holder freed
    assert leases._claim(api, "a", "stale", 1) is None and api.epochs("a") == [3]
    assert leases.take_lease(api, "a", "h2") is None


def test_lease_of_a_dead_predecessor_is_taken_at_once_and_only_its() -> None:
    api = LeaseDaemon()
    assert leases.take_lease(api, "a", "h1") is not None
    assert leases.take_lease(api, "a", "h2") is None  # alive as far as h2 knows: wait for expiry
    second = leases.take_lease(api, "a", "h2", dead={"h1"})  # the home's lock proves h1 gone
    assert second is not None and second.epoch == 1 and api.epochs("a") == [1]
    assert leases.take_lease(api, "a", "h3", dead={"h1"}) is None  # h2 holds it, and h2 lives


def test_lease_passed_by_the_submission_to_the_watcher_is_adopted_by_it_alone() -> None:
    api = LeaseDaemon()
    lease = leases.take_lease(api, "a", "submission")
    assert lease is not None and leases.transfer(api, lease, "watcher") and api.epochs("a") == [1]
    assert leases.take_lease(api, "a", "another") is None  # never free in between
    adopted = leases.take_lease(api, "a", "watcher")
    assert adopted is not None and adopted.epoch == 2 and api.epochs("a") == [2]
    lease.valid_until = 0.0  # a submission that took too long: its lease is not passed
    assert not leases.transfer(api, lease, "watcher") and api.epochs("a") == [2]


def test_only_the_submitter_heals_with_one_watcher_per_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path))
    children: list[int] = []

    def popen(argv: list[str], pass_fds: tuple[int, ...] = (), **kw: Any) -> None:
        assert argv[-2:] == ["--lock-fd", str(pass_fds[0])]
        children.append(os.dup(pass_fds[0]))  # the child holds the home's lock (the same open file)

    monkeypatch.setattr(watching.subprocess, "Popen", popen)
    snap = daemon.Snapshot("a", "a", [], [], "", 5, submitter="uid=0@elsewhere:/home/x/.torchx_ext")
    status = w.AppStatus(snap, AppState.RUNNING, "")
    assert not watching.ensure_watcher(status) and not children and not os.path.exists(watching.requests_dir())
    snap.submitter = daemon.submitter()
    assert watching.ensure_watcher(status) and len(children) == 1 and watching.watcher_running()
    assert os.listdir(watching.requests_dir()) == ["a"]
    other = w.AppStatus(daemon.Snapshot("b", "b", [], [], "", 5, submitter=daemon.submitter()), AppState.RUNNING, "")
    assert not watching.ensure_watcher(other) and len(children) == 1  # handed to the living watcher
    assert sorted(os.listdir(watching.requests_dir())) == ["a", "b"]
    os.close(children[0])  # the watcher dies: the kernel frees its lock
    assert not watching.watcher_running() and watching.ensure_watcher(other) and len(children) == 2
    os.close(children[1])


def test_workspace_is_planned_not_built_by_the_dryrun() -> None:
    s = DockerJobsScheduler("s")
    role = Role("main", image="img", entrypoint="true")
    s.build_workspace_and_update_role(role, "/some/ws", {})
    req = s.submit_dryrun(AppDef("ws", roles=[role]), {}).request
    assert role.image == "img" and req.builds == {"main": {"image": "img", "workspace": "/some/ws"}}
    assert s._client is None  # no daemon connection
    assert json.loads(repr(req))["builds"]["main"]["workspace"] == "/some/ws"


# ------------------------------------------------------------------------ readiness ------
PORTED = [{"name": "server", "num_replicas": 1, "service": True, "port_map": {"http": 8000}},
          {"name": "client", "num_replicas": 1, "service": False}]


def _ready_app(d: FakeDaemon, started_s_ago: float = 0.0, timeout_s: str = "300.0") -> None:
    """App "r": a server with a port, started ``started_s_ago``, and its client, created, never started."""
    d.add("r", "server", 0, "running", service=True, roles=PORTED)
    d.add("r", "client", 0, "created", roles=PORTED, started=False)
    d.containers_["r-server-0"]["State"]["StartedAt"] = _ts(time.time() - started_s_ago)
    for c in d.containers_.values():
        c["Labels"][daemon.L_READY_TIMEOUT] = timeout_s


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _accepting(monkeypatch: pytest.MonkeyPatch, answer: list[bool]) -> list[tuple[str, tuple[int, ...]]]:
    """readiness.check on the fake: ``answer[0]`` (changed by the test); the probes it was asked."""
    asked: list[tuple[str, tuple[int, ...]]] = []

    def check(api: Any, rep: daemon.Replica, ports: tuple[int, ...], network: str) -> bool:
        asked.append((rep.container_id, ports))
        return answer[0]
    monkeypatch.setattr(readiness, "check", check)
    return asked


def test_the_others_are_held_until_the_service_accepts_then_describe_reads_the_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    d = FakeDaemon()
    _ready_app(d)
    answer = [False]
    asked = _accepting(monkeypatch, answer)
    st = w.reconcile(d, "r", acting=True)
    assert st is not None and st.state == AppState.RUNNING and st.probing, st  # the watcher looks again soon
    assert asked == [("r-server-0", (8000,))] and not [c for c in d.calls if c[0] == "start"]
    client = next(r for r in st.snapshot.replicas if r.role == "client")
    assert daemon.displayed_state(client, st.snapshot.verdict) == AppState.PENDING  # held: created, not started
    assert w.reconcile(d, "r", acting=False).probing and len(asked) == 1  # type: ignore[union-attr]  # describe never connects
    answer[0] = True
    st = w.reconcile(d, "r", acting=True)
    assert ("start", "r-client-0", None) in d.calls and st is not None and not st.probing, st
    assert [v["Labels"][readiness.L_READY_ATTEMPT] for v in d.vols.values()] == ["1"]  # the record
    asked.clear()
    st = w.reconcile(d, "r", acting=False)  # describe (or a successor): the record, no connect, no deadline
    assert st is not None and st.state == AppState.RUNNING and not st.probing and not asked, st
    assert st.engine is not None and st.engine.replicas[("client", 0)].state == "RUNNING"


def test_a_service_not_ready_in_time_fails_the_app_and_the_held_never_start(monkeypatch: pytest.MonkeyPatch) -> None:
    d = FakeDaemon()
    _ready_app(d, started_s_ago=5, timeout_s="3.0")
    _accepting(monkeypatch, [False])
    st = w.reconcile(d, "r", acting=True)
    assert st is not None and st.state == AppState.FAILED and st.over, st
    assert st.msg == ("service role 'server' replica 0 was not ready: port 8000 did not accept connections "
                      "within 3 s (run option ready_timeout_s); the other roles were not started")
    assert ("stop", "r-server-0", 5) in d.calls and not [c for c in d.calls if c[0] == "start"]
    client = next(r for r in st.snapshot.replicas if r.role == "client")
    assert daemon.displayed_state(client, st.snapshot.verdict) == AppState.CANCELLED


def test_a_successor_past_the_deadline_looks_at_the_service_before_it_fails_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline counts from the container's StartedAt whoever computes it; a watcher that
    took over late connects before it Ticks (fresh engine, and one restored from a snapshot)."""
    d = FakeDaemon()
    _ready_app(d, started_s_ago=400)
    _accepting(monkeypatch, [True])
    st = w.reconcile(d, "r", acting=True)
    assert st is not None and st.state == AppState.RUNNING and ("start", "r-client-0", None) in d.calls, st
    eng = engine.Engine(launcher.group_spec(daemon.fetch(d, "r")))  # type: ignore[arg-type]
    eng.on(engine.Begin(), 0.0)
    eng.on(engine.Started(("server", 0)), time.time() - 400)  # a snapshot taken while it was not ready
    d.vols.clear()
    d.containers_["r-client-0"]["State"].update(Status="created", StartedAt="0001-01-01T00:00:00Z")
    d.containers_["r-server-0"]["Labels"][daemon.L_ENGINE] = json.dumps(eng.snapshot())
    d.calls.clear()
    st = w.reconcile(d, "r", acting=True)
    assert st is not None and st.state == AppState.RUNNING and ("start", "r-client-0", None) in d.calls, st


def test_ready_timeout_label_and_a_whole_number_option() -> None:
    assert request(two_roles()).containers[0].labels[daemon.L_READY_TIMEOUT] == "300.0"
    assert request(two_roles(), ready_timeout_s=3).containers[2].labels[daemon.L_READY_TIMEOUT] == "3.0"
    with pytest.raises(ValueError, match="cannot be True: expected float"):
        request(two_roles(), ready_timeout_s=True)


def test_where_a_service_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Api:
        mode, nets = "app", {"app": {"IPAddress": "172.18.0.2"}, "other": {"IPAddress": "10.0.0.9"}}

        def inspect_container(self, cid: str) -> dict[str, Any]:
            return {"HostConfig": {"NetworkMode": self.mode}, "NetworkSettings": {"Networks": self.nets}}
    api = Api()
    rep = daemon.Replica("s", 0, True, "c", "c", "", "running", ports={8000: "127.0.0.1:32768", 9000: "10.1.1.1:32769"})
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert readiness.endpoints(api, rep, (8000,), "app") == [("172.18.0.2", 8000)]  # what the other replicas use
    api.nets = {}
    assert readiness.endpoints(api, rep, (8000,), "app") == []  # no address yet: not ready
    api.mode = "host"
    assert readiness.endpoints(api, rep, (8000,), "") == [("127.0.0.1", 8000)]
    monkeypatch.setenv("DOCKER_HOST", "tcp://docker.example:2376")
    assert readiness.endpoints(api, rep, (8000,), "") == [("docker.example", 8000)]
    api.mode = "app"
    assert readiness.endpoints(api, rep, (8000, 9000), "app") == [("docker.example", 32768), ("10.1.1.1", 32769)]
    assert readiness.endpoints(api, rep, (7000,), "app") == []  # not published: never reachable from here


def test_inventory_is_what_fetch_reads_app_by_app_in_two_reads() -> None:
    """list and prune read every app at once (inventory): the same snapshots and states as a
    fetch per app, from one volumes and one containers read, whatever the number of apps."""
    d = FakeDaemon()
    one = [{"name": "main", "num_replicas": 1}]
    d.add("live", "server", 0, "running", service=True, roles=ROLES)
    d.add("live", "client", 0, "exited", 0, roles=ROLES)
    d.add("over", "main", 0, "exited", 3, roles=one)
    w.reconcile(d, "over", acting=True)  # pins its verdict
    d.add("stopping", "main", 0, "running", roles=one)
    daemon.pin_verdict(d, daemon.fetch(d, "stopping"), AppState.CANCELLED, "cancelled by user")  # type: ignore[arg-type]
    d.add("waiting", "main", 0, "created", roles=one, deps="live", started=False)
    d.create_volume("x.verdict", labels={daemon.L_SCHEDULER: daemon.SCHEDULER, daemon.L_APP_ID: "y",
                                         daemon.L_VERDICT: "true"})  # a name that is not y's: not read as y's
    reads: list[str] = []
    real_containers, real_volumes = d.containers, d.volumes
    d.containers = lambda **kw: reads.append("containers") or real_containers(**kw)  # type: ignore[method-assign]
    d.volumes = lambda **kw: reads.append("volumes") or real_volumes(**kw)  # type: ignore[method-assign]
    inv = inventory.read(d)
    assert reads == ["volumes", "containers"]
    assert inv.app_ids == ["waiting", "stopping", "over", "live"]  # the newest first
    assert sorted(inv.ended()) == ["over"] and inv.ended()["over"].state == AppState.FAILED
    for app in inv.app_ids:
        assert inv.snapshot(d, app) == daemon.fetch(d, app)
        by_inventory = w.reconcile(d, app, acting=False, snap=inv.snapshot(d, app))
        alone = w.reconcile(d, app, acting=False)
        assert by_inventory is not None and alone is not None
        assert (by_inventory.state, by_inventory.msg) == (alone.state, alone.msg), app
    assert inv.snapshot(d, "nope") is None


def test_prune_deletes_apps_that_are_over_from_one_read_and_the_others_as_delete_does(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """delete_apps (prune): an app that is over loses its containers, verdict, leases and readiness
    records by the ids of one read of the daemon; a live one is cancelled first, as delete does;
    someone else's volume whose name collides stays."""
    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path))
    d = FakeDaemon()
    one = [{"name": "main", "num_replicas": 1}]
    d.add("over", "main", 0, "exited", 3, roles=one)
    w.reconcile(d, "over", acting=True)
    d.create_volume("over.watcher-3", labels={leases.L_LEASE: "over", leases.L_EPOCH: "3"})
    d.create_volume(readiness.record_name("over", "main", 0, 1), labels={readiness.L_READY: "over"})
    d.create_volume("theirs", labels={leases.L_LEASE: "over"})  # not named as the app's: not ours
    d.add("live", "main", 0, "running", roles=one)
    s = DockerJobsScheduler("s")
    s._client = d
    reads: list[str] = []
    real_containers = d.containers
    d.containers = lambda **kw: reads.append("containers") or real_containers(**kw)  # type: ignore[method-assign]
    outcome: dict[str, Optional[Exception]] = {}
    s.delete_apps(["over"], lambda a, e: outcome.setdefault(a, e))
    assert reads == ["containers"]  # one read for all the apps that are over, whatever their number
    assert "over-main-0" not in d.containers_ and sorted(d.vols) == ["theirs"]
    s.delete_apps(["live", "gone"], lambda a, e: outcome.setdefault(a, e))
    assert outcome == {"over": None, "live": None, "gone": None}
    assert not d.containers_ and sorted(d.vols) == ["theirs"]
    assert ("stop", "live-main-0", 5) in d.calls  # the live one was cancelled before its removal
