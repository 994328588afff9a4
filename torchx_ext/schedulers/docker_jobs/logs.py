"""Reading one ``docker_jobs`` container's log from the daemon, resuming without duplicates."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any, Iterator, Optional

from torchx.schedulers.api import Stream

from torchx_ext.logs import TimedLine
from torchx_ext.schedulers.docker_jobs.daemon import (
    L_ATTEMPT,
    L_REPLICA,
    L_RESTART_WHY,
    L_ROLE,
    app_filter,
    retrying,
)
from torchx_ext.schedulers.docker_jobs.timestamps import parse_ts


class LogReader:
    """Reads new lines of one container's log via the daemon (``timestamps=True``)."""

    def __init__(self, api: Any, container_id: str, streams: Optional[Stream],
                 since: Optional[datetime], until: Optional[datetime]) -> None:
        self.api = api
        self.container_id = container_id
        self.stdout = streams in (None, Stream.COMBINED, Stream.STDOUT)
        self.stderr = streams in (None, Stream.COMBINED, Stream.STDERR)
        self.cursor: Optional[float] = since.timestamp() if since else None
        self.until = until.timestamp() if until else None
        self.recent: set[str] = set()  # raw lines at the cursor: docker's `since` is inclusive

    def read_new(self) -> Iterator[TimedLine]:
        """The lines after the cursor, streamed from the daemon as they are read: a long log is
        never held in memory at once, and each poll asks only for what is new."""
        kwargs: dict[str, Any] = {"stdout": self.stdout, "stderr": self.stderr, "timestamps": True,
                                  "stream": True, "follow": False}
        if self.cursor is not None and self.cursor > 0.01:
            kwargs["since"] = self.cursor - 0.005  # a float loses ns: step back, dedupe below
        if self.until is not None:
            kwargs["until"] = self.until
        chunks = retrying(lambda: self.api.logs(self.container_id, **kwargs))
        # the lines within 10 ms of the newest time read: the next read's overlap (``since`` is
        # inclusive and stepped back), skipped there; stdout and stderr interleave slightly out of order
        window: deque[tuple[float, str]] = deque()
        newest = self.cursor
        buf = b""
        for chunk in chunks:
            buf += chunk
            *whole, buf = buf.split(b"\n")
            for raw in whole:
                if not raw:
                    continue
                line = raw.decode("utf-8", errors="replace")
                if line in self.recent:
                    continue  # already yielded by the previous read
                stamp, _, text = line.partition(" ")
                ts = parse_ts(stamp)
                if ts is None:
                    yield None, line
                    continue
                if newest is None or ts > newest:
                    newest = ts
                    while window and window[0][0] < newest - 0.01:
                        window.popleft()
                if ts >= newest - 0.01:
                    window.append((ts, line))
                yield ts, text
        if buf:  # the daemon's last entry without a newline (a program's unterminated output)
            line = buf.decode("utf-8", errors="replace")
            stamp, _, text = line.partition(" ")
            ts = parse_ts(stamp)
            yield (ts, text) if ts is not None else (None, line)
        if newest is not None and newest != self.cursor:
            self.cursor = newest
            self.recent = {ln for t, ln in window if t >= newest - 0.01}


class AttemptsReader:
    """Reads one replica's log across its attempts (a container each), oldest first; a new
    attempt is found on the next read, so ``torchx log -f`` follows a restart."""

    def __init__(self, api: Any, app_id: str, role: str, replica_id: int, streams: Optional[Stream],
                 since: Optional[datetime], until: Optional[datetime]) -> None:
        self.api, self.streams, self.since, self.until = api, streams, since, until
        self.filters = app_filter(app_id, **{L_ROLE: role, L_REPLICA: str(replica_id)})
        self.readers: dict[str, LogReader] = {}

    def containers(self) -> list[dict[str, Any]]:
        found = retrying(lambda: self.api.containers(all=True, filters=self.filters))
        return sorted(found, key=lambda c: int((c.get("Labels") or {}).get(L_ATTEMPT) or 1))

    def read_new(self) -> Iterator[TimedLine]:
        for c in self.containers():
            if c["Id"] not in self.readers:
                self.readers[c["Id"]] = LogReader(self.api, c["Id"], self.streams, self.since, self.until)
                yield from self._attempt_line(c)
            yield from self.readers[c["Id"]].read_new()

    def _attempt_line(self, c: dict[str, Any]) -> list[TimedLine]:
        """A restart's first line, as host and ray_jobs write it to the replica's stderr."""
        labels = c.get("Labels") or {}
        ts = float(c.get("Created") or 0)
        if int(labels.get(L_ATTEMPT) or 1) < 2 or self.streams == Stream.STDOUT or \
                (self.since and ts < self.since.timestamp()) or (self.until and ts > self.until.timestamp()):
            return []
        return [(ts, f"[torchx-ext] attempt {labels[L_ATTEMPT]} of role '{labels.get(L_ROLE)}' replica "
                     f"{labels.get(L_REPLICA)} begins: {labels.get(L_RESTART_WHY, '')}")]
