"""Examples are tests: every command block a user is meant to copy, in README.md and docs/, runs as written.

The convention, for whoever writes a page:

* Every fenced ``bash`` block of ``README.md`` and ``docs/**/*.md`` is run as written by
  ``bash -euo pipefail``, each in a new empty working directory with a new ``$TORCHX_EXT_HOME``,
  under a timeout (60 s), and must exit 0. Commands run on ``host`` for real.
  A shell block is always ``bash``: ``sh``/``shell``/``console``/``zsh`` fences are refused here, so
  nothing escapes the rule by its language; put output in a ``text`` fence.
* The HTML comment right before a fence (blank lines may separate them) can change that:

  * ``<!-- not run: REASON -->``: not run. For what cannot run in CI (it installs software,
    needs a real login node or a GPU, or takes minutes); the reason is required, and such
    blocks are kept few (:data:`MAX_NOT_RUN`).
  * ``<!-- run: ray -->``, ``<!-- run: slurm -->``, ``<!-- run: docker -->``: runs against that
    testbed (found through ``testbed/.state/*.env``, which tests/conftest.py loads). The page tells
    the reader to set these variables first, in a ``not run`` block; the test exports them:

      - ray: ``RAY_ADDRESS``, the testbed's dashboard URL (ray_jobs reads it, as for a user);
      - docker: ``IMAGE``, a local image with ``python3`` (nothing is ever pulled);
      - slurm: nothing (the testbed's partition is the default one).

    Without that testbed the block is skipped (a failure under ``CI=true``, as every skip).
  * ``timeout=N`` in the same comment (``<!-- run: ray, timeout=120 -->``) raises the timeout.
* A fence with ``title="NAME"`` (```` ```python title="my_app.py" ````, ```` ```ini
  title=".torchxconfig" ````) is a file the reader creates: it is written as NAME into the working
  directory of every later ``bash`` block of the same page.
* README.md's opening block (``bash demo.sh`` / ``bash test.sh``) is not run here: CI runs
  test.sh itself (running it here would recurse) and demo.sh installs a venv.

The scheduler pages' tables of run options (from the executors, the options' single source) and of
AppDef fields (from :mod:`torchx_ext.support`, as the README's matrix) are generated:
``python tests/test_docs.py --update`` rewrites them, and a test keeps them equal to the code.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TIMEOUT_S = 60
MAX_NOT_RUN = 14  # installs, a real login node, a GPU, minutes-long benchmarks: keep these few
SHELL_LANGS = {"sh", "shell", "console", "zsh", "shell-session"}
TESTBEDS: dict[str, tuple[str, Callable[[Mapping[str, str]], dict[str, str]]]] = {
    "ray": ("TORCHX_EXT_TEST_RAY_DASHBOARD", lambda e: {"RAY_ADDRESS": e["TORCHX_EXT_TEST_RAY_DASHBOARD"]}),
    "docker": ("TORCHX_EXT_TEST_DOCKER_PYTHON", lambda e: {"IMAGE": e["TORCHX_EXT_TEST_DOCKER_PYTHON"]}),
    "slurm": ("TORCHX_EXT_TEST_SLURM", lambda e: {}),
}

FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,})(?P<info>[^`\n]*)$")
MARKER = re.compile(r"^<!--\s*(?P<kind>not run|run)\s*:\s*(?P<text>.*?)\s*-->$")


@dataclass
class Block:
    page: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str
    title: Optional[str]
    code: str
    marker: Optional[tuple[str, str]]  # ("not run", reason) or ("run", "ray, timeout=120")
    files: dict[str, str] = field(default_factory=dict)  # titled blocks above it on the page

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def run_options(self) -> tuple[Optional[str], int]:
        """(testbed or None for host, timeout in seconds)."""
        testbed, timeout = None, DEFAULT_TIMEOUT_S
        if self.marker and self.marker[0] == "run":
            for word in (w.strip() for w in self.marker[1].split(",")):
                if word.startswith("timeout="):
                    timeout = int(word.partition("=")[2])
                elif word in TESTBEDS:
                    testbed = word
                elif word != "host":
                    raise AssertionError(f"{self.id}: unknown run marker {word!r}; valid: host, "
                                         f"{', '.join(TESTBEDS)}, timeout=N")
        return testbed, timeout


def pages() -> list[str]:
    found = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in
                                   glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return [p for p in found if os.path.exists(os.path.join(ROOT, p))]


def blocks(page: str) -> list[Block]:
    """Every fenced block of a page, in order, with the marker before it and the files above it."""
    with open(os.path.join(ROOT, page)) as f:
        lines = f.read().split("\n")
    out: list[Block] = []
    files: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].strip(), i
        lang = info.split()[0] if info else ""
        title_m = re.search(r'title="([^"]+)"', info)
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ ]{{0,3}}{fence}`*\s*$", lines[i]):
            body.append(lines[i][len(m["indent"]):] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mm = MARKER.match(lines[j].strip()) if j >= 0 else None
        code = "\n".join(body) + "\n"
        block = Block(page, start + 1, lang, title_m.group(1) if title_m else None, code,
                      (mm["kind"], mm["text"]) if mm else None, dict(files))
        if block.title:
            files[block.title] = code
        out.append(block)
    return out


def all_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(p)]


def is_readme_opening(b: Block) -> bool:
    return b.page == "README.md" and "bash demo.sh" in b.code and "bash test.sh" in b.code


def runnable() -> list[Block]:
    return [b for b in all_blocks() if b.lang == "bash" and not is_readme_opening(b)
            and not (b.marker and b.marker[0] == "not run")]


# ---------------------------------------------------------------------------------- the convention ----
def test_readme_opens_with_the_two_commands() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        head = f.read(400)
    assert head.startswith("# torchx-ext\n\n```bash\nbash demo.sh ") and "\nbash test.sh " in head


def test_every_shell_block_is_bash_and_every_skip_says_why() -> None:
    not_run = []
    for b in all_blocks():
        assert b.lang not in SHELL_LANGS, f"{b.id}: a ```{b.lang} block: command blocks are ```bash (run by this test)"
        if b.marker and b.marker[0] == "not run":
            assert b.lang == "bash", f"{b.id}: a 'not run' marker on a ```{b.lang} block means nothing"
            assert len(b.marker[1]) >= 10, f"{b.id}: say why it is not run"
            not_run.append(b.id)
        if b.marker and b.marker[0] == "run":
            b.run_options()  # refuses unknown words
    assert len(not_run) <= MAX_NOT_RUN, f"{len(not_run)} blocks are not run (at most {MAX_NOT_RUN}): {not_run}"
    assert len(runnable()) >= 10, "the docs lost their runnable examples"


def _slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) and GitHub give a heading, for plain headings."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def test_readme_links_lead_somewhere() -> None:
    # mkdocs --strict checks the links of docs/; the README is outside its tree
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for target in re.findall(r"\]\(([^)#\s]+\.md)(#[^)\s]*)?\)", readme):
        path, frag = target
        assert os.path.exists(os.path.join(ROOT, path)), f"README links to a missing {path}"
        if frag:
            with open(os.path.join(ROOT, path)) as f:
                slugs = {_slug(line.lstrip("#")) for line in f if line.startswith("#")}
            assert frag[1:] in slugs, f"README links to {path}{frag}: no such heading (has {sorted(slugs)})"


# ---------------------------------------------------------------------------------- running them ----
def _schedulers(testbed: Optional[str]) -> list[str]:
    return ["host"] + ([{"ray": "ray_jobs", "slurm": "slurm_jobs", "docker": "docker_jobs"}[testbed]] if testbed else [])


def _in_home(home: str, each: Callable[[Any, str], None], testbed: Optional[str]) -> None:
    """Calls ``each(scheduler, name)`` for the schedulers a block may use, with ``home`` as the
    home; an error is one line on stderr (best effort: the block's own failure is the news)."""
    from torchx.schedulers import get_scheduler_factories

    saved = os.environ.get("TORCHX_EXT_HOME")
    os.environ["TORCHX_EXT_HOME"] = home
    try:
        for name in _schedulers(testbed):
            try:
                each(get_scheduler_factories()[name]("torchx"), name)
            except Exception as e:  # noqa: BLE001 - best effort, see above
                print(f"cleanup of {name} apps in {home}: {e}", file=sys.stderr)
    finally:
        if saved is None:
            os.environ.pop("TORCHX_EXT_HOME", None)
        else:
            os.environ["TORCHX_EXT_HOME"] = saved


def _apps(home: str, testbed: Optional[str]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    _in_home(home, lambda sched, name: found.update((name, a.app_id) for a in sched.list()), testbed)
    return found


def _cleanup(home: str, testbed: Optional[str], before: set[tuple[str, str]]) -> None:
    """Deletes the apps the block made (cancelled first if they still run), and only those (an
    engine may list apps of other homes): nothing is left on the engines, whether the block passed
    or failed (docker_jobs kept each run's containers, and the test image they were made from)."""
    def delete_new(sched: Any, name: str) -> None:
        for app in sched.list():
            if (name, app.app_id) not in before:
                sched.delete(app.app_id)  # torchx_ext's delete cancels a running app first

    _in_home(home, delete_new, testbed)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", runnable(), ids=lambda b: b.id)
def test_documented_commands_run_as_written(block: Block) -> None:
    testbed, timeout = block.run_options()
    env = dict(os.environ)
    if testbed:
        needs, make = TESTBEDS[testbed]
        if not os.environ.get(needs):
            pytest.skip(f"{block.id} needs the {testbed} testbed (testbed/{testbed}.sh start)")
        env.update(make(os.environ))
    work = tempfile.mkdtemp(prefix="torchx_ext_docs_")
    home, cwd = os.path.join(work, "home"), os.path.join(work, "cwd")
    os.makedirs(cwd)
    env["TORCHX_EXT_HOME"] = home
    for name, text in block.files.items():
        with open(os.path.join(cwd, name), "w") as f:
            f.write(text)
    before = _apps(home, testbed)
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        proc.returncode = -1
    finally:
        _cleanup(home, testbed, before)
    took = time.monotonic() - started
    text = out.decode(errors="replace")
    try:
        assert proc.returncode == 0, (
            f"{block.id} exited {proc.returncode} after {took:.1f}s "
            f"({'timed out' if proc.returncode == -1 else 'exit status'}):\n{block.code}\n--- output ---\n{text[-4000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------- option tables ----
SCHEDULER_PAGES = {
    "host": "docs/schedulers/host.md",
    "slurm_jobs": "docs/schedulers/slurm_jobs.md",
    "docker_jobs": "docs/schedulers/docker_jobs.md",
    "ray_jobs": "docs/schedulers/ray_jobs.md",
}


def _executor(scheduler: str) -> Any:
    from torchx_ext.schedulers.docker_jobs.scheduler import DockerJobsExecutor
    from torchx_ext.schedulers.host.scheduler import HostExecutor
    from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsExecutor
    from torchx_ext.schedulers.slurm_jobs.scheduler import SlurmJobsExecutor

    return {"host": HostExecutor, "slurm_jobs": SlurmJobsExecutor, "docker_jobs": DockerJobsExecutor,
            "ray_jobs": RayJobsExecutor}[scheduler]


def options_table(scheduler: str) -> str:
    """The run options of a scheduler as a Markdown table, from its executor's fields."""
    rows = ["| option | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(_executor(scheduler)):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = re.sub(r"^Optional\[(.*)\]$", r"\1", kind)
        shown = "" if default is None else f"`{default!r}`"
        text = f.metadata.get("help", "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{f.name}` | {kind} | {shown} | {text} |")
    return "\n".join(rows) + "\n"


def fields_table(scheduler: str) -> str:
    """What the scheduler does with every AppDef/Role/Resource field (from torchx_ext.support, as the README's matrix)."""
    from torchx_ext.support import FIELD_ORDER
    from torchx_ext.support_tables import all_matrices

    matrix = all_matrices()[scheduler]
    rows = ["| field | | what it becomes here |", "|---|---|---|"]
    for key in FIELD_ORDER + sorted(k for k in matrix if k not in FIELD_ORDER):
        entry = matrix[key]
        note = entry.note.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{key}` | {entry.kind} | {note} |")
    return "\n".join(rows) + "\n"


GENERATED = {"runopts": options_table, "fields": fields_table}


def _marked(kind: str, scheduler: str) -> tuple[str, str, str]:
    start, end = f"<!-- {kind}:start {scheduler} -->\n", f"<!-- {kind}:end {scheduler} -->"
    with open(os.path.join(ROOT, SCHEDULER_PAGES[scheduler])) as f:
        text = f.read()
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a], text[a:b], text[b:]


@pytest.mark.parametrize("kind", sorted(GENERATED))
@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_PAGES))
def test_scheduler_pages_show_the_options_and_fields_of_the_code(scheduler: str, kind: str) -> None:
    assert _marked(kind, scheduler)[1] == GENERATED[kind](scheduler), "stale: python tests/test_docs.py --update"


def update() -> None:
    for scheduler, page in SCHEDULER_PAGES.items():
        for kind, render in GENERATED.items():
            before, _, after = _marked(kind, scheduler)
            with open(os.path.join(ROOT, page), "w") as f:
                f.write(before + render(scheduler) + after)


if __name__ == "__main__":  # python tests/test_docs.py --update
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update  (rewrites the option tables of docs/schedulers/)")
    sys.path.insert(0, ROOT)
    update()
