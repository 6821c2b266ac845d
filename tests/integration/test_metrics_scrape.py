"""Counters scraped over HTTP after real sessions: each refusal has its reason."""

from __future__ import annotations

import ftplib
import io
import ssl
from collections.abc import Callable

import pytest

from ftps_gateway.ftp import replies
from support.control import exactly, raw_connect, read_until_quiet
from support.credentials import PASSWORD
from support.gateway import RunningGateway
from support.metrics import scrape

pytestmark = pytest.mark.integration


def _scrape(gw: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert gw.server.health is not None
    return scrape(gw.server.health.address[1])


def test_refusals_and_logins_are_counted_by_reason(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    gw = start_gateway(
        sections=(
            '[metrics]\nlisten = "127.0.0.1:0"\n'
            '[access]\nallow = ["127.0.0.1/32", "127.0.0.2/32"]'
        ),
        server_extra="login_timeout_seconds = 20\nmax_sessions_per_ip = 1",
    )
    for listener in gw.server.listeners:
        listener.handler.auth_failed_timeout = 0.1
    # Not allowed: dropped before the banner.
    sock = raw_connect((gw.host, gw.port), "127.0.0.3")
    read_until_quiet(sock, 2.0)
    sock.close()
    # A bad password, then a good session whose stock-ftplib data connection is
    # refused for not resuming, then a resuming transfer that works.
    bad = gw.client(login=False)
    with pytest.raises(ftplib.error_perm):
        bad.login("acme", "wrong")
    bad.close()
    ftp = ftplib.FTP_TLS(
        timeout=10, context=ssl.create_default_context(cafile=str(gw.ca_file))
    )
    ftp.connect(gw.host, gw.port)
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        ftp.nlst()
    good = gw.client(source_ip="127.0.0.2")
    good.storbinary("STOR a.bin", io.BytesIO(b"x" * 1000))
    # A second logged-in session from 127.0.0.1 is over the per-address limit
    # (logged-in sessions count, at login).
    second = gw.client(login=False)
    with pytest.raises(
        ftplib.error_temp, match=exactly(replies.LIMIT_REPLIES["limit-per-ip"])
    ):
        second.login("acme", PASSWORD)
    second.close()
    ftp.quit()
    good.quit()

    samples = _scrape(gw)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    prefix = "ftps_gateway_"
    assert value(f"{prefix}sessions_refused_total", reason="not-allowed") == 1
    assert value(f"{prefix}sessions_refused_total", reason="limit-per-ip") == 1
    assert value(f"{prefix}logins_total", result="bad-credentials") == 1
    assert value(f"{prefix}logins_total", result="ok") == 2
    assert value(f"{prefix}data_connections_refused_total", reason="not-resumed") == 1
    assert value(f"{prefix}data_connections_refused_total", reason="foreign-ip") == 0
    assert (
        value(f"{prefix}tls_handshakes_total", channel="data", version="TLSv1.3",
              resumed="true") == 1
    )  # fmt: skip
    assert value(f"{prefix}transfers_total", direction="upload", result="ok") == 1
    assert value(f"{prefix}transfer_bytes_total", direction="upload") == 1000
    assert value(f"{prefix}passive_ports_in_use") == 0
    assert value(f"{prefix}bans_active") == 0
    assert value(f"{prefix}tls_certificate_expiry_timestamp_seconds") > 0
