"""A ``ray_jobs`` replica's log: the job log demultiplexed (frames, see
``ray_jobs_cluster.FRAME_MARK``), read once or followed (the state API's log stream, else Ray's
log tail), each byte once."""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import re
import threading
import time
import weakref
from typing import Any, Callable, Optional

from torchx_ext.logs import LogItem, PlainLines
from torchx_ext.schedulers.ray_jobs import adapter, cluster
from torchx_ext.schedulers.ray_jobs.client import get_job, get_json
from torchx_ext.schedulers.ray_jobs.cluster.broker import KIND

# ---------------------------------------------------------------------------- jobs, logs ---
_LINES = re.compile(".*\n")  # whole lines; "." is anything but "\n"
_OTHER_BREAKS = ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e")  # where ASCII text's splitlines also splits


def whole_lines(text: str, end: int) -> list[str]:
    r"""The lines of ``text[:end]`` (which ends with a newline), split at newlines only, each with its own.

    ``str.splitlines`` is the cheaper split (~15% of a follow's line splitting) but also splits
    at ``\r``, ``\x0b``... and, in non-ASCII text, ``\x85``, ``\u2028``...: it is used only for ASCII
    text without those (``isascii`` is O(1); the scans cost ~5% of the split), else the regex."""
    if text.isascii() and not any(c in text for c in _OTHER_BREAKS):
        return (text if end == len(text) else text[:end]).splitlines(True)
    return _LINES.findall(text, 0, end)


class LogDemux:
    """Turns the job log's text, fed in pieces, into the lines of one replica (or of the driver).

    ``key``: ``(role index, replica)``, or None for the driver's own lines and Ray's; ``stream``:
    ``"o"``/``"e"`` or None for both; ``timed``: hand each line with its frame's time (only
    since/until need it: without it a replica's lines come as :class:`PlainLines`, one item per
    piece, and a line without a time is never dropped by a filter). The log is a sequence of
    frames (``cluster.FRAME_MARK``), the verdict line, and Ray's own lines: a frame's text is taken
    or skipped by its length, so the cost is per frame and per piece, not per line of the log.
    A replica line's text keeps its newline (``filter_lines`` adds one only where it is missing).
    """

    def __init__(self, key: Optional[tuple[str, int]], stream: Optional[str], timed: bool = True) -> None:
        self.key, self.stream, self.timed = key, stream, timed
        self._want = (cluster.DRIVER_ROLE, "0") if key is None else (str(key[0]), str(key[1]))
        self._partial = ""  # a header or unframed line whose end has not come yet
        self._left = 0  # characters of the current frame still to come
        self._mine = False  # the current frame is this reader's
        self._time: Optional[float] = None  # the current frame's time
        self._held = ""  # this reader's frame text after its last complete line
        self.verdict = False  # the driver's verdict line (its last) was fed

    def feed(self, text: str) -> list[LogItem]:
        """The complete lines of ``text`` (after what was fed before) that are this reader's."""
        out: list[LogItem] = []
        if self._partial:
            text, self._partial = self._partial + text, ""
        pos, end = 0, len(text)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                if self._mine:
                    self._take(text[pos:pos + take], out)
                pos += take
                self._left -= take
                if not self._left and self._held:  # a frame must end with its line's end: it did not
                    self._take("\n", out)
                continue
            nl = text.find("\n", pos)
            if nl < 0:
                self._partial = text[pos:]
                break
            self._line(text[pos:nl], out)
            pos = nl + 1
        return out

    def _line(self, line: str, out: list[LogItem]) -> None:
        """A line outside any frame: a frame's header, the verdict, or Ray's own."""
        if line.startswith(cluster.FRAME_MARK):
            parts = line[len(cluster.FRAME_MARK):].split(" ")
            if len(parts) == 5 and parts[4].isdigit():
                role, replica, stream, ts, length = parts
                self._left = int(length)
                self._mine = ((role, replica) == self._want
                              and (self.stream is None or stream == self.stream))
                if self._mine:
                    try:
                        self._time = float(ts) if self.timed or self.key is None else None
                    except ValueError:
                        self._time = None
                return
        if line.startswith(cluster.VERDICT_MARK):
            self.verdict = True
            return
        if self.key is None:  # Ray's own lines and anything else the driver printed
            out.append((None, line))

    def _take(self, piece: str, out: list[LogItem]) -> None:
        if self._held:
            piece, self._held = self._held + piece, ""
        cut = piece.rfind("\n") + 1
        if cut < len(piece):
            self._held = piece[cut:]
        if not cut:
            return
        lines = whole_lines(piece, cut)
        if self.key is not None and not self.timed:
            out.append(PlainLines(lines))
        else:
            t = self._time
            out.extend([(t, line) for line in lines])


def _not_a_normal_close(record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO and str(record.msg).startswith("WebSocket closed for job"))


@functools.cache
def _quiet_tail_close() -> None:
    """Ray's client logs an INFO line at every normal end of a tail ("WebSocket closed for job
    ..."), which Ray's own handler prints under ``torchx log -t``: that one line is dropped."""
    logging.getLogger("ray.dashboard.modules.job.sdk").addFilter(_not_a_normal_close)


class _Feed:
    """What a transport thread hands its reader: pieces of the log's text, taken in batches.

    It holds no reference to its reader: a reader dropped by its caller (a ``log_iter`` left
    early) is collected, and its finalizer stops the transport."""

    LIMIT = 32 << 20  # characters held for a reader that lags; then the transport waits (TCP slows the dashboard)

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None
        self.unsupported = False  # the dashboard has no such transport: use another
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._size = 0
        self._finished = False  # the transport ended (see error); set after its last piece
        self.thread: threading.Thread

    def take(self) -> tuple[list[str], bool]:
        """What arrived since the last call, and whether the transport has ended (nothing follows)."""
        with self._cond:
            pieces, self._pieces, self._size = self._pieces, [], 0
            self._cond.notify_all()
            return pieces, self._finished

    def _put(self, pieces: list[str]) -> None:
        with self._cond:
            while self._size >= self.LIMIT and not self.stopped.is_set():
                self._cond.wait(0.5)  # blocks the transport while the reader lags
            self._pieces += pieces
            self._size += sum(map(len, pieces))

    def _finish(self) -> None:
        with self._cond:
            self._finished = True

    def stop(self) -> None:
        self.stopped.set()


class _Stream(_Feed):
    """The job log through the dashboard's state API stream (:func:`adapter.open_log_stream`)
    read in a plain thread. Why not Ray's tail: the stream sends 200 MB in ~3,000 chunks of
    64 KiB over plain HTTP, which cost a follower ~0.07 s of CPU where Ray's ~200,000 websocket
    messages cost ~0.5 s (measured on the testbed). It starts at the log's first byte (the API
    has no offset): a resumed stream skips ``skip`` characters, already read."""

    def __init__(self, client: Any, sid: str, node_id: str, skip: int) -> None:
        super().__init__()
        self._response: Any = None
        self.thread = threading.Thread(target=self._run, args=(client, sid, node_id, skip),
                                       name=f"ray-log-stream-{sid}", daemon=True)
        self.thread.start()

    def _open(self, client: Any, sid: str, node_id: str) -> Any:
        import requests

        timeout = float(getattr(client, "request_timeout_s", 10.0))
        while not self.stopped.is_set():
            try:
                return adapter.open_log_stream(client, sid, node_id, timeout)
            except requests.exceptions.ReadTimeout:
                continue  # the log has no byte yet, and the dashboard answers with the first: ask again
        return None

    def _run(self, client: Any, sid: str, node_id: str, skip: int) -> None:
        try:
            response = self._response = self._open(client, sid, node_id)
            if response is None:
                self.unsupported = not self.stopped.is_set()
                return
            if self.stopped.is_set():  # stopped while it opened: stop() found no socket to shut
                adapter.close_log_stream(response)
            decode = codecs.getincrementaldecoder("utf-8")("replace").decode
            with response:
                for chunk in response.iter_content(chunk_size=None):
                    piece = decode(chunk)
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    if piece:
                        self._put([piece])
                    if self.stopped.is_set():
                        return
        except BaseException as e:  # noqa: B036, BLE001 - handed to the reader, which decides what it means
            self.error = e
        finally:
            self._finish()

    def stop(self) -> None:
        super().stop()
        if self._response is not None:
            adapter.close_log_stream(self._response)


class _Pump(_Feed):
    """Ray's log tail of one job (``JobSubmissionClient.tail_job_logs``: the dashboard's
    ``/api/jobs/<id>/logs/tail`` websocket, with the client's own headers and cookies, to the
    client's own address) run in a thread of its own, collecting what arrives for ``take``: the
    transport where the dashboard has no log stream (see :class:`_Stream`)."""

    def __init__(self, client: Any, sid: str, skip: int) -> None:
        super().__init__()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.thread = threading.Thread(target=self._run, args=(client, sid, skip), name=f"ray-log-tail-{sid}",
                                       daemon=True)
        self.thread.start()

    async def _tail(self, client: Any, sid: str, skip: int) -> None:
        # Ray's tail sends the log in messages of at most ~1,000 characters (200,000 for 200 MB):
        # they are handed to the reader in batches, not one at a time under the lock (that cost
        # a 200 MB follow ~0.25 s of CPU). A batch is handed on once the loop is idle (call_soon
        # runs after the messages already received are consumed), so it never waits for a
        # message that has not come.
        _quiet_tail_close()
        loop = asyncio.get_running_loop()
        batch: list[str] = []

        def flush() -> None:
            if batch:
                self._put(batch[:])
                batch.clear()

        tail = client.tail_job_logs(sid)
        try:
            async for piece in tail:
                if skip:  # a resumed tail starts from the log's beginning again
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                if piece:
                    if not batch:
                        loop.call_soon(flush)
                    batch.append(piece)
                if self.stopped.is_set():
                    return
        finally:
            flush()
            await tail.aclose()

    def _run(self, client: Any, sid: str, skip: int) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._task = loop.create_task(self._tail(client, sid, skip))
            loop.run_until_complete(self._task)
        except BaseException as e:  # noqa: B036, BLE001 - handed to the reader, which decides what it means
            self.error = e
        finally:
            loop.close()
            self._finish()

    def stop(self) -> None:
        super().stop()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the tail is over
                pass


class JobLogReader:
    """New lines of one replica (or of the driver) from the job's log, demultiplexed.

    Two ways to read, chosen by the caller's first call (:func:`torchx_ext.logs.follow` asks
    ``is_done`` first only when it follows):

    * ``read_new`` first: a one-shot read of the whole log as it is now (``GET /api/jobs/<id>/logs``);
      a later ``read_new`` gets what came since (the whole log again: for a read, not a follow);
    * ``is_done`` first (following): the dashboard's log stream (:class:`_Stream`), or Ray's log
      tail (:class:`_Pump`) where there is none, delivers each byte of the log once, as it is
      written; ``read_new`` returns what arrived. Without a Ray job or its driver yet (an app
      waiting for its dependencies, a PENDING job) it waits as before; a transport that ends
      while the app runs (the dashboard or the driver node's agent restarted) is resumed,
      skipping what was read; ``is_over`` (the app ended, or its dashboard is lost) ends a follow
      whose transport does not end by itself.

    Where the follow ends: Ray's tail ends by itself once the job is over and its log read. The
    log stream never ends, so the end is decided here: the job is over (its driver has exited,
    the log is complete) and the driver's verdict line, which it writes last, after every
    replica line, has been read: a replica's follow ends then, and the driver's own after a quiet
    ``END_GAP_S`` (longer than the agent's look at the file's end,
    ``adapter.LOG_STREAM_INTERVAL_S``) that lets Ray's own trailing lines of its log arrive. A
    driver that was lost writes no verdict: the job over and ``QUIET_S`` without a byte end it, as
    for a tail Ray does not end. (The state API tells neither a log's size nor where a stream is,
    so a byte count cannot say it; the verdict can.)
    """

    CHECK_S = 2.0  # while the log streams, the app's state is asked this often
    QUIET_S = 5.0  # the app is over and the log was silent this long: nothing more will come
    END_GAP_S = 1.0  # the app is over, its verdict read, and the log silent this long: the end
    MAX_FAILED_STARTS = 3  # tails that ended at once, in a row: read the whole log, as before

    def __init__(self, client: Any, sid: str, key: Optional[tuple[str, int]], stream: Optional[str],
                 is_over: Optional[Callable[[], bool]] = None, timed: bool = True) -> None:
        self.client, self.sid, self.key, self.stream = client, sid, key, stream
        self.demux = LogDemux(key, stream, timed)
        self.is_over = is_over or (lambda: True)
        self.offset = 0  # characters of the log fed to the demultiplexer
        self._following = False
        self._pump: Optional[_Feed] = None
        self._tail = False  # the dashboard has no log stream: Ray's tail instead
        self._finalizer: Optional[Callable[[], Any]] = None  # a weakref.finalize
        self._failed_starts = 0
        self._got_data = False  # the current tail delivered something
        self._ended = False  # the current tail ended (normally or with an error), and all it got was taken
        self._last_check = 0.0
        self._last_data = 0.0
        self._whole = False  # fell back to whole-log reads

    # -------------------------------------------------------------- one-shot ----------------
    def _read_whole(self) -> list[LogItem]:
        found = get_json(self.client, f"/api/jobs/{self.sid}/logs")
        if found is None:  # still waiting for its dependencies
            return []
        text = str(found.get("logs") or "")
        piece, self.offset = text[self.offset:], max(self.offset, len(text))
        return self.demux.feed(piece)

    def read_new(self) -> list[LogItem]:
        if not self._following or self._whole:
            return self._read_whole()
        if self._pump is None:
            return []
        pieces, self._ended = self._pump.take()
        if not pieces:
            return []
        self._got_data = True
        self._last_data = time.monotonic()
        text = "".join(pieces)
        self.offset += len(text)
        return self.demux.feed(text)

    # -------------------------------------------------------------- following ---------------
    def is_done(self) -> bool:
        """Nothing more will come after the next ``read_new``; starts (and resumes) the transport."""
        self._following = True
        if self._whole:
            return self.is_over()
        pump = self._pump
        if pump is None:
            if self.is_over():
                self._whole = True  # ended before it was ever followed (or never ran): read it once
                return True
            self._start()
            return False
        if self._ended and pump.unsupported:
            self._tail = True
            self._start()
            return False
        if self._ended:
            # Ray ends its tail once the job is over and the log is read to its end; any other
            # end (an error, a restarted dashboard or agent) while the app runs is resumed
            if self.is_over():
                return True
            self._failed_starts = 0 if self._got_data else self._failed_starts + 1
            if self._failed_starts >= self.MAX_FAILED_STARTS:
                self._whole = True  # this dashboard does not tail: read the whole log, as before
                return False
            self._start()
            return False
        if not pump.thread.is_alive():
            return False  # its end is taken by the next read_new
        now = time.monotonic()
        # once the verdict is read the job ends within moments: asked at every poll from then
        if now - self._last_check < self.CHECK_S and not self.demux.verdict:
            return False
        quiet = now - self._last_data
        if self.demux.verdict and self.demux.key is None and quiet < self.END_GAP_S:
            return False  # the driver's log: Ray's own lines may follow the verdict (a replica's never do)
        self._last_check = now
        return self.is_over() and (self.demux.verdict or quiet >= self.QUIET_S)

    def _start(self) -> None:
        job = get_job(self.client, self.sid)
        meta = (job.metadata or {}) if job is not None else {}
        if job is None or meta.get(KIND) == "verdict":
            # no Ray job yet (waiting for dependencies), or a decided app that never ran: nothing to tail
            self._pump = None
            return
        node = getattr(job, "driver_node_id", None)
        status = getattr(job.status, "value", job.status)
        if not self._tail and node is None and status == "PENDING" and adapter.has_log_stream(self.client):
            self._pump = None  # no driver yet: its log has no node to stream it from (a started job
            return  # without one is an older Ray's: Ray's tail, below)
        self.stop()
        self._ended = self._got_data = False
        self._last_data = time.monotonic()
        if self._tail or node is None:
            self._pump = _Pump(self.client, self.sid, self.offset)
        else:
            self._pump = _Stream(self.client, self.sid, str(node), self.offset)
        self._finalizer = weakref.finalize(self, self._pump.stop)

    def stop(self) -> None:
        """Ends the log's transport (if any) now."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


