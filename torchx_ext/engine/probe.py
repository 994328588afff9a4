"""Performing the engine's ``Probe``: does a TCP port accept a connection, and a thread that asks
until every port of a service did.

The engine decides when a service is ready (``Ready``) or late; a launcher connects. Every launcher
connects the same way, so the connect is written here once, and each launcher keeps only its own
choices: the address (where the other replicas reach the service), the connect timeout, and whether
it waits in a thread of its own (Slurm's node, Ray's driver) or asks once per pass of its loop (the
host supervisor, the Docker watcher).

Standard library only, Python >= 3.8, and nothing of torchx or the rest of torchx-ext: it runs on a
Slurm node (shipped in the batch script, ``slurm_jobs.script.SHIPPED``) and in a Ray driver (inside
the cluster package, ``ray_jobs.local.cluster_package``). The engine itself does not import it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional, Sequence

# (host, port, timeout) -> accepted?; a launcher's tests pass their own
Connect = Callable[[str, int, float], bool]


def accepts(host: str, port: int, timeout: float) -> bool:
    """Does ``host`` accept a TCP connection on ``port`` now? (The connection is closed at once.)

    Args:
        host: the address to connect to.
        port: the TCP port.
        timeout: the most seconds the connect may take.
    """
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def until_accepting(host: str, ports: Sequence[int], timeout: float, every: float, stopped: Callable[[], bool],
                    pause: Callable[[float], object] = time.sleep, connect: Connect = accepts) -> bool:
    """Connects to each of ``ports`` at ``host`` in rounds until each accepted once; True then.

    Args:
        host: the address to connect to.
        ports: the ports to wait on.
        timeout: each connect's timeout (see :func:`accepts`).
        every: the pause between two rounds.
        stopped: asked before each round; once it says True, the answer is False (the attempt
            probed is over, the group decided).
        pause: how to pause (``threading.Event.wait`` ends a pause at once when set).
        connect: the connect check.
    """
    left = list(ports)  # a port that accepted once counts: a server need not keep it free for us
    while left:
        if stopped():
            return False
        left = [p for p in left if not connect(host, p, timeout)]
        if left:
            pause(every)
    return True


def start_probe(host: str, ports: Sequence[int], timeout: float, every: float, stopped: Callable[[], bool],
                on_ready: Callable[[], None], pause: Callable[[float], object] = time.sleep,
                connect: Connect = accepts, name: Optional[str] = None) -> threading.Thread:
    """Runs :func:`until_accepting` in a daemon thread of its own: a connect may take its whole
    timeout on an unroutable address, and the launcher's loop must not wait for it.

    Args:
        host, ports, timeout, every, stopped, pause, connect: as for :func:`until_accepting`.
        on_ready: called in the thread once every port accepted (it hands the news to the
            launcher's loop, which alone tells the engine).
        name: the thread's name.
    """
    def run() -> None:
        if until_accepting(host, ports, timeout, every, stopped, pause, connect):
            on_ready()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
