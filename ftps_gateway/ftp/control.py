"""The FTPS control and data channels: pyftpdlib's state machines, our TLS and policy.

What a partner's session gets here that stock pyftpdlib does not give (the measured
gaps are listed in ARCHITECTURE.md):

- Connections from outside ``access.allow`` and from banned addresses are closed
  before the banner and before any TLS work; session limits answer 421.
- Nothing but AUTH, FEAT, SYST, NOOP and QUIT before TLS; no clear-text login; before
  login nothing that describes the server (no STAT, HELP or SITE).
- PROT P before any data connection; PROT C and CCC refused, so the downgrade
  ``PROT P, PASV, PROT C, LIST`` cannot send a listing in clear text.
- Passive ports from the range only (425 when it is exhausted), the 227 address chosen
  by the client's network, data connections from a foreign IP dropped silently.
- A data connection is handed to the transfer only after its TLS handshake completed
  (the send gate in ``tlsmixin``) and, under ``reuse = "required"``, only if it
  resumed this control session's own TLS session (the session's own context makes
  any resumption provably this session's, see ``tls``).
- argon2id verification off the IO loop; input pipelined behind PASS waits for it, so
  replies never get out of order.
- A login grace timer that NOOP does not reset.
- Uploads land atomically, and only when the client's close_notify arrived; file
  commands, permissions, resume and quotas are in ``fileops.MountCommandsMixin``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, ClassVar

from pyftpdlib.handlers import FTPHandler

from ftps_gateway.audit import Transfer
from ftps_gateway.config import RESUMING_POLICIES
from ftps_gateway.ftp.authorizer import GatewayAuthorizer
from ftps_gateway.ftp.data import DataHandler
from ftps_gateway.ftp.filesystem import GatewayFS
from ftps_gateway.ftp.fileverbs import MountCommandsMixin
from ftps_gateway.ftp.passive import (
    PassiveListener,
    PassivePortsExhausted,
    epsv_reply,
    pasv_reply,
)
from ftps_gateway.ftp.tlschannel import (
    READ,
    WRITE,
    TLSChannelMixin,
    TLSState,
    describe_tls_error,
)
from ftps_gateway.policy import proxyproto
from ftps_gateway.policy.netpolicy import (
    AccessList,
    DataChannelPolicy,
    PassiveAddressError,
    TLSPolicyTable,
    strip_mapped,
)
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import AtomicUpload
from ftps_gateway.tls import contexts as tls

if TYPE_CHECKING:
    from concurrent.futures import Future

    from ftps_gateway.session.runtime import Gateway, GatewayHolder

logger = logging.getLogger("ftps_gateway")

# Commands a client may send before AUTH TLS (RFC 4217 section 4, plus harmless ones
# clients probe with). PBSZ, PROT and CCC pass too, to get their RFC 4217 503/534.
PRE_TLS_COMMANDS = frozenset(
    {"AUTH", "FEAT", "SYST", "NOOP", "QUIT", "PBSZ", "PROT", "CCC"}
)
# After TLS, before login: what a client needs to log in, nothing that describes the
# server (pyftpdlib would answer STAT with its address, HELP with its command set).
PRE_LOGIN_COMMANDS = PRE_TLS_COMMANDS | {"USER", "PASS", "OPTS", "TYPE"}
PASSIVE_COMMANDS = frozenset({"PASV", "EPSV"})
ACTIVE_COMMANDS = frozenset({"PORT", "EPRT"})
UNSUPPORTED_COMMANDS = frozenset({"STOU"})  # its unique names bypass atomic uploads

# Audit reasons of failed logins -> the metrics' login results.
LOGIN_RESULTS = {
    "bad-password": "bad-credentials",
    "unknown-user": "bad-credentials",
    "network-not-allowed": "not-allowed-from-network",
    "banned": "banned",
}

FIRST_ERROR_REPLY = 400  # 4xx and 5xx: the command failed
# Commands that change the tree -> their audit event.
TREE_EVENTS = {"DELE": "delete", "RMD": "rmdir", "MKD": "mkdir", "RNTO": "rename"}

# How often one PASV's port is reopened after strangers' refused connections.
MAX_PASSIVE_REOPENS = 3

# A balancer sends its PROXY header at once; anything slower is not one.
PROXY_HEADER_TIMEOUT_SECONDS = 5

# The longest command line (without CRLF) the control channel reads; pyftpdlib's own
# limit. Longer lines are discarded up to their CRLF and get one 500 reply.
MAX_COMMAND_BYTES = 2048
COMMAND_TOO_LONG_REPLY = "500 Command too long."
# A bare CR or LF inside a line would split the reply that echoes it (pyftpdlib quotes
# unknown commands) and the diagnostic log line. (A NUL goes on: paths refuse it, 550.)
CONTROL_CHARACTERS_REPLY = "501 Command contains CR or LF."

NOT_RESUMED_REPLY = (
    "425 Can't open data connection: TLS session of data connection not resumed."
)
NO_DATA_PATH_REPLY = "425 Use PASV or EPSV first."
LIMIT_REPLIES = {
    "limit-total": "421 Too many sessions; try again later.",
    "limit-per-ip": "421 Too many sessions from your address; try again later.",
    "limit-per-user": "421 Too many sessions for this user; try again later.",
    "draining": "421 Service restarting; try again shortly.",
}
SHUTDOWN_REPLY = "421 Service restarting; please reconnect."


class ControlHandler(TLSChannelMixin, MountCommandsMixin, FTPHandler):
    """One partner session on the control port."""

    gateways: ClassVar[GatewayHolder]  # set per server by server.build_handler_class
    implicit_tls: ClassVar[bool] = False  # TLS from the first byte (port 990 style)

    # pyftpdlib's session state, declared for mypy (pyftpdlib has no types).
    ac_in_buffer: bytes
    _in_buffer: list[bytes]
    _in_buffer_len: int
    producer_fifo: Any
    authenticated: bool
    username: str
    remote_ip: str
    attempted_logins: int
    fs: GatewayFS
    authorizer = GatewayAuthorizer()  # stateless; see ftp.authorizer
    data_channel: DataHandler | None
    _dtp_acceptor: PassiveListener | None
    _dtp_connector: Any
    _out_dtp_queue: tuple[Any, bool, Any, Any] | None
    _in_dtp_queue: tuple[Any, str] | None
    _restart_position: int
    _current_type: str

    dtp_handler = DataHandler
    abstracted_fs = GatewayFS
    use_sendfile = False  # sendfile bypasses TLS
    permit_foreign_addresses = False
    auth_failed_timeout = 3  # RFC 2577: slow down password guessing
    max_login_attempts = 3

    proto_cmds = FTPHandler.proto_cmds.copy()
    proto_cmds.update(
        {
            "AUTH": {"perm": None, "auth": False, "arg": True,
                     "help": "Syntax: AUTH <SP> TLS (secure the control channel)."},
            "PBSZ": {"perm": None, "auth": False, "arg": True,
                     "help": "Syntax: PBSZ <SP> 0 (protection buffer size)."},
            "PROT": {"perm": None, "auth": False, "arg": True,
                     "help": "Syntax: PROT <SP> P (protect the data channel)."},
            "CCC": {"perm": None, "auth": False, "arg": False,
                    "help": "Syntax: CCC (refused: control stays encrypted)."},
            "SITE DIAG": {"perm": None, "auth": True, "arg": False,
                          "help": "Syntax: SITE DIAG (what the server sees)."},
        }
    )  # fmt: skip
    for _removed in ("SITE CHMOD", "REIN"):
        proto_cmds.pop(_removed, None)

    def __init__(self, conn: Any, server: Any, ioloop: Any = None) -> None:
        self.session_id = secrets.token_hex(6)
        self.tls_context: ssl.SSLContext | None = None
        self._pinned_gateway: Gateway | None = None
        self.network_policy: DataChannelPolicy | None = None
        self.data_policy: DataChannelPolicy | None = None
        self._admitted = False  # passed access/ban checks: audit its disconnect
        self._session_counted = False  # counted by SessionLimits.open
        self._login_counted = ""  # user counted by SessionLimits.login
        self._limit_refusal: str | None = None
        self._data_failure_reply: str | None = None
        self._disconnect_after_failure = False
        self._rename_source: str | None = None
        self.proxy_ip: str | None = None  # the balancer, when a PROXY header named us
        self._awaiting_proxy_header = False
        self._proxy_received = b""
        self._proxy_timer: Any = None
        self.last_data_tls: tuple[str, bool] | None = None  # (version, resumed)
        self._passive_port: int | None = None  # the last PASV/EPSV port
        self._passive_reopened = 0
        self._session_open = False  # counted by metrics.session_opened
        self.close_result = ""  # why the session ended, for the metrics
        self._pbsz = False
        self._prot = False
        self._pending_data: DataHandler | None = None
        self._login_timer: Any = None
        self._auth_pending = False
        self._stashed_input = b""
        self._line_too_long = False  # discarding an over-long line up to its CRLF
        super().__init__(conn, server, ioloop)
        self._extra_feats = ["AUTH TLS", "PBSZ", "PROT"]
        # Unix owner/mode facts would describe the server, not the partner's files.
        for fact in ("unix.mode", "unix.uid", "unix.gid"):
            if fact in self._available_facts:
                self._available_facts.remove(fact)

    @property
    def banner(self) -> str:
        """The 220 text of the current configuration (a reload changes it)."""
        return self.gateway.config.server.banner

    @property
    def timeout(self) -> int:
        """Idle seconds for a logged-in session (a reload changes it)."""
        return self.gateway.config.server.idle_timeout_seconds

    @property
    def gateway(self) -> Gateway:
        """The configuration this session follows.

        Until login, the newest (a reload applies to sessions that have not logged
        in yet); from login on, the one it logged in under, so a reload never
        changes a running session's rules or users mid-transfer.
        """
        return self._pinned_gateway or self.gateways.current

    @property
    def client_ip(self) -> str:
        """The partner's address (IPv4-mapped IPv6 unwrapped)."""
        return strip_mapped(str(self.remote_ip))

    def audit(self, event: str, **fields: Any) -> None:
        """Write an audit event for this session."""
        self.gateway.audit.event(
            event, session=self.session_id, client_ip=self.client_ip,
            user=self.username or None, **fields,
        )  # fmt: skip

    # --- session life

    def handle(self) -> None:
        """Read a PROXY header if a load balancer connected, then admit the client."""
        proxies = self.gateway.proxy_sources
        if proxies is not None and proxies.is_allowed(self.client_ip):
            self.proxy_ip = self.client_ip
            self._awaiting_proxy_header = True
            self._proxy_timer = self.call_later(
                PROXY_HEADER_TIMEOUT_SECONDS, self._on_proxy_header_timeout
            )
            return  # handle_read_event reads the header, then calls _admit
        self._admit()

    def handle_read_event(self) -> None:
        """While a PROXY header is due, read only its bytes; then the usual way."""
        if self._awaiting_proxy_header:
            self._read_proxy_header()
            return
        super().handle_read_event()

    def _read_proxy_header(self) -> None:
        """Consume exactly the header's bytes (a ClientHello may follow at once)."""
        try:
            available = self.socket.recv(proxyproto.MAX_HEADER_BYTES, socket.MSG_PEEK)
            if not available:
                self._end_proxy_wait()
                self.close()
                return
            take = proxyproto.header_bytes_in(self._proxy_received, available)
            if take:
                self._proxy_received += self.socket.recv(take)
            length = proxyproto.header_length(self._proxy_received)
            if length is None:
                return
            header = proxyproto.parse(self._proxy_received[:length])
        except BlockingIOError:
            return
        except (OSError, proxyproto.ProxyProtocolError) as err:
            reason = (
                str(err)
                if isinstance(err, proxyproto.ProxyProtocolError)
                else ("peer-disconnected")
            )
            self._end_proxy_wait()
            self.audit("connection_refused", reason="proxy-header", detail=reason)
            self.gateway.metrics.session_refused("proxy-header")
            self.close()
            return
        self._end_proxy_wait()
        if header.client_ip is not None:
            # pyftpdlib counts connections per address in ip_map and removes
            # ``remote_ip`` on close: swap the entry, or the balancer's would pile up.
            with contextlib.suppress(ValueError):
                self.server.ip_map.remove(self.remote_ip)
            self.remote_ip = header.client_ip
            self.server.ip_map.append(self.remote_ip)
        self._admit()

    def _on_proxy_header_timeout(self) -> None:
        self._proxy_timer = None
        if self._awaiting_proxy_header and not self._closed:
            self._end_proxy_wait()
            self.audit("connection_refused", reason="proxy-header", detail="timeout")
            self.gateway.metrics.session_refused("proxy-header")
            self.close()

    def _end_proxy_wait(self) -> None:
        self._awaiting_proxy_header = False
        self._proxy_received = b""
        if self._proxy_timer is not None and not self._proxy_timer.cancelled:
            self._proxy_timer.cancel()
        self._proxy_timer = None

    def is_session_data_peer(self, peer_ip: str) -> bool:
        """May a data connection from ``peer_ip`` belong to this session?

        The client's own address; and behind a PROXY-protocol balancer also the
        balancer's, which forwards the passive ports without a header (the TLS
        session binding then tells partners apart).
        """
        policy = self.data_policy or self.network_policy
        if policy is not None and policy.reuse == "required-any-ip":
            return True  # the TLS resumption check after the handshake decides
        peer = strip_mapped(peer_ip)
        if peer == self.client_ip:
            return True
        # The balancer's address is every partner's: only a resumption check can
        # then tell them apart, so it is accepted only under a resuming policy.
        return (
            self.proxy_ip is not None
            and peer == strip_mapped(self.proxy_ip)
            and policy is not None
            and policy.reuse in RESUMING_POLICIES
        )

    def _admit(self) -> None:
        """Admit or drop the client, then greet (or start TLS, if implicit)."""
        gateway = self.gateway
        ip = self.client_ip
        if not gateway.access.is_allowed(ip):
            self._drop("not-allowed")
            return
        if gateway.defender.is_banned(ip):
            self._drop("banned")
            return
        self._admitted = True
        self._limit_refusal = "draining" if self.gateways.draining else None
        self._limit_refusal = self._limit_refusal or gateway.limits.open(ip)
        self._session_counted = self._limit_refusal is None
        if self._limit_refusal is None:
            self._session_open = True
            self.gateways.sessions.add(self)
            gateway.metrics.session_opened()
        else:
            gateway.metrics.session_refused(self._limit_refusal)
        listener = "implicit" if self.implicit_tls else "explicit"
        via = {"proxy": self.proxy_ip} if self.proxy_ip else {}
        self.audit("connect", listener=listener, node=gateway.node_name, **via)
        self._login_timer = self.call_later(
            gateway.config.server.login_timeout_seconds, self._on_login_timeout
        )
        if self.implicit_tls:
            self._start_control_tls()  # the greeting (or 421) follows the handshake
        elif self._limit_refusal is not None:
            self._refuse_over_limit(self._limit_refusal)
        else:
            super().handle()

    def transfer_in_progress(self) -> bool:
        """A transfer is running or waiting for its data connection (for the drain)."""
        return any(
            item is not None
            for item in (
                self.data_channel,
                self._pending_data,
                self._in_dtp_queue,
                self._out_dtp_queue,
            )
        )

    def close_for_shutdown(self) -> None:
        """Tell the client the server is going away, then close (the drain)."""
        self.close_result = "shutdown"
        if self._auth_pending:
            self._respond_and_close(SHUTDOWN_REPLY)
        elif not self._closed:
            self.respond(SHUTDOWN_REPLY)
            self.close_when_done()

    def _drop(self, reason: str) -> None:
        """Close before the banner and before TLS: the client learns nothing."""
        self.audit("connection_refused", reason=reason)
        self.gateway.metrics.session_refused(reason)
        self.close()

    def _refuse_over_limit(self, reason: str) -> None:
        self.audit("connection_refused", reason=reason)
        self.respond(LIMIT_REPLIES[reason])
        self.close_when_done()

    def _on_login_timeout(self) -> None:
        if self.authenticated or self._closed:
            return
        self.audit("login_timeout")
        self.close_result = "login-timeout"
        if self.tls_state in (TLSState.PLAIN, TLSState.ESTABLISHED):
            self.respond("421 Login timed out; closing control connection.")
            self.close_when_done()
        else:
            if self.tls_state is TLSState.HANDSHAKING:  # a stalled or slow ClientHello
                self.audit("tls_failed", channel="control", reason="timeout")
                self.gateway.metrics.tls_failure("control", "timeout")
            self.close()

    def close(self) -> None:
        """Close the session and anything still attached to it."""
        if self._closed:
            return
        if self._login_timer is not None and not self._login_timer.cancelled:
            self._login_timer.cancel()
        self._end_proxy_wait()
        self._close_pending_data()
        limits = self.gateway.limits
        if self._session_counted:
            self._session_counted = False
            limits.close(self.client_ip)
        if self._login_counted:
            limits.logout(self._login_counted)
            self._login_counted = ""
        if self._session_open:
            self._session_open = False
            self.gateways.sessions.discard(self)
            result = self.close_result or ("ok" if self.authenticated else "no-login")
            self.gateway.metrics.session_closed(result)
        if self._admitted:
            self.audit("disconnect")
        self.tls_close()
        super().close()

    # --- TLS on the control channel

    def ftp_AUTH(self, line: str) -> None:
        """RFC 4217 AUTH TLS: switch the control channel to TLS."""
        if self.tls_state is not TLSState.PLAIN:
            self.respond("503 Already using TLS.")
            return
        if line.upper() not in ("TLS", "TLS-C", "SSL"):
            self.respond("504 Unsupported security mechanism; use AUTH TLS.")
            return
        if self.ac_in_buffer:
            # Bytes pipelined behind AUTH TLS were sent in clear text and must never
            # be read as if they came through TLS (the STARTTLS injection class of
            # CVE-2011-0411). A real client waits for the 234 reply.
            self.audit("tls_refused", reason="data-pipelined-after-auth")
            self.ac_in_buffer = b""
            self.close()
            return
        self.respond("234 AUTH TLS successful.")
        if self.producer_fifo:  # the 234 must leave in clear text, whole
            self.close()
            return
        self._start_control_tls()

    def _start_control_tls(self) -> None:
        """TLS on the control channel, on a context of this session's own.

        The client network's policy is settled here, before the handshake: it caps
        the TLS version of the control connection.
        """
        gateway = self.gateway
        self.network_policy = gateway.tls_policies.for_client(self.client_ip)
        policy = gateway.tls.policy(self.network_policy.max_version)
        context = gateway.tls.session_context(policy)
        self.tls_context = context
        if self.start_tls(context):
            tls.seal_for_data_connections(context)

    def handle_tls_established(self) -> None:
        """Control channel is encrypted; an implicit-TLS session is greeted now."""
        version = self.socket.version()
        self.audit(
            "tls_established", channel="control",
            version=version, cipher=self.socket.cipher()[0],
        )  # fmt: skip
        self.gateway.metrics.tls_handshake("control", version, resumed=False)
        self._set_io_events(READ | (WRITE if self.producer_fifo else 0))
        if self.implicit_tls:
            # Implicit FTPS protects data connections from the start (what clients
            # that skip PBSZ/PROT on port 990 assume); PROT C stays refused.
            self._pbsz = self._prot = True
            if self._limit_refusal is not None:
                self._refuse_over_limit(self._limit_refusal)
            else:
                FTPHandler.handle(self)

    def handle_tls_failed(self, reason: str) -> None:
        """No reply is possible on a channel whose handshake failed."""
        self.audit("tls_failed", channel="control", reason=reason)
        self.gateway.metrics.tls_failure("control", reason)
        self.close_result = "tls-failed"
        self.close()

    def handle_tls_stream_error(self, err: OSError) -> None:
        """A TLS error after the handshake (a refused renegotiation, a bad record)."""
        if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLEOFError):
            reason = describe_tls_error(err)
            self.audit("tls_failed", channel="control", reason=reason, phase="session")
            self.gateway.metrics.tls_failure("control", reason)

    def handle_timeout(self) -> None:
        """The logged-in session sat idle too long (pyftpdlib replies 421)."""
        self.close_result = "idle-timeout"
        self.audit("idle_timeout")
        super().handle_timeout()

    def ftp_PBSZ(self, line: str) -> None:
        """RFC 4217: only 0 is meaningful for TLS."""
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond("503 PBSZ not allowed on insecure control connection.")
            return
        self._pbsz = True
        self.respond("200 PBSZ=0 successful.")

    def ftp_PROT(self, line: str) -> None:
        """RFC 4217: only P (private) is accepted; C would send data in clear text."""
        level = line.upper()
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond("503 PROT not allowed on insecure control connection.")
        elif not self._pbsz:
            self.respond("503 You must issue the PBSZ command prior to PROT.")
        elif level == "P":
            self._prot = True
            self.respond("200 Protection set to Private.")
        elif level == "C":
            self.audit("prot_c_refused")
            self.gateway.metrics.data_connection_refused("prot-c")
            self.respond("534 PROT C refused: data connections must be encrypted.")
        elif level in ("S", "E"):
            self.respond(f"536 PROT {level} not supported; use PROT P.")
        else:
            self.respond("504 Unknown protection level; use PROT P.")

    def ftp_CCC(self, line: str) -> None:
        """RFC 4217 CCC would drop TLS on the control channel: refused."""
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond("533 CCC not allowed on insecure control connection.")
            return
        self.respond("534 CCC refused: the control connection stays encrypted.")

    # --- command framing

    def collect_incoming_data(self, data: bytes) -> None:
        """Buffer a command line; past ``MAX_COMMAND_BYTES``, drop it to its CRLF.

        pyftpdlib replies 500 as soon as the limit is passed and then keeps reading
        the same line as a new command: one long line got two replies (the client
        stayed one reply behind for the rest of the session), and the tail of a long
        line split across TLS records ran as a command of its own.
        """
        if self._line_too_long:
            return
        self._in_buffer.append(data)
        self._in_buffer_len += len(data)
        if self._in_buffer_len > MAX_COMMAND_BYTES:
            self._line_too_long = True
            self._in_buffer = []
            self._in_buffer_len = 0

    def found_terminator(self) -> None:
        """One reply per line: 500 for an over-long line, 501 for a bare CR or LF."""
        if self._line_too_long:
            self._line_too_long = False
            self._in_buffer = []
            self._in_buffer_len = 0
            self.respond_w_warning(COMMAND_TOO_LONG_REPLY)
            return
        if any(b"\r" in part or b"\n" in part for part in self._in_buffer):
            self._in_buffer = []
            self._in_buffer_len = 0
            self.respond(CONTROL_CHARACTERS_REPLY)
            return
        super().found_terminator()

    # --- command gate

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        """Refuse unsafe paths before pyftpdlib maps them, with a generic reply."""
        if self.authenticated and cmd in UNSUPPORTED_COMMANDS:
            self.process_command(cmd, arg)  # 502, whatever the permissions say
            return
        if (
            self.authenticated
            and arg
            and cmd in self.proto_cmds
            and self.proto_cmds[cmd]["perm"]
            and not (cmd == "LIST" and arg.startswith("-"))
        ):
            try:
                self.fs.check_virtual(arg)
            except vfs.PathRefused as refusal:
                self.audit("path_refused", command=cmd, reason=str(refusal))
                self.respond("550 Invalid path.")
                return
        # Mount permissions, on the virtual path (fileops.MountCommandsMixin).
        if (
            self.authenticated
            and cmd in self.proto_cmds
            and self.proto_cmds[cmd]["perm"]
            and cmd not in UNSUPPORTED_COMMANDS
            and not self.mount_gate(cmd, arg)
        ):
            return
        super().pre_process_command(line, cmd, arg)

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        """Apply the TLS, PROT P and data-connection rules, then dispatch."""
        if self.tls_state is not TLSState.ESTABLISHED and cmd not in PRE_TLS_COMMANDS:
            if cmd in ("USER", "PASS"):
                self.respond("530 Clear-text login refused: send AUTH TLS first.")
            else:
                self.respond("530 Send AUTH TLS first.")
            return
        if not self.authenticated and cmd not in PRE_LOGIN_COMMANDS:
            self.respond("530 Log in with USER and PASS first.")
            return
        if cmd == "RNTO":
            self._rename_source = self._rnfr  # pyftpdlib forgets it before log_cmd
        if cmd in ACTIVE_COMMANDS and not self.gateway.config.server.allow_active_mode:
            self.gateway.metrics.data_connection_refused("active-mode-disabled")
            self.respond("502 Active mode is disabled; use PASV or EPSV.")
            return
        if (cmd in PASSIVE_COMMANDS or cmd in ACTIVE_COMMANDS) and not self._prot:
            self.gateway.metrics.data_connection_refused("prot-p-required")
            self.respond(
                "521 Data connections must be encrypted: send PBSZ 0 and PROT P."
            )
            return
        super().process_command(cmd, *args, **kwargs)

    def push_dtp_data(
        self, data: Any, isproducer: bool = False, file: Any = None, cmd: Any = None
    ) -> None:
        """Queue a listing or download, but only if a data connection is on its way."""
        if not self._data_path_arranged():
            if file is not None:
                file.close()
            self.respond(self._take_data_failure_reply())
            return
        super().push_dtp_data(data, isproducer, file, cmd)

    def _take_data_failure_reply(self) -> str:
        """Why the last data connection failed (once), else "use PASV first"."""
        reply, self._data_failure_reply = self._data_failure_reply, None
        return reply or NO_DATA_PATH_REPLY

    def _data_path_arranged(self) -> bool:
        return any(
            item is not None
            for item in (
                self.data_channel,
                self._pending_data,
                self._dtp_acceptor,
                self._dtp_connector,
            )
        )

    def ftp_STOU(self, line: str) -> None:
        """STOU is off: its unique names bypass the atomic-upload contract."""
        self.respond("502 STOU not supported.")

    # --- diagnostics

    def ftp_SITE_DIAG(self, line: str) -> None:
        """What the server sees of this session, for the partner's self-test report.

        Nothing here is secret from the logged-in partner: its own address, the
        rules that apply to it, the passive range it must be able to reach.
        """
        gateway = self.gateway
        passive = gateway.config.passive
        local_ip = strip_mapped(self.socket.getsockname()[0])
        try:
            advertised = self._pasv_address(local_ip)
        except PassiveAddressError:
            advertised = "none (use EPSV)"
        policy = self.data_policy or self.network_policy
        last = "none"
        if self.last_data_tls is not None:
            version, resumed = self.last_data_tls
            last = f"{version} {'resumed' if resumed else 'not resumed'}"
        facts = [
            ("node", gateway.node_name),
            ("worker", f"{self.gateways.worker[0] + 1} of {self.gateways.worker[1]}"),
            ("session", self.session_id),
            ("client-ip", self.client_ip),
            ("access-rule", gateway.access.rule_for(self.client_ip)),
            ("passive-rule", gateway.passive_policy.rule_for(self.client_ip)),
            ("passive-address", advertised),
            ("passive-ports", f"{passive.port_min}-{passive.port_max}"),
            ("control-tls", f"{self.socket.version()} {self.socket.cipher()[0]}"),
            ("data-reuse", f"{policy.reuse} ({policy.source})" if policy else "-"),
            ("data-max-version", policy.max_version if policy else "-"),
            ("last-data-tls", last),
        ]
        self.push("200-Diagnostics: what the server sees\r\n")
        self.push("".join(f" {name}: {value}\r\n" for name, value in facts))
        self.respond("200 End of diagnostics.")

    # --- login

    def ftp_USER(self, line: str) -> None:
        """USER starts a login; once logged in it is refused (as REIN is).

        pyftpdlib's USER after login flushes the account and starts over: the session
        dropped out of its login (no logout for the session limits, which then counted
        the user twice on the next PASS) and sat unauthenticated with no login timer.
        """
        if self.authenticated:
            self.respond("503 Already logged in; reconnect to log in as another user.")
            return
        super().ftp_USER(line)

    def ftp_PASS(self, line: str) -> None:
        """Verify the password on a worker thread; pause this session meanwhile."""
        if self.authenticated:
            self.respond("503 User already authenticated.")
            return
        if not self.username:
            self.respond("503 Login with USER first.")
            return
        username = self.username
        gateway = self.gateway
        user = gateway.config.user(username)
        self._pause_input()
        if gateway.defender.is_banned(self.client_ip):
            # Banned by another session's failures while this one was open.
            self._login_failed("banned")
            return
        network_refused = user is not None and not AccessList(user.allow).is_allowed(
            self.client_ip
        )
        # A refused network is decided without the password, but still costs one
        # verification (against no hash): its reply must not come sooner than a
        # wrong password's, or timing would tell which users have an allowlist.
        stored_hash = (
            user.password_hash if user is not None and not network_refused else None
        )
        token = None
        if stored_hash is not None and not network_refused:
            token = gateway.recent_logins.token(stored_hash, line)
            if gateway.recent_logins.hit(token):
                if self._login_succeeded(username, cached=True):
                    self._resume_input()
                return
        future = gateway.executor.submit(gateway.verifier.verify, stored_hash, line)
        waker = gateway.waker
        future.add_done_callback(
            lambda done: waker.call_soon_threadsafe(
                lambda: self._on_password_checked(
                    username,
                    done,
                    known=user is not None,
                    token=token,
                    refused="network-not-allowed" if network_refused else None,
                )
            )
        )

    def _pause_input(self) -> None:
        """Stop reading; keep commands already received for after the pause."""
        self._auth_pending = True
        self._stashed_input = self.ac_in_buffer
        self.ac_in_buffer = b""
        self.del_channel()

    def _writable_while_paused(self) -> None:
        """Put a paused session back in the poller (writing only) before a reply.

        pyftpdlib's poller raises if a reply changes the events of a socket it no
        longer watches; reading stays off until ``_resume_input``.
        """
        self._set_io_events(WRITE)

    def _resume_input(self) -> None:
        self._auth_pending = False
        if self._closed:
            return
        self._set_io_events(READ | (WRITE if self.producer_fifo else 0))
        self.ac_in_buffer = self._stashed_input + self.ac_in_buffer
        self._stashed_input = b""
        self._process_buffered_lines()
        if not self._closed and self.socket.pending():
            self.handle_read_event()

    def _process_buffered_lines(self) -> None:
        """asynchat's terminator loop, for lines that arrived while paused."""
        while self.ac_in_buffer and not self._closed and not self._auth_pending:
            index = self.ac_in_buffer.find(b"\r\n")
            if index < 0:
                return
            if index:
                self.collect_incoming_data(self.ac_in_buffer[:index])
            self.ac_in_buffer = self.ac_in_buffer[index + 2 :]
            self.found_terminator()

    def _on_password_checked(
        self,
        username: str,
        done: Future[bool],
        *,
        known: bool,
        token: bytes | None,
        refused: str | None = None,
    ) -> None:
        # Runs from the loop waker, outside pyftpdlib's error handling: a bug here
        # must close this session, not leave it paused with its slots held.
        try:
            if refused is not None:
                if not self._closed:
                    self._login_failed(refused)
                return
            self._password_checked(username, done, known=known, token=token)
        except Exception:  # noqa: BLE001 - handed to the session's error handler
            self.handle_error()

    def _password_checked(
        self, username: str, done: Future[bool], *, known: bool, token: bytes | None
    ) -> None:
        if self._closed:
            return
        try:
            accepted = bool(done.result())
        except Exception:
            logger.exception("password verification failed unexpectedly")
            accepted = False
        if accepted:
            if token is not None:
                self.gateway.recent_logins.remember(token)
            if self._login_succeeded(username):
                self._resume_input()
            return
        self._login_failed("bad-password" if known else "unknown-user")

    def _login_failed(self, reason: str) -> None:
        """Audit and score a failed login; answer after a delay (RFC 2577).

        The session stays paused until the reply. Every reason gets the same reply,
        so a client cannot tell a wrong password from a refused network.
        """
        self.audit("login_failed", reason=reason)
        self.gateway.metrics.login(LOGIN_RESULTS[reason])
        ban = self.gateway.defender.record_failure(self.client_ip)
        if ban is not None:
            self.audit(
                "ban", banned_ip=ban.ip, seconds=round(ban.remaining_seconds),
                offences=ban.offences,
            )  # fmt: skip
        self._disconnect_after_failure = reason == "banned" or ban is not None
        if self._disconnect_after_failure or (
            self.attempted_logins + 1 >= self.max_login_attempts
        ):
            self.close_result = "login-failed"
        self.username = ""
        self.attempted_logins += 1
        self.call_later(self.auth_failed_timeout, self._reply_login_failed)

    def _reply_login_failed(self) -> None:
        if (
            self.attempted_logins >= self.max_login_attempts
            or self._disconnect_after_failure
        ):
            self._respond_and_close("530 Authentication failed. Disconnecting.")
            return
        self._writable_while_paused()
        self.respond("530 Authentication failed.")
        self._resume_input()

    def _respond_and_close(self, reply: str) -> None:
        """Send a last reply on a paused session, then close it."""
        if self._closed:
            return
        self._writable_while_paused()
        self.respond(reply)
        self._auth_pending = False
        if not self._closed:
            self.close_when_done()

    def _login_succeeded(self, username: str, *, cached: bool = False) -> bool:
        """Open the session for ``username``, or refuse it over the user limit."""
        gateway = self.gateway
        refusal = gateway.limits.login(username)
        if refusal is not None:
            self.audit("login_failed", reason=refusal)
            gateway.metrics.login("limit")
            gateway.metrics.session_refused(refusal)
            self.close_result = "refused"
            self.username = ""
            self._respond_and_close(LIMIT_REPLIES[refusal])
            return False
        self._login_counted = username
        self._pinned_gateway = gateway
        self._apply_user_policy(gateway, username)
        try:
            self.build_mount_table(username)  # the tree GatewayFS serves (fileops)
        except LookupError:  # a reload removed the user while its password was checked
            self.audit("login_failed", reason="unknown-user")
            self._respond_and_close("530 Authentication failed. Disconnecting.")
            return False
        if self._login_timer is not None and not self._login_timer.cancelled:
            self._login_timer.cancel()
        if self._auth_pending:
            self._writable_while_paused()
        self.handle_auth_success("/", "", self.authorizer.get_msg_login(username))
        self.audit("login_ok", **({"cached": True} if cached else {}))
        gateway.metrics.login("ok")
        return True

    def _apply_user_policy(self, gateway: Gateway, username: str) -> None:
        """Refine the network's data-connection policy with the user's settings."""
        user = gateway.config.user(username)
        network = self.network_policy
        if user is None or network is None or self.tls_context is None:
            return
        policy = TLSPolicyTable.for_user(network, user)
        self.data_policy = policy
        if policy.max_version < network.max_version:
            tls.set_data_max_version(self.tls_context, policy.max_version)
        control_version = str(self.socket.version()).removeprefix("TLSv")
        if policy.reuse in RESUMING_POLICIES and policy.max_version < control_version:
            # A TLS 1.2 data connection cannot resume a TLS 1.3 session: every
            # transfer would be refused. The operator must fix the config.
            self.audit(
                "policy_conflict", control_version=control_version,
                data_max_version=policy.max_version, policy=policy.source,
            )  # fmt: skip

    # --- passive data connections

    def _make_epasv(self, extmode: bool = False) -> None:
        """PASV/EPSV: one port from the range, the address for this client's network."""
        self._data_failure_reply = None
        self._shutdown_connecting_dtp()
        if self.data_channel is not None:
            self.data_channel.close()
            self.data_channel = None
        passive = self.gateway.config.passive
        try:
            listener = PassiveListener(
                self, passive.port_min, passive.port_max, self.gateways.worker
            )
        except PassivePortsExhausted:
            self.audit("data_refused", reason="passive-range-exhausted")
            self.gateway.metrics.data_connection_refused("passive-range-exhausted")
            self.respond("425 Can't open data connection: no passive port free.")
            return
        if extmode:
            reply = epsv_reply(listener.port)
        else:
            local_ip = strip_mapped(self.socket.getsockname()[0])
            try:
                address = self._pasv_address(local_ip)
            except PassiveAddressError as err:
                listener.close()
                self.audit("data_refused", reason="passive-address", detail=str(err))
                self.gateway.metrics.data_connection_refused("passive-address")
                self.respond("425 Can't open data connection; use EPSV.")
                return
            reply = pasv_reply(address, listener.port)
        listener.start_timer(passive.connect_timeout_seconds)
        self._dtp_acceptor = listener
        self._passive_port = listener.port
        self._passive_reopened = 0
        self.respond(reply)

    def _pasv_address(self, local_ip: str) -> str:
        """The IPv4 address a 227 reply gives this client (RFC 959 has no IPv6 form)."""
        address = self.gateway.passive_policy.address_for(self.client_ip, local_ip)
        if ":" in address:
            raise PassiveAddressError("a 227 reply cannot carry an IPv6 address")
        return address

    def _shutdown_connecting_dtp(self) -> None:
        super()._shutdown_connecting_dtp()
        self._close_pending_data()

    def _close_pending_data(self) -> None:
        pending, self._pending_data = self._pending_data, None
        if pending is not None:
            pending.close()

    def on_data_connection_accepted(self, sock: Any) -> None:
        """The client connected to its passive port; TLS comes next."""
        self._dtp_acceptor = None
        peer = ""
        with contextlib.suppress(OSError):
            peer = strip_mapped(str(sock.getpeername()[0]))
        handler = self.dtp_handler(sock, self)
        handler.peer_ip = peer
        if handler.connected:
            self._pending_data = handler

    def accept_data_channel(self, handler: DataHandler) -> bool:
        """Decide, right after its handshake, whether a data connection may be used.

        The address was checked when it connected (``passive.PassiveListener``);
        here the TLS session: under ``reuse = "required"`` it must have resumed this
        control session's own session.
        """
        if handler is not self._pending_data:
            return False
        version = handler.socket.version()
        self.last_data_tls = (str(version), bool(handler.resumed))
        self.gateway.metrics.tls_handshake("data", version, bool(handler.resumed))
        policy = self.data_policy or self.network_policy
        if (
            policy is not None
            and policy.reuse in RESUMING_POLICIES
            and not handler.resumed
        ):
            self._pending_data = None
            # From another address (a balancer, a NAT pool) the stranger may not be
            # the partner's own client: listen on the port again, so the partner's
            # connection still gets its transfer. From the partner's own address it
            # is the partner's client that cannot resume: say so at once.
            peer = handler.peer_ip
            waiting = peer != self.client_ip and self._listen_again()
            self.audit(
                "data_refused", reason="not-resumed", version=version,
                policy=policy.source, peer_ip=peer, still_listening=waiting,
            )  # fmt: skip
            self.gateway.metrics.data_connection_refused("not-resumed")
            if not waiting:
                self._fail_data_connection(NOT_RESUMED_REPLY)
            return False
        return True

    def _listen_again(self) -> bool:
        """Reopen the last passive port (a few times per PASV) after a refusal."""
        port = self._passive_port
        if port is None or self._passive_reopened >= MAX_PASSIVE_REOPENS:
            return False
        passive = self.gateway.config.passive
        try:
            listener = PassiveListener(
                self, passive.port_min, passive.port_max, self.gateways.worker,
                port=port,
            )  # fmt: skip
        except (PassivePortsExhausted, OSError):
            return False
        listener.start_timer(passive.connect_timeout_seconds)
        self._dtp_acceptor = listener
        self._passive_reopened += 1
        return True

    def _fail_data_connection(self, reply: str) -> None:
        """Answer the transfer waiting for this connection, or the next one."""
        if not self._fail_queued_transfer(reply):
            self._data_failure_reply = reply

    def on_data_channel_ready(self, handler: DataHandler) -> None:
        """TLS is up on the data connection: start the queued transfer, if any."""
        if handler is not self._pending_data:
            handler.close()
            return
        self._pending_data = None
        self.audit(
            "tls_established", channel="data", version=handler.socket.version(),
            resumed=handler.resumed,
        )  # fmt: skip
        self.data_channel = handler
        # The data connection used up a TLS 1.3 ticket: the next reply on the
        # control connection carries a fresh one for the next data connection.
        self.gateway.tickets.refresh(self.socket)
        self._on_dtp_connection()

    def on_data_channel_failed(self, handler: DataHandler, reason: str) -> None:
        """TLS on the data connection failed or timed out."""
        if handler is not self._pending_data:
            return
        self._pending_data = None
        # A stranger from another address (balancer, NAT pool) that stalls or sends
        # junk must not cost the partner its transfer: listen again for it.
        waiting = handler.peer_ip != self.client_ip and self._listen_again()
        self.audit(
            "data_refused", reason=reason, peer_ip=handler.peer_ip,
            still_listening=waiting,
        )  # fmt: skip
        self.gateway.metrics.tls_failure("data", reason)
        self.gateway.metrics.data_connection_refused("tls-handshake-failed")
        if not waiting:
            self._fail_data_connection(
                "425 Can't open data connection: TLS negotiation failed."
            )

    def on_data_connection_timeout(self) -> None:
        """Nobody connected to the passive port in time."""
        self._dtp_acceptor = None
        self.audit("data_refused", reason="no-connection-within-timeout")
        self.gateway.metrics.data_connection_refused("timeout")
        self._fail_data_connection("425 Can't open data connection: timed out.")

    def on_foreign_data_connection(self, peer_ip: str) -> None:
        """A foreign address connected here; the victim hears nothing."""
        self.audit("data_refused", reason="foreign-ip", peer_ip=peer_ip)
        self.gateway.metrics.data_connection_refused("foreign-ip")

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

    # --- transfer outcomes, for the audit trail and the metrics

    def log_transfer(
        self, *, cmd: str, filename: str, receive: bool, completed: bool,
        elapsed: float, bytes: int,  # noqa: A002 - pyftpdlib calls with keywords
    ) -> None:  # fmt: skip
        """One audit event and one metrics sample per file transfer (pyftpdlib hook).

        May run after this session closed: a data channel's close replies on the
        control channel, and a control connection that died with the client closes
        right there (pyftpdlib's close deletes ``data_channel``).
        """
        channel: DataHandler | None = getattr(self, "data_channel", None)
        direction = "upload" if receive else "download"
        if completed:
            result = "ok"
        elif channel is not None and channel.tls_truncated:
            result = "truncated"
        else:
            result = "aborted"
        path = self.fs.fs2ftp(filename) if self.fs else filename  # uploads: final name
        extra: dict[str, Any] = {} if completed else {"result": result}
        upload = channel.file_obj if channel is not None else None
        if completed and isinstance(upload, AtomicUpload) and upload.sha256:
            extra["sha256"] = upload.sha256
        self.audit(
            f"{direction}_{'completed' if completed else 'failed'}", path=path,
            bytes=bytes, seconds=elapsed, **extra,
        )  # fmt: skip
        self.gateway.metrics.transfer_finished(
            direction, result, bytes, elapsed, user=self.username or None
        )
        self.gateway.audit.xferlog(
            Transfer(
                end=time.time(), seconds=elapsed, client_ip=self.client_ip,
                nbytes=bytes, path=path, upload=receive, user=self.username,
                completed=completed, binary=self._current_type != "a",
            )
        )  # fmt: skip

    def _on_dtp_close(self) -> None:
        """A data channel closed: pyftpdlib restarts the idle timer, unless this
        session is closed already (it would arm a timer on a dead session)."""
        if self._closed:
            self.data_channel = None
            return
        super()._on_dtp_close()

    def log_cmd(self, cmd: str, arg: str, respcode: int, respstr: str) -> None:
        """Audit what changed the tree (pyftpdlib calls this after each command)."""
        event = TREE_EVENTS.get(cmd)
        if event is None:
            return
        ok = respcode < FIRST_ERROR_REPLY
        fields: dict[str, Any] = {"path": self._virtual(arg), "ok": ok}
        if cmd == "RNTO":
            fields["from"] = self._virtual(self._rename_source or "")
        if respcode >= FIRST_ERROR_REPLY:
            fields["reply"] = respcode
        self.audit(event, **fields)

    def _virtual(self, path: str) -> str:
        return self.fs.fs2ftp(path) if self.fs and path else path

    def on_login_failed(self, username: str, password: str) -> None:
        """pyftpdlib hands this the clear-text attempt: ignored on purpose."""
