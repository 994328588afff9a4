"""``ray_jobs`` log follow through the dashboard's state API log stream (``/api/v0/logs/stream``),
against a small HTTP server that streams as Ray's does (the whole log from its first byte, then
what is appended, never ending by itself); the real dashboard's is covered by test_ray_jobs.py."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.parse
from typing import Any, Iterator, Optional

import pytest

from test_ray_jobs_unit import TailClient, follow_all, frame, numbered
from torchx_ext.schedulers.ray_jobs.cluster import VERDICT_MARK
from torchx_ext.schedulers.ray_jobs.logs import JobLogReader

VERDICT = VERDICT_MARK + '{"state": "SUCCEEDED", "msg": "", "replicas": [], "num_restarts": 0}\n'


class StreamClient(TailClient):
    """A dashboard with the state API's log stream: ``missing`` answers it 404 (an older Ray),
    ``cut`` closes a stream after that many bytes (a restarted dashboard), ``node`` is the job's
    driver node (None: PENDING). ``streams`` counts the streams opened, ``queries`` their queries."""

    def __init__(self, log: str = "", status: Optional[str] = "RUNNING") -> None:
        super().__init__(log, status)
        self.missing = False
        self.node: Optional[str] = "n1"
        self.streams = 0
        self.sent = 0  # bytes of log sent over all streams
        self.queries: list[dict[str, list[str]]] = []
        self.headers_seen: list[Optional[str]] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._address = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._headers = {"Authorization": "Bearer secret"}
        self._cookies = None
        self._verify = True
        self.request_timeout_s = 0.2

    def _do_request(self, method: str, endpoint: str) -> Any:
        r = super()._do_request(method, endpoint)
        if endpoint == "/api/jobs/x" and self.status is not None:
            job = {**r.json(), "driver_node_id": self.node}
            r.json = lambda: job
        return r

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _chunks(self) -> Iterator[bytes]:
        cut = self.cut.pop(0) if self.cut else None
        sent = 0
        while True:
            data = self.log.encode()
            end = len(data) if cut is None else min(cut, len(data))
            if sent < end:
                piece = data[sent:min(end, sent + 1000)]
                sent += len(piece)
                self.sent += len(piece)
                yield piece
            elif cut is not None and sent >= cut:
                return
            else:
                time.sleep(0.01)

    def _handler(self) -> Any:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urllib.parse.urlsplit(self.path)
                owner.headers_seen.append(self.headers.get("Authorization"))
                if owner.missing or url.path != "/api/v0/logs/stream":
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                owner.streams += 1
                owner.queries.append(urllib.parse.parse_qs(url.query))
                chunks = owner._chunks()
                first = next(chunks)  # as Ray's: the answer comes with the first chunk
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in _prepend(first, chunks):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                except OSError:  # the follower closed the stream
                    return
                self.close_connection = True  # a cut: the connection ends without the last chunk

        return Handler


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


@pytest.fixture
def client() -> Iterator[StreamClient]:
    c = StreamClient(numbered(300))
    yield c
    c.close()


def lines_of(out: list[Any]) -> list[str]:
    return [t for _, t in out]


def test_a_follow_streams_each_byte_once_and_ends_after_the_verdict(client: StreamClient) -> None:
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"], timed=False)

    def more() -> None:
        client.log += numbered(200, start=300) + frame("0", 1, "o", 1.0, "other replica\n")

    def finish() -> None:
        client.log += VERDICT
        client.status, over["v"] = "SUCCEEDED", True

    t0 = time.monotonic()
    out = follow_all(reader, client, [None, None, more, None, None, finish])
    assert lines_of(out) == [f"line {i}\n" for i in range(500)]
    assert client.streams == 1 and client.tails == 0 and "/api/jobs/x/logs" not in client.gets
    assert client.sent == len(client.log.encode())  # each byte once
    assert client.queries[0]["node_id"] == ["n1"] and client.queries[0]["submission_id"] == ["x"]
    assert client.queries[0]["lines"] == ["-1"]
    assert client.headers_seen == ["Bearer secret"]  # the client's own token, to its own address
    assert time.monotonic() - t0 < JobLogReader.QUIET_S  # the verdict ended it, not the quiet


def test_a_lost_driver_without_a_verdict_ends_after_the_quiet(client: StreamClient,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(JobLogReader, "QUIET_S", 0.3)
    monkeypatch.setattr(JobLogReader, "CHECK_S", 0.0)
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), "o", is_over=lambda: over["v"])

    def lost() -> None:
        client.status, over["v"] = "FAILED", True

    assert lines_of(follow_all(reader, client, [None, None, lost])) == [f"line {i}\n" for i in range(300)]


def test_a_stream_cut_while_the_app_runs_is_resumed_without_repeating(client: StreamClient) -> None:
    client.cut = [5000, 9000]  # two early ends, mid-line
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def finish() -> None:
        client.log += VERDICT
        client.status, over["v"] = "SUCCEEDED", True

    out = follow_all(reader, client, [None] * 30 + [finish])
    assert lines_of(out) == [f"line {i}\n" for i in range(300)]
    assert client.streams == 3 and client.tails == 0


def test_a_dashboard_without_the_stream_is_followed_through_rays_tail(client: StreamClient) -> None:
    client.missing = True
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def finish() -> None:
        client.status, over["v"] = "SUCCEEDED", True

    out = follow_all(reader, client, [None] * 5 + [finish])
    assert lines_of(out) == [f"line {i}\n" for i in range(300)]
    assert client.streams == 0 and client.tails == 1


def test_a_pending_job_is_streamed_once_its_driver_runs(client: StreamClient) -> None:
    client.node, client.status = None, "PENDING"
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def start() -> None:
        client.node, client.status = "n1", "RUNNING"

    def finish() -> None:
        client.log += VERDICT
        client.status, over["v"] = "SUCCEEDED", True

    out = follow_all(reader, client, [None, None, None, start, None, None, finish])
    assert len(out) == 300 and client.streams == 1 and client.tails == 0


def test_a_started_job_without_a_driver_node_is_followed_through_rays_tail(client: StreamClient) -> None:
    client.node = None  # an older Ray's job details
    over = {"v": False}
    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: over["v"])

    def finish() -> None:
        client.status, over["v"] = "SUCCEEDED", True

    out = follow_all(reader, client, [None] * 3 + [finish])
    assert len(out) == 300 and client.streams == 0 and client.tails == 1


def test_a_follow_left_early_closes_a_quiet_stream(client: StreamClient) -> None:
    import gc

    reader = JobLogReader(client, "x", ("0", 0), None, is_over=lambda: False)
    reader.is_done()
    pump = reader._pump
    assert pump is not None
    deadline = time.monotonic() + 5
    while not reader.read_new() and time.monotonic() < deadline:
        time.sleep(0.01)
    del reader  # the stream now waits in a read for a log that does not grow
    gc.collect()
    pump.thread.join(timeout=5)
    assert not pump.thread.is_alive()
