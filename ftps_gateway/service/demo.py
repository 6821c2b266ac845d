"""Built-in default: a loopback gateway, a development certificate, a demo user.

``ftps-gateway serve`` with no ``--config`` runs this, so the first command in the
README works on a fresh machine. Everything lives in one state directory: the generated
certificate (kept across runs), the demo password (mode 0600, kept across runs) and the
``gateway.toml`` written from the flags at each start, which doubles as a starting point
for a real configuration.

The password is never printed: stdout lands in journals and CI logs. The "try it" line
reads it from its file (``$(cat PATH)``), which only the demo's owner can read.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from ftps_gateway import config
from ftps_gateway.policy import passwords
from ftps_gateway.tls import certificates as certs

DEMO_USER = "demo"
DEFAULT_LISTEN = "127.0.0.1:2121"
DEFAULT_PASSIVE_PORTS = "50000-50019"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/ftps-gateway/demo`` (``~/.local/state/...`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ftps-gateway" / "demo"


@dataclass(frozen=True)
class Demo:
    """A prepared demo: its config and how to log in."""

    config: config.GatewayConfig
    password_file: Path  # mode 0600; the password itself is never printed
    certificate: Path


def prepare(state_dir: Path, listen: str, passive_ports: str) -> Demo:
    """Create (or reuse) the demo's certificate and password and write its config."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = state_dir / "certs" / "server.crt"
    key_path = state_dir / "certs" / "server.key"
    if not (cert_path.exists() and key_path.exists()):
        cert_path, key_path = certs.generate_development_certificate(
            "localhost", state_dir / "certs"
        )
    password_file = state_dir / "demo-password"
    password = _demo_password(password_file)
    text = f"""# Written by `ftps-gateway serve` (built-in demo); edit a copy to use it.
[server]
listen = [{listen!r}]
banner = "ftps-gateway demo"

[tls]
certificate = "certs/server.crt"
private_key = "certs/server.key"

[passive]
ports = {passive_ports!r}
address = ""

[storage]
root = "storage"

[[users]]
name = "{DEMO_USER}"
password = "{passwords.hash_password(password)}"
"""
    config_path = state_dir / "gateway.toml"
    config_path.write_text(text, encoding="utf-8")
    return Demo(config.load(config_path), password_file, cert_path)


def _demo_password(path: Path) -> str:
    """Read the saved demo password, or make one and save it readable by us only."""
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(password + "\n")
    return password


def try_it_line(demo: Demo, host: str, port: int) -> str:
    """A ready-to-paste curl command that lists the demo user's home over FTPS.

    For a POSIX shell: the password comes from its file, not from this line.
    """
    password = shlex.quote(str(demo.password_file))
    return (
        f"curl --ssl-reqd --cacert {shlex.quote(str(demo.certificate))} "
        f"--user {DEMO_USER}:$(cat {password}) ftp://{host}:{port}/"
    )


def exposure_warning(host: str) -> str | None:
    """A warning when the demo listens beyond loopback, else None."""
    if ipaddress.ip_address(host).is_loopback:
        return None
    return (
        f"the demo listens on {host}, beyond loopback: anyone who reaches it can try "
        f"the {DEMO_USER!r} user's password, and its certificate is self-signed; "
        "for real use, write a config (ftps-gateway serve --config gateway.toml)"
    )
