"""The TLS data path under pressure: forced partial writes and tiny socket buffers.

``SSLSocket.send`` writes a whole buffer or raises want-write; asynchat then retries
with the same bytes. A small ``SO_SNDBUF`` and a slow reader force that retry path
thousands of times; the file must still arrive byte for byte. The same for uploads
read many records at a time into the channel's reused buffer.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.data import DataHandler
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.session.events import SessionEvents
from support.control import exactly
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

SIZE = 8 * 1024 * 1024


RETRIES = {"sends": 0, "retried": 0}


def _squeeze_data_sockets(gw: RunningGateway, option: int) -> None:
    """Every data connection of ``gw`` gets a small kernel buffer for ``option``.

    16 KiB (the kernel doubles it): far below the 256 KiB the server hands to one
    ``SSL_write``, so nearly every write is partial and retried.
    """
    listener = gw.server.listeners[0]
    base: Any = listener.handler.dtp_handler

    class Squeezed(base):  # type: ignore[misc, valid-type]
        def __init__(self, sock: socket.socket, cmd_channel: Any) -> None:
            sock.setsockopt(socket.SOL_SOCKET, option, 16384)
            super().__init__(sock, cmd_channel)

        def tls_send(self, data: bytes) -> int:
            sent = int(super().tls_send(data))
            RETRIES["sends"] += 1
            RETRIES["retried"] += sent == 0
            return sent

    assert issubclass(Squeezed, DataHandler)
    listener.handler.dtp_handler = Squeezed


def test_download_through_forced_partial_writes_is_intact(
    gateway: RunningGateway,
) -> None:
    payload = os.urandom(SIZE)
    (gateway.home() / "big.bin").write_bytes(payload)
    _squeeze_data_sockets(gateway, socket.SO_SNDBUF)
    ftp = gateway.client()
    ftp.voidcmd("TYPE I")
    port = int(ftp.sendcmd("EPSV").split("|")[-2])
    raw = socket.socket()
    # A small receive window (set before connecting, so it is what TCP offers):
    # the server's 64 KiB writes cannot all fit, again and again.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    raw.connect((gateway.host, port))
    ftp.putcmd("RETR big.bin")
    assert ftp.getresp().startswith("150")
    conn = ftp.context.wrap_socket(raw, server_hostname="localhost",
                                   session=ftp.sock.session)  # fmt: skip
    received = bytearray()
    while chunk := conn.recv(16384):
        received += chunk
        time.sleep(0.0005)  # a slow reader: the server's writes keep backing up
    conn.unwrap()
    conn.close()
    ftp.voidresp()
    ftp.quit()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert RETRIES["retried"] >= 5, RETRIES  # the retry path really ran


def test_upload_through_tiny_receive_buffers_is_intact(gateway: RunningGateway) -> None:
    payload = os.urandom(SIZE)
    _squeeze_data_sockets(gateway, socket.SO_RCVBUF)
    ftp = gateway.client()
    ftp.storbinary("STOR up.bin", io.BytesIO(payload), blocksize=100_000)
    ftp.quit()
    stored = (gateway.home() / "up.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_an_upload_cut_short_does_not_spoil_the_sessions_next_transfer(
    gateway: RunningGateway, version: ssl.TLSVersion
) -> None:
    """After an upload ends with a TCP FIN but no close_notify (426, nothing kept),
    the next data connection still resumes the control session, also for a TLS 1.2
    client without session tickets (curl), which resumes by session id."""
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    context.maximum_version = version
    context.options |= ssl.OP_NO_TICKET  # as curl does
    ftp = ReusingFTP_TLS(context=context, timeout=10)
    ftp.connect(gateway.host, gateway.port)
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    ftp.voidcmd("TYPE I")
    data, _ = ftp.ntransfercmd("STOR cut.bin")
    data.sendall(b"x" * 100_000)
    data.shutdown(socket.SHUT_RDWR)  # FIN under TLS, no close_notify
    data.close()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.UPLOAD_CUT)):
        ftp.voidresp()
    ftp.storbinary("STOR whole.bin", io.BytesIO(b"y" * 1000))
    assert (gateway.home() / "whole.bin").read_bytes() == b"y" * 1000
    assert not (gateway.home() / "cut.bin").exists()
    ftp.quit()


def test_a_transfers_audit_line_exists_before_its_226(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client reads a transfer's 226 only after its audit line (and hook event)
    were written, however long writing them takes: a job watching the audit log
    never lags the partner."""
    write = SessionEvents.transfer_finished

    def slow_write(self: SessionEvents, **fields: Any) -> None:
        time.sleep(0.3)
        write(self, **fields)

    monkeypatch.setattr(SessionEvents, "transfer_finished", slow_write)
    ftp = gateway.client()
    ftp.storbinary("STOR ordered.bin", io.BytesIO(b"x" * 1000))
    assert [r["path"] for r in audit_records() if r["event"] == "upload_completed"] == [
        "/ordered.bin"
    ]
    ftp.retrbinary("RETR ordered.bin", lambda _chunk: None)
    assert [
        r["path"] for r in audit_records() if r["event"] == "download_completed"
    ] == ["/ordered.bin"]
    ftp.quit()
