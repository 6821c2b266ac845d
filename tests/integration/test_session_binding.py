"""Data connections bound to their own control session, and per-partner TLS policy.

Every data connection here is a real TLS connection to a real passive port. The
attacker cases use the same source address as the victim, so only the TLS session
binding (not the address check) can stop them.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.control import exactly, read_until_quiet
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
SECRET = b"partner payroll " * 4096


def _context(gw: RunningGateway) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(gw.ca_file))


def plain_ftplib(gw: RunningGateway, source_ip: str = "127.0.0.1") -> ftplib.FTP_TLS:
    """Stock ``ftplib.FTP_TLS``: every data connection is a brand-new TLS session."""
    ftp = ftplib.FTP_TLS(context=_context(gw), timeout=10)
    ftp.connect(gw.host, gw.port, source_address=(source_ip, 0))
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    return ftp


class SessionOfferingFTP_TLS(ReusingFTP_TLS):  # noqa: N801 - mirrors ftplib
    """Offers a chosen TLS session (another control session's) on data connections."""

    offered: ssl.SSLSession | None = None

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[Any, Any]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        conn = self.context.wrap_socket(
            conn, server_hostname=self.host, session=self.offered
        )
        return conn, size


def _put_secret(gw: RunningGateway) -> None:
    (gw.home() / "secret.bin").write_bytes(SECRET)


def _data_events(
    records: Callable[[], list[dict[str, object]]],
) -> list[dict[str, object]]:
    return [
        r
        for r in records()
        if r["event"] == "data_refused"
        or (r["event"] == "tls_established" and r.get("channel") == "data")
    ]


def _pasv_port(ftp: ftplib.FTP) -> int:
    reply = ftp.sendcmd("EPSV")
    return int(reply.split("|")[-2])


def _attacker_handshake(gw: RunningGateway, port: int) -> tuple[ssl.SSLSocket, bytes]:
    """Connect to ``port`` from the victim's address with a fresh TLS session."""
    raw = socket.create_connection((gw.host, port), timeout=5)
    conn = _context(gw).wrap_socket(raw, server_hostname="localhost")
    return conn, read_until_quiet(conn, 2.0)


def test_same_ip_attacker_racing_to_the_passive_port_gets_nothing(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """The attacker wins the race to the port, completes TLS, and receives 0 bytes."""
    _put_secret(gateway)
    victim = gateway.client()
    port = _pasv_port(victim)
    # The victim's RETR is queued, waiting for a data connection.
    victim.putcmd("RETR secret.bin")
    assert victim.getresp().startswith("150")
    conn, stolen = _attacker_handshake(gateway, port)
    conn.close()
    assert stolen == b""
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        victim.voidresp()
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert [r["reason"] for r in refused] == ["not-resumed"]
    # The victim's session is intact: the next transfer works.
    out = io.BytesIO()
    victim.retrbinary("RETR secret.bin", out.write)
    assert out.getvalue() == SECRET
    victim.quit()


def test_attacker_before_the_transfer_command_gets_nothing(
    gateway: RunningGateway,
) -> None:
    """Connected and refused before RETR: RETR then hears why, and nothing leaks."""
    _put_secret(gateway)
    victim = gateway.client()
    port = _pasv_port(victim)
    conn, stolen = _attacker_handshake(gateway, port)
    conn.close()
    assert stolen == b""
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        victim.sendcmd("RETR secret.bin")
    # Only once: the following command without PASV gets the usual answer.
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NO_DATA_PATH)):
        victim.sendcmd("RETR secret.bin")
    victim.quit()


def test_data_connection_offering_another_sessions_tls_session_is_refused(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """A session the server issued, but to another control connection, is refused."""
    _put_secret(gateway)
    shared_context = _context(gateway)  # Python resumes only on the same context
    other = ReusingFTP_TLS(context=shared_context, timeout=10)
    other.connect(gateway.host, gateway.port)
    other.login("acme", PASSWORD)
    other.prot_p()
    other.retrbinary("RETR secret.bin", lambda _data: None)  # has a resumable session
    thief = SessionOfferingFTP_TLS(context=shared_context, timeout=10)
    thief.connect(gateway.host, gateway.port)
    thief.login("acme", PASSWORD)
    thief.prot_p()
    thief.offered = other.sock.session
    received = bytearray()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        thief.retrbinary("RETR secret.bin", received.extend)
    assert received == b""
    # The same client offering its own control session is accepted.
    thief.offered = thief.sock.session
    out = io.BytesIO()
    thief.retrbinary("RETR secret.bin", out.write)
    assert out.getvalue() == SECRET
    events = _data_events(audit_records)
    assert [e.get("reason", e.get("resumed")) for e in events] == [
        True,
        "not-resumed",
        True,
    ]
    other.quit()
    thief.quit()


def _refused_upload(ftp: ftplib.FTP_TLS, name: str) -> None:
    """STOR whose data connection the server refuses after the TLS handshake.

    The client may be writing when the server's close_notify arrives, so its write
    can fail (a broken pipe is the client's view of the refusal); what counts is the
    425 on the control connection and no file.
    """
    conn = ftp.transfercmd(f"STOR {name}")
    with contextlib.suppress(OSError):
        conn.sendall(b"data")
        conn.unwrap()
    conn.close()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        ftp.voidresp()


def test_stock_ftplib_is_refused_under_required(gateway: RunningGateway) -> None:
    """Plain ftplib never resumes: refused by default, uploads and listings alike."""
    ftp = plain_ftplib(gateway)
    _refused_upload(ftp, "up.bin")
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        ftp.nlst()
    ftp.quit()
    assert not (gateway.home() / "up.bin").exists()


def test_stock_ftplib_passes_with_ip_match(start_gateway: StartGateway) -> None:
    gw = start_gateway(tls_extra='reuse = "ip-match"')
    ftp = plain_ftplib(gw)
    ftp.storbinary("STOR up.bin", io.BytesIO(b"data"))
    assert ftp.nlst() == ["up.bin"]
    ftp.quit()
    assert (gw.home() / "up.bin").read_bytes() == b"data"


def test_ip_match_for_one_network_only(start_gateway: StartGateway) -> None:
    """An override relaxes the check for its network; everyone else stays strict."""
    gw = start_gateway(
        tls_extra='[[tls.overrides]]\nnetworks = ["127.0.0.2/32"]\nreuse = "ip-match"'
    )
    relaxed = plain_ftplib(gw, source_ip="127.0.0.2")
    relaxed.storbinary("STOR a.bin", io.BytesIO(b"a"))
    relaxed.quit()
    strict = plain_ftplib(gw, source_ip="127.0.0.1")
    _refused_upload(strict, "b.bin")
    strict.quit()
    assert not (gw.home() / "b.bin").exists()


def test_ip_match_for_one_user_only(start_gateway: StartGateway) -> None:
    from support.credentials import PASSWORD_HASH

    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\nreuse = "ip-match"\n'
        f'[[users]]\nname = "globex"\npassword = "{PASSWORD_HASH}"\n'
    )
    gw = start_gateway(users=users)
    relaxed = plain_ftplib(gw)
    relaxed.storbinary("STOR a.bin", io.BytesIO(b"a"))
    relaxed.quit()
    strict = ftplib.FTP_TLS(context=_context(gw), timeout=10)
    strict.connect(gw.host, gw.port)
    strict.login("globex", PASSWORD)
    strict.prot_p()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        strict.nlst()
    strict.quit()


def test_max_version_per_network(start_gateway: StartGateway) -> None:
    """A partner network capped at TLS 1.2; the data connections resume at 1.2 too."""
    gw = start_gateway(
        tls_extra='[[tls.overrides]]\nnetworks = ["127.0.0.2/32"]\nmax_version = "1.2"'
    )
    capped = gw.client(source_ip="127.0.0.2")
    assert capped.sock.version() == "TLSv1.2"
    capped.storbinary("STOR a.bin", io.BytesIO(b"a"))
    capped.quit()
    other = gw.client()
    assert other.sock.version() == "TLSv1.3"
    other.quit()


def test_user_max_version_caps_data_connections(
    start_gateway: StartGateway,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """Known only after login, a user's cap applies to its data connections."""
    from support.credentials import PASSWORD_HASH

    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
        'reuse = "ip-match"\nmax_version = "1.2"\n'
    )
    gw = start_gateway(users=users)
    ftp = plain_ftplib(gw)
    versions: list[str] = []
    conn, _ = ftp.ntransfercmd("NLST")
    versions.append(conn.version())
    conn.close()
    ftp.voidresp()
    ftp.quit()
    assert versions == ["TLSv1.2"]
    data = [
        r
        for r in audit_records()
        if r["event"] == "tls_established" and r["channel"] == "data"
    ]
    assert [r["version"] for r in data] == ["TLSv1.2"]


def test_user_cap_that_cannot_resume_is_reported(
    start_gateway: StartGateway,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """A 1.2 data cap under "required" cannot resume a 1.3 control session: say so."""
    from support.credentials import PASSWORD_HASH

    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\nmax_version = "1.2"\n'
    )
    gw = start_gateway(users=users)
    ftp = gw.client()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        ftp.nlst()
    ftp.quit()
    conflicts = [r for r in audit_records() if r["event"] == "policy_conflict"]
    assert len(conflicts) == 1
    assert conflicts[0]["control_version"] == "1.3"
    assert conflicts[0]["data_max_version"] == "1.2"


def test_tls12_and_tls13_sessions_resume(start_gateway: StartGateway) -> None:
    """The resuming client works at both versions under the default policy."""
    gw = start_gateway()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = _context(gw)
        context.maximum_version = version
        ftp = ReusingFTP_TLS(context=context, timeout=10)
        ftp.connect(gw.host, gw.port)
        ftp.login("acme", PASSWORD)
        ftp.prot_p()
        for index in range(5):
            ftp.storbinary(f"STOR f{index}.bin", io.BytesIO(b"x" * 70_000))
        assert sorted(ftp.nlst()) == [f"f{index}.bin" for index in range(5)]
        ftp.quit()


def test_twenty_racing_attackers_receive_zero_bytes(gateway: RunningGateway) -> None:
    """The measurement that found leaks on pyOpenSSL (14 of 20), repeated here."""
    _put_secret(gateway)
    victim = gateway.client()
    leaked = 0
    for _ in range(20):
        port = _pasv_port(victim)
        victim.putcmd("RETR secret.bin")
        assert victim.getresp().startswith("150")
        conn, stolen = _attacker_handshake(gateway, port)
        conn.close()
        leaked += len(stolen)
        with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
            victim.voidresp()
    assert leaked == 0
    victim.quit()


@pytest.mark.parametrize("client_tickets", [True, False], ids=["ticket", "session-id"])
def test_tls12_stranger_cannot_resume_the_session_it_got_on_the_data_port(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
    client_tickets: bool,
) -> None:
    """TLS 1.2: refused once on the victim's port, the attacker holds a full session
    made there; OpenSSL resumes it on the next port, the gateway does not count it."""
    _put_secret(gateway)
    context = _context(gateway)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if not client_tickets:  # resumption through the server's session cache
        context.options |= ssl.OP_NO_TICKET
    victim = ReusingFTP_TLS(context=context, timeout=10)
    victim.connect(gateway.host, gateway.port)
    victim.login("acme", PASSWORD)
    victim.prot_p()
    raw = socket.create_connection((gateway.host, _pasv_port(victim)), timeout=5)
    first = context.wrap_socket(raw, server_hostname="localhost")
    assert read_until_quiet(first, 2.0) == b""
    learned = first.session
    first.close()
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        victim.sendcmd("RETR secret.bin")
    port = _pasv_port(victim)
    victim.putcmd("RETR secret.bin")
    assert victim.getresp().startswith("150")
    raw = socket.create_connection((gateway.host, port), timeout=5)
    again = context.wrap_socket(raw, server_hostname="localhost", session=learned)
    stolen = read_until_quiet(again, 2.0)
    again.close()
    assert stolen == b""
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        victim.voidresp()
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert [(r["reason"], r.get("version")) for r in refused] == [
        ("not-resumed", "TLSv1.2"),
        ("not-resumed", "TLSv1.2"),
    ]
    out = io.BytesIO()  # the victim itself still resumes
    victim.retrbinary("RETR secret.bin", out.write)
    assert out.getvalue() == SECRET
    victim.quit()


def test_site_diag_shows_what_the_server_sees(start_gateway: StartGateway) -> None:
    gw = start_gateway(
        extra='address = "203.0.113.9"',
        server_extra='login_timeout_seconds = 5\nnode_name = "node-a"',
        sections='[access]\nallow = ["127.0.0.0/8"]',
    )
    ftp = gw.client()
    before = ftp.sendcmd("SITE DIAG")
    ftp.nlst()
    after = ftp.sendcmd("SITE DIAG")
    ftp.quit()
    facts = dict(line.strip().split(": ", 1) for line in after.splitlines()[1:-1])
    assert facts["node"] == "node-a"
    assert facts["client-ip"] == "127.0.0.1"
    assert facts["access-rule"] == "127.0.0.0/8"
    assert facts["passive-rule"] == "default"
    assert facts["passive-address"] == "203.0.113.9"
    assert facts["passive-ports"] == "40000-40999"
    assert facts["control-tls"].startswith("TLSv1.3 TLS_")
    assert facts["data-reuse"] == "required (default)"
    assert facts["last-data-tls"] == "TLSv1.3 resumed"
    assert "last-data-tls: none" in before
    assert after.splitlines()[-1] == replies.DIAG_END


def test_site_diag_needs_login(gateway: RunningGateway) -> None:
    ftp = gateway.client(login=False)
    ftp.auth()
    with pytest.raises(ftplib.error_perm, match="^530 "):
        ftp.sendcmd("SITE DIAG")
    ftp.quit()


def _retr_from(
    gw: RunningGateway, ftp: ftplib.FTP_TLS, source_ip: str, *, resume: bool
) -> bytes:
    """RETR over a data connection opened from ``source_ip`` (another egress IP)."""
    port = _pasv_port(ftp)
    raw = socket.create_connection(
        (gw.host, port), timeout=5, source_address=(source_ip, 0)
    )
    ftp.putcmd("RETR secret.bin")
    assert ftp.getresp().startswith("150")
    session = ftp.sock.session if resume else None
    conn = ftp.context.wrap_socket(raw, server_hostname="localhost", session=session)
    received = read_until_quiet(conn, 5.0)
    conn.close()
    return received


def test_required_any_ip_accepts_a_resumed_data_connection_from_another_address(
    start_gateway: StartGateway,
) -> None:
    """Partners behind NAT pools: another egress address, same TLS session: fine."""
    gw = start_gateway(tls_extra='reuse = "required-any-ip"')
    _put_secret(gw)
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    assert _retr_from(gw, ftp, "127.0.0.2", resume=True) == SECRET
    ftp.voidresp()
    # Without resumption, another address gets nothing; the port listens again
    # for the partner's own connection, which here never comes (5 s timeout).
    assert _retr_from(gw, ftp, "127.0.0.2", resume=False) == b""
    with pytest.raises(ftplib.error_temp, match=exactly(replies.DATA_TIMEOUT)):
        ftp.voidresp()
    # From the partner's own address, a client that cannot resume hears why at once.
    assert _retr_from(gw, ftp, "127.0.0.1", resume=False) == b""
    with pytest.raises(ftplib.error_temp, match=exactly(replies.NOT_RESUMED)):
        ftp.voidresp()
    ftp.quit()


def test_required_refuses_another_address_even_with_resumption(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    _put_secret(gateway)
    ftp = gateway.client()
    port = _pasv_port(ftp)
    raw = socket.create_connection(
        (gateway.host, port), timeout=5, source_address=("127.0.0.2", 0)
    )
    # The server drops a foreign address at once, before any TLS.
    assert read_until_quiet(raw, 2.0) == b""
    raw.close()
    ftp.quit()
    assert [r["reason"] for r in audit_records() if r["event"] == "data_refused"] == [
        "foreign-ip"
    ]
