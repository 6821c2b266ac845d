"""A real HTTP(S) hook receiver on loopback, in a thread, for the hook tests.

It checks the ``X-FTPS-Gateway-Signature`` header the way the README's receiver does
(HMAC-SHA256 of the body with its own secret, compared in constant time), records
every request, and can be told to answer errors or to be slow. Imports nothing from
the tests or the package.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    """One request the receiver got."""

    path: str
    body: bytes
    headers: dict[str, str]
    signature_ok: bool
    status: int
    at: float

    @property
    def event(self) -> dict[str, Any]:
        """The JSON body."""
        return dict(json.loads(self.body))


@dataclass
class HookReceiver:
    """Serves POST / on 127.0.0.1; ``status`` and ``delay_seconds`` may change live."""

    secret: bytes
    status: int = 204
    delay_seconds: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = (
                    "sha256="
                    + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                )
                given = self.headers.get("X-FTPS-Gateway-Signature", "")
                ok = hmac.compare_digest(expected, given)
                if receiver.delay_seconds:
                    time.sleep(receiver.delay_seconds)
                status = receiver.status if ok else 401
                receiver.deliveries.append(
                    Delivery(
                        self.path, body, dict(self.headers), ok, status, time.time()
                    )
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.context is not None:
            self.server.socket = self.context.wrap_socket(
                self.server.socket, server_side=True
            )
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="hook-receiver", daemon=True
        )
        self._thread.start()

    def url(self, scheme: str = "http") -> str:
        """Where to POST."""
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[dict[str, Any]]:
        """The events answered 2xx, in arrival order."""
        return [d.event for d in list(self.deliveries) if 200 <= d.status < 300]

    def wait_for(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until ``count`` events were accepted; return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.accepted()) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count}: {found}"
            time.sleep(0.05)
        return found

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
