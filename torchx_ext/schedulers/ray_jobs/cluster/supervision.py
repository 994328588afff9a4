"""Who may end a ``ray_jobs`` driver besides its own app: Ray's job supervisor above it (gone
with a lost head or node) and the job's record in Ray's job table (a stop Ray lost, or a cancel
marker). The one module of the cluster package on Ray's private API: the GCS client and the key
layout of the job table (checked against the Ray versions of ``adapter.RAY_CHECKED``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Optional, Tuple


def _ray_ancestor() -> int:
    """The Ray worker that started this driver (Ray's job supervisor actor); else the parent.

    Ray runs the entrypoint under a shell, which may or may not exec us, hence the walk up."""
    pid = os.getppid()
    for _ in range(3):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::"):
                    return pid
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return os.getppid()


# Ray's job table, as its job manager keeps it in the GCS KV store (ray.dashboard.modules.job
# .common.JobInfoStorageClient): the driver reads its own record there, no ray.init needed.
_JOB_KEY = "_ray_internal_job_info_{}"
# The GCS client is ray._raylet: importing it costs ~0.35 s of CPU, as much again as the rest of a
# short job's driver, and it competes with the replica's start. A job that ends sooner never
# imports it; a lost stop or a cancel marker is then seen ~1.5 s after the driver starts at the
# latest, instead of ~0.5 s (the supervisor watch above it runs from the first instant)
GCS_WATCH_AFTER_S = 1.0
_JOB_NAMESPACE = b"job"
_ENDED = ("STOPPED", "SUCCEEDED", "FAILED")


def _job_records(sid: str) -> Optional[Any]:
    """A function returning (this job's Ray status, whether a cancel marker exists), or None
    when the GCS cannot be read from here (then only the supervisor watch guards the driver)."""
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        gcs = GcsClient(address=os.environ["RAY_ADDRESS"])
    except Exception:  # noqa: BLE001 - a private API (any Ray version may differ): then the supervisor watch guards
        return None

    def read() -> Tuple[Optional[str], bool]:
        info = gcs.internal_kv_get(_JOB_KEY.format(sid).encode(), namespace=_JOB_NAMESPACE, timeout=5)
        marker = gcs.internal_kv_get(_JOB_KEY.format(sid + "--cancelled").encode(), namespace=_JOB_NAMESPACE,
                                     timeout=5)
        return (json.loads(info).get("status") if info else None), marker is not None
    return read


def watch_job(sid: str, orphaned: threading.Event, stopping: threading.Event) -> None:
    """Sets ``stopping`` when this driver must not run on, whatever did or did not reach it:

    * Ray's job supervisor above it is gone (the head or node was lost, its raylet took the
      workers with it): no ``ray job stop`` will ever come (sets ``orphaned`` too);
    * Ray's record of this job says it ended (STOPPED) while the driver still runs: the stop's
      SIGTERM missed it (Ray signals the process tree it saw at that instant, which a process
      started just after escapes);
    * the client's cancel marker exists: the app was cancelled while Ray still had it PENDING,
      and a stop sent then may never reach the driver (its verdict is then CANCELLED and the
      client reports CANCELLED, although Ray records the exit as FAILED).
    """
    supervisor = _ray_ancestor()
    started = time.monotonic()

    def watch() -> None:
        records: Optional[Any] = None
        last_read = 0.0
        while not stopping.is_set():
            if sid and last_read == 0.0 and time.monotonic() - started >= GCS_WATCH_AFTER_S:
                last_read = -1.0  # tried once: None means this node cannot read the GCS
                records = _job_records(sid)
            try:
                os.kill(supervisor, 0)
                with open(f"/proc/{supervisor}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        raise ProcessLookupError
            except (ProcessLookupError, FileNotFoundError):
                orphaned.set()
                stopping.set()
                return
            except OSError:
                pass  # not ours to signal (PermissionError): it is alive
            if records is not None and time.time() - last_read >= 1.0:
                last_read = time.time()
                try:
                    status, marked = records()
                except Exception:  # noqa: BLE001 - the GCS is slow or restarting: the next round asks again
                    status, marked = None, False
                if marked or status in _ENDED:
                    stopping.set()
                    return
            time.sleep(0.5)

    threading.Thread(target=watch, name="job-watch", daemon=True).start()
