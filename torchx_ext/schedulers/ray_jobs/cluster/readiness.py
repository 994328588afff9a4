"""Readiness of a gang's services: the driver performs the group engine's ``Probe`` here.

A service replica with ports is ready once each of them accepts a TCP connection at its node's
address, the one its ``TORCHX_EXT_HOSTS_<ROLE>`` discovery variable gives the other replicas:
the driver (on the head) connects there, so a service that listens only on its node's loopback is
not ready, as it would not be for the replicas on other nodes. Each probe runs in a thread of its
own (a connection attempt may take its whole timeout on an unroutable address); the driver's loop
takes what was found with :meth:`Probes.ready` and tells the engine, so the engine is only ever
called from that loop. Standard library only, as everything in this package.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Callable, Dict, List, Sequence, Tuple

RETRY_S = 0.1  # between two rounds of connection attempts
CONNECT_TIMEOUT_S = 0.5  # per attempt: a dropped SYN must not hold the round for the OS's minutes


def accepts(host: str, port: int, timeout: float) -> bool:
    """Does ``host:port`` accept a TCP connection now? (closed again at once)"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Probes:
    """The running probes, by replica index; each knows its replica's attempt."""

    def __init__(self, connect: Callable[[str, int, float], bool] = accepts) -> None:
        self._connect = connect
        self._found: queue.Queue[Tuple[int, int]] = queue.Queue()
        self._running: Dict[int, Tuple[int, threading.Event]] = {}  # replica -> (attempt, its stop)

    def start(self, i: int, attempt: int, host: str, ports: Sequence[int]) -> None:
        """Probes ``ports`` on ``host`` for attempt ``attempt`` of replica ``i`` (ending the
        probe of an earlier attempt of it)."""
        self.cancel([i])
        stop = threading.Event()
        self._running[i] = (attempt, stop)
        threading.Thread(target=self._probe, args=(i, attempt, host, tuple(ports), stop), daemon=True,
                         name=f"torchx-ext-probe-{i}-{attempt}").start()

    def _probe(self, i: int, attempt: int, host: str, ports: Tuple[int, ...], stop: threading.Event) -> None:
        left = list(ports)  # a port that accepted once counts: a server need not keep it free for us
        while left and not stop.is_set():
            left = [p for p in left if not self._connect(host, p, CONNECT_TIMEOUT_S)]
            if left:
                stop.wait(RETRY_S)
        if not left and not stop.is_set():
            self._found.put((i, attempt))

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
