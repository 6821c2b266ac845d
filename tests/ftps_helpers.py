"""Small client-side helpers shared by the integration tests."""

from __future__ import annotations

import ftplib
import socket
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import RunningGateway


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


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``http://127.0.0.1:PORT/metrics``, keyed by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
