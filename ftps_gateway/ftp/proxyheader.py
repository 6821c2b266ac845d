"""The PROXY protocol header a load balancer sends before a control connection.

A mixin for ``control.ControlHandler``: when the peer is a configured balancer
(``server.proxy_protocol_from``), exactly the header's bytes are read first (a
ClientHello may follow in the same segment), the partner's address it names replaces
the balancer's, and only then is the connection admitted. The header format is
``policy.proxyproto``'s; a balancer that sends no valid header in time is refused.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any

from ftps_gateway.policy import proxyproto

if TYPE_CHECKING:
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import Gateway

# A balancer sends its PROXY header at once; anything slower is not one.
PROXY_HEADER_TIMEOUT_SECONDS = 5


class ProxyHeaderMixin:
    """Reads a balancer's PROXY header, then calls ``admit``."""

    proxy_ip: str | None = None  # the balancer, when a PROXY header named us
    _awaiting_proxy_header = False
    _proxy_received = b""
    _proxy_timer: Any = None

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        events: SessionEvents
        socket: Any
        server: Any
        remote_ip: str
        _closed: bool

        @property
        def gateway(self) -> Gateway: ...
        @property
        def client_ip(self) -> str: ...
        def admit(self) -> None: ...
        def close(self) -> None: ...
        def call_later(self, seconds: float, target: Any) -> Any: ...

    def handle(self) -> None:
        """Wait for a PROXY header if a load balancer connected, else admit."""
        proxies = self.gateway.proxy_sources
        if proxies is not None and proxies.is_allowed(self.client_ip):
            self.proxy_ip = self.client_ip
            self._awaiting_proxy_header = True
            self._proxy_timer = self.call_later(
                PROXY_HEADER_TIMEOUT_SECONDS, self._on_proxy_header_timeout
            )
            return  # handle_read_event reads the header, then admits
        self.admit()

    def handle_read_event(self) -> None:
        """While a PROXY header is due, read only its bytes; then the usual way."""
        if self._awaiting_proxy_header:
            self._read_proxy_header()
            return
        super().handle_read_event()  # type: ignore[misc]

    def _read_proxy_header(self) -> None:
        """Consume exactly the header's bytes (a ClientHello may follow at once)."""
        try:
            available = self.socket.recv(proxyproto.MAX_HEADER_BYTES, socket.MSG_PEEK)
            if not available:
                self.end_proxy_wait()
                self.close()
                return
            take = proxyproto.header_bytes_in(self._proxy_received, available)
            if take:
                self._proxy_received += self.socket.recv(take)
            length = proxyproto.header_length(self._proxy_received)
            if length is None:
                return
            header = proxyproto.parse(self._proxy_received[:length])
        except BlockingIOError:
            return
        except proxyproto.ProxyProtocolError as err:
            self._refuse_header(str(err))
            return
        except OSError:
            self._refuse_header("peer-disconnected")
            return
        self.end_proxy_wait()
        if header.client_ip is not None:
            # pyftpdlib counts connections per address in ip_map and removes
            # ``remote_ip`` on close: swap the entry, or the balancer's would pile up.
            with contextlib.suppress(ValueError):
                self.server.ip_map.remove(self.remote_ip)
            self.remote_ip = header.client_ip
            self.server.ip_map.append(self.remote_ip)
        self.admit()

    def _refuse_header(self, detail: str) -> None:
        self.end_proxy_wait()
        self.events.connection_refused("proxy-header", detail=detail)
        self.close()

    def _on_proxy_header_timeout(self) -> None:
        self._proxy_timer = None
        if self._awaiting_proxy_header and not self._closed:
            self._refuse_header("timeout")

    def end_proxy_wait(self) -> None:
        """Stop waiting for a header (read, refused, or the session closes)."""
        self._awaiting_proxy_header = False
        self._proxy_received = b""
        if self._proxy_timer is not None and not self._proxy_timer.cancelled:
            self._proxy_timer.cancel()
        self._proxy_timer = None
