"""Installing torchx-ext must leave every built-in scheduler and component of torchx working."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import torchx.schedulers as ts

from torchx_ext import _builtin_entry_points as bep

TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
OURS = {"host", "slurm_jobs", "docker_jobs", "ray_jobs"}


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHX, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        # torchx 0.7.0's own ray module raises NameError without ray installed, with or
        # without torchx-ext: that built-in is broken "exactly as before", not by us
        return False


def test_every_builtin_scheduler_is_listed_once_with_ours() -> None:
    code = "from torchx.schedulers import get_scheduler_factories as g; print(' '.join(g()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    listed = out.stdout.split()
    builtins = set(ts.DEFAULT_SCHEDULER_MODULES)
    assert builtins <= set(listed), f"missing built-ins: {builtins - set(listed)}"
    assert OURS <= set(listed)
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    for name in listed:
        module = ts.DEFAULT_SCHEDULER_MODULES.get(name)
        if module and not _importable(module):
            continue
        opts = _cli("runopts", name)
        assert opts.returncode == 0 and "usage" in opts.stdout, f"runopts {name}: {opts.stderr}"


def test_default_scheduler_is_unchanged() -> None:
    # torchx 0.7.0: the built-ins come first in our synthetic distribution; the nightly puts plugins
    # first, so our plugin module registers TorchX's own default first (torchx_plugins/schedulers)
    assert ts.get_default_scheduler_name() == next(iter(ts.DEFAULT_SCHEDULER_MODULES))
    factory = ts.get_scheduler_factories()[ts.get_default_scheduler_name()]
    assert type(factory("t")).__module__ == ts.DEFAULT_SCHEDULER_MODULES[ts.get_default_scheduler_name()]


def test_registered_through_the_nightlys_plugin_registry_once() -> None:
    if importlib.util.find_spec("torchx.plugins") is None:
        # torchx 0.7.0: entry points only, from the synthetic distribution (not a static one)
        names = [ep.name for ep in importlib.metadata.entry_points().select(group="torchx.schedulers")]
        assert OURS <= set(names) and len(names) == len(set(names)), names
        return
    # namespace packages only (the nightly's opt-out of the deprecated entry points): still there
    code = ("from torchx import plugins; r = plugins.registry(); "
            "print(' '.join(r.get(plugins.PluginType.SCHEDULER))); print(len(r.load_errors()))")
    for source in ("1", "3"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TORCHX_PLUGINS_SOURCE": source})
        names, errors = out.stdout.split("\n")[:2]
        assert OURS <= set(names.split()), (source, out.stdout, out.stderr)
        assert errors == "0" and "both" not in out.stderr, (source, out.stdout, out.stderr)


def test_no_entry_point_names_a_missing_module() -> None:
    for ep in importlib.metadata.entry_points().select(group="torchx.schedulers"):
        # existence only: some built-ins import optional deps (boto3, ray) at module level
        assert importlib.util.find_spec(ep.module) is not None, f"{ep.name} -> {ep.value} does not exist"


def test_local_cwd_still_runs(tmp_path: str) -> None:
    # the app outlives its output by a second: torchx's own local_cwd log tail loses the output
    # of an app that exits at once (its combined.log is copied by a Tee thread that may not have
    # run when describe() says SUCCEEDED; seen 4 times in 12 with torchx 0.7.0 alone installed)
    out = _cli("run", "-s", "local_cwd", "utils.sh", "sh", "-c", "echo hi; sleep 1", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "sh/0 hi" in out.stdout + out.stderr  # the nightly logs to stderr


def test_builtin_components_are_still_there() -> None:
    out = _cli("builtins")
    assert out.returncode == 0, out.stderr
    for name in ("utils.echo", "utils.sh", "dist.ddp", "group.server_client", "group.roles"):
        assert f" {name}\n" in out.stdout + "\n", out.stdout


def test_finder_lists_nothing_for_a_merging_torchx(tmp_path: str) -> None:
    os.makedirs(tmp_path / "plugins")
    (tmp_path / "plugins" / "__init__.py").write_text("")
    assert bep.builtin_scheduler_entry_points(str(tmp_path)) == {}


def test_finder_skips_builtins_whose_module_is_missing(tmp_path: str) -> None:
    os.makedirs(tmp_path / "schedulers")
    (tmp_path / "schedulers" / "__init__.py").write_text(
        'DEFAULT_SCHEDULER_MODULES = {"local_cwd": "torchx.schedulers.local_scheduler",'
        ' "ray": "torchx.schedulers.ray_scheduler"}\n'
    )
    (tmp_path / "schedulers" / "local_scheduler.py").write_text("")
    assert bep.builtin_scheduler_entry_points(str(tmp_path)) == {
        "local_cwd": "torchx.schedulers.local_scheduler:create_scheduler"
    }
