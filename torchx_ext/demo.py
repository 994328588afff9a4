"""The README demo's two programs: ``serve`` answers HTTP; ``fetch`` finds it via discovery env.

``python -m torchx_ext.demo serve --port 8765`` and
``python -m torchx_ext.demo fetch --role server --port 8765`` (reads ``TORCHX_EXT_HOSTS_SERVER``).
"""

from __future__ import annotations

import argparse
import http.server
import os
import sys
import time
import urllib.request


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {os.environ.get('TORCHX_EXT_ROLE', '?')} replica " \
               f"{os.environ.get('TORCHX_EXT_REPLICA_ID', '?')} of {os.environ.get('TORCHX_EXT_APP_ID', '?')}\n"
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m torchx_ext.demo")
    p.add_argument("mode", choices=["serve", "fetch"])
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--role", default="server", help="role to fetch from (fetch mode)")
    p.add_argument("--timeout", type=float, default=30.0)
    # loopback by default: the demo runs on the host scheduler, whose replicas all find each other at
    # 127.0.0.1; a demo should not answer on every interface of the machine it runs on
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on (serve mode; 0.0.0.0: every interface)")
    a = p.parse_args(argv)
    if a.mode == "serve":
        http.server.HTTPServer((a.bind, a.port), _Hello).serve_forever()
        return 0
    var = "TORCHX_EXT_HOSTS_" + "".join(c if c.isalnum() else "_" for c in a.role).upper()
    host = os.environ[var].split(",")[0]
    url = f"http://{host}:{a.port}/"
    print(f"{var}={os.environ[var]}; fetching {url}", flush=True)
    deadline = time.time() + a.timeout
    while True:  # the server starts at the same time as we do: retry until it answers
        try:
            print(urllib.request.urlopen(url, timeout=5).read().decode(), end="", flush=True)
            return 0
        except OSError as e:
            if time.time() > deadline:
                print(f"{url} did not answer within {a.timeout}s: {e}", file=sys.stderr)
                return 1
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
