"""``slurm_jobs`` on a Slurm cluster whose two nodes have their own addresses
(``testbed/slurm_multinode.sh``: slurmctld 198.18.0.20, n1 198.18.0.21 in namespace txe-sn1, n2
198.18.0.22 in txe-sn2; its own slurm.conf, passed to every Slurm command as ``SLURM_CONF``):
discovery across the node addresses with real TCP connections, a gloo all-reduce across the two
nodes, and the loss of a node under a running gang.

Every replica prints ``ran-on <its node address>``; the tests print what they saw."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator

import pytest
from torchx.runner import Runner, get_runner
from torchx.specs import AppDef, AppState, Resource, RetryPolicy, Role

from conftest import require_backend
from contract import logs, wait_terminal
from multinode import ALLREDUCE, CONNECT_ONCE, DISCOVERY, LATE_SERVER, PORT, WHERE
from torchx_ext.groups import mark_service

SMALL = Resource(cpu=1, gpu=0, memMB=300)
TIMEOUT = 90.0
TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}
SCANCEL = shutil.which("scancel") or "/usr/bin/scancel"


SLEEPER = WHERE + r"""
import os, sys, time
print("ran-on", me(), flush=True)
deadline = time.time() + 120
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.2)
"""



@pytest.fixture(autouse=True)
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, tuple[str, str]]]:
    """Points every Slurm command of this test (and of the processes it starts) at the
    multi-node cluster; returns address -> (node, namespace)."""
    conf = require_backend("TORCHX_EXT_TEST_SLURMMN_CONF", "multi-node Slurm")
    monkeypatch.setenv("SLURM_CONF", conf)
    out = {}
    for item in os.environ["TORCHX_EXT_TEST_SLURMMN_NODES"].split(","):
        name, ns, ip = item.split("=")
        out[ip] = (name, ns)
    yield out
    # nothing a failed test left may block the next one (this cluster runs only these tests, its
    # one partition: root's jobs and the login user's); by path, as a test may hide Slurm from PATH
    subprocess.run([SCANCEL, "-p", os.environ["TORCHX_EXT_TEST_SLURMMN_PARTITION"]], capture_output=True, timeout=30)


@pytest.fixture(autouse=True)
def own_home(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This module's apps are recorded in a home of their own: the other clusters' tests (whose
    list asks every cluster a home knows) never see these clusters. Short: ssh's control sockets
    live there."""
    path = tempfile.mkdtemp(prefix="txm")
    monkeypatch.setenv("TORCHX_EXT_HOME", path)
    yield
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = get_runner()
    yield r
    r.close()


def role(name: str, code: str, *args: str, replicas: int = 1, **kw: Any) -> Role:
    return Role(name=name, image="", entrypoint=sys.executable, args=["-c", code, *args],
                num_replicas=replicas, resource=SMALL, **kw)


def run(runner: Runner, app: AppDef, tmp_path: Any, **cfg: Any) -> str:
    return runner.run(app, "slurm_jobs", {"partition": os.environ["TORCHX_EXT_TEST_SLURMMN_PARTITION"],
                                          "job_dir": str(tmp_path / "jobs"), **cfg})


def ran_on(runner: Runner, handle: str, name: str, k: int) -> list[str]:
    return [line.split()[1] for line in logs(runner, handle, name, k).splitlines() if line.startswith("ran-on ")]


def ns_processes(app_id: str, namespaces: list[str]) -> list[int]:
    """Pids in the nodes' namespaces belonging to job ``app_id`` (job ids of this cluster start at
    700000, apart from the single-node cluster's)."""
    pids = []
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if f"SLURM_JOB_ID={app_id}\0".encode() in env or f"TORCHX_EXT_APP_ID={app_id}\0".encode() in env:
                pids.append(int(pid))
    return pids


def script(*args: str) -> None:
    r = subprocess.run(["bash", os.environ["TORCHX_EXT_TEST_SLURMMN_SCRIPT"], *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"slurm_multinode.sh {' '.join(args)}: {r.stdout}{r.stderr}"


# ------------------------------------------------------------------------------ discovery ----
def test_discovery_two_roles_across_node_addresses(runner: Runner, tmp_path: Any,
                                                   cluster: dict[str, tuple[str, str]]) -> None:
    app = AppDef(f"mn-disc-{uuid.uuid4().hex[:4]}", roles=[role("server", DISCOVERY), role("client", DISCOVERY, replicas=2)])
    # one heterogeneous job: Slurm gives its components distinct nodes (server on one, clients on the other)
    handle = run(runner, app, tmp_path)
    status = wait_terminal(runner, handle, TIMEOUT)
    out = {f"{r}/{k}": logs(runner, handle, r, k) for r, k in (("server", 0), ("client", 0), ("client", 1))}
    print(f"\n[slurm discovery] {handle}: {status.state.name}")
    for who, text in out.items():
        print(f"[slurm discovery] {who}: " + " | ".join(line for line in text.splitlines() if line.strip()))
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    where = {who: next(line.split()[1] for line in text.splitlines() if line.startswith("ran-on ")) for who, text in out.items()}
    assert set(where.values()) <= set(cluster), where
    assert where["server/0"] not in (where["client/0"], where["client/1"]), where
    first = next(line for line in out["server/0"].splitlines() if line.startswith("ran-on "))
    assert first.split()[3].split(",") == [where["server/0"]], (first, where)
    assert first.split()[4].split(",") == [where["client/0"], where["client/1"]], (first, where)
    assert sorted(line.split()[1] for line in out["server/0"].splitlines() if line.startswith("accepted-from")) == \
        sorted([where["client/0"], where["client/1"]])


# ------------------------------------------------------------------------------ readiness ----
def test_a_service_on_another_node_is_probed_at_its_node_address(runner: Runner, tmp_path: Any,
                                                                  cluster: dict[str, tuple[str, str]]) -> None:
    """The launcher runs on the client's node (the job's first component); the server's port is
    probed at the server node's address, across the boundary, before the client starts."""
    server = mark_service(role("server", LATE_SERVER, port_map={"p": PORT}))
    app = AppDef(f"mn-ready-{uuid.uuid4().hex[:4]}", roles=[role("client", CONNECT_ONCE), server])
    handle = run(runner, app, tmp_path)
    status = wait_terminal(runner, handle, TIMEOUT)
    out = {r: logs(runner, handle, r, 0) for r in ("server", "client")}
    print(f"\n[slurm readiness] {handle}: {status.state.name}: {out}")
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    where = {r: ran_on(runner, handle, r, 0)[0] for r in out}
    assert where["server"] != where["client"] and set(where.values()) <= set(cluster), where
    assert f"GOT hello from {where['server']}" in out["client"], out


# ------------------------------------------------------------------------------ gloo ---------
def test_gloo_all_reduce_across_two_nodes(runner: Runner, tmp_path: Any, cluster: dict[str, tuple[str, str]]) -> None:
    pytest.importorskip("torch")
    app = AppDef(f"mn-gloo-{uuid.uuid4().hex[:4]}", roles=[role("t", ALLREDUCE, replicas=2)])
    handle = run(runner, app, tmp_path, ntasks_per_node=1)
    status = wait_terminal(runner, handle, TIMEOUT)
    out = [logs(runner, handle, "t", k) for k in (0, 1)]
    print(f"\n[slurm gloo] {handle}: {status.state.name}: {[o.strip() for o in out]}")
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    assert [ran_on(runner, handle, "t", k)[0] for k in (0, 1)] == sorted(cluster)[:2]
    assert all("sum 3" in o for o in out), out


# ------------------------------------------------------------------------------ node loss ----
def test_node_loss_under_a_gang_fails_with_node_fail(runner: Runner, tmp_path: Any,
                                                      cluster: dict[str, tuple[str, str]]) -> None:
    flag = str(tmp_path / "go")
    app = AppDef(f"mn-loss-{uuid.uuid4().hex[:4]}", roles=[role("g", SLEEPER, flag, replicas=2)])
    handle = run(runner, app, tmp_path, ntasks_per_node=1)
    app_id = handle.rsplit("/", 1)[-1]
    deadline = time.time() + TIMEOUT
    ips: list[list[str]] = [[], []]
    while not all(ips) and time.time() < deadline:
        ips = [ran_on(runner, handle, "g", k) for k in (0, 1)]
        time.sleep(0.3)
    assert all(ips), f"{handle}: replicas never said where they ran"
    # the node of replica 1 (not the one running the batch script, which holds the job's record)
    ip = ips[1][0]
    name, ns = cluster[ip]
    try:
        script("kill-node", name)
        t0 = time.time()
        states: list[str] = []
        status = None
        while time.time() - t0 < 60:
            status = runner.status(handle)
            assert status is not None
            if not states or not states[-1].endswith(status.state.name):
                states.append(f"{time.time() - t0:.1f}s {status.state.name}")
            if status.state in TERMINAL:
                break
            time.sleep(0.5)
        assert status is not None
        left = []
        for _ in range(60):
            left = ns_processes(app_id, [n for _, n in cluster.values()])
            if not left:
                break
            time.sleep(0.5)
        job = subprocess.run(["scontrol", "show", "job", "-o", app_id], capture_output=True, text=True).stdout
        said = " ".join(re.findall(r"(?:JobState|Reason|NodeList)=\S+", job))
        print(f"\n[slurm node loss] {handle}: replicas on {[i[0] for i in ips]}; killed {ns} ({ip}, {name}); "
              f"states per poll: {states}; final: {status.state.name}: {status.msg}; "
              f"Slurm: {said}; left: {left}")
        assert status.state == AppState.FAILED, f"{status}; states {states}"
        # Slurm ends the whole job (NODE_FAIL); the message names the node that was lost (sinfo)
        # and the replica that ran there, and does not blame the one Slurm ended on the other node
        assert "NODE_FAIL" in status.msg and f"node {name} of the job" in status.msg, status.msg
        assert "role 'g' replica 1 ran there" in status.msg, status.msg
        assert "replica 0" not in status.msg, status.msg
        assert not left, left
    finally:
        open(flag, "w").close()
        script("start-node", name)


def test_node_loss_with_retries_requeues_and_runs_again(runner: Runner, tmp_path: Any,
                                                       cluster: dict[str, tuple[str, str]]) -> None:
    """With max_retries the app is submitted --requeue: Slurm requeues the job when a node of it
    fails; the state reads PENDING while it waits (not FAILED, not RUNNING) and the app runs again
    once a second node is back."""
    flag = str(tmp_path / "go")
    app = AppDef(f"mn-requeue-{uuid.uuid4().hex[:4]}",
                 roles=[role("g", SLEEPER, flag, replicas=2, max_retries=1, retry_policy=RetryPolicy.APPLICATION)])
    handle = run(runner, app, tmp_path, ntasks_per_node=1)
    app_id = handle.rsplit("/", 1)[-1]
    deadline = time.time() + TIMEOUT
    ips: list[list[str]] = [[], []]
    while not all(ips) and time.time() < deadline:
        ips = [ran_on(runner, handle, "g", k) for k in (0, 1)]
        time.sleep(0.3)
    assert all(ips), f"{handle}: replicas never said where they ran"
    ip = ips[1][0]
    name, ns = cluster[ip]
    states: list[str] = []
    t0 = time.time()

    def poll(until: Any, timeout: float) -> Any:
        end = time.time() + timeout
        while time.time() < end:
            status = runner.status(handle)
            assert status is not None
            if not states or not states[-1].endswith(status.state.name):
                states.append(f"{time.time() - t0:.1f}s {status.state.name}")
            if until(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"{handle}: states {states}")

    try:
        script("kill-node", name)
        poll(lambda s: s.state == AppState.PENDING or s.state in TERMINAL, 60)
        states.append(f"{time.time() - t0:.1f}s (node back)")
        script("start-node", name)
        # slurmctld tells the node that came back to end the job's previous run; released at once,
        # the next run's step there can get that SIGTERM (seen here): give it a moment
        time.sleep(3)
        # Slurm holds a requeued job ~120 s (BeginTime); release it now
        subprocess.run(["scontrol", "update", f"JobId={app_id}", "StartTime=now"], capture_output=True, timeout=30)
        poll(lambda s: s.state in TERMINAL or len(ran_on(runner, handle, "g", 1)) > 1, 90)
        open(flag, "w").close()
        status = poll(lambda s: s.state in TERMINAL, 60)
    finally:
        open(flag, "w").close()
        script("start-node", name)
    where = [ran_on(runner, handle, "g", k) for k in (0, 1)]
    print(f"\n[slurm node loss, retries] {handle}: killed {ns} ({ip}, {name}); replicas ran on {where}; "
          f"states per poll: {states}; final: {status.state.name} ({status.num_restarts} restarts): {status.msg}")
    seen = [s.split()[1] for s in states if not s.split()[1].startswith("(")]
    assert "FAILED" not in seen[:-1], states
    assert status.state == AppState.SUCCEEDED, f"{status}; states {states}"
    assert all(len(w) == 2 for w in where), where


# ------------------------------------------------------------------------------ remote -------
def test_remote_discovery_through_the_login_node(runner: Runner, cluster: dict[str, tuple[str, str]]) -> None:
    """Remote mode across an address boundary: the client (root namespace) reaches the login node
    (198.18.0.30, its own namespace) over SSH, which submits to the multi-node cluster; the group's
    replicas find each other at the node addresses. They run as the login user with the system
    Python (stdlib only)."""
    login = require_backend("TORCHX_EXT_TEST_SLURMMN_SSH_HOST", "multi-node Slurm login node")
    roles = [Role(name=n, image="", entrypoint="/usr/bin/python3", args=["-c", DISCOVERY], num_replicas=r,
                  resource=SMALL) for n, r in (("server", 1), ("client", 2))]
    handle = runner.run(AppDef(f"mn-remote-{uuid.uuid4().hex[:4]}", roles=roles), "slurm_jobs",
                        {"partition": os.environ["TORCHX_EXT_TEST_SLURMMN_PARTITION"], "login": login,
                         "ssh_config": os.environ["TORCHX_EXT_TEST_SLURMMN_SSH_CONFIG"]})
    status = wait_terminal(runner, handle, TIMEOUT)
    out = {f"{r}/{k}": logs(runner, handle, r, k) for r, k in (("server", 0), ("client", 0), ("client", 1))}
    print(f"\n[slurm remote discovery] {handle}: {status.state.name}")
    for who, text in out.items():
        print(f"[slurm remote discovery] {who}: " + " | ".join(line for line in text.splitlines() if line.strip()))
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    where = {who: next(line.split()[1] for line in text.splitlines() if line.startswith("ran-on ")) for who, text in out.items()}
    assert set(where.values()) <= set(cluster) and where["server/0"] != where["client/0"], where
