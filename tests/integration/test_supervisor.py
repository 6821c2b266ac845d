"""The supervisor does what it shares with a single process the same way.

Reload (same audit line, same word to systemd) and start-up errors (one line).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ftps_gateway import cli
from support.configs import write_config
from support.process import GatewayProcess
from support.sdnotify import notify_messages

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_refused_reload_through_the_cli_with_workers(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ftps-gateway reload`` to a supervisor: refused once, systemd told, no worker asked."""
    with (
        tempfile.TemporaryDirectory() as short,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd,
    ):
        notify_path = Path(short) / "notify"
        systemd.bind(str(notify_path))
        systemd.settimeout(30)
        config = write_config(
            tmp_path,
            cert_files,
            passive_ports="41640-41659",
            server_extra="workers = 2",
        )
        server = GatewayProcess(
            config, cert_files[2], workers=2, env={"NOTIFY_SOCKET": str(notify_path)}
        )
        try:
            notify_messages(systemd, "READY=1")
            text = config.read_text(encoding="utf-8")
            config.write_text(
                text.replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:1"]'),
                encoding="utf-8",
            )
            assert cli.main(["reload", "--config", str(config)]) == cli.EXIT_CONFIG
            problem = "server.listen: changed; this takes effect only on restart"
            assert problem in capsys.readouterr().err
            reload = notify_messages(systemd, "READY=1")
            assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert reload[-1] == "READY=1\nSTATUS=reload refused"
            [refused] = server.wait_for("config_reload")
            assert refused["result"] == "refused"
            assert refused["problems"] == [problem]
            server.wait_for_stderr(f"reload refused: {problem}\n")
        finally:
            assert server.stop() == 0
        # The workers never saw the refused config: only the supervisor's line.
        assert len(server.events("config_reload")) == 1
        assert server.tracebacks() == []


def test_busy_listen_address_is_one_line_not_a_traceback(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """With workers, a port in use stops the start with the key, as without them."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(
            tmp_path, cert_files, passive_ports="1030-1049", server_extra="workers = 2"
        )
        text = config.read_text(encoding="utf-8")
        config.write_text(
            text.replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]'),
            encoding="utf-8",
        )
        done = subprocess.run(
            [sys.executable, "-m", "ftps_gateway", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == cli.EXIT_FAILURE
    assert done.stderr == (
        f"cannot start: server.listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )
