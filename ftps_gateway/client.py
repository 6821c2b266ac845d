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


class ReusingFTP_TLS(ftplib.FTP_TLS):  # noqa: N801 - mirrors ftplib's own naming
    """``FTP_TLS`` whose data connections resume the control connection's TLS session."""

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, Any]:
        """Open the data connection, then TLS with ``session=`` the control session."""
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]
            assert isinstance(self.sock, ssl.SSLSocket)
            conn = self.context.wrap_socket(
                conn, server_hostname=self.host, session=self.sock.session
            )
        return conn, size
