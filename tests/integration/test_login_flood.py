"""A login flood from 64 addresses against a real server with production argon2id.

Issue 14, item 1: each PASS used to go to an unbounded password pool and failures were
scored only when verified, so about 25 addresses pushed every partner's login past
the 30 s login timeout. Here 64 loopback addresses (127.0.0.2-65) keep four
connections each guessing, while a partner logs in: the flood's attempts past the
login queue's bounds get 421, every attacking address ends up banned, and the
partner's uncached login completes. Its time is printed, never asserted (the machine
is shared): the issue's figure to beat is 2 s on a 2-core machine.
"""

from __future__ import annotations

import ftplib
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from ftps_gateway.policy.passwords import hash_password
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.service import server as server_module
from ftps_gateway.storage.uploads import sweep_partials
from support import loginflood
from support.configs import write_config
from support.credentials import PASSWORD
from support.gateway import RunningGateway
from support.metrics import scrape
from support.process import GatewayProcess

pytestmark = [pytest.mark.integration]

ATTACKERS = [f"127.0.0.{n}" for n in range(2, 66)]
PARTNER = "127.0.0.1"  # logged in before the flood: a partner the server knows
STRANGER = "127.0.1.1"  # a partner address the server never saw
# Three failures to a ban (default: 5) keeps the test short, and 64 x 3 attempts
# still overflow the queue's 128 places: the flood hears both 421s.
MAX_FAILURES = 3


def _production_config(
    directory: Path, cert_files: tuple[Path, Path, Path], extra: str = ""
) -> Path:
    """One worker, production argon2id, no login cache, room for every connection."""
    users = f'[[users]]\nname = "acme"\npassword = "{hash_password(PASSWORD)}"\n'
    return write_config(
        directory,
        cert_files,
        users=users,
        server_extra=(
            "workers = 1\nlogin_timeout_seconds = 30\nlogin_cache_seconds = 0\n"
            "max_sessions = 4096\n"
            # Room for every flood connection before login too: this test counts the
            # login queue's refusals, which an eviction from a full pre-login pool
            # (test_admission covers it) would replace by its own 421.
            "max_unauthenticated = 4096\nmax_unauthenticated_per_ip = 4096\n" + extra
        ),
        sections=(
            f"[defender]\nmax_failures = {MAX_FAILURES}\nwindow_seconds = 600\n"
            '[metrics]\nlisten = "127.0.0.1:0"\n'
        ),
    )


def _seconds(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["ts"])).timestamp()


def _verified_meanwhile(
    records: list[dict[str, object]], ip: str, login: loginflood.Login
) -> int | None:
    """Verifications that ended while ``ip``'s timed login waited: a figure the
    machine's load does not change (each costs ~0.15 s on an idle 2-core machine)."""
    ok = [r for r in records if r["event"] == "login_ok" and r["client_ip"] == ip]
    if login.seconds is None or not ok:
        return None
    end = _seconds(ok[-1])
    start = end - login.seconds
    return sum(
        1
        for r in records
        if r["event"] == "login_failed"
        and r["reason"] == "bad-password"
        and start <= _seconds(r) <= end
    )


def _print(report: loginflood.Report, records: list[dict[str, object]]) -> None:
    for name, ip, login in (
        ("partner, before the flood", None, report.baseline),
        ("partner (known address), during the flood", PARTNER, report.partner),
        ("partner (new address), during the flood", STRANGER, report.fresh),
    ):
        if login is not None:
            took = f"{login.seconds:.2f} s" if login.seconds is not None else "-"
            ahead = (
                ""
                if ip is None
                else (
                    f", {_verified_meanwhile(records, ip, login)} attackers' "
                    "verifications ended meanwhile"
                )
            )
            print(f"uncached login, {name}: {took} ({login.reply}){ahead}")
    print(f"flood replies: {report.replies}")
    print(f"banned {len(report.banned)} addresses in {report.flood_seconds:.1f} s")


@pytest.mark.timeout(400)
def test_login_flood_from_64_addresses(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Past the queue's bounds the flood hears 421, every attacker is banned, and a
    partner's uncached login completes meanwhile (its time is printed)."""
    config = _production_config(tmp_path, cert_files)
    server = GatewayProcess(config, cert_files[2], workers=1)
    try:
        report = loginflood.flood(
            loginflood.Plan(
                host="127.0.0.1",
                port=server.port,
                sources=ATTACKERS,
                per_source=4,
                user="acme",
                wrong_password="not the password",
                password=PASSWORD,
                partner_source=PARTNER,
                fresh_source=STRANGER,
                seconds=300,
                partner_after=2.0,
            )
        )
        samples = scrape(server.metrics_port)
    finally:
        server.stop()
    _print(report, server.records)
    assert report.partner is not None
    assert report.partner.reply.startswith("230"), report.partner
    queue_full = report.replies.get("421 login-queue-full", 0)
    address_full = report.replies.get("421 login-queue-address", 0)
    assert queue_full > 0, report.replies
    assert address_full > 0, report.replies
    assert report.banned == sorted(ATTACKERS), report.replies
    bans = {record["banned_ip"] for record in server.events("ban")}
    assert bans == set(ATTACKERS)
    refused = [
        record["reason"]
        for record in server.events("login_failed")
        if str(record["reason"]).startswith("login-queue")
    ]
    assert refused.count("login-queue-full") == queue_full
    assert refused.count("login-queue-address") == address_full
    for reason, count in (
        ("login-queue-full", queue_full),
        ("login-queue-address", address_full),
    ):
        key = ("ftps_gateway_sessions_refused_total", (("reason", reason),))
        assert samples[key] == count
    assert samples[("ftps_gateway_logins_total", (("result", "queue-full"),))] == (
        queue_full + address_full
    )
    assert ("ftps_gateway_login_queue_waiting", ()) in samples
    assert not server.tracebacks()


def test_partial_sweep_never_runs_on_the_password_threads(
    monkeypatch: pytest.MonkeyPatch, start_gateway: Callable[..., RunningGateway]
) -> None:
    """The start-up sweep of partial uploads runs on the file-work pool: a long walk
    there cannot delay logins (issue 14 found it on the password pool)."""
    threads: list[str] = []

    def sweep(roots: list[Path], retention: int) -> int:
        threads.append(threading.current_thread().name)
        return sweep_partials(roots, retention)

    monkeypatch.setattr(server_module, "sweep_partials", sweep)
    gateway = start_gateway()
    deadline = time.monotonic() + 30
    while not threads:
        assert time.monotonic() < deadline, "the start-up sweep never ran"
        time.sleep(0.05)
    assert threads[0].startswith("file-work"), threads
    assert not hasattr(gateway.server.gateway, "executor")
    # FileWork.shutdown does not join its threads; let them end before the
    # fixture's leak check (the same race makes other tests flaky on main).
    gateway.server.stop()
    while any(t.name.startswith("file-work") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "file-work threads outlived the server"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_parallel_cold_logins_of_one_partner_all_get_in(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """16 connections of one partner log in at once with nothing cached (a mirror
    tool's start, or the cache expired): more than the address's failure budget, yet
    all get 230, since attempts with the same credentials share one verification."""
    config = _production_config(tmp_path, cert_files, "max_sessions_per_user = 32")
    server = GatewayProcess(config, cert_files[2], workers=1)
    barrier = threading.Barrier(16)
    replies: list[str] = []

    def log_in() -> None:
        context = ssl.create_default_context(cafile=str(cert_files[2]))
        ftp = ReusingFTP_TLS(context=context, timeout=60)
        try:
            ftp.connect("127.0.0.1", server.port)
            ftp.auth()
            ftp.sendcmd("USER acme")
            barrier.wait(timeout=30)
            try:
                replies.append(ftp.sendcmd(f"PASS {PASSWORD}")[:3])
            except ftplib.Error as err:
                replies.append(str(err)[:3])
        finally:
            ftp.close()

    try:
        threads = [threading.Thread(target=log_in) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        logins = server.wait_for("login_ok", 16)
    finally:
        server.stop()
    assert replies == ["230"] * 16, replies
    assert len(logins) == 16
    assert not server.events("login_failed")
    assert not server.tracebacks()
