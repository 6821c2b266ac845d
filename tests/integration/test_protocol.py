"""The partner's session, command by command, on a real server with real TLS.

Replies are asserted exactly where a client or an operator depends on them, in the
manner of aiosmtpd's TestRequireTLS. Addresses in 227 replies are read from raw
``sendcmd("PASV")`` replies, because ftplib ignores them by default.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.filesystem import GatewayFS
from ftps_gateway.policy.passwords import PasswordVerifier
from ftps_gateway.session.fileaccess import Action
from ftps_gateway.session.runtime import SHARED_PARTS
from support.control import (
    exactly,
    plain_control,
    raw_connect,
    read_until_quiet,
    tls_only,
)
from support.credentials import FAST_PARAMETERS, PASSWORD, PASSWORD_HASH
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Records = Callable[[], list[dict[str, object]]]


# --- no clear text


def test_user_before_auth_tls_is_refused(gateway: RunningGateway) -> None:
    """USER and PASS before AUTH TLS get 530, so no password can cross in clear."""
    ftp = plain_control(gateway)
    with pytest.raises(ftplib.error_perm, match=exactly(replies.CLEAR_TEXT_LOGIN)):
        ftp.sendcmd("USER acme")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.CLEAR_TEXT_LOGIN)):
        ftp.sendcmd("PASS " + PASSWORD)
    ftp.close()


def test_other_commands_before_auth_tls_are_refused(gateway: RunningGateway) -> None:
    """Only AUTH, FEAT, SYST, NOOP and QUIT work before TLS; PBSZ/PROT get RFC 4217 503."""
    ftp = plain_control(gateway)
    assert "AUTH TLS" in ftp.sendcmd("FEAT")
    assert ftp.sendcmd("NOOP").startswith("200")
    for command in ("PASV", "LIST", "HELP", "STAT"):
        with pytest.raises(ftplib.error_perm, match="^530"):
            ftp.sendcmd(command)
    with pytest.raises(ftplib.error_perm, match=exactly(replies.PBSZ_NEEDS_TLS)):
        ftp.sendcmd("PBSZ 0")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.PROT_NEEDS_TLS)):
        ftp.sendcmd("PROT P")
    with pytest.raises(ftplib.error_perm, match="^504"):
        ftp.sendcmd("AUTH KERBEROS")
    ftp.close()


def test_plaintext_pipelined_behind_auth_tls_is_never_executed(
    gateway: RunningGateway,
) -> None:
    """Bytes sent in clear after AUTH TLS (STARTTLS injection) end the session."""
    sock = raw_connect((gateway.host, gateway.port))
    sock.recv(1024)
    sock.sendall(b"AUTH TLS\r\nUSER acme\r\n")
    received = read_until_quiet(sock)
    sock.close()
    assert b"234" not in received
    assert b"331" not in received


def test_prot_c_and_ccc_are_refused(gateway: RunningGateway) -> None:
    """PROT C and CCC get 534: neither the data nor the control channel drops TLS."""
    ftp = gateway.client()
    with pytest.raises(ftplib.error_perm, match=exactly(replies.PROT_C_REFUSED)):
        ftp.sendcmd("PROT C")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.CCC_REFUSED)):
        ftp.sendcmd("CCC")
    with pytest.raises(ftplib.error_perm, match="^536"):
        ftp.sendcmd("PROT S")
    ftp.quit()


def test_pasv_before_prot_p_is_refused(gateway: RunningGateway) -> None:
    """A data connection cannot even be prepared before PBSZ 0 and PROT P."""
    ftp = gateway.client(login=False)
    ftp.login("acme", PASSWORD)
    for command in ("PASV", "EPSV"):
        with pytest.raises(ftplib.error_perm, match=exactly(replies.PROT_P_REQUIRED)):
            ftp.sendcmd(command)
    ftp.quit()


def test_downgrade_sequence_sends_no_clear_text_listing(
    gateway: RunningGateway,
) -> None:
    """PROT P, PASV, PROT C, LIST: the listing still waits for TLS, never leaks in clear."""
    (gateway.home() / "secret-report.csv").write_text("x")
    ftp = gateway.client()
    _, port = ftplib.parse227(ftp.sendcmd("PASV"))
    with pytest.raises(ftplib.error_perm, match="^534"):
        ftp.sendcmd("PROT C")
    data = raw_connect((gateway.host, port))
    ftp.putcmd("LIST")
    assert ftp.getresp().startswith("150")
    received = read_until_quiet(data, 1.0)
    data.close()
    assert b"secret-report" not in received
    ftp.close()


def test_active_mode_and_stou_are_refused(gateway: RunningGateway) -> None:
    """PORT/EPRT are not supported (decision 0009); STOU would break atomic uploads."""
    ftp = gateway.client()
    with pytest.raises(ftplib.error_perm, match=exactly(replies.ACTIVE_UNSUPPORTED)):
        ftp.sendcmd("PORT 127,0,0,1,200,10")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.ACTIVE_UNSUPPORTED)):
        ftp.sendcmd("EPRT |1|127.0.0.1|51210|")
    stou = replies.NOT_IMPLEMENTED.format(command="STOU")
    with pytest.raises(ftplib.error_perm, match=exactly(stou)):
        ftp.sendcmd("STOU")
    (gateway.home() / "x").write_text("x")
    for command in ("RETR x", "STOR y", "APPE x", "LIST"):
        with pytest.raises(ftplib.error_temp, match=exactly(replies.NO_DATA_PATH)):
            ftp.sendcmd(command)
    ftp.quit()


def test_feat_does_not_advertise_active_mode(gateway: RunningGateway) -> None:
    """FEAT lists EPSV but not EPRT, before and after login (RFC 2428 section 4)."""
    plain = plain_control(gateway)
    before = plain.sendcmd("FEAT").splitlines()
    plain.close()
    ftp = gateway.client()
    after = ftp.sendcmd("FEAT").splitlines()
    ftp.quit()
    for lines in (before, after):
        features = {line.strip() for line in lines[1:-1]}
        assert "EPSV" in features
        assert "EPRT" not in features


# --- login


def test_wrong_password_and_unknown_user_look_the_same(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """Both get the same 530; only the audit log tells them apart."""
    answers = []
    for user in ("acme", "nobody"):
        ftp = tls_only(gateway)
        ftp.sendcmd(f"USER {user}")
        with pytest.raises(ftplib.error_perm) as refused:
            ftp.sendcmd("PASS wrong-password")
        answers.append(str(refused.value))
        ftp.close()
    assert answers == [replies.LOGIN_FAILED] * 2
    reasons = [r["reason"] for r in audit_records() if r["event"] == "login_failed"]
    assert reasons == ["bad-password", "unknown-user"]


def test_commands_pipelined_behind_pass_are_answered_in_order(
    gateway: RunningGateway,
) -> None:
    """PASS is verified off the loop; commands sent behind it wait, replies stay in order."""
    ftp = tls_only(gateway)
    ftp.sendcmd("USER acme")
    ftp.sock.sendall(f"PASS {PASSWORD}\r\nPWD\r\nNOOP\r\n".encode())
    assert ftp.getresp().startswith("230")
    assert ftp.getresp().startswith('257 "/"')
    assert ftp.getresp().startswith("200")
    ftp.quit()


class SlowVerifier(PasswordVerifier):
    """Stands for argon2id at production cost: each verification takes a second."""

    def verify(self, stored_hash: str | None, password: str) -> bool:
        time.sleep(1.0)
        return super().verify(stored_hash, password)


def test_password_checks_do_not_stall_other_sessions(gateway: RunningGateway) -> None:
    """While a login is being verified, another session's download keeps flowing."""
    payload = os.urandom(8 * 1024 * 1024)
    (gateway.home() / "big.bin").write_bytes(payload)
    busy = gateway.client()  # logs in with the fast verifier
    gateway.server.gateway.verifier = SlowVerifier(parameters=FAST_PARAMETERS)
    logins = [tls_only(gateway) for _ in range(2)]
    for ftp in logins:
        ftp.sendcmd("USER acme")
        ftp.putcmd(f"PASS {PASSWORD}")  # both verifications now run for a second
    started = time.monotonic()
    assert busy.sendcmd("NOOP").startswith("200")
    received = io.BytesIO()
    busy.retrbinary("RETR big.bin", received.write)
    elapsed = time.monotonic() - started
    assert received.getvalue() == payload
    for ftp in logins:
        assert ftp.getresp().startswith("230")
        ftp.quit()
    busy.quit()
    assert elapsed < 0.9, f"a session waited {elapsed:.2f} s behind password checks"


def test_login_grace_timer_is_not_reset_by_noop(start_gateway: StartGateway) -> None:
    """An unauthenticated session is closed after login_timeout_seconds, NOOP or not."""
    gw = start_gateway(server_extra="login_timeout_seconds = 2")
    ftp = tls_only(gw)
    started = time.monotonic()
    with pytest.raises((ftplib.error_temp, EOFError, OSError)):
        while time.monotonic() - started < 8:
            ftp.sendcmd("NOOP")
            time.sleep(0.3)
    assert time.monotonic() - started < 6
    ftp.close()


def test_no_password_in_any_log(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a right nor a wrong password appears in any log record."""
    caplog.set_level("DEBUG")
    ftp = gateway.client()
    ftp.quit()
    ftp = tls_only(gateway)
    ftp.sendcmd("USER acme")
    with pytest.raises(ftplib.error_perm):
        ftp.sendcmd("PASS not-the-" + PASSWORD)
    ftp.close()
    assert PASSWORD not in caplog.text
    assert "$argon2" not in caplog.text


# --- passive mode


def test_pasv_address_is_chosen_by_client_network(start_gateway: StartGateway) -> None:
    """Clients in an override network get its address, others the masquerade address."""
    gw = start_gateway(
        extra='address = "203.0.113.9"\n'
        "[[passive.overrides]]\n"
        'networks = ["127.0.0.2/32"]\n'
        'address = "198.51.100.7"\n'
        "[[passive.overrides]]\n"
        'networks = ["127.0.0.3/32"]\n'
        'address = ""\n'
    )
    expected = {
        "127.0.0.1": "203.0.113.9",
        "127.0.0.2": "198.51.100.7",
        "127.0.0.3": "127.0.0.1",
    }
    for source, address in expected.items():
        ftp = gw.client(source_ip=source)
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert host == address, source
        assert 40000 <= port <= 40999
        ftp.quit()


def test_pasv_address_may_be_a_dns_name(start_gateway: StartGateway) -> None:
    """A passive address given as a name is advertised as its IPv4 address (looked
    up off the IO loop when the gateway starts, policy.passivenames), and a
    transfer of a client that trusts the 227 address works through it."""
    gw = start_gateway(extra='address = "localhost"\n')
    ftp = gw.client()
    deadline = time.monotonic() + 10
    while True:  # the lookup runs in its own thread: the first PASV may precede it
        try:
            reply = ftp.sendcmd("PASV")
            break
        except ftplib.error_temp:
            assert time.monotonic() < deadline, "localhost never resolved"
            time.sleep(0.05)
    host, _port = ftplib.parse227(reply)
    assert host == "127.0.0.1"
    ftp.quit()
    ftp = gw.client()
    ftp.trust_server_pasv_ipv4_address = True  # connect where the 227 says
    data = bytearray()
    ftp.storbinary("STOR named.bin", io.BytesIO(b"x" * 1000))
    ftp.retrbinary("RETR named.bin", data.extend)
    assert bytes(data) == b"x" * 1000
    ftp.quit()


def test_reload_keeps_the_servers_own_parts_and_the_passive_name(
    start_gateway: StartGateway,
) -> None:
    """A reload builds a new Gateway around the same server parts (SHARED_PARTS),
    so a passive DNS name already looked up is answered at once after it."""
    gw = start_gateway(extra='address = "localhost"\n')
    before = gw.server.holder.current
    deadline = time.monotonic() + 10
    while not before.passive_names.known("localhost"):
        assert time.monotonic() < deadline, "localhost never resolved"
        time.sleep(0.05)
    assert gw.server.reload_from_thread() == []
    after = gw.server.holder.current
    assert after is not before
    for name in SHARED_PARTS:
        assert getattr(after, name) is getattr(before, name), name
    assert after.passive_policy.names is before.passive_names
    ftp = gw.client()
    host, _port = ftplib.parse227(ftp.sendcmd("PASV"))  # no retry: known already
    assert host == "127.0.0.1"
    ftp.quit()


def test_epsv_and_pasv_ports_stay_in_range_and_exhaustion_gives_425(
    start_gateway: StartGateway,
) -> None:
    """With every passive port taken the server answers 425, never a port outside."""
    gw = start_gateway(
        passive_ports="40100-40101",  # one user may hold the whole range here
        extra="max_ports_per_user_percent = 100\nmax_ports_per_ip_percent = 100",
    )
    sessions = [gw.client() for _ in range(3)]
    ports = {ftplib.parse227(sessions[0].sendcmd("PASV"))[1],
             ftplib.parse229(sessions[1].sendcmd("EPSV"), ("127.0.0.1", 0))[1]}  # fmt: skip
    assert ports == {40100, 40101}
    with pytest.raises(ftplib.error_temp, match=exactly(replies.PASSIVE_EXHAUSTED)):
        sessions[2].sendcmd("PASV")
    sessions[0].quit()  # frees its port
    time.sleep(0.2)
    assert ftplib.parse227(sessions[2].sendcmd("PASV"))[1] in ports
    for ftp in sessions[1:]:
        ftp.quit()


def test_foreign_ip_on_passive_port_is_dropped_silently(
    gateway: RunningGateway, audit_records: Callable[[], list[dict[str, object]]]
) -> None:
    """Another address connecting to a session's port is closed; the victim hears nothing."""
    (gateway.home() / "a.txt").write_text("victim data")
    ftp = gateway.client()
    ftp.voidcmd("TYPE I")
    _, port = ftplib.parse227(ftp.sendcmd("PASV"))
    intruder = raw_connect((gateway.host, port), source_ip="127.0.0.2")
    intruder.settimeout(2)
    assert intruder.recv(10) == b""  # closed by the server, nothing sent
    intruder.close()
    assert ftp.sendcmd("NOOP").startswith("200")  # no unsolicited 425 before it
    conn = ftp.transfercmd("RETR a.txt")  # the victim's own connection still works
    assert conn.recv(100) == b"victim data"
    conn.close()
    assert ftp.voidresp().startswith("226")
    ftp.quit()
    refused = [r for r in audit_records() if r["event"] == "data_refused"]
    assert refused
    assert refused[0]["reason"] == "foreign-ip"
    assert refused[0]["peer_ip"] == "127.0.0.2"


def test_passive_port_nobody_connects_to_answers_425(
    start_gateway: StartGateway,
) -> None:
    """A queued transfer whose client never connects gets 425 after the timeout."""
    gw = start_gateway(extra="connect_timeout_seconds = 1")
    ftp = gw.client()
    ftp.sendcmd("PASV")
    ftp.putcmd("LIST")
    assert ftp.getresp().startswith("150")
    with pytest.raises(ftplib.error_temp, match=exactly(replies.DATA_TIMEOUT)):
        ftp.getresp()
    assert ftp.sendcmd("NOOP").startswith("200")
    ftp.quit()


# --- transfers and atomic uploads


def test_upload_download_round_trip_is_intact(gateway: RunningGateway) -> None:
    """A multi-megabyte upload lands whole and downloads with the same sha256."""
    payload = os.urandom(4 * 1024 * 1024 + 123)
    ftp = gateway.client()
    assert ftp.storbinary("STOR big.bin", io.BytesIO(payload)).startswith("226")
    assert (
        hashlib.sha256((gateway.home() / "big.bin").read_bytes()).digest()
        == hashlib.sha256(payload).digest()
    )
    received = io.BytesIO()
    ftp.retrbinary("RETR big.bin", received.write)
    assert received.getvalue() == payload
    assert ftp.nlst() == ["big.bin"]
    ftp.quit()


def _start_upload(
    gw: RunningGateway, name: str, size: int
) -> tuple[ftplib.FTP_TLS, ssl.SSLSocket]:
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd(f"STOR {name}")
    assert isinstance(conn, ssl.SSLSocket)
    conn.sendall(os.urandom(size))
    return ftp, conn


def _files_in(home: Path) -> list[str]:
    return sorted(os.listdir(home))


def test_upload_reset_mid_stream_leaves_no_file(gateway: RunningGateway) -> None:
    """A client reset mid-upload gets 426 and leaves neither the file nor a temporary."""
    ftp, conn = _start_upload(gateway, "cut.bin", 2 * 1024 * 1024)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    with pytest.raises(ftplib.error_temp, match="^426"):
        ftp.voidresp()
    assert _files_in(gateway.home()) == []
    ftp.quit()


def test_upload_without_close_notify_is_not_complete(gateway: RunningGateway) -> None:
    """A TCP FIN without TLS close_notify is a truncation: 426, previous version kept."""
    (gateway.home() / "report.csv").write_bytes(b"previous version")
    ftp, conn = _start_upload(gateway, "report.csv", 1024 * 1024)
    conn.shutdown(socket.SHUT_WR)  # SSLSocket.shutdown drops TLS without close_notify
    with pytest.raises(ftplib.error_temp, match="^426"):
        ftp.voidresp()
    conn.close()
    assert _files_in(gateway.home()) == ["report.csv"]
    assert (gateway.home() / "report.csv").read_bytes() == b"previous version"
    ftp.quit()


def test_upload_in_progress_is_invisible_under_its_final_name(
    gateway: RunningGateway,
) -> None:
    """While data flows, neither the listing nor the disk shows the final name."""
    ftp, conn = _start_upload(gateway, "growing.bin", 256 * 1024)
    time.sleep(0.2)
    assert not (gateway.home() / "growing.bin").exists()
    observer = gateway.client()
    assert observer.nlst() == []
    observer.quit()
    conn.sendall(b"tail")
    conn.unwrap()
    conn.close()
    assert ftp.voidresp().startswith("226")
    assert (gateway.home() / "growing.bin").stat().st_size == 256 * 1024 + 4
    ftp.quit()


def _find_csv(home: Path) -> list[str]:
    """What a consumer's ``find HOME -name '*.csv'`` picks up (dot files included)."""
    return sorted(p.name for p in home.rglob("*.csv"))


def test_upload_temporaries_do_not_end_in_the_real_name(
    start_gateway: StartGateway,
) -> None:
    """A consumer's ``find -name '*.csv'`` never picks up half-written data, neither
    while the upload runs nor from an interrupted upload kept for resuming."""
    gw = start_gateway(
        users=f'partial_retention_seconds = 3600\n[[users]]\nname = "acme"\n'
        f'password = "{PASSWORD_HASH}"\n'
    )
    ftp, conn = _start_upload(gw, "report.csv", 256 * 1024)
    deadline = time.monotonic() + 30
    while not any(gw.home().iterdir()):  # the server has started writing
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _find_csv(gw.home()) == []
    conn.shutdown(socket.SHUT_WR)  # cut without close_notify: kept as a partial
    with pytest.raises(ftplib.error_temp, match="^426"):
        ftp.voidresp()
    conn.close()
    assert [p.name for p in gw.home().iterdir()] != []  # the partial is kept
    assert _find_csv(gw.home()) == []
    ftp.quit()


def test_rename_without_overwrite_never_replaces_a_file_that_appeared_meanwhile(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RNTO is checked, then a local process creates the target, then the rename
    runs: without ``overwrite`` it must fail (550), not replace that file."""
    gw = start_gateway(
        users=f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
        'home_permissions = ["list", "download", "upload", "rename"]\n'
    )
    (gw.home() / "draft.csv").write_text("partner data")
    checked = GatewayFS._checked

    def checked_then_raced(
        self: GatewayFS, action: Action, path: str, **kw: Any
    ) -> Any:
        location = checked(self, action, path, **kw)
        if action is Action.RENAME_TO:  # the last check before the rename itself
            (gw.home() / "final.csv").write_text("written by someone else")
        return location

    monkeypatch.setattr(GatewayFS, "_checked", checked_then_raced)
    ftp = gw.client()
    ftp.sendcmd("RNFR draft.csv")
    with pytest.raises(ftplib.error_perm, match="^550 "):
        ftp.sendcmd("RNTO final.csv")
    ftp.quit()
    assert (gw.home() / "final.csv").read_text() == "written by someone else"
    assert (gw.home() / "draft.csv").read_text() == "partner data"


# --- confinement


def test_paths_cannot_leave_the_home(gateway: RunningGateway, tmp_path: Path) -> None:
    """.., absolute paths, NUL bytes, long names and symlinks out are all refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    (gateway.home() / "escape").symlink_to(outside)
    (gateway.home() / "escape-file").symlink_to(outside / "passwd")
    ftp = gateway.client()
    for command in ("RETR ../../../../etc/passwd", "RETR /etc/passwd", "CWD escape",
                    "RETR escape/passwd", "RETR escape-file", "SIZE escape-file",
                    "MLST escape", "DELE escape-file"):  # fmt: skip
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.sendcmd(command)
    for bad in ("RETR a\0b", "RETR " + "x" * 300, "CWD " + "/a" * 600):
        with pytest.raises(ftplib.error_perm, match=exactly(replies.INVALID_PATH)):
            ftp.sendcmd(bad)
    assert ftp.nlst() == []  # the links out are not listed at all
    (gateway.home() / "report.csv").write_text("inside")
    (gateway.home() / "latest.csv").symlink_to(gateway.home() / "report.csv")
    lines: list[str] = []
    ftp.retrlines("LIST", lines.append)
    assert sorted(line.split()[-1] for line in lines) == ["latest.csv", "report.csv"]
    assert not any("->" in line or line.startswith("l") for line in lines)
    ftp.cwd("..")
    assert ftp.pwd() == "/"
    ftp.quit()
    assert (outside / "passwd").read_text() == "root:x:0:0"


def test_hidden_upload_names_cannot_be_addressed(gateway: RunningGateway) -> None:
    """Partners can neither list nor touch a temporary upload name."""
    temp = gateway.home() / ".ftps-upload-0123456789abcdef-x.bin"
    temp.write_text("partial")
    ftp = gateway.client()
    assert ftp.nlst() == []
    with pytest.raises(ftplib.error_perm, match=exactly(replies.INVALID_PATH)):
        ftp.sendcmd(f"RETR {temp.name}")
    ftp.quit()


@pytest.mark.parametrize(
    "name", ["a\u2028b.csv", "next\x85line.csv", "invoice\u202efdp.exe", "x\u2067y"]
)
def test_names_with_line_separators_or_bidi_controls_are_refused(
    gateway: RunningGateway, name: str
) -> None:
    """Such names forge xferlog lines or spoof extensions: refused like C0 controls."""
    ftp = gateway.client()
    with pytest.raises(ftplib.error_perm, match=f"^{replies.INVALID_PATH}$"):
        ftp.storbinary(f"STOR {name}", io.BytesIO(b"x"))
    with pytest.raises(ftplib.error_perm, match=f"^{replies.INVALID_PATH}$"):
        ftp.mkd(name)
    ftp.quit()
    assert list(gateway.home().iterdir()) == []


# --- no busy loops


def _cpu_seconds_while(action: Callable[[], None], seconds: float) -> float:
    """Process CPU time used while ``action`` holds a connection open for ``seconds``."""
    start = time.process_time()
    action()
    time.sleep(seconds)
    return time.process_time() - start


def test_no_busy_loop_on_silent_data_connection_or_half_closed_upload(
    gateway: RunningGateway,
) -> None:
    """A data connection that never says ClientHello, or a half-closed upload, costs no CPU."""
    ftp = gateway.client()
    _, port = ftplib.parse227(ftp.sendcmd("PASV"))
    silent = raw_connect((gateway.host, port))
    used = _cpu_seconds_while(lambda: None, 1.5)
    assert used < 0.5, f"server spun for {used:.2f} CPU-s on a silent data connection"
    silent.close()
    ftp.close()

    uploader, conn = _start_upload(gateway, "half.bin", 64 * 1024)
    raw = socket.socket(fileno=os.dup(conn.fileno()))
    used = _cpu_seconds_while(lambda: raw.shutdown(socket.SHUT_WR), 1.5)
    assert used < 0.5, f"server spun for {used:.2f} CPU-s on a half-closed upload"
    raw.close()
    conn.close()
    uploader.close()


class CountingVerifier(PasswordVerifier):
    """Counts the argon2id verifications it runs."""

    calls = 0

    def verify(self, stored_hash: str | None, password: str) -> bool:
        type(self).calls += 1
        return super().verify(stored_hash, password)


def test_repeat_logins_skip_argon2_but_wrong_passwords_never_do(
    gateway: RunningGateway,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    verifier = CountingVerifier(parameters=FAST_PARAMETERS)
    gateway.server.gateway.verifier = verifier
    for listener in gateway.server.listeners:
        listener.handler.auth_failed_timeout = 0.1
    for _ in range(3):
        gateway.client().quit()
    assert CountingVerifier.calls == 1
    for _ in range(2):
        ftp = gateway.client(login=False)
        with pytest.raises(ftplib.error_perm):
            ftp.login("acme", "wrong")
        ftp.close()
    assert CountingVerifier.calls == 3
    logins = [r for r in audit_records() if r["event"] == "login_ok"]
    assert [r.get("cached", False) for r in logins] == [False, True, True]


# --- listings of missing folders, and data connections the client gave up


def _refused_data_events(gw: RunningGateway, records: Records) -> list[object]:
    """data_refused audit lines and refused-data/TLS-failure samples on data."""
    metrics = gw.server.gateway.metrics.registry
    counted = [
        metrics.get_sample_value(name, labels)
        for name, labels in (
            ("ftps_gateway_data_connections_refused_total",
             {"reason": "tls-handshake-failed"}),
            ("ftps_gateway_data_connections_refused_total", {"reason": "timeout"}),
        )
    ]  # fmt: skip
    audited = [r["reason"] for r in records() if r["event"] == "data_refused"]
    return [*audited, *(value for value in counted if value)]


def _wait_until_port_free(host: str, port: int) -> None:
    """Wait until nothing listens on ``port`` (binding it is the probe: a connection
    would be a data connection of its own)."""
    deadline = time.monotonic() + 30
    while True:
        probe = socket.socket()
        try:
            probe.bind((host, port))
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still taken"
            time.sleep(0.2)
        else:
            return
        finally:
            probe.close()


def test_mlsd_of_a_missing_folder_is_550_and_of_a_file_501(
    gateway: RunningGateway,
) -> None:
    """RFC 3659: 550 when nothing is there (rclone creates it), 501 for a file."""
    (gateway.home() / "file.txt").write_text("x")
    ftp = gateway.client()
    ftp.sendcmd("EPSV")
    with pytest.raises(ftplib.error_perm, match=f"^{replies.NO_SUCH_FOLDER}$"):
        ftp.sendcmd("MLSD missing")
    ftp.sendcmd("EPSV")
    with pytest.raises(ftplib.error_perm, match=f"^{replies.NOT_A_FOLDER}$"):
        ftp.sendcmd("MLSD file.txt")
    assert ftp.mlsd("/") is not None
    ftp.quit()


def test_data_connection_dropped_after_a_failed_command_is_not_a_refusal(
    gateway: RunningGateway, audit_records: Records
) -> None:
    """Go's FTP clients dial the data port, send the command, get 550 and hang up
    without ever starting TLS: normal, not a failed handshake worth an alert."""
    ftp = gateway.client()
    port = ftplib.parse229(ftp.sendcmd("EPSV"), (gateway.host, 0))[1]
    data = raw_connect((gateway.host, port))
    with pytest.raises(ftplib.error_perm, match="^550 "):
        ftp.sendcmd("RETR missing.bin")
    data.shutdown(socket.SHUT_WR)
    read_until_quiet(data, 10)  # until the server saw the close and closed too
    data.close()
    assert ftp.sendcmd("NOOP").startswith("200")
    assert _refused_data_events(gateway, audit_records) == []
    ftp.quit()


def test_passive_port_of_a_failed_command_times_out_quietly(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    """PASV, a command that fails, and no connection: the port just closes."""
    gw = start_gateway(extra="connect_timeout_seconds = 1")
    ftp = gw.client()
    port = ftplib.parse229(ftp.sendcmd("EPSV"), (gw.host, 0))[1]
    with pytest.raises(ftplib.error_perm, match="^550 "):
        ftp.sendcmd("RETR missing.bin")
    _wait_until_port_free(gw.host, port)
    assert ftp.sendcmd("NOOP").startswith("200")
    assert _refused_data_events(gw, audit_records) == []
    ftp.quit()
