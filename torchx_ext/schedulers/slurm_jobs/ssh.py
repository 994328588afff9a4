"""The SSH transport of slurm_jobs' remote mode: commands and files on a login node (a workspace is
copied over it by :mod:`.transfer`).

:class:`SshLogin` drives the *system* OpenSSH client rather than a Python SSH library, so that what
already works for the user's ``ssh login`` works here unchanged: ``~/.ssh/config`` (Host aliases,
``ProxyJump``, ``User``), the ssh-agent, ``known_hosts``, hardware keys, GSSAPI. One authenticated
master connection per login node (``ControlMaster``/``ControlPersist``) is shared by every call from
any local process, so after the first login a call costs one round trip, not a handshake.

Nothing here ever prompts (``BatchMode=yes``). A failure of ssh itself becomes one line naming the
host and what to check (:func:`ssh_failure_message`), raised as
:class:`~torchx_ext.errors.SchedulerUnavailable`; a remote command that fails is the caller's to
judge and comes back as a :class:`subprocess.CompletedProcess`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any, List, Optional, Sequence, Type

from torchx_ext.errors import BackendError, InvalidOptionError, SchedulerUnavailable, StateError
from torchx_ext.state import home, makedirs

logger = logging.getLogger(__name__)

#: The remote shell brackets the command's stderr with these: the first proves the command started,
#: the second carries its exit status. ssh's own 255 and a command's ``exit 255`` read the same
#: otherwise, and so do a command's 255 and a connection lost under a multiplexed call (the
#: master, not the caller's ssh, would print why; the caller's ssh only exits 255).
_STARTED = "__torchx_ext_ssh_started__"
_ENDED = "__torchx_ext_ssh_exit__"

#: ``sun_path`` holds 108 bytes with its NUL; ssh first binds ``<ControlPath>.<16 random chars>``
#: and renames it to ``%C`` (40 hex digits), so the directory may use at most 108 - 1 - 1 - 40 - 17.
_MAX_CONTROL_DIR = 49

# A target as users write it: [user@]host[:port], host possibly a [bracketed] IPv6 address.
# Refused anywhere in a login: a word of ssh's command line must not hide a second one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_TARGET = re.compile(r"^(?:(?P<user>[^@\s/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:/\[\]]+)(?::(?P<port>\d+))?$")


def ssh_failure_message(target: str, stderr: str, started: bool = False) -> str:
    """One line telling what failed in ssh's own terms (exit status 255) and what to check.

    The single place that reads ssh's stderr text: OpenSSH has no machine-readable error codes,
    so the match is on the messages it prints (tested against the real ones).

    Args:
        target: the login node as the user named it (``user@host[:port]`` or a Host alias)
        stderr: everything ssh printed on stderr
        started: the remote command had started (so the connection was lost, whatever the text)

    Returns:
        The message, without newlines.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("@@@")]
    last = lines[-1] if lines else "ssh exited with status 255 and printed nothing"
    text = stderr.lower()
    if "remote host identification has changed" in text or "host key verification failed" in text \
            or "host key is known for" in text:
        why = "its host key changed" if "has changed" in text else "its host key is not in known_hosts"
        return (f"ssh to {target}: host key verification failed ({why}); check known_hosts "
                f"(~/.ssh/known_hosts or UserKnownHostsFile): run `ssh {target}` once by hand to "
                "accept the key, or remove the stale entry with `ssh-keygen -R <host>`")
    if "permission denied (" in text or "too many authentication failures" in text:
        hint = "check the identity file and the keys in your ssh-agent (`ssh-add -l`)"
        if "unprotected private key file" in text:
            hint = "the identity file is readable by others and was ignored: chmod 600 it"
        elif "not accessible" in text and "identity file" in text:
            hint = "the identity file does not exist or cannot be read"
        elif "too many authentication failures" in text:
            hint = ("the server gave up before the right key was tried: name it with the identity "
                    "file option, or `IdentitiesOnly yes` in ~/.ssh/config")
        return f"ssh to {target} was refused (key not accepted): {hint}; check that `ssh {target}` works by hand"
    unreachable = ("connection refused", "connection timed out", "operation timed out", "could not resolve",
                   "name or service not known", "temporary failure in name resolution", "no route to host",
                   "network is unreachable", "kex_exchange_identification", "banner exchange",
                   "connection reset", "connection closed by")
    if any(u in text for u in unreachable):
        # the line that says so (rsync and others print their own last lines after ssh's)
        said = next((ln for ln in lines if any(u in ln.lower() for u in unreachable)), last)
        return (f"cannot reach {target} ({said.removeprefix('ssh: ')}): check that the host is up, "
                "the host name and port (and any ProxyJump) are right, and that sshd runs there")
    lost = ("closed by remote host", "client_loop:", "broken pipe", "not responding")
    if started or any(u in text for u in lost):
        why = f" ({last})" if lines else ""
        return (f"the connection to {target} was lost{why}; the remote command may still be running; "
                "check the network and retry")
    return f"ssh to {target} failed: {last}"


class SshLogin:
    """A login node reached with the system ``ssh`` client over one shared master connection.

    Constructing one touches neither the network nor the disk; the first call logs in and leaves a
    master connection that lives ``ControlPersist`` seconds past the last call (from any process).

    Remote commands run through the user's login shell, which must be POSIX (bash, zsh, sh):
    arguments are quoted with :func:`shlex.quote`. It is a non-interactive, non-login shell: what
    ``~/.bashrc`` sets applies, ``~/.bash_profile`` does not.

    Args:
        target: ``user@host[:port]``, ``host[:port]``, or a Host alias from ``~/.ssh/config``
        identity_file: a private key to use (and only it: ``IdentitiesOnly``, so an agent holding
            many keys cannot exhaust the server's ``MaxAuthTries`` first); None: ssh's own choice
        config_file: an ssh config file to read instead of ``~/.ssh/config`` (``ssh -F``; tests)
        connect_timeout: seconds to wait for the TCP connection (``ConnectTimeout``)
        control_persist: seconds the master connection outlives its last use
    """

    def __init__(self, target: str, identity_file: Optional[str] = None, config_file: Optional[str] = None,
                 connect_timeout: int = 10, control_persist: int = 300) -> None:
        m = _TARGET.match(target.strip())
        if not m or _CONTROL.search(target.strip()):
            raise InvalidOptionError(
                f"invalid SSH login {target!r}: expected user@host[:port], host[:port] or a Host alias "
                "from ~/.ssh/config, without spaces or control characters")
        for part in ("user", "host"):
            if (m.group(part) or "").startswith("-"):
                # ssh (and rsync, which hands the host to ssh) would read it as an option:
                # "x@-oProxyCommand=..." in a .torchxconfig would run a command here
                raise InvalidOptionError(
                    f"invalid SSH login {target!r}: the {part} {m.group(part)!r} begins with '-', which ssh "
                    "would read as an option; expected user@host[:port] whose user and host do not begin with '-'")
        self._user, self._host, port = m.group("user"), m.group("host"), m.group("port")
        self._port = int(port) if port else None
        if self._port is not None and not 0 < self._port < 65536:
            raise InvalidOptionError(f"invalid SSH login {target!r}: port {self._port} is not in 1..65535")
        self._identity_file = os.path.expanduser(identity_file) if identity_file else None
        self._config_file = os.path.expanduser(config_file) if config_file else None
        self._connect_timeout = connect_timeout
        self._control_persist = control_persist
        self._control_dir: Optional[str] = None

    @property
    def user(self) -> Optional[str]:
        """The remote user the target names (None: ssh's default)."""
        return self._user

    @property
    def host(self) -> str:
        """The host the target names (an IPv6 address in brackets)."""
        return self._host

    @property
    def name(self) -> str:
        """The canonical target, ``[user@]host[:port]``: what a handle stores to find this node again."""
        user = f"{self._user}@" if self._user else ""
        port = f":{self._port}" if self._port is not None else ""
        return f"{user}{self._host}{port}"

    def __repr__(self) -> str:
        return f"SshLogin({self.name!r})"

    # -- the ssh command line ---------------------------------------------------------------------

    @property
    def control_dir(self) -> str:
        """The private (0700) directory holding the master connections' sockets; created on first use.

        ``$TORCHX_EXT_HOME/ssh`` unless that path is too long for a unix socket, then
        ``/tmp/torchx_ext-ssh-<uid>``.
        """
        if self._control_dir is None:
            preferred = os.path.join(home(), "ssh")
            if len(os.fsencode(preferred)) <= _MAX_CONTROL_DIR:
                self._control_dir = _private_dir(preferred)
            else:
                self._control_dir = _private_dir(os.path.join(tempfile.gettempdir(), f"torchx_ext-ssh-{os.getuid()}"))
        return self._control_dir

    def ssh_options(self) -> List[str]:
        """The options every ssh (and rsync's ssh) call uses, without the destination."""
        opts = []
        if self._config_file:
            opts += ["-F", self._config_file]
        opts += [
            "-o", "BatchMode=yes",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={os.path.join(self.control_dir, '%C')}",
            "-o", f"ControlPersist={self._control_persist}",
            "-o", f"ConnectTimeout={self._connect_timeout}",
            # a dead network is noticed within a minute instead of a TCP timeout (hours)
            "-o", "ServerAliveInterval=15",
        ]
        if self._identity_file:
            opts += ["-i", self._identity_file, "-o", "IdentitiesOnly=yes"]
        if self._port is not None:
            opts += ["-p", str(self._port)]
        return opts

    def _destination(self) -> str:
        host = self._host.strip("[]")
        return f"{self._user}@{host}" if self._user else host

    def command(self, remote_command: str) -> List[str]:
        """The local argv that runs ``remote_command`` (a shell line) on the login node.

        For callers that stream (``log --tail``) with their own :class:`subprocess.Popen`; such a
        caller gets ssh's raw exit status and should pass a 255 through :func:`ssh_failure_message`.
        """
        return ["ssh", *self.ssh_options(), "--", self._destination(), remote_command]

    # -- commands ---------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], stdin: Optional[str] = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` on the login node; every word arrives exactly as given.

        Args:
            argv: the program and its arguments (not a shell line: each word is quoted)
            stdin: text fed to the command's standard input; None: an empty input
            timeout: seconds for the whole call, connection included

        Returns:
            The remote command's exit status, stdout and stderr, whatever the status.

        Raises:
            SchedulerUnavailable: ssh could not log in or lost the connection, or the call took
                longer than ``timeout`` (the remote command is not killed: without a terminal it
                does not notice the client left), or there is no ``ssh`` here.
        """
        if not argv:
            raise ValueError("run() needs a command")
        return self._call(" ".join(shlex.quote(a) for a in argv), stdin, timeout)

    def run_script(self, script: str, args: Sequence[str] = (),
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs a bash script, fed on stdin (``bash -s``), so that its size and text need no quoting.

        Args:
            script: the script's text
            args: its positional parameters (``$1`` ...)
            timeout: as in :meth:`run`

        Returns:
            As :meth:`run`.
        """
        return self.run(["bash", "-s", "--", *args], stdin=script, timeout=timeout)

    def run_shell(self, line: str, stdin: Optional[str] = None,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs ``line``, POSIX shell text, in the login shell itself (no ``bash -c`` started for it).

        For a hot path whose cost is process starts (submit); the caller quotes every value in
        ``line`` (:func:`shlex.quote`). An ``exit`` in ``line`` leaves the shell: run it in ``( )``.

        Args:
            line: the shell text
            stdin: as in :meth:`run`
            timeout: as in :meth:`run`

        Returns:
            As :meth:`run`.
        """
        return self._call(line, stdin, timeout)

    def run_bytes(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """:meth:`run` whose stdout comes back as bytes, exactly (a log read from a byte offset).

        Args:
            argv: as in :meth:`run`
            timeout: as in :meth:`run`

        Returns:
            The remote command's exit status, its stdout as bytes and its stderr as bytes.

        Raises:
            SchedulerUnavailable: as in :meth:`run`.
        """
        if not argv:
            raise ValueError("run_bytes() needs a command")
        proc: Any = self._call(" ".join(shlex.quote(a) for a in argv), None, timeout, binary=True)
        return proc  # type: ignore[no-any-return]

    def no_ssh_message(self) -> str:
        return (f"cannot reach {self.name}: the OpenSSH client 'ssh' is not installed here; install it "
                "(Debian/Ubuntu: apt install openssh-client)")

    def _call(self, remote_command: str, stdin: Optional[str], timeout: float,
              binary: bool = False) -> subprocess.CompletedProcess[str]:
        # Markers around the command (see _STARTED); the newline ends the command whatever it holds.
        line = (f"printf '%s\\n' {_STARTED} >&2; {remote_command}\n"
                f"__txe_rc=$?; printf '\\n%s %d\\n' {_ENDED} \"$__txe_rc\" >&2; exit \"$__txe_rc\"")
        argv = self.command(line)
        started = time.monotonic()
        try:
            # stdin: never the caller's terminal (ssh would read it, and eat its input)
            proc: subprocess.CompletedProcess[str]
            if binary:
                raw = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
                # stdout stays bytes (typed loosely); stderr (ssh's and the markers) is read as text below
                out: Any = raw.stdout
                proc = subprocess.CompletedProcess(raw.args, raw.returncode, out, raw.stderr.decode("utf-8", "replace"))
            else:
                proc = subprocess.run(argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                                      capture_output=True, text=True, encoding="utf-8", errors="replace",
                                      timeout=timeout)
        except FileNotFoundError as e:
            raise SchedulerUnavailable(self.no_ssh_message()) from e
        except subprocess.TimeoutExpired as e:
            raise SchedulerUnavailable(
                f"{self.name} did not answer within {timeout:g} s (ssh {remote_command[:60]!r}); check "
                "the network and the login node's load") from e
        logger.debug("ssh %s %r: exit %d in %.3f s", self.name, remote_command[:200], proc.returncode,
                     time.monotonic() - started)
        before, found, rest = proc.stderr.partition(_STARTED + "\n")
        if not found:
            if proc.returncode == 255:
                raise SchedulerUnavailable(ssh_failure_message(self.name, proc.stderr))
            # The login shell itself failed (e.g. /sbin/nologin): the remote answered; caller judges.
            return proc
        body, ended, status = rest.rpartition("\n" + _ENDED + " ")
        if not ended:
            # started, never finished: ssh's 255 is a lost connection (any other status is the remote's)
            if proc.returncode == 255:
                raise SchedulerUnavailable(ssh_failure_message(self.name, rest, started=True))
            proc.stderr = before + rest
            return proc
        proc.stderr = before + body
        return proc

    # -- files ------------------------------------------------------------------------------------

    def put_text(self, remote_path: str, text: str, mode: int = 0o600, timeout: float = 60) -> None:
        """Writes ``text`` to ``remote_path`` in one round trip: parent made, file replaced atomically.

        A reader sees the old file or the new one, never half of it (written beside it, then renamed).
        Directories made on the way are 0700 (``umask 077``), whatever the login shell's umask.

        Args:
            remote_path: absolute, or relative to the remote home (``~`` is not expanded)
            text: the content (UTF-8)
            mode: the file's permission bits
            timeout: as in :meth:`run`

        Raises:
            BackendError: the remote could not write it (permissions, full disk); the message has
                the remote's reason.
            SchedulerUnavailable: as in :meth:`run`.
        """
        # umask 077: the directories made on the way and the file are the user's only from birth
        script = ('set -e; umask 077; d=$(dirname -- "$1"); mkdir -p -- "$d"; t=$(mktemp -- "$1.tmp.XXXXXX"); '
                  'trap \'rm -f -- "$t"\' EXIT; cat >"$t"; chmod "$2" "$t"; mv -f -- "$t" "$1"')
        proc = self.run(["sh", "-c", script, "sh", remote_path, format(mode, "o")], stdin=text, timeout=timeout)
        if proc.returncode != 0:
            raise BackendError(f"cannot write {remote_path} on {self.name}: {last_line(proc.stderr)}")

    # -- the master connection ----------------------------------------------------------------------

    def is_connected(self) -> bool:
        """Is a master connection up (so the next call needs no login)? Asks the local master only."""
        try:
            return subprocess.run(["ssh", *self.ssh_options(), "-O", "check", "--", self._destination()],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def close(self) -> None:
        """Ends the master connection now instead of ``ControlPersist`` seconds after the last call."""
        try:
            subprocess.run(["ssh", *self.ssh_options(), "-O", "exit", "--", self._destination()],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass  # no ssh, or no master: nothing to close

    def __enter__(self) -> SshLogin:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


def _private_dir(path: str) -> str:
    """``path`` as a directory only this user can enter (the sockets there are logged-in sessions)."""
    try:
        makedirs(path)  # 0700, and so is every directory it creates above
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            # e.g. planted in /tmp by another user: their socket would receive our commands
            raise StateError(f"{path} is not a directory owned by this user; remove it or set $TORCHX_EXT_HOME "
                             "to a short private path")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)
    except StateError:
        raise
    except OSError as e:
        raise StateError(f"cannot create {path} for ssh connections: {e.strerror or e}; check that "
                         "$TORCHX_EXT_HOME is writable") from e
    return path


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no error message"
