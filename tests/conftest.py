"""Shared fixtures: trustme certificates, configs, and a real gateway on loopback.

Fixtures only (and the hypothesis profiles): the helpers they build on live in the
``support`` package, which test modules import directly. Nothing imports this file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from ftps_gateway.service.server import GatewayServer
from support.certificates import write_certificate
from support.configs import write_config
from support.gateway import RunningGateway, serve_in_thread
from support.redis import RedisServer

# Property tests: a moderate default for CI, HYPOTHESIS_PROFILE=long for a deep run.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(certificate chain, private key, CA file) for localhost and 127.0.0.1."""
    return write_certificate(
        ca, tmp_path_factory.mktemp("certs"), ["localhost", "127.0.0.1"]
    )


@pytest.fixture(scope="session")
def pem_pair(ca: trustme.CA) -> tuple[bytes, bytes]:
    """A real certificate and key, made once."""
    leaf = ca.issue_cert("localhost")
    return leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()


@pytest.fixture
def config_dir(tmp_path: Path, pem_pair: tuple[bytes, bytes]) -> Path:
    """A directory with ``certs/server.crt`` and ``certs/server.key`` in it."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "server.crt").write_bytes(pem_pair[0])
    key = certs / "server.key"
    key.write_bytes(pem_pair[1])
    key.chmod(0o600)
    return tmp_path


@pytest.fixture
def start_gateway(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways with custom config fragments; all are stopped at teardown."""
    running: list[tuple[GatewayServer, threading.Thread]] = []
    threads_before = set(threading.enumerate())

    def start(**kwargs: object) -> RunningGateway:
        directory = tmp_path / f"gw{len(running)}"
        directory.mkdir()
        path = write_config(directory, cert_files, **kwargs)  # type: ignore[arg-type]
        gateway, thread = serve_in_thread(path, cert_files[2])
        running.append((gateway.server, thread))
        return gateway

    yield start
    for server, thread in running:
        server.stop()
        thread.join(10)
        assert not thread.is_alive(), "gateway thread did not stop"
    # Pools shut down without waiting (file work, hook deliveries) end their threads
    # a moment after the server stops: give them that moment, not forever.
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in threads_before
            and t.is_alive()
            and not t.name.startswith("argon2")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture
def gateway(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    """A default gateway with user acme."""
    return start_gateway()


@pytest.fixture
def audit_records(
    caplog: pytest.LogCaptureFixture,
) -> Callable[[], list[dict[str, object]]]:
    """Parsed audit events captured so far."""
    caplog.set_level(logging.INFO, logger="ftps_gateway.audit")

    def records() -> list[dict[str, object]]:
        return [
            json.loads(r.getMessage())
            for r in caplog.records
            if r.name == "ftps_gateway.audit"
        ]

    return records


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a Unix socket in a short temporary folder."""
    # Not tmp_path: a socket path holds at most 107 bytes, and pytest's are long.
    directory = Path(tempfile.mkdtemp(prefix="redis-"))
    server = RedisServer(directory)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
