"""Small client-side helpers shared by the integration tests."""

from __future__ import annotations

import ftplib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import RunningGateway


def plain_control(gw: RunningGateway) -> ftplib.FTP:
    """A control connection that has not sent AUTH TLS."""
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(gw.host, gw.port)
    return ftp


def tls_only(gw: RunningGateway) -> ftplib.FTP_TLS:
    """A control connection after AUTH TLS, not logged in."""
    ftp = gw.client(login=False)
    ftp.auth()
    return ftp


def read_until_quiet(sock: socket.socket, seconds: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or resets) or stays silent."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def raw_connect(
    address: tuple[str, int], source_ip: str = "127.0.0.1"
) -> socket.socket:
    """A plain TCP connection from ``source_ip``."""
    return socket.create_connection(address, timeout=5, source_address=(source_ip, 0))


class ServeProcess:
    """``ftps-gateway serve --config`` as a real process tree, its output collected.

    Audit lines (stdout) are parsed into a queue; stderr is kept. The constructor
    returns once ``listeners`` processes logged their explicit listener (one per
    worker), so the server accepts sessions.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        listeners: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ftps_gateway", "serve", "--config",
             str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.audit: queue.Queue[dict[str, object]] = queue.Queue()
        self.stderr: list[str] = []
        self.metrics_port = 0
        self._wanted = listeners
        self._seen = 0
        self._ready: queue.Queue[int] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        try:
            self.port = self._ready.get(timeout=30)
        except queue.Empty:
            self.stop()
            raise AssertionError(
                "server did not start:\n" + "".join(self.stderr)
            ) from None

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.audit.put(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            metrics = re.search(r"serving /metrics.* on [^ ]+:(\d+)", line)
            if metrics:
                self.metrics_port = int(metrics[1])
            match = re.search(r"listening for explicit FTPS on [^ ]+:(\d+)", line)
            if match:
                self._seen += 1
                if self._seen == self._wanted:
                    self._ready.put(int(match[1]))

    def wait_for(self, event: str, timeout: float = 10) -> dict[str, object]:
        """The next audit record called ``event`` (earlier others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.audit.get(timeout=max(0.01, deadline - time.monotonic()))
            if record["event"] == event:
                return record

    def events(self, name: str) -> list[dict[str, object]]:
        """Every audit record called ``name`` received so far (others are dropped)."""
        found = []
        while True:
            try:
                record = self.audit.get_nowait()
            except queue.Empty:
                return found
            if record["event"] == name:
                found.append(record)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (a drain), wait, close the pipes; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for reader in self._readers:
                reader.join(5)
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()
        return code


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``http://127.0.0.1:PORT/metrics``, keyed by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
