"""Certificates for tests: a trustme leaf written as the files a gateway reads.

Real certificates from a throw-away CA, so the server's TLS and its certificate
checks run as in production. Imports nothing from the tests.
"""

from __future__ import annotations

from pathlib import Path

import trustme


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
