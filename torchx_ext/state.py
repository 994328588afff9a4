"""Local state, in one place: the home directory, atomic JSON files, app ids and timestamped logs.

Every scheduler keeps what it must remember on this machine under ``$TORCHX_EXT_HOME/<scheduler>/``
(default ``~/.torchx_ext``), never in the current directory, so any shell finds any app. This is
the only module that knows that layout's rules (submitit's ``JobPaths`` habit); backends never
import one another for it.

Writes that fail because the home is unwritable or full raise :class:`~torchx_ext.errors.StateError`
naming the path, so the CLI prints one line instead of an ``OSError`` traceback.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torchx_ext.errors import StateError
from torchx_ext.logs import TimedLine


def home() -> str:
    """``$TORCHX_EXT_HOME`` (``~`` expanded), default ``~/.torchx_ext``."""
    return os.path.expanduser(os.environ.get("TORCHX_EXT_HOME") or "~/.torchx_ext")


def scheduler_dir(scheduler: str, *parts: str) -> str:
    """``$TORCHX_EXT_HOME/<scheduler>/<parts...>`` (not created)."""
    return os.path.join(home(), scheduler, *parts)


def make_app_id(name: str, max_len: int = 40) -> str:
    """``"My App!"`` → ``"my-app-3f9c0e12ab"``: lowercase DNS-safe name plus 10 random hex digits.

    Safe as a file name, a container name, a Ray submission id and a DNS label.
    """
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:max_len].strip("-") or "app"
    return f"{base}-{uuid.uuid4().hex[:10]}"


def is_plain_name(app_id: str) -> bool:
    """An id that can name a directory under a state root (never a path, never hidden)."""
    return bool(app_id) and "/" not in app_id and "\\" not in app_id and not app_id.startswith(".") \
        and "\0" not in app_id


def makedirs(path: str, mode: int = 0o777, exist_ok: bool = True) -> None:
    """``os.makedirs`` that reports an unwritable or full home as one :class:`StateError`."""
    try:
        os.makedirs(path, mode=mode, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as e:
        raise StateError(_why(path, e)) from e


def read_json(path: str) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, or None if it is missing or not (yet) valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str, data: dict[str, Any]) -> None:
    """Writes ``data`` atomically (write + rename: readers never see a half-written file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateError(_why(path, e)) from e


@contextmanager
def locked(directory: str) -> Iterator[None]:
    """An exclusive fcntl lock on ``directory/lock`` (serialises read-modify-write)."""
    with open(os.path.join(directory, "lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_json(directory: str, name: str, **changes: Any) -> dict[str, Any]:
    """Merges ``changes`` into ``directory/name`` under the directory's lock; returns the result."""
    with locked(directory):
        path = os.path.join(directory, name)
        data = read_json(path) or {}
        data.update(changes)
        write_json(path, data)
        return data


def _why(path: str, e: OSError) -> str:
    return (f"cannot write {path}: {e.strerror or e}; check that $TORCHX_EXT_HOME "
            f"({home()}) is writable and its disk is not full")


class StampedLineReader:
    """Reads the new complete lines of a log written as ``<unix time> [<tag> ]<text>``.

    Args:
        path: the log file (missing yet: no lines)
        tagged: lines carry a one-word stream tag after the time (``O``/``E``)
        want_tag: with ``tagged``, keep only lines of this tag (None: all)
        fetch: returns the log's bytes from an offset on, instead of reading the local file
            ``path`` (e.g. a remote log, fetched over a connection)
    """

    def __init__(self, path: str, tagged: bool = False, want_tag: Optional[bytes] = None,
                 fetch: Optional[Callable[[int], bytes]] = None) -> None:
        self.path = path
        self.tagged = tagged
        self.want_tag = want_tag
        self.offset = 0
        self.fetch = fetch or self._read_file

    def _read_file(self, offset: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return b""

    def read_new(self) -> list[TimedLine]:
        data = self.fetch(self.offset)
        end = data.rfind(b"\n") + 1  # whole lines only; a partial one is read next time
        self.offset += end
        out: list[TimedLine] = []
        # split, not splitlines: a \r or \x1e inside a line is data, not a line break
        for raw in data[:end].split(b"\n")[:-1]:
            stamp, _, rest = raw.partition(b" ")
            tag = b""
            if self.tagged:
                tag, _, rest = rest.partition(b" ")
            try:
                ts: Optional[float] = float(stamp)
            except ValueError:
                ts, tag, rest = None, b"", raw
            if self.want_tag is not None and tag != self.want_tag:
                continue
            out.append((ts, rest.decode("utf-8", errors="replace")))
        return out
