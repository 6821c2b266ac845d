"""PROXY protocol v1/v2 from a configured balancer: the partner's address counts.

127.0.0.1 plays the load balancer; the header names a partner at 198.51.100.7. The
balancer-side behaviour (HAProxy itself) is tested in tests/network.
"""

from __future__ import annotations

import ftplib
import io
import socket
import ssl
import time
from collections.abc import Callable

import pytest

from ftps_gateway.policy import proxyproto
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.control import raw_connect, read_until_quiet
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Records = Callable[[], list[dict[str, object]]]
BALANCER = 'proxy_protocol_from = ["127.0.0.1/32"]\nlogin_timeout_seconds = 10'


class ProxiedFTP_TLS(ReusingFTP_TLS):  # noqa: N801 - mirrors ftplib
    """A client whose control connection starts with a PROXY header, as HAProxy's."""

    header = b""

    def connect(self, host: str = "", port: int = 0, timeout: float = -999,
                source_address: tuple[str, int] | None = None) -> str:  # fmt: skip
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        self.sock = socket.create_connection((host, port), self.timeout)
        self.sock.sendall(self.header)
        self.af = self.sock.family
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome


def _proxied(gw: RunningGateway, header: bytes) -> ProxiedFTP_TLS:
    ftp = ProxiedFTP_TLS(
        context=ssl.create_default_context(cafile=str(gw.ca_file)), timeout=10
    )
    ftp.header = header
    ftp.connect(gw.host, gw.port)
    return ftp


def _diag(ftp: ftplib.FTP) -> dict[str, str]:
    reply = ftp.sendcmd("SITE DIAG")
    return dict(line.strip().split(": ", 1) for line in reply.splitlines()[1:-1])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_names_the_partner_everywhere(
    start_gateway: StartGateway, audit_records: Records, version: str
) -> None:
    gw = start_gateway(
        server_extra=BALANCER, sections='[access]\nallow = ["198.51.100.0/24"]'
    )
    make = proxyproto.v1_header if version == "v1" else proxyproto.v2_header
    ftp = _proxied(gw, make("198.51.100.7", 40123, gw.host, gw.port))
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    assert _diag(ftp)["client-ip"] == "198.51.100.7"
    # Data connections come from the balancer (it forwards the passive range without
    # a header); the TLS session binding still ties them to this session.
    ftp.storbinary("STOR via-proxy.bin", io.BytesIO(b"p" * 1000))
    assert ftp.nlst() == ["via-proxy.bin"]
    ftp.quit()
    connect = next(r for r in audit_records() if r["event"] == "connect")
    assert (connect["client_ip"], connect["proxy"]) == ("198.51.100.7", "127.0.0.1")


def test_partner_outside_the_allowlist_is_dropped_after_the_header(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    gw = start_gateway(
        server_extra=BALANCER, sections='[access]\nallow = ["198.51.100.0/24"]'
    )
    sock = raw_connect((gw.host, gw.port))
    sock.sendall(proxyproto.v1_header("203.0.113.66", 1, gw.host, gw.port))
    assert read_until_quiet(sock, 3.0) == b""
    sock.close()
    refused = [r for r in audit_records() if r["event"] == "connection_refused"]
    assert [(r["client_ip"], r["reason"]) for r in refused] == [
        ("203.0.113.66", "not-allowed")
    ]


@pytest.mark.parametrize(
    "data",
    [b"USER acme\r\n", b"PROXY TCP4 garbage\r\n", b""],
    ids=["no-header", "bad-header", "silence"],
)
def test_balancer_connection_without_a_valid_header_is_closed(
    start_gateway: StartGateway, audit_records: Records, data: bytes
) -> None:
    gw = start_gateway(server_extra=BALANCER)
    sock = raw_connect((gw.host, gw.port))
    if data:
        sock.sendall(data)
    assert read_until_quiet(sock, 7.0) == b""
    sock.close()
    refused = [r for r in audit_records() if r["event"] == "connection_refused"]
    assert [r["reason"] for r in refused] == ["proxy-header"]


def test_header_from_anyone_else_is_not_believed(start_gateway: StartGateway) -> None:
    """Only configured balancers may speak the PROXY protocol."""
    gw = start_gateway(server_extra='proxy_protocol_from = ["127.0.0.2/32"]')
    sock = raw_connect((gw.host, gw.port))
    greeting = read_until_quiet(sock, 1.0)
    assert greeting.startswith(b"220 ")
    sock.sendall(proxyproto.v1_header("198.51.100.7", 1, gw.host, gw.port))
    assert read_until_quiet(sock, 1.0).startswith(b"500 ")
    sock.close()


def test_implicit_tls_behind_the_balancer(start_gateway: StartGateway) -> None:
    """The ClientHello right behind the header is left for TLS."""
    gw = start_gateway(server_extra=BALANCER + '\nimplicit_listen = ["127.0.0.1:0"]')
    (port,) = [port for _host, port in gw.server.implicit_addresses]
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    raw = socket.create_connection((gw.host, port), timeout=10)
    raw.sendall(proxyproto.v2_header("198.51.100.7", 5, gw.host, port))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    assert tls.recv(100).startswith(b"220 ")
    tls.close()


def _partner_after_stranger(
    gw: RunningGateway, header: bytes, stranger: Callable[[int], bytes]
) -> None:
    """The partner queues a RETR; ``stranger(port)`` reaches the port first and must
    get nothing; then the partner's own (resuming) connection gets the whole file."""
    payload = b"payroll " * 10_000
    (gw.home() / "secret.bin").write_bytes(payload)
    ftp = _proxied(gw, header)
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    ftp.voidcmd("TYPE I")
    port = int(ftp.sendcmd("EPSV").split("|")[-2])
    ftp.putcmd("RETR secret.bin")
    assert ftp.getresp().startswith("150")
    assert stranger(port) in (
        b"",
        b"\x15\x03\x01\x00\x02\x02\x50",
    )  # nothing, or an alert
    partner = ftp.context.wrap_socket(
        socket.create_connection((gw.host, port), timeout=5),
        server_hostname="localhost",
        session=ftp.sock.session,
    )
    assert read_until_quiet(partner, 5.0) == payload
    partner.close()
    ftp.voidresp()
    ftp.quit()


def test_a_stranger_behind_the_balancer_does_not_cost_the_partner_its_transfer(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """Data connections all come from the balancer's address, so the address check
    cannot tell partners apart there. A stranger who reaches the passive port first
    completes TLS and gets 0 bytes; the port listens on, and the partner's own
    (resuming) connection still gets its file."""
    gw = start_gateway(server_extra=BALANCER)

    def stranger(port: int) -> bytes:
        conn = ssl.create_default_context(cafile=str(gw.ca_file)).wrap_socket(
            socket.create_connection((gw.host, port), timeout=5),
            server_hostname="localhost",
        )
        with conn:
            received = read_until_quiet(conn, 2.0)
        assert received == b""  # TLS completed, and not one byte of payload
        return received

    header = proxyproto.v2_header("198.51.100.7", 40123, gw.host, gw.port)
    _partner_after_stranger(gw, header, stranger)
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert [(r["reason"], r["still_listening"]) for r in refused] == [
        ("not-resumed", True)
    ]


def test_a_stranger_sending_junk_behind_the_balancer_does_not_cost_the_transfer(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """Not even a failed handshake (junk instead of a ClientHello) closes the port."""
    gw = start_gateway(server_extra=BALANCER)

    def stranger(port: int) -> bytes:
        with socket.create_connection((gw.host, port), timeout=5) as junk:
            junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return read_until_quiet(junk, 2.0)

    header = proxyproto.v1_header("198.51.100.7", 40123, gw.host, gw.port)
    _partner_after_stranger(gw, header, stranger)
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert [r["still_listening"] for r in refused] == [True]


def test_a_silent_stranger_behind_the_balancer_does_not_hold_the_port(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """A stranger reaches the passive port first through the balancer and says
    nothing, connection kept open: the partner's own connection is still accepted
    and gets its file (the port listened on, it did not wait for the stranger)."""
    gw = start_gateway(server_extra=BALANCER)
    held: list[socket.socket] = []

    def stranger(port: int) -> bytes:
        held.append(socket.create_connection((gw.host, port), timeout=5))
        return b""

    header = proxyproto.v2_header("198.51.100.7", 40123, gw.host, gw.port)
    try:
        _partner_after_stranger(gw, header, stranger)
    finally:
        for sock in held:
            sock.close()
    assert [r for r in audit_records() if r["event"] == "data_refused"] == []


def test_proxied_sessions_leave_no_address_behind(start_gateway: StartGateway) -> None:
    """pyftpdlib's per-address table stays in step when the header names the client."""
    gw = start_gateway(server_extra=BALANCER)
    for index in range(5):
        header = proxyproto.v2_header(f"198.51.100.{index + 1}", 1, gw.host, gw.port)
        ftp = _proxied(gw, header)
        ftp.login("acme", PASSWORD)
        ftp.quit()
    deadline = time.monotonic() + 5
    while gw.server.listeners[0].ip_map and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.server.listeners[0].ip_map == []
