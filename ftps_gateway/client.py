"""A stdlib FTPS client that behaves like curl and lftp on data connections.

``ftplib.FTP_TLS`` opens every data connection with a brand-new TLS session. Servers
that bind a data connection to its control session (this one, vsftpd, ProFTPD,
FileZilla Server) refuse that. The fix is to offer the control connection's session
when wrapping the data socket. Partners using Python can copy this class.
"""

from __future__ import annotations

import ftplib
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket


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
