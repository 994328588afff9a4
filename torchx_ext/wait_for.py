"""Start a command only once the group's services accept TCP connections.

The group components (:mod:`torchx_ext.components.group`) wrap each non-service role's command in
this waiter, so that a client never starts before its server listens, on every backend. The waiter
reads the service's hosts where every backend puts them (``TORCHX_EXT_HOSTS_<ROLE>``, see
:func:`torchx_ext.groups.discovery_env`), connects to each host on the service's port until it
accepts, then replaces itself (``exec``) with the command, its arguments exactly as given.

It runs as ``python3 -c PROGRAM ...`` rather than ``python3 -m torchx_ext.wait_for``: a container
image or a Ray node has a Python but usually not torchx-ext. It uses the standard library only, and
any Python 3 will do. Arguments of the program::

    TIMEOUT_S ROLE:PORT:ENV_NAME [ROLE:PORT:ENV_NAME ...] -- COMMAND [ARG ...]

On timeout it prints one line naming the service, its host and port, and exits with status 1;
a command that cannot be started exits 127 (not found) or 126 (not executable), as a shell would.
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

from torchx_ext.groups import hosts_env_name

# kept short and dependency-free: it is shipped inside the role's arguments (shown by --dryrun)
PROGRAM = r"""
import os, socket, sys, time
a = sys.argv[1:]
end = a.index("--")
timeout = float(a[0])
deadline = time.monotonic() + timeout
for spec in a[1:end]:
    role, port, env = spec.rsplit(":", 2)
    hosts = list(dict.fromkeys(h for h in os.environ.get(env, "").split(",") if h))
    if not hosts:
        sys.exit(f"torchx-ext: cannot wait for service '{role}': ${env} names no host")
    for host in hosts:
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError:
                if time.monotonic() >= deadline:
                    sys.exit(f"torchx-ext: service '{role}' did not accept connections on {host}:{port} "
                             f"within {timeout:g}s; not starting {a[end + 1]!r}")
                time.sleep(0.05)
cmd = a[end + 1:]
sys.stdout.flush()
try:
    os.execvp(cmd[0], cmd)
except OSError as e:
    sys.stderr.write(f"torchx-ext: cannot run {cmd[0]!r}: {e.strerror}\n")
    sys.exit(127 if isinstance(e, FileNotFoundError) else 126)
""".strip()

PYTHON = "python3"


def wrap(entrypoint: str, args: Sequence[str], ports: Mapping[str, int], timeout_s: float) -> tuple[str, list[str]]:
    """``(entrypoint, args)`` that wait for ``ports`` (service role name → port), then run the command.

    Args:
        entrypoint: the command to start once the services accept connections
        args: its arguments, passed on unchanged
        ports: the port each service role listens on
        timeout_s: how long to wait for all of them together
    """
    specs = [f"{role}:{port}:{hosts_env_name(role)}" for role, port in ports.items()]
    return PYTHON, ["-c", PROGRAM, f"{timeout_s:g}", *specs, "--", entrypoint, *args]


if __name__ == "__main__":  # python -m torchx_ext.wait_for TIMEOUT_S ROLE:PORT:ENV ... -- COMMAND ...
    exec(compile(PROGRAM, "torchx_ext.wait_for", "exec"), {"__name__": "__main__"})
    sys.exit(0)  # not reached: the program execs the command or exits
