"""Readiness of a gang's services: the driver performs the group engine's ``Probe`` here.

A service replica with ports is ready once each of them accepts a TCP connection at its node's
address, the one its ``TORCHX_EXT_HOSTS_<ROLE>`` discovery variable gives the other replicas:
the driver (on the head) connects there, so a service that listens only on its node's loopback is
not ready, as it would not be for the replicas on other nodes. Each probe runs in a thread of its
own (a connection attempt may take its whole timeout on an unroutable address); the driver's loop
takes what was found with :meth:`Probes.ready` and tells the engine, so the engine is only ever
called from that loop. Standard library only, as everything in this package; the connect and the
probe's thread are every launcher's (:mod:`torchx_ext.engine.probe`, which travels inside the engine).
"""

from __future__ import annotations

import queue
import threading
from typing import Dict, List, Sequence, Tuple

try:  # on the cluster: the group engine travels inside this package (ray_jobs.local.cluster_package)
    from .engine.probe import Connect, accepts, start_probe  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from torchx_ext.engine.probe import Connect, accepts, start_probe  # type: ignore[no-redef,unused-ignore]

RETRY_S = 0.1  # between two rounds of connection attempts
CONNECT_TIMEOUT_S = 0.5  # per attempt: a dropped SYN must not hold the round for the OS's minutes


class Probes:
    """The running probes, by replica index; each knows its replica's attempt."""

    def __init__(self, connect: Connect = accepts) -> None:
        self._connect = connect
        self._found: queue.Queue[Tuple[int, int]] = queue.Queue()
        self._running: Dict[int, Tuple[int, threading.Event]] = {}  # replica -> (attempt, its stop)

    def start(self, i: int, attempt: int, host: str, ports: Sequence[int]) -> None:
        """Probes ``ports`` on ``host`` for attempt ``attempt`` of replica ``i`` (ending the
        probe of an earlier attempt of it)."""
        self.cancel([i])
        stop = threading.Event()
        self._running[i] = (attempt, stop)

        def found() -> None:
            if not stop.is_set():  # cancelled as its last round succeeded
                self._found.put((i, attempt))

        # stop.wait: a cancel ends the pause between two rounds at once
        start_probe(host, tuple(ports), CONNECT_TIMEOUT_S, RETRY_S, stop.is_set, found, pause=stop.wait,
                    connect=self._connect, name=f"torchx-ext-probe-{i}-{attempt}")

    def cancel(self, indices: Sequence[int]) -> None:
        """Ends the probes of these replicas (their attempts were stopped or ended)."""
        for i in indices:
            entry = self._running.pop(i, None)
            if entry is not None:
                entry[1].set()

    def cancel_all(self) -> None:
        self.cancel(list(self._running))

    def ready(self) -> List[Tuple[int, int]]:
        """The (replica, attempt)s whose ports all accepted since the last call, leaving out any
        cancelled meanwhile (a probe that found its ports just as its attempt was stopped)."""
        out: List[Tuple[int, int]] = []
        while True:
            try:
                i, attempt = self._found.get_nowait()
            except queue.Empty:
                return out
            entry = self._running.get(i)
            if entry is not None and entry[0] == attempt:
                del self._running[i]
                out.append((i, attempt))
