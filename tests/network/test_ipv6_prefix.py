"""IPv6 clients counted per /64 (``access.ipv6_prefix_length``), over real IPv6.

One namespace whose loopback carries two AnyIP routes (``ip -6 route add local
PREFIX dev lo``, with ``net.ipv6.ip_nonlocal_bind`` so a client may pick any source
in them): the gateway (two workers) listens on 2001:db8:ff::1 and clients connect
from any address of 2001:db8:1::/64 or 2001:db8:2::/64. Failed logins spread over
three addresses of one /64 ban that whole /64 on both workers, while the next /64
logs in; ``ban list`` shows the /64 and ``ban remove`` of any address in it lifts it.
Nothing outside the namespace changes (the routes and the sysctl are its own).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from ftps_gateway import cli
from network import netlab, nodes
from support.certificates import write_certificate
from support.configs import admin_socket_path
from support.credentials import PASSWORD, PASSWORD_HASH

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

SERVER_IP = "2001:db8:ff::1"
PORT = 2121
GUESSERS = ("2001:db8:1::a", "2001:db8:1::b", "2001:db8:1:0:ffff:ffff:ffff:c")
SAME_PREFIX = "2001:db8:1::1234"
OTHER_PREFIX = "2001:db8:2::1"

# Run inside the namespace: each step connects from a source address and reports.
CLIENT = """
import ftplib, json, socket, ssl, sys
ca, server, port, password, steps = sys.argv[1:6]
context = ssl.create_default_context(cafile=ca)
results = []
for kind, source in json.loads(steps):
    if kind == "greeting":
        try:
            sock = socket.create_connection((server, int(port)), 10, (source, 0))
        except OSError as err:
            results.append(f"connect failed: {err}")
            continue
        sock.settimeout(3)
        try:
            received = sock.recv(4096)
        except (TimeoutError, ConnectionResetError):
            received = b""
        sock.close()
        results.append(received.decode(errors="replace"))
        continue
    ftp = ftplib.FTP_TLS(context=context, timeout=15)
    ftp.connect(server, int(port), source_address=(source, 0))
    try:
        ftp.login("acme", password if kind == "login" else "wrong")
        results.append("230")
        ftp.quit()
    except ftplib.Error as err:
        results.append(str(err)[:3])
        ftp.close()
print(json.dumps(results))
"""


@dataclass
class Ipv6Lab:
    """The namespace, the gateway in it, and how to run clients there."""

    lab: netlab.Lab
    namespace: str
    ca_file: Path
    config: Path

    def steps(self, *steps: tuple[str, str]) -> list[str]:
        """Run ``(kind, source)`` steps in the namespace: kind "fail" (a wrong
        password), "login", or "greeting" (what a raw connection hears)."""
        result = self.lab.run(
            self.namespace,
            [
                sys.executable, "-c", CLIENT, str(self.ca_file), SERVER_IP,
                str(PORT), PASSWORD, json.dumps(steps),
            ],
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr + self.lab.log("gateway")
        answer: list[str] = json.loads(result.stdout)
        return answer


@pytest.fixture(scope="module")
def ipv6(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ipv6Lab]:
    """A namespace with two AnyIP /64s on lo, and a two-worker gateway in it."""
    nodes.require_lab()
    directory = tmp_path_factory.mktemp("ipv6lab")
    chain, key, ca_file = write_certificate(ca, directory, [SERVER_IP])
    lab = netlab.Lab(directory)
    with netlab.sigterm_interrupts():
        try:
            namespace = lab.add_namespace("v6")
            for prefix in ("2001:db8:ff::/64", "2001:db8:1::/64", "2001:db8:2::/64"):
                netlab.ip("-n", namespace, "-6", "route", "add", "local", prefix,
                          "dev", "lo")  # fmt: skip
            lab.sysctl(namespace, "net.ipv6.ip_nonlocal_bind", "1")
            config = directory / "gateway.toml"
            config.write_text(
                f"""\
[server]
listen = ["[{SERVER_IP}]:{PORT}"]
workers = 2
login_timeout_seconds = 20
[tls]
certificate = "{chain}"
private_key = "{key}"
[passive]
ports = "50000-50031"
[storage]
root = "{directory / "storage"}"
[access]
ipv6_prefix_length = 64
[defender]
max_failures = 3
ban_seconds = 600
[admin]
socket = "{admin_socket_path(directory)}"
[[users]]
name = "acme"
password = "{PASSWORD_HASH}"
""",
                encoding="utf-8",
            )
            lab.start(
                namespace,
                [sys.executable, "-m", "ftps_gateway", "serve", "--config",
                 str(config)],
                "gateway",
            )  # fmt: skip
            running = Ipv6Lab(lab, namespace, ca_file, config)
            _wait_for_banner(running)
            yield running
        finally:
            lab.close()


def _wait_for_banner(running: Ipv6Lab) -> None:
    for _ in range(120):
        if running.steps(("greeting", OTHER_PREFIX))[0].startswith("220"):
            return
        time.sleep(0.5)
    pytest.fail("no banner: " + running.lab.log("gateway"))


def test_failures_across_one_prefix_ban_the_whole_prefix(
    ipv6: Ipv6Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three failures from three addresses of one /64 ban the /64 on both workers;
    the next /64 is untouched; the ban is listed and lifted as the /64."""
    answers = ipv6.steps(*(("fail", source) for source in GUESSERS))
    assert answers[:2] == ["530", "530"]
    # Dropped before the greeting, whichever worker takes the connection.
    greetings = ipv6.steps(*(("greeting", SAME_PREFIX) for _ in range(8)))
    assert greetings == [""] * 8, ipv6.lab.log("gateway")
    assert ipv6.steps(("login", OTHER_PREFIX)) == ["230"]
    assert cli.main(["ban", "list", "--config", str(ipv6.config), "--json"]) == 0
    bans: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    assert [ban["ip"] for ban in bans] == ["2001:db8:1::/64"]
    assert cli.main(["ban", "remove", SAME_PREFIX, "--config", str(ipv6.config)]) == 0
    assert capsys.readouterr().out == "ban on 2001:db8:1::/64 lifted\n"
    # The lift reaches both workers' replicas (a message each, right away).
    for _ in range(20):
        if (
            ipv6.steps(*(("greeting", SAME_PREFIX) for _ in range(4)))
            == ["220 Partner file exchange\r\n"] * 4
        ):
            break
        time.sleep(0.2)
    assert ipv6.steps(("login", SAME_PREFIX)) == ["230"]
