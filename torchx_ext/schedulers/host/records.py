"""The state files of a ``host`` app that its supervisor and the scheduler share (see the layout in
:mod:`torchx_ext.schedulers.host.supervisor`), and what the scheduler concludes from them once the
supervisor is gone."""

from __future__ import annotations

import os
import signal
import time
from typing import IO, Any, Mapping

from torchx_ext.engine.rules import TERMINAL
from torchx_ext.schedulers.host.procs import (
    Identity,
    kill_marked,
    marked,
    replica_of,
    replica_token,
    running,
    signal_group,
)
from torchx_ext.state import locked, read_json, update_json, write_json


def update_state(app_dir: str, **changes: Any) -> dict[str, Any]:
    return update_json(app_dir, "state.json", **changes)


def open_private_log(path: str) -> IO[bytes]:
    """``path`` opened for appending, created 0600 (a log can hold what a replica printed)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "ab")


def claim(app_dir: str, supervisor: Identity) -> dict[str, Any]:
    """Records ``supervisor`` as the app's supervisor (creating state.json if this is the first
    word about the app) unless the app has ended already (a cancel came first); returns the record.

    Both ``schedule`` (right after starting it) and the supervisor itself (first thing) call it:
    whichever is first, state.json never exists without a supervisor identity to check.
    """
    path = os.path.join(app_dir, "state.json")
    with locked(app_dir):
        st = read_json(path)
        if st is None:
            st = {"state": "SUBMITTED", "msg": "", "created": time.time(), "replicas": {}}
        elif st.get("state") in TERMINAL:
            return st
        st.update(supervisor_pid=supervisor["pid"], supervisor_start=supervisor["start"],
                  boot_id=supervisor["boot"])
        write_json(path, st)
        return st


def gone_message(record: Mapping[str, Any], app_dir: str, orphans: int) -> str:
    """Why an app without a verdict has no supervisor; ``orphans``: its processes still running."""
    left = (f"{orphans} of its processes still run unsupervised: `torchx cancel` stops them" if orphans
            else "its replicas were not seen to finish")
    return (f"the host supervisor (pid {record.get('supervisor_pid')}) is gone: it was killed or the machine "
            f"rebooted; {left} (see {app_dir}/supervisor.log)")


def orphans(app_dir: str, spec: Mapping[str, Any], record: Mapping[str, Any]) -> int:
    """How many processes provably of this app still run: replica leaders still the recorded
    process, and processes carrying a replica token."""
    tokens = {replica_token(app_dir, r["role"], r["replica_id"]) for r in spec.get("replicas", [])}
    pids = {ident["pid"] for ident, _ in marked(tokens)}
    pids.update(rs["pid"] for rs in record.get("replicas", {}).values() if running(replica_of(record, rs)))
    return len(pids)


def stop_recorded(app_dir: str, spec: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """SIGKILLs what an app's record (and its replica tokens) says is still its own, with its
    supervisor gone: each replica's group while provably the replica's, then any process still
    carrying a replica token. Nothing else: a reused pid or group is left alone."""
    for key, rs in record.get("replicas", {}).items():
        role, _, k = key.rpartition("/")
        signal_group(replica_of(record, rs), signal.SIGKILL, replica_token(app_dir, role, int(k)))
    kill_marked({replica_token(app_dir, r["role"], r["replica_id"]) for r in spec.get("replicas", [])})


def log_dir(app_dir: str, role: str, replica_id: int) -> str:
    return os.path.join(app_dir, "logs", role, str(replica_id))
