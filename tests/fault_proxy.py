"""An HTTP proxy on loopback in front of a real server, failing chosen requests on purpose.

Everything else is forwarded unchanged to the real server (here the MLflow tracking server), so a
test can make one registry endpoint answer an error while the rest of the server works: the kind of
transient failure a real outage or overload produces, at the exact call that matters.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from tests.services import LOOPBACK

__all__ = ["Fault", "FaultProxy"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


@dataclass
class Fault:
    """Answer ``status`` to requests whose path matches ``path`` (a regex), ``times`` times (None: always)."""

    path: str
    status: int = 503
    error_code: str = "TEMPORARILY_UNAVAILABLE"
    times: int | None = None
    hits: list[str] = field(default_factory=list)

    def takes(self, path: str) -> bool:
        if self.times is not None and len(self.hits) >= self.times:
            return False
        if re.search(self.path, path) is None:
            return False
        self.hits.append(path)
        return True


class FaultProxy:
    """``FaultProxy(target).start()``: forwards to ``target`` except where a :class:`Fault` applies."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.faults: list[Fault] = []
        self.forwarded: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def fail(self, path: str, **options: Any) -> Fault:
        """Add a fault (see :class:`Fault`) and return it, to read its hits later."""
        fault = Fault(path, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault_for(self, path: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.takes(path)), None)

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                fault = proxy._fault_for(self.path)
                if fault is not None:
                    payload = json.dumps({"error_code": fault.error_code, "message": "injected by the test"})
                    self._answer(fault.status, {"Content-Type": "application/json"}, payload.encode())
                    return
                proxy.forwarded.append(f"{self.command} {self.path}")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
                response = requests.request(
                    self.command, proxy.target + self.path, headers=headers, data=body, timeout=60
                )
                kept = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
                self._answer(response.status_code, kept, response.content)

            def _answer(self, status: int, headers: dict[str, str], content: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
