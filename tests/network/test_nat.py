"""A gateway behind a NAT router: the 227 address decides whether PASV works (issue 7).

::

    client ns                router ns (ip_forward=1, nftables DNAT)      server ns
    203.0.113.10  --veth--   203.0.113.1 | 10.88.0.1  ------------veth--  10.88.0.2
                                         | 10.88.1.1  --veth--  insider ns 10.88.1.10

The router forwards the control ports and the passive range of its public address
to the private server, as a home or office router's port forwarding does, and
drops anything else arriving from outside for the private side (as the internet
would: private addresses are not routed there). The server's default route points
at the router, so DNAT keeps the partner's real address. Two gateways share the
server namespace: ``direct`` (port 2121, ports 50000-50031) advertises its own
address in 227 replies (``[passive] address`` unset), ``masq`` (port 2122, ports
50032-50063) advertises the router's public address and, through
``[[passive.overrides]]``, its private one to clients on the private side.

TLS hides the 227 reply from the router, so no conntrack FTP helper can fix it (and
none is loaded): only the gateway's own configuration can. The client is strict
(``ftpsclient``): it uses the 227 address as sent, as many partner tools do, where
curl and ftplib would silently replace it with the control address.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from network import ftpsclient, netlab, nodes
from support.certificates import write_certificate
from support.credentials import PASSWORD

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

CLIENT_IP = "203.0.113.10"
ROUTER_PUBLIC_IP = "203.0.113.1"
ROUTER_SERVER_SIDE_IP = "10.88.0.1"
SERVER_IP = "10.88.0.2"
ROUTER_INSIDE_IP = "10.88.1.1"
INSIDER_IP = "10.88.1.10"
SIZE = 64 * 1024
DATA_CONNECT_TIMEOUT = 3  # seconds a strict client waits for an unreachable address


def router_ruleset(client_device: str) -> str:
    """DNAT of the public control ports and passive range; nothing else gets in.

    DNAT applies only to packets from the outside (``client_device``), like a
    router without hairpin NAT: an inside client that dials the public address
    reaches the router itself, where nothing listens.
    """
    return f"""\
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{client_device}" ip daddr {ROUTER_PUBLIC_IP} tcp dport {{ 2121, 2122, 50000-50063 }} dnat to {SERVER_IP}
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct status dnat accept
        iifname != "{client_device}" accept
    }}
}}
"""


@dataclass
class NatLab:
    """The running NAT lab (see the module docstring)."""

    lab: netlab.Lab
    ca_file: Path
    direct: nodes.Node
    masq: nodes.Node
    insider: str  # namespace of the client on the private side

    def run(
        self, namespace: str, host: str, node: nodes.Node, session_list: list[Any]
    ) -> tuple[list[dict[str, Any]], str]:
        """Run sessions from ``namespace`` against ``host``:``node``'s control port."""
        spec = ftpsclient.spec_file(
            self.lab.directory / f"spec-{time.monotonic_ns()}.json",
            host, node.control_port, self.ca_file, PASSWORD, session_list,
            concurrency=4, data_connect_timeout=DATA_CONNECT_TIMEOUT,
        )  # fmt: skip
        results, why = ftpsclient.run(self.lab.exec_argv(namespace, []), spec, 120)
        return results, why + "\n" + nodes.explain(self.lab, ["direct", "masq"])


@pytest.fixture(scope="module")
def nat(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatLab]:
    """Namespaces, router rules and both gateways; all removed on every exit path."""
    nodes.require_lab("nft")
    directory = tmp_path_factory.mktemp("natlab")
    certificate = write_certificate(ca, directory, [ROUTER_PUBLIC_IP, SERVER_IP])
    lab = netlab.Lab(directory)
    with netlab.sigterm_interrupts():
        try:
            client, router, server, insider = (
                lab.add_namespace(role)
                for role in ("client", "router", "server", "insider")
            )
            _, router_public = lab.link(client, router, CLIENT_IP, ROUTER_PUBLIC_IP)
            lab.link(router, server, ROUTER_SERVER_SIDE_IP, SERVER_IP)
            lab.link(router, insider, ROUTER_INSIDE_IP, INSIDER_IP)
            lab.default_route(client, ROUTER_PUBLIC_IP)
            lab.default_route(server, ROUTER_SERVER_SIDE_IP)
            lab.default_route(insider, ROUTER_INSIDE_IP)
            lab.sysctl(router, "net.ipv4.ip_forward", "1")
            lab.nft(router, router_ruleset(router_public))

            direct = nodes.Node("direct", server, SERVER_IP, directory / "direct")
            masq = nodes.Node(
                "masq", server, SERVER_IP, directory / "masq", control_port=2122
            )
            configs = [
                (direct, nodes.write_config(direct, certificate, ports="50000-50031")),
                (
                    masq,
                    nodes.write_config(
                        masq,
                        certificate,
                        ports="50032-50063",
                        address=ROUTER_PUBLIC_IP,
                        sections=(
                            "[[passive.overrides]]\n"
                            'networks = ["10.88.0.0/16"]\naddress = ""\n'
                        ),
                    ),
                ),
            ]
            for node, config in configs:
                nodes.start(lab, node, config)
            for node, _ in configs:
                lab.wait_for_http(server, node.readyz)
            yield NatLab(lab, directory / "ca.pem", direct, masq, insider)
        finally:
            # Also runs on KeyboardInterrupt: pytest tears fixtures down on Ctrl-C.
            lab.close()


def assert_intact(result: dict[str, Any], node: nodes.Node, why: str) -> None:
    """The session worked and its upload is whole on ``node``'s disk and downloaded."""
    assert result["ok"], f"{result}\n{why}"
    assert result["sent_sha256"] == result["received_sha256"], why
    assert node.disk_sha256(result["name"]) == result["sent_sha256"], why


def test_strict_pasv_fails_without_masquerade_address(nat: NatLab) -> None:
    """Without ``[passive] address`` the 227 reply names the private 10.88.0.2, which
    the partner cannot reach: a strict PASV client times out on the data connection.

    This is the failure a partner reports as "login works, transfers hang"; EPSV
    clients (curl, lftp by default) never see it, which is why it needs this test.
    """
    session_list = ftpsclient.sessions("nat-nomasq-", 1, [CLIENT_IP], SIZE, ("pasv",))
    results, why = nat.run(nat.lab.client, ROUTER_PUBLIC_IP, nat.direct, session_list)
    [result] = results
    assert not result["ok"], f"{result}\n{why}"
    assert result["stage"] == "upload", f"{result}\n{why}"
    assert result["passive_address"] == SERVER_IP, f"{result}\n{why}"
    assert result["passive"][0] == SERVER_IP, f"{result}\n{why}"
    assert "timed out" in result["error"], f"{result}\n{why}"
    assert result["finished"] - result["started"] < DATA_CONNECT_TIMEOUT + 10, why
    assert nat.direct.disk_sha256(result["name"]) is None


def test_strict_pasv_works_with_masquerade_address(nat: NatLab) -> None:
    """With ``[passive] address`` = the router's public address, strict PASV clients
    upload and download intact through DNAT, and the gateway sees the real client."""
    session_list = ftpsclient.sessions("nat-masq-", 4, [CLIENT_IP], SIZE, ("pasv",))
    results, why = nat.run(nat.lab.client, ROUTER_PUBLIC_IP, nat.masq, session_list)
    assert len(results) == 4, why
    for result in results:
        assert_intact(result, nat.masq, why)
        assert result["passive"][0] == ROUTER_PUBLIC_IP, f"{result}\n{why}"
        assert result["client_ip"] == CLIENT_IP, f"{result}\n{why}"


@pytest.mark.parametrize("gateway", ["direct", "masq"])
def test_epsv_works_with_or_without_masquerade_address(
    nat: NatLab, gateway: str
) -> None:
    """EPSV replies carry only a port, so EPSV clients work whatever the address
    setting: the reason a wrong masquerade address goes unnoticed."""
    node = getattr(nat, gateway)
    session_list = ftpsclient.sessions(
        f"nat-epsv-{gateway}-", 3, [CLIENT_IP], SIZE, ("epsv",)
    )
    results, why = nat.run(nat.lab.client, ROUTER_PUBLIC_IP, node, session_list)
    assert len(results) == 3, why
    for result in results:
        assert_intact(result, node, why)


def test_passive_override_gives_inside_clients_the_private_address(
    nat: NatLab,
) -> None:
    """``[[passive.overrides]]`` sends a client on the private side the server's
    private address (the public one would hit the router, which has no hairpin NAT),
    while a partner outside still gets the public address, from the same gateway."""
    inside = ftpsclient.sessions("nat-inside-", 2, [INSIDER_IP], SIZE, ("pasv",))
    results, why = nat.run(nat.insider, SERVER_IP, nat.masq, inside)
    assert len(results) == 2, why
    for result in results:
        assert_intact(result, nat.masq, why)
        assert result["passive"][0] == SERVER_IP, f"{result}\n{why}"
        assert result["passive_address"] == SERVER_IP, f"{result}\n{why}"
    outside = ftpsclient.sessions("nat-outside-", 1, [CLIENT_IP], SIZE, ("pasv",))
    [result], why = nat.run(nat.lab.client, ROUTER_PUBLIC_IP, nat.masq, outside)
    assert_intact(result, nat.masq, why)
    assert result["passive"][0] == ROUTER_PUBLIC_IP, f"{result}\n{why}"
