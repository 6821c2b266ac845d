"""Records that arrive in the same flight as a client's handshake Finished.

The gateway reads ciphertext in large pieces into memory (``ftp.tlschannel``, decision
0015), so bytes a client sends right behind its Finished are read together with it and
the socket never reports them again. These clients drive their TLS over memory BIOs
to put the Finished and what follows into one TCP send, which is what a fast client
(or a slow server) produces by chance.
"""

from __future__ import annotations

import ftplib
import socket
import ssl

import pytest

from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


class _MemoryClient:
    """A TLS client over memory BIOs on a connected socket: we choose what is sent
    together."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        host: str,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=host, session=session
        )

    def handshake_holding_the_last_flight(self) -> None:
        """Handshake, but keep our last flight (the Finished) unsent."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self._receive()
            else:
                return

    def send_held_with(self, *records: bytes, close_notify: bool = False) -> None:
        """The held flight, then ``records`` (and close_notify), in one send."""
        for record in records:
            self.tls.write(record)
        if close_notify:
            with pytest.raises(ssl.SSLWantReadError):
                self.tls.unwrap()  # ours is written; the server's is awaited
        self.sock.sendall(self.outgoing.read())

    def read_line(self) -> bytes:
        """One reply line from the server."""
        data = b""
        while not data.endswith(b"\r\n"):
            try:
                data += self.tls.read(4096)
            except ssl.SSLWantReadError:
                self._receive()
        return data

    def await_close_notify(self) -> None:
        """Wait, without sending a FIN, for the server's close_notify."""
        while True:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                self._receive()
            else:
                return

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(chunk)


def _context(gateway: RunningGateway, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(gateway.ca_file))
    context.minimum_version = context.maximum_version = version
    return context


def test_a_command_sent_with_the_handshakes_finished_is_answered(
    gateway: RunningGateway,
) -> None:
    """A command in the same TCP segment as the client's Finished gets its reply
    (it was read with the Finished; the socket has nothing more to report). TLS 1.3:
    in a full TLS 1.2 handshake the server's Finished comes last."""
    version = ssl.TLSVersion.TLSv1_3
    sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
    with sock:
        assert sock.recv(1024).startswith(b"220")
        sock.sendall(b"AUTH TLS\r\n")
        assert sock.recv(1024).startswith(b"234")
        client = _MemoryClient(sock, _context(gateway, version), gateway.host)
        client.handshake_holding_the_last_flight()
        client.send_held_with(b"NOOP\r\n")
        assert client.read_line().startswith(b"200")


@pytest.mark.parametrize("version", VERSIONS)
def test_an_upload_sent_whole_with_the_handshakes_finished_is_stored(
    gateway: RunningGateway, version: ssl.TLSVersion
) -> None:
    """A small upload whose data and close_notify travel with the data connection's
    Finished, its client then waiting for the server's close_notify without a FIN
    (as ftplib's ``unwrap`` does), is stored and answered 226."""
    context = _context(gateway, version)
    ftp = ReusingFTP_TLS(context=context, timeout=10)
    ftp.connect(gateway.host, gateway.port)
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    control = ftp.sock
    assert isinstance(control, ssl.SSLSocket)
    ftp.voidcmd("TYPE I")
    payload = b"readahead" * 1000
    raw, _ = ftplib.FTP.ntransfercmd(ftp, "STOR ahead.bin")  # TLS below
    with raw:
        raw.settimeout(10)
        client = _MemoryClient(raw, context, gateway.host, session=control.session)
        client.handshake_holding_the_last_flight()
        client.send_held_with(payload, close_notify=True)
        client.await_close_notify()
    assert ftp.voidresp().startswith("226")
    assert (gateway.home() / "ahead.bin").read_bytes() == payload
    ftp.quit()
