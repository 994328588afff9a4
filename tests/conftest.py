"""Test-session plumbing: testbed env files, an isolated TORCHX_EXT_HOME, and "a skip fails in CI"."""

from __future__ import annotations

import glob
import os
import shlex
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_testbed_env() -> None:
    """Reads ``testbed/.state/*.env`` (written by ``testbed/<backend>.sh start``) into os.environ."""
    for path in sorted(glob.glob(os.path.join(ROOT, "testbed", ".state", "*.env"))):
        with open(path) as f:
            for line in f:
                words = shlex.split(line, comments=True)
                if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                    key, _, value = words[1].partition("=")
                    os.environ.setdefault(key, value)


_load_testbed_env()
# every app of this session (and of the CLI subprocesses it starts) lives in a throwaway home
os.environ["TORCHX_EXT_HOME"] = tempfile.mkdtemp(prefix="torchx_ext_test_home_")

# as in an activated venv: replicas find the venv's tools (torchrun, torchx) on PATH
_VENV_BIN = os.path.dirname(os.path.abspath(__import__("sys").executable))
if _VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def live_processes(env: tuple[bytes, ...] = (), argv: tuple[bytes, ...] = ()) -> list[int]:
    """Live (not zombie) pids whose environment holds one of ``env`` (e.g. ``b"KEY=value\\0"``)
    or whose command line holds one of ``argv``; read from /proc (ps truncates)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except (OSError, IndexError):
            continue
        if any(n in environ for n in env) or any(n in cmdline for n in argv):
            pids.append(int(entry))
    return pids


def process_lineage(pids: list[int]) -> str:
    """Each pid with its ancestors (pid, state, command line): what a failure message needs to
    tell which process held a leftover alive."""
    def one(pid: int) -> tuple[str, int]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
            return f"{pid} {fields[0]} {cmd}", int(fields[1])
        except (OSError, IndexError, ValueError):
            return f"{pid} gone", 0
    out = []
    for pid in pids:
        chain, cur = [], pid
        for _ in range(6):
            text, cur = one(cur)
            chain.append(text)
            if cur <= 1:
                break
        out.append(" <- ".join(chain))
    return "; ".join(out)


def require_backend(env_var: str, what: str) -> str:
    """The testbed value for a backend; skips outside CI, fails in CI (no backend may skip there)."""
    value = os.environ.get(env_var)
    if not value:
        msg = f"{what} testbed is not running ({env_var} unset): run testbed/*.sh start, or bash test.sh"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        # CI runs every backend: a skip there means a test silently did not run
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"
