"""Who may connect and log in: allowlists, the defender's bans, session limits.

Loopback addresses other than 127.0.0.1 stand in for other client networks (Linux
routes all of 127.0.0.0/8 to ``lo``).
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import json
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from ftps_gateway import cli
from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ImplicitFTP_TLS
from ftps_gateway.session.admission import EVICTED
from support.control import exactly, raw_connect, read_until_quiet
from support.credentials import PASSWORD, PASSWORD_HASH
from support.gateway import RunningGateway
from support.metrics import scrape

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Records = Callable[[], list[dict[str, object]]]


def _events(records: Records, name: str) -> list[dict[str, object]]:
    return [r for r in records() if r["event"] == name]


def _fast_failures(gw: RunningGateway) -> None:
    """Answer failed logins after 0.1 s instead of 3 s (RFC 2577's delay)."""
    for listener in gw.server.listeners:
        listener.handler.auth_failed_timeout = 0.1


def _fail_login(gw: RunningGateway, source_ip: str = "127.0.0.1") -> None:
    """One failed login; the one that earns a ban also closes the session."""
    ftp = gw.client(login=False, source_ip=source_ip)
    failed = exactly(replies.LOGIN_FAILED, replies.LOGIN_FAILED_CLOSING)
    with pytest.raises(ftplib.error_perm, match=failed):
        ftp.login("acme", "wrong password")
    ftp.close()


def _is_dropped(gw: RunningGateway, source_ip: str = "127.0.0.1") -> bool:
    """True if the server closes the connection without sending a single byte."""
    sock = raw_connect((gw.host, gw.port), source_ip)
    try:
        return read_until_quiet(sock, 3.0) == b""
    finally:
        sock.close()


def _greeting(gw: RunningGateway, source_ip: str) -> bytes:
    """What a new connection from ``source_ip`` hears before the server closes it."""
    sock = raw_connect((gw.host, gw.port), source_ip)
    try:
        return read_until_quiet(sock, 3.0)
    finally:
        sock.close()


# --- access.allow


def test_connection_from_outside_access_allow_is_dropped_before_the_banner(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    gw = start_gateway(sections='[access]\nallow = ["127.0.0.2/32"]')
    sock = raw_connect((gw.host, gw.port), "127.0.0.1")
    # Whatever the client sends (here a TLS ClientHello's first bytes), nothing comes
    # back: no banner, no TLS record, only the close.
    with contextlib.suppress(OSError):  # the server may already have closed
        sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    assert read_until_quiet(sock, 3.0) == b""
    sock.close()
    allowed = gw.client(source_ip="127.0.0.2")
    allowed.quit()
    refused = _events(audit_records, "connection_refused")
    assert [(r["client_ip"], r["reason"]) for r in refused] == [
        ("127.0.0.1", "not-allowed")
    ]
    assert not any(
        r["event"] == "connect" and r["client_ip"] == "127.0.0.1"
        for r in audit_records()
    )


def test_user_allow_networks_are_checked_at_login(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
        'allow = ["127.0.0.2/32"]\n'
    )
    gw = start_gateway(users=users)
    _fast_failures(gw)
    ftp = gw.client(login=False, source_ip="127.0.0.1")
    # The reply is that of a wrong password: the client learns nothing more.
    with pytest.raises(ftplib.error_perm, match=exactly(replies.LOGIN_FAILED)):
        ftp.login("acme", PASSWORD)
    ftp.close()
    gw.client(source_ip="127.0.0.2").quit()
    failed = _events(audit_records, "login_failed")
    assert [r["reason"] for r in failed] == ["network-not-allowed"]


# --- pre-login


@pytest.mark.parametrize("command", ["STAT", "HELP", "SITE HELP", "MDTM x", "SIZE x"])
def test_nothing_is_described_before_login(
    gateway: RunningGateway, command: str
) -> None:
    ftp = gateway.client(login=False)
    ftp.auth()
    with pytest.raises(ftplib.error_perm, match="^530 "):
        ftp.sendcmd(command)
    ftp.quit()


def test_banner_reveals_no_software(gateway: RunningGateway) -> None:
    ftp = gateway.client(login=False)
    assert ftp.welcome == "220 Partner file exchange"
    ftp.quit()


# --- defender


def test_ban_after_failures_then_expiry(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    gw = start_gateway(
        sections="[defender]\nmax_failures = 2\nwindow_seconds = 60\nban_seconds = 2"
    )
    _fast_failures(gw)
    _fail_login(gw)
    assert not _is_dropped(gw)
    ftp = gw.client(login=False)
    # The failure that earns the ban also ends its session.
    with pytest.raises(ftplib.error_perm, match=exactly(replies.LOGIN_FAILED_CLOSING)):
        ftp.login("acme", "wrong again")
    ftp.close()
    assert _is_dropped(gw)
    assert not _is_dropped(gw, "127.0.0.2"), "only the offending address is banned"
    bans = _events(audit_records, "ban")
    assert [(b["banned_ip"], b["seconds"], b["offences"]) for b in bans] == [
        ("127.0.0.1", 2, 1)
    ]
    time.sleep(2.2)
    gw.client().quit()


def test_safe_networks_are_never_banned(start_gateway: StartGateway) -> None:
    gw = start_gateway(
        sections='[access]\nsafe = ["127.0.0.1/32"]\n[defender]\nmax_failures = 1'
    )
    _fast_failures(gw)
    for _ in range(3):
        _fail_login(gw)
    gw.client().quit()


def test_ban_list_and_remove_through_the_cli(
    start_gateway: StartGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = start_gateway(sections="[defender]\nmax_failures = 1\nban_seconds = 600")
    _fast_failures(gw)
    _fail_login(gw, "127.0.0.3")
    config_path = gw.root.parent / "gateway.toml"
    assert cli.main(["ban", "list", "--config", str(config_path), "--json"]) == 0
    bans = json.loads(capsys.readouterr().out)
    assert [(b["ip"], b["offences"]) for b in bans] == [("127.0.0.3", 1)]
    assert 590 <= bans[0]["remaining_seconds"] <= 600
    assert cli.main(["ban", "list", "--config", str(config_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ADDRESS", "REMAINING", "OFFENCES", "UNTIL", "(UTC)"]
    assert table[1].startswith("127.0.0.3 ")
    assert _is_dropped(gw, "127.0.0.3")
    assert cli.main(["ban", "remove", "127.0.0.3", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out == "ban on 127.0.0.3 lifted\n"
    assert not _is_dropped(gw, "127.0.0.3")
    assert cli.main(["ban", "remove", "127.0.0.3", "--config", str(config_path)]) == 1
    assert "127.0.0.3 is not banned" in capsys.readouterr().err
    assert cli.main(["ban", "list", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out == "no address is banned\n"


def test_ban_cli_without_a_running_server(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from support.configs import write_config

    config_path = write_config(tmp_path, cert_files)
    assert cli.main(["ban", "list", "--config", str(config_path)]) == cli.EXIT_FAILURE
    assert "no server answers on" in capsys.readouterr().err


# --- limits


def _users(*names: str) -> str:
    return "".join(
        f'[[users]]\nname = "{name}"\npassword = "{PASSWORD_HASH}"\n' for name in names
    )


def _refused_login(ftp: ftplib.FTP_TLS, user: str, match: str) -> None:
    with pytest.raises(ftplib.error_temp, match=match):
        ftp.login(user, PASSWORD)
    ftp.close()


def test_session_limits_count_logins_each_with_their_own_reply(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """max_sessions, _per_ip and _per_user count logged-in sessions, checked at
    login with their own 421; connecting is never refused by them."""
    gw = start_gateway(
        users=_users("acme", "globex", "initech"),
        server_extra=(
            "login_timeout_seconds = 20\nmax_sessions = 2\n"
            "max_sessions_per_ip = 1\nmax_sessions_per_user = 1"
        ),
    )
    first = gw.client()  # acme logged in from 127.0.0.1
    limit = replies.LIMIT_REPLIES
    # Not logged in: any number of connections are greeted.
    waiting = [gw.client(login=False) for _ in range(3)]
    _refused_login(waiting[0], "globex", exactly(limit["limit-per-ip"]))
    _refused_login(
        gw.client(login=False, source_ip="127.0.0.2"),
        "acme",
        exactly(limit["limit-per-user"]),
    )
    second = gw.client(source_ip="127.0.0.2", user="globex")
    _refused_login(
        gw.client(login=False, source_ip="127.0.0.3"),
        "initech",
        exactly(limit["limit-total"]),
    )
    first.quit()
    # The freed slot is usable again, at once (QUIT releases before its reply).
    third = gw.client(source_ip="127.0.0.3", user="initech")
    third.storbinary("STOR ok.bin", io.BytesIO(b"ok"))
    for ftp in (second, third):
        ftp.quit()
    for ftp in waiting[1:]:
        ftp.close()
    assert _events(audit_records, "connection_refused") == []
    failed = [r["reason"] for r in _events(audit_records, "login_failed")]
    assert failed == ["limit-per-ip", "limit-per-user", "limit-total"]
    deadline = time.monotonic() + 10
    while gw.server.state_admin.snapshot() != (0, {}, {}):
        assert time.monotonic() < deadline, gw.server.state_admin.snapshot()
        time.sleep(0.1)


def test_idle_unauthenticated_connections_do_not_lock_a_partner_out(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """1,000 idle connections from five addresses fill the pre-login pool; a
    partner still connects and logs in: the stalest idler of the busiest address
    makes room (421, audited, counted)."""
    gw = start_gateway(
        server_extra=(
            "login_timeout_seconds = 120\nmax_unauthenticated = 100\n"
            "max_unauthenticated_per_ip = 1000"
        ),
        sections='[metrics]\nlisten = "127.0.0.1:0"',
    )
    idle = [
        raw_connect((gw.host, gw.port), f"127.0.0.{2 + index % 5}")
        for index in range(1000)
    ]
    try:
        partner = gw.client(source_ip="127.0.0.9")
        partner.storbinary("STOR in.bin", io.BytesIO(b"partner"))
        partner.quit()
        # Evicted idlers heard why, in clear text, before the close.
        heard = read_until_quiet(idle[0], 3.0)
        assert heard.startswith(b"220 ")
        assert replies.EVICTED.encode() in heard
    finally:
        for sock in idle:
            sock.close()
    assert (gw.home() / "in.bin").read_bytes() == b"partner"
    # Refusals are digested per address (one line each, then a count): five
    # addresses, five whole lines, the rest counted in the _repeated lines.
    _flush_refusal_digest(gw)
    evicted = [
        r for r in _events(audit_records, "connection_refused")
        if r["reason"] == "unauthenticated-evicted"
    ]  # fmt: skip
    repeated = [
        r for r in _events(audit_records, "connection_refused_repeated")
        if r["reason"] == "unauthenticated-evicted"
    ]  # fmt: skip
    total = len(evicted) + sum(int(str(r["count"])) for r in repeated)
    assert total >= 900
    idlers = {f"127.0.0.{n}" for n in range(2, 7)}
    assert {r["client_ip"] for r in evicted} <= idlers
    assert {r["address"] for r in repeated} <= idlers
    assert len(evicted) <= len(idlers)
    assert {r["pool"] for r in evicted} == {"total"}
    assert gw.server.health is not None
    samples = scrape(gw.server.health.address[1])
    key = ("ftps_gateway_sessions_refused_total", (("reason", EVICTED),))
    assert samples[key] == total


def test_one_address_competes_only_with_itself(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """Past max_unauthenticated_per_ip an address's own stalest connection goes;
    other addresses keep theirs."""
    gw = start_gateway(
        server_extra=(
            "login_timeout_seconds = 60\nmax_unauthenticated = 50\n"
            "max_unauthenticated_per_ip = 3"
        )
    )
    other = gw.client(login=False, source_ip="127.0.0.5")
    socks = [raw_connect((gw.host, gw.port), "127.0.0.4") for _ in range(4)]
    try:
        # The first of the four (the stalest) made room for the fourth.
        assert replies.EVICTED.encode() in read_until_quiet(socks[0], 3.0)
        assert replies.EVICTED.encode() not in read_until_quiet(socks[3], 0.5)
        other.login("acme", PASSWORD)  # the other address kept its connection
        other.quit()
    finally:
        for sock in socks:
            sock.close()
    evicted = [
        (r["client_ip"], r["pool"])
        for r in _events(audit_records, "connection_refused")
    ]
    assert evicted == [("127.0.0.4", "per-ip")]


def test_unauthenticated_session_is_closed_by_the_login_timer(
    start_gateway: StartGateway,
) -> None:
    gw = start_gateway(server_extra="login_timeout_seconds = 1")
    sock = raw_connect((gw.host, gw.port))
    received = read_until_quiet(sock, 4.0)
    sock.close()
    assert received.startswith(b"220 ")
    assert replies.LOGIN_TIMEOUT.encode() in received


def _implicit_client(gw: RunningGateway, port: int) -> ftplib.FTP_TLS:
    ftp = ImplicitFTP_TLS(
        context=ssl.create_default_context(cafile=str(gw.ca_file)), timeout=10
    )
    ftp.connect(gw.host, port)
    return ftp


def test_implicit_tls_listener(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """TLS from the first byte; data protected without PBSZ/PROT; AUTH refused."""
    gw = start_gateway(server_extra='implicit_listen = ["127.0.0.1:0"]')
    (port,) = [port for _host, port in gw.server.implicit_addresses]
    # A plain-text client hears nothing it can read: the server waits for a ClientHello.
    sock = socket.create_connection((gw.host, port), timeout=5)
    sock.sendall(b"USER acme\r\n")
    assert not read_until_quiet(sock, 2.0).startswith(b"220")
    sock.close()
    ftp = _implicit_client(gw, port)
    assert ftp.welcome == "220 Partner file exchange"
    assert ftp.sock.version() == "TLSv1.3"
    with pytest.raises(ftplib.error_perm, match=exactly(replies.AUTH_ALREADY)):
        ftp.sendcmd("AUTH TLS")
    ftp.login("acme", PASSWORD)
    ftp.storbinary("STOR implicit.bin", io.BytesIO(b"implicit"))
    assert ftp.nlst() == ["implicit.bin"]
    ftp.quit()
    assert (gw.home() / "implicit.bin").read_bytes() == b"implicit"
    connects = _events(audit_records, "connect")
    assert connects[-1]["listener"] == "implicit"


# --- refusals do not set the audit log's growth rate


def _flush_refusal_digest(gw: RunningGateway) -> None:
    """End the digest's interval now (on the IO loop), as its timer would."""
    import threading

    done = threading.Event()

    def flush() -> None:
        gw.server.gateway.audit.flush_refusals(force=True)
        done.set()

    gw.server.gateway.waker.call_soon_threadsafe(flush)
    assert done.wait(10)


def test_a_scanner_gets_one_audit_line_then_a_count(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """50 refused connections from one address: the first line, then one summary
    with the count, however fast they come (the metric still counts each)."""
    gw = start_gateway(sections='[access]\nallow = ["127.0.0.2/32"]')
    for _ in range(50):
        sock = raw_connect((gw.host, gw.port), "127.0.0.1")
        read_until_quiet(sock, 3.0)
        sock.close()
    _flush_refusal_digest(gw)
    assert [
        (r["client_ip"], r["reason"])
        for r in _events(audit_records, "connection_refused")
    ] == [("127.0.0.1", "not-allowed")]
    repeated = _events(audit_records, "connection_refused_repeated")
    assert [(r["address"], r["reason"], r["count"]) for r in repeated] == [
        ("127.0.0.1", "not-allowed", 49)
    ]
    counted = gw.server.gateway.metrics.registry.get_sample_value(
        "ftps_gateway_sessions_refused_total", {"reason": "not-allowed"}
    )
    assert counted == 50


def test_foreign_data_peers_are_digested_too(
    gateway: RunningGateway, audit_records: Records
) -> None:
    """A stranger knocking on a session's passive port 20 times: one line + a count."""
    ftp = gateway.client()
    port = ftplib.parse229(ftp.sendcmd("EPSV"), (gateway.host, 0))[1]
    for _ in range(20):
        knock = raw_connect((gateway.host, port), "127.0.0.2")
        read_until_quiet(knock, 3.0)
        knock.close()
    _flush_refusal_digest(gateway)
    ftp.quit()
    refused = _events(audit_records, "data_refused")
    assert [(r["peer_ip"], r["reason"]) for r in refused] == [
        ("127.0.0.2", "foreign-ip")
    ]
    repeated = _events(audit_records, "data_refused_repeated")
    assert [(r["address"], r["count"]) for r in repeated] == [("127.0.0.2", 19)]
