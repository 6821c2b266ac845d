"""A throw-away network of Linux network namespaces: client, HAProxy, gateway.

::

    client ns                  balancer ns                     server ns
    203.0.113.10/24  --veth--  203.0.113.1/24 | 10.87.0.1/24  --veth--  10.87.0.2/24
    curl, goftps               haproxy (TCP mode)                        ftps_gateway

The client network is TEST-NET-3 (RFC 5737); the server side is private. HAProxy
proxies, it does not route, so no namespace forwards packets and none needs a route
to the other side. Nothing touches the host namespace: both ends of each veth pair
are created inside the namespaces (``ip -n NS link add ... peer ... netns OTHER``),
no address, route, sysctl or firewall rule changes outside them. Namespace names
carry a random suffix, so concurrent test runs do not collide.

Other tests build other shapes from the same blocks (``add_namespace``, ``link``,
``add_bridge``, ``default_route``, ``sysctl``, ``nft``): a NAT router
(``test_nat``), two gateway nodes behind one balancer (``test_two_nodes``). Where a
namespace routes (a NAT router), ``ip_forward`` and the nftables rules are set inside
that namespace only.

``Lab.close`` kills every process the lab started and deletes its namespaces; it is
idempotent, and it is registered with ``atexit`` as a second line of defence behind
the fixture's ``finally``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

PREFIX = "ftpsgw-test"

CLIENT_IP = "203.0.113.10"
BALANCER_PUBLIC_IP = "203.0.113.1"  # what partners connect to; the 227 address
BALANCER_PRIVATE_IP = "10.87.0.1"  # what the gateway sees as every client
SERVER_IP = "10.87.0.2"
CONTROL_PORT = 2121
PASSIVE_PORTS = (50000, 50063)

COMMAND_TIMEOUT = 30
READY_TIMEOUT = 60  # other test runs share the machine's two cores
STOP_TIMEOUT = 10


class LabError(RuntimeError):
    """The namespaces or the processes in them could not be set up."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab, or None if it can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"{PREFIX}-probe-{secrets.token_hex(4)}"
    added = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if added.returncode != 0:
        return f"ip netns add is not permitted here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise LabError with its output on failure."""
    result = subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Lab:
    """Three namespaces joined by two veth pairs, and the processes started in them."""

    directory: Path
    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _closed: bool = False

    @property
    def client(self) -> str:
        """The partner's namespace."""
        return self.namespace("client")

    @property
    def balancer(self) -> str:
        """HAProxy's namespace."""
        return self.namespace("lb")

    @property
    def server(self) -> str:
        """The gateway's namespace."""
        return self.namespace("server")

    def create(self) -> None:
        """Create the namespaces and wire them up (see the module docstring)."""
        for role in ("client", "lb", "server"):
            self.add_namespace(role)
        self.link(self.client, self.balancer, CLIENT_IP, BALANCER_PUBLIC_IP)
        self.link(self.balancer, self.server, BALANCER_PRIVATE_IP, SERVER_IP)

    # --- building blocks for other topologies (test_nat, test_two_nodes)

    def namespace(self, role: str) -> str:
        """The namespace name for ``role`` in this lab (``role``: letters and digits)."""
        return f"{PREFIX}-{self.suffix}-{role}"

    def add_namespace(self, role: str) -> str:
        """Create the namespace for ``role`` with its loopback up; return its name.

        The first call arms the ``atexit`` clean-up, before anything exists.
        """
        if not self.namespaces:
            atexit.register(self.close)
        namespace = self.namespace(role)
        # Recorded first: a Ctrl-C right after the ``add`` still deletes it (deleting
        # a namespace that was never made is harmless).
        self.namespaces.append(namespace)
        ip("netns", "add", namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def link(
        self,
        left: str,
        right: str,
        left_ip: str | None = None,
        right_ip: str | None = None,
    ) -> tuple[str, str]:
        """Join two namespaces with a veth pair; return the (left, right) device names.

        The pair is created inside ``left`` with its peer placed straight into
        ``right``: no end of it ever exists in the host namespace. Each end is named
        after the namespace it leads to (``to-<role>``). An address given becomes a
        /24 on its end; an end without one is left for ``add_address`` or a bridge.
        """
        to_right, to_left = (
            f"to-{right.rsplit('-', 1)[1]}",
            f"to-{left.rsplit('-', 1)[1]}",
        )
        ip("-n", left, "link", "add", to_right, "type", "veth",
           "peer", "name", to_left, "netns", right)  # fmt: skip
        for namespace, device, address in (
            (left, to_right, left_ip),
            (right, to_left, right_ip),
        ):
            if address is not None:
                ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
        return to_right, to_left

    def add_bridge(
        self, namespace: str, address: str, ports: list[str], name: str = "br0"
    ) -> None:
        """A bridge inside ``namespace`` with ``address``/24, over the devices ``ports``.

        Several namespaces then share one subnet (and one address of ``namespace``),
        as nodes behind a balancer do on a switch.
        """
        ip("-n", namespace, "link", "add", name, "type", "bridge")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", name)
        for port in ports:
            ip("-n", namespace, "link", "set", port, "master", name)
        ip("-n", namespace, "link", "set", name, "up")

    def add_address(self, namespace: str, device: str, address: str) -> None:
        """One more /24 address on ``device`` (e.g. a second client source address)."""
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)

    def default_route(self, namespace: str, via: str) -> None:
        """Send everything ``namespace`` has no closer route for through ``via``."""
        ip("-n", namespace, "route", "add", "default", "via", via)

    def sysctl(self, namespace: str, key: str, value: str) -> None:
        """Set a per-namespace sysctl (``net.ipv4.ip_forward`` in a router ns)."""
        self._checked(namespace, ["sysctl", "-q", "-w", f"{key}={value}"])

    def nft(self, namespace: str, ruleset: str) -> None:
        """Load an nftables ``ruleset`` into ``namespace`` (its own, empty, tables)."""
        self._checked(namespace, ["nft", "-f", "-"], stdin=ruleset)

    def _checked(
        self, namespace: str, argv: list[str], stdin: str | None = None
    ) -> None:
        result = subprocess.run(
            self.exec_argv(namespace, argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {namespace}: {result.stderr.strip()}")

    def exec_argv(self, namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def run(
        self, namespace: str, argv: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``namespace`` to completion (bounded), output captured."""
        return subprocess.run(
            self.exec_argv(namespace, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, namespace: str, argv: list[str], name: str) -> Path:
        """Start a long-running ``argv`` in ``namespace``; return its stdout log path.

        stderr goes to ``<name>.stderr`` next to it. ``ip netns exec`` execs the
        command, so the process we hold is the process we kill.
        """
        stdout_path = self.directory / f"{name}.stdout"
        stdout = stdout_path.open("wb")
        stderr = (self.directory / f"{name}.stderr").open("wb")
        self._logs += [stdout, stderr]
        process = subprocess.Popen(
            self.exec_argv(namespace, argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # a Ctrl-C in the terminal is pytest's alone
        )
        self.processes.append(process)
        self.named[name] = process
        return stdout_path

    def log(self, name: str) -> str:
        """What process ``name`` wrote so far (stdout, then stderr)."""
        parts = []
        for stream in ("stdout", "stderr"):
            path = self.directory / f"{name}.{stream}"
            text = (
                path.read_text(encoding="utf-8", errors="replace")
                if path.exists()
                else ""
            )
            parts.append(f"--- {name} {stream} ---\n{text}")
        return "\n".join(parts)

    def wait_for_http(self, namespace: str, url: str) -> None:
        """Wait until ``url``, fetched from inside ``namespace``, answers 200.

        Used on the gateways' ``/readyz``: a node is ready once it says so, whatever
        its access rules would do to a control connection.
        """
        probe = (
            "import sys, time, urllib.request\n"
            f"deadline = time.monotonic() + {READY_TIMEOUT}\n"
            "while time.monotonic() < deadline:\n"
            "    try:\n"
            f"        with urllib.request.urlopen({url!r}, timeout=5) as r:\n"
            "            if r.status == 200:\n"
            "                sys.exit(0)\n"
            "    except OSError:\n"
            "        pass\n"
            "    time.sleep(0.2)\n"
            "sys.exit(1)\n"
        )
        result = self.run(
            namespace, [sys.executable, "-c", probe], timeout=READY_TIMEOUT + 30
        )
        if result.returncode != 0:
            dead = [p.args for p in self.processes if p.poll() is not None]
            raise LabError(
                f"{url} not ready within {READY_TIMEOUT} s "
                f"(exited: {dead}); {result.stderr.strip()}"
            )

    def wait_for_banner(self, host: str, port: int) -> None:
        """Wait until a client in the client namespace gets a 220 through ``host``."""
        probe = (
            "import socket, sys, time\n"
            f"deadline = time.monotonic() + {READY_TIMEOUT}\n"
            "while time.monotonic() < deadline:\n"
            "    try:\n"
            f"        with socket.create_connection(({host!r}, {port}), timeout=5) as s:\n"
            "            s.settimeout(5)\n"
            "            if s.recv(4).startswith(b'220'):\n"
            "                sys.exit(0)\n"
            "    except OSError:\n"
            "        pass\n"
            "    time.sleep(0.2)\n"
            "sys.exit(1)\n"
        )
        result = self.run(
            self.client, [sys.executable, "-c", probe], timeout=READY_TIMEOUT + 30
        )
        if result.returncode != 0:
            dead = [p.args for p in self.processes if p.poll() is not None]
            raise LabError(
                f"no 220 banner from {host}:{port} within {READY_TIMEOUT} s "
                f"(exited: {dead}); {result.stderr.strip()}"
            )

    def close(self) -> None:
        """Stop every process (TERM, then KILL), delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        for log in self._logs:
            log.close()
        # Deleting a namespace destroys the veth ends inside it (and so their peers).
        for namespace in reversed(self.namespaces):
            subprocess.run(
                ["ip", "netns", "del", namespace],
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        self.namespaces.clear()
        atexit.unregister(self.close)


def haproxy_config(path: Path) -> Path:
    """Write a TCP-mode HAProxy config: control port and passive range to the gateway.

    ``balance source`` keeps a partner's control and data connections on one gateway
    node (there is one here, but the config is the one to deploy). A server line
    without a port sends each connection to the port the client connected to, so
    the whole passive range needs one line.
    """
    low, high = PASSIVE_PORTS
    path.write_text(
        f"""\
global
    maxconn 4096

defaults
    mode tcp
    timeout connect 10s
    timeout client 120s
    timeout server 120s

frontend ftps_control
    bind {BALANCER_PUBLIC_IP}:{CONTROL_PORT}
    default_backend gateway_control

backend gateway_control
    balance source
    server gw1 {SERVER_IP}:{CONTROL_PORT}

frontend ftps_passive
    bind {BALANCER_PUBLIC_IP}:{low}-{high}
    default_backend gateway_passive

backend gateway_passive
    balance source
    server gw1 {SERVER_IP}
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the lab runs, so a cancelled CI job cleans up.

    pytest tears fixtures down on KeyboardInterrupt but dies on a bare SIGTERM,
    which would leave namespaces and processes behind. The previous handler comes
    back afterwards. Outside the main thread (no signals there) this does nothing.
    """

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
