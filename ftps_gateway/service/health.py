"""The HTTP side of monitoring: ``/metrics``, ``/healthz`` and ``/readyz``.

A stdlib ``ThreadingHTTPServer`` on its own daemon thread, so a slow scraper never
stalls the FTP IO loop and no web framework is needed for three read-only paths.
No pyftpdlib import; what "ready" means is the server's business (a callable).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from ftps_gateway.errors import StartupError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


class MetricsSource(Protocol):
    """What ``/metrics`` serves: one gateway's metrics, or its workers' sum."""

    def render(self, accept: str = "") -> tuple[bytes, str]: ...


logger = logging.getLogger("ftps_gateway")

TEXT: Final = "text/plain; charset=utf-8"
# A scraper or probe that sends nothing for this long is dropped: each connection
# holds a thread, and the endpoint must not be a place to park them (slowloris).
REQUEST_TIMEOUT_SECONDS: Final = 10.0
# serve_forever notices stop() only between polls: this bounds how long stop() (and a
# drain, or each test) waits, at the cost of ten idle wake-ups a second.
STOP_POLL_SECONDS: Final = 0.1


class ReadinessState:
    """A ready-made readiness callable: draining plus named checks.

    ``/readyz`` must fail the moment SIGTERM arrives, before the listeners close, so a
    load balancer stops sending new sessions while running transfers finish.
    """

    def __init__(self) -> None:
        self._draining = threading.Event()
        self._checks: list[Callable[[], str | None]] = []
        self._notes: list[Callable[[], str | None]] = []

    def add_check(self, check: Callable[[], str | None]) -> None:
        """Add ``check() -> problem or None`` (listener bound, certificate valid)."""
        self._checks.append(check)

    def add_note(self, note: Callable[[], str | None]) -> None:
        """Add ``note() -> detail or None``: said on a ready answer, without failing
        it (a cluster node serving on its own state while Redis is away: taking it
        out of the balancer would take every node out at once)."""
        self._notes.append(note)

    def notes(self) -> list[str]:
        """What a ready answer says besides "ready"."""
        return [text for note in self._notes if (text := note())]

    def start_draining(self) -> None:
        """Report "draining" from now on; safe from a signal handler's thread."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        """Whether ``start_draining`` was called."""
        return self._draining.is_set()

    def __call__(self) -> list[str]:
        """Every current problem, draining first."""
        problems = ["draining"] if self.draining else []
        for check in self._checks:
            problem = check()
            if problem:
                problems.append(problem)
        return problems


class HealthServer:
    """Serves the monitoring paths of one gateway on one address.

    Plain HTTP without authentication: config refuses a public address unless
    ``metrics.allow_public`` is set.
    """

    def __init__(
        self,
        metrics: MetricsSource,
        host: str = "127.0.0.1",
        port: int = 0,
        readiness: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """Prepare; nothing is bound until ``start``.

        Args:
            metrics: whose registry ``/metrics`` exposes.
            host: literal IP address to listen on.
            port: TCP port; 0 lets the OS pick one (see ``address``).
            readiness: returns the problems that make ``/readyz`` answer 503;
                nothing means ready. Runs on an HTTP thread, so keep it cheap.
        """
        self.metrics = metrics
        self.readiness = readiness or tuple
        self._host = host
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the configured pair before ``start``."""
        if self._httpd is None:
            return self._host, self._port
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve on a daemon thread.

        Raises:
            StartupError: the address cannot be bound (in use, not local).
        """
        if self._httpd is not None:
            return
        server_class = _HTTPServer6 if ":" in self._host else _HTTPServer
        try:
            httpd = server_class((self._host, self._port), _Handler)
        except OSError as err:
            raise StartupError(
                f"metrics.listen: cannot listen on {self._host}:{self._port}: "
                f"{err.strerror or err}"
            ) from err
        httpd.health = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": STOP_POLL_SECONDS},
            name="health-http",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        logger.info("serving /metrics, /healthz and /readyz on %s:%s", host, port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; safe twice, or before ``start``."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout)
        self._httpd = self._thread = None

    def respond(self, path: str, accept: str) -> tuple[HTTPStatus, str, bytes]:
        """Status, content type and body for a GET of ``path``."""
        if path == "/metrics":
            body, content_type = self.metrics.render(accept)
            return HTTPStatus.OK, content_type, body
        if path == "/healthz":
            return HTTPStatus.OK, TEXT, b"ok\n"
        if path == "/readyz":
            return self._readyz()
        return HTTPStatus.NOT_FOUND, TEXT, b"not found\n"

    def _readyz(self) -> tuple[HTTPStatus, str, bytes]:
        try:
            problems = [str(problem) for problem in self.readiness()]
        except Exception:
            # Not ready is the safe answer: a load balancer then sends sessions to a
            # node that can say it works.
            logger.exception("readiness check failed")
            problems = ["readiness check failed"]
        if not problems:
            notes = getattr(self.readiness, "notes", list)  # ReadinessState has them
            said = "".join(f"note: {' '.join(str(n).split())}\n" for n in notes())
            return HTTPStatus.OK, TEXT, b"ready\n" + said.encode()
        # One problem per line; a line break inside one would forge another.
        lines = (" ".join(problem.split()) for problem in problems)
        body = "".join(f"{line}\n" for line in lines).encode()
        return HTTPStatus.SERVICE_UNAVAILABLE, TEXT, body


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung scrape must not keep the process alive
    health: HealthServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind adds a reverse DNS lookup of the address (getfqdn)
        # for a name nothing here uses; on a host without DNS that stalls start-up.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD of the monitoring paths; anything else is refused."""

    server: _HTTPServer
    timeout = REQUEST_TIMEOUT_SECONDS
    # The Server header says what answers, never which version (like the FTP banner).
    server_version = "ftps-gateway"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive for scrapers that reuse connections

    def version_string(self) -> str:
        """The Server header: the product only (stdlib appends its Python version)."""
        return self.server_version

    def do_GET(self) -> None:
        """Answer with headers and body."""
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        """Answer with the headers a GET would get (Content-Length included)."""
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        status, content_type, body = self.server.health.respond(
            path, self.headers.get("Accept", "")
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _not_allowed(self) -> None:
        body = b"method not allowed\n"
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", TEXT)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # http.server dispatches to do_<METHOD>; unknown methods get its 501.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Requests go to debug: a scrape every 15 s is not news."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("health http %s: %s", self.address_string(), format % args)
