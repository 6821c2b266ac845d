"""``ftps-gateway serve`` as a real process tree, for the fault and soak tests.

The server runs in its own process group (so a test can kill -9 all of it at once);
its audit lines (stdout) and diagnostics (stderr) are collected, and the supervisor's
and workers' resources are read from /proc. It runs ``python -m ftps_gateway`` with
the test interpreter, so it needs the package installed in the venv, not this
directory on ``sys.path``. Depends on ``support.credentials``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.credentials import PASSWORD

START_TIMEOUT_SECONDS = 60  # two fresh interpreters on a busy 2-core machine
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """What one process holds, from /proc."""

    rss_kib: int
    fds: int
    threads: int


class GatewayProcess:
    """``python -m ftps_gateway serve --config PATH``, waited for until it listens."""

    def __init__(
        self,
        config_path: Path,
        ca_file: Path,
        *,
        workers: int,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """Start the server; ``workers`` is how many "listening" lines to wait for."""
        self.ca_file = ca_file
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ftps_gateway", "serve", "--config",
             str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: kill -9 all of it
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.records: list[dict[str, object]] = []
        self.stderr: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self._listening = 0
        self._workers = workers
        self._ready = threading.Event()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if not self._ready.wait(START_TIMEOUT_SECONDS):
            self.kill()
            raise AssertionError("server did not start: " + "".join(self.stderr))

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.records.append(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            metrics = re.search(r"serving /metrics.* on [^ ]+:(\d+)", line)
            if metrics:
                self.metrics_port = int(metrics[1])
            match = re.search(r"listening for explicit FTPS on [^ ]+:(\d+)", line)
            if match:
                self.port = int(match[1])
                self._listening += 1
                if self._listening == self._workers:
                    self._ready.set()
        self._ready.set()  # it exited: do not wait any longer

    def client(self, user: str = "acme", timeout: float = 30) -> ReusingFTP_TLS:
        """A logged-in session with PROT P."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        ftp = ReusingFTP_TLS(context=context, timeout=timeout)
        ftp.connect("127.0.0.1", self.port)
        ftp.login(user, PASSWORD)
        ftp.prot_p()
        return ftp

    def events(self, name: str) -> list[dict[str, object]]:
        """Every audit record of event ``name`` so far."""
        return [record for record in list(self.records) if record["event"] == name]

    def wait_for(
        self, name: str, count: int = 1, timeout: float = 30
    ) -> list[dict[str, object]]:
        """Wait until ``count`` records of ``name`` arrived; return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(name)) < count:
            assert time.monotonic() < deadline, f"no {count} x {name}: {found}"
            time.sleep(0.1)
        return found

    def wait_for_stderr(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appeared on the server's stderr (read by a thread)."""
        deadline = time.monotonic() + timeout
        while text not in "".join(self.stderr):
            assert time.monotonic() < deadline, f"not on stderr: {text!r}"
            time.sleep(0.05)

    def readyz(self) -> tuple[int, str]:
        """(HTTP status, body) of ``/readyz``."""
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def pids(self) -> list[int]:
        """The supervisor (or single process) first, then its workers."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            workers = [int(child) for child in children.read_text().split()]
        except OSError:
            workers = []
        return [pid, *workers]

    def cpu_seconds(self) -> float:
        """User + system CPU time of every process of the tree so far."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLOCK_TICKS

    def usage(self) -> dict[int, Usage]:
        """RSS, open fds and threads of each process of the tree."""
        found = {}
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]
            found[pid] = Usage(
                rss_kib=rss,
                fds=len(os.listdir(f"/proc/{pid}/fd")),
                threads=len(os.listdir(f"/proc/{pid}/task")),
            )
        return found

    def kill(self) -> None:
        """kill -9 of the whole process group (supervisor and workers)."""
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in pids[1:]):
            assert time.monotonic() < deadline, "workers outlived kill -9"
            time.sleep(0.05)
        self._close_streams()

    def stop(self) -> int:
        """SIGTERM (drain) and wait; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.kill()
        self._close_streams()
        return code

    def _close_streams(self) -> None:
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def tracebacks(self) -> list[str]:
        """stderr lines that show a traceback (there should be none)."""
        return [line for line in self.stderr if "Traceback" in line]


def connection_owner(pids: list[int], client: tuple[str, int], server_port: int) -> int:
    """Which of ``pids`` holds the server end of the IPv4 TCP connection from
    ``client`` (address, port) to ``server_port`` (/proc/net/tcp, then the fds)."""
    address, port = client
    remote = f"{_hex_ipv4(address)}:{port:04X}"
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == server_port and fields[2] == remote:
            inode = fields[9]
            break
    assert inode, f"no connection from {client} to port {server_port}"
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    raise AssertionError(f"no process of {pids} holds {target}")


def _hex_ipv4(address: str) -> str:
    """``127.0.0.1`` as /proc/net/tcp writes it (host byte order, little endian)."""
    return "".join(f"{int(part):02X}" for part in reversed(address.split(".")))
