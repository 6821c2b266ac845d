"""Drain on SIGTERM, readiness, and what the audit trail and xferlog record."""

from __future__ import annotations

import ftplib
import hashlib
import io
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from ftps_gateway.ftp import replies
from support.control import raw_connect, read_until_quiet
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Records = Callable[[], list[dict[str, object]]]
METRICS = '[metrics]\nlisten = "127.0.0.1:0"'


def _get(gw: RunningGateway, path: str) -> tuple[int, str]:
    assert gw.server.health is not None
    host, port = gw.server.health.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_drain_fails_readiness_at_once_and_lets_the_download_finish(
    start_gateway: StartGateway, audit_records: Records
) -> None:
    gw = start_gateway(sections=METRICS, server_extra="shutdown_grace_seconds = 30")
    payload = os.urandom(16 * 1024 * 1024)
    (gw.home() / "big.bin").write_bytes(payload)
    assert _get(gw, "/readyz") == (200, "ready\n")
    downloader = gw.client()
    idle = gw.client()
    downloader.voidcmd("TYPE I")
    conn, _ = downloader.ntransfercmd("RETR big.bin")
    received = bytearray(conn.recv(65536))

    gw.server.gateway.waker.call_soon_threadsafe(gw.server.drain)
    deadline = time.monotonic() + 5
    while _get(gw, "/readyz")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = _get(gw, "/readyz")
    assert (status, body.splitlines()[0]) == (503, "draining")
    assert _get(gw, "/healthz")[0] == 200
    # A new session is refused; an idle one is told and closed.
    sock = raw_connect((gw.host, gw.port))
    draining = replies.LIMIT_REPLIES["draining"].encode()
    assert read_until_quiet(sock, 3.0).startswith(draining)
    sock.close()
    with pytest.raises((ftplib.error_temp, EOFError, OSError)):
        idle.voidcmd("NOOP")
    idle.close()
    # The running download completes intact, then the server stops by itself.
    while chunk := conn.recv(1 << 20):
        received += chunk
    conn.unwrap()
    conn.close()
    downloader.voidresp()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    downloader.close()
    assert gw.server.wait_stopped(10), "server did not stop after the drain"
    events = [r["event"] for r in audit_records()]
    assert "drain_started" in events
    assert "drain_finished" in events
    refused = [r for r in audit_records() if r["event"] == "connection_refused"]
    assert [r["reason"] for r in refused] == ["draining"]


def test_drain_grace_period_cuts_a_stalled_transfer(
    start_gateway: StartGateway,
) -> None:
    gw = start_gateway(server_extra="shutdown_grace_seconds = 1")
    (gw.home() / "big.bin").write_bytes(b"x" * (32 * 1024 * 1024))
    ftp = gw.client()
    conn, _ = ftp.ntransfercmd("RETR big.bin")
    conn.recv(1024)  # then stall: the server's buffers fill, the transfer never ends
    started = time.monotonic()
    gw.server.gateway.waker.call_soon_threadsafe(gw.server.drain)
    assert gw.server.wait_stopped(10)
    assert time.monotonic() - started < 5
    conn.close()
    ftp.close()


def test_audit_records_carry_transfer_and_tree_fields(
    gateway: RunningGateway, audit_records: Records
) -> None:
    ftp = gateway.client()
    ftp.storbinary("STOR a.bin", io.BytesIO(b"a" * 5000))
    ftp.retrbinary("RETR a.bin", lambda _data: None)
    ftp.mkd("reports")
    ftp.rename("a.bin", "reports/b.bin")
    ftp.delete("reports/b.bin")
    with pytest.raises(ftplib.error_perm):
        ftp.delete("missing.bin")
    ftp.rmd("reports")
    ftp.quit()
    records = audit_records()
    session = {r["session"] for r in records if r["event"] == "login_ok"}
    assert len(session) == 1
    by_event = {r["event"]: r for r in records if r.get("session") in session}
    upload = by_event["upload_completed"]
    assert (upload["path"], upload["bytes"], upload["user"]) == ("/a.bin", 5000, "acme")
    assert upload["sha256"] == hashlib.sha256(b"a" * 5000).hexdigest()
    assert isinstance(upload["seconds"], float)
    assert by_event["download_completed"]["bytes"] == 5000
    assert (by_event["mkdir"]["path"], by_event["mkdir"]["ok"]) == ("/reports", True)
    assert (by_event["rename"]["from"], by_event["rename"]["path"]) == (
        "/a.bin",
        "/reports/b.bin",
    )
    assert by_event["rmdir"]["ok"] is True
    deletes = [r for r in records if r["event"] == "delete"]
    assert [(d["path"], d["ok"]) for d in deletes] == [
        ("/reports/b.bin", True),
        ("/missing.bin", False),
    ]
    for record in records:
        assert record["client_ip"] == "127.0.0.1" or record["event"].startswith("drain")
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["ts"])
        )


XFERLOG = re.compile(
    r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} (\d+) 127\.0\.0\.1 (\d+) (\S+) b _ ([io]) "
    r"r acme ftp 0 \* ([ci])"
)


def test_xferlog_line_per_transfer(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ftps_gateway.xferlog")
    ftp = gateway.client()
    ftp.storbinary("STOR my report.bin", io.BytesIO(b"r" * 1234))
    ftp.retrbinary("RETR my report.bin", lambda _data: None)
    ftp.quit()
    lines = [r.getMessage() for r in caplog.records if r.name == "ftps_gateway.xferlog"]
    parsed = [XFERLOG.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert [(m[2], m[3], m[4], m[5]) for m in parsed if m] == [
        ("1234", "/my_report.bin", "i", "c"),
        ("1234", "/my_report.bin", "o", "c"),
    ]


def test_timers_set_before_the_loop_fire_without_any_connection(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """pyftpdlib's loop first polls without a timeout: a worker that got no
    connection never pushed its metrics (one worker missing from /metrics)."""
    import threading

    from ftps_gateway import config as config_module
    from ftps_gateway.policy.passwords import PasswordVerifier
    from ftps_gateway.service.server import GatewayServer
    from support.configs import write_config
    from support.credentials import FAST_PARAMETERS

    cfg = config_module.load(write_config(tmp_path, cert_files))
    server = GatewayServer(cfg, verifier=PasswordVerifier(parameters=FAST_PARAMETERS))
    fired = threading.Event()
    server.ioloop.call_later(0.1, fired.set)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert fired.wait(5)
    finally:
        server.stop()
        thread.join(10)
