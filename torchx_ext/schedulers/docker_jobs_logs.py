"""Reading one ``docker_jobs`` container's log from the daemon, resuming without duplicates."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from torchx.schedulers.api import Stream

from torchx_ext.logs import TimedLine
from torchx_ext.schedulers.docker_jobs_daemon import parse_ts, retrying


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

    def read_new(self) -> list[TimedLine]:
        kwargs: dict[str, Any] = {"stdout": self.stdout, "stderr": self.stderr, "timestamps": True}
        if self.cursor is not None and self.cursor > 0.01:
            kwargs["since"] = self.cursor - 0.005  # a float loses ns: step back, dedupe below
        if self.until is not None:
            kwargs["until"] = self.until
        raw = retrying(lambda: self.api.logs(self.container_id, **kwargs))
        lines = [ln for ln in raw.decode("utf-8", errors="replace").split("\n") if ln]
        out: list[TimedLine] = []
        newest = self.cursor
        for line in lines:
            if line in self.recent:
                continue  # already yielded by the previous read
            stamp, _, text = line.partition(" ")
            ts = parse_ts(stamp)
            if ts is None:
                ts, text = None, line
            elif newest is None or ts > newest:
                newest = ts
            out.append((ts, text))
        if newest is not None:
            self.cursor = newest
            self.recent = {ln for ln in lines if (parse_ts(ln.partition(" ")[0]) or 0.0) >= newest - 0.01}
        return out
