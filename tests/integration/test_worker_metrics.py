"""One ``/metrics`` for two worker processes, read from prometheus-client's
multiprocess files (decision 0012): whole from the first scrape, exact at once, and
a killed worker's counts kept.

The server runs as a real process tree (``ftps-gateway serve``, workers = 2); its
metrics folder is put under the test's ``RUNTIME_DIRECTORY`` so the test can look.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.configs import write_config
from support.credentials import PASSWORD
from support.metrics import scrape
from support.process import GatewayProcess, connection_owner

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PORTS = "41600-41639"  # 40 ports, 20 per worker
PAYLOAD = b"w" * 1000
P = "ftps_gateway_"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _config(tmp_path: Path, cert_files: tuple[Path, Path, Path]) -> Path:
    return write_config(
        tmp_path,
        cert_files,
        passive_ports=PORTS,
        extra="connect_timeout_seconds = 120",  # EPSV listeners stay for the scrape
        server_extra=(
            "workers = 2\nlogin_timeout_seconds = 20\nmax_sessions_per_ip = 50\n"
            "max_sessions_per_user = 50"
        ),
        sections='[metrics]\nlisten = "127.0.0.1:0"',
    )


class Workers(GatewayProcess):
    """``ftps-gateway serve`` with two workers and its metrics folder under ``run``."""

    def __init__(self, config: Path, ca_file: Path, run: Path) -> None:
        run.mkdir()
        self.run = run
        super().__init__(
            config, ca_file, workers=2, env={"RUNTIME_DIRECTORY": str(run)}
        )

    def folder(self) -> Path:
        """This supervisor's metrics folder."""
        (folder,) = self.run.glob("metrics-*")
        return folder

    def session(self, index: int, on: int | None = None) -> tuple[ReusingFTP_TLS, int]:
        """A logged-in session from 127.0.2.``index`` and the PID of its worker.

        ``on``: the worker that must take it (the others are stopped meanwhile, so
        only it can accept; the kernel's own spread is not certain).
        """
        others = [pid for pid in self.pids()[1:] if on is not None and pid != on]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            ftp = ReusingFTP_TLS(
                context=ssl.create_default_context(cafile=str(self.ca_file)),
                timeout=30,
            )
            ftp.connect("127.0.0.1", self.port, source_address=(f"127.0.2.{index}", 0))
            ftp.login("acme", PASSWORD)
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)
        ftp.prot_p()
        owner = connection_owner(self.pids()[1:], ftp.sock.getsockname(), self.port)
        assert on is None or owner == on
        return ftp, owner


@pytest.fixture
def workers(tmp_path: Path, cert_files: tuple[Path, Path, Path]) -> Iterator[Workers]:
    running = Workers(_config(tmp_path, cert_files), cert_files[2], tmp_path / "run")
    yield running
    code = running.stop()
    assert not any("Traceback" in line for line in running.stderr), running.stderr
    assert code == 0, "".join(running.stderr)
    assert not list(running.run.iterdir()), "the metrics folder outlived the server"


def _spread(workers: Workers, count: int) -> list[tuple[ReusingFTP_TLS, int]]:
    """``count`` sessions, taken by the two workers in turn."""
    pids = workers.pids()[1:]
    assert len(pids) == 2
    return [workers.session(index + 1, on=pids[index % 2]) for index in range(count)]


def _families(text: str) -> dict[str, tuple[str, str, set[tuple[str, tuple]]]]:
    """name -> (type, help, sample keys) of an exposition."""
    return {
        family.name: (
            family.type,
            family.documentation,
            {(s.name, tuple(sorted(s.labels.items()))) for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
    }


def _single_process_families() -> dict[str, tuple[str, str, set[tuple[str, tuple]]]]:
    """What one gateway process exposes (its scrape-time sources set as the server
    sets them), without process_* series."""
    reference = GatewayMetrics(process_metrics=False, node=socket.gethostname())
    reference.track_passive_ports(lambda: (0, 40))
    reference.track_bans(lambda: 0)
    reference.track_login_queue(lambda: 0)
    reference.track_certificate_expiry(0.0)
    reference.track_hooks(lambda: (0, 0.0))
    return _families(reference.render()[0].decode())


def _assert_every_series(text: str) -> None:
    scraped = _families(text)
    for name, (kind, text_help, keys) in _single_process_families().items():
        assert name in scraped, f"{name} missing"
        assert scraped[name][:2] == (kind, text_help), name
        missing = keys - scraped[name][2]
        assert not missing, f"{name}: {sorted(missing)[:3]}"


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_a_scrape_right_after_start_shows_every_series(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """The first scrape, as soon as the endpoint answers (workers perhaps still
    starting), has every series a single process has, with the same help texts;
    and once the workers serve, too. The folder goes with the server."""
    run = tmp_path / "run"
    run.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "ftps_gateway", "serve", "--config",
         str(_config(tmp_path, cert_files))],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUNTIME_DIRECTORY": str(run)},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"serving /metrics.* on [^ ]+:(\d+)", line)
            if match:
                port = int(match[1])
                break
        else:
            pytest.fail("".join(lines))
        _assert_every_series(_get(port))
        listening = 0
        for line in process.stderr:
            lines.append(line)
            listening += "listening for explicit FTPS" in line
            if listening == 2:
                break
        _assert_every_series(_get(port))
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=60)[1]  # reads to the end, closes
    assert process.returncode == 0, "".join(lines) + rest
    assert not list(run.iterdir()), "the metrics folder outlived the server"


def test_counts_from_both_workers_add_up_at_once(workers: Workers) -> None:
    """Sessions spread over both workers: the first scrape after them has exact
    totals (no push to wait for); the owner-read gauges (passive ports held by EPSV)
    follow within PUBLISH_SECONDS."""
    assert stat.S_IMODE(workers.folder().stat().st_mode) == 0o700  # private
    sessions = _spread(workers, 6)
    count = len(sessions)
    for index, (ftp, _) in enumerate(sessions):
        ftp.storbinary(f"STOR w{index}.bin", io.BytesIO(PAYLOAD))
        ftp.sendcmd("EPSV")  # a passive listener, held until a client connects
    samples = scrape(workers.metrics_port)  # at once: no push to wait for

    def value(name: str, **labels: str) -> float:
        return samples[(f"{P}{name}", tuple(sorted(labels.items())))]

    assert value("logins_total", result="ok") == count
    assert value("transfers_total", direction="upload", result="ok") == count
    assert value("transfer_bytes_total", direction="upload") == count * len(PAYLOAD)
    assert value("tls_handshakes_total", channel="control", version="TLSv1.3",
                 resumed="false") == count  # fmt: skip
    assert value("transfer_duration_seconds_count", direction="upload") == count
    assert value("sessions_active") == count
    _wait_for(workers, (f"{P}passive_ports_in_use", ()), count)
    _wait_for(workers, (f"{P}passive_ports_free", ()), 40 - count)
    for ftp, _ in sessions:
        ftp.quit()
    deadline = time.monotonic() + 30
    while scrape(workers.metrics_port)[(f"{P}sessions_active", ())] != 0:
        assert time.monotonic() < deadline, "sessions still counted as active"
        time.sleep(0.1)
    samples = scrape(workers.metrics_port)
    assert value("sessions_total", result="ok") == count
    _wait_for(workers, (f"{P}passive_ports_free", ()), 40)


def _wait_for(workers: Workers, key: tuple[str, tuple[tuple[str, str], ...]],
              wanted: float) -> None:  # fmt: skip
    deadline = time.monotonic() + 30
    while (found := scrape(workers.metrics_port).get(key)) != wanted:
        assert time.monotonic() < deadline, f"{key}: {found}, not {wanted}"
        time.sleep(0.1)


def test_a_killed_worker_keeps_its_counts_and_loses_its_gauges(
    workers: Workers,
) -> None:
    """kill -9 of a worker, twice: no scrape shows a counter going backwards, its
    open sessions leave sessions_active, and its files are folded (none left under
    its PID, one file of dead workers' counts)."""
    logins = (f"{P}logins_total", (("result", "ok"),))
    uploads = (f"{P}transfers_total", (("direction", "upload"), ("result", "ok")))
    active = (f"{P}sessions_active", ())
    total = 0
    for round_number in (1, 2):
        _wait_for(workers, active, 0)  # the last round's sessions have closed
        sessions = _spread(workers, 4)
        for index, (ftp, _) in enumerate(sessions):
            ftp.storbinary(f"STOR k{round_number}-{index}.bin", io.BytesIO(PAYLOAD))
        total += len(sessions)
        victim = sessions[0][1]
        survivors = [ftp for ftp, owner in sessions if owner != victim]
        before = scrape(workers.metrics_port)
        assert before[logins] == before[uploads] == total
        assert before[active] == len(sessions)
        os.kill(victim, signal.SIGKILL)
        restarted = 2 + round_number
        while (
            sum("listening for explicit FTPS" in x for x in workers.stderr) < restarted
        ):
            during = scrape(workers.metrics_port)  # dead, folded, restarting...
            assert during[logins] == during[uploads] == total
            time.sleep(0.05)
        after = scrape(workers.metrics_port)
        assert after[logins] == after[uploads] == total  # never backwards
        assert after[active] == len(survivors)
        names = sorted(path.name for path in workers.folder().glob("*.db"))
        assert not [name for name in names if f"_{victim}." in name], names
        assert sum(name.startswith("counter_") for name in names) == 3, names
        assert "counter_gone.db" in names
        assert "histogram_gone.db" in names
        for ftp in survivors:
            ftp.quit()
        for ftp, owner in sessions:
            if owner == victim:
                ftp.close()
    ftp, _ = workers.session(99)
    ftp.quit()
    assert scrape(workers.metrics_port)[logins] == total + 1
