"""The container entrypoint, run outside Docker: temp directories stand in for the
volumes, environment variables for ``docker run -e``. Same script, same shipped
container config, same health check as in the image."""

from __future__ import annotations

import contextlib
import ftplib
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.credentials import PASSWORD, PASSWORD_HASH

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
CONTAINER_CONFIG = DEPLOY / "gateway.container.toml"
HEALTHCHECK = DEPLOY / "healthcheck.py"
PASSIVE_ADDRESS = "198.51.100.20"  # documentation range: never connected to
NODE_NAME = "edge-7"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Volumes:
    """Stand-ins for the image's volumes and the container's environment."""

    etc: Path
    data: Path
    run: Path
    ca_file: Path
    env: dict[str, str] = field(default_factory=dict)
    passive: tuple[int, int] = (0, 0)
    metrics_port: int = 0


@pytest.fixture
def volumes(cert_files: tuple[Path, Path, Path]) -> Iterator[Volumes]:
    """/etc/ftps-gateway (with certs/), /var/lib/ftps-gateway and /run/ftps-gateway."""
    # Short: the admin socket path must fit in sun_path (107 bytes).
    top = Path(tempfile.mkdtemp(prefix="ftpsgw-deploy-"))
    etc, data, run = top / "etc", top / "data", top / "run"
    (etc / "certs").mkdir(parents=True)
    data.mkdir()
    run.mkdir()
    chain, key, ca_file = cert_files
    shutil.copy(chain, etc / "certs" / "server.crt")
    shutil.copy(key, etc / "certs" / "server.key")
    # A random 20-port block: other suites on this machine use 40000-41999.
    base = 45000 + 20 * random.randrange(100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTPS_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FTPS_DEFAULT_CONFIG=str(CONTAINER_CONFIG),
        FTPS_CERT_DIR=str(etc / "certs"),
        FTPS_DATA_DIR=str(data),
        FTPS_RUN_DIR=str(run),
        FTPS_LISTEN="127.0.0.1:0",
        FTPS_PASSIVE_PORTS=f"{base}-{base + 19}",
        FTPS_PASSIVE_ADDRESS=PASSIVE_ADDRESS,
        FTPS_NODE_NAME=NODE_NAME,
        FTPS_USER="acme",
        FTPS_PASSWORD_HASH=PASSWORD_HASH,
    )
    metrics_port = _free_port()
    env["FTPS_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    yield Volumes(etc, data, run, ca_file, env, (base, base + 19), metrics_port)
    shutil.rmtree(top, ignore_errors=True)


class Container:
    """The entrypoint in a child process, as Docker would run it: audit lines on
    stdout, diagnostics on stderr."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [str(ENTRYPOINT), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Its own process group: teardown can kill whatever it left behind, even
            # a server that a broken entrypoint did not exec into.
            start_new_session=True,
        )
        self.audit: queue.Queue[dict[str, object]] = queue.Queue()
        self.stderr: list[str] = []
        self._port: queue.Queue[int] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.audit.put(json.loads(line))

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            match = re.search(r"listening for explicit FTPS on [^ ]+:(\d+)", line)
            if match:
                self._port.put(int(match[1]))

    def port(self) -> int:
        """The control port, once the server listens (fails if it died first)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                return self._port.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        pytest.fail(f"server did not start: {''.join(self.stderr)}")

    def wait_for(self, event: str, timeout: float = 15) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            record = self.audit.get(timeout=max(0.01, deadline - time.monotonic()))
            if record["event"] == event:
                return record

    def wait(self, timeout: float = 20) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.wait()


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    """Every container started is killed at teardown if still running."""
    started: list[Container] = []
    yield started
    for container in started:
        container.kill()


def _client(volumes: Volumes, port: int, user: str = "acme") -> ReusingFTP_TLS:
    context = ssl.create_default_context(cafile=str(volumes.ca_file))
    ftp = ReusingFTP_TLS(context=context, timeout=10)
    ftp.connect("127.0.0.1", port)
    try:
        ftp.login(user, PASSWORD)
        ftp.prot_p()
    except BaseException:
        ftp.close()
        raise
    return ftp


def _run_entrypoint(
    env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_entrypoint_serves_from_environment(
    volumes: Volumes, containers: list[Container]
) -> None:
    """With no mounted config, the shipped container config takes the node name,
    passive address and range from the environment; the server is the process the
    runtime started (exec), a partner can log in and transfer, and /healthz and the
    image's health check answer."""
    container = Container(volumes.env)
    containers.append(container)
    port = container.port()
    # exec: the PID Docker signals is the server itself, not a shell around it.
    cmdline = Path(f"/proc/{container.process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in cmdline
    assert not any(part.endswith(b"docker-entrypoint.sh") for part in cmdline)

    ftp = _client(volumes, port)
    diag = ftp.sendcmd("SITE DIAG")
    assert f" node: {NODE_NAME}" in diag.splitlines()
    assert f" passive-address: {PASSIVE_ADDRESS}" in diag.splitlines()
    low, high = volumes.passive
    assert f" passive-ports: {low}-{high}" in diag.splitlines()
    payload = os.urandom(256 * 1024)
    ftp.storbinary("STOR report.bin", io.BytesIO(payload))
    received = io.BytesIO()
    ftp.retrbinary("RETR report.bin", received.write)
    assert payload == received.getvalue()
    assert payload == (volumes.data / "home" / "acme" / "report.bin").read_bytes()
    reply = ftp.sendcmd("PASV")  # the 227 address is the environment's, raw
    numbers = [int(n) for n in re.search(r"\(([\d,]+)\)", reply)[1].split(",")]  # type: ignore[index]
    assert ".".join(map(str, numbers[:4])) == PASSIVE_ADDRESS
    assert low <= numbers[4] * 256 + numbers[5] <= high
    ftp.close()

    url = f"http://127.0.0.1:{volumes.metrics_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
    check = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=volumes.env, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{url}: 200" in check.stdout

    container.process.send_signal(signal.SIGTERM)
    assert container.wait_for("drain_started")
    assert container.wait() == 0


def test_healthcheck_fails_without_server(volumes: Volumes) -> None:
    """The image's health check reports unhealthy (exit 1, with the reason) when
    nothing answers on the configured metrics listener."""
    check = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=volumes.env, capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert check.returncode == 1
    assert check.stdout.startswith("unhealthy:")


def test_mounted_config_wins_and_sighup_reloads(
    volumes: Volumes, containers: list[Container]
) -> None:
    """A config in the config volume replaces the shipped one; SIGHUP makes the
    running server re-read it (a user added to the file can log in), and SIGTERM
    then drains and exits 0."""
    config = volumes.etc / "gateway.toml"
    template = CONTAINER_CONFIG.read_text(encoding="utf-8")
    config.write_text(template, encoding="utf-8")
    env = {
        **volumes.env,
        "FTPS_CONFIG": str(config),
        "FTPS_DEFAULT_CONFIG": "/nonexistent",
    }
    container = Container(env)
    containers.append(container)
    port = container.port()
    assert any(f"using {config}" in line for line in container.stderr)
    with pytest.raises(ftplib.error_perm, match="530"):
        _client(volumes, port, user="beta")

    config.write_text(
        template + f'\n[[users]]\nname = "beta"\npassword = "{PASSWORD_HASH}"\n',
        encoding="utf-8",
    )
    container.process.send_signal(signal.SIGHUP)
    assert container.wait_for("config_reload")["result"] == "ok"
    ftp = _client(volumes, port, user="beta")
    ftp.storbinary("STOR hello.txt", io.BytesIO(b"hello"))
    ftp.quit()
    assert (volumes.data / "home" / "beta" / "hello.txt").read_bytes() == b"hello"

    container.process.send_signal(signal.SIGTERM)
    assert container.wait_for("drain_finished")["transfers_cut"] == 0
    assert container.wait() == 0


def test_unset_passive_address_exits_3_before_serving(volumes: Volumes) -> None:
    """Without FTPS_PASSIVE_ADDRESS the entrypoint stops at check-config: exit 3,
    the key and the variable named, and no server started."""
    env = dict(volumes.env)
    del env["FTPS_PASSIVE_ADDRESS"]
    result = _run_entrypoint(env)
    assert result.returncode == 3
    assert (
        "passive.address: environment variable FTPS_PASSIVE_ADDRESS is not set"
        in result.stderr
    )
    assert "server not started" in result.stderr
    assert "listening for" not in result.stderr
    assert result.stdout == ""  # no audit event: nothing was served


def test_bad_value_from_environment_exits_3(volumes: Volumes) -> None:
    """A value the environment supplies is validated like one in the file: an
    invalid passive range is named by key, exit 3."""
    env = {**volumes.env, "FTPS_PASSIVE_PORTS": "50000-40000"}
    result = _run_entrypoint(env)
    assert result.returncode == 3
    assert "passive.ports" in result.stderr
    assert "listening for" not in result.stderr


def test_missing_explicit_config_exits_3(volumes: Volumes) -> None:
    """An FTPS_CONFIG naming a file that does not exist is an error (exit 3), never
    a silent fallback to the shipped config."""
    env = {**volumes.env, "FTPS_CONFIG": str(volumes.etc / "typo.toml")}
    result = _run_entrypoint(env)
    assert result.returncode == 3
    assert "typo.toml: no such file" in result.stderr


def test_admin_verbs_get_the_same_config(volumes: Volumes) -> None:
    """check-config and explain through the entrypoint use the config it would
    serve, with the environment applied."""
    result = _run_entrypoint(volumes.env, "check-config")
    assert result.returncode == 0, result.stderr
    assert f"Node name: {NODE_NAME}" in result.stdout
    explained = _run_entrypoint(volumes.env, "explain", "acme")
    assert explained.returncode == 0, explained.stderr
    assert "acme" in explained.stdout


def test_node_name_defaults_to_host_name(volumes: Volumes) -> None:
    """Without FTPS_NODE_NAME the node is named after the host (a container's
    host name), not left empty (which the config would refuse)."""
    env = dict(volumes.env)
    del env["FTPS_NODE_NAME"]
    result = _run_entrypoint(env, "check-config")
    assert result.returncode == 0, result.stderr
    assert f"Node name: {os.uname().nodename}" in result.stdout
