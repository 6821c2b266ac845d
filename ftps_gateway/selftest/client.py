"""A stdlib FTPS client that behaves like curl and lftp on data connections.

``ftplib.FTP_TLS`` opens every data connection with a brand-new TLS session. Servers
that bind a data connection to its control session (this one, vsftpd, ProFTPD,
FileZilla Server) refuse that. The fix is to offer the control connection's session
when wrapping the data socket. Partners using Python can copy this class.
"""

from __future__ import annotations

import ftplib
import socket
import ssl
from typing import Any


class ReusingFTP_TLS(ftplib.FTP_TLS):  # noqa: N801 - mirrors ftplib's naming
    """``FTP_TLS`` whose data connections resume the control connection's session."""

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, Any]:
        """Open the data connection, then TLS with ``session=`` the control session."""
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)  # noqa: S321 - FTP over TLS
        if self._prot_p:  # type: ignore[attr-defined]
            if not isinstance(self.sock, ssl.SSLSocket):
                raise TypeError("PROT P needs AUTH TLS first")
            conn = self.context.wrap_socket(
                conn, server_hostname=self.host, session=self.sock.session
            )
        return conn, size


_NOT_GIVEN = -999  # ftplib's own marker for "no timeout argument"


class ImplicitFTP_TLS(ReusingFTP_TLS):  # noqa: N801 - mirrors ftplib's naming
    """Implicit FTPS (TLS from the first byte, port 990 style), resuming sessions.

    The data channel is protected from the start, as implicit-FTPS servers assume.
    """

    def connect(
        self,
        host: str = "",
        port: int = 0,
        timeout: float = -999,
        source_address: tuple[str, int] | None = None,
    ) -> str:
        """Connect, start TLS at once, then read the greeting through it."""
        if host:
            self.host = host
        if port:
            self.port = port
        if timeout != _NOT_GIVEN:
            self.timeout = timeout
        if source_address is not None:
            self.source_address = source_address
        raw = socket.create_connection(
            (self.host, self.port), self.timeout, source_address=self.source_address
        )
        self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        self.af = self.sock.family
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        self._prot_p = True
        return self.welcome
