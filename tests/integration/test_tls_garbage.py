"""TLS-level garbage on the control channel: refused cleanly, counted, no busy loop.

Each hostile client is followed by a normal login, so "refused cleanly" also means
"the server kept serving". Failures are counted in
``ftps_gateway_tls_failures_total{channel,reason}`` and audited as ``tls_failed``.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
import warnings
from typing import TYPE_CHECKING

import pytest
from OpenSSL import SSL

from support.control import raw_connect, read_until_quiet

if TYPE_CHECKING:
    from collections.abc import Callable

    from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

ALERT = 0x15  # TLS record type of an alert: the only thing the server may send back


def tls_failures(gw: RunningGateway) -> dict[str, float]:
    """The control channel's TLS failure counter, by reason."""
    body, _ = gw.server.gateway.metrics.render()
    pattern = re.compile(
        r'^ftps_gateway_tls_failures_total\{channel="control",reason="([^"]+)"\} (\S+)$',
        re.MULTILINE,
    )
    found = pattern.findall(body.decode())
    return {reason: float(value) for reason, value in found if float(value)}


def after_auth_tls(gw: RunningGateway) -> socket.socket:
    """A raw socket whose AUTH TLS was accepted (234): the next bytes must be TLS."""
    sock = raw_connect((gw.host, gw.port))
    sock.settimeout(5)
    assert sock.recv(1024).startswith(b"220")
    sock.sendall(b"AUTH TLS\r\n")
    assert sock.recv(1024).startswith(b"234")
    return sock


def client_hello() -> bytes:
    """The bytes of a real ClientHello (TLS 1.2 and 1.3 offered)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16  # a handshake record
    assert len(hello) > 100
    return hello


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def failed_events(records: Callable[[], list[dict[str, object]]]) -> list[str]:
    """Reasons of the control channel's ``tls_failed`` audit events so far."""
    return [
        str(r["reason"])
        for r in records()
        if r.get("event") == "tls_failed" and r.get("channel") == "control"
    ]


def still_serving(gw: RunningGateway) -> None:
    """A normal partner logs in and lists after the hostile one."""
    ftp = gw.client()
    assert ftp.voidcmd("NOOP").startswith("200")
    ftp.quit()


def test_plain_text_after_auth_tls_is_refused_and_counted(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """HTTP, a repeated command or random bytes where the ClientHello belongs."""
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"USER acme\r\n",
                    bytes(range(256)) * 4, b"\x16\x03\x01\xff\xff" + b"A" * 300):  # fmt: skip
        sock = after_auth_tls(gateway)
        sock.sendall(garbage)
        received = read_until_quiet(sock, 5)
        assert not received or received[0] == ALERT, received  # nothing in clear text
        sock.close()
    assert wait_for(lambda: len(failed_events(audit_records)) == 4)
    counted = tls_failures(gateway)
    assert sum(counted.values()) == 4, counted
    assert counted.get("not-tls", 0) >= 2, counted
    still_serving(gateway)


def test_truncated_client_hello_then_close_is_counted(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """Half a ClientHello and a FIN: the handshake fails at once, counted as peer-closed."""
    hello = client_hello()
    for cut in (1, 5, len(hello) // 2, len(hello) - 1):
        sock = after_auth_tls(gateway)
        sock.sendall(hello[:cut])
        sock.shutdown(socket.SHUT_WR)
        received = read_until_quiet(sock, 5)
        assert not received or received[0] == ALERT, received
        sock.close()
    assert wait_for(lambda: len(failed_events(audit_records)) == 4)
    assert tls_failures(gateway) == {"peer-closed": 4.0}
    still_serving(gateway)


def test_stalled_client_hello_is_closed_by_the_login_timer_without_spinning(
    start_gateway: Callable[..., RunningGateway],
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """Half a ClientHello, then silence: no CPU burnt, closed at login_timeout, counted."""
    gw = start_gateway(server_extra="login_timeout_seconds = 2")
    hello = client_hello()
    sock = after_auth_tls(gw)
    started = time.monotonic()
    cpu = time.process_time()
    sock.sendall(hello[: len(hello) // 2])
    received = read_until_quiet(sock, 10)
    waited = time.monotonic() - started
    used = time.process_time() - cpu
    sock.close()
    assert received == b""
    assert 1.5 < waited < 6, f"closed after {waited:.1f} s, login timeout is 2 s"
    assert used < 0.5, f"server spun for {used:.2f} CPU-s on a stalled handshake"
    assert wait_for(lambda: failed_events(audit_records) == ["timeout"])
    assert tls_failures(gw) == {"timeout": 1.0}
    still_serving(gw)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_clients_are_refused_and_counted(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
    version: ssl.TLSVersion,
) -> None:
    """A client that offers only an old version gets a protocol_version alert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 will not offer them else
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = version
        context.maximum_version = version
    sock = after_auth_tls(gateway)
    with pytest.raises(ssl.SSLError), context.wrap_socket(sock) as tls:
        tls.do_handshake()
    assert wait_for(lambda: len(failed_events(audit_records)) == 1)
    assert tls_failures(gateway) == {"protocol-version": 1.0}
    still_serving(gateway)


def test_renegotiation_is_refused_and_the_session_survives_or_closes_cleanly(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """A TLS 1.2 client asks to renegotiate: no second handshake, no crash."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    sock = after_auth_tls(gateway)
    sock.setblocking(True)
    conn = SSL.Connection(context, sock)
    conn.set_connect_state()
    conn.do_handshake()
    assert conn.get_protocol_version_name().encode() == b"TLSv1.2"
    conn.send(b"NOOP\r\n")
    assert conn.recv(1024).startswith(b"200")
    assert conn.renegotiate()
    outcome = "refused"
    try:
        conn.do_handshake()
        conn.send(b"NOOP\r\n")
        reply = conn.recv(1024)
        outcome = f"answered {reply!r}"
    except SSL.Error as err:
        outcome = f"refused: {err}"
    assert outcome.startswith("refused"), outcome
    assert "no renegotiation" in outcome
    conn.close()
    sock.close()
    # The client gives up with a fatal alert: the session ends and the failure counts.
    assert wait_for(lambda: len(failed_events(audit_records)) == 1)
    session = [r for r in audit_records() if r.get("event") == "tls_failed"]
    assert session[0]["phase"] == "session"
    assert sum(tls_failures(gateway).values()) == 1
    still_serving(gateway)
