"""The support matrix: every AppDef/Role/Resource field classified by every scheduler, refusals before
anything starts, names and bytes as data. Dry-runs only (no engine); the real engines are in the
contract suite (tests/contract.py)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from torchx.runner import get_runner
from torchx.specs import AppDef, BindMount, Resource, Role, VolumeMount

from torchx_ext.errors import InvalidAppError
from torchx_ext.support import HONOURED, IGNORED, REFUSED, markdown, torchx_fields
from torchx_ext.support_tables import all_matrices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULERS = ["host", "slurm_jobs", "docker_jobs", "ray_jobs"]
CFG: dict[str, dict[str, Any]] = {"ray_jobs": {"dashboard_url": "http://127.0.0.1:8265"}}


def role(name: str = "main", **kw: Any) -> Role:
    kw.setdefault("resource", Resource(cpu=1, gpu=0, memMB=128))
    return Role(name=name, image="/tmp", entrypoint="echo", args=["hi"], **kw)


def dryrun(scheduler: str, app: AppDef, **cfg: Any) -> Any:
    return get_runner().dryrun(app, scheduler, {**CFG.get(scheduler, {}), **cfg})


def test_every_field_of_the_installed_torchx_is_classified_by_every_scheduler() -> None:
    # a field a future TorchX adds fails here until each scheduler says what it does with it
    for scheduler, matrix in all_matrices().items():
        missing = [f for f in torchx_fields() if f not in matrix]
        assert not missing, f"{scheduler} does not classify {missing}"
        for key, support in matrix.items():
            assert support.kind in (HONOURED, REFUSED, IGNORED), (scheduler, key)
            assert support.kind == HONOURED or support.note, f"{scheduler} {key}: say why / what instead"


def test_readme_shows_the_matrix_of_the_code() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = "<!-- support-matrix:start -->\n", "<!-- support-matrix:end -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown == markdown(all_matrices()), "stale: python -m torchx_ext.support_tables --update README.md"


def _refusals() -> list[tuple[str, str, AppDef]]:
    fields = {f.name for f in dataclasses.fields(Role)}
    cases: list[tuple[str, str, AppDef]] = []
    for scheduler in SCHEDULERS:
        matrix = all_matrices()[scheduler]

        def add(key: str, app: AppDef, sched: str = scheduler) -> None:
            cases.append((sched, key, app))

        # every scheduler restarts: a negative budget and a policy no group can honour are refused
        add("Role.max_retries", AppDef("a", roles=[role(max_retries=-1)]))
        add("Role.retry_policy", AppDef("a", roles=[role(max_retries=1, retry_policy="HOT_SPARE")]))
        add("Role.min_replicas", AppDef("a", roles=[role(num_replicas=2, min_replicas=1)]))
        if "base_image" in fields:
            add("Role.base_image", AppDef("a", roles=[role(base_image="old")]))
        if "overrides" in fields:
            add("Role.overrides", AppDef("a", roles=[role(overrides={"spec": 1})]))
        if matrix["Role.mounts"].kind == REFUSED:
            add("Role.mounts", AppDef("a", roles=[role(mounts=[BindMount("/src", "/dst")])]))
        if matrix["Resource.capabilities"].kind == REFUSED:
            add("Resource.capabilities",
                AppDef("a", roles=[role(resource=Resource(cpu=1, gpu=0, memMB=1, capabilities={"x": 1}))]))
        if matrix["Resource.devices"].kind == REFUSED:
            add("Resource.devices", AppDef("a", roles=[role(
                resource=Resource(cpu=1, gpu=0, memMB=1, devices={"vpc.amazonaws.com/efa": 1}))]))
    cases.append(("slurm_jobs", "Role.mounts", AppDef("a", roles=[role(mounts=[VolumeMount("vol", "/v")])])))
    cases.append(("slurm_jobs", "Resource.capabilities", AppDef("a", roles=[role(
        resource=Resource(cpu=1, gpu=0, memMB=1, capabilities={"node.kubernetes.io/instance-type": "p3"}))])))
    cases.append(("docker_jobs", "Resource.devices", AppDef("a", roles=[role(
        resource=Resource(cpu=1, gpu=0, memMB=1, devices={"no.such/device": 1}))])))
    return cases


@pytest.mark.parametrize("scheduler, key, app", _refusals(), ids=lambda x: x if isinstance(x, str) else "")
def test_refused_values_fail_the_dryrun_naming_field_and_scheduler(scheduler: str, key: str, app: AppDef) -> None:
    with pytest.raises(InvalidAppError, match=key.replace(".", r"\.")) as raised:
        dryrun(scheduler, app)
    assert scheduler in str(raised.value) or key.startswith("Role.m") or key in str(raised.value)


def test_what_components_set_by_default_is_never_refused() -> None:
    from torchx.components import dist, utils

    for scheduler in SCHEDULERS:
        dryrun(scheduler, utils.echo(msg="hi"))
        dryrun(scheduler, utils.sh("true"))
        dryrun(scheduler, dist.ddp(script="train.py", j="1x2"))


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", ".", "a\nb", "tab\there", "back\\slash"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_role_names_are_data_not_paths(scheduler: str, name: str) -> None:
    with pytest.raises(InvalidAppError, match="a role name is data"):
        dryrun(scheduler, AppDef("a", roles=[role(name)]))


@pytest.mark.parametrize("scheduler, names, what", [
    (s, ("a-b", "a_b"), "TORCHX_EXT_HOSTS_A_B") for s in SCHEDULERS
] + [("docker_jobs", ("a", "-a"), "container name"), ("docker_jobs", ("x", "x-"), "container name")])
def test_names_that_meet_on_a_backend_are_refused_naming_both(scheduler: str, names: tuple[str, str], what: str) -> None:
    with pytest.raises(InvalidAppError, match=what) as raised:
        dryrun(scheduler, AppDef("a", roles=[role(n) for n in names]))
    assert all(f"'{n}'" in str(raised.value) for n in names), raised.value


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_bytes_no_process_can_receive_are_refused(scheduler: str) -> None:
    for bad, what in [
        (role(env={"OK": "a\0b"}), "NUL"),
        (role(env={"NAME\n": "x"}), "invalid environment variable name"),
        (Role("main", image="/tmp", entrypoint="ec\0ho"), "entrypoint holds a NUL"),
        (Role("main", image="/tmp", entrypoint="echo", args=["fine", "x\0y"]), r"args\[1\] holds a NUL"),
    ]:
        with pytest.raises(InvalidAppError, match=what):
            dryrun(scheduler, AppDef("a", roles=[bad]))


def test_docker_request_publishes_ports_and_mounts_named_devices() -> None:
    web = role("web", port_map={"http": 8080},
               resource=Resource(cpu=1, gpu=0, memMB=64, devices={"vpc.amazonaws.com/efa": 2}))
    req = dryrun("docker_jobs", AppDef("a", roles=[web]), publish_host="0.0.0.0").request
    c = req.containers[0]
    assert c.ports == {"http": 8080} and req.host["publish_host"] == "0.0.0.0"
    assert c.devices == ["/dev/infiniband/uverbs0:/dev/infiniband/uverbs0:rwm",
                         "/dev/infiniband/uverbs1:/dev/infiniband/uverbs1:rwm"]


def test_slurm_script_has_features_gres_and_pyxis_mounts() -> None:
    r = role(resource=Resource(cpu=1, gpu=0, memMB=64, capabilities={"bigmem": True, "shard": 2}),
             mounts=[BindMount("/data", "/mnt/data", read_only=True)])
    script = repr(dryrun("slurm_jobs", AppDef("a", roles=[r]), constraint="x86", container_image="img.sqsh").request)
    assert "#SBATCH \"--constraint=x86&bigmem\"" in script and "#SBATCH --gres=shard:2" in script
    assert "--container-mounts=/data:/mnt/data:ro" in script
    with pytest.raises(InvalidAppError, match="need a container"):
        dryrun("slurm_jobs", AppDef("a", roles=[r]))
