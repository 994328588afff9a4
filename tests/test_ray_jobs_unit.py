"""``ray_jobs`` without a cluster: the dry-run, addresses, masking, the cluster-side rules and
driver (run for real, in local mode), log demultiplexing, and the label-selector guard against a
fake old Ray client (the one case no installed Ray can show)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import socket
import sys
import threading
import time
import types
from contextlib import redirect_stdout
from typing import Any, Optional

import pytest
from torchx.specs import AppDef, AppState, Resource, Role

from torchx_ext.engine import rules
from torchx_ext.errors import InvalidAppError, InvalidOptionError
from torchx_ext.groups import ReplicaOutcome, group_state, mark_service
from torchx_ext.logs import PlainLines
from torchx_ext.schedulers.ray_jobs import adapter
from torchx_ext.schedulers.ray_jobs import client as rc
from torchx_ext.schedulers.ray_jobs import logs as ray_logs
from torchx_ext.schedulers.ray_jobs.client import parse_verdict
from torchx_ext.schedulers.ray_jobs.cluster import ENV_B64_PREFIX, SPEC_ENV, driver, readiness
from torchx_ext.schedulers.ray_jobs.cluster.replica import decoded_env
from torchx_ext.schedulers.ray_jobs.logs import JobLogReader
from torchx_ext.schedulers.ray_jobs.preflight import role_resources
from torchx_ext.schedulers.ray_jobs.scheduler import RayJobsScheduler

URL = "http://127.0.0.1:8265"


def app(*roles: Role) -> AppDef:
    return AppDef("unit", roles=list(roles))


def role(name: str = "main", replicas: int = 1, **res: Any) -> Role:
    return Role(name=name, image="", entrypoint="python", args=["-c", "pass"], num_replicas=replicas,
                resource=Resource(cpu=res.pop("cpu", 1), gpu=res.pop("gpu", 0), memMB=res.pop("memMB", 512),
                                  capabilities=res))


def dryrun(a: AppDef, **cfg: Any) -> Any:
    return RayJobsScheduler("unit").submit_dryrun(a, {"dashboard_url": URL, **cfg}).request


def test_rules_match_the_group_contract() -> None:
    states = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    for service_state, main_states in itertools.product(states, itertools.product(states, repeat=2)):
        ours = [ReplicaOutcome("svc", 0, True, AppState[service_state])]
        plain = [rules.outcome("svc", 0, True, service_state)]
        for i, s in enumerate(main_states):
            ours.append(ReplicaOutcome("main", i, False, AppState[s], 1))
            plain.append(rules.outcome("main", i, False, s, 1))
        state, msg = group_state(ours)
        assert rules.group_state(plain) == (state.name, msg)


def test_single_replica_uses_entrypoint_resources() -> None:
    req = dryrun(app(role(cpu=2, gpu=1, memMB=1024, sandbox=1)))
    assert req.spec["mode"] == "local"
    assert req.entrypoint_resources == {"entrypoint_num_cpus": 2.0, "entrypoint_num_gpus": 1.0,
                                        "entrypoint_memory": 1024 * 2**20, "entrypoint_resources": {"sandbox": 1.0}}
    assert req.entrypoint.startswith("python -m ray_jobs_cluster.driver")


def test_gang_has_one_bundle_per_replica_and_a_free_driver() -> None:
    a = app(role("server", 2, cpu=1), mark_service(role("sandbox", 1, cpu=0, memMB=0)))
    req = dryrun(a, placement_strategy="spread")
    assert req.spec["mode"] == "gang" and req.spec["strategy"] == "SPREAD"
    assert req.entrypoint_resources == {}
    assert req.preflight_needs == [{"CPU": 1.0, "memory": 512.0 * 2**20}] * 2 + [{"CPU": 0.01}]
    sandbox = req.spec["roles"][1]
    assert sandbox["service"] and sandbox["hosts_env"] == "TORCHX_EXT_HOSTS_SANDBOX"
    env = req.spec["roles"][0]["replicas"][1]["env"]
    assert env["TORCHX_EXT_REPLICA_ID"] == "1" and env["TORCHX_EXT_APP_ID"] == req.app_id


def test_bad_options_and_capabilities_are_clear_errors() -> None:
    with pytest.raises(InvalidAppError, match="not a number"):
        dryrun(app(role(accelerator="a100")))
    # ours is UnknownOptionError; the nightly's runopts rejects it first with its own type
    with pytest.raises(Exception, match=r"(?s)Valid options( are)?: .*dashboard_url"):
        dryrun(app(role()), dashbord_url=URL)
    with pytest.raises(InvalidOptionError, match="placement_strategy"):
        dryrun(app(role()), placement_strategy="CLUMP")
    with pytest.raises(InvalidOptionError, match="GCS"):
        dryrun(app(role()), dashboard_url="ray://head:10001")


def test_the_driver_learns_the_services_ports_and_the_ready_timeout() -> None:
    server = mark_service(role("server"))
    server.port_map = {"http": 8000, "metrics": 9000}
    client = role("client")
    client.port_map = {"debug": 5678}  # not a service: nobody waits for it
    req = dryrun(app(server, client), ready_timeout_s=7)
    assert req.spec["ready_timeout_s"] == 7.0
    assert [r["ports"] for r in req.spec["roles"]] == [[8000, 9000], []]
    assert dryrun(app(role())).spec["ready_timeout_s"] == rules.READY_TIMEOUT_S
    for bad in (0, -1.0):
        with pytest.raises(InvalidOptionError, match=r"ready_timeout_s=.*: a time in seconds, > 0"):
            dryrun(app(server, client), ready_timeout_s=bad)


def test_forwarded_env_is_masked_and_dollar_values_survive_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIN_TOKEN", "abc123")
    monkeypatch.setenv("DOLLAR_TOKEN", "p$ss${word}")
    req = dryrun(app(role()), env_forward=["PLAIN_TOKEN", "DOLLAR_TOKEN"])
    env = req.runtime_env["env_vars"]
    assert env["PLAIN_TOKEN"] == "abc123" and "DOLLAR_TOKEN" not in env
    assert "$" not in "".join(env.values())  # Ray runs os.path.expandvars on these
    assert decoded_env(env)["DOLLAR_TOKEN"] == "p$ss${word}"
    assert SPEC_ENV not in decoded_env(env) and ENV_B64_PREFIX + "DOLLAR_TOKEN" not in decoded_env(env)
    printed = repr(req)
    assert "abc123" not in printed and base64.b64encode(b"p$ss${word}").decode() not in printed
    assert json.loads(printed)["spec"]["roles"][0]["name"] == "main"
    with pytest.raises(InvalidOptionError, match="NOPE_NOT_SET"):
        dryrun(app(role()), env_forward=["NOPE_NOT_SET"])


def test_app_ids_carry_the_cluster() -> None:
    for url in (URL, "https://ray.example.com/proxy/path", "http://head-svc.ns:8265"):
        app_id = rc.make_app_id(url, "train-0123456789")
        assert "/" not in app_id  # a TorchX handle is scheduler://session/app_id
        assert rc.split_app_id(app_id) == (url, "train-0123456789")


class OldClient:
    """A Ray < 2.55 Jobs client: no entrypoint_label_selector."""

    def submit_job(self, *, entrypoint: str, submission_id: Optional[str] = None, runtime_env: Any = None,
                   metadata: Any = None, entrypoint_num_cpus: Any = None, entrypoint_num_gpus: Any = None,
                   entrypoint_memory: Any = None, entrypoint_resources: Any = None) -> str:
        raise AssertionError("must not be called")


def test_label_selector_with_an_old_client_is_an_error_not_a_silent_drop() -> None:
    sched = RayJobsScheduler("unit", client_factory=lambda url, token_env, timeout: OldClient())
    info = sched.submit_dryrun(app(role()), {"dashboard_url": URL, "label_selector": {"pool": "gpu"}})
    with pytest.raises(InvalidOptionError, match="label_selector needs Ray >= 2.55"):
        sched.schedule(info)
    assert not rc.supports_label_selector(OldClient())


def test_token_env_must_be_set_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_TOKEN_UNIT", raising=False)
    with pytest.raises(InvalidOptionError, match="RAY_TOKEN_UNIT"):
        adapter.auth_headers("RAY_TOKEN_UNIT")
    monkeypatch.setenv("RAY_TOKEN_UNIT", "sekrit")
    assert adapter.auth_headers("RAY_TOKEN_UNIT") == {"Authorization": "Bearer sekrit"}
    assert "sekrit" not in repr(dryrun(app(role()), token_env="RAY_TOKEN_UNIT"))


class LogClient:
    """Answers the Jobs API's GET /api/jobs/<id>/logs like a dashboard."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _do_request(self, method: str, endpoint: str) -> Any:
        assert (method, endpoint) == ("GET", "/api/jobs/x/logs")
        return types.SimpleNamespace(status_code=200, json=lambda: {"logs": self.text})


def frame(role: str, replica: int, stream: str, ts: float, text: str) -> str:
    return f"\x1etxf {role} {replica} {stream} {ts:.6f} {len(text)}\n{text}"


def test_log_demultiplexing() -> None:
    text = (
        "Running entrypoint for job x\n"
        + frame("d", 0, "o", 10, "reserving\n")
        + frame("0", 0, "o", 11, "out of main 0\n")
        + frame("0", 1, "e", 12, "err of main 1 with \x1e inside\n\x1etxf 0 0 o 1.0 5\nnot a frame\n")
        + frame("1", 0, "o", 13, "\n")
        + "\x1etx-verdict {\"state\": \"FAILED\", \"msg\": \"role 'b' replica 0 failed\"}\n"
        + frame("0", 0, "o", 14, "partial\n")[:-1]  # no newline yet: read next time
    )
    client = LogClient(text)
    # a replica line keeps its newline (filter_lines adds one only where it is missing)
    assert JobLogReader(client, "x", ("0", 0), None).read_new() == [(11.0, "out of main 0\n")]
    assert JobLogReader(client, "x", ("0", 1), "o").read_new() == []
    # a frame's text is taken by its length: a replica line that looks like a header is text
    assert JobLogReader(client, "x", ("0", 1), "e").read_new() == [
        (12.0, "err of main 1 with \x1e inside\n"), (12.0, "\x1etxf 0 0 o 1.0 5\n"), (12.0, "not a frame\n")]
    assert JobLogReader(client, "x", ("1", 0), None).read_new() == [(13.0, "\n")]
    assert JobLogReader(client, "x", None, None).read_new() == [(None, "Running entrypoint for job x"),
                                                                  (10.0, "reserving\n")]
    # without since/until the time is not parsed: the piece's lines come as one PlainLines
    plain = JobLogReader(client, "x", ("0", 1), None, timed=False).read_new()
    assert plain == [["err of main 1 with \x1e inside\n", "\x1etxf 0 0 o 1.0 5\n", "not a frame\n"]]
    assert isinstance(plain[0], PlainLines)
    reader = JobLogReader(client, "x", ("0", 0), None)
    reader.read_new()
    client.text += "\n"
    assert reader.read_new() == [(14.0, "partial\n")]
    assert parse_verdict("last logs:\n" + text)["msg"] == "role 'b' replica 0 failed"
    # fed in pieces of any size, the same lines
    whole = ray_logs.LogDemux(("0", 1), None).feed(text)
    for size in (1, 2, 3, 7, 64):
        demux = ray_logs.LogDemux(("0", 1), None)
        assert [x for i in range(0, len(text), size) for x in demux.feed(text[i:i + size])] == whole
    # a header that is not one (version 1's per-line marks, a bad length) is one of Ray's lines
    odd = "\x1etx 0 0 o 1.5 v1 line\n\x1etxf 0 0 o 2.5 x\n"
    assert ray_logs.LogDemux(("0", 0), None).feed(odd) == []
    assert ray_logs.LogDemux(None, None).feed(odd) == [(None, "\x1etx 0 0 o 1.5 v1 line"), (None, "\x1etxf 0 0 o 2.5 x")]


def test_driver_frames_survive_rays_newline_translation() -> None:
    # Ray reads the job log in text mode (universal newlines): what the driver framed must still
    # add up, and a replica's "\r" arrives as Ray delivers it, never swallowing what follows it
    lines = [("o", 1.0, "progress 10%\rprogress 20%"), ("o", 1.01, "crlf\r"), ("e", 1.02, "err"),
             ("e", 9.0, "later"), ("o", 9.0, "\x1etxf 0 0 o 1 3")]
    written = driver.frames("0", 0, lines)
    served = io.StringIO(written, newline=None).read()  # what Ray's open(path, "r") hands on
    assert served == written  # nothing left for Ray to translate: the lengths hold
    got = ray_logs.LogDemux(("0", 0), None).feed(served)
    assert got == [(1.0, "progress 10%\n"), (1.0, "progress 20%\n"), (1.0, "crlf\n"), (1.02, "err\n"),
                   (9.0, "later\n"), (9.0, "\x1etxf 0 0 o 1 3\n")]
    assert served.count("\x1etxf ") == 4 + 1  # a frame per stream run and FRAME_S; the last line is text


def test_demultiplexing_random_logs_in_random_pieces() -> None:
    """Property: whatever the replicas print (marks, "\\r", non-ASCII, empty lines) and however
    the log is cut into pieces, each reader gets exactly its replica's lines, in order."""
    import random

    rng = random.Random(24)
    alphabet = ["a", "b", " ", "\r", "\x1e", "\x1etxf 0 0 o 1 3", "\x1etx-verdict {}", "é", "☃", "7"]
    for _ in range(200):
        batches = []  # (role, replica, lines) in the order the driver wrote them
        want: dict[tuple[str, int, str], list[str]] = {}
        for _ in range(rng.randint(1, 12)):
            role, replica = rng.choice([("0", 0), ("0", 1), ("1", 0), ("d", 0)])
            lines = [(rng.choice("oe"), 1000.0 + rng.random(),
                      "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))))
                     for _ in range(rng.randint(1, 5))]
            lines.sort(key=lambda x: x[1])
            batches.append(driver.frames(role, replica, lines))
            for stream, _, text in lines:  # as Ray will serve them: universal newlines
                served = (text + "\n").replace("\r\n", "\n").replace("\r", "\n")
                want.setdefault((role, replica, stream), []).extend(t + "\n" for t in served.split("\n")[:-1])
        log = "Ray says hello\n" + "".join(batches) + "\x1etx-verdict {\"state\": \"SUCCEEDED\"}\n"
        log = io.StringIO(log, newline=None).read()  # what Ray's reads serve (open(path, "r"))
        cuts = sorted(rng.sample(range(1, len(log)), min(len(log) - 1, rng.randint(0, 20))))
        pieces = [log[a:b] for a, b in zip([0, *cuts], [*cuts, len(log)], strict=True)]
        for (role, replica, stream), lines in want.items():
            if role == "d":
                continue
            demux = ray_logs.LogDemux((role, replica), stream, timed=rng.random() < 0.5)
            got = [line for p in pieces for item in demux.feed(p)
                   for line in (item if isinstance(item, PlainLines) else [item[1]])]
            assert got == lines, (role, replica, stream)


def test_whole_lines_split_at_newlines_only() -> None:
    # the cheap split (str.splitlines) for plain ASCII; every other text by the regex, as before
    plain = "".join(f"{i:08d} {'x' * 90}\n" for i in range(1000))
    assert ray_logs.whole_lines(plain, len(plain)) == plain.splitlines(True) and len(plain.splitlines()) == 1000
    assert ray_logs.whole_lines(plain + "part", len(plain)) == plain.splitlines(True)
    for odd in ("a\rb\n", "a\x0bb\x0cc\n", "\x1etxf x\x1cy\x1dz\n", "é\x85f\u2028g\u2029h\n"):
        text = "first\n" + odd
        assert ray_logs.whole_lines(text + "rest", len(text)) == ["first\n", odd], repr(odd)


def numbered(n: int, start: int = 0, replica: int = 0) -> str:
    return "".join(frame("0", replica, "o", 1000 + i, f"line {i}\n") for i in range(start, start + n))


class TailClient:
    """A dashboard for the follow path: the job (or none yet), its whole log, and Ray's tail
    (``tail_job_logs``), which delivers ``log`` in odd-sized pieces; ``cut`` ends a tail early
    after that many characters (a restarted dashboard); ``fail`` makes a tail raise at once."""

    def __init__(self, log: str = "", status: Optional[str] = "RUNNING") -> None:
        self.log, self.status = log, status
        self.cut: list[int] = []  # per tail, in order
        self.fail = False
        self.tails = 0
        self.gets: list[str] = []
        self.piece = 37

    def _do_request(self, method: str, endpoint: str) -> Any:
        self.gets.append(endpoint)
        if self.status is None:
            return types.SimpleNamespace(status_code=404, json=lambda: {})
        if endpoint == "/api/jobs/x/logs":
            return types.SimpleNamespace(status_code=200, json=lambda: {"logs": self.log})
        assert endpoint == "/api/jobs/x"
        job = {"type": "SUBMISSION", "submission_id": "x", "status": self.status, "entrypoint": "e",
               "metadata": {"torchx_ext_kind": "app"}}
        return types.SimpleNamespace(status_code=200, json=lambda: job)

    async def tail_job_logs(self, sid: str) -> Any:
        import asyncio

        self.tails += 1
        if self.fail:
            raise RuntimeError("WebSocket connection closed unexpectedly")
        cut = self.cut.pop(0) if self.cut else None
        sent = 0
        while True:
            end = len(self.log) if cut is None else min(cut, len(self.log))
            while sent < end:
                piece = self.log[sent:sent + self.piece]
                sent += len(piece)
                yield piece
            if cut is not None and sent >= cut:
                return  # closed early, while the job runs
            if self.status != "RUNNING" and sent >= len(self.log):
                return
            await asyncio.sleep(0.01)


def follow_all(reader: JobLogReader, client: TailClient, steps: list[Any], limit: int = 2000) -> list[Any]:
    """Drives ``reader`` as torchx_ext.logs.follow does; ``steps[i]`` runs before poll i."""
    out: list[Any] = []
    for i in range(limit):
        if i < len(steps) and steps[i] is not None:
            steps[i]()
        done = reader.is_done()
        for item in reader.read_new():  # a PlainLines (no times asked for) holds a piece's lines
            out += [(None, line) for line in item] if isinstance(item, PlainLines) else [item]
        if done:
            return out
        time.sleep(0.01)
    raise AssertionError(f"not done after {limit} polls: {len(out)} lines")


def test_following_reads_each_byte_once_in_order_across_pieces() -> None:
    client = TailClient(numbered(500))
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"], timed=False)

    def more() -> None:
        client.log += numbered(500, start=500) + frame("0", 1, "o", 1.0, "other replica\n") + numbered(1, start=1000)[:-5]

    def finish() -> None:
        client.log += numbered(1, start=1000)[-5:]  # the rest of the last line
        client.status, over["v"] = "SUCCEEDED", True

    lines = follow_all(reader, client, [None, None, more, None, None, finish])
    assert [t for _, t in lines] == [f"line {i}\n" for i in range(1001)]
    assert client.tails == 1 and "/api/jobs/x/logs" not in client.gets  # the whole log was never asked for


def test_a_tail_that_ends_while_the_app_runs_is_resumed_without_repeating() -> None:
    client = TailClient(numbered(300))
    client.cut = [1000, 2500]  # two early ends, mid-line
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), "o", is_over=lambda: over["v"])

    def finish() -> None:
        client.status, over["v"] = "FAILED", True

    lines = follow_all(reader, client, [None] * 30 + [finish])
    assert [t for _, t in lines] == [f"line {i}\n" for i in range(300)]
    assert client.tails == 3


def test_following_an_app_waiting_for_its_dependencies_then_running() -> None:
    client = TailClient(numbered(20), status=None)  # no Ray job yet
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def start() -> None:
        client.status = "RUNNING"

    def finish() -> None:
        client.status, over["v"] = "SUCCEEDED", True

    lines = follow_all(reader, client, [None, None, None, start, None, None, None, finish])
    assert len(lines) == 20 and client.tails == 1


def test_following_an_app_that_already_ended_reads_its_log_once() -> None:
    client = TailClient(numbered(50), status="SUCCEEDED")
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: True)
    assert len(follow_all(reader, client, [])) == 50
    assert client.tails == 0 and client.gets.count("/api/jobs/x/logs") == 1


def test_a_dashboard_whose_tail_always_fails_is_read_whole_as_before() -> None:
    client = TailClient(numbered(40))
    client.fail = True
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def finish() -> None:
        client.log += numbered(10, start=40)
        client.status, over["v"] = "SUCCEEDED", True

    lines = follow_all(reader, client, [None] * 40 + [finish])
    assert [t for _, t in lines] == [f"line {i}\n" for i in range(50)]
    assert client.tails == JobLogReader.MAX_FAILED_STARTS


def test_an_app_over_whose_tail_ray_never_ends_ends_the_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    # a job Ray keeps PENDING after a cancel: its tail waits for a driver that never starts
    monkeypatch.setattr(JobLogReader, "QUIET_S", 0.05)
    monkeypatch.setattr(JobLogReader, "CHECK_S", 0.0)
    client = TailClient("", status="PENDING")
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def cancel() -> None:
        over["v"] = True

    assert follow_all(reader, client, [None, None, cancel]) == []


def test_a_follow_left_early_stops_its_tail() -> None:
    import gc

    client = TailClient(numbered(10))
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: False)
    reader.is_done()
    pump = reader._pump
    assert pump is not None
    del reader
    gc.collect()
    pump.thread.join(timeout=5)
    assert not pump.thread.is_alive()


def local_spec(cmd: list[str], service: bool = False) -> dict[str, Any]:
    return {"app_id": "a~b", "mode": "local", "roles": [{
        "name": "main", "service": service, "hosts_env": "TORCHX_EXT_HOSTS_MAIN", "resources": {},
        "replicas": [{"cmd": cmd, "env": {"X": "y$z"}}]}]}


def run_driver(spec: dict[str, Any]) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = driver.run(spec, driver.Output(), threading.Event())
    return code, buf.getvalue()


def test_driver_runs_a_replica_and_marks_its_lines() -> None:
    code, out = run_driver(local_spec([sys.executable, "-c",
                                       "import os, sys; print(os.environ['X'], os.environ['TORCHX_EXT_HOSTS_MAIN']); "
                                       "print('oops', file=sys.stderr); sys.exit(0)"]))
    assert code == 0
    assert "\x1etxf 0 0 o " in out and out.split("\x1etxf 0 0 o ", 1)[1].split("\n", 1)[1].startswith("y$z ")
    assert "\x1etxf 0 0 e " in out
    assert parse_verdict(out)["state"] == "SUCCEEDED"


def test_driver_reports_a_replica_that_cannot_start() -> None:
    code, out = run_driver(local_spec(["/nonexistent/binary"]))
    verdict = parse_verdict(out)
    assert code == 1 and verdict["state"] == "FAILED"
    assert "role 'main' replica 0 failed to start" in verdict["msg"]


def test_driver_stops_on_sigterm_flag() -> None:
    stopping = threading.Event()
    threading.Timer(0.5, stopping.set).start()
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = driver.run(local_spec([sys.executable, "-c", "import time; time.sleep(60)"]), driver.Output(), stopping)
    assert code == 1 and parse_verdict(buf.getvalue())["state"] == "CANCELLED"


def test_role_resources_memory_in_bytes() -> None:
    assert role_resources(role(cpu=0, memMB=1)) == {"memory": float(2**20)}


def test_a_session_reads_proxies_ca_bundle_and_netrc_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # requests reads these from the environment on every request unless a session has them
    # (trust_env=False): ours reads them when the session is made, so they still apply
    requests = pytest.importorskip("requests")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine head.example login u password p\n")
    netrc.chmod(0o600)
    for k in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/site-ca.pem")
    cls = adapter._timeout_client_class()
    head = types.SimpleNamespace(_address="http://head.example:8265", _verify=True)
    session = cls._session(head, requests)
    assert session.proxies.get("http") == "http://proxy.example:3128" and session.verify == "/etc/site-ca.pem"
    assert session.auth == ("u", "p") and not session.trust_env
    assert cls._session(types.SimpleNamespace(_address=head._address, _verify=False), requests).verify is False
    monkeypatch.setenv("NO_PROXY", "head.example")
    assert "http" not in cls._session(head, requests).proxies


def test_a_recent_submission_knows_its_cancel_marker_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # a status right after a submit asks the cluster once (the job), not twice (job + marker):
    # a cancel made on this machine, by this process or another, is noted locally
    from torchx_ext.schedulers.ray_jobs import local as rl

    monkeypatch.setenv("TORCHX_EXT_HOME", str(tmp_path))
    conns, other = rl.Connections(adapter.connect, 5.0), rl.Connections(adapter.connect, 5.0)
    for c in (conns, other):
        c.submitted("a-1")
        c.submitted("b-1")
    assert conns.marker(URL, "a-1") is False and conns.marker(URL, "old-1") is None  # not ours: ask
    conns.cancelled(URL, "a-1")
    assert conns.marker(URL, "a-1") is True and other.marker(URL, "a-1") is True  # another process
    assert other.marker(URL, "b-1") is False and other.marker("http://elsewhere:8265", "a-1") is False
    monkeypatch.setattr(rl.Connections, "RECENT_S", 0.0)
    assert conns.marker(URL, "a-1") is None  # no longer recent: the cluster's marker decides
    # an unwritable home loses the record, not the cancel (this process still knows)
    monkeypatch.setattr(rl.Connections, "RECENT_S", 10.0)
    monkeypatch.setenv("TORCHX_EXT_HOME", "/proc/no-such-home")
    conns.cancelled(URL, "b-1")
    assert conns.marker(URL, "b-1") is True
    assert conns.marker("http://elsewhere:8265", "b-1") is False  # the same id on another cluster


def test_driver_publishes_its_restart_count_beside_its_log(tmp_path: Any) -> None:
    spec = local_spec([sys.executable, "-c", "import os, sys; sys.exit(os.environ['TORCHX_EXT_ATTEMPT'] == '1')"])
    spec["retry_backoff_s"] = 0.0
    spec["roles"][0].update(max_retries=2, retry_policy="REPLICA")
    path = str(tmp_path / "torchx-ext-b.restarts.json")
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = driver.run(spec, driver.Output(restarts_path=path), threading.Event())
    assert code == 0 and parse_verdict(buf.getvalue())["num_restarts"] == 1
    assert json.load(open(path)) == {"num_restarts": 1}
    assert driver.restarts_path("b") is None  # stdout is no Ray job log here: nothing is published


def test_the_private_ray_client_api_we_use_was_checked_against_this_ray() -> None:
    """ray_jobs/adapter.py is the one adapter on Ray's private client API: the installed Ray is a
    version it was checked against, and every private member it uses is still there."""
    import ray
    from ray.job_submission import JobSubmissionClient


    if ray.__version__ not in adapter.RAY_CHECKED:  # a new Ray: what can be checked here is, below; the rest by a person
        import warnings

        warnings.warn(f"Ray {ray.__version__} is not one ray_jobs/adapter.py was checked against {adapter.RAY_CHECKED}: "
                      f"check {adapter.PRIVATE_CLIENT_MEMBERS} and the fields _address/_headers/_cookies/_verify, "
                      "then add it", stacklevel=1)
    for name in adapter.PRIVATE_CLIENT_MEMBERS:
        assert callable(getattr(JobSubmissionClient, name, None)), name
    import inspect

    init = inspect.getsource(JobSubmissionClient.__init__) + inspect.getsource(JobSubmissionClient.__mro__[1].__init__)
    for field in ("_address", "_headers", "_cookies", "_verify"):
        assert f"self.{field}" in init, field


class FakeGang:
    """A gang without Ray for the driver's launcher: ``codes[(replica, attempt)]`` is how that
    attempt ends (absent: it runs until stopped); ``fail_start`` the attempts that cannot start."""

    def __init__(self, n: int, codes: dict[tuple[int, int], int], fail_start: tuple[tuple[int, int], ...] = ()) -> None:
        self.n, self.codes, self.fail_start = n, codes, fail_start
        self.ips = [f"10.0.0.{i}" for i in range(n)]
        self.attempt: dict[int, int] = {}
        self.started: list[tuple[int, int]] = []
        self.stopped: list[int] = []

    def reserve(self) -> None:
        return None

    def node_ips(self) -> list[str]:
        return list(self.ips)

    def prepare(self, indices: list[int]) -> dict[int, str]:
        return {}

    def start(self, cmds: list[tuple[list[str], dict[str, str]]], indices: list[int]) -> list[Any]:
        out: list[Any] = []
        for i in indices:
            a = int(cmds[i][1]["TORCHX_EXT_ATTEMPT"])
            if (i, a) in self.fail_start:
                out.append("exec: no such file")
                continue
            self.attempt[i] = a
            self.started.append((i, a))
            out.append(None)
        return out

    def poll(self) -> list[tuple[list[Any], Any, str]]:
        return [([], self.codes.get((i, self.attempt[i])) if i in self.attempt else None, "") for i in range(self.n)]

    def stop(self, indices: list[int]) -> None:
        self.stopped += indices

    def close(self) -> None:
        pass


def gang_spec(n: int, policy: str = "REPLICA", max_retries: int = 1, backoff: float = 0.0) -> dict[str, Any]:
    return {"app_id": "a~b", "mode": "gang", "retry_backoff_s": backoff, "poll_interval_s": 0.01, "roles": [{
        "name": "w", "service": False, "hosts_env": "TORCHX_EXT_HOSTS_W", "resources": {},
        "max_retries": max_retries, "retry_policy": policy, "replicas": [{"cmd": ["x"], "env": {}}] * n}]}


def run_gang(spec: dict[str, Any], gang: FakeGang, stopping: Optional[threading.Event] = None) -> tuple[int, dict[str, Any], str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = driver.run(spec, driver.Output(), stopping or threading.Event(), group=gang)
    return code, parse_verdict(buf.getvalue()), buf.getvalue()


def test_the_driver_performs_the_engines_restarts() -> None:
    """The Ray driver decides with the group engine of every backend: REPLICA restarts only the
    replica that failed, its attempt marked in its log and counted; ROLE restarts the role."""
    gang = FakeGang(2, {(0, 1): 0, (1, 1): 3, (1, 2): 0})
    code, verdict, out = run_gang(gang_spec(2), gang)
    assert code == 0 and verdict["state"] == "SUCCEEDED" and verdict["num_restarts"] == 1, verdict
    assert gang.started == [(0, 1), (1, 1), (1, 2)]
    assert ("[torchx-ext] attempt 2 of role 'w' replica 1 begins: role 'w' replica 1 ended with exit code 3; "
            "REPLICA policy, restart 1 of 1") in out
    assert [r["attempt"] for r in verdict["replicas"]] == [1, 2] and verdict["replicas"][1]["host"] == "10.0.0.1"
    gang = FakeGang(2, {(1, 1): 3, (0, 2): 0, (1, 2): 0})  # replica 0 runs on until the role restarts
    code, verdict, _ = run_gang(gang_spec(2, "ROLE"), gang)
    assert code == 0 and verdict["num_restarts"] == 1 and gang.stopped == [0]
    assert sorted(gang.started) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    gang = FakeGang(2, {(0, 1): 0, (1, 1): 3, (1, 2): 4})  # the budget is spent: the engine's words
    code, verdict, _ = run_gang(gang_spec(2), gang)
    assert code == 1 and verdict["msg"] == ("role 'w' replica 1 failed with exit code 4: "
                                            "after 2 attempts (REPLICA policy, max_retries=1)"), verdict


def test_the_driver_starts_all_or_nothing_and_a_cancel_stops_a_due_restart() -> None:
    gang = FakeGang(2, {}, fail_start=((1, 1),))
    code, verdict, _ = run_gang(gang_spec(2), gang)
    assert code == 1 and verdict["msg"].startswith("role 'w' replica 1 failed to start: exec: no such file")
    assert gang.stopped == [0]  # the replica that did start
    stopping = threading.Event()
    gang = FakeGang(1, {(0, 1): 1})
    threading.Timer(0.3, stopping.set).start()
    code, verdict, _ = run_gang(gang_spec(1, backoff=30.0), gang, stopping)  # restart due in 30 s
    assert code == 1 and verdict["state"] == "CANCELLED" and gang.started == [(0, 1)], verdict


def ready_spec(port: int, timeout: float = 30.0) -> dict[str, Any]:
    """A gang of a service with ``port`` and a client (FakeGang replicas 0 and 1)."""
    spec = gang_spec(1, max_retries=0)
    spec["ready_timeout_s"] = timeout
    spec["roles"] = [{**spec["roles"][0], "name": "server", "service": True, "ports": [port]},
                     {**spec["roles"][0], "name": "client"}]
    return spec


def test_the_driver_starts_the_others_once_the_service_accepts_connections_where_it_runs() -> None:
    """The service starts alone; the driver connects to its port at its node's address and the
    client starts only once that accepts (here: a listener opened 0.5 s after the start)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    gang = FakeGang(2, {(1, 1): 0})
    gang.ips = ["127.0.0.1", "10.0.0.1"]  # the service's node; the driver must not probe the client's
    started: dict[int, float] = {}
    start = gang.start

    def timed_start(cmds: list[tuple[list[str], dict[str, str]]], indices: list[int]) -> list[Any]:
        started.update({i: time.time() for i in indices})
        return start(cmds, indices)

    gang.start = timed_start  # type: ignore[method-assign]
    threading.Timer(0.5, listener.listen).start()
    t0 = time.time()
    try:
        code, verdict, out = run_gang(ready_spec(port), gang)
    finally:
        listener.close()
    assert code == 0 and verdict["state"] == "SUCCEEDED", verdict
    assert gang.started == [(0, 1), (1, 1)] and started[1] - t0 >= 0.5, (gang.started, started, t0)
    assert f"to accept connections on 127.0.0.1 port(s) {port}" in out
    assert gang.stopped == [0]  # the service, once the client succeeded


def closed_port() -> int:
    """A port of 127.0.0.1 nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_gang(n: int, codes: dict[tuple[int, int], int]) -> FakeGang:
    gang = FakeGang(n, codes)
    gang.ips = ["127.0.0.1"] * n  # (an address of no host may accept connections where tests run)
    return gang


def test_a_service_not_ready_in_time_fails_the_app_and_the_held_client_never_starts() -> None:
    port = closed_port()
    gang = local_gang(2, {})
    t0 = time.time()
    code, verdict, _ = run_gang(ready_spec(port, timeout=0.5), gang)
    assert code == 1 and verdict["msg"] == (
        f"service role 'server' replica 0 was not ready: port {port} did not accept connections within "
        "0.5 s (run option ready_timeout_s); the other roles were not started"), verdict
    assert time.time() - t0 < 5 and gang.started == [(0, 1)] and gang.stopped == [0]
    # (the engine's record: the service is the culprit, its reason says why; the held client never ran)
    assert [r["state"] for r in verdict["replicas"]] == ["FAILED", "CANCELLED"], verdict


def test_a_service_that_ends_before_it_is_ready_is_no_longer_probed_and_a_cancel_while_held_works() -> None:
    gang = local_gang(2, {(0, 1): 2})  # the service fails at once
    code, verdict, _ = run_gang(ready_spec(closed_port()), gang)
    assert code == 1 and verdict["msg"] == "service role 'server' replica 0 ended early with exit code 2", verdict
    assert gang.started == [(0, 1)]
    probes = [t for t in threading.enumerate() if t.name.startswith("torchx-ext-probe-")]
    stopping = threading.Event()
    gang = local_gang(2, {})
    threading.Timer(0.3, stopping.set).start()
    code, verdict, _ = run_gang(ready_spec(closed_port()), gang, stopping)
    assert code == 1 and verdict["state"] == "CANCELLED" and gang.started == [(0, 1)], verdict
    assert gang.stopped == [0]  # the held client was never started: nothing of it to stop
    probes += [t for t in threading.enumerate() if t.name.startswith("torchx-ext-probe-")]
    time.sleep(readiness.RETRY_S + readiness.CONNECT_TIMEOUT_S + 0.2)
    assert not any(t.is_alive() for t in probes)


def test_the_held_replicas_are_published_and_described_pending() -> None:
    """Ray has the job RUNNING while the client waits for the server: the driver publishes the
    held replicas (beside its log, with the restart count) and describe shows them PENDING."""
    published: list[dict[str, Any]] = []

    class Recorded(driver.Output):
        def publish(self, **fields: Any) -> None:
            super().publish(**fields)
            published.append(dict(self.published))

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    threading.Timer(0.3, listener.listen).start()
    try:
        with redirect_stdout(io.StringIO()):
            code = driver.run(ready_spec(listener.getsockname()[1]), Recorded(), threading.Event(),
                              group=local_gang(2, {(1, 1): 0}))
    finally:
        listener.close()
    assert code == 0 and published == [{"num_restarts": 0, "held": [["client", 0]]},
                                       {"num_restarts": 0, "held": []}], published
    meta = {"torchx_ext_roles": json.dumps([{"name": "server", "num_replicas": 1, "service": True},
                                            {"name": "client", "num_replicas": 1, "service": False}])}
    resp = RayJobsScheduler._response("a", meta, AppState.RUNNING, "", {"held": [["client", 0]]})
    assert [r.replicas[0].state for r in resp.roles_statuses] == [AppState.RUNNING, AppState.PENDING]


def test_the_probes_say_only_what_is_still_wanted() -> None:
    """A probe that found its ports just as its attempt was stopped, or of an earlier attempt,
    is not reported."""
    probes = readiness.Probes(connect=lambda host, port, timeout: True)
    probes.start(0, 1, "h", [1])
    probes.start(1, 1, "h", [1])
    probes.start(1, 2, "h", [1])  # a restart: attempt 1's probe is over
    deadline = time.time() + 5
    while probes._found.qsize() < 2 and time.time() < deadline:
        time.sleep(0.01)
    probes.cancel([0])
    assert probes.ready() == [(1, 2)]
    assert probes.ready() == []


def test_the_shipped_package_probes_with_the_engine_it_carries() -> None:
    """On the cluster there is no torchx_ext: readiness takes the probe from the engine copied into
    ray_jobs_cluster (ray_jobs.local.cluster_package)."""
    import subprocess

    from torchx_ext.schedulers.ray_jobs.local import cluster_package

    code = ("import sys; sys.modules['torchx_ext'] = sys.modules['torchx'] = None; "
            "import ray_jobs_cluster.readiness as r; print(r.start_probe.__module__, r.accepts.__module__)")
    out = subprocess.run([sys.executable, "-E", "-s", "-c", code], cwd=os.path.dirname(cluster_package()),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ray_jobs_cluster.engine.probe"] * 2, out


def test_delete_jobs_reads_the_listing_first_and_says_what_ray_kept() -> None:
    """One GET per job only after the first pass (which reads the listing); a job Ray keeps is
    returned once the patience runs out without progress, not reported as deleted."""
    old = int((time.time() - 60) * 1000)

    class Client:
        def __init__(self) -> None:
            self.jobs = {i: types.SimpleNamespace(submission_id=i, status="SUCCEEDED", end_time=old)
                         for i in ("a", "b", "stuck")}
            self.gets: list[str] = []

        def _do_request(self, method: str, endpoint: str) -> Any:
            sid = endpoint.rsplit("/", 1)[-1]
            self.gets.append(sid)
            job = self.jobs.get(sid)
            if job is None:
                return types.SimpleNamespace(status_code=404, json=lambda: {})
            body = {"type": "SUBMISSION", "submission_id": sid, "status": job.status, "entrypoint": "e",
                    "end_time": job.end_time}
            return types.SimpleNamespace(status_code=200, json=lambda: body)

        def delete_job(self, sid: str) -> None:
            if sid != "stuck":  # Ray's monitor writes this one back every time
                self.jobs.pop(sid, None)

    client = Client()
    listed = dict(client.jobs)
    left = rc.delete_jobs(client, ["a", "b", "stuck", "marker-made-since"], patience_s=1.5, listed=listed)
    assert left == ["stuck"]
    assert "a" not in client.jobs and "b" not in client.jobs
    # the first pass asked only for the job the listing did not have; later passes confirm
    assert client.gets[0] == "marker-made-since" and client.gets.count("a") == 1


def test_the_broker_ships_the_package_its_entrypoint_imports() -> None:
    """The broker's entrypoint is ``python -m ray_jobs_cluster.broker``: the directory it ships
    must be that package (Ray names a py_module by its directory), with the broker in it."""
    from torchx_ext.schedulers.ray_jobs.deps import Brokers

    class Client:
        submitted: list[dict[str, Any]] = []

        def list_jobs(self) -> list[Any]:
            return []

        def submit_job(self, **kw: Any) -> str:
            self.submitted.append(kw)
            return str(kw["submission_id"])

    client = Client()
    assert Brokers().ensure(client, "http://head:8265", "python3")
    (job,) = client.submitted
    (package,) = job["runtime_env"]["py_modules"]
    module = job["entrypoint"].split()[-1]
    assert module == "ray_jobs_cluster.broker" and os.path.basename(package) == "ray_jobs_cluster"
    assert os.path.isfile(os.path.join(package, "broker.py"))
