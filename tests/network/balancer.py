"""Two gateway nodes behind HAProxy (TCP mode), in network namespaces.

::

    client ns                    lb ns                               node1 ns
    203.0.113.10-41  --veth--    203.0.113.1 | br0 10.87.0.1 --veth-- 10.87.0.11
    (32 source addresses)        haproxy     |              --veth-- 10.87.0.12
                                                                     node2 ns

HAProxy proxies (no namespace routes or forwards). The bridge inside the lb
namespace puts both nodes on one subnet with one balancer address, as a switch
would, so ``proxy_protocol_from`` names one address. Each session of the strict
client (``ftpsclient``) picks one of 32 client addresses, so source hashing spreads
partners over both nodes as it would real ones. Every node advertises the VIP
(203.0.113.1) in 227 replies and has its own disk, so the node that stored an
upload is a directory to look in.

HAProxy's stats socket (a file in the lab directory, no network) tells the drain
test when a node is marked down.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import sys
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

VIP = "203.0.113.1"
BALANCER_PRIVATE_IP = "10.87.0.1"
NODE_IPS = {"node1": "10.87.0.11", "node2": "10.87.0.12"}
CLIENT_SOURCES = [f"203.0.113.{host}" for host in range(10, 42)]
SHARED_PORTS = "50000-50063"
SUB_RANGES = {"node1": "50000-50031", "node2": "50032-50063"}


def haproxy_config(
    stats_socket: Path,
    *,
    control: str,
    passive: str,
    proxy: bool = False,
    checks: bool = False,
) -> str:
    """A TCP-mode HAProxy config for the two nodes.

    Args:
        control: ``balance`` of the control port (``roundrobin``, ``source``).
        passive: ``roundrobin`` or ``source`` over the shared range (design A of
            LOAD_BALANCING.md), or ``subranges``: each node's part of the range
            forwarded statically to it (design B).
        proxy: ``send-proxy-v2`` on the control servers (never on passive ones).
        checks: health checks of each node's ``/readyz`` every 200 ms, down after
            one failure, passive servers tracking their control server.
    """
    low, high = SHARED_PORTS.split("-")
    hashing = "    hash-type consistent\n"
    check_lines = (
        "    option httpchk\n"
        "    http-check send meth GET uri /readyz\n"
        "    http-check expect status 200\n"
    )
    control_servers = "".join(
        f"    server {name} {ip}:{nodes.CONTROL_PORT}"
        + (" send-proxy-v2" if proxy else "")
        + (
            f" check port {nodes.METRICS_PORT} inter 200ms fall 1 rise 1"
            if checks
            else ""
        )
        + "\n"
        for name, ip in NODE_IPS.items()
    )
    text = f"""\
global
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout check 1s

frontend control
    bind {VIP}:{nodes.CONTROL_PORT}
    default_backend control_nodes

backend control_nodes
    balance {control}
{hashing if control == "source" else ""}{check_lines if checks else ""}{control_servers}
"""
    if passive == "subranges":
        for name, ports in SUB_RANGES.items():
            track = f" track control_nodes/{name}" if checks else ""
            text += f"""
frontend passive_{name}
    bind {VIP}:{ports}
    default_backend passive_{name}

backend passive_{name}
    server {name} {NODE_IPS[name]}{track}
"""
    else:
        # No port on the server lines: each connection goes to the port the client
        # asked for. No send-proxy: data connections never carry a PROXY header.
        passive_servers = "".join(
            f"    server {name} {ip}"
            + (f" track control_nodes/{name}" if checks else "")
            + "\n"
            for name, ip in NODE_IPS.items()
        )
        text += f"""
frontend passive
    bind {VIP}:{low}-{high}
    default_backend passive_nodes

backend passive_nodes
    balance {passive}
{hashing if passive == "source" else ""}{passive_servers}"""
    return text


@dataclass
class TwoNodes:
    """The running lab: two nodes, HAProxy, and the client namespace."""

    lab: netlab.Lab
    ca_file: Path
    nodes: dict[str, nodes.Node]
    stats_socket: Path

    def spec(self, session_list: list[dict[str, Any]], **options: Any) -> Path:
        """A client spec file for ``session_list`` against the VIP."""
        return ftpsclient.spec_file(
            self.lab.directory / f"spec-{time.monotonic_ns()}.json",
            VIP, nodes.CONTROL_PORT, self.ca_file, PASSWORD, session_list,
            **options,
        )  # fmt: skip

    def run(
        self, session_list: list[dict[str, Any]], timeout: float = 300, **options: Any
    ) -> tuple[list[dict[str, Any]], str]:
        """Run sessions from the client namespace; (results by name, explanation)."""
        spec = self.spec(session_list, **options)
        results, why = ftpsclient.run(
            self.lab.exec_argv(self.lab.client, []), spec, timeout
        )
        return results, why + "\n" + self.explain()

    def explain(self) -> str:
        """The nodes' and HAProxy's stderr tails."""
        return nodes.explain(self.lab, [*self.nodes, "haproxy"])

    def stored_on(self, file_name: str) -> dict[str, str]:
        """{node name: sha256} of every node holding ``file_name``."""
        found = {}
        for name, node in self.nodes.items():
            digest = node.disk_sha256(file_name)
            if digest is not None:
                found[name] = digest
        return found

    def server_status(self, backend: str, server: str) -> str:
        """HAProxy's view of one server ("UP", "DOWN", ...), from its stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stats:
            stats.settimeout(5)
            stats.connect(str(self.stats_socket))
            stats.sendall(b"show stat\n")
            received = b""
            while chunk := stats.recv(65536):
                received += chunk
        rows = csv.DictReader(io.StringIO(received.decode().lstrip("# ")))
        for row in rows:
            if row["pxname"] == backend and row["svname"] == server:
                return row["status"]
        raise LookupError(f"{backend}/{server} not in HAProxy's stats")


def wait_for_frontend(lab: netlab.Lab) -> None:
    """Wait until HAProxy accepts TCP connections on the VIP's control port."""
    probe = (
        "import socket, sys, time\n"
        f"deadline = time.monotonic() + {netlab.READY_TIMEOUT}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        socket.create_connection(({VIP!r}, {nodes.CONTROL_PORT}), 5).close()\n"
        "        sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "sys.exit(1)\n"
    )
    result = lab.run(
        lab.client, [sys.executable, "-c", probe], netlab.READY_TIMEOUT + 30
    )
    if result.returncode != 0:
        raise netlab.LabError(f"HAProxy never listened on {VIP}: {result.stderr}")


@contextlib.contextmanager
def two_nodes(
    ca: trustme.CA,
    directory: Path,
    *,
    haproxy: dict[str, Any],
    sub_ranges: bool = False,
    passive_timeout: int = 2,
    server_extra: str = "",
    sections: str = "",
) -> Iterator[TwoNodes]:
    """Build the lab, start both nodes and HAProxy; tear everything down on exit.

    ``haproxy`` holds the keywords of ``haproxy_config``. ``sub_ranges`` gives each node its part of the
    passive range instead of the whole; ``server_extra`` and ``sections`` go into
    both nodes' configs.
    """
    nodes.require_lab("haproxy")
    certificate = write_certificate(ca, directory, [VIP])
    lab = netlab.Lab(directory)
    with netlab.sigterm_interrupts():
        try:
            client, balancer = lab.add_namespace("client"), lab.add_namespace("lb")
            to_lb, _ = lab.link(client, balancer, CLIENT_SOURCES[0], VIP)
            for source in CLIENT_SOURCES[1:]:
                lab.add_address(client, to_lb, source)
            bridge_ports = []
            running: dict[str, nodes.Node] = {}
            for name, ip in NODE_IPS.items():
                namespace = lab.add_namespace(name)
                port, _ = lab.link(balancer, namespace, None, ip)
                bridge_ports.append(port)
                running[name] = nodes.Node(name, namespace, ip, directory / name)
            lab.add_bridge(balancer, BALANCER_PRIVATE_IP, bridge_ports)
            for name, node in running.items():
                config = nodes.write_config(
                    node,
                    certificate,
                    ports=SUB_RANGES[name] if sub_ranges else SHARED_PORTS,
                    address=VIP,
                    passive_timeout=passive_timeout,
                    server_extra=server_extra,
                    sections=sections,
                )
                nodes.start(lab, node, config)
            for node in running.values():
                lab.wait_for_http(balancer, node.readyz)
            executable = shutil.which("haproxy")
            assert executable is not None  # require_lab checked
            haproxy_cfg = directory / "haproxy.cfg"
            stats_socket = directory / "haproxy.sock"
            haproxy_cfg.write_text(
                haproxy_config(stats_socket, **haproxy), encoding="utf-8"
            )
            lab.start(balancer, [executable, "-db", "-f", str(haproxy_cfg)], "haproxy")
            try:
                wait_for_frontend(lab)
            except netlab.LabError as err:
                pytest.fail(f"{err}\n{lab.log('haproxy')}")
            yield TwoNodes(lab, directory / "ca.pem", running, stats_socket)
        finally:
            # Also runs on KeyboardInterrupt: pytest tears fixtures down on Ctrl-C.
            lab.close()


def intact_problems(deployment: TwoNodes, results: list[dict[str, Any]]) -> list[str]:
    """What is wrong with sessions that should all be intact, one line per problem.

    Intact: the session worked; the download equals the upload; the file is on
    the disk of the node SITE DIAG named, whole, and on no other node.
    """
    problems = []
    for result in results:
        name = result["name"]
        if not result["ok"]:
            problems.append(
                f"{name}: failed at {result['stage']}: {result.get('error')}"
            )
            continue
        if result.get("received_sha256") != result["sent_sha256"]:
            problems.append(f"{name}: download differs from upload")
        stored = deployment.stored_on(name)
        if stored != {result["node"]: result["sent_sha256"]}:
            problems.append(f"{name}: answered by {result['node']}, on disk: {stored}")
    return problems
