"""Run inside a fresh network namespace (``unshare --net``): a gateway, an nftables
drop rule, and ``self-test`` against it; print the exit code and the JSON report.

Invoked by ``test_selftest_netns.py``. Nothing here touches the host's network: the
namespace has only its own loopback and dies with this process.

    unshare --net python selftest_netns.py control|passive
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trustme

from ftps_gateway import cli
from ftps_gateway import config as config_module
from ftps_gateway.policy.passwords import PasswordVerifier
from ftps_gateway.service.server import GatewayServer
from support.configs import write_config
from support.credentials import FAST_PARAMETERS, PASSWORD

PASSIVE = "40000-40009"


def _drop(port_spec: str) -> None:
    rules = (
        "add table inet selftest\n"
        "add chain inet selftest input { type filter hook input priority 0; }\n"
        f"add rule inet selftest input tcp dport {port_spec} drop\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)


def main(scenario: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    directory = Path(tempfile.mkdtemp())
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, ca_file = directory / "c.pem", directory / "k.pem", directory / "ca.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    path = write_config(directory, (chain, key, ca_file), passive_ports=PASSIVE)
    server = GatewayServer(
        config_module.load(path), verifier=PasswordVerifier(parameters=FAST_PARAMETERS)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.addresses[0]
    _drop(str(port) if scenario == "control" else PASSIVE)
    os.environ["FTPS_PASSWORD"] = PASSWORD
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["self-test", f"ftps://acme@{host}:{port}/", "--json",
                         "--cafile", str(ca_file), "--timeout", "2",
                         "--scan-passive", "3"])  # fmt: skip
    server.stop()
    thread.join(10)
    print(json.dumps({"code": code, "report": json.loads(out.getvalue())}))


if __name__ == "__main__":
    main(sys.argv[1])
