"""The FTPS control channel: pyftpdlib's state machine, RFC 4217 and the command gate.

What a partner's session gets here that stock pyftpdlib does not give (the measured
gaps are listed in ARCHITECTURE.md):

- Admission before the banner and before any TLS work (``session.admission``):
  refused addresses are dropped silently; a full pool of connections that have not
  logged in closes its stalest member (421) to make room; the session limits are
  checked at login (421).
- Nothing but AUTH, FEAT, SYST, NOOP and QUIT before TLS; no clear-text login; before
  login nothing that describes the server (no STAT, HELP or SITE).
- PROT P before any data connection; PROT C and CCC refused, so the downgrade
  ``PROT P, PASV, PROT C, LIST`` cannot send a listing in clear text.
- One reply per command line: over-long lines and bare CR/LF are refused whole;
  verbs the server does not implement get 500 (pyftpdlib would run any unknown verb
  ending in STAT, ABOR or QUIT as that verb).
- File commands are decided on the path pyftpdlib finally uses (``fileverbs``);
  logins by the session's gate (``loginflow``); data connections through three doors
  (``datapath``); a balancer's PROXY header first (``proxyheader``); file digests
  (HASH, XSHA256...), listings and uploads' slow file work off the IO loop
  (``hashverbs``, ``listings``, ``fileverbs``).
- Replies a client does not read are bounded: reading pauses past a backlog, the
  session closes past a cap (``replybacklog``), before login too.
- A login grace timer that NOOP does not reset.

This class holds no permission, quota, login or admission decision: those are the
session layer's (``ftps_gateway.session``); this is the protocol around them.
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
from typing import TYPE_CHECKING, Any, ClassVar

from pyftpdlib.handlers import FTPHandler
from pyftpdlib.log import logger as pyftpdlib_logger

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.authorizer import GatewayAuthorizer
from ftps_gateway.ftp.data import DataHandler
from ftps_gateway.ftp.datapath import TRANSFER_COMMANDS, DataPathMixin
from ftps_gateway.ftp.filesystem import GatewayFS
from ftps_gateway.ftp.fileverbs import FileVerbsMixin
from ftps_gateway.ftp.hashverbs import HASH_COMMANDS, HashVerbsMixin
from ftps_gateway.ftp.listings import ListingsMixin
from ftps_gateway.ftp.loginflow import LoginFlowMixin
from ftps_gateway.ftp.proxyheader import ProxyHeaderMixin
from ftps_gateway.ftp.replybacklog import ReplyBacklogMixin, limit_kernel_send_buffer
from ftps_gateway.ftp.tlschannel import (
    READ,
    WRITE,
    TLSChannelMixin,
    TLSState,
    describe_tls_error,
)
from ftps_gateway.policy.netpolicy import PassiveAddressError, strip_mapped
from ftps_gateway.session.admission import Admission, Verdict
from ftps_gateway.session.events import SessionEvents
from ftps_gateway.session.login import LoginGate
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from ftps_gateway.ftp.passive import PassiveListener
    from ftps_gateway.session.runtime import Gateway, GatewayHolder
    from ftps_gateway.tls.contexts import SessionContext

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
# Active mode is not supported (docs/decisions/0009-active-mode.md): the verbs are
# not in proto_cmds (so FEAT does not advertise EPRT) and always get 502.
ACTIVE_COMMANDS = frozenset({"PORT", "EPRT"})
UNSUPPORTED_COMMANDS = frozenset({"STOU"})  # its unique names bypass atomic uploads
# The verbs RFC 959 lets a client send after Telnet IP/Synch, which pyftpdlib finds
# by their last four letters; anything else before them is not Telnet noise.
TELNET_URGENT_COMMANDS = frozenset({"ABOR", "STAT", "QUIT"})
# Telnet IAC, IP, DM as latin-1, and what the UTF-8 decoder makes of them.
TELNET_NOISE = frozenset("\xff\xf4\xf2\ufffd")
# pyftpdlib's own flags for LIST (it lists the cwd); any other argument is a path.
LIST_FLAGS = frozenset({"-a", "-l", "-al", "-la"})
# Listings whose argument may start with ls-style flags (``LIST -la /in``, sent by
# old clients): the flags are dropped and the rest is the path, as vsftpd does.
LISTING_WITH_FLAGS = frozenset({"LIST", "NLST"})
_FLAGS_WORD = re.compile(r"-[A-Za-z]+")

FIRST_ERROR_REPLY = 400  # 4xx and 5xx: the command failed
# Commands that change the tree -> their audit event.
TREE_EVENTS = {
    "DELE": "delete", "RMD": "rmdir", "MKD": "mkdir", "RNTO": "rename",
    "XRMD": "rmdir", "XMKD": "mkdir",  # pyftpdlib logs the aliases by their own name
}  # fmt: skip

# The longest command line (without CRLF) the control channel reads; pyftpdlib's own
# limit. Longer lines are discarded up to their CRLF and get one 500 reply.
MAX_COMMAND_BYTES = 2048


class ControlHandler(
    ProxyHeaderMixin,  # before TLS: a PROXY header precedes the ClientHello
    ReplyBacklogMixin,  # counts what is sent, so above TLSChannelMixin.send
    TLSChannelMixin,
    LoginFlowMixin,
    ListingsMixin,  # LIST, NLST, MLSD, STAT <path> rendered off the IO loop
    FileVerbsMixin,
    HashVerbsMixin,
    DataPathMixin,
    FTPHandler,
):
    """One partner session on the control port."""

    gateways: ClassVar[GatewayHolder]  # set per server by server.build_handler_class
    implicit_tls: ClassVar[bool] = False  # TLS from the first byte (port 990 style)
    tls_data_channel: ClassVar[bool] = False  # the control connection keeps tickets
    tls_coalesce_writes: ClassVar[bool] = True  # one TLS write per read event

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
    _rnfr: str | None

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
    proto_cmds.update(HASH_COMMANDS)  # HASH, XSHA256... (hashverbs)
    for _removed in ("SITE CHMOD", "REIN", *ACTIVE_COMMANDS):
        proto_cmds.pop(_removed, None)

    def __init__(self, conn: Any, server: Any, ioloop: Any = None) -> None:
        self.session_id = secrets.token_hex(6)
        self.username = ""
        self.tls_context: SessionContext | None = None
        self.events = SessionEvents(self)
        self.admission = Admission(self.gateways, self, self.events)
        self.login_gate = LoginGate(self.events)
        self._pbsz = False
        self._prot = False
        self._login_timer: Any = None
        self._line_too_long = False  # discarding an over-long line up to its CRLF
        self._rename_source: str | None = None
        self._client_ip: tuple[object, str] = (None, "")  # (remote_ip, client_ip)
        limit_kernel_send_buffer(conn)
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
        """The partner's address (IPv4-mapped IPv6 unwrapped).

        Kept per ``remote_ip`` (a PROXY header replaces it): every audit line
        asks (decision 0014).
        """
        remote, client = self._client_ip
        if remote is not self.remote_ip:
            remote = self.remote_ip
            client = strip_mapped(str(remote))
            self._client_ip = (remote, client)
        return client

    # --- session life

    def admit(self) -> None:
        """Admit or drop the client, then greet (or start TLS, if implicit)."""
        verdict = self.admission.admit(self.client_ip)
        if verdict is Verdict.DROPPED:
            self.close()  # before the banner and before TLS: the client learns nothing
            return
        gateway = self.gateway
        listener = "implicit" if self.implicit_tls else "explicit"
        via = {"proxy": self.proxy_ip} if self.proxy_ip else {}
        self.events.note("connect", listener=listener, node=gateway.node_name, **via)
        self._login_timer = self.call_later(
            gateway.config.server.login_timeout_seconds, self._on_login_timeout
        )
        if self.implicit_tls:
            self._start_control_tls()  # the greeting (or 421) follows the handshake
        elif verdict is Verdict.OVER_LIMIT:
            self._refuse_over_limit()
        else:
            FTPHandler.handle(self)

    def _refuse_over_limit(self) -> None:
        self.admission.refuse_over_limit()
        self.respond(replies.LIMIT_REPLIES[self.admission.refusal or "limit-total"])
        self.close_when_done()

    def evict(self) -> None:
        """Closed before login to make room for a newcomer (``session.admission``)."""
        self.close_result = "refused"
        if self._auth_pending:
            self._respond_and_close(replies.EVICTED)
        elif self._closed or self.tls_state not in (
            TLSState.PLAIN,
            TLSState.ESTABLISHED,
        ):
            self.close()  # no reply is possible in the middle of a handshake
        else:
            self.respond(replies.EVICTED)
            self.close_when_done()

    def close_for_shutdown(self) -> None:
        """Tell the client the server is going away, then close (the drain)."""
        self.close_result = "shutdown"
        if self._auth_pending:
            self._respond_and_close(replies.SHUTDOWN)
        elif not self._closed:
            self.respond(replies.SHUTDOWN)
            self.close_when_done()

    def cancel_login_timer(self) -> None:
        """Logged in: the login grace timer is over."""
        if self._login_timer is not None and not self._login_timer.cancelled:
            self._login_timer.cancel()
        self._login_timer = None

    def _on_login_timeout(self) -> None:
        if self.authenticated or self._closed:
            return
        self.events.note("login_timeout")
        self.close_result = "login-timeout"
        if self.tls_state in (TLSState.PLAIN, TLSState.ESTABLISHED):
            self.respond(replies.LOGIN_TIMEOUT)
            self.close_when_done()
        else:
            if self.tls_state is TLSState.HANDSHAKING:  # a stalled or slow ClientHello
                self.events.tls_failed("control", "timeout")
            self.close()

    def handle_timeout(self) -> None:
        """The logged-in session sat idle too long (pyftpdlib replies 421)."""
        self.close_result = "idle-timeout"
        self.events.note("idle_timeout")
        super().handle_timeout()

    def close(self) -> None:
        """Close the session, give back its slots, close what is attached to it."""
        if self._closed:
            return
        self.cancel_login_timer()
        self.login_gate.withdraw()
        self.end_proxy_wait()
        self._close_pending_data()
        result = self.close_result or ("ok" if self.authenticated else "no-login")
        self.admission.release(result)
        if self.admission.admitted:
            self.events.note("disconnect")
        if self.tls_context is not None:
            self.tls_context.release(self.socket)
        self.tls_close()
        super().close()

    def _on_dtp_close(self) -> None:
        """A data channel closed: pyftpdlib restarts the idle timer, unless this
        session is closed already (it would arm a timer on a dead session)."""
        if self._closed:
            self.data_channel = None
            return
        super()._on_dtp_close()

    # --- TLS on the control channel (RFC 4217)

    def ftp_AUTH(self, line: str) -> None:
        """RFC 4217 AUTH TLS: switch the control channel to TLS."""
        if self.tls_state is not TLSState.PLAIN:
            self.respond(replies.AUTH_ALREADY)
            return
        if line.upper() not in ("TLS", "TLS-C", "SSL"):
            self.respond(replies.AUTH_UNSUPPORTED)
            return
        if self.ac_in_buffer:
            # Bytes pipelined behind AUTH TLS were sent in clear text and must never
            # be read as if they came through TLS (the STARTTLS injection class of
            # CVE-2011-0411). A real client waits for the 234 reply.
            self.events.note("tls_refused", reason="data-pipelined-after-auth")
            self.ac_in_buffer = b""
            self.close()
            return
        self.respond(replies.AUTH_OK)
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
        self.tls_context = gateway.tls.session_context(policy)
        self.start_tls(self.tls_context)

    def handle_tls_established(self) -> None:
        """Control channel is encrypted; an implicit-TLS session is greeted now."""
        self.events.tls_established(
            "control", self.socket.version(), cipher=self.socket.cipher()[0]
        )
        self._set_io_events(READ | (WRITE if self.producer_fifo else 0))
        self.admission.progress()
        if self.implicit_tls:
            # Implicit FTPS protects data connections from the start (what clients
            # that skip PBSZ/PROT on port 990 assume); PROT C stays refused.
            self._pbsz = self._prot = True
            if self.admission.refusal is not None:
                self._refuse_over_limit()
            else:
                FTPHandler.handle(self)

    def handle_tls_failed(self, reason: str) -> None:
        """No reply is possible on a channel whose handshake failed."""
        self.events.tls_failed("control", reason)
        self.close_result = "tls-failed"
        self.close()

    def handle_tls_stream_error(self, err: OSError) -> None:
        """A TLS error after the handshake (a refused renegotiation, a bad record)."""
        if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLEOFError):
            self.events.tls_failed("control", describe_tls_error(err), phase="session")

    def ftp_PBSZ(self, line: str) -> None:
        """RFC 4217: only 0 is meaningful for TLS."""
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond(replies.PBSZ_NEEDS_TLS)
            return
        self._pbsz = True
        self.respond(replies.PBSZ_OK)

    def ftp_PROT(self, line: str) -> None:
        """RFC 4217: only P (private) is accepted; C would send data in clear text."""
        level = line.upper()
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond(replies.PROT_NEEDS_TLS)
        elif not self._pbsz:
            self.respond(replies.PROT_NEEDS_PBSZ)
        elif level == "P":
            self._prot = True
            self.respond(replies.PROT_PRIVATE)
        elif level == "C":
            self.events.prot_c_refused()
            self.respond(replies.PROT_C_REFUSED)
        elif level in ("S", "E"):
            self.respond(replies.PROT_UNSUPPORTED.format(level=level))
        else:
            self.respond(replies.PROT_UNKNOWN)

    def ftp_CCC(self, line: str) -> None:
        """RFC 4217 CCC would drop TLS on the control channel: refused."""
        if self.tls_state is not TLSState.ESTABLISHED:
            self.respond(replies.CCC_NEEDS_TLS)
            return
        self.respond(replies.CCC_REFUSED)

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
            self.respond_w_warning(replies.COMMAND_TOO_LONG)
            return
        for part in self._in_buffer:  # a loop, not any(): once per command
            if b"\r" in part or b"\n" in part:
                self._in_buffer = []
                self._in_buffer_len = 0
                self.respond(replies.CONTROL_CHARACTERS)
                return
        super().found_terminator()

    # --- the command gate

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        """Refuse unknown verbs and unusable paths before pyftpdlib maps them."""
        self.command_verb = cmd
        verb = cmd
        if cmd == "SITE" and arg:  # pyftpdlib's spelling of SITE subcommands
            verb = f"SITE {arg.split(' ', maxsplit=1)[0].upper()}"
        if cmd in ACTIVE_COMMANDS:
            self.process_command(cmd, arg)  # the TLS and login gates, then 502
            return
        if verb not in self.proto_cmds and not _is_telnet_urgent(verb):
            self.respond(replies.NOT_UNDERSTOOD.format(command=verb))
            return
        if self.authenticated and cmd in UNSUPPORTED_COMMANDS:
            self.process_command(cmd, arg)  # 502, whatever the permissions say
            return
        if cmd in LISTING_WITH_FLAGS:
            arg = _without_flags(arg)
        if self.authenticated and arg and self._takes_path(cmd, arg):
            try:
                self.fs.check_virtual(arg)
            except vfs.PathRefused as refusal:
                self.events.note("path_refused", command=cmd, reason=str(refusal))
                self.respond(replies.INVALID_PATH)
                return
        access = self.file_access
        if access is None:
            super().pre_process_command(line, cmd, arg)
            return
        with access.remembering():  # each path located once per command (0013)
            super().pre_process_command(line, cmd, arg)

    def _takes_path(self, cmd: str, arg: str) -> bool:
        """Will pyftpdlib map ``arg`` as a path (so it must be a usable one)?"""
        spec = self.proto_cmds.get(cmd)
        if spec is None or not spec["perm"]:
            return False
        return not (cmd == "LIST" and arg.lower() in LIST_FLAGS)

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        """Apply the TLS, login and data-connection rules and the file gate, then
        dispatch. ``cmd`` is pyftpdlib's canonical verb and, for file commands,
        ``args[0]`` the virtual path it resolved: the one the command will use."""
        if self.tls_state is not TLSState.ESTABLISHED and cmd not in PRE_TLS_COMMANDS:
            if cmd in ("USER", "PASS"):
                self.respond(replies.CLEAR_TEXT_LOGIN)
            else:
                self.respond(replies.TLS_FIRST)
            return
        if not self.authenticated and cmd not in PRE_LOGIN_COMMANDS:
            self.respond(replies.LOGIN_FIRST)
            return
        self.current_command = cmd
        if self.authenticated and not self.file_gate(cmd, args[0] if args else ""):
            return
        if cmd == "RNTO":
            self._rename_source = self._rnfr  # pyftpdlib forgets it before log_cmd
        if cmd in ACTIVE_COMMANDS:
            self.events.data_command_refused("active-mode-disabled")
            self.respond(replies.ACTIVE_UNSUPPORTED)
            return
        if cmd in PASSIVE_COMMANDS and not self._prot:
            self.events.data_command_refused("prot-p-required")
            self.respond(replies.PROT_P_REQUIRED)
            return
        if cmd in TRANSFER_COMMANDS and self.transfer_busy():  # one at a time
            self.events.note("transfer_refused", command=cmd, reason="busy")
            self.respond(replies.TRANSFER_IN_PROGRESS)
            return
        super().process_command(cmd, *args, **kwargs)

    def ftp_STOU(self, line: str) -> None:
        """STOU is off: its unique names bypass the atomic-upload contract."""
        self.respond(replies.NOT_IMPLEMENTED.format(command="STOU"))

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
            advertised = self.pasv_address(local_ip)
        except PassiveAddressError:
            advertised = "none (use EPSV)"
        policy = self.binding_policy
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
        self.push(replies.DIAG_HEAD + "\r\n")
        self.push("".join(f" {name}: {value}\r\n" for name, value in facts))
        self.respond(replies.DIAG_END)

    # --- what happened, for the audit trail and the metrics (pyftpdlib hooks)

    def log_transfer(
        self, *, cmd: str, filename: str, receive: bool, completed: bool,
        elapsed: float, bytes: int,  # noqa: A002 - pyftpdlib calls with keywords
    ) -> None:  # fmt: skip
        """One event per file transfer.

        May run after this session closed: a data channel's close replies on the
        control channel, and a control connection that died with the client closes
        right there (pyftpdlib's close deletes ``data_channel``).
        """
        channel: DataHandler | None = getattr(self, "data_channel", None)
        if completed:
            result = "ok"
        elif channel is not None and channel.tls_truncated:
            result = "truncated"
        else:
            result = "aborted"
        upload = channel.file_obj if channel is not None else None
        self.events.transfer_finished(
            upload=receive,
            path=self._virtual(filename) or filename,  # uploads: the final name
            nbytes=bytes,
            seconds=elapsed,
            result=result,
            binary=self._current_type != "a",
            sha256=getattr(upload, "sha256", None) if receive else None,
            file_size=getattr(upload, "size", None) if receive else None,
        )

    def log_cmd(self, cmd: str, arg: str, respcode: int, respstr: str) -> None:
        """Audit what changed the tree (pyftpdlib calls this after each command)."""
        event = TREE_EVENTS.get(cmd)
        if event is None:
            return
        failed = respcode >= FIRST_ERROR_REPLY
        self.events.tree_changed(
            event, path=self._virtual(arg), ok=not failed,
            source=self._virtual(self._rename_source or "") if cmd == "RNTO" else None,
            reply=respcode if failed else None,
        )  # fmt: skip

    def _virtual(self, path: str) -> str:
        return self.fs.fs2ftp(path) if self.fs and path else path

    def real_path(self, virtual: str) -> str | None:
        """Where ``virtual`` is on disk, for command hooks (``session.events``)."""
        access = self.file_access
        if access is None:
            return None
        try:
            real = access.locate(virtual).real
        except vfs.PathRefused:
            return None
        return None if real is None else str(real)

    def log(self, msg: str, logfun: Any = pyftpdlib_logger.info) -> None:
        """pyftpdlib's line per reply, formatted only if its logger writes it.

        ``respond`` calls this for every reply, and pyftpdlib formats the session
        prefix (``log_prefix % self.__dict__``) before its logger, which runs at
        WARNING, drops the line.
        """
        level = _PYFTPDLIB_LEVELS.get(logfun)
        if level is None or pyftpdlib_logger.isEnabledFor(level):
            super().log(msg, logfun)


# pyftpdlib's own logging calls by the level they log at (others are always passed).
_PYFTPDLIB_LEVELS = {
    pyftpdlib_logger.debug: logging.DEBUG,
    pyftpdlib_logger.info: logging.INFO,
}


def _without_flags(arg: str) -> str:
    """``-la /in`` -> ``/in``; ``-R`` -> ``""`` (the working directory).

    Only whole words of letters count as flags: ``-x/../in`` stays a path (which the
    gate then judges where it leads).
    """
    words = arg.split(" ")
    flags = 0
    while flags < len(words) and _FLAGS_WORD.fullmatch(words[flags]):
        flags += 1
    if not flags:
        return arg
    return " ".join(words[flags:])


def _is_telnet_urgent(verb: str) -> bool:
    """ABOR, STAT or QUIT behind nothing but Telnet IP/Synch bytes (RFC 959 4.1.3)."""
    prefix, urgent = verb[:-4], verb[-4:]
    return (
        bool(prefix)
        and urgent in TELNET_URGENT_COMMANDS
        and all(char in TELNET_NOISE for char in prefix)
    )
