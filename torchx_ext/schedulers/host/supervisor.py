"""The detached supervisor of one ``host`` app, and the state files it shares with the scheduler.

``python -m torchx_ext.schedulers.host.supervisor APP_DIR`` runs in its own session, outliving the
``torchx run`` that started it. It waits for the app's dependencies, starts every replica (all or
nothing), pumps their output into timestamped log files, applies the group rules of
the engine (:mod:`torchx_ext.engine`), and records everything in ``APP_DIR/state.json``.

Layout of APP_DIR (under ``$TORCHX_EXT_HOME/host/``):
  spec.json      the request (written once by ``schedule``; never holds secrets from os.environ)
  state.json     app + replica states, process identities, exit codes, times (atomic replace,
                 under ``lock``)
  lock           fcntl lock file serialising read-modify-write of state.json
  logs/ROLE/N/   stdout.log, stderr.log, combined.log: each line ``<unix time> <text>``
  supervisor.log the supervisor's own output (tracebacks land here, never lost)

Everything there can hold a Role.env value or what a replica printed: directories are created
0700 and files 0600 (by mode at creation, so the user's umask cannot widen them).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
from typing import IO, Any, Optional, cast

from torchx_ext import engine
from torchx_ext.engine.probe import accepts
from torchx_ext.engine.rules import CANCELLED_BEFORE_START, CANCELLED_WAITING, TERMINAL
from torchx_ext.errors import StateError
from torchx_ext.groups import ENV_ATTEMPT
from torchx_ext.schedulers.host.procs import (
    TOKEN_ENV,
    boot_id,
    identity,
    kill_marked,
    replica_of,
    replica_token,
    running,
    signal_group,
    supervisor_of,
)
from torchx_ext.schedulers.host.records import claim, log_dir, open_private_log, update_state
from torchx_ext.state import makedirs, read_json

STOP_GRACE_S = 3.0
POLL_S = 0.2
PROBE_S = 0.05
CONNECT_S = 1.0  # a probe's connect (to loopback: answered at once, accepted or refused)


# ---------------------------------------------------------------------- the supervisor ----
class _Replica:
    def __init__(self, spec: dict[str, Any], app_dir: str) -> None:
        self.spec = spec
        self.key = f"{spec['role']}/{spec['replica_id']}"
        self.token = replica_token(app_dir, spec["role"], spec["replica_id"])
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.dir = log_dir(app_dir, spec["role"], spec["replica_id"])
        makedirs(self.dir, mode=0o700)  # each level created 0700 (state.makedirs)
        self.files = {name: open_private_log(os.path.join(self.dir, f"{name}.log"))
                      for name in ("stdout", "stderr", "combined")}
        self.partial = {"stdout": b"", "stderr": b""}
        self.pipes: set[int] = set()  # fds of this attempt's stdout/stderr still open

    def write(self, stream: str, data: bytes, final: bool = False) -> None:
        buf = self.partial[stream] + data
        *lines, rest = buf.split(b"\n")
        if final and rest:
            lines, rest = lines + [rest], b""
        self.partial[stream] = rest
        if not lines:
            return
        stamp = f"{time.time():.6f} ".encode()
        out = b"".join(stamp + line + b"\n" for line in lines)
        self.files[stream].write(out)
        self.files["combined"].write(out)
        self.files[stream].flush()
        self.files["combined"].flush()


class Supervisor:
    """The host launcher of the group engine (:mod:`torchx_ext.engine`): it performs the engine's
    actions on processes and reports what the processes did; the engine decides everything else."""

    def __init__(self, app_dir: str) -> None:
        self.app_dir = app_dir
        spec = read_json(os.path.join(app_dir, "spec.json"))
        if spec is None:
            raise RuntimeError(f"{app_dir}/spec.json is missing or unreadable")
        self.spec = spec
        self.replicas = [_Replica(r, app_dir) for r in spec["replicas"]]
        self.sel = selectors.DefaultSelector()
        self.cancelled = False
        self.replica_state: dict[str, dict[str, Any]] = {
            r.key: {"role": r.spec["role"], "replica_id": r.spec["replica_id"],
                    "service": r.spec["service"], "state": "PENDING", "host": "127.0.0.1", "attempt": 1}
            for r in self.replicas
        }
        self.by_key = {(r.spec["role"], r.spec["replica_id"]): r for r in self.replicas}
        self.engine = engine.Engine(engine.GroupSpec.from_dicts(
            spec["replicas"], float(spec.get("retry_backoff_s", 0.0)), spec.get("ready_timeout_s")))
        self.probes: dict[tuple[str, int], engine.Probe] = {}  # services not ready yet
        self.boot = boot_id()

    # -- state ------------------------------------------------------------------------
    def _save(self, **changes: Any) -> None:
        update_state(self.app_dir, replicas=self.replica_state, num_restarts=self.engine.num_restarts, **changes)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.cancelled = True

    # -- dependencies -----------------------------------------------------------------
    def _wait_for_dependencies(self) -> bool:
        deps = self.spec.get("dependencies", [])
        if not deps:
            return True
        self._save(state="PENDING", msg=f"waiting for dependencies: {', '.join(deps)}")
        while True:
            if self.cancelled:
                self._report(engine.Cancel(CANCELLED_WAITING))
                return False
            pending = []
            for dep in deps:
                why = self._dependency_failure(dep)
                if why:
                    self._report(engine.Fail(why))
                    return False
                if why is not None:
                    pending.append(dep)
            if not pending:
                return True
            time.sleep(POLL_S)

    def _dependency_failure(self, dep: str) -> Optional[str]:
        """Why ``dep`` fails this app; "" while it has yet to succeed; None once it has."""
        try:
            dep_state = read_json(os.path.join(os.path.dirname(self.app_dir), dep, "state.json"))
        except StateError as e:  # damaged: its outcome can never be read
            return f"dependency '{dep}' cannot be read: {e}"
        if dep_state is None:
            return f"dependency '{dep}' no longer exists"
        s = dep_state.get("state")
        if s in ("FAILED", "CANCELLED"):
            why = dep_state.get("msg") or ""
            return f"dependency '{dep}' ended {s}" + (f" ({why})" if why else "")
        if s == "UNKNOWN" or (s not in TERMINAL and not running(supervisor_of(dep_state))):
            return f"dependency '{dep}' lost its supervisor; its outcome is unknown"
        return None if s == "SUCCEEDED" else ""

    # -- the engine's actions -----------------------------------------------------------
    def _report(self, event: engine.Event) -> None:
        """Tells the engine ``event`` and performs what it answers, in order (each action's own
        events are reported as they happen, depth first)."""
        for action in self.engine.on(event, time.time()):
            self._perform(action)

    def _perform(self, action: engine.Action) -> None:
        if isinstance(action, engine.Start):
            if self.engine.verdict is not None:
                return  # decided while this batch was performed (all or nothing): start no more
            r = self.by_key[action.key]
            error = self._start(r, action.attempt)
            self._sync(r)
            self._report(engine.StartFailed(action.key, error, action.attempt) if error is not None
                         else engine.Started(action.key, action.attempt))
            self._sync(r)
            if error is None and self.engine.verdict is None and action.attempt > 1:
                self._save()  # a restarted attempt runs: say so now, not at the next exit
        elif isinstance(action, engine.Stop):
            scope = [self.by_key[k] for k in action.keys]
            if action.final:
                self._stop_all()
            else:
                self._stop([x for x in scope if x.proc is not None and x.proc.poll() is None])
                for x in scope:
                    self._close_attempt(x)
            for x in scope:
                self._sync(x)
        elif isinstance(action, engine.Mark):
            self._sync(self.by_key[action.key])
            self.by_key[action.key].write("stderr", (action.line + "\n").encode())
        elif isinstance(action, engine.Probe):
            self.probes[action.key] = action
        elif isinstance(action, engine.Verdict):
            for r in self.replicas:
                self._sync(r)
            self._save(state=action.state, msg=action.msg, ended=time.time())
        # Restart: the engine's count is saved with every state (num_restarts); Wait: the main
        # loop's select never sleeps past engine.next_due

    def _probe(self) -> None:
        """Reports Ready for each probed service whose ports all accept connections on this host
        (loopback: discovery gives host replicas 127.0.0.1). A connect to loopback is answered at
        once (accepted or refused), so the loop is not held up; a probe whose attempt is no longer
        the one running is dropped (the engine would ignore its Ready anyway)."""
        for key, probe in list(self.probes.items()):
            v = self.engine.replicas[key]
            if self.engine.verdict is not None or v.state != "RUNNING" or v.attempt != probe.attempt:
                del self.probes[key]
                continue
            if all(accepts("127.0.0.1", port, CONNECT_S) for port in probe.ports):
                del self.probes[key]
                self._report(engine.Ready(key, probe.attempt))

    def _sync(self, r: _Replica) -> None:
        """Copies the engine's view of ``r`` into its record (pid, times and an exit code of a
        stopped attempt stay the launcher's)."""
        v = self.engine.replicas[(r.spec["role"], r.spec["replica_id"])]
        rs = self.replica_state[r.key]
        if v.state in TERMINAL and rs["state"] not in TERMINAL:
            rs["ended"] = time.time()
        rs.update(state=v.state, attempt=v.attempt, reason=v.reason)
        if v.exit_code is not None or v.state != "CANCELLED":
            rs["exit_code"] = v.exit_code

    # -- replicas ---------------------------------------------------------------------
    def _start(self, r: _Replica, attempt: int) -> Optional[str]:
        """Starts attempt ``attempt`` of ``r``; None, or why it could not start."""
        env = dict(os.environ)
        env.update(r.spec["env"])
        if "PATH" in r.spec["env"] and os.environ.get("PATH"):
            # like local_cwd: a role's PATH is prepended, not a replacement
            env["PATH"] = r.spec["env"]["PATH"] + os.pathsep + os.environ["PATH"]
        env[TOKEN_ENV] = r.token
        env[ENV_ATTEMPT] = str(attempt)
        try:
            r.proc = subprocess.Popen(
                r.spec["cmd"], env=env, cwd=r.spec["cwd"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as e:
            self.replica_state[r.key].update(ended=time.time())
            return str(e)
        assert r.proc.stdout is not None and r.proc.stderr is not None
        for pipe, stream in ((r.proc.stdout, "stdout"), (r.proc.stderr, "stderr")):
            self.sel.register(pipe, selectors.EVENT_READ, (r, stream))
            r.pipes.add(pipe.fileno())
        # our child, not reaped yet: the pid cannot have changed hands before this read
        ident = identity(r.proc.pid)
        self.replica_state[r.key].update(pid=r.proc.pid, pgid=r.proc.pid,
                                         start=ident["start"] if ident else None, started=time.time())
        return None

    def _pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data is None:  # the SIGCHLD wakeup pipe (see _wake_on_child_exit)
                try:
                    os.read(key.fd, 4096)
                except BlockingIOError:
                    pass
                continue
            r, stream = key.data
            data = os.read(key.fd, 65536)
            if data:
                r.write(stream, data)
            else:
                r.write(stream, b"", final=True)
                r.pipes.discard(key.fd)
                self.sel.unregister(key.fileobj)
                cast(IO[bytes], key.fileobj).close()  # a replica's stdout/stderr (_start)

    def _poll_exits(self) -> bool:
        """Reports every running replica that ended (an exit code, or the signal that killed it);
        True if one did."""
        changed = False
        for r in self.replicas:
            if r.proc is None or self.replica_state[r.key]["state"] != "RUNNING":
                continue
            code = r.proc.poll()
            if code is None:
                continue
            changed = True
            self.replica_state[r.key]["ended"] = time.time()
            key = (r.spec["role"], r.spec["replica_id"])
            self._report(engine.Killed(key, -code) if code < 0 else engine.Exited(key, code))
            self._sync(r)
            if self.engine.verdict is not None:
                break
        return changed

    def _close_attempt(self, r: _Replica) -> None:
        """Reads what the ended attempt left in its pipes and kills what it left behind, so the
        next attempt starts clean (its lines after the attempt marker, no leftover process)."""
        if r.proc is not None:
            self._signal_group(r, signal.SIGKILL)
        kill_marked({r.token})
        deadline = time.time() + 1.0
        while r.pipes and time.time() < deadline:
            self._pump(0.05)
        for key in [k for k in self.sel.get_map().values() if k.data is not None and k.data[0] is r]:
            self.sel.unregister(key.fileobj)
            cast(IO[bytes], key.fileobj).close()
        r.pipes.clear()
        for stream in ("stdout", "stderr"):
            r.write(stream, b"", final=True)

    def _stop(self, running: list[_Replica]) -> None:
        """SIGTERM these replicas' process groups, SIGKILL after a grace period, and record the
        exit codes they ended with."""
        for r in running:
            self._signal_group(r, signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and any(r.proc.poll() is None for r in running):  # type: ignore[union-attr]
            self._pump(0.05)
        for r in running:
            self._signal_group(r, signal.SIGKILL)
            r.proc.wait()  # type: ignore[union-attr]
            self.replica_state[r.key].update(exit_code=r.proc.returncode, ended=time.time())  # type: ignore[union-attr]

    def _signal_group(self, r: _Replica, sig: int) -> None:
        signal_group(replica_of({"boot_id": self.boot}, self.replica_state[r.key]), sig, r.token)

    def _stop_all(self) -> None:
        """Stops every running replica, and whatever any replica left behind."""
        self._stop([r for r in self.replicas if r.proc is not None and r.proc.poll() is None])
        for r in self.replicas:
            if r.proc is not None:
                # grandchildren left in the group of a leader reaped earlier: only while the group
                # is still provably this replica's (signal_group), never by its bare number
                self._signal_group(r, signal.SIGKILL)
        kill_marked({r.token for r in self.replicas})  # what left the groups (see TOKEN_ENV)
        # drain what is left in the pipes, bounded: a daemonised grandchild could hold them open
        deadline = time.time() + 1.0
        while any(k.data is not None for k in self.sel.get_map().values()) and time.time() < deadline:
            self._pump(0.05)
        for r in self.replicas:
            for stream in ("stdout", "stderr"):
                r.write(stream, b"", final=True)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        me = identity(os.getpid())
        assert me is not None  # /proc/self exists
        if claim(self.app_dir, me).get("state") in TERMINAL:
            return  # a cancel that came before us has decided already: start nothing
        if not self._wait_for_dependencies():
            return
        if self.cancelled:
            self._report(engine.Cancel(CANCELLED_BEFORE_START))
            return
        self._report(engine.Begin())
        if self.engine.verdict is not None:
            return
        self._save(state="RUNNING", msg="", started=time.time())
        self._wake_on_child_exit()
        while self.engine.verdict is None:
            # until the next due restart (or readiness deadline) at most: a restart without backoff
            # starts at once; a service is probed every PROBE_S
            due = self.engine.next_due
            poll = PROBE_S if self.probes else POLL_S
            self._pump(max(0.0, min(poll, due - time.time())) if due is not None else poll)
            self._probe()
            if self.cancelled:
                self._report(engine.Cancel())
                return
            if self._poll_exits() and self.engine.verdict is None:
                self._save()
            if self.engine.next_due is not None:
                self._report(engine.Tick())

    def _wake_on_child_exit(self) -> None:
        """Makes a replica's exit wake the select at once (SIGCHLD through a wakeup pipe), so the
        group rules and restarts act on it without waiting out the poll interval."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(w)
        self.sel.register(r, selectors.EVENT_READ, None)


def main(argv: list[str]) -> int:
    app_dir = argv[1]
    supervisor = None
    try:
        supervisor = Supervisor(app_dir)
        supervisor.run()
    except Exception:  # noqa: BLE001 - any crash: stop the replicas and record FAILED, never die silently
        traceback.print_exc()
        try:  # no replica may outlive its supervisor: stop what it started before the crash
            if supervisor is not None:
                supervisor._stop_all()  # noqa: SLF001 - this module's own class
        except Exception:  # noqa: BLE001 - the FAILED record below must still be written
            traceback.print_exc()
        update_state(app_dir, state="FAILED", msg="supervisor crashed; see supervisor.log",
                     ended=time.time())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
