"""The state module is safe across threads and processes, and what it creates is private from birth
(issue 20, items 2 and 3).

Plain unit tests: a temporary ``$TORCHX_EXT_HOME``, real threads, real forked processes, real
file modes under a umask of 022.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from typing import Any, Callable, Iterator

import pytest

from torchx_ext import state
from torchx_ext.errors import StateError
from torchx_ext.schedulers.ray_jobs import local as rl
from torchx_ext.schedulers.workspace import copy_workspace

THREADS = 8
ROUNDS = 200
URLS = ("http://127.0.0.1:18265", "http://127.0.0.1:28265")


@pytest.fixture
def home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A home created 0755 (as a user's ``mkdir`` would) under a umask of 022."""
    path = os.path.join(str(tmp_path), "home")
    os.mkdir(path)
    os.chmod(path, 0o755)
    monkeypatch.setenv("TORCHX_EXT_HOME", path)
    old = os.umask(0o022)
    try:
        yield path
    finally:
        os.umask(old)


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes_below(root: str, path: str) -> dict[str, int]:
    """The mode of ``path`` and of every directory between it and ``root`` (root excluded)."""
    out = {}
    while os.path.abspath(path) != os.path.abspath(root):
        out[os.path.relpath(path, root)] = mode(path)
        path = os.path.dirname(path)
    return out


def run_threads(n: int, target: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            target(k)
        except BaseException as e:  # noqa: B036 - collected and reported by the test
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def start_process(target: Callable[[int], None], k: int) -> Any:
    """A forked process running ``target(k)``; its exit code is 0 only if nothing raised. Started
    before the test's threads (a fork copies only the calling thread)."""

    def child() -> None:
        try:
            target(k)
        except BaseException as e:  # noqa: B036 - the exit code is the report
            print(f"process {k}: {e!r}", flush=True)
            os._exit(1)

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    return p


# ---------------------------------------------------------------- write_json / read_json ----
def _write_read(path: str) -> Callable[[int], None]:
    def work(k: int) -> None:
        for i in range(ROUNDS):
            state.write_json(path, {"writer": k, "i": i, "pad": "x" * (100 + 37 * k)})
            got = state.read_json(path)  # another writer's record, or ours: never a torn one
            assert got is not None and set(got) == {"writer", "i", "pad"}, got
            assert got["pad"] == "x" * (100 + 37 * got["writer"]), got
    return work


def test_write_json_from_threads_never_collides_nor_tears(home: str) -> None:
    path = os.path.join(home, "record.json")
    state.write_json(path, {"writer": 0, "i": -1, "pad": "x" * 100})
    assert run_threads(THREADS, _write_read(path)) == []
    assert [n for n in os.listdir(home) if n.endswith(".tmp")] == []  # no temp file left behind


def test_write_json_from_processes_and_threads(home: str) -> None:
    path = os.path.join(home, "record.json")
    state.write_json(path, {"writer": 0, "i": -1, "pad": "x" * 100})
    work = _write_read(path)
    procs = [start_process(work, k) for k in (1, 2)]
    errors = run_threads(THREADS, work)
    for p in procs:
        p.join(120)
    assert errors == []
    assert [p.exitcode for p in procs] == [0, 0]


# ---------------------------------------------------------------- read-modify-write --------
def test_locked_excludes_threads_of_one_process(home: str) -> None:
    inside, most = [0], [0]

    def work(_k: int) -> None:
        for _ in range(50):
            with state.locked(home):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                inside[0] -= 1

    assert run_threads(THREADS, work) == []
    assert most[0] == 1
    assert mode(os.path.join(home, "lock")) == 0o600


def test_update_json_keeps_every_writers_key(home: str) -> None:
    def work(k: int) -> None:
        for i in range(50):
            state.update_json(home, "shared.json", **{f"t{k}_{i}": i})

    assert run_threads(THREADS, work) == []
    assert set(state.read_json(os.path.join(home, "shared.json")) or {}) == {
        f"t{k}_{i}" for k in range(THREADS) for i in range(50)}


def _clusters_work(k: int) -> None:
    """Each call adds its own key to one of two clusters, by either entry point."""
    for i in range(ROUNDS):
        url = URLS[i % 2]
        if i % 4 < 2:
            rl.update_cluster(url, **{f"w{k}_{i}": i})
        else:
            rl.remember_cluster(url, token_env="RAY_TOKEN", **{f"w{k}_{i}": i})


def test_clusters_json_loses_no_entry_across_threads_and_processes(home: str) -> None:
    proc = start_process(_clusters_work, THREADS)  # a second process doing the same
    errors = run_threads(THREADS, _clusters_work)
    proc.join(120)
    assert errors == []
    assert proc.exitcode == 0
    known = rl.known_clusters()
    assert set(known) == set(URLS)
    for j, url in enumerate(URLS):
        want = {f"w{k}_{i}" for k in range(THREADS + 1) for i in range(ROUNDS) if i % 2 == j}
        assert want <= set(known[url]), sorted(want - set(known[url]))[:5]
        assert known[url]["token_env"] == "RAY_TOKEN"


def test_lost_contact_keeps_the_first_failure_time(home: str) -> None:
    rl.update_cluster(URLS[0], lost_contact_s=1000)
    errors = run_threads(THREADS, lambda _k: rl.lost_contact(URLS[0], "unreachable", "app", 600))
    assert errors == []
    since = rl.known_clusters()[URLS[0]]["unreachable_since"]
    rl.lost_contact(URLS[0], "unreachable", "app", 600)
    assert rl.known_clusters()[URLS[0]]["unreachable_since"] == since
    rl.in_contact(URLS[0])
    assert rl.known_clusters() == {URLS[0]: {"lost_contact_s": 1000}}


# ---------------------------------------------------------------- private from birth -------
def test_makedirs_makes_every_missing_component_0700(home: str) -> None:
    leaf = state.scheduler_dir("docker_jobs", "a", "b")
    state.makedirs(leaf)
    assert modes_below(home, leaf) == {"docker_jobs": 0o700, "docker_jobs/a": 0o700, "docker_jobs/a/b": 0o700}
    state.makedirs(leaf)  # exists: fine
    with pytest.raises(FileExistsError):
        state.makedirs(leaf, exist_ok=False)
    assert mode(home) == 0o755  # an existing directory is the user's: left as it is


def test_makedirs_creates_a_missing_home_0700(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHX_EXT_HOME", os.path.join(str(tmp_path), "x", "home"))
    old = os.umask(0o022)
    try:
        state.makedirs(state.scheduler_dir("host"))
    finally:
        os.umask(old)
    assert modes_below(str(tmp_path), state.scheduler_dir("host")) == {
        "x": 0o700, "x/home": 0o700, "x/home/host": 0o700}


def test_makedirs_reports_what_is_in_the_way(home: str) -> None:
    with open(os.path.join(home, "docker_jobs"), "w"):
        pass  # a file where a directory should be (works as root too, unlike a 0500 directory)
    with pytest.raises(StateError, match=r"cannot write .*docker_jobs/a: .*docker_jobs: File exists; check that \$TORCHX_EXT_HOME"):
        state.makedirs(state.scheduler_dir("docker_jobs", "a"))
    with pytest.raises(FileExistsError):  # the leaf: as os.makedirs
        state.makedirs(state.scheduler_dir("docker_jobs"))


def test_records_and_locks_are_0600_under_0700_dirs(home: str) -> None:
    path = state.scheduler_dir("docker_jobs", "app-1.request.json")
    state.makedirs(os.path.dirname(path))
    state.write_json(path, {"env": {"TOKEN": "value"}})
    assert modes_below(home, path) == {"docker_jobs": 0o700, "docker_jobs/app-1.request.json": 0o600}
    with state.locked(os.path.dirname(path)):
        pass
    assert mode(state.scheduler_dir("docker_jobs", "lock")) == 0o600
    state.update_json(state.scheduler_dir("slurm_jobs"), "remote_roots.json", x="y")  # makes its dir
    assert modes_below(home, state.scheduler_dir("slurm_jobs", "remote_roots.json")) == {
        "slurm_jobs": 0o700, "slurm_jobs/remote_roots.json": 0o600}
    assert mode(state.scheduler_dir("slurm_jobs", "lock")) == 0o600


def test_ray_jobs_local_files_are_private(home: str, tmp_path: Any) -> None:
    rl.record_cancel(URLS[0], "job-1")
    assert modes_below(home, rl.cancel_record(URLS[0], "job-1")) == {
        "ray_jobs": 0o700, "ray_jobs/cancelled": 0o700,
        os.path.join("ray_jobs", "cancelled", os.path.basename(rl.cancel_record(URLS[0], "job-1"))): 0o600}
    rl.update_cluster(URLS[0], token_env="RAY_TOKEN")
    assert mode(rl.local_dir("clusters.json")) == 0o600
    assert mode(rl.local_dir("lock")) == 0o600
    manifest = os.path.join(str(tmp_path), "m", "n", "manifest.jsonl")
    rl.append_manifest("file://" + manifest, {"app_id": "a"})
    assert modes_below(str(tmp_path), manifest) == {"m": 0o700, "m/n": 0o700, "m/n/manifest.jsonl": 0o600}


def test_record_cancel_again_renews_its_age(home: str) -> None:
    rl.record_cancel(URLS[0], "job-1")
    path = rl.cancel_record(URLS[0], "job-1")
    os.utime(path, (1, 1))
    rl.record_cancel(URLS[0], "job-1")
    assert os.path.getmtime(path) > 1


def test_copy_workspace_is_private(home: str, tmp_path: Any) -> None:
    ws = os.path.join(str(tmp_path), "ws")
    os.makedirs(os.path.join(ws, "pkg"))
    for name, m in (("run.sh", 0o755), ("pkg/data.txt", 0o644), ("pkg/secret.txt", 0o400)):
        with open(os.path.join(ws, name), "w") as f:
            f.write(name)
        os.chmod(os.path.join(ws, name), m)
    target = state.scheduler_dir("host", "workspaces", "w1")
    copy_workspace(ws, target)
    assert modes_below(home, os.path.join(target, "pkg", "data.txt")) == {
        "host": 0o700, "host/workspaces": 0o700, "host/workspaces/w1": 0o700,
        "host/workspaces/w1/pkg": 0o700, "host/workspaces/w1/pkg/data.txt": 0o600}
    assert mode(os.path.join(target, "run.sh")) == 0o700  # still executable, by its owner only
    assert mode(os.path.join(target, "pkg", "secret.txt")) == 0o400
    with open(os.path.join(target, "run.sh")) as f:
        assert f.read() == "run.sh"


# ---------------------------------------------------------------- damaged records ----------
@pytest.mark.parametrize("content, why", [
    (b"", "empty"),
    (b"  \n", "empty"),
    (b'{"http://a:8265": {"token_env": "T"', "not valid JSON"),
    (b"[1, 2]", "not an object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_a_damaged_record_is_reported_not_absent(home: str, content: bytes, why: str) -> None:
    path = os.path.join(home, "clusters.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(StateError) as info:
        state.read_json(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path in msg and "damaged" in msg and why in msg and "move it aside" in msg


def test_a_missing_record_is_none(home: str) -> None:
    assert state.read_json(os.path.join(home, "nothing.json")) is None
    assert state.read_json(os.path.join(home, "no-dir", "nothing.json")) is None


def test_a_damaged_clusters_json_is_never_overwritten(home: str) -> None:
    """A torn clusters.json used to read as {} and be rewritten with one entry: every other
    cluster's token binding lost. Now the update refuses, and the file is left for the user."""
    state.makedirs(rl.local_dir())
    with open(rl.local_dir("clusters.json"), "w") as f:
        f.write('{"http://a:8265": {"token_env": "T"}, "http://b:')
    with pytest.raises(StateError, match="damaged"):
        rl.update_cluster(URLS[0], token_env="X")
    with open(rl.local_dir("clusters.json")) as f:
        assert f.read().startswith('{"http://a:8265"')


def test_append_text_and_write_text_make_private_files_and_whole_lines(tmp_path: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = os.path.join(str(tmp_path), "index.jsonl")
    line = "x" * 1000 + "\n"

    def append(_: int) -> None:
        with state.locked(str(tmp_path)):
            state.append_text(path, line)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(append, range(64)))
    with open(path) as f:
        assert f.read() == line * 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    state.write_text(path, "new\n", sync_dir=False)
    with open(path) as f:
        assert f.read() == "new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]


def _index_for_test() -> Any:
    from torchx_ext.index import AppIndex, Entry

    def from_record(name: str) -> Any:
        try:
            return Entry(name, os.path.getmtime(state.scheduler_dir("t", name)), "rec")
        except OSError:
            return None

    return AppIndex("t", lambda n: n.startswith("app"), from_record)


def _submitter(home: str, who: int, n: int) -> None:
    from torchx_ext.index import Entry

    os.environ["TORCHX_EXT_HOME"] = home
    index = _index_for_test()
    for i in range(n):
        state.makedirs(state.scheduler_dir("t", f"app{who}-{i}"))  # the record, then the index
        index.add(Entry(f"app{who}-{i}", float(i), "sub"))


def test_index_appends_from_processes_survive_concurrent_rebuilds(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_submitter, args=(str(tmp_path), w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    index = _index_for_test()
    while any(p.is_alive() for p in procs):
        index._rewrite(rebuild=True)  # what a list does with a damaged index
    for p in procs:
        p.join()
        assert p.exitcode == 0
    with open(index.path) as f:
        ids = {json.loads(line)["id"] for line in f}
    assert ids == {f"app{w}-{i}" for w in range(3) for i in range(40)}
    assert len(index.entries()) == 120


def test_index_forgets_deleted_apps_and_a_reused_id_starts_afresh(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from torchx_ext.index import Entry

    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path))
    index = _index_for_test()
    for name in ("app1", "app2"):
        state.makedirs(state.scheduler_dir("t", name))
        index.add(Entry(name, 1.0 if name == "app1" else 2.0, name))
    index.ended({"app1": "FAILED"})
    assert [(e.app_id, e.end) for e in index.entries()] == [("app2", None), ("app1", "FAILED")]
    shutil.rmtree(state.scheduler_dir("t", "app1"))
    index.forget("app1")
    assert [e.app_id for e in index.entries()] == ["app2"]
    state.makedirs(state.scheduler_dir("t", "app1"))  # the same id again (a Slurm job id reused)
    index.add(Entry("app1", 3.0, "new"))
    assert [(e.app_id, e.end, e.name) for e in index.entries()] == [("app1", None, "new"), ("app2", None, "app2")]
