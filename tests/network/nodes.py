"""Gateway nodes for the namespace labs: certificates, configs, processes, disks.

Shared by ``test_nat``, ``test_two_nodes`` and ``test_drain_lb``. A node is a real
``python -m ftps_gateway serve`` process inside a lab namespace, with its own
storage root, so "which node stored this upload" is a question about a directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from network import netlab
from support.credentials import PASSWORD_HASH

CONTROL_PORT = 2121
METRICS_PORT = 9120


def require_lab(*tools: str) -> None:
    """Skip (not root, no ip netns) or fail (a tool scripts/test.sh installs is gone)."""
    unavailable = netlab.unavailable_reason()
    if unavailable is not None:
        pytest.skip(unavailable)
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install it (scripts/test.sh does)")


@dataclass
class Node:
    """One gateway process in a namespace, and where its files and audit go."""

    name: str  # its node_name, and its process name in the lab
    namespace: str
    ip: str  # control and metrics address
    directory: Path
    control_port: int = CONTROL_PORT
    audit_path: Path | None = None  # its stdout, once started

    @property
    def metrics_port(self) -> int:
        """Its /metrics, /healthz and /readyz port (two nodes may share an address)."""
        return METRICS_PORT + self.control_port - CONTROL_PORT

    @property
    def home(self) -> Path:
        """User acme's home on this node's disk."""
        return self.directory / "storage" / "home" / "acme"

    @property
    def readyz(self) -> str:
        """The URL HAProxy checks."""
        return f"http://{self.ip}:{self.metrics_port}/readyz"

    def audit(self) -> list[dict[str, object]]:
        """The audit records this node wrote to stdout so far."""
        if self.audit_path is None:
            return []
        lines = self.audit_path.read_text(
            encoding="utf-8", errors="replace"
        ).splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def disk_sha256(self, file_name: str) -> str | None:
        """sha256 of an upload on this node's disk, None if it is not there."""
        path = self.home / file_name
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def write_config(
    node: Node,
    certificate: tuple[Path, Path, Path],
    *,
    ports: str,
    address: str = "",
    passive_timeout: int = 2,
    server_extra: str = "",
    passive_extra: str = "",
    sections: str = "",
) -> Path:
    """The node's gateway.toml.

    Two workers (as "auto" gives on the CI machines), a short passive connect
    timeout by default (a data connection that went to the wrong node fails in
    2 s, not 30),
    session limits far above the test load (without the PROXY protocol every session
    comes from the balancer's one address), and metrics on the node's private
    address, where HAProxy's health check reaches ``/readyz``.
    """
    chain, key, _ = certificate
    node.directory.mkdir(parents=True, exist_ok=True)
    path = node.directory / "gateway.toml"
    path.write_text(
        f"""\
[server]
listen = ["{node.ip}:{node.control_port}"]
node_name = "{node.name}"
workers = 2
login_timeout_seconds = 10
max_sessions_per_ip = 200
max_sessions_per_user = 200
max_unauthenticated_per_ip = 200
{server_extra}
[tls]
certificate = "{chain}"
private_key = "{key}"
[passive]
ports = "{ports}"
address = "{address}"
connect_timeout_seconds = {passive_timeout}
{passive_extra}
[storage]
root = "{node.directory / "storage"}"
[metrics]
listen = "{node.ip}:{node.metrics_port}"
[[users]]
name = "acme"
password = "{PASSWORD_HASH}"
{sections}
""",
        encoding="utf-8",
    )
    return path


def start(lab: netlab.Lab, node: Node, config: Path) -> None:
    """Start the node's gateway (audit on stdout, ``<name>.stdout`` in the lab dir)."""
    node.audit_path = lab.start(
        node.namespace,
        [sys.executable, "-m", "ftps_gateway", "serve", "--config", str(config)],
        node.name,
    )


def explain(lab: netlab.Lab, names: list[str]) -> str:
    """The stderr tails of the named lab processes, for assertion messages."""
    parts = []
    for name in names:
        path = lab.directory / f"{name}.stderr"
        text = (
            path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        )
        parts.append(f"--- {name} stderr ---\n{text[-3000:]}")
    return "\n".join(parts)
