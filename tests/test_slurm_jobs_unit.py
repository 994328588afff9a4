"""``slurm_jobs`` without a cluster: the generated sbatch scripts against saved references, the
quoting of every user value, and the parsers of Slurm's output (the launcher the script starts:
test_slurm_jobs_node.py).

Reference scripts live in ``tests/slurm_reference/``; after an intended change regenerate them with
``UPDATE_REFERENCE=1 .venv/bin/python -m pytest tests/test_slurm_jobs_unit.py`` and review the diff.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
from torchx.specs import AppDef, AppState, Resource, Role

from contract import HOSTILE_ARGS
from torchx_ext.errors import DependencyError
from torchx_ext.executors import capabilities, executor_for
from torchx_ext.groups import mark_service
from torchx_ext.logs import PlainLines, filter_lines
from torchx_ext.schedulers.slurm_jobs import script
from torchx_ext.schedulers.slurm_jobs.scheduler import SlurmJobsExecutor, create_scheduler
from torchx_ext.schedulers.slurm_jobs.script import app_state_of, parse_sacct, parse_scontrol_job, signal_reason
from torchx_ext.state import StampedLineReader

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_reference")
RES = Resource(cpu=2, gpu=0, memMB=1000)


def _role(name: str, *args: str, replicas: int = 1, service: bool = False, image: str = "/tmp",
          env: dict[str, str] | None = None, resource: Resource = RES) -> Role:
    role = Role(name=name, image=image, entrypoint="python3", args=list(args), num_replicas=replicas,
                env=dict(env or {}), resource=resource)
    return mark_service(role, service)


def _ported(role: Role, **ports: int) -> Role:
    role.port_map = dict(ports)
    return role


def _dryrun(app: AppDef, **cfg: Any) -> str:
    cfg.setdefault("job_dir", "/shared/jobs")
    return repr(create_scheduler("test").submit_dryrun(app, cfg).request)


CASES = {
    # one role, replicas as tasks of one job, every job-level option
    "single_role_all_options": lambda: _dryrun(
        AppDef("train", roles=[_role("trainer", "-m", "train", "--rank", "${replica_id}", replicas=4,
                                     resource=Resource(cpu=8, gpu=2, memMB=32000))]),
        partition="gpu", time="2:00:00", account="proj", qos="high", constraint="a100&ib", exclusive=True,
        ntasks_per_node=2, mail_user="me@example.com", mail_type="END,FAIL",
        sbatch_args=["--reservation=maint", "--comment=with space"], srun_args=["--mpi=pmix"],
    ),
    # two roles: one heterogeneous job, a service, dependencies (afterok + kill-on-invalid-dep)
    "group_with_service_and_dependencies": lambda: _dryrun(
        AppDef("serve", roles=[
            _ported(_role("vllm-server", "-m", "server", "--port", "8000", service=True,
                          resource=Resource(cpu=4, gpu=1, memMB=16000)), http=8000),
            _role("client", "-m", "client", "--app", "${app_id}", replicas=2, env={"MODE": "eval"}),
        ]),
        partition="batch", dependencies=["slurm_jobs://torchx/101", "102"], gpus_per_node=8,
        ready_timeout_s=600.0,
    ),
    # pyxis: container image + mounts on every srun; an absolute image is the container workdir
    "pyxis_container": lambda: _dryrun(
        AppDef("box", roles=[_role("main", "-c", "print(1)", image="/workspace/code")]),
        container_image="nvcr.io#nvidia/pytorch:24.01-py3",
        container_mounts=["/data:/data:ro", "/scratch:/scratch"],
    ),
    # hostile arguments, env values, app name and sbatch values: quoted, never interpreted
    "hostile_values": lambda: _dryrun(
        AppDef("a'; rm -rf / #", roles=[_role("main", "-c", "pass", *HOSTILE_ARGS,
                                              env={"HOSTILE": "".join(HOSTILE_ARGS), "EMPTY": ""})]),
        sbatch_args=['--comment=a "b" \\c #d $HOME'], job_dir="/shared/my jobs/$USER",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_script(case: str) -> None:
    text = CASES[case]()
    path = os.path.join(REFERENCE_DIR, f"{case}.sbatch")
    if os.environ.get("UPDATE_REFERENCE") == "1":
        os.makedirs(REFERENCE_DIR, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(path, encoding="utf-8") as f:
        expected = f.read()
    assert text == expected, (
        f"the generated script differs from {path}. If the change is intended, regenerate with "
        f"UPDATE_REFERENCE=1 .venv/bin/python -m pytest {__file__} and review the diff"
    )


def test_the_script_ships_every_module_of_the_engine() -> None:
    """node.py may import any of them (engine/probe.py: the readiness connect); one left out would
    fail only on a Slurm node."""
    engine_dir = os.path.join(os.path.dirname(script.__file__), "..", "..", "engine")
    shipped = {os.path.basename(src) for rel, src in script.SHIPPED.items() if rel.startswith("txe_node/engine/")}
    assert shipped == {n for n in os.listdir(engine_dir) if n.endswith(".py")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_script_is_valid_bash(case: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=CASES[case](), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _bash_words(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash makes of ``words`` as the arguments of a command."""
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0
    return proc.stdout.decode().split("\0")[:-1]


def test_sh_word_round_trips_hostile_values() -> None:
    assert _bash_words(" ".join(script.sh_word(a) for a in HOSTILE_ARGS)) == HOSTILE_ARGS


@pytest.mark.parametrize("value", ["plain", "a b", 'a"b', "a\\b", "x#y", "$HOME", "it's"])
def test_sbatch_word_quotes_for_sbatch(value: str) -> None:
    word = script.sbatch_word(value)
    assert word == value or (word.startswith('"') and word.endswith('"'))
    if word != value:  # sbatch's reading: double quotes, backslash escapes
        inner = word[1:-1]
        out, i = [], 0
        while i < len(inner):
            if inner[i] == "\\":
                i += 1
            out.append(inner[i])
            i += 1
        assert "".join(out) == value


def test_newline_in_an_sbatch_value_is_one_clear_error() -> None:
    app = AppDef("x", roles=[_role("main", "-c", "1")])
    with pytest.raises(ValueError, match="line break"):
        _dryrun(app, partition="a\nb")


def test_options_and_dependencies_are_checked_in_the_dryrun() -> None:
    app = AppDef("x", roles=[_role("main", "-c", "1")])
    # ours is UnknownOptionError; the nightly's runopts rejects it first with its own type
    with pytest.raises(Exception, match=r"Valid options( are)?: .*partition"):
        _dryrun(app, partiton="x")
    with pytest.raises(DependencyError, match="belongs to scheduler 'host'"):
        _dryrun(app, dependencies=["host://s/abc"])
    with pytest.raises(DependencyError, match="no-such-dep"):
        _dryrun(app, dependencies=["slurm_jobs://torchx/no-such-dep"])


def test_executor_is_registered_with_capabilities() -> None:
    assert executor_for("slurm_jobs") is SlurmJobsExecutor
    caps = capabilities(SlurmJobsExecutor)
    assert caps.heterogeneous_groups and caps.services and caps.dependencies
    assert caps.persistent_status and caps.discovery_env
    name, cfg = SlurmJobsExecutor(partition="debug", exclusive=True).to_run_args()
    assert name == "slurm_jobs" and cfg["partition"] == "debug" and cfg["exclusive"] is True


def test_unknown_ids_are_none_without_asking_slurm() -> None:
    sched = create_scheduler("t")
    assert sched.describe("not-a-job-id") is None
    assert sched.describe("") is None


# ---------------------------------------------------------------------- parsers -----------------
SCONTROL = (
    "JobId=41 HetJobId=41 HetJobOffset=0 JobName=x JobState=FAILED Reason=NonZeroExitCode "
    "Dependency=(null) ExitCode=137:0 Comment=fake JobState=COMPLETED Reason=None\n"
    "JobId=42 HetJobId=41 HetJobOffset=1 JobName=x JobState=RUNNING Reason=None ExitCode=0:0\n"
)


def test_parse_scontrol_reads_the_leader_and_ignores_later_text() -> None:
    job = parse_scontrol_job(SCONTROL, "41")
    assert job is not None
    assert (job.state, job.reason, job.exit_code, job.dependency) == ("FAILED", "NonZeroExitCode", 137, "")
    assert parse_scontrol_job(SCONTROL, "7") is None


def test_signal_reason() -> None:
    assert signal_reason(137) == "killed by signal 9 (SIGKILL)"
    assert signal_reason(2) == "" and signal_reason(None) == ""


def test_parse_sacct() -> None:
    job = parse_sacct("12+0|CANCELLED by 0|0:15|None\n12+1|CANCELLED by 0|0:15|None\n", "12")
    assert job is not None and job.app_state == AppState.CANCELLED and job.signal == 15


@pytest.mark.parametrize("state,reason,expected", [
    ("COMPLETED", "None", AppState.SUCCEEDED),
    ("CANCELLED", "DependencyNeverSatisfied", AppState.FAILED),
    ("CANCELLED by 0", "None", AppState.CANCELLED),
    ("TIMEOUT", "TimeLimit", AppState.FAILED),
    ("COMPLETING", "None", AppState.RUNNING),
    ("WHATEVER", "", AppState.UNKNOWN),
])
def test_state_table(state: str, reason: str, expected: AppState) -> None:
    assert app_state_of(state, reason) == expected


def test_log_reader_splits_streams_and_waits_for_whole_lines(tmp_path: Any) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"100.5 O out one\n101.0 E err one\nnot stamped\n102.0 O partial")
    both, out, err = (StampedLineReader(str(log), tagged=True, want_tag=t) for t in (None, b"O", b"E"))
    assert list(both.read_new()) == [(100.5, "out one"), (101.0, "err one"), (None, "not stamped")]
    assert list(out.read_new()) == [(100.5, "out one")]
    assert list(err.read_new()) == [(101.0, "err one")]
    with open(log, "ab") as f:
        f.write(b" line\n")
    assert list(out.read_new()) == [(102.0, "partial line")]


def test_log_reader_reads_each_byte_once_in_bounded_chunks(tmp_path: Any) -> None:
    log = tmp_path / "log"
    lines = [f"{100 + i}.0 O line {i}".encode() for i in range(1000)]
    log.write_bytes(b"\n".join(lines) + b"\n")
    asked: list[tuple[int, int]] = []

    def fetch(offset: int, limit: int) -> bytes:
        asked.append((offset, limit))
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read(limit)

    reader = StampedLineReader(str(log), tagged=True, fetch=fetch, chunk=1000)
    assert [text for _, text in reader.read_new()] == [f"line {i}" for i in range(1000)]
    size = log.stat().st_size
    # every answer at most a chunk; bytes fetched = the log plus the partial line each chunk ends in
    assert all(limit == 1000 for _, limit in asked) and reader.offset == size
    assert sum(min(limit, size - off) for off, limit in asked) < 1.05 * size
    assert list(reader.read_new()) == []
    long = b"200.0 O " + b"x" * 2500 + b"\n"  # a line longer than a chunk comes in pieces, none lost
    with open(log, "ab") as f:
        f.write(long)
    assert "".join(text for _, text in reader.read_new()).endswith("x" * 1500)


def _texts(items: Any) -> list[str]:
    """The lines of a reader's items as filter_lines hands them on (no since/until, no regex)."""
    return list(filter_lines(items))


@pytest.mark.parametrize("tagged,want", [(False, None), (True, None), (True, b"O"), (True, b"E")])
def test_log_reader_fast_path_gives_the_lines_of_the_line_by_line_path(tmp_path: Any, tagged: bool,
                                                                       want: Any) -> None:
    """Without since/until a chunk's lines are split by one regex (PlainLines); over random logs,
    well formed or not, the lines are exactly those of the line-by-line path, chunk size aside."""
    import random

    rng = random.Random(7)
    pieces = ["1700000000.123456", "12", "1.5", "-1", "1e5", "nan", "", "x", "1.", " 3"]
    tags = ["O", "E", "", "OO"]
    texts = ["text", "", " two", "a\rb", "\x1e mark", "ünïcode", "tail "]
    for case in range(60):
        lines = []
        for _ in range(rng.randint(0, 40)):
            well = rng.random() < 0.8
            stamp = "1700000000.123456" if well else rng.choice(pieces)
            tag = (rng.choice(["O", "E"]) if well else rng.choice(tags)) if tagged else None
            head = stamp + " " + (tag + " " if tag is not None else "")
            lines.append((head if rng.random() < 0.97 else stamp) + rng.choice(texts))
        raw = ("\n".join(lines) + "\n").encode() if lines else b""
        if rng.random() < 0.2:
            raw += b"\xff\xfe broken utf-8\n"
        log = tmp_path / f"log{case}"
        log.write_bytes(raw)
        chunk = rng.choice([16, 64, 4096])
        slow = StampedLineReader(str(log), tagged=tagged, want_tag=want, chunk=chunk)
        fast = StampedLineReader(str(log), tagged=tagged, want_tag=want, chunk=chunk, plain=True)
        expected = _texts(slow.read_new())
        assert _texts(fast.read_new()) == expected, (case, raw)
        assert fast.offset == slow.offset == len(raw)
    # a well-formed chunk comes as one PlainLines, stamps and tags gone, newlines kept
    log = tmp_path / "well"
    log.write_bytes(b"1.5 O out\n2.5 E err\n3.5 O \n")
    items = list(StampedLineReader(str(log), tagged=True, want_tag=b"O", plain=True).read_new())
    assert items == [["out\n", "\n"]] and isinstance(items[0], PlainLines)


# ---------------------------------------------------------------------- Slurm away / forgotten --
def _fake_slurm(tmp_path: Any, monkeypatch: Any, scontrol_err: str) -> str:
    """A PATH whose scontrol fails with ``scontrol_err`` and whose sacct has no accounting."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho '{scontrol_err}' >&2\nexit 1\n")
    (bindir / "sacct").write_text("#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    home = tmp_path / "home"
    monkeypatch.setenv("TORCHX_EXT_HOME", str(home))
    return str(home)


def _record(home: str, job_id: str, result: str | None) -> None:
    from torchx_ext import state

    job_dir = os.path.join(home, "slurm_jobs", job_id)
    os.makedirs(os.path.join(job_dir, "main", "0"))
    if result is not None:
        with open(os.path.join(job_dir, "result"), "w") as f:
            f.write(result)
        with open(os.path.join(job_dir, "main", "0", "exit"), "w") as f:
            f.write(result.split()[0])
    state.write_json(os.path.join(job_dir, "app.json"), {
        "app_id": job_id, "app_name": "a", "job_dir": job_dir, "job_root": os.path.dirname(job_dir),
        "roles": [{"name": "main", "dirname": "main", "image": "", "entrypoint": "x", "num_replicas": 1,
                   "service": False}], "dependencies": [],
    })


def test_slurmctld_unreachable(tmp_path: Any, monkeypatch: Any) -> None:
    from torchx_ext.errors import SchedulerUnavailable

    error = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    home = _fake_slurm(tmp_path, monkeypatch, error)
    _record(home, "77", None)
    _record(home, "78", "5 main/0\n")
    sched = create_scheduler("t")
    running = sched.describe("77")
    assert running is not None and running.state == AppState.UNKNOWN and "unreachable" in running.msg
    done = sched.describe("78")  # the batch script's verdict is there: no need for slurmctld
    assert done is not None and done.state == AppState.FAILED and "exit code 5" in done.msg
    with pytest.raises(SchedulerUnavailable, match="Unable to contact"):
        sched.describe("79")


def test_job_forgotten_by_slurm_without_accounting(tmp_path: Any, monkeypatch: Any) -> None:
    home = _fake_slurm(tmp_path, monkeypatch, "slurm_load_jobs error: Invalid job id specified")
    _record(home, "80", None)
    _record(home, "81", "0 \n")
    sched = create_scheduler("t")
    lost = sched.describe("80")
    assert lost is not None and lost.state == AppState.UNKNOWN and "no accounting" in lost.msg
    ok = sched.describe("81")
    assert ok is not None and ok.state == AppState.SUCCEEDED
    assert ok.roles_statuses[0].replicas[0].state == AppState.SUCCEEDED
    assert sched.describe("82") is None  # neither Slurm nor we know it

    # the batch script found no node Python: its one line is the verdict, the engine never ran
    _record(home, "83", None)
    with open(os.path.join(home, "slurm_jobs", "83", "error"), "w") as f:
        f.write("the node Python 'py3' (run option node_python) is not found on n1\n")
    failed = sched.describe("83")
    assert failed is not None and failed.state == AppState.FAILED
    assert failed.msg.startswith("the node Python 'py3' (run option node_python) is not found on n1; see "), failed.msg


# ---------------------------------------------------------------------- remote mode, pure parts --
def test_remote_script_names_the_cluster_in_the_app_id_and_uses_the_remote_root() -> None:
    app = AppDef("r", roles=[_role("main", "-c", "1", image="/home/u/ws")])
    text = repr(create_scheduler("t").submit_dryrun(
        app, {"login": "u@login.example:2200", "remote_dir": "/scratch/u/jobs"}).request)
    assert "_TXE_DIR=/scratch/u/jobs/\"$SLURM_JOB_ID${TORCHX_EXT_SUBMISSION:+.$TORCHX_EXT_SUBMISSION}\"" in text
    assert "#SBATCH --output=/scratch/u/jobs/slurm-out/slurm-%j.out" in text
    assert '"app_id_prefix": "u@login.example:2200:"' in text  # the launcher's TORCHX_EXT_APP_ID
    assert "--chdir=/home/u/ws" in text  # an absolute image is a directory on the cluster
    # local mode is unchanged: the app id is the job id
    assert '"app_id_prefix": ""' in _dryrun(app)


def test_remote_options_are_checked_in_the_dryrun() -> None:
    from torchx_ext.errors import InvalidOptionError

    app = AppDef("r", roles=[_role("main", "-c", "1")])
    with pytest.raises(InvalidOptionError, match="set login too"):
        create_scheduler("t").submit_dryrun(app, {"remote_dir": "/x"})
    with pytest.raises(InvalidOptionError, match="remote_dir"):
        create_scheduler("t").submit_dryrun(app, {"login": "h", "job_dir": "/x"})
    with pytest.raises(InvalidOptionError, match="invalid SSH login"):
        create_scheduler("t").submit_dryrun(app, {"login": "-oProxyCommand=x"})
    with pytest.raises(DependencyError, match="own cluster"):
        create_scheduler("t").submit_dryrun(app, {"login": "h", "dependencies": ["slurm_jobs://t/other:12"]})
    with pytest.raises(DependencyError, match="own cluster"):
        _dryrun(app, dependencies=["slurm_jobs://t/h:12"])  # a remote app is no local dependency
    text = repr(create_scheduler("t").submit_dryrun(
        app, {"login": "h", "remote_dir": "/j", "dependencies": ["slurm_jobs://t/h:12"]}).request)
    assert "--dependency=afterok:12" in text


def test_snapshot_sections_keep_any_content() -> None:
    from torchx_ext.schedulers.slurm_jobs.client import parse_sections

    sep = "__sep__"
    out = f"{sep} scontrol 0\nJobId=1 X=y\n{sep} file main/0/exit\n3\n\n{sep} file stopped\n\n{sep} file r\na\nb\n\n"
    assert parse_sections(out, sep) == [("scontrol 0", "JobId=1 X=y"), ("file main/0/exit", "3\n"),
                                        ("file stopped", ""), ("file r", "a\nb\n")]


def test_a_fetched_log_splits_streams_and_waits_for_whole_lines() -> None:
    data = bytearray(b"100.5 O out one\n101.0 E err \xc3\xa9\nnot stamped\n102.0 O partial")
    asked: list[int] = []

    def fetch(offset: int, limit: int) -> bytes:
        asked.append(offset)
        return bytes(data[offset:offset + limit])

    both, out = (StampedLineReader("remote", tagged=True, want_tag=t, fetch=fetch) for t in (None, b"O"))
    assert list(both.read_new()) == [(100.5, "out one"), (101.0, "err é"), (None, "not stamped")]
    assert list(out.read_new()) == [(100.5, "out one")]
    data.extend(b" line\n")
    assert list(out.read_new()) == [(102.0, "partial line")]
    assert asked[-1] == len(b"100.5 O out one\n101.0 E err \xc3\xa9\nnot stamped\n")  # from where it stopped


def test_job_files_are_read_the_same_here_and_remotely(tmp_path: Any) -> None:
    """read_job_files (here) gives what the remote snapshot's sections give for the same directory."""
    from torchx_ext.schedulers.slurm_jobs.client import _SNAPSHOT, job_file_names, parse_sections, read_job_files

    job = tmp_path / "7"
    (job / "main" / "0").mkdir(parents=True)
    (job / "main" / "1").mkdir(parents=True)
    (job / "result").write_text("3 main/0\n")
    (job / "main" / "0" / "exit").write_text("3\n")
    (job / "main" / "0" / "log").write_text("1.0 E boom\n")
    (job / "main" / "1" / "exit").write_text("0\n")
    (job / "main" / "1" / "stopped").write_text("")
    names = job_file_names([{"name": "main", "dirname": "main", "num_replicas": 2}])
    here = read_job_files(str(job), names)
    # the snippet as the login node runs it (its scontrol section is not compared)
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", "-c", _SNAPSHOT, "bash", "SEP", "7", str(job), *names], capture_output=True,
                          text=True, env=env)
    there = {h.split(" ", 1)[1]: b for h, b in parse_sections(proc.stdout, "SEP") if h.startswith("file ")}
    assert here == there
    assert here["main/0/log"] == "1.0 E boom\n" and "main/1/log" not in here and here["main/1/stopped"] == ""


# ---------------------------------------------------------------------- trust (issue 20) ---------
@pytest.mark.parametrize("case", sorted(CASES))
def test_umask_077_is_the_scripts_first_command(case: str) -> None:
    commands = [ln for ln in CASES[case]().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[0] == "umask 077", commands[:3]


def test_a_services_ports_and_the_ready_timeout_reach_the_launcher() -> None:
    from torchx_ext.errors import InvalidOptionError
    from torchx_ext.schedulers.slurm_jobs.request import build_request

    server, client = _role("server", "-m", "s", service=True), _role("client", "-m", "c")
    server.port_map = {"http": 8000, "metrics": 9000, "again": 8000}
    client.port_map = {"http": 7000}  # not a service: nothing waits for it
    ex = SlurmJobsExecutor(job_dir="/shared/jobs", ready_timeout_s=12.5)
    spec = script.launcher_spec(build_request(AppDef("a", roles=[server, client]), ex, [], {}).spec)
    assert [c["ports"] for c in spec["components"]] == [[8000, 9000], []]
    assert spec["ready_timeout_s"] == 12.5
    assert '"ready_timeout_s": 300.0' in _dryrun(AppDef("a", roles=[server, client]))  # the engine's default
    for bad in (0, -1, float("nan")):
        with pytest.raises(InvalidOptionError, match=r"ready_timeout_s=.*a time in seconds, > 0"):
            build_request(AppDef("a", roles=[server]), SlurmJobsExecutor(ready_timeout_s=bad), [], {})


@pytest.mark.parametrize("login", ["x@-oProxyCommand=id", "-oProxyCommand=id@h", "x@-h:22", "u@h\x07x"])
def test_a_login_ssh_would_read_as_an_option_is_refused_at_validation(login: str) -> None:
    from torchx_ext.errors import InvalidOptionError
    from torchx_ext.schedulers.slurm_jobs.scheduler import split_app_id

    app = AppDef("r", roles=[_role("main", "-c", "1")])
    with pytest.raises(InvalidOptionError) as e:
        create_scheduler("t").submit_dryrun(app, {"login": login})
    assert repr(login) in str(e.value) and "\n" not in str(e.value)
    assert split_app_id(f"{login}:12") is None  # nor is it ever a handle's cluster


def _listing(root: str) -> list[tuple[str, int]]:
    """Every path under ``root`` with its mode (nothing at all when it does not exist)."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root), os.lstat(path).st_mode))
    return sorted(out)


def _workspace_dir(tmp_path: Any) -> str:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "main.py").write_text("print('hi')\n")
    return str(ws)


def test_a_local_dryrun_with_a_workspace_only_plans(tmp_path: Any, monkeypatch: Any) -> None:
    from torchx.runner import get_runner

    home = tmp_path / "home"
    (home / "slurm_jobs").mkdir(parents=True)
    monkeypatch.setenv("TORCHX_EXT_HOME", str(home))
    before = _listing(str(home))
    app = AppDef("ws", roles=[_role("main", "main.py", image="unused")])
    with get_runner() as runner:
        info = runner.dryrun(app, "slurm_jobs", {}, workspace=_workspace_dir(tmp_path))
    assert _listing(str(home)) == before  # nothing copied, nothing recorded
    # the planned copy, from the request (torchx-nightly plans on a copy of the AppDef)
    target = info.request.workspaces[0].target
    assert target.startswith(str(home / "slurm_jobs" / "workspaces") + "/") and not os.path.exists(target)
    text = repr(info.request)
    assert f"--chdir={target}" in text  # the planned copy is the role's directory
    assert text.endswith(f"# before sbatch: copy the workspace {tmp_path / 'ws'} to {target}\n")


def test_a_remote_dryrun_with_an_unreachable_login_works_offline(tmp_path: Any, monkeypatch: Any) -> None:
    from torchx.runner import get_runner

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TORCHX_EXT_HOME", str(home))
    monkeypatch.setenv("PATH", "/nonexistent")  # no ssh, no rsync, no Slurm: any use would fail
    app = AppDef("ws", roles=[_role("main", "main.py", image="unused")])
    with get_runner() as runner:
        info = runner.dryrun(app, "slurm_jobs", {"login": "nobody@127.0.0.1:1"}, workspace=_workspace_dir(tmp_path))
    assert _listing(str(home)) == []  # no control socket directory, no record, no copy
    target = info.request.workspaces[0].target
    assert target.startswith("~/.torchx_ext/slurm_jobs/workspaces/")  # resolved at the first submission
    text = repr(info.request)
    assert "TORCHX_EXT_APP_ID=nobody@127.0.0.1:1:" in text
    assert f"# before sbatch: copy the workspace {tmp_path / 'ws'} to nobody@127.0.0.1:1:{target}\n" in text


def test_local_submission_copies_the_workspace_and_keeps_slurms_output_private(
        tmp_path: Any, monkeypatch: Any) -> None:
    """With a fake sbatch (it records its umask and its --output, and answers a job id): the copy is
    made by schedule, sbatch runs under umask 077, and Slurm's output directory is 0700 before it."""
    from torchx.runner import get_runner

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setenv("TORCHX_EXT_HOME", str(home))
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    seen = tmp_path / "seen"
    (bindir / "sbatch").write_text(
        f"#!/bin/sh\n{{ umask; stat -c %a \"$(dirname \"$(sed -n 's/^#SBATCH --output=//p' | head -1)\")\"; }} "
        f">{seen}\necho 4242\n")
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    app = AppDef("ws", roles=[_role("main", "main.py", image="unused")])
    with get_runner() as runner:
        info = runner.dryrun(app, "slurm_jobs", {}, workspace=_workspace_dir(tmp_path))
        target = info.request.workspaces[0].target  # (torchx-nightly plans on a copy of the AppDef)
        assert not os.path.exists(target)
        handle = runner.schedule(info)
    assert handle.endswith("/4242")
    assert seen.read_text().split() == ["0077", "700"]
    assert (tmp_path / "home" / "slurm_jobs" / "workspaces").is_dir()
    assert os.path.isfile(os.path.join(target, "main.py"))
    # the record (by app id) and the job directory (<job id>.<submission token>: a job id Slurm
    # gives again after a reset of its state gets a directory of its own)
    job_dirs = [p for p in (home / "slurm_jobs").iterdir() if p.name.startswith("4242.")]
    assert len(job_dirs) == 1 and len(job_dirs[0].name) == len("4242.") + 12, job_dirs
    for path in (home / "slurm_jobs" / "4242", job_dirs[0], home / "slurm_jobs" / "slurm-out"):
        assert oct(path.stat().st_mode & 0o777) == "0o700"
    for path in (home / "slurm_jobs" / "4242" / "app.json", job_dirs[0] / "script.sbatch"):
        assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_node_fail_names_the_lost_node_and_only_the_replicas_that_ran_there() -> None:
    from torchx_ext.schedulers.slurm_jobs.client import node_fail_text

    roles = [{"name": "g", "dirname": "g", "num_replicas": 2}]
    text = node_fail_text("n[1-2]", ["n2"], roles, {"g/0/host": "n1 a", "g/1/host": "n2 b"})
    assert "node n2 of the job (n[1-2]) failed (role 'g' replica 1 ran there)" in text
    assert "replica 0" not in text
    # Slurm no longer says which node: no replica is blamed
    assert node_fail_text("n[1-2]", [], roles, {"g/0/host": "n1 a"}).startswith("a node of the job (n[1-2]) failed,")
