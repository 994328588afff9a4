"""Runs one replica's process and buffers its output, line by line, with timestamps.

Used in two places: directly inside the driver (a single-replica app, whose resources the driver
itself holds as entrypoint resources) and as the body of a Ray actor placed in the gang's
placement group bundle (multi-replica and multi-role apps). The driver polls it; nothing here
prints, so Ray's actor log prefixes and de-duplication never touch the replicas' output.
"""

from __future__ import annotations

import base64
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import ENV_B64_PREFIX, SPEC_ENV

Line = Tuple[str, float, str]  # (stream "o"/"e", unix time, text without the newline)

_PR_SET_PDEATHSIG = 1

# A replica's children (a `sleep` under `sh -c`) do not share its death signal, and Ray SIGKILLs
# only the direct children of a worker it stops. So before each replica starts, a detached
# watchdog (a grandchild of the worker: that sweep misses it) waits for the process running the
# replica (driver or actor) to end, then kills every process that carries the replica's token in
# its environment: the replica and whatever it started, even in another process group.
# Started first, so that no instant exists where the replica runs unwatched. Argv: runner pid, token.
TOKEN_ENV = "TORCHX_EXT_REPLICA_TOKEN"
WATCHDOG = """
import os, signal, sys, time
if os.fork():
    os._exit(0)  # detach: the runner reaps the intermediate, init adopts the watchdog
os.setsid()
runner, mark = int(sys.argv[1]), ("%s=%s" % (sys.argv[3], sys.argv[2])).encode() + b"\\0"
def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
def marked():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/environ" % entry, "rb") as f:
                    if mark in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found
while alive(runner):
    time.sleep(0.2)
quiet_since = time.time()
for _ in range(100):  # until 1 s has passed without finding one: a fork may be under way
    pids = marked()
    if pids:
        quiet_since = time.time()
    elif time.time() - quiet_since > 1.0:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.1)
"""


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        # The replica must not outlive the process running it: Ray SIGKILLs a stopped job's
        # driver after a grace period and kills actor workers without running Python code.
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() != parent:  # it died before prctl: the death signal will never come
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def node_ip() -> str:
    """The address other replicas reach this node at (what Ray advertises for it)."""
    # Not `import ray`: ~0.35 s of CPU in a single replica's driver, which never calls ray.init
    # (an actor's worker has imported it; a driver that has not is not connected)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return str(ray.util.get_node_ip_address())
    # In the driver without ray.init: the interface routing to the GCS is the node's address.
    gcs = os.environ.get("RAY_ADDRESS", "").split("://")[-1].rsplit(":", 1)[0] or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((gcs, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def decoded_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """``environ`` without the spec, with base64-shipped values decoded (see ENV_B64_PREFIX)."""
    out = {k: v for k, v in environ.items() if k != SPEC_ENV and not k.startswith(ENV_B64_PREFIX)}
    for k, v in environ.items():
        if k.startswith(ENV_B64_PREFIX):
            out[k[len(ENV_B64_PREFIX):]] = base64.b64decode(v).decode("utf-8")
    return out


class ReplicaRunner:
    """One replica: ``start`` its process, ``poll`` for output and exit code, ``stop`` it."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._lines: List[Line] = []
        self._lock = threading.Lock()
        self._pumps: List[threading.Thread] = []

    def node_ip(self) -> str:
        return node_ip()

    def start(self, cmd: Sequence[str], env: Dict[str, str]) -> Optional[str]:
        """Starts ``cmd`` (an argv list: no shell, arguments arrive verbatim).

        Returns None on success or the reason it could not start.
        """
        if self._proc is not None:  # a restart: what the last attempt left in its group goes first
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                pass
        full_env = decoded_env(os.environ)
        full_env.update(env)
        full_env[TOKEN_ENV] = token = os.urandom(8).hex()
        try:
            subprocess.run([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), token, TOKEN_ENV],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           close_fds=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass  # the replica runs without it; stop() still ends its group
        try:
            # own session: stop() signals the whole process tree of the replica
            self._proc = subprocess.Popen(
                list(cmd), env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with(os.getpid()),
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return f"could not start {cmd[0]!r}: {e}"
        for stream, pipe in (("o", self._proc.stdout), ("e", self._proc.stderr)):
            t = threading.Thread(target=self._pump, args=(stream, pipe), daemon=True)
            t.start()
            self._pumps.append(t)
        return None

    def _pump(self, stream: str, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                self._lines.append((stream, time.time(), text))
        pipe.close()

    def poll(self) -> Tuple[List[Line], Optional[int]]:
        """New output lines and the exit code (None while running).

        The exit code is only reported once both pipes are drained, so a caller that sees it
        has also seen the last line.
        """
        code = self._proc.poll() if self._proc else None
        if code is not None:
            for t in self._pumps:
                t.join(timeout=5)
        with self._lock:
            lines, self._lines = self._lines, []
        return lines, code

    def stop(self, grace_s: float = 2.0) -> Optional[int]:
        """SIGTERM to the replica's process group, SIGKILL after ``grace_s``; returns the code."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.poll()
