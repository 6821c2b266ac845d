"""Passive-mode listeners: ports from the configured range only, one per PASV/EPSV,
listening until a connection passes the session's binding check.

Replaces pyftpdlib's ``PassiveDTP``, which (measured on 2.2.0) binds a random port
outside the range when the range is exhausted, picks the 227 address by the server's
local address instead of the client's network, and writes an unsolicited 425 on the
victim's control channel when a foreign IP connects to the port.
"""

from __future__ import annotations

import errno
import functools
import itertools
import secrets
import socket
import sys
from typing import TYPE_CHECKING, Any

from pyftpdlib.ioloop import Acceptor

from ftps_gateway.policy.netpolicy import strip_mapped

if TYPE_CHECKING:
    from ftps_gateway.config import PassiveSettings
    from ftps_gateway.ftp.control import ControlHandler
    from ftps_gateway.session.runtime import PortsInUse


# Connections the kernel completes for a passive port before the loop accepts them.
LISTEN_BACKLOG = 16


class PassivePortsExhausted(Exception):  # noqa: N818 - a condition, not a bug
    """Every port of the passive range is in use."""


# A percentage of 100 means no cap.
_WHOLE = 100


def share_caps(passive: PassiveSettings, share: tuple[int, int]) -> tuple[int, int]:
    """Listeners one user, and one client address, may hold in this worker's share.

    A percentage of the share, at least one: per worker, so the whole range obeys
    the same percentage with no coordination between workers. 100 % is no cap at
    all (the range's own 425 then says what happened).
    """
    size = len(worker_ports(passive.port_min, passive.port_max, share))

    def cap(percent: int) -> int:
        return sys.maxsize if percent >= _WHOLE else max(1, size * percent // _WHOLE)

    return cap(passive.max_ports_per_user_percent), cap(
        passive.max_ports_per_ip_percent
    )


@functools.lru_cache(maxsize=16)
def worker_ports(port_min: int, port_max: int, share: tuple[int, int]) -> list[int]:
    """The passive ports worker ``index`` of ``count`` tries first (computed once).

    Port P belongs to worker ``(P - port_min) % count``: disjoint shares, so two
    workers rarely try the same port, and no coordination is needed per PASV.
    """
    index, count = share
    return list(range(port_min + index, port_max + 1, count))


@functools.lru_cache(maxsize=16)
def borrowable_ports(port_min: int, port_max: int, share: tuple[int, int]) -> list[int]:
    """The other workers' ports, tried when this worker's share is all in use.

    Borrowing needs no supervisor: the kernel lets one socket listen on a port,
    whatever process asks (SO_REUSEADDR only reuses ports whose sockets are not
    listening), so bind+listen is the arbiter across workers as it is within one.
    The owner of a borrowed port finds it taken and moves on to its next one. Without
    this, a worker that got more port-holding sessions than its share answered 425
    while other shares had free ports (issue 14: 19 of 20 ports held, the 20th
    free in the other worker's share); connections land on workers unevenly (35:5,
    33:7, 2:38, 21:19 for 40 sequential sessions on 2 workers, measured).
    """
    own = set(worker_ports(port_min, port_max, share))
    return [port for port in range(port_min, port_max + 1) if port not in own]


class PassiveListener(Acceptor):
    """Listens on one port of the range until a connection passes the binding check.

    It does not stop at the first connection: a stranger that the address rule lets
    through (``required-any-ip``, a PROXY balancer's address) and that then says
    nothing would otherwise hold the port closed for ``connect_timeout_seconds``,
    and the partner's own connection would be refused. Every connection from an
    address the rule allows goes to the control session as a pending data
    connection; the session closes this listener when one of them passes.
    """

    def __init__(
        self,
        control: ControlHandler,
        port_min: int,
        port_max: int,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        """Listen on a free port of this worker's share (or borrow one)."""
        self.control = control
        super().__init__(ioloop=control.ioloop)
        local_ip = control.socket.getsockname()[0]
        try:
            ports = worker_ports(port_min, port_max, share)
            sock = self._listen_in_range(control.socket.family, local_ip, ports)
        except PassivePortsExhausted:
            ports = borrowable_ports(port_min, port_max, share)
            sock = self._listen_in_range(control.socket.family, local_ip, ports)
        self.set_socket(sock)
        self.accepting = True
        self.port: int = sock.getsockname()[1]
        self._timer: Any = None
        self._in_use: PortsInUse | None = control.gateway.passive_ports
        self._holder = control.passive_holder()
        self._in_use.take(*self._holder)

    @staticmethod
    def _listen_in_range(family: int, local_ip: str, ports: list[int]) -> socket.socket:
        """Listen on a random free port of the range, or raise PassivePortsExhausted.

        SO_REUSEADDR lets a port whose last data connection sits in TIME_WAIT be
        reused (the server closes downloads first); Linux still refuses a second
        listener on a port, so bind+listen is the whole allocation protocol.
        """
        # A random starting point, then in order: spreads ports without shuffling the
        # whole range on every PASV (0.3 ms at 400 ports, measured).
        start = secrets.randbelow(len(ports)) if ports else 0
        for port in itertools.chain(ports[start:], ports[:start]):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(0.0)
            try:
                sock.bind((local_ip, port))
                sock.listen(LISTEN_BACKLOG)
            except OSError as err:
                sock.close()
                if err.errno in (errno.EADDRINUSE, errno.EACCES, errno.EPERM):
                    continue
                raise
            return sock
        raise PassivePortsExhausted

    def start_timer(self, seconds: float) -> None:
        """Give the client ``seconds`` to connect."""
        self._timer = self.ioloop.call_later(seconds, self.handle_timeout)

    def handle_accepted(self, sock: socket.socket, addr: tuple[Any, ...]) -> None:
        """Hand a connection the address rule allows to the control session (which
        closes this listener once one passes); close any other at once."""
        peer_ip = strip_mapped(addr[0])
        if not self.control.is_session_data_peer(peer_ip):
            # Someone else knocked on this session's port. Say nothing to the
            # victim's control channel; keep waiting for the real client.
            sock.close()
            self.control.on_foreign_data_connection(peer_ip)
            return
        self.control.on_data_connection_accepted(sock)

    def handle_timeout(self) -> None:
        """The time to connect is over: accept no more (pending ones go on)."""
        self.close()
        self.control.on_data_connection_timeout()

    def handle_error(self) -> None:
        """Never let a listener's error reach the loop."""
        self.close()
        self.control.log_exception(self)

    def close(self) -> None:
        """Stop listening and cancel the timer."""
        if self._timer_pending():
            self._timer.cancel()
        in_use = getattr(self, "_in_use", None)
        if in_use is not None:
            in_use.give_back(*self._holder)
            self._in_use = None
        super().close()

    def _timer_pending(self) -> bool:
        timer = getattr(self, "_timer", None)
        return timer is not None and not timer.cancelled
