"""Control connections below a logged-in client: plain, AUTH TLS only, raw TCP.

For tests of what the server answers before login, to garbage, or to a peer that
never speaks TLS; and ``exactly``, the ``pytest.raises(match=...)`` pattern for a
reply named in ``ftps_gateway.ftp.replies``. Imports only the type of
``support.gateway.RunningGateway``.
"""

from __future__ import annotations

import ftplib
import re
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.gateway import RunningGateway


def plain_control(gw: RunningGateway) -> ftplib.FTP:
    """A control connection that has not sent AUTH TLS."""
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(gw.host, gw.port)
    return ftp


def tls_only(gw: RunningGateway) -> ftplib.FTP_TLS:
    """A control connection after AUTH TLS, not logged in."""
    ftp = gw.client(login=False)
    ftp.auth()
    return ftp


def read_until_quiet(sock: socket.socket, seconds: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or resets) or stays silent."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def raw_connect(
    address: tuple[str, int], source_ip: str = "127.0.0.1"
) -> socket.socket:
    """A plain TCP connection from ``source_ip``."""
    return socket.create_connection(address, timeout=5, source_address=(source_ip, 0))


def exactly(*replies: str) -> str:
    """A ``match=`` pattern for ftplib's error text: one of ``replies``, whole.

    ftplib's ``error_perm``/``error_temp`` text is the reply line itself, so the
    pattern is anchored at both ends and the texts are escaped (a ``.`` is a dot).
    """
    return "^(?:" + "|".join(re.escape(reply) for reply in replies) + ")$"
