"""Hook events survive the gateway: kill -9 with events queued, and a SIGTERM drain.

The gateway runs as a real process tree (``ftps-gateway serve``, two workers): each
worker spools and delivers its own events. The receiver is down (503) while the
events queue, and up after the restart: every event must arrive, none lost.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftps_gateway import cli
from ftps_gateway.service.hookspool import SpoolAdmin
from support.configs import write_config
from support.hookreceiver import HookReceiver
from support.metrics import scrape
from support.process import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = b"durable-secret"


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    """A receiver that starts out down (503)."""
    server = HookReceiver(SECRET, status=503)
    yield server
    server.close()


def _config(tmp_path: Path, cert_files: tuple[Path, Path, Path], url: str) -> Path:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    hooks = (
        f'[[hooks]]\nname = "web"\nevents = ["upload"]\nurl = "{url}"\n'
        f'secret_file = "{secret}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    )
    return write_config(
        tmp_path, cert_files, passive_ports="43100-43199",
        server_extra="workers = 2\nlogin_timeout_seconds = 10",
        sections=hooks,
    )  # fmt: skip


def _upload_many(gateway: GatewayProcess, names: list[str]) -> None:
    """One session per file, so the kernel spreads them over both workers."""
    for name in names:
        ftp = gateway.client()
        ftp.storbinary(f"STOR {name}", io.BytesIO(name.encode()))
        ftp.quit()


def _wait_spooled(root: Path, count: int, timeout: float = 60) -> dict[str, object]:
    spool = SpoolAdmin(root)
    deadline = time.monotonic() + timeout
    while (listing := spool.listing())["queue_total"] < count:
        assert time.monotonic() < deadline, listing["queue_total"]
        time.sleep(0.1)
    return listing


def test_kill_9_with_events_queued_delivers_them_after_the_restart(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    receiver: HookReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Events spooled (fsync'ed) before kill -9 of every process reach the receiver
    after the restart; none is lost."""
    config = _config(tmp_path, cert_files, receiver.url())
    names = [f"file-{n:02d}.csv" for n in range(20)]
    gateway = GatewayProcess(config, cert_files[2], workers=2)
    try:
        _upload_many(gateway, names)
        listing = _wait_spooled(tmp_path / "storage/.ftps-gateway/hooks", len(names))
        folders = {item["folder"] for item in listing["queue"]}  # type: ignore[attr-defined]
        # hooks list answers from the supervisor's admin socket.
        capsys.readouterr()
        assert cli.main(["hooks", "list", "--json", "--config", str(config)]) == 0
        assert json.loads(capsys.readouterr().out)["queue_total"] == len(names)
        with capsys.disabled():
            print(f"\nspooled {len(names)} events in worker folders {sorted(folders)}")
        deadline = time.monotonic() + 30
        while True:  # the workers push their metrics every 2 s
            samples = scrape(gateway.metrics_port)
            if samples.get(("ftps_gateway_hook_events_queued", ())) == len(names):
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.2)
        assert samples[("ftps_gateway_hook_oldest_queued_age_seconds", ())] > 0
    finally:
        gateway.kill()
    assert not [d for d in receiver.deliveries if 200 <= d.status < 300]
    receiver.status = 204
    again = GatewayProcess(config, cert_files[2], workers=2)
    try:
        deadline = time.monotonic() + 120
        while {e["path"] for e in receiver.accepted()} != {f"/{n}" for n in names}:
            assert time.monotonic() < deadline, receiver.accepted()
            time.sleep(0.1)
        accepted = receiver.accepted()
        with capsys.disabled():
            print(
                f"after kill -9 and restart: {len(accepted)} deliveries of "
                f"{len({e['id'] for e in accepted})} events"
            )
    finally:
        assert again.stop() == 0
    assert again.tracebacks() == []


def test_sigterm_drain_hands_unsent_events_to_the_next_start(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], receiver: HookReceiver
) -> None:
    """SIGTERM right after the uploads: what was not delivered is on disk when the
    process exits, and the next start delivers it."""
    config = _config(tmp_path, cert_files, receiver.url())
    names = [f"drained-{n}.csv" for n in range(5)]
    gateway = GatewayProcess(config, cert_files[2], workers=2)
    try:
        _upload_many(gateway, names)
    finally:
        assert gateway.stop() == 0
    assert gateway.tracebacks() == []
    listing = SpoolAdmin(tmp_path / "storage/.ftps-gateway/hooks").listing()
    assert listing["queue_total"] == len(names)
    receiver.status = 204
    again = GatewayProcess(config, cert_files[2], workers=2)
    try:
        receiver.wait_for(len(names), timeout=60)
        assert {e["path"] for e in receiver.accepted()} == {f"/{n}" for n in names}
    finally:
        assert again.stop() == 0
    assert (
        SpoolAdmin(tmp_path / "storage/.ftps-gateway/hooks").listing()["queue_total"]
        == 0
    )
