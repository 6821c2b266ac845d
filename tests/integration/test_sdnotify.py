"""systemd's Type=notify: READY=1 once serving, RELOADING=1/READY=1, STOPPING=1."""

from __future__ import annotations

import signal
import socket
from typing import TYPE_CHECKING

import pytest

from support.configs import write_config
from support.process import GatewayProcess
from support.sdnotify import notify_messages

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], workers: int
) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(30)
        config = write_config(
            tmp_path, cert_files, passive_ports="41600-41619",
            server_extra=f"workers = {workers}",
        )  # fmt: skip
        server = GatewayProcess(
            config, cert_files[2], workers=workers,
            env={"NOTIFY_SOCKET": str(notify_path)},
        )  # fmt: skip
        try:
            ready = notify_messages(sock, "READY=1")
            assert any("STATUS=serving" in message for message in ready)
            server.process.send_signal(signal.SIGHUP)
            reload = notify_messages(sock, "READY=1")
            assert "RELOADING=1" in reload[0]
            assert "MONOTONIC_USEC=" in reload[0]
            assert "STATUS=reloaded" in reload[-1]
            server.process.send_signal(signal.SIGTERM)
            assert any("STOPPING=1" in m for m in notify_messages(sock, "STOPPING=1"))
        finally:
            assert server.stop() == 0
