"""Several worker processes behave as one gateway (``ftps-gateway serve``, workers=2).

The server runs as a real process tree (supervisor + two workers), so these tests
see what production sees: connections spread by the kernel, limits and bans held
by the supervisor, passive ports split between workers, one /metrics.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import os
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.configs import admin_socket_path, write_config
from support.control import raw_connect, read_until_quiet
from support.credentials import PASSWORD
from support.metrics import scrape
from support.process import GatewayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PORTS = "41500-41539"


class Cluster(GatewayProcess):
    """``ftps-gateway serve`` with two workers, its audit lines collected."""

    def __init__(self, config_path: Path, ca_file: Path) -> None:
        super().__init__(config_path, ca_file, workers=2)

    def client(self, source_ip: str = "127.0.0.1") -> ReusingFTP_TLS:
        ftp = ReusingFTP_TLS(
            context=ssl.create_default_context(cafile=str(self.ca_file)), timeout=10
        )
        ftp.connect("127.0.0.1", self.port, source_address=(source_ip, 0))
        return ftp

    def diag(self, ftp: ftplib.FTP) -> dict[str, str]:
        reply = ftp.sendcmd("SITE DIAG")
        return dict(line.strip().split(": ", 1) for line in reply.splitlines()[1:-1])

    def workers(self) -> list[int]:
        """PIDs of the worker processes."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


@pytest.fixture
def cluster(tmp_path: Path, cert_files: tuple[Path, Path, Path]) -> Iterator[Cluster]:
    path = write_config(
        tmp_path,
        cert_files,
        passive_ports=PORTS,
        server_extra=(
            "workers = 2\nlogin_timeout_seconds = 20\nmax_sessions_per_ip = 3\n"
            "max_sessions_per_user = 4\nshutdown_grace_seconds = 20"
        ),
        sections=(
            '[metrics]\nlisten = "127.0.0.1:0"\n'
            "[defender]\nmax_failures = 2\nban_seconds = 600\n"
            f'[admin]\nsocket = "{admin_socket_path(tmp_path)}"'
        ),
    )
    running = Cluster(path, cert_files[2])
    yield running
    code = running.stop()
    assert not any("Traceback" in line for line in running.stderr), running.stderr
    assert code == 0, "".join(running.stderr)


def _greeting(cluster: Cluster, source_ip: str = "127.0.0.1") -> bytes:
    """What a new connection hears before the server closes it (or stays quiet)."""
    sock = raw_connect(("127.0.0.1", cluster.port), source_ip)
    try:
        return read_until_quiet(sock, 3.0)
    finally:
        sock.close()


def _sessions_on_both_workers(cluster: Cluster, count: int) -> list[ReusingFTP_TLS]:
    """Log in ``count`` sessions from different addresses; they spread over workers."""
    sessions = []
    for index in range(count):
        ftp = cluster.client(source_ip=f"127.0.1.{index + 1}")
        ftp.login("acme", PASSWORD)
        ftp.prot_p()
        sessions.append(ftp)
    return sessions


def test_passive_ports_are_disjoint_between_workers(cluster: Cluster) -> None:
    sessions = _sessions_on_both_workers(cluster, 4)
    ports: dict[str, set[int]] = {}
    for ftp in sessions:
        worker = cluster.diag(ftp)["worker"]
        for _ in range(5):
            port = int(ftp.sendcmd("EPSV").split("|")[-2])
            ports.setdefault(worker, set()).add(port)
    for ftp in sessions:
        ftp.close()
    low = int(PORTS.split("-", maxsplit=1)[0])
    for worker, used in ports.items():
        index = int(worker.split()[0]) - 1
        assert all((port - low) % 2 == index for port in used), (worker, used)
    if len(ports) == 2:  # the kernel spread the sessions (likely, not certain)
        first, second = ports.values()
        assert not first & second


def test_per_address_limit_holds_across_workers(cluster: Cluster) -> None:
    held = [cluster.client() for _ in range(3)]
    for ftp in held:
        ftp.login("acme", PASSWORD)
    assert _greeting(cluster).startswith(replies.LIMIT_REPLIES["limit-per-ip"].encode())
    for ftp in held:
        ftp.quit()
    time.sleep(0.5)
    again = cluster.client()
    again.login("acme", PASSWORD)
    again.quit()


def test_ban_earned_on_one_worker_holds_on_all(cluster: Cluster) -> None:
    for _ in range(2):
        ftp = cluster.client(source_ip="127.0.0.9")
        with pytest.raises(ftplib.error_perm):
            ftp.login("acme", "wrong")
        ftp.close()
    # Every new connection from that address is dropped, whichever worker takes it.
    for _ in range(6):
        assert _greeting(cluster, "127.0.0.9") == b""
    ok = cluster.client(source_ip="127.0.0.10")
    ok.login("acme", PASSWORD)
    ok.quit()


def test_one_metrics_endpoint_adds_the_workers_up(cluster: Cluster) -> None:
    sessions = _sessions_on_both_workers(cluster, 4)
    workers = {cluster.diag(ftp)["worker"] for ftp in sessions}
    for index, ftp in enumerate(sessions):
        ftp.storbinary(f"STOR m{index}.bin", io.BytesIO(b"m" * 1000))
        ftp.quit()
    metrics_port = cluster.metrics_port
    uploads_key = (
        "ftps_gateway_transfers_total",
        (("direction", "upload"), ("result", "ok")),
    )
    deadline = time.monotonic() + 20
    while True:  # workers push every 2 s; wait for the pushes after the last upload
        samples = scrape(metrics_port)
        logins = samples.get(("ftps_gateway_logins_total", (("result", "ok"),)), 0)
        both = samples.get(("ftps_gateway_passive_ports_free", ()), 0) == 40
        if (both and samples.get(uploads_key, 0) >= 4) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert logins == 4, f"sessions were on {workers}"
    free = samples.get(("ftps_gateway_passive_ports_free", ()))
    assert free == 40, f"{free}: {''.join(cluster.stderr)}"
    assert samples[("ftps_gateway_transfers_total",
                    (("direction", "upload"), ("result", "ok")))] == 4  # fmt: skip
    assert samples[
        ("ftps_gateway_transfer_bytes_total", (("direction", "upload"),))
    ] == (4000)
    free = samples[("ftps_gateway_passive_ports_free", ())]
    assert free == 40  # both shares together: the whole range
    assert samples[("ftps_gateway_bans_active", ())] == 0


def test_a_dead_worker_is_restarted_and_its_slots_released(cluster: Cluster) -> None:
    held = [cluster.client() for _ in range(3)]  # the per-address limit is 3
    for ftp in held:
        ftp.login("acme", PASSWORD)
    victim = cluster.workers()[0]
    os.kill(victim, signal.SIGKILL)
    for ftp in held:
        ftp.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        workers = cluster.workers()
        if len(workers) == 2 and victim not in workers:
            break
        time.sleep(0.2)
    assert len(cluster.workers()) == 2
    time.sleep(3)  # the restarted worker is listening
    # Three new sessions from the same address: the dead worker's slots were freed.
    again = [cluster.client() for _ in range(3)]
    for ftp in again:
        ftp.login("acme", PASSWORD)
        ftp.quit()
    assert [e["worker"] for e in cluster.events("worker_restart")]


def test_sigterm_drains_every_worker_while_a_download_finishes(
    cluster: Cluster,
) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    ftp = cluster.client()
    ftp.login("acme", PASSWORD)
    ftp.prot_p()
    ftp.storbinary("STOR big.bin", io.BytesIO(payload))
    ftp.voidcmd("TYPE I")
    conn, _ = ftp.ntransfercmd("RETR big.bin")
    received = bytearray(conn.recv(65536))
    cluster.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert _greeting(cluster).startswith(replies.LIMIT_REPLIES["draining"].encode())
    while chunk := conn.recv(1 << 20):
        received += chunk
    conn.unwrap()
    conn.close()
    ftp.voidresp()
    ftp.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert cluster.process.wait(30) == 0
