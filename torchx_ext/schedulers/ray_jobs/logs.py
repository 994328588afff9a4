"""A ``ray_jobs`` replica's log: the job log demultiplexed (frames, see
``ray_jobs_cluster.FRAME_MARK``), read once or followed through Ray's log tail, each byte once."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
import weakref
from typing import Any, Callable, Optional

from torchx_ext.logs import LogItem, PlainLines
from torchx_ext.schedulers.ray_jobs import cluster as cluster
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


class _Pump:
    """Ray's log tail of one job (``JobSubmissionClient.tail_job_logs``: the dashboard's
    ``/api/jobs/<id>/logs/tail`` websocket, with the client's own headers and cookies, to the
    client's own address) run in a thread of its own, collecting what arrives for ``take``.

    It holds no reference to its reader: a reader dropped by its caller (a ``log_iter`` left
    early) is collected, and its finalizer cancels the tail."""

    LIMIT = 32 << 20  # characters held for a reader that lags; then the tail waits (TCP slows the dashboard)

    def __init__(self, client: Any, sid: str, skip: int) -> None:
        self.stopped = threading.Event()
        self.error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._size = 0
        self._finished = False  # the tail ended (see error); set after its last piece
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task[None]] = None
        self.thread = threading.Thread(target=self._run, args=(client, sid, skip), name=f"ray-log-tail-{sid}",
                                       daemon=True)
        self.thread.start()

    def take(self) -> tuple[list[str], bool]:
        """What arrived since the last call, and whether the tail has ended (nothing follows)."""
        with self._cond:
            pieces, self._pieces, self._size = self._pieces, [], 0
            self._cond.notify_all()
            return pieces, self._finished

    def _put(self, pieces: list[str]) -> None:
        with self._cond:
            while self._size >= self.LIMIT and not self.stopped.is_set():
                self._cond.wait(0.5)  # blocks this loop while the reader lags
            self._pieces += pieces
            self._size += sum(map(len, pieces))

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
            with self._cond:
                self._finished = True

    def stop(self) -> None:
        self.stopped.set()
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
    * ``is_done`` first (following): Ray's log tail (see :class:`_Pump`) delivers each byte of
      the log once, as it is written, until the job ends; ``read_new`` returns what arrived.
      Without a Ray job yet (an app waiting for its dependencies) it waits as before; a tail that
      ends while the app runs (the dashboard or the driver node's agent restarted) is resumed,
      skipping what was read; ``is_over`` (the app ended, or its dashboard is lost) ends a follow
      whose tail Ray does not end (a job Ray still holds PENDING).
    """

    CHECK_S = 2.0  # while the tail streams, the app's state is asked this often
    QUIET_S = 5.0  # the app is over and the tail was silent this long: nothing more will come
    MAX_FAILED_STARTS = 3  # tails that ended at once, in a row: read the whole log, as before

    def __init__(self, client: Any, sid: str, key: Optional[tuple[str, int]], stream: Optional[str],
                 is_over: Optional[Callable[[], bool]] = None, timed: bool = True) -> None:
        self.client, self.sid, self.key, self.stream = client, sid, key, stream
        self.demux = LogDemux(key, stream, timed)
        self.is_over = is_over or (lambda: True)
        self.offset = 0  # characters of the log fed to the demultiplexer
        self._following = False
        self._pump: Optional[_Pump] = None
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
        """Nothing more will come after the next ``read_new``; starts (and resumes) the tail."""
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
        if now - self._last_check < self.CHECK_S:
            return False
        self._last_check = now
        return self.is_over() and now - self._last_data >= self.QUIET_S

    def _start(self) -> None:
        job = get_job(self.client, self.sid)
        meta = (job.metadata or {}) if job is not None else {}
        if job is None or meta.get(KIND) == "verdict":
            # no Ray job yet (waiting for dependencies), or a decided app that never ran: nothing to tail
            self._pump = None
            return
        self.stop()
        self._ended = self._got_data = False
        self._last_data = time.monotonic()
        self._pump = _Pump(self.client, self.sid, self.offset)
        self._finalizer = weakref.finalize(self, self._pump.stop)

    def stop(self) -> None:
        """Ends the tail (if any) now."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


