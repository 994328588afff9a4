"""A workspace copied to a login node over an :class:`~.ssh.SshLogin`: with rsync on both sides only
what changed is sent (and unchanged files are hard-linked from the last copy); without, a tar
stream. The copy is the remote user's only. TorchX's workspace rules decide what is copied."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
from typing import IO, List, Optional, Tuple

from torchx_ext.errors import BackendError, InvalidOptionError, SchedulerUnavailable
from torchx_ext.progress import Progress
from torchx_ext.schedulers.slurm_jobs.ssh import SshLogin, last_line, ssh_failure_message

logger = logging.getLogger(__name__)

# rsync's last words after the other end stopped; they say nothing about why.
_RSYNC_TRAILER = re.compile(r"rsync( error)?: (connection unexpectedly closed|.*\(code \d+\))")


def sync_dir(login: SshLogin, local_dir: str, remote_dir: str, ignore_file: str = ".torchxignore",
             delete: bool = True, timeout: float = 600, link_dest: Optional[str] = None) -> int:
    """Makes ``remote_dir`` a copy of the workspace ``local_dir``, sending only what changed.

    What is copied follows TorchX's workspace rules (``walk_workspace``): everything but what
    ``ignore_file`` in ``local_dir`` excludes, symlinks copied as the files they point to. With
    rsync on both sides, an unchanged file is not sent again and a changed one as a delta.
    Without rsync on either side the copy falls back to a tar stream, which sends everything,
    every time.

    The copy is the remote user's only: directories made under ``umask 077`` and every mode
    without group/other bits (``rsync --chmod=go=``; tar under ``umask 077``).

    Args:
        local_dir: the workspace directory here
        remote_dir: the copy on the login node (absolute, or relative to the remote home);
            created if missing
        ignore_file: the ignore file's name in ``local_dir``
        delete: remove what is in ``remote_dir`` and not in the workspace (files deleted or
            ignored since the last sync), so that the copy is exact. Anything else kept in
            ``remote_dir`` is deleted too: give the workspace a directory of its own.
        timeout: seconds for the whole transfer (tar: for the remote end to finish once all is sent)
        link_dest: an earlier copy of the same workspace on the login node (absolute): a file
            unchanged since then is hard-linked from it instead of sent (``rsync --link-dest``),
            so that ``remote_dir`` can be a new directory every time and nothing that reads
            the earlier copy sees it change. Ignored if it does not exist (or with tar).

    Returns:
        The bytes of file content sent (rsync: of the files that changed; tar: all of them).

    Raises:
        SchedulerUnavailable: ssh could not log in, lost the connection, or timed out.
        BackendError: the copy failed on the remote (permissions, full disk).
    """
    norm = posixpath.normpath(remote_dir) if remote_dir else ""
    if norm in ("", ".", "/", "~") or norm.startswith("../") or norm == "..":
        # with delete=True a sync into the home directory (or /) would empty it
        raise InvalidOptionError(f"refusing to sync a workspace into {remote_dir!r} on {login.name}: "
                                 "name a directory of its own")
    files, excluded = _workspace_files(local_dir, ignore_file)
    # One round trip first: it logs in through run() (whose errors are exact: rsync's own exit
    # status races with ssh's and may say "protocol error" for a refused key), makes the
    # directory and asks whether the remote has rsync.
    check = login.run(["sh", "-c", 'umask 077 && mkdir -p -- "$1" && '
                      '{ command -v rsync >/dev/null && echo rsync || echo tar; } '
                      '&& { [ -n "$2" ] && [ -d "$2" ] && echo link || :; }', "sh", norm, link_dest or ""])
    if check.returncode != 0:
        raise BackendError(f"cannot create {norm} on {login.name}: {last_line(check.stderr)}")
    answer = check.stdout.split()
    if not shutil.which("rsync"):
        logger.info("no local rsync: sending the whole workspace to %s as a tar stream", login.name)
    elif not answer or answer[0] != "rsync":
        logger.info("no rsync on %s: sending the whole workspace as a tar stream", login.name)
    else:
        linked = link_dest if "link" in answer[1:] else None
        return _rsync(login, local_dir, norm, files, excluded, delete, timeout, linked)
    return _tar(login, local_dir, norm, files, delete, timeout)

def _rsync(login: SshLogin, local_dir: str, remote_dir: str, files: List[str], excluded: List[str], delete: bool,
           timeout: float, link_dest: Optional[str] = None) -> int:
    """rsync over the shared master (up since the check in sync_dir) into the existing ``remote_dir``."""
    with tempfile.NamedTemporaryFile("wb", prefix="torchx_ext_rsync_", suffix=".list") as rules:
        if delete:
            # Recurse, minus what the workspace rules leave out: the receiver then deletes both
            # what vanished here and what is now ignored (--delete-excluded).
            rules.write(b"".join(os.fsencode("/" + _rsync_literal(p)) + b"\0" for p in excluded))
            selection = ["-r", "--delete", "--delete-excluded", f"--exclude-from={rules.name}"]
        else:
            rules.write(b"".join(os.fsencode(p) + b"\0" for p in files))
            selection = [f"--files-from={rules.name}"]
        rules.flush()
        # rsync appends the host (and "-l user" when the remote spec names one) to this command:
        # the user goes in here, and "--" ends ssh's options, so the host is never read as one
        user = ["-l", login.user] if login.user else []
        ssh = " ".join(shlex.quote(w) for w in ["ssh", *login.ssh_options(), *user, "--"])
        # The remote end starts through its shell: cd on the way, so that the directory's name is
        # quoted by us (shell rules) and not by rsync (whose quoting of remote names changed in 3.2.4).
        # umask 077: what the receiver creates is private (so is every mode, --chmod below).
        rsync_path = f"umask 077 && cd -- {shlex.quote(remote_dir)} && rsync"
        if link_dest:
            # with -s (--protect-args) this reaches the remote rsync over the protocol, never
            # through the remote shell: a path with spaces or ';' arrives as it is
            selection.append(f"--link-dest={link_dest}")
        # -s: file names and options go over rsync's protocol, not the remote shell's command line;
        # --chmod=go=: the copy is the user's only (the user's own bits, x included, are kept)
        argv = ["rsync", "-tpL", "-s", "--chmod=go=", "--from0", "--stats", "--no-human-readable", *selection,
                "-e", ssh, f"--rsync-path={rsync_path}", "--", os.path.join(local_dir, ""),
                f"{_rsync_host(login)}:."]
        progress = Progress(f"shipping the workspace {local_dir} to {login.name}")
        if progress.enabled:
            argv.insert(1, "--info=progress2")  # rsync's own totals, shown as they come
        try:
            with progress:
                proc = run_reporting(argv, timeout, progress)
        except subprocess.TimeoutExpired as e:
            raise SchedulerUnavailable(f"copying {local_dir} to {login.name} took longer than {timeout:g} s") from e
    if proc.returncode == 0:
        m = re.search(r"^Total transferred file size: ([\d,.]+)", proc.stdout, re.M)
        return int(re.sub(r"\D", "", m.group(1))) if m else 0
    # rsync's closing lines ("connection unexpectedly closed", "rsync error: ... (code N)") only
    # say that it stopped; the first other line says why (disk full, permissions, ...)
    reasons = [ln for ln in proc.stderr.splitlines() if ln.strip() and not _RSYNC_TRAILER.match(ln)]
    if proc.returncode == 255 or (proc.returncode == 12 and not reasons):
        # ssh's 255, or the other end gone without a word (rsync's 12 when it sees the EOF before
        # ssh's exit): the check above logged in, so the connection was lost on the way
        raise SchedulerUnavailable(ssh_failure_message(login.name, proc.stderr, started=True))
    why = reasons[0].strip() if reasons else last_line(proc.stderr)
    raise BackendError(f"copying {local_dir} to {remote_dir} on {login.name} failed: {why}")

def _rsync_host(login: SshLogin) -> str:
    # rsync reads [v6]:path with the brackets; the port is in the -e command (-p)
    # the host only: the user is "-l" in the -e command, placed before its "--"
    host = login.host.strip("[]")
    return f"[{host}]" if ":" in host else host

def _tar(login: SshLogin, local_dir: str, remote_dir: str, files: List[str], delete: bool, timeout: float) -> int:
    """The fallback: the workspace as one tar stream, unpacked by the remote ``tar``."""
    q = shlex.quote(remote_dir)
    if delete:
        # unpacked beside, then swapped in: an interrupted copy never leaves a half workspace
        tmp = shlex.quote(remote_dir.rstrip("/") + ".partial")
        line = (f"umask 077 && rm -rf -- {tmp} && mkdir -p -- {tmp} && tar -C {tmp} -xf - && rm -rf -- {q} "
                f"&& mv -- {tmp} {q}")
    else:
        line = f"umask 077 && mkdir -p -- {q} && tar -C {q} -xf -"
    argv = login.command(line)
    sent = 0
    # stderr to a file, not a pipe: a remote tar complaining about every file would fill a pipe
    # nobody reads while we write, and both ends would wait forever
    with tempfile.TemporaryFile() as err_file:
        try:
            # unbuffered: after a broken pipe, no buffered bytes are left to fail again on close
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file,
                                    bufsize=0)
        except FileNotFoundError as e:
            raise SchedulerUnavailable(login.no_ssh_message()) from e
        assert proc.stdin is not None
        try:
            sent = _write_tar(proc.stdin, local_dir, files)
        except BrokenPipeError:
            pass  # the remote end failed: its stderr says why
        finally:
            proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise SchedulerUnavailable(f"copying {local_dir} to {login.name} took longer than {timeout:g} s") from e
        err_file.seek(0)
        err = err_file.read().decode("utf-8", "replace")
    if proc.returncode == 255:
        raise SchedulerUnavailable(ssh_failure_message(login.name, err))
    if proc.returncode != 0:
        raise BackendError(f"copying {local_dir} to {remote_dir} on {login.name} failed: {last_line(err)}")
    return sent


_PROGRESS2 = re.compile(r"^\s*([\d,]+)\s+(\d+%)\s+(\S+/s)")  # rsync --info=progress2


def run_reporting(argv: List[str], timeout: float, progress: Progress) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, capture_output=True)``, showing rsync's progress2 lines (which end
    in ``\r``) on ``progress`` as they come; without a terminal it is exactly that run."""
    if not progress.enabled:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=timeout)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    reader.start()
    killer = threading.Timer(timeout, proc.kill)  # a hang with no output at all ends too
    killer.start()
    out = b""
    assert proc.stdout is not None
    try:
        while True:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            out += chunk
            last = re.split(rb"[\r\n]", out[-400:].rstrip(b"\r\n"))[-1].decode(errors="replace")
            m = _PROGRESS2.match(last)
            if m:
                progress.update(f"{m.group(1)} bytes, {m.group(2)}, {m.group(3)}")
        proc.wait()
    finally:
        fired = not killer.is_alive() and proc.returncode is not None and proc.returncode < 0
        killer.cancel()
    if fired:
        raise subprocess.TimeoutExpired(argv, timeout)
    reader.join(timeout=5)
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode("utf-8", errors="replace"),
                                       b"".join(err).decode("utf-8", errors="replace"))


def _workspace_files(local_dir: str, ignore_file: str) -> Tuple[List[str], List[str]]:
    """The workspace's files and, beside them, the paths the workspace rules leave out.

    Both relative to ``local_dir``. The files are TorchX's (``walk_workspace``, as DirWorkspace and
    our ``copy_workspace`` read them); the left-out list holds every other entry of the directories
    walked (ignored files and directories, broken links, links to directories, sockets), so that rsync's recursion
    can be told exactly what to skip.
    """
    # torchx and fsspec are dependencies of this package; imported here so that `import` stays cheap
    import fsspec
    from torchx.workspace.api import walk_workspace

    fs = fsspec.filesystem("file")
    root = os.path.abspath(local_dir)
    if not os.path.isdir(root):
        raise InvalidOptionError(f"the workspace {local_dir} is not a directory")
    files: List[str] = []
    excluded: List[str] = []
    for dirpath, dirs, entries in walk_workspace(fs, root, ignore_file):
        rel = os.path.relpath(dirpath, root)
        kept = {d for d in dirs}
        for name, info in entries.items():
            # a symlink to a file is listed as "other" by fsspec's walk; TorchX's DirWorkspace copies
            # what it points to, and so do we (rsync -L, tar dereference). Broken links, links to
            # directories, sockets: left out.
            if info.get("type") == "file" or os.path.isfile(os.path.join(dirpath, name)):
                kept.add(name)
                files.append(name if rel == "." else os.path.join(rel, name))
        for name in os.listdir(dirpath):
            if name not in kept:
                excluded.append(name if rel == "." else os.path.join(rel, name))
    return files, excluded


def _rsync_literal(path: str) -> str:
    """``path`` as an rsync filter pattern matching only itself.

    rsync reads a pattern literally unless it holds a wildcard (``*?[``); then backslash escapes.
    """
    if any(c in path for c in "*?["):
        return re.sub(r"([*?\[\\])", r"\\\1", path)
    return path


def _write_tar(out: IO[bytes], local_dir: str, files: List[str]) -> int:
    """Streams ``files`` (relative to ``local_dir``) as a tar to ``out``; returns their total size."""
    total = 0
    # dereference: a symlink is sent as the file it points to, as rsync -L and copy_workspace do
    with tarfile.open(fileobj=out, mode="w|", dereference=True, format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = os.path.join(local_dir, rel)
            total += os.path.getsize(path)
            tar.add(path, arcname=rel, recursive=False)
    return total
