"""Gateway configuration files for tests, and the admin socket path they use.

One writer for every test's ``gateway.toml`` keeps the defaults (loopback, an
OS-chosen port, short timeouts, user ``acme``) in one place. Depends only on
``support.credentials``.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from support.credentials import PASSWORD_HASH


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
