"""Local state, in one place: the home directory, atomic JSON files, app ids and timestamped logs.

Every scheduler keeps what it must remember on this machine under ``$TORCHX_EXT_HOME/<scheduler>/``
(default ``~/.torchx_ext``), never in the current directory, so any shell finds any app. This is
the only module that knows that layout's rules (submitit's ``JobPaths`` habit); backends never
import one another for it.

What it promises:

- **Private from birth.** Every directory it creates is 0700 and every file 0600 at creation
  (``os.mkdir(p, 0o700)``, ``mkstemp``, ``os.open(..., 0o600)``; a umask can only take bits away),
  never ``chmod``-ed afterwards: records hold Role.env values, token names, scripts.
- **Safe across threads and processes.** :func:`write_json` writes a unique temp file in the target
  directory, fsyncs it and renames it over the record (then fsyncs the directory): a reader sees
  the old record or the new one, never a torn or empty one, even after a crash. A
  read-modify-write (:func:`update_file`, :func:`update_json`) holds :func:`locked`, an exclusive
  ``fcntl.flock`` on the directory's ``lock`` file. Each ``locked`` opens the lock file anew, and
  flock locks belong to the open file description: so it serialises the threads of one process
  as well as processes.
- **Damage is said, not hidden.** :func:`read_json` returns None only for a missing file; an
  empty or unparsable one raises :class:`~torchx_ext.errors.StateError` naming it.

Why ``fcntl.flock`` and not the ``filelock`` package: torchx-ext runs on Linux/POSIX only, so the
standard library is enough (no new dependency); the kernel releases a flock when its holder dies,
so a killed submitter never leaves a stale lock to clean up (``filelock``'s Unix lock is the same
flock underneath).

Writes that fail because the home is unwritable or full raise :class:`~torchx_ext.errors.StateError`
naming the path, so the CLI prints one line instead of an ``OSError`` traceback.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional

from torchx_ext.errors import StateError
from torchx_ext.logs import LogItem, PlainLines, TimedLine

# Directories and files this module creates: the owner's only (see the module docstring)
DIR_MODE = 0o700
FILE_MODE = 0o600


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


def makedirs(path: str, mode: int = DIR_MODE, exist_ok: bool = True) -> None:
    """Creates ``path`` and every missing directory above it, each with ``mode`` from its creation.

    Unlike ``os.makedirs`` (which gives the directories above the leaf the default 0777 & ~umask),
    every directory created here gets ``mode``; directories that exist are left as they are.

    Args:
        path: the directory
        mode: of each directory created (default 0700; the umask can only remove bits)
        exist_ok: False: raise ``FileExistsError`` if ``path`` exists (the parents may)

    Raises:
        StateError: the directory cannot be created (unwritable, full)
    """
    path = os.path.abspath(path)
    missing: list[str] = []
    up = path
    while not os.path.isdir(up):
        missing.append(up)
        parent = os.path.dirname(up)
        if parent == up:
            break
        up = parent
    if not missing and not exist_ok:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError as e:
            # made meanwhile by another thread or process: fine above the leaf, and for the leaf
            # when exist_ok; a file where a directory should be is an error either way
            if d == path and (not exist_ok or not os.path.isdir(d)):
                raise
            if not os.path.isdir(d):
                raise StateError(_why(path, e, d)) from e
        except OSError as e:
            raise StateError(_why(path, e, d)) from e


def read_json(path: str) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, or None if the file is missing.

    Raises:
        StateError: the file exists but is empty, not JSON or not a JSON object (a record is
            written whole or not at all, see :func:`write_json`: so it was damaged), or cannot be read
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
    if not raw.strip():
        why = "empty"
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"not valid JSON: {e}"
        else:
            if isinstance(data, dict):
                return data
            why = f"a JSON {type(data).__name__}, not an object"
    raise StateError(f"{path} is damaged ({why}; a crash or a full disk?): move it aside "
                     f"and retry (what it recorded is then forgotten)")


def write_json(path: str, data: dict[str, Any], sync_dir: bool = True) -> None:
    """Writes ``data`` to ``path`` atomically and durably, as a 0600 file.

    A unique temp file in the same directory (so threads and processes never share one) is
    written, fsynced and renamed over ``path``: readers see the old record or the new one, never
    a half-written one, and a crash cannot leave an empty record.

    Args:
        path: the record; its directory must exist
        data: a JSON-serialisable object
        sync_dir: also fsync the directory, so the rename itself survives a crash (a record that
            is the only truth of what was submitted); False for a cache that can be rebuilt
    """
    write_text(path, json.dumps(data, indent=1, sort_keys=True), sync_dir)


def write_text(path: str, text: str, sync_dir: bool = True) -> None:
    """Writes ``text`` to ``path`` atomically, as a 0600 file: :func:`write_json` for a file that is
    not one JSON object (e.g. an index of JSON lines).

    Args:
        path: the file; its directory must exist
        text: its whole content
        sync_dir: see :func:`write_json`
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if sync_dir:
            _fsync_dir(directory)
    except OSError as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise StateError(_why(path, e)) from e


def append_text(path: str, text: str) -> None:
    """Appends ``text`` to ``path`` (created 0600) in ONE ``write`` with ``O_APPEND``: whole lines
    land at the end, after any other writer's. Callers that may also rewrite the file hold
    :func:`locked` on its directory for both, so that no append goes to a replaced file."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (a full disk, a signal): finish it
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
    except OSError as e:
        raise StateError(_why(path, e)) from e


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextmanager
def locked(directory: str) -> Iterator[None]:
    """An exclusive lock on ``directory`` (its ``lock`` file, created 0600): serialises a
    read-modify-write across processes and across threads of one process. Not reentrant: a
    thread that holds it and asks again waits forever."""
    path = os.path.join(directory, "lock")
    try:
        # a new open file description each time: flock then excludes other threads too
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise StateError(_why(path, e)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_file(path: str, change: Callable[[dict[str, Any]], Optional[dict[str, Any]]],
                sync_dir: bool = True) -> dict[str, Any]:
    """Read-modify-write of the JSON record ``path`` under its directory's lock (created 0700
    if missing).

    Args:
        path: the record (missing: ``change`` gets ``{}``)
        change: gets the current record; returns the new one, or None to leave the file as is
        sync_dir: see :func:`write_json`

    Returns:
        the record as it is now
    """
    directory = os.path.dirname(os.path.abspath(path))
    makedirs(directory)
    with locked(directory):
        data = read_json(path) or {}
        new = change(data)
        if new is None:
            return data
        write_json(path, new, sync_dir=sync_dir)
        return new


def update_json(directory: str, name: str, **changes: Any) -> dict[str, Any]:
    """Merges ``changes`` into ``directory/name`` under the directory's lock; returns the result."""
    return update_file(os.path.join(directory, name), lambda data: {**data, **changes})


def _why(path: str, e: OSError, part: Optional[str] = None) -> str:
    """One line: what could not be written (``part``: the component of ``path`` that failed), why,
    and what to check."""
    where, what = home(), f"{e.strerror or e}" if part in (None, path) else f"{part}: {e.strerror or e}"
    if (os.path.abspath(path) + os.sep).startswith(os.path.abspath(where) + os.sep):
        return (f"cannot write {path}: {what}; check that $TORCHX_EXT_HOME "
                f"({where}) is writable and its disk is not full")
    return f"cannot write {path}: {what}; check that its directory is writable and its disk is not full"


LOG_CHUNK = 4 << 20  # bytes read at a time by StampedLineReader: memory stays bounded however long a log


# A well-formed stamped line, as our writers write it (host supervisor, slurm's _txe_stamp): the
# readers' fast path takes a chunk whose every line matches; any other chunk goes line by line.
_STAMPED = re.compile(r"^[0-9]+(?:\.[0-9]+)? (.*\n)", re.M)
_STAMPED_TAGGED = re.compile(r"^[0-9]+(?:\.[0-9]+)? [^ \n]* (.*\n)", re.M)
_STAMPED_TAG_TEXT = re.compile(r"^[0-9]+(?:\.[0-9]+)? ([^ \n]*) (.*\n)", re.M)


class StampedLineReader:
    """Reads the new complete lines of a log written as ``<unix time> [<tag> ]<text>``.

    Each byte is read once, :data:`LOG_CHUNK` bytes at a time, and lines are yielded as each
    chunk is read (a long log is never held in memory, a remote one never fetched in one answer).

    Args:
        path: the log file (missing yet: no lines)
        tagged: lines carry a one-word stream tag after the time (``O``/``E``)
        want_tag: with ``tagged``, keep only lines of this tag (None: all)
        fetch: ``fetch(offset, limit)`` returns at most ``limit`` of the log's bytes from ``offset``
            on, instead of reading the local file ``path`` (e.g. a remote log, over a connection)
        plain: the lines' times are not needed (no since/until): each chunk's lines come as one
            :class:`~torchx_ext.logs.PlainLines`, split by one regex in C instead of a Python
            step per line (following 200 MB costs a third of the CPU: bench/bench_logs.py)
    """

    def __init__(self, path: str, tagged: bool = False, want_tag: Optional[bytes] = None,
                 fetch: Optional[Callable[[int, int], bytes]] = None, chunk: int = LOG_CHUNK,
                 plain: bool = False) -> None:
        self.path = path
        self.tagged = tagged
        self.want_tag = want_tag
        self.want = None if want_tag is None else want_tag.decode("utf-8", errors="replace")
        self.offset = 0
        self.chunk = chunk
        self.plain = plain
        self.fetch = fetch or self._read_file

    def _read_file(self, offset: int, limit: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        except (FileNotFoundError, NotADirectoryError):
            return b""

    def read_new(self) -> Iterator[LogItem]:
        while True:
            data = self.fetch(self.offset, self.chunk)
            end = data.rfind(b"\n") + 1  # whole lines only; a partial one is read next time
            if end == 0 and len(data) >= self.chunk:
                end = len(data)  # one line longer than a chunk: it comes in chunk-sized pieces
            self.offset += end
            if end:
                text = str(memoryview(data)[:end], "utf-8", "replace")  # once per chunk, and no copy of it
                fast = self._plain_lines(text) if self.plain else None
                if fast is not None:
                    yield fast
                else:
                    yield from self._lines(text)
            if len(data) < self.chunk:
                return

    def _plain_lines(self, text: str) -> Optional[PlainLines]:
        """The chunk's lines without their stamps, if every line is well formed (else None: the
        line-by-line path decides, so both paths give the same lines)."""
        if not text.endswith("\n"):
            return None  # a piece of a line longer than a chunk
        if self.tagged and self.want is not None:
            pairs = _STAMPED_TAG_TEXT.findall(text)
            if len(pairs) != text.count("\n"):
                return None
            want = self.want
            return PlainLines([line for tag, line in pairs if tag == want])
        found = (_STAMPED_TAGGED if self.tagged else _STAMPED).findall(text)
        return PlainLines(found) if len(found) == text.count("\n") else None

    def _lines(self, text: str) -> List[TimedLine]:
        """The lines of one chunk, one by one, each with its time (None where a line has none)."""
        # split, not splitlines: a \r or \x1e inside a line is data, not a line break
        raws = text.split("\n")
        if text.endswith("\n"):
            raws.pop()
        want = self.want
        out: List[TimedLine] = []
        for raw in raws:
            stamp, _, rest = raw.partition(" ")
            tag = ""
            if self.tagged:
                tag, _, rest = rest.partition(" ")
            try:
                ts: Optional[float] = float(stamp)
            except ValueError:
                ts, tag, rest = None, "", raw
            if want is None or tag == want:
                out.append((ts, rest))
        return out
