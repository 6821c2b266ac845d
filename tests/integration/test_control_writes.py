"""Control replies produced while one read event is handled leave in one TLS record.

A TLS 1.2 client on memory BIOs over a real socket sees the server's records (in TLS
1.2 every record after the handshake is application data), so a test can count the
``SSL_write`` calls behind a set of replies (issue 17, docs/decisions/0011).
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.ftp import replies
from support.credentials import PASSWORD

if TYPE_CHECKING:
    from collections.abc import Iterator

    from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

APPLICATION_DATA = 23
RECORD_HEADER = 5


class RecordCountingClient:
    """An FTPS client that counts the TLS records the server sends it."""

    def __init__(self, gw: RunningGateway) -> None:
        self.sock = socket.create_connection((gw.host, gw.port), timeout=10)
        self._clear = b""
        assert self._clear_line().startswith("220")
        self.sock.sendall(b"AUTH TLS\r\n")
        assert self._clear_line() == replies.AUTH_OK
        context = ssl.create_default_context(cafile=str(gw.ca_file))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                self._in.write(self._receive())
        self.sock.sendall(self._out.read())
        self._raw = b""  # received, not yet split into records
        self._text = ""
        self.records = 0  # application-data records since the last reset

    def _clear_line(self) -> str:
        while b"\r\n" not in self._clear:
            self._clear += self._receive()
        line, _, self._clear = self._clear.partition(b"\r\n")
        return line.decode()

    def _receive(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        return data

    def send(self, lines: str) -> None:
        """Send ``lines`` in one TLS record (one write)."""
        self.tls.write(lines.encode())
        self.sock.sendall(self._out.read())

    def replies(self, count: int) -> list[str]:
        """The next ``count`` reply lines (multi-line replies count their lines)."""
        while self._text.count("\r\n") < count:
            self._raw += self._receive()
            while len(self._raw) >= RECORD_HEADER:
                length = int.from_bytes(self._raw[3:5], "big")
                if len(self._raw) < RECORD_HEADER + length:
                    break
                if self._raw[0] == APPLICATION_DATA:
                    self.records += 1
                self._in.write(self._raw[: RECORD_HEADER + length])
                self._raw = self._raw[RECORD_HEADER + length :]
            try:
                while chunk := self.tls.read(65536):
                    self._text += chunk.decode()
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        lines = self._text.split("\r\n")
        self._text = "\r\n".join(lines[count:])
        return lines[:count]

    def login(self) -> None:
        """USER and PASS, one at a time."""
        self.send("USER acme\r\n")
        assert self.replies(1)[0].startswith("331")
        self.send(f"PASS {PASSWORD}\r\n")
        assert self.replies(1)[0].startswith("230")
        self.records = 0


@pytest.fixture
def client(gateway: RunningGateway) -> Iterator[RecordCountingClient]:
    """A logged-in record-counting client, closed after the test."""
    counting = RecordCountingClient(gateway)
    try:
        counting.login()
        yield counting
    finally:
        counting.sock.close()


def test_pipelined_commands_get_their_replies_in_one_record(
    client: RecordCountingClient,
) -> None:
    """Three commands in one write: three replies, in order, in one TLS record."""
    client.send("PBSZ 0\r\nPROT P\r\nNOOP\r\n")
    answers = client.replies(3)
    assert answers[:2] == [replies.PBSZ_OK, replies.PROT_PRIVATE]
    assert answers[2].startswith("200")
    assert client.records == 1
    client.send("NOOP\r\n")  # a lone command is answered at once, alone
    assert client.replies(1)[0].startswith("200")
    assert client.records == 2  # the lone reply: a record of its own


def test_multi_line_reply_is_one_record(client: RecordCountingClient) -> None:
    """SITE DIAG (three pushes) reaches the client as one record."""
    client.send("SITE DIAG\r\n")
    lines = client.replies(14)
    assert lines[0] == replies.DIAG_HEAD
    assert lines[-1] == replies.DIAG_END
    assert client.records == 1


def test_pipelined_quit_still_answers_everything_before_closing(
    client: RecordCountingClient,
) -> None:
    """NOOP and QUIT together: both replies arrive, then the server closes."""
    client.send("NOOP\r\nQUIT\r\n")
    first, second = client.replies(2)
    assert first.startswith("200")
    assert second == f"221 {replies.QUIT_TEXT}"
    assert client.records == 1
    with pytest.raises((EOFError, ssl.SSLZeroReturnError)):
        client.replies(1)


def test_pyftpdlib_lines_are_still_written_when_its_logger_is_on(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Skipping the per-reply formatting must not lose a line pyftpdlib would log."""
    caplog.set_level(logging.INFO, logger="pyftpdlib")
    gateway.client().quit()
    lines = [r.getMessage() for r in caplog.records if r.name == "pyftpdlib"]
    assert any(line.endswith("USER 'acme' logged in.") for line in lines), lines
