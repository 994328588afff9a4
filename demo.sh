#!/usr/bin/env bash
# Installs torchx-ext into .venv and runs a real heterogeneous group on this host (no cluster):
# a server role (a service) and a client role that finds the server through TORCHX_EXT_HOSTS_SERVER,
# fetches a greeting from it and prints it. Then shows the logs and the final status.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv-demo}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check . 2>&1 | grep -v '^WARNING: Location' || true
export PATH="$PWD/$VENV/bin:$PATH"
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

set -x
HANDLE=$(torchx run -s host group.server_client \
    --server "python -m torchx_ext.demo serve --port $PORT" \
    --client "python -m torchx_ext.demo fetch --role server --port $PORT" 2>/dev/null | tail -n 1)
torchx log --tail "$HANDLE/client"     # follows the client until the app ends
torchx status "$HANDLE"
