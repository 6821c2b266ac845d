"""Shared fixtures: trustme certificates, configs, and a real gateway on loopback."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import pytest
import trustme
from hypothesis import settings

from ftps_gateway import config as config_module
from ftps_gateway.policy.passwords import PasswordVerifier
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.service.server import GatewayServer

# Cheap argon2id parameters for tests: the real cost is a production setting.
FAST_PARAMETERS = argon2.Parameters(
    type=argon2.Type.ID,
    version=19,
    salt_len=16,
    hash_len=32,
    time_cost=1,
    memory_cost=8,
    parallelism=1,
)
# Property tests: a moderate default for CI, HYPOTHESIS_PROFILE=long for a deep run.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

PASSWORD = "correct horse battery staple"
PASSWORD_HASH = argon2.PasswordHasher.from_parameters(FAST_PARAMETERS).hash(PASSWORD)


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


def write_certificate(
    ca: trustme.CA, directory: Path, names: list[str]
) -> tuple[Path, Path, Path]:
    """Write a leaf for ``names``: (chain, key mode 0600, CA file) in ``directory``."""
    leaf = ca.issue_cert(*names)
    chain, key, ca_file = (
        directory / "server.crt",
        directory / "server.key",
        directory / "ca.pem",
    )
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    return chain, key, ca_file


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


@dataclass
class RunningGateway:
    """A gateway serving on loopback in a background thread."""

    server: GatewayServer
    host: str
    port: int
    root: Path
    ca_file: Path

    def home(self, user: str = "acme") -> Path:
        """The real home directory of ``user``."""
        return self.root / "home" / user

    def client(
        self,
        *,
        source_ip: str = "127.0.0.1",
        login: bool = True,
        user: str = "acme",
        password: str = PASSWORD,
    ) -> ReusingFTP_TLS:
        """A logged-in (or just connected) session with PROT P, resuming TLS sessions."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        ftp = ReusingFTP_TLS(context=context, timeout=10)
        ftp.connect(self.host, self.port, source_address=(source_ip, 0))
        if login:
            ftp.login(user, password)
            ftp.prot_p()
        return ftp


def write_config(
    directory: Path,
    cert_files: tuple[Path, Path, Path],
    extra: str = "",
    passive_ports: str = "40000-40999",
    users: str | None = None,
    server_extra: str = "",
    tls_extra: str = "",
    sections: str = "",
) -> Path:
    """Write a gateway.toml for tests and return its path.

    ``extra`` goes into ``[passive]``, ``server_extra`` into ``[server]`` and
    ``tls_extra`` into ``[tls]``.
    """
    chain, key, _ = cert_files
    users = (
        users
        if users is not None
        else f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
    )
    text = f"""
[server]
listen = ["127.0.0.1:0"]
{server_extra or "login_timeout_seconds = 5"}
[tls]
certificate = "{chain}"
private_key = "{key}"
{tls_extra}
[passive]
ports = "{passive_ports}"
{"" if "connect_timeout_seconds" in extra else "connect_timeout_seconds = 5"}
{extra}
[storage]
root = "{directory / "storage"}"
{users}
{sections}
{"" if "[admin]" in sections else f'[admin]{chr(10)}socket = "{admin_socket_path(directory)}"'}
"""
    path = directory / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def admin_socket_path(directory: Path) -> Path:
    """A short admin socket path for ``directory`` (sun_path holds 107 bytes)."""
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ftpsgw-{digest}.sock"


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
        cfg = config_module.load(write_config(directory, cert_files, **kwargs))  # type: ignore[arg-type]
        server = GatewayServer(
            cfg, verifier=PasswordVerifier(parameters=FAST_PARAMETERS)
        )
        thread = threading.Thread(
            target=server.serve_forever, name="gateway", daemon=True
        )
        thread.start()
        running.append((server, thread))
        host, port = server.addresses[0]
        return RunningGateway(server, host, port, cfg.storage.root, cert_files[2])

    yield start
    for server, thread in running:
        server.stop()
        thread.join(10)
        assert not thread.is_alive(), "gateway thread did not stop"
    leaked = [
        t
        for t in threading.enumerate()
        if t not in threads_before and t.is_alive() and not t.name.startswith("argon2")
    ]
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
    import json

    caplog.set_level(logging.INFO, logger="ftps_gateway.audit")

    def records() -> list[dict[str, object]]:
        return [
            json.loads(r.getMessage())
            for r in caplog.records
            if r.name == "ftps_gateway.audit"
        ]

    return records
