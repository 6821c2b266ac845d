"""A real ``redis-server`` for the cluster tests: a Unix socket in a temporary folder.

Debian's ``redis-server`` package (scripts/test.sh installs it); tests that need it
skip when it is missing, with the reason. ``stop``/``start`` take the same server
away and bring it back on the same socket (what "Redis restarted" looks like to a
node: its data is gone, as with ``save ""``), and a TLS listener can be added with a
certificate from the test CA. No Python client here: the tests talk to the server
the way the gateway does, or with ``redis-cli``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT_SECONDS = 20


def redis_server_binary() -> str:
    """The path of ``redis-server``, or skip the test."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    return binary


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server`` on ``<directory>/redis.sock``, nothing persisted."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """Start it.

        Args:
            password: ``requirepass``.
            tls: (certificate chain, key, CA) for a TLS listener on ``tls_port``.
        """
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.password = password
        self.tls = tls
        self.tls_port = free_port() if tls is not None else 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``unix://`` URL of the socket (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}"

    @property
    def tls_url(self) -> str:
        """``rediss://`` URL of the TLS listener."""
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/0"

    def start(self) -> None:
        """Start (again) on the same socket; wait until it answers."""
        command = [
            redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket),
            "--unixsocketperm", "700", "--dir", str(self.directory), "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls is not None:
            chain, key, ca = self.tls
            command += [
                "--tls-port", str(self.tls_port), "--tls-cert-file", str(chain),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise AssertionError(f"redis-server did not start: {log}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.settimeout(1)
                probe.connect(str(self.socket))
                probe.sendall(b"PING\r\n")
                reply = probe.recv(64)
            except OSError:
                return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        """Kill it (SIGKILL: as abrupt as a crash); everything in it is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def cli(self, *args: str) -> str:
        """``redis-cli`` against the socket; its output."""
        command = ["redis-cli", "-s", str(self.socket)]
        if self.password:
            command += ["--no-auth-warning", "-a", self.password]
        done = subprocess.run(
            [*command, *args], capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()
