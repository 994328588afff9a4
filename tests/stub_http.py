"""A JSON HTTP server on a loopback port, for tests where it stands for a Ray dashboard: no cluster
is needed, and it records what it was asked, with which credentials."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Callable

# (method, path) -> (status code, JSON body)
Answer = Callable[[str, str], "tuple[int, Any]"]


class StubHttp:
    """Answers every request with ``answer(method, path)``; ``seen``: (method, path, Authorization
    header) of each request, in order."""

    def __init__(self, answer: Answer) -> None:
        self.seen: list[tuple[str, str, str]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                stub.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                code, body = answer(self.command, self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def paths(self) -> list[str]:
        return [path for _, path, _ in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
