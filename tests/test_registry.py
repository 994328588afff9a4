"""The open executor → scheduler lookup, including a third-party plugin torchx-ext never names."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from torchx_ext.errors import RegistrationError, UnknownExecutorError, UnknownOptionError
from torchx_ext.executors import Capabilities, Executor, ExecutorRegistry, option, runopts_for
from torchx_ext.schedulers.host.scheduler import HostExecutor

THIRDPARTY = os.path.join(os.path.dirname(__file__), "thirdparty")


def test_builtin_executors_registered_by_entry_point() -> None:
    reg = ExecutorRegistry()
    assert reg.scheduler_for(HostExecutor()) == "host"
    assert reg.capabilities("host").heterogeneous_groups
    assert reg.capabilities(HostExecutor).dependencies


def test_subclass_resolves_through_mro() -> None:
    @dataclass
    class MyHost(HostExecutor):
        extra: str = "x"

    assert ExecutorRegistry().scheduler_for(MyHost()) == "host"
    assert ExecutorRegistry().capabilities(MyHost).persistent_status


def test_unknown_executor_lists_registered() -> None:
    @dataclass
    class Stray(Executor):
        pass

    with pytest.raises(UnknownExecutorError, match=r"Registered executors: .*host \(torchx_ext"):
        ExecutorRegistry().scheduler_for(Stray)
    with pytest.raises(LookupError, match="no executor is registered for scheduler 'nope'"):
        ExecutorRegistry().executor_for("nope")


def test_register_by_call_on_a_fresh_registry() -> None:
    @dataclass
    class Mine(Executor):
        scheduler = "mine"
        capabilities = Capabilities(heterogeneous_groups=True)

    reg = ExecutorRegistry(load_entry_points=False)
    reg.register(Mine)
    assert reg.scheduler_for(Mine()) == "mine"
    assert reg.capabilities("mine") == Capabilities(heterogeneous_groups=True)
    assert reg.registered() == {"mine": Mine}


def test_executor_fields_are_the_run_options() -> None:
    names = {name for name, _ in runopts_for(HostExecutor)}
    assert names == {"dependencies", "job_dir", "auto_set_cuda_visible_devices", "gpu_count", "retry_backoff_s",
                     "ready_timeout_s"}
    ex = HostExecutor(dependencies=["host://s/a-1"], gpu_count=2)
    assert ex.to_run_args() == ("host", {"dependencies": ["host://s/a-1"], "gpu_count": 2,
                                         "auto_set_cuda_visible_devices": False, "retry_backoff_s": 0.0,
                                         "ready_timeout_s": 300.0})
    with pytest.raises(UnknownOptionError, match="Unknown option 'gpus'.*Valid options: .*gpu_count"):
        HostExecutor.from_cfg({"gpus": 1})


def test_third_party_plugin_lookup_and_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(THIRDPARTY)
    import acme_torchx

    reg = ExecutorRegistry()
    assert reg.scheduler_for(acme_torchx.AcmeExecutor(greeting="yo")) == "acme"

    @dataclass
    class Downstream(acme_torchx.AcmeExecutor):
        more: int = option(1, help="x")

    assert reg.scheduler_for(Downstream) == "acme"
    caps = reg.capabilities("acme")
    assert caps.persistent_status and not caps.heterogeneous_groups


def test_third_party_scheduler_runs_from_the_cli(tmp_path: str) -> None:
    env = dict(os.environ, PYTHONPATH=THIRDPARTY + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    out = subprocess.run([torchx, "runopts", "acme"], env=env, capture_output=True, text=True, timeout=120)
    assert "greeting" in out.stdout, out.stderr
    run = subprocess.run([torchx, "run", "-s", "acme", "utils.echo", "--msg", "from-acme"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    handle = run.stdout.strip().splitlines()[-1]
    assert handle.startswith("acme://")
    status = subprocess.run([torchx, "status", handle], env=env, capture_output=True, text=True, timeout=120)
    assert "SUCCEEDED" in status.stdout and "from-acme" in status.stdout, status.stdout + status.stderr


def test_register_refuses_to_replace_another_class_unless_asked() -> None:
    @dataclass
    class Impostor(Executor):
        scheduler = "host"

    reg = ExecutorRegistry()
    with pytest.raises(RegistrationError, match=r"scheduler 'host' already has executor .*HostExecutor.*clobber=True"):
        reg.register(Impostor)
    assert reg.executor_for("host") is HostExecutor
    reg.register(HostExecutor)  # the same class again: nothing to refuse
    reg.register(Impostor, clobber=True)
    assert reg.executor_for("host") is Impostor


def test_executor_from_cfg_keeps_zero_and_splits_lists() -> None:
    from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsExecutor

    ex = RayJobsExecutor.from_cfg({"placement_timeout_s": 0, "env_forward": "A,B", "preflight": False, "pip": None})
    assert ex.placement_timeout_s == 0 and ex.env_forward == ["A", "B"] and ex.preflight is False
    assert ex.pip is None and ex.request_timeout_s == 10  # unset: the dataclass default, the only one


def test_the_engine_timings_are_checked_once_for_every_scheduler() -> None:
    from torchx_ext.errors import InvalidOptionError
    from torchx_ext.executors import engine_timings

    assert engine_timings(HostExecutor(retry_backoff_s=1, ready_timeout_s=5)) == (1.0, 5.0)
    with pytest.raises(InvalidOptionError, match=r"retry_backoff_s=-1: a delay in seconds, >= 0"):
        engine_timings(HostExecutor(retry_backoff_s=-1))
    with pytest.raises(InvalidOptionError, match=r"ready_timeout_s=0: a time in seconds, > 0"):
        engine_timings(HostExecutor(ready_timeout_s=0))
