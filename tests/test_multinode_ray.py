"""``ray_jobs`` on a three-node Ray cluster whose nodes have their own addresses
(``testbed/ray_multinode.sh``: head 198.18.0.10 in namespace txe-rh, workers 198.18.0.11/.12 in
txe-rw1/txe-rw2): discovery across node addresses with real TCP connections, placement strategies
read back from where each replica ran, and the loss of a worker node under a running gang.

Every replica prints ``ran-on <its node address>``; the tests print what they saw (addresses,
the state at each poll) so a CI log records it."""

from __future__ import annotations

import os
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

from conftest import live_processes, process_lineage, require_backend
from contract import logs, wait_terminal
from multinode import ALLREDUCE, CONNECT_ONCE, DISCOVERY, LATE_SERVER, PORT, WHERE
from torchx_ext.groups import mark_service

SMALL = Resource(cpu=1, gpu=0, memMB=64)
TIMEOUT = 90.0
TERMINAL = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}


# A replica that says where it ran, then (attempt 1) sleeps until the file argv[1] exists;
# later attempts end at once.
SLEEPER = WHERE + r"""
import os, sys, time
print("ran-on", me(), "attempt", os.environ.get("TORCHX_EXT_ATTEMPT"), "hosts", os.environ.get("TORCHX_EXT_HOSTS_G"), flush=True)
deadline = time.time() + 120
while os.environ.get("TORCHX_EXT_ATTEMPT", "1") == "1" and not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.2)
"""


def dashboard() -> str:
    return require_backend("TORCHX_EXT_TEST_RAYMN_DASHBOARD", "multi-node Ray")


def workers() -> dict[str, tuple[str, str]]:
    """address -> (node name, namespace) of the worker nodes"""
    out = {}
    for item in os.environ["TORCHX_EXT_TEST_RAYMN_WORKERS"].split(","):
        name, ns, ip = item.split("=")
        out[ip] = (name, ns)
    return out


def script(*args: str) -> None:
    # the script restarts a node with the Ray the cluster was started with (not this test's venv)
    r = subprocess.run(["bash", os.environ["TORCHX_EXT_TEST_RAYMN_SCRIPT"], *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"ray_multinode.sh {' '.join(args)}: {r.stdout}{r.stderr}"


def app_processes(handle: str) -> list[int]:
    app_id = handle.rsplit("/", 1)[-1]
    return live_processes((f"TORCHX_EXT_APP_ID={app_id}\0".encode(),))


def nothing_running(handle: str, timeout: float = 15) -> bool:
    deadline = time.time() + timeout
    while app_processes(handle) and time.time() < deadline:
        time.sleep(0.3)
    return not app_processes(handle)


def ran_on(runner: Runner, handle: str, role: str, k: int) -> list[str]:
    """The node address of each attempt of replica ``k`` of ``role``, from its log."""
    return [line.split()[1] for line in logs(runner, handle, role, k).splitlines() if line.startswith("ran-on ")]


def role(name: str, code: str, *args: str, replicas: int = 1, **kw: Any) -> Role:
    return Role(name=name, image="", entrypoint=sys.executable, args=["-c", code, *args],
                num_replicas=replicas, resource=SMALL, **kw)


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


def run(runner: Runner, app: AppDef, strategy: str) -> str:
    return runner.run(app, "ray_jobs", {"dashboard_url": dashboard(), "placement_strategy": strategy,
                                        "placement_timeout_s": 60})


def poll_until_terminal(runner: Runner, handle: str, timeout: float, record: list[str], t0: float = 0.0) -> Any:
    """Polls every 0.5 s, recording each change of state (with seconds since ``t0``, default now)."""
    t0 = t0 or time.time()
    start = time.time()
    status = None
    while time.time() - start < timeout:
        status = runner.status(handle)
        assert status is not None, f"{handle} unknown after {time.time() - t0:.1f} s"
        if not record or not record[-1].endswith(status.state.name):
            record.append(f"{time.time() - t0:.1f}s {status.state.name}")
        if status.state in TERMINAL:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{handle} not terminal after {timeout:.0f} s; states {record}")


# ------------------------------------------------------------------------------ readiness ----
def test_a_service_on_another_node_is_probed_at_its_node_address(runner: Runner) -> None:
    """STRICT_SPREAD: the server and the client on two nodes; the driver (on the head) probes the
    server's port at its node's address, and the client, which connects once at its start, gets
    the answer only because it started after the server listened there."""
    server = mark_service(role("server", LATE_SERVER, port_map={"p": PORT}))
    app = AppDef(f"mn-ready-{uuid.uuid4().hex[:4]}", roles=[server, role("client", CONNECT_ONCE)])
    handle = run(runner, app, "STRICT_SPREAD")
    status = wait_terminal(runner, handle, TIMEOUT)
    out = {r: logs(runner, handle, r, 0) for r in ("server", "client")}
    print(f"\n[ray readiness] {handle}: {status.state.name}: {out}")
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    where = {r: next(line.split()[1] for line in out[r].splitlines() if line.startswith("ran-on ")) for r in out}
    assert where["server"] != where["client"] and all(ip.startswith("198.18.0.") for ip in where.values()), where
    assert f"GOT hello from {where['server']}" in out["client"], out


# ------------------------------------------------------------------------------ discovery ----
def test_discovery_two_roles_across_node_addresses(runner: Runner) -> None:
    """server (1) + client (2), STRICT_SPREAD: three replicas on three nodes; each sees the other
    role at node addresses and opens a TCP connection to each of them."""
    app = AppDef(f"mn-disc-{uuid.uuid4().hex[:4]}", roles=[role("server", DISCOVERY), role("client", DISCOVERY, replicas=2)])
    handle = run(runner, app, "STRICT_SPREAD")
    status = wait_terminal(runner, handle, TIMEOUT)
    out = {f"{r}/{k}": logs(runner, handle, r, k) for r, k in (("server", 0), ("client", 0), ("client", 1))}
    print(f"\n[discovery] {handle}: {status.state.name}")
    for who, text in out.items():
        print(f"[discovery] {who}: " + " | ".join(line for line in text.splitlines() if line.strip()))
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    where = {who: next(line.split()[1] for line in text.splitlines() if line.startswith("ran-on ")) for who, text in out.items()}
    assert len(set(where.values())) == 3, where
    assert all(ip.startswith("198.18.0.") for ip in where.values()), where
    first = next(line for line in out["server/0"].splitlines() if line.startswith("ran-on "))
    servers, clients = first.split()[3], first.split()[4]
    assert servers.split(",") == [where["server/0"]], (servers, where)
    assert clients.split(",") == [where["client/0"], where["client/1"]], (clients, where)
    # each side saw the connection arrive from the peer's node address
    assert sorted(line.split()[1] for line in out["server/0"].splitlines() if line.startswith("accepted-from")) == \
        sorted([where["client/0"], where["client/1"]])
    for c in ("client/0", "client/1"):
        assert [line.split()[1] for line in out[c].splitlines() if line.startswith("accepted-from")] == [where["server/0"]]




def test_gloo_all_reduce_across_two_nodes(runner: Runner) -> None:
    pytest.importorskip("torch")
    app = AppDef(f"mn-gloo-{uuid.uuid4().hex[:4]}", roles=[role("t", ALLREDUCE, replicas=2)])
    handle = run(runner, app, "STRICT_SPREAD")
    status = wait_terminal(runner, handle, TIMEOUT)
    out = [logs(runner, handle, "t", k) for k in (0, 1)]
    where = [ran_on(runner, handle, "t", k) for k in (0, 1)]
    sums = [[line for line in o.splitlines() if line.startswith("sum ")] for o in out]
    print(f"\n[ray gloo] {handle}: {status.state.name}: ran on {where}, {sums}")
    assert status.state == AppState.SUCCEEDED, f"{status}\n{out}"
    assert where[0] != where[1] and all(w[0].startswith("198.18.0.") for w in where), where
    assert sums == [["sum 3"], ["sum 3"]], out


# ------------------------------------------------------------------------------ placement ----
@pytest.mark.parametrize("strategy", ["STRICT_SPREAD", "PACK"])
def test_placement_strategy_read_back_from_the_replicas(runner: Runner, strategy: str, tmp_path: Any) -> None:
    flag = str(tmp_path / "go")
    open(flag, "w").close()  # the replicas end as soon as they said where they ran
    app = AppDef(f"mn-place-{uuid.uuid4().hex[:4]}", roles=[role("g", SLEEPER, flag, replicas=2)])
    handle = run(runner, app, strategy)
    status = wait_terminal(runner, handle, TIMEOUT)
    where = [ran_on(runner, handle, "g", k) for k in (0, 1)]
    print(f"\n[placement {strategy}] {handle}: {status.state.name}, replicas ran on {where}")
    assert status.state == AppState.SUCCEEDED, status
    ips = [w[0] for w in where]
    assert all(ip.startswith("198.18.0.") for ip in ips), ips
    if strategy == "PACK":
        assert ips[0] == ips[1], ips
    else:
        assert ips[0] != ips[1], ips


# ------------------------------------------------------------------------------ node loss ----
@pytest.fixture
def lost_node() -> Iterator[list[str]]:
    """Names of worker nodes a test killed: rejoined afterwards."""
    killed: list[str] = []
    yield killed
    for name in killed:
        script("start-node", name)


def _start_gang(runner: Runner, flag: str, **kw: Any) -> tuple[str, list[str]]:
    app = AppDef(f"mn-loss-{uuid.uuid4().hex[:4]}", roles=[role("g", SLEEPER, flag, replicas=2, **kw)])
    handle = run(runner, app, "SPREAD")
    deadline = time.time() + TIMEOUT
    ips: list[str] = []
    while time.time() < deadline:
        ips = [ran_on(runner, handle, "g", k)[:1] for k in (0, 1)]  # type: ignore[misc]
        if all(ips):
            return handle, [i[0] for i in ips]  # type: ignore[index]
        status = runner.status(handle)
        assert status is not None and status.state not in TERMINAL, status
        time.sleep(0.3)
    raise AssertionError(f"{handle}: replicas never said where they ran")


def _kill_a_worker_with_a_replica(ips: list[str], killed: list[str]) -> tuple[int, str, str]:
    on_worker = [(k, ip) for k, ip in enumerate(ips) if ip in workers()]
    assert on_worker, f"no replica on a worker node: {ips}"
    k, ip = on_worker[-1]
    name, ns = workers()[ip]
    killed.append(name)
    script("kill-node", name)
    return k, ip, ns


def test_node_loss_without_retries_fails_naming_the_node(runner: Runner, lost_node: list[str], tmp_path: Any) -> None:
    handle, ips = _start_gang(runner, str(tmp_path / "go"))
    k, ip, ns = _kill_a_worker_with_a_replica(ips, lost_node)
    states: list[str] = []
    status = poll_until_terminal(runner, handle, 60, states)
    print(f"\n[node loss, no retries] {handle}: replicas on {ips}; killed {ns} ({ip}) holding replica {k}; "
          f"states per poll: {states}; final: {status.state.name}: {status.msg}")
    assert status.state == AppState.FAILED, status
    assert ip in status.msg, f"the message does not name the lost node {ip}: {status.msg}"
    assert all(s.split()[1] in ("RUNNING", "FAILED") for s in states), states
    assert nothing_running(handle), process_lineage(app_processes(handle))


def test_node_loss_with_replica_retries_replaces_the_replica(runner: Runner, lost_node: list[str], tmp_path: Any) -> None:
    flag = str(tmp_path / "go")
    handle, ips = _start_gang(runner, flag, max_retries=2, retry_policy=RetryPolicy.REPLICA)
    k, ip, ns = _kill_a_worker_with_a_replica(ips, lost_node)
    states: list[str] = []
    t0 = time.time()
    again: list[str] = []
    while time.time() - t0 < 60:  # the lost replica runs again, on a node that is still there
        status = runner.status(handle)
        assert status is not None
        if not states or not states[-1].endswith(status.state.name):
            states.append(f"{time.time() - t0:.1f}s {status.state.name}")
        assert status.state not in TERMINAL, f"{status}; states {states}"
        again = ran_on(runner, handle, "g", k)
        if len(again) > 1:
            break
        time.sleep(0.5)
    open(flag, "w").close()
    status = poll_until_terminal(runner, handle, 60, states, t0)
    print(f"\n[node loss, REPLICA retries] {handle}: replicas on {ips}; killed {ns} ({ip}) holding replica {k}; "
          f"replica {k} ran on {again}; states per poll: {states}; final: {status.state.name}: {status.msg}")
    assert len(again) == 2 and again[1] != ip and again[1].startswith("198.18.0."), again
    # the restarted replica's discovery variables name where it runs now
    hosts = [line.split()[5] for line in logs(runner, handle, "g", k).splitlines() if line.startswith("ran-on ")]
    print(f"[node loss, REPLICA retries] TORCHX_EXT_HOSTS_G of replica {k} per attempt: {hosts}")
    assert hosts[1].split(",")[k] == again[1], hosts
    assert status.state == AppState.SUCCEEDED, f"{status}; states {states}"
    assert all(s.split()[1] in ("RUNNING", "PENDING", "SUCCEEDED") for s in states), states
    assert nothing_running(handle), process_lineage(app_processes(handle))
    script("start-node", lost_node[-1])  # the lost node comes back: nothing of the app runs again
    time.sleep(2)
    assert len(ran_on(runner, handle, "g", k)) == 2 and not app_processes(handle), ran_on(runner, handle, "g", k)
    assert runner.status(handle).state == AppState.SUCCEEDED  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ partition ----
@pytest.fixture
def cut_node() -> Iterator[list[str]]:
    """Names of worker nodes a test cut off: healed and (if Ray dropped them) rejoined afterwards."""
    cut: list[str] = []
    yield cut
    for name in cut:
        script("heal", name)
        script("start-node", name)


def _partition(runner: Runner, tmp_path: Any, cut: list[str], cancel_at: float) -> None:
    handle, ips = _start_gang(runner, str(tmp_path / "go"))
    on_worker = [(k, ip) for k, ip in enumerate(ips) if ip in workers()]
    assert on_worker, f"no replica on a worker node: {ips}"
    k, ip = on_worker[-1]
    name, ns = workers()[ip]
    cut.append(name)
    script("cut", name)
    t0 = time.time()
    states: list[str] = []
    cancelled = False
    while time.time() - t0 < 20:
        status = runner.status(handle)
        assert status is not None
        if not states or not states[-1].endswith(status.state.name):
            states.append(f"{time.time() - t0:.1f}s {status.state.name}")
        if cancel_at and not cancelled and time.time() - t0 >= cancel_at:
            runner.cancel(handle)
            cancelled = True
            states.append(f"{time.time() - t0:.1f}s (cancel)")
        time.sleep(0.5)
    script("heal", name)
    states.append(f"{time.time() - t0:.1f}s (healed)")
    open(tmp_path / "go", "w").close()  # the replicas may end now
    status = poll_until_terminal(runner, handle, 60, states, t0)
    left = nothing_running(handle, timeout=30)
    what = f", cancel at {cancel_at:g}s" if cancel_at else ""
    print(f"\n[partition{what}] {handle}: replicas on {ips}; "
          f"cut {ns} ({ip}, replica {k}) for 20 s; states per poll: {states}; final: {status.state.name}: {status.msg}; "
          f"replica {k} ran on {ran_on(runner, handle, 'g', k)}; app processes left: {app_processes(handle)}")
    seen = [s.split()[1] for s in states if not s.split()[1].startswith("(")]
    # never back from a terminal state, never PENDING again after RUNNING without a restart policy
    assert not any(a in TERMINAL_NAMES and b != a for a, b in zip(seen, seen[1:], strict=False)), states
    assert len(ran_on(runner, handle, "g", k)) == 1, "the cut replica ran twice"
    # the cut replica was never lost: the app ends as if nothing happened (the driver used to call
    # the ActorUnavailableError it got after the link healed a lost actor and fail the app)
    assert status.state == (AppState.CANCELLED if cancel_at else AppState.SUCCEEDED), f"{status}; states {states}"
    assert left, process_lineage(app_processes(handle))


TERMINAL_NAMES = {s.name for s in TERMINAL}


def test_partition_of_a_node_for_20s(runner: Runner, cut_node: list[str], tmp_path: Any) -> None:
    _partition(runner, tmp_path, cut_node, cancel_at=0)


def test_cancel_during_a_partition_leaves_nothing_running_after_it_heals(
        runner: Runner, cut_node: list[str], tmp_path: Any) -> None:
    _partition(runner, tmp_path, cut_node, cancel_at=5)
