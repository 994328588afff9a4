"""``slurm_jobs`` in remote mode across an address boundary: the shared contract (the part that
crosses nodes) over SSH to the multi-node cluster's login node (``testbed/slurm_multinode.sh``:
sshd at 198.18.0.30 in namespace txe-sl, user ``txemn``; n1 198.18.0.21, n2 198.18.0.22).

The client (this process, and the ``torchx`` processes it starts) runs in the root namespace with
none of Slurm's commands on its PATH, so every query goes over SSH to the login node, which
submits to the cluster whose nodes have their own addresses. The rest of the contract, and what
only remote mode has (workspace shipping, SSH faults), runs against the loopback login node
(``test_slurm_jobs_remote.py``); what runs here is what differs when the nodes are apart.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from typing import Any

import pytest

from conftest import require_backend
from contract import Backend, SchedulerContract, contract_subset, torchx_cli
from test_multinode_slurm import SMALL, cluster, own_home  # noqa: F401  (autouse: this cluster, a home of its own)
from test_slurm_jobs_remote import REMOTE_PYTHON, _client_path_value, nothing_running

SCHEDULER = "slurm_jobs"


def _login() -> dict[str, str]:
    return {"login": require_backend("TORCHX_EXT_TEST_SLURMMN_SSH_HOST", "multi-node Slurm login node"),
            "ssh_config": os.environ["TORCHX_EXT_TEST_SLURMMN_SSH_CONFIG"],
            "partition": os.environ["TORCHX_EXT_TEST_SLURMMN_PARTITION"]}


def _login_home(cfg: dict[str, str]) -> str:
    """The login user's home: the replicas' working directory (the login node shares this
    machine's file system; only its network is its own)."""
    with open(cfg["ssh_config"]) as f:
        user = next(line.split()[1] for line in f if line.strip().startswith("User "))
    return pwd.getpwnam(user).pw_dir


@pytest.fixture
def client_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> str:
    """Slurm's commands off PATH for the test and the processes it starts: only the login node has them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = _client_path_value(str(bin_dir))
    monkeypatch.setenv("PATH", path)
    return path


@contract_subset(
    "test_submit_describe_log",
    "test_status_has_a_terminal_replica_status_per_replica",
    "test_discovery_env",
    "test_log_tail_follows_a_running_app_to_its_end",
    "test_cancel_and_list",
    "test_cancel_ends_every_process_the_replicas_started",
    "test_a_replica_killed_from_outside_fails_the_app_naming_it",
    "test_group_all_or_nothing",
    "test_a_replica_failing_once_is_restarted_under_its_policy",
    "test_service_stopped_when_main_roles_end",
    "test_server_client_component",
    "test_dependency_success",
)
class TestMultinodeRemoteSlurmContract(SchedulerContract):
    @pytest.fixture
    def backend(self, cluster: dict[str, tuple[str, str]], client_path: str) -> Backend:  # noqa: F811
        cfg = _login()

        def check_hosts(hosts: dict[str, list[str]]) -> None:
            # node addresses (never loopback), and the two roles (two components of one
            # heterogeneous job) on distinct nodes
            print(f"\n[slurm remote contract] discovery over {cfg['login']}: {hosts}")
            assert {h for v in hosts.values() for h in v} <= set(cluster), (hosts, sorted(cluster))
            assert not set(hosts["MODEL_SERVER"]) & set(hosts["CLIENT"]), hosts

        return Backend(scheduler=SCHEDULER, image=_login_home(cfg), python=REMOTE_PYTHON, cfg=cfg,
                       resource=SMALL, timeout=90.0, nothing_running=nothing_running, retries=True,
                       missing_app_id=f"{cfg['login']}:999998", check_hosts=check_hosts)


def _tree(top: str) -> list[tuple[str, int, int, float]]:
    """Every path under ``top`` with its mode, size and time ([] if missing)."""
    out = []
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, top), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime))
    return sorted(out)


def test_cli_dryrun_writes_nothing_and_connects_nowhere(client_path: str, tmp_path: Any) -> None:
    """``torchx run --dryrun`` to the login node's address: nothing recorded here (no record, no
    control socket), nothing copied there, and no ssh or rsync started at all (each is a shim on
    PATH that notes its calls; a real submission afterwards shows the shims are what runs)."""
    cfg = _login()
    calls = tmp_path / "calls"
    shims = tmp_path / "shims"
    shims.mkdir()
    for tool in ("ssh", "rsync"):
        real = os.path.join(client_path.split(os.pathsep)[1], tool)  # _client_path_value's links
        (shims / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >>{calls}\nexec {real} "$@"\n')
        (shims / tool).chmod(0o755)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "main.py").write_text("print('hi')\n")
    home = tempfile.mkdtemp(prefix="txd")  # short: ssh's control sockets would live there
    env = {"PATH": f"{shims}{os.pathsep}{client_path}", "TORCHX_EXT_HOME": home}
    remote = os.path.join(_login_home(cfg), ".torchx_ext")
    before = _tree(remote)
    plain = ",".join(f"{k}={v}" for k, v in cfg.items())
    args = ["run", "-s", SCHEDULER, "-cfg", plain, "--workspace", str(ws), "group.roles", "--image",
            _login_home(cfg), f"main={REMOTE_PYTHON} main.py"]
    try:
        proc = torchx_cli(["run", "--dryrun", *args[1:]], env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert f"# before sbatch: copy the workspace {ws} to {cfg['login']}:" in proc.stdout, proc.stdout
        assert not calls.exists(), calls.read_text()
        assert os.listdir(home) == [], os.listdir(home)
        assert _tree(remote) == before
        # the same without --dryrun does connect, through the shims
        proc = torchx_cli(args, env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "ssh" in calls.read_text(), proc.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
