"""Passive ports held per user and per client address: capped, so no account (or
address) can hold every port of a small range; check-config sizes the range."""

from __future__ import annotations

import ftplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ftps_gateway.ftp import replies
from support.configs import write_config
from support.credentials import PASSWORD_HASH
from support.gateway import RunningGateway
from support.process import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

StartGateway = Callable[..., RunningGateway]
TWO_USERS = (
    f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
    f'[[users]]\nname = "globex"\npassword = "{PASSWORD_HASH}"\n'
)


def _pasv(ftp: ftplib.FTP) -> str:
    try:
        return ftp.sendcmd("EPSV")
    except ftplib.error_temp as err:
        return str(err)


def _pasv_eventually(ftp: ftplib.FTP) -> str:
    """EPSV until it is not refused (a closing session frees its port a moment
    after its 221 is out)."""
    deadline = time.monotonic() + 30
    while (answer := _pasv(ftp)).startswith("425") and time.monotonic() < deadline:
        time.sleep(0.1)
    return answer


def test_one_account_cannot_hold_every_port_of_a_small_range(
    start_gateway: StartGateway,
) -> None:
    """4 ports, default cap 50%: acme's 3rd waiting PASV gets 425, globex still
    gets a port (from another address: the address cap is not what stops acme)."""
    gw = start_gateway(passive_ports="44100-44103", users=TWO_USERS)
    sessions = [gw.client() for _ in range(3)]
    answers = [_pasv(ftp) for ftp in sessions]
    assert [a[:3] for a in answers] == ["229", "229", "425"]
    assert answers[2] == replies.PASSIVE_LIMITS["passive-limit-per-user"]
    other = gw.client(user="globex", source_ip="127.0.0.2")
    assert _pasv(other).startswith("229")
    # A session's new PASV replaces its own port: it never counts twice.
    assert _pasv(sessions[0]).startswith("229")
    sessions[1].quit()  # gives its port back (once the server has closed it)
    assert _pasv_eventually(sessions[2]).startswith("229")
    for ftp in (sessions[0], sessions[2], other):
        ftp.quit()


def test_one_address_cannot_hold_every_port_of_a_small_range(
    start_gateway: StartGateway,
) -> None:
    """Two accounts from one address share the address's cap."""
    gw = start_gateway(passive_ports="44100-44103", users=TWO_USERS)
    acme = [gw.client() for _ in range(2)]
    assert [_pasv(ftp)[:3] for ftp in acme] == ["229", "229"]
    globex = gw.client(user="globex")
    assert _pasv(globex) == replies.PASSIVE_LIMITS["passive-limit-per-ip"]
    elsewhere = gw.client(user="globex", source_ip="127.0.0.2")
    assert _pasv(elsewhere).startswith("229")
    for ftp in (*acme, globex, elsewhere):
        ftp.quit()


def test_caps_are_configurable(start_gateway: StartGateway) -> None:
    """100% turns the per-user cap off (the range is then the only limit)."""
    gw = start_gateway(
        passive_ports="44100-44103",
        extra="max_ports_per_user_percent = 100\nmax_ports_per_ip_percent = 100",
    )
    sessions = [gw.client() for _ in range(4)]
    assert [_pasv(ftp)[:3] for ftp in sessions] == ["229"] * 4
    for ftp in sessions:
        ftp.quit()


def test_a_worker_borrows_a_port_of_another_share_before_answering_425(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """2 workers, 4 ports (2 per worker): 3 sessions on one worker all get a port,
    the 5th port-holding session anywhere gets 425 (the kernel arbitrates: only one
    process can listen on a port)."""
    path = write_config(
        tmp_path, cert_files, passive_ports="44160-44163",
        extra="max_ports_per_user_percent = 100\nmax_ports_per_ip_percent = 100",
        server_extra="workers = 2\nlogin_timeout_seconds = 30\n"
        "max_sessions_per_ip = 64\nmax_sessions_per_user = 64",
    )  # fmt: skip
    cluster = GatewayProcess(path, cert_files[2], workers=2)
    opened: list[ftplib.FTP_TLS] = []
    try:
        by_worker: dict[str, list[ftplib.FTP_TLS]] = {}
        while max((len(s) for s in by_worker.values()), default=0) < 3:
            assert len(opened) < 40, "the kernel never put 3 sessions on one worker"
            ftp = cluster.client()
            opened.append(ftp)
            by_worker.setdefault(_worker(ftp), []).append(ftp)
        busy = next(s for s in by_worker.values() if len(s) >= 3)[:3]
        ports = [_pasv(ftp) for ftp in busy]
        assert [p[:3] for p in ports] == ["229"] * 3, ports
        rest = [ftp for ftp in opened if ftp not in busy]
        if not rest:
            rest.append(cluster.client())
            opened.append(rest[0])
        assert _pasv(rest[0]).startswith("229")  # the 4th port
        fifth = cluster.client()
        opened.append(fifth)
        assert _pasv(fifth) == replies.PASSIVE_EXHAUSTED
    finally:
        for ftp in opened:
            ftp.close()
        assert cluster.stop() == 0, "".join(cluster.stderr)


def _worker(ftp: ftplib.FTP) -> str:
    reply = ftp.sendcmd("SITE DIAG")
    facts = dict(line.strip().split(": ", 1) for line in reply.splitlines()[1:-1])
    return facts["worker"]
