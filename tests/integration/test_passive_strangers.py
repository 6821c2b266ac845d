"""Strangers on a session's passive port never stop the partner's transfer.

Under ``reuse = "required-any-ip"`` (or behind a PROXY balancer) a data connection
from another address may be the partner's (a NAT pool), so the address check lets it
through and only the TLS resumption check can refuse it. A stranger that connects
first and says nothing, sends junk, or completes TLS without resuming must not hold
the port closed or fail the transfer: the listener keeps accepting until a
connection passes the binding check.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import socket
import ssl
from collections.abc import Callable

import pytest

from support.control import raw_connect, read_until_quiet
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Records = Callable[[], list[dict[str, object]]]
SECRET = b"partner payroll " * 4096
ANY_IP = 'reuse = "required-any-ip"'


def _epsv_port(ftp: ftplib.FTP) -> int:
    return int(ftp.sendcmd("EPSV").split("|")[-2])


def _silent(gw: RunningGateway, port: int, source_ip: str) -> socket.socket:
    """Connects to the port and says nothing (kept open by the caller)."""
    return raw_connect((gw.host, port), source_ip)


def _junk(gw: RunningGateway, port: int, source_ip: str) -> socket.socket:
    """Connects and sends something that is not a ClientHello; returns once the
    server has refused it (closed, perhaps after an alert)."""
    sock = raw_connect((gw.host, port), source_ip)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    read_until_quiet(sock, 10.0)
    return sock


def _fresh_tls(gw: RunningGateway, port: int, source_ip: str) -> socket.socket:
    """Completes a TLS handshake with a session of its own (never a resumption)."""
    raw = raw_connect((gw.host, port), source_ip)
    context = ssl.create_default_context(cafile=str(gw.ca_file))
    conn = context.wrap_socket(raw, server_hostname="localhost")
    conn.settimeout(5)
    with contextlib.suppress(OSError):
        assert conn.recv(100) == b""  # refused after the handshake: nothing comes
    return conn


def _partner_retr(ftp: ftplib.FTP_TLS) -> bytes:
    """The partner's own (resuming) client downloads over the port already open."""
    out = io.BytesIO()
    ftp.retrbinary("RETR secret.bin", out.write)
    return out.getvalue()


def test_a_silent_stranger_does_not_hold_the_port(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """A stranger connects first and says nothing; the partner still connects and
    gets its file over the same port, long before the stranger's timeout."""
    gw = start_gateway(tls_extra=ANY_IP, extra="connect_timeout_seconds = 20")
    (gw.home() / "secret.bin").write_bytes(SECRET)
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    port = _epsv_port(ftp)
    stranger = _silent(gw, port, "127.0.0.2")
    received = _retr_on_port(gw, ftp, port)
    assert received == SECRET
    assert ftp.voidresp().startswith("226")
    stranger.close()
    ftp.quit()
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert refused == []  # the stranger was closed with the winner: nothing failed


def _retr_on_port(gw: RunningGateway, ftp: ftplib.FTP_TLS, port: int) -> bytes:
    """RETR through ``port`` (from the EPSV already sent), resuming the session."""
    raw = socket.create_connection((gw.host, port), timeout=10)
    ftp.putcmd("RETR secret.bin")
    assert ftp.getresp().startswith("150")
    conn = ftp.context.wrap_socket(
        raw, server_hostname="localhost", session=ftp.sock.session
    )
    received = bytearray()
    while chunk := conn.recv(65536):
        received += chunk
    conn.close()
    return bytes(received)


def test_three_racing_strangers_never_stop_the_partners_transfer(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """Silent, junk and non-resuming TLS strangers, all before the partner: each
    is refused on its own, the partner's transfer goes through on the same port."""
    gw = start_gateway(tls_extra=ANY_IP, extra="connect_timeout_seconds = 20")
    (gw.home() / "secret.bin").write_bytes(SECRET)
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    for _ in range(2):  # and again on the next transfer
        port = _epsv_port(ftp)
        strangers = [
            _silent(gw, port, "127.0.0.2"),
            _junk(gw, port, "127.0.0.3"),
            _fresh_tls(gw, port, "127.0.0.4"),
        ]
        assert _retr_on_port(gw, ftp, port) == SECRET
        assert ftp.voidresp().startswith("226")
        for sock in strangers:
            sock.close()
    ftp.quit()
    refused = {
        (r["peer_ip"], r["reason"])
        for r in audit_records()
        if r["event"] == "data_refused"
    }
    assert ("127.0.0.4", "not-resumed") in refused
    assert any(peer == "127.0.0.3" for peer, _ in refused)


def test_pending_connections_are_bounded(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """Ten silent strangers: the oldest give way (at most a few wait at once), and
    the partner, arriving last, still gets its file."""
    gw = start_gateway(tls_extra=ANY_IP, extra="connect_timeout_seconds = 20")
    (gw.home() / "secret.bin").write_bytes(SECRET)
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    port = _epsv_port(ftp)
    strangers = [_silent(gw, port, f"127.0.0.{n}") for n in range(2, 12)]
    assert _retr_on_port(gw, ftp, port) == SECRET
    assert ftp.voidresp().startswith("226")
    for sock in strangers:
        sock.close()
    ftp.quit()
    evicted = [
        r["peer_ip"]
        for r in audit_records()
        if r["event"] == "data_refused" and r["reason"] == "pending-evicted"
    ]
    # 10 strangers and the partner, 4 may wait: the 7 oldest strangers gave way.
    assert evicted == [f"127.0.0.{n}" for n in range(2, 9)]
