"""Group components: several roles started together, all or nothing, on any torchx-ext scheduler.

Every replica finds every role's hosts in ``TORCHX_EXT_HOSTS_<ROLE>`` (see :mod:`torchx_ext.groups`).
Commands are split like a shell would split them (``shlex``), so quote inside them as you would in a
shell; nothing is ever re-joined into a shell string.

A service given a port (``--port`` of ``server_client``, ``--ports`` of ``roles``) gets it as its
``port_map``, and the group engine of every torchx-ext scheduler waits for it: the other roles start
only once every replica of that service accepts TCP connections on it (run option
``ready_timeout_s``). Nothing is added to the commands, so any image will do. (On a scheduler
without the engine, TorchX's own, :func:`torchx_ext.wait_for.wrap` makes a command wait instead.)
"""


import shlex
from typing import Dict, List, Optional

from torchx import specs

from torchx_ext.groups import mark_service


def _role(
    name: str, command: str, image: str, replicas: int, env: Optional[Dict[str, str]],
    cpu: int, gpu: int, memMB: int, service: bool,
) -> specs.Role:
    words = shlex.split(command)
    if not words:
        raise ValueError(f"role '{name}': the command is empty")
    role = specs.Role(
        name=name, image=image, entrypoint=words[0], args=words[1:], num_replicas=replicas,
        env=dict(env or {}), resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB),
    )
    return mark_service(role, service)


def _give_ports(app_roles: List[specs.Role], ports: Dict[str, int]) -> None:
    """Each service named in ``ports`` gets its port as ``port_map``: the engine waits on it."""
    for role in app_roles:
        if role.name in ports:
            role.port_map = {role.name: ports[role.name]}


def _port(what: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{what}: expected a TCP port (1-65535), got {value!r}")
    return int(value)


# Over 60 lines: a TorchX component; most of it is the docstring TorchX prints as its --help.
def roles(
    *role_specs: str,
    services: str = "",
    ports: str = "",
    replicas: str = "",
    image: str = ".",
    env: Optional[Dict[str, str]] = None,
    cpu: int = 1,
    gpu: int = 0,
    memMB: int = 1024,
    name: str = "group",
) -> specs.AppDef:
    """Runs N roles as one heterogeneous group (started together, all or nothing).

    Example: ``torchx run -s host --wait group.roles --services server --ports server=8000
    "server=python3 -m http.server --bind 127.0.0.1 8000" "client=sh -c 'curl -s http://$TORCHX_EXT_HOSTS_SERVER:8000/'"``

    Args:
        role_specs: one ``NAME=COMMAND`` per role; COMMAND is split with shell quoting rules
        services: comma-separated role names that are services (stopped when the others end)
        ports: comma-separated ``SERVICE=PORT``: the other roles start once every replica of that
            service accepts TCP connections on PORT (run option ready_timeout_s: how long at most)
        replicas: comma-separated ``NAME=N`` replica counts (default 1 per role)
        image: image of every role (a directory on ``host``/``slurm_jobs``, an image on ``docker_jobs``)
        env: environment variables for every role, ``KEY=VALUE,KEY2=VALUE2``
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        name: the app's name
    """
    if not role_specs:
        raise ValueError("give at least one role as NAME=COMMAND")
    counts: Dict[str, int] = {}
    for item in filter(None, (s.strip() for s in replicas.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise ValueError(f"replicas: expected NAME=N, got {item!r}")
        counts[key] = int(value)
    service_names = {s.strip() for s in services.split(",") if s.strip()}
    app_roles = []
    for spec in role_specs:
        role_name, sep, command = spec.partition("=")
        if not sep or not role_name:
            raise ValueError(f"expected NAME=COMMAND, got {spec!r}")
        app_roles.append(_role(role_name, command, image, counts.get(role_name, 1), env,
                               cpu, gpu, memMB, role_name in service_names))
    port_of: Dict[str, int] = {}
    for item in filter(None, (s.strip() for s in ports.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"ports: expected SERVICE=PORT, got {item!r}")
        port_of[key] = _port(f"ports {item!r}", value)
    unknown = (service_names | set(counts) | set(port_of)) - {r.name for r in app_roles}
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles: {[r.name for r in app_roles]}")
    not_services = sorted(set(port_of) - service_names)
    if not_services:
        raise ValueError(f"ports: {not_services} not in --services; only a service's port is waited for")
    _give_ports(app_roles, port_of)
    return specs.AppDef(name=name, roles=app_roles)


def server_client(
    server: str,
    client: str,
    port: int = 0,
    image: str = ".",
    server_replicas: int = 1,
    client_replicas: int = 1,
    env: Optional[Dict[str, str]] = None,
    cpu: int = 1,
    gpu: int = 0,
    memMB: int = 1024,
    name: str = "server-client",
) -> specs.AppDef:
    """A server role (a service) and a client role; the app ends when the client ends.

    The client finds the server's hosts in ``TORCHX_EXT_HOSTS_SERVER``; with ``--port`` it starts
    only once every server replica accepts TCP connections on that port. The app's final state is
    the client's; a server that dies before the client is done fails the app.

    Example: ``torchx run -s host --wait group.server_client --port 8000
    --server "python3 -m http.server --bind 127.0.0.1 8000" --client "sh -c 'curl -s http://$TORCHX_EXT_HOSTS_SERVER:8000/'"``

    Args:
        server: the server's command, split with shell quoting rules
        client: the client's command, split with shell quoting rules
        port: the port the server listens on: the client starts once it accepts connections
            (run option ready_timeout_s: how long at most); 0: the client starts at once
        image: image of both roles (a directory on ``host``/``slurm_jobs``, an image on ``docker_jobs``)
        server_replicas: number of server replicas
        client_replicas: number of client replicas
        env: environment variables for both roles, ``KEY=VALUE,KEY2=VALUE2``
        cpu: CPUs per replica
        gpu: GPUs per server replica
        memMB: memory per replica in MB
        name: the app's name
    """
    app_roles = [
        _role("server", server, image, server_replicas, env, cpu, gpu, memMB, service=True),
        _role("client", client, image, client_replicas, env, cpu, 0, memMB, service=False),
    ]
    if port:
        _give_ports(app_roles, {"server": _port("port", str(port))})
    return specs.AppDef(name=name, roles=app_roles)
