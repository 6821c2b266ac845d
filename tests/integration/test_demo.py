"""The README's first command: ``ftps-gateway serve`` without a config runs the demo.

The server runs as a real subprocess (``python -m ftps_gateway serve --demo-dir ...``);
its "try it" line is run exactly as printed, with real curl.
"""

from __future__ import annotations

import queue
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [
    pytest.mark.integration,
    # Start-up (30 s), commands (60 s each) and SIGTERM (10 s) are bounded one by
    # one, so a hang fails with the server's output rather than a bare timeout.
    pytest.mark.timeout(300),
]

READY_TIMEOUT = 30
STOP_TIMEOUT = 10
COMMAND_TIMEOUT = 60
TRY_IT_PREFIX = "try it: "
TRY_IT_URL = re.compile(r"ftp://(?P<host>[\d.]+):(?P<port>\d+)/$")

needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl binary not found on PATH"
)


@dataclass
class DemoServer:
    """A running ``serve`` subprocess and what it printed so far."""

    process: subprocess.Popen[str]
    stderr_path: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def output(self) -> str:
        """Everything the server printed so far, for assertion messages."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        stderr = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        return f"--- stdout ---\n{''.join(self.seen)}--- stderr ---\n{stderr}"

    def wait_for_try_it(self) -> str:
        """The command of the ``try it:`` line (stdout is read for at most 30 s)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(
                    f"demo server exited before its try-it line\n{self.output()}"
                )
            self.seen.append(line)
            if line.startswith(TRY_IT_PREFIX):
                return line.removeprefix(TRY_IT_PREFIX).strip()
        pytest.fail(f"no try-it line within {READY_TIMEOUT} s\n{self.output()}")

    def _drain(self) -> None:
        """Keep reading stdout (audit lines) so the server never blocks on the pipe."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def terminate(self) -> int:
        """SIGTERM, then the exit code (bounded by STOP_TIMEOUT)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"demo server still running {STOP_TIMEOUT} s after SIGTERM\n"
                f"{self.output()}"
            )

    def kill(self) -> None:
        """Make sure the process and the reader thread are gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


def passive_window() -> str:
    """A random 20-port passive range in 41000-48999."""
    first = random.randrange(41000, 49000 - 19)
    return f"{first}-{first + 19}"


def serve_command(demo_dir: Path, host: str = "127.0.0.1") -> list[str]:
    """The README's first command, on a free port."""
    return [
        sys.executable, "-m", "ftps_gateway", "serve",
        "--demo-dir", str(demo_dir),
        "--listen", f"{host}:0",
        "--passive-ports", passive_window(),
    ]  # fmt: skip


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator[Callable[..., DemoServer]]:
    """Start the demo in ``tmp_path/demo``; the process is always killed at teardown."""
    started: list[DemoServer] = []

    def start(host: str = "127.0.0.1") -> DemoServer:
        stderr_path = tmp_path / f"serve-{len(started)}.stderr"
        with stderr_path.open("w", encoding="utf-8") as stderr:
            process = subprocess.Popen(
                serve_command(tmp_path / "demo", host),
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        server = DemoServer(process, stderr_path)
        started.append(server)
        server.reader = threading.Thread(target=server._drain, daemon=True)
        server.reader.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command, bounded, with its output captured."""
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def explain(result: subprocess.CompletedProcess[str], server: DemoServer) -> str:
    """A failed command's output and the server's, for assertion messages."""
    return (
        f"command: {result.args}\nexit code: {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
        f"=== server ===\n{server.output()}"
    )


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


@needs_curl
def test_try_it_line_lists_and_uploads(
    run_demo: Callable[[], DemoServer], tmp_path: Path
) -> None:
    """The printed curl command works as is, an upload through it lands, SIGTERM: 0."""
    server = run_demo()
    try_it = server.wait_for_try_it()
    argv = shlex.split(try_it)
    assert argv[0] == "curl", try_it
    assert "--ssl-reqd" in argv, try_it
    assert TRY_IT_URL.search(argv[-1]), try_it

    listing = run(["sh", "-c", try_it], tmp_path)  # pasted into a shell
    assert listing.returncode == 0, explain(listing, server)

    local = tmp_path / "hello.txt"
    local.write_bytes(b"uploaded through the demo\n" * 1000)
    command, url = try_it.rsplit(" ", 1)
    upload = run(["sh", "-c", f"{command} -T {shlex.quote(str(local))} {url}up.txt"],
                 tmp_path)  # fmt: skip
    assert upload.returncode == 0, explain(upload, server)
    landed = tmp_path / "demo" / "storage" / "home" / "demo" / "up.txt"
    assert landed.read_bytes() == local.read_bytes(), explain(upload, server)

    again = run(["sh", "-c", try_it], tmp_path)
    assert again.returncode == 0, explain(again, server)
    assert "up.txt" in again.stdout, explain(again, server)

    assert server.terminate() == 0, server.output()


def test_state_files_are_private_and_check_config_hides_secrets(
    run_demo: Callable[[], DemoServer], tmp_path: Path
) -> None:
    """Key and password are 0600; check-config accepts the config and leaks nothing."""
    server = run_demo()
    try_it = server.wait_for_try_it()
    demo_dir = tmp_path / "demo"
    key, password_file = demo_dir / "certs" / "server.key", demo_dir / "demo-password"
    config = demo_dir / "gateway.toml"
    assert key.is_file(), server.output()
    assert mode(key) == 0o600, f"server.key mode {mode(key):04o}"
    assert password_file.is_file(), server.output()
    assert mode(password_file) == 0o600, f"demo-password mode {mode(password_file):04o}"
    assert config.is_file(), server.output()

    password = password_file.read_text(encoding="utf-8").strip()
    assert password, "empty demo password"
    # The password stays in its file: stdout lands in journals and CI logs.
    assert f"demo:$(cat {shlex.quote(str(password_file))})" in try_it, try_it
    assert password not in server.output(), server.output()
    # The config does hold a hash, so its absence from the summary means something.
    assert "$argon2id$" in config.read_text(encoding="utf-8")

    check = run(
        [sys.executable, "-m", "ftps_gateway", "check-config",
         "--config", "demo/gateway.toml"],
        tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, explain(check, server)
    printed = check.stdout + check.stderr
    assert "$argon2id$" not in printed, explain(check, server)
    assert password not in printed, explain(check, server)

    assert server.terminate() == 0, server.output()


@needs_curl
def test_second_start_reuses_password_and_certificate(
    run_demo: Callable[[], DemoServer], tmp_path: Path
) -> None:
    """A restarted demo keeps its password, certificate and key, and still works."""
    demo_dir = tmp_path / "demo"
    kept = [
        demo_dir / "demo-password",
        demo_dir / "certs" / "server.crt",
        demo_dir / "certs" / "server.key",
    ]

    first = run_demo()
    first_try_it = first.wait_for_try_it()
    before = {path: path.read_bytes() for path in kept}
    assert first.terminate() == 0, first.output()

    second = run_demo()
    second_try_it = second.wait_for_try_it()
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path.name} changed on restart"
    # Same command apart from the port the OS picked.
    assert TRY_IT_URL.sub("", first_try_it) == TRY_IT_URL.sub("", second_try_it)

    listing = run(["sh", "-c", second_try_it], tmp_path)
    assert listing.returncode == 0, explain(listing, second)
    assert second.terminate() == 0, second.output()


def test_demo_beyond_loopback_is_warned_about(
    run_demo: Callable[..., DemoServer], tmp_path: Path
) -> None:
    """Listening on every interface exposes the demo user: the server says so."""
    server = run_demo("0.0.0.0")
    server.wait_for_try_it()
    stderr = (tmp_path / "serve-0.stderr").read_text(encoding="utf-8")
    assert "warning: the demo listens on 0.0.0.0" in stderr, server.output()
    assert server.terminate() == 0, server.output()


def test_demo_on_loopback_has_no_such_warning(
    run_demo: Callable[..., DemoServer], tmp_path: Path
) -> None:
    """The README's default (127.0.0.1) is quiet."""
    server = run_demo()
    server.wait_for_try_it()
    stderr = (tmp_path / "serve-0.stderr").read_text(encoding="utf-8")
    assert "warning: the demo listens" not in stderr, server.output()
    assert server.terminate() == 0, server.output()
