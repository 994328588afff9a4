"""An index of a scheduler's apps in a home, so that ``list`` does not open every record.

``$TORCHX_EXT_HOME/<scheduler>/index.jsonl`` (0600) is append-only, one JSON object per line:

* ``{"id": ..., "t": <created, unix time>, "name": ..., ...}``: an app was recorded (the
  scheduler may add fields it needs to list the app, e.g. the cluster of a remote Slurm app);
* ``{"id": ..., "end": "SUCCEEDED"}``: its terminal state, cached once seen (an ended app never
  changes, so list never asks about it again);
* ``{"id": ..., "gone": true}``: it was deleted (a later "add" of the same id, e.g. a Slurm job
  id reused after its record was removed, starts afresh).

**The index is never the only truth.** Which apps exist is the listing of the scheduler's
directory (one ``listdir``, no file opened): an app in the index without a record is not shown
(deleted, pruned, or removed by hand), and a record the index lacks (a home written by an older
version, a crash between record and index, a missing index) is read once and appended. An index
that cannot be parsed, or is missing while records exist, is rebuilt from the records: every
record is read once and the index is replaced atomically (``state.write_text``); a damaged one is
logged as a warning. The index is also rewritten, compacted, when most of its lines are stale.

**Concurrency.** Every write (append, rewrite) holds :func:`state.locked` on the scheduler's
directory, the lock ``state.update_file`` takes there: two submitters append whole lines one after
the other, and a rewrite never loses an append made meanwhile (a line is one ``write`` with
``O_APPEND``). Readers take no lock: they see the file before or after an atomic rewrite, and
ignore a last line still without its newline.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torchx_ext import state
from torchx_ext.errors import StateError

logger = logging.getLogger(__name__)
INDEX = "index.jsonl"
# rewrite the index when it holds more than this many lines per live app (plus a margin)
_COMPACT_RATIO = 3
_COMPACT_MARGIN = 200


@dataclass
class Entry:
    """What list needs of an app without opening its record."""

    app_id: str
    created: float
    name: str = ""
    end: Optional[str] = None  # the terminal AppState name, once seen
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "id": self.app_id, "t": self.created, "name": self.name}
        if self.end:
            out["end"] = self.end
        return out


class AppIndex:
    """The index of one scheduler in the current home (see the module docstring).

    Args:
        scheduler: the scheduler's directory name under the home
        is_app: whether a name in that directory may be an app's record (cheap: no file opened)
        from_record: an app's entry read from its record; None: not (or not yet) a whole record
    """

    def __init__(self, scheduler: str, is_app: Callable[[str], bool],
                 from_record: Callable[[str], Optional[Entry]]) -> None:
        self.scheduler = scheduler
        self.is_app = is_app
        self.from_record = from_record

    @property
    def directory(self) -> str:
        return state.scheduler_dir(self.scheduler)  # read each time: the home may change

    @property
    def path(self) -> str:
        return os.path.join(self.directory, INDEX)

    # ------------------------------------------------------------------ writes ------
    def add(self, entry: Entry) -> None:
        """Records a new app (at submission, after its record is written)."""
        self._append([entry.line()])

    def ended(self, states: dict[str, str]) -> None:
        """Caches terminal states (``{app id: AppState name}``), one write for all."""
        if states:
            self._append([{"id": k, "end": v} for k, v in sorted(states.items())])

    def forget(self, app_id: str) -> None:
        """Marks an app deleted (after its record is removed)."""
        self.forget_many([app_id])

    def forget_many(self, app_ids: Sequence[str]) -> None:
        """Marks apps deleted, one write for all (a prune of thousands takes the lock once)."""
        if app_ids and os.path.isdir(self.directory):
            self._append([{"id": app_id, "gone": True} for app_id in app_ids])

    def _append(self, lines: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(x, sort_keys=True, separators=(",", ":")) + "\n" for x in lines)
        try:
            state.makedirs(self.directory)
            with state.locked(self.directory):
                state.append_text(self.path, text)
        except StateError as e:
            # a cache: without it list reads the records (an unwritable home must not fail a
            # submission whose record is written, nor a list)
            logger.debug("index not updated: %s", e)

    # ------------------------------------------------------------------ reads -------
    def entries(self) -> list[Entry]:
        """Every app with a record in this home, newest first (see the module docstring)."""
        try:
            names = [n for n in os.listdir(self.directory) if self.is_app(n)]
        except FileNotFoundError:
            return []
        known, lines, damaged = self._read()
        if known is None or (damaged and names):
            return self._rebuild(damaged)
        present = set(names)
        missing = [n for n in names if n not in known]
        new = [e for e in map(self.from_record, missing) if e is not None]
        if new:
            self._append([e.line() for e in new])
        out = [e for k, e in known.items() if k in present] + new
        if lines > _COMPACT_RATIO * len(out) + _COMPACT_MARGIN:
            self._rewrite(rebuild=False)
        return sorted(out, key=lambda e: (e.created, e.app_id), reverse=True)

    def _read(self) -> tuple[Optional[dict[str, Entry]], int, bool]:
        """(entries by id, or None if there is no index; its line count; whether it is damaged)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None, 0, False
        except OSError:  # unreadable: rebuilt (replaced) like a damaged one
            return None, 0, True
        known: dict[str, Entry] = {}
        chunks = raw.split(b"\n")[:-1]  # a last line without its newline is being written: not yet
        try:  # one parse for the whole file (2,000 lines: ~5 ms); each line alone only to judge it
            parsed = json.loads(b"[" + b",".join(chunks) + b"]")
            if len(parsed) != len(chunks):  # a line held two objects, or none
                raise ValueError("not one object per line")
        except ValueError:
            parsed = chunks
        for x in parsed:
            try:
                if isinstance(x, bytes):
                    x = json.loads(x)
                app_id = x["id"]
                if "t" in x:
                    extra = {k: v for k, v in x.items() if k not in ("id", "t", "name", "end")}
                    known[app_id] = Entry(app_id, float(x["t"]), str(x.get("name", "")), x.get("end"), extra)
                elif x.get("gone"):
                    known.pop(app_id, None)
                elif "end" in x and app_id in known:
                    known[app_id].end = str(x["end"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return {}, len(chunks), True
        return known, len(chunks), False

    def _rebuild(self, damaged: bool) -> list[Entry]:
        if damaged:
            logger.warning("%s is damaged; rebuilt from the records", self.path)
        out = self._rewrite(rebuild=True)
        return sorted(out, key=lambda e: (e.created, e.app_id), reverse=True)

    def _rewrite(self, rebuild: bool) -> list[Entry]:
        """Replaces the index, under the lock, with one line per app: from the records (a rebuild)
        or from the index itself minus what has no record (a compaction)."""
        try:
            with state.locked(self.directory):
                return self._rewrite_locked(rebuild, write=True)
        except StateError as e:  # an unwritable home: list from the records, index unchanged
            logger.debug("index not rewritten: %s", e)
            return self._rewrite_locked(rebuild, write=False)

    def _rewrite_locked(self, rebuild: bool, write: bool) -> list[Entry]:
        try:
            present = [n for n in os.listdir(self.directory) if self.is_app(n)]
        except FileNotFoundError:
            return []
        known = {} if rebuild else (self._read()[0] or {})
        found = [known[n] if n in known else self.from_record(n) for n in present]
        entries = [e for e in found if e is not None]
        if write:
            text = "".join(json.dumps(e.line(), sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
            # a cache: it can be rebuilt, so the directory is not fsynced
            state.write_text(self.path, text, sync_dir=False)
        return entries
