"""Reading one ``docker_jobs`` container's log from the daemon, resuming without duplicates."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from torchx.schedulers.api import Stream

from torchx_ext.logs import TimedLine
from torchx_ext.schedulers.docker_jobs_daemon import (
    L_ATTEMPT,
    L_REPLICA,
    L_RESTART_WHY,
    L_ROLE,
    app_filter,
    parse_ts,
    retrying,
)


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

    def read_new(self) -> list[TimedLine]:
        out: list[TimedLine] = []
        for c in self.containers():
            if c["Id"] not in self.readers:
                self.readers[c["Id"]] = LogReader(self.api, c["Id"], self.streams, self.since, self.until)
                out += self._attempt_line(c)
            out += self.readers[c["Id"]].read_new()
        return out

    def _attempt_line(self, c: dict[str, Any]) -> list[TimedLine]:
        """A restart's first line, as host and ray_jobs write it to the replica's stderr."""
        labels = c.get("Labels") or {}
        ts = float(c.get("Created") or 0)
        if int(labels.get(L_ATTEMPT) or 1) < 2 or self.streams == Stream.STDOUT or \
                (self.since and ts < self.since.timestamp()) or (self.until and ts > self.until.timestamp()):
            return []
        return [(ts, f"[torchx-ext] attempt {labels[L_ATTEMPT]} of role '{labels.get(L_ROLE)}' replica "
                     f"{labels.get(L_REPLICA)} begins: {labels.get(L_RESTART_WHY, '')}")]
