"""PASV/EPSV plumbing of a control session: ports, accepted connections, failures.

A mixin for ``control.ControlHandler``. A data connection goes through three doors:
its passive port (``passive.PassiveListener``: the address rule of
``session.binding``), its TLS handshake (``data.DataHandler``), and the TLS rule of
``session.binding`` (resumed this control session's own session?). Only then does it
become pyftpdlib's ``data_channel`` and start the queued transfer.

The port keeps listening until a connection passes all three: several may be
*pending* at once (``MAX_PENDING_DATA``, each with its own handshake timer), the
first that passes wins, the others are closed. A stranger that fails a door from
another address (a balancer, a NAT pool: ``required-any-ip`` or PROXY) is closed on
its own, so a silent, junk or non-resuming stranger cannot hold the port or spoil
the partner's transfer; the partner's own failing client (its own address) hears
425 at once. At the bound, a new connection makes the oldest pending one give way:
the partner's client completes its handshake within round trips, a stranger that
waits must keep reconnecting to stay.

A data path whose transfer command already failed (``550`` to a RETR of a missing
file) is *orphaned*: the client hanging up on it, before TLS or without connecting
at all, is what clients do (Go's FTP libraries dial the port before the command and
start TLS only after a 1xx reply), so it is closed quietly: no audit line, no
refusal metric. Counting it as a failed handshake made alerts fire on normal use.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.passive import (
    PassiveListener,
    PassivePortsExhausted,
    share_caps,
)
from ftps_gateway.policy.netpolicy import (
    PassiveAddressError,
    address_key,
    strip_mapped,
)
from ftps_gateway.session import binding

# Data connections of one PASV/EPSV waiting for their TLS handshake and check.
MAX_PENDING_DATA = 4
# Commands that use the data connection arranged by PASV/EPSV.
TRANSFER_COMMANDS = frozenset({"RETR", "STOR", "APPE", "LIST", "NLST", "MLSD"})
# Handshake failures that only mean "the client went away" (no TLS error of its own):
# on an orphaned data path, the normal end of it.
CLIENT_LEFT_REASONS = frozenset(
    {"tls-handshake: eof-during-handshake", "tls-handshake: peer-disconnected",
     "tls-handshake: timeout"}
)  # fmt: skip

if TYPE_CHECKING:
    from ftps_gateway.ftp.control import ControlHandler
    from ftps_gateway.ftp.data import DataHandler
    from ftps_gateway.policy.netpolicy import DataChannelPolicy
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import Gateway, GatewayHolder
    from ftps_gateway.tls.contexts import SessionContext


class DataPathMixin:
    """Passive data connections of one control session."""

    _pending: tuple[DataHandler, ...] = ()  # accepted, TLS not finished, oldest first
    _data_failure_reply: str | None = None  # why the last data connection failed
    _data_path_orphaned = False  # its transfer command failed (see module doc)
    command_verb = ""  # the verb of the command being answered (control.py sets it)
    last_data_tls: tuple[str, bool] | None = None  # (version, resumed), SITE DIAG
    proxy_ip: str | None = None  # the balancer, when a PROXY header named us
    network_policy: DataChannelPolicy | None = None
    data_policy: DataChannelPolicy | None = None

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        gateways: ClassVar[GatewayHolder]
        events: SessionEvents
        socket: Any
        tls_context: SessionContext | None
        data_channel: Any
        dtp_handler: type[DataHandler]
        _closed: bool
        _dtp_acceptor: Any
        _dtp_connector: Any
        _in_dtp_queue: Any
        _out_dtp_queue: Any

        @property
        def gateway(self) -> Gateway: ...
        @property
        def client_ip(self) -> str: ...
        def _on_dtp_connection(self) -> None: ...

    @property
    def control(self) -> ControlHandler:
        """This session, as the listener and the data handler know it."""
        return cast("ControlHandler", self)

    @property
    def binding_policy(self) -> DataChannelPolicy | None:
        """The user's data-connection policy after login, the network's before."""
        return self.data_policy or self.network_policy

    def respond(self, resp: str, logfun: Any = None) -> None:
        """Note whether a transfer command's reply orphaned its data path."""
        if self.command_verb in TRANSFER_COMMANDS:
            if resp[:1] == "1":
                self._data_path_orphaned = False
            elif resp[:1] in "45" and not self._transfer_queued():
                self._data_path_orphaned = True
        if logfun is None:
            super().respond(resp)  # type: ignore[misc]
        else:
            super().respond(resp, logfun)  # type: ignore[misc]

    def _transfer_queued(self) -> bool:
        return self._in_dtp_queue is not None or self._out_dtp_queue is not None

    def transfer_busy(self) -> bool:
        """A transfer already owns the data path: begun on the data connection, or
        queued for it (150 sent, no connection yet).

        pyftpdlib hands a second transfer command the same connection (``125``) or
        the same queue slot, replacing the first transfer's file object: an upload
        orphaned that way kept its quota reservation, its temporary file, its lock
        and its descriptor for the worker's life (under ``quota_files = 1`` the
        user could upload nothing more), and the bytes still arriving for it went
        into the second file. So a second one is refused (control.py).
        """
        channel = self.data_channel
        if channel is not None and (channel.receive or channel.cmd is not None):
            return True
        return self._transfer_queued()

    # --- PASV / EPSV

    def _make_epasv(self, extmode: bool = False) -> None:
        """PASV/EPSV: one port from the range, the address for this client's network."""
        self._data_failure_reply = None
        self._data_path_orphaned = False
        self._shutdown_connecting_dtp()
        if self.data_channel is not None:
            self.data_channel.close()
            self.data_channel = None
        passive = self.gateway.config.passive
        limit = self.gateway.passive_ports.refusal(
            *self.passive_holder(), share_caps(passive, self.gateways.worker)
        )
        if limit is not None:
            self.events.data_refused(limit)
            self.respond(replies.PASSIVE_LIMITS[limit])
            return
        try:
            listener = PassiveListener(
                self.control, passive.port_min, passive.port_max, self.gateways.worker
            )
        except PassivePortsExhausted:
            self.events.data_refused("passive-range-exhausted")
            self.respond(replies.PASSIVE_EXHAUSTED)
            return
        if extmode:
            reply = replies.EPSV.format(port=listener.port)
        else:
            local_ip = strip_mapped(self.socket.getsockname()[0])
            try:
                address = self.pasv_address(local_ip)
            except PassiveAddressError as err:
                listener.close()
                self.events.data_refused("passive-address", detail=str(err))
                self.respond(replies.PASSIVE_NO_ADDRESS)
                return
            reply = replies.PASV.format(
                address=address.replace(".", ","),
                high=listener.port // 256,
                low=listener.port % 256,
            )
        listener.start_timer(passive.connect_timeout_seconds)
        self._dtp_acceptor = listener
        self.respond(reply)

    def passive_holder(self) -> tuple[str, str]:
        """Whose passive listeners these are: (user, client address key)."""
        username: str = getattr(self, "username", "")
        prefix = self.gateway.config.access.ipv6_prefix_length
        return username, address_key(self.client_ip, prefix)

    def pasv_address(self, local_ip: str) -> str:
        """The IPv4 address a 227 reply gives this client (RFC 959 has no IPv6 form)."""
        address = self.gateway.passive_policy.address_for(self.client_ip, local_ip)
        if ":" in address:
            raise PassiveAddressError("a 227 reply cannot carry an IPv6 address")
        return address

    def _shutdown_connecting_dtp(self) -> None:
        super()._shutdown_connecting_dtp()  # type: ignore[misc]
        self._close_pending_data()

    def _close_pending_data(self) -> None:
        pending, self._pending = self._pending, ()
        for handler in pending:
            handler.close()  # never approved: a quiet close

    def _close_listener(self) -> None:
        listener, self._dtp_acceptor = self._dtp_acceptor, None
        if listener is not None:
            listener.close()

    # --- the three doors

    def is_session_data_peer(self, peer_ip: str) -> bool:
        """The address rule (``session.binding.is_session_peer``)."""
        return binding.is_session_peer(
            self.binding_policy, peer_ip, self.client_ip, self.proxy_ip
        )

    def on_foreign_data_connection(self, peer_ip: str) -> None:
        """A foreign address connected to the port; the victim hears nothing."""
        self.events.data_refused("foreign-ip", peer_ip=peer_ip)

    def on_data_connection_accepted(self, sock: Any) -> None:
        """A connection the address rule allows: pending, TLS comes next."""
        peer = ""
        with contextlib.suppress(OSError):
            peer = strip_mapped(str(sock.getpeername()[0]))
        if len(self._pending) >= MAX_PENDING_DATA:
            oldest, self._pending = self._pending[0], self._pending[1:]
            self.events.data_refused("pending-evicted", peer_ip=oldest.peer_ip)
            oldest.close()
        handler = self.dtp_handler(sock, self.control)
        handler.peer_ip = peer
        if handler.connected and not handler._closed:  # noqa: SLF001 - pyftpdlib's
            self._pending = (*self._pending, handler)

    def accept_data_channel(self, handler: DataHandler) -> bool:
        """The TLS rule, right after the data connection's handshake.

        "Resumed" means resumed *this* control session's TLS session
        (``SessionContext.resumed_here``: the session id context, and for TLS 1.2
        the master secret), not merely ``session_reused``.
        """
        context = self.tls_context
        if context is not None:
            handler.resumed = context.resumed_here(handler.socket, self.socket)
            if not handler.resumed:
                context.release(handler.socket)  # its session resumes nothing here
        if handler not in self._pending:
            return False
        version = str(handler.socket.version())
        self.last_data_tls = (version, bool(handler.resumed))
        self.events.data_handshake_done(version, resumed=bool(handler.resumed))
        policy = self.binding_policy
        if handler.resumed or not binding.needs_resumption(policy):
            return True
        self._drop_pending(handler)
        self._refused(
            handler, "not-resumed", replies.NOT_RESUMED, version=version,
            policy=policy.source if policy is not None else None,
        )  # fmt: skip
        return False

    def on_data_channel_ready(self, handler: DataHandler) -> None:
        """TLS is up and the rule passed: this one wins, the others are closed."""
        if handler not in self._pending:
            handler.close()
            return
        self._drop_pending(handler)
        self._close_listener()
        self._close_pending_data()
        self.events.tls_established(
            "data", handler.socket.version(), resumed=bool(handler.resumed)
        )
        self.data_channel = handler
        # The data connection used up a TLS 1.3 ticket: the next reply on the
        # control connection carries a fresh one for the next data connection.
        self.gateway.tickets.refresh(self.socket)
        self._on_dtp_connection()

    def on_data_channel_failed(self, handler: DataHandler, reason: str) -> None:
        """TLS on the data connection failed or timed out."""
        if handler not in self._pending:
            return
        self._drop_pending(handler)
        if self._data_path_orphaned and reason in CLIENT_LEFT_REASONS:
            return  # its command failed already: the client hung up (module doc)
        self._refused(handler, reason, replies.DATA_TLS_FAILED)

    def on_data_connection_timeout(self) -> None:
        """Nobody (else) connected to the passive port in time."""
        self._dtp_acceptor = None
        if self._pending:
            return  # connections still in their handshakes decide
        if self._data_path_orphaned:
            return  # its command failed already: nobody was meant to connect
        self.events.data_refused("no-connection-within-timeout")
        self._fail_data_connection(replies.DATA_TIMEOUT)

    def _drop_pending(self, handler: DataHandler) -> None:
        self._pending = tuple(other for other in self._pending if other is not handler)

    def _refused(
        self, handler: DataHandler, reason: str, reply: str, **fields: Any
    ) -> None:
        """A pending connection failed a door: the partner's own fails the transfer
        (425 now, the port closed); a stranger's is closed alone."""
        if binding.fails_the_transfer(handler.peer_ip, self.client_ip):
            self._close_listener()
            self._close_pending_data()
            self.events.data_refused(
                reason, peer_ip=handler.peer_ip, still_listening=False, **fields
            )
            self._fail_data_connection(reply)
            return
        still_listening = self._dtp_acceptor is not None
        self.events.data_refused(
            reason, peer_ip=handler.peer_ip, still_listening=still_listening, **fields
        )
        self._fail_if_nothing_left()

    def _fail_if_nothing_left(self) -> None:
        """No port and no pending connection left: the wait is over (425)."""
        if self._dtp_acceptor is not None or self._pending:
            return
        self.events.data_refused("no-connection-within-timeout")
        self._fail_data_connection(replies.DATA_TIMEOUT)

    # --- transfers waiting for a data connection

    def push_dtp_data(
        self, data: Any, isproducer: bool = False, file: Any = None, cmd: Any = None
    ) -> None:
        """Queue a listing or download, but only if a data connection is on its way."""
        if not self.data_path_arranged():
            if file is not None:
                file.close()
            self.respond(self.take_data_failure_reply())
            return
        super().push_dtp_data(data, isproducer, file, cmd)  # type: ignore[misc]

    def take_data_failure_reply(self) -> str:
        """Why the last data connection failed (once), else "use PASV first"."""
        reply, self._data_failure_reply = self._data_failure_reply, None
        return reply or replies.NO_DATA_PATH

    def data_path_arranged(self) -> bool:
        """A data connection exists or is on its way (a port listens for it)."""
        return any(
            item is not None
            for item in (
                self.data_channel,
                self._pending or None,
                self._dtp_acceptor,
                self._dtp_connector,
            )
        )

    def transfer_in_progress(self) -> bool:
        """A transfer is running or waiting for its data connection (for the drain)."""
        return any(
            item is not None
            for item in (
                self.data_channel,
                self._pending or None,
                self._in_dtp_queue,
                self._out_dtp_queue,
            )
        )

    def _fail_data_connection(self, reply: str) -> None:
        """Answer the transfer waiting for this connection, or the next one."""
        if not self._fail_queued_transfer(reply):
            self._data_failure_reply = reply

    def _fail_queued_transfer(self, reply: str) -> bool:
        """Answer a transfer command waiting for a data connection; False if none."""
        queued = False
        if self._out_dtp_queue is not None:
            file_obj = self._out_dtp_queue[2]
            if file_obj is not None:
                file_obj.close()
            self._out_dtp_queue = None
            queued = True
        if self._in_dtp_queue is not None:
            self._in_dtp_queue[0].close()
            self._in_dtp_queue = None
            queued = True
        if queued and not self._closed:
            self.respond(reply)
        return queued
