"""USER/PASS on the control channel: the session pauses while the gate decides.

A mixin for ``control.ControlHandler``. The decision is ``session.login.LoginGate``'s
(bans, allowlists, the recent-login cache, argon2id off the IO loop); here the
protocol side: reading stops while a password is being verified (and while the
login slot is asked for) and commands pipelined behind PASS wait, so replies never
get out of order; a failure is answered after a delay (RFC 2577) with one generic
text whatever the reason; a success takes the user's login slot (one request to the
shared state, answered on the IO loop), pins the configuration and builds the
user's tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.tlschannel import READ, WRITE
from ftps_gateway.session import binding
from ftps_gateway.session.fileaccess import FileAccess

if TYPE_CHECKING:
    from ftps_gateway.policy.netpolicy import DataChannelPolicy
    from ftps_gateway.session.admission import Admission
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.login import LoginGate, LoginOutcome
    from ftps_gateway.session.runtime import Gateway
    from ftps_gateway.tls.contexts import SessionContext


class LoginFlowMixin:
    """USER and PASS of one control session."""

    _auth_pending = False  # verifying a password: input paused
    _stashed_input = b""  # commands that arrived behind PASS
    _disconnect_after_failure = False
    _pinned_gateway: Gateway | None = None
    close_result = ""  # why the session ended, for the metrics
    file_access: FileAccess | None = None

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        events: SessionEvents
        admission: Admission
        login_gate: LoginGate
        tls_context: SessionContext | None
        network_policy: DataChannelPolicy | None
        data_policy: DataChannelPolicy | None
        socket: Any
        ac_in_buffer: bytes
        producer_fifo: Any
        authenticated: bool
        username: str
        attempted_logins: int
        max_login_attempts: int
        auth_failed_timeout: float
        _closed: bool

        @property
        def gateway(self) -> Gateway: ...
        @property
        def client_ip(self) -> str: ...
        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def close_when_done(self) -> None: ...
        def del_channel(self) -> None: ...
        def call_later(self, seconds: float, target: Any) -> Any: ...
        def handle_error(self) -> None: ...
        def handle_read_event(self) -> None: ...
        def collect_incoming_data(self, data: bytes) -> None: ...
        def found_terminator(self) -> None: ...
        def handle_auth_success(self, home: str, password: str, msg: str) -> None: ...
        def _set_io_events(self, events: int) -> None: ...
        def cancel_login_timer(self) -> None: ...

    def ftp_USER(self, line: str) -> None:
        """USER starts a login; once logged in it is refused (as REIN is).

        pyftpdlib's USER after login flushes the account and starts over: the session
        dropped out of its login (no logout for the session limits, which then counted
        the user twice on the next PASS) and sat unauthenticated with no login timer.
        """
        if self.authenticated:
            self.respond(replies.ALREADY_LOGGED_IN)
            return
        self.admission.progress()
        super().ftp_USER(line)  # type: ignore[misc]

    def ftp_PASS(self, line: str) -> None:
        """Hand the attempt to the login gate; pause this session meanwhile."""
        if self.authenticated:
            self.respond(replies.ALREADY_AUTHENTICATED)
            return
        if not self.username:
            self.respond(replies.USER_FIRST)
            return
        username, gateway = self.username, self.gateway
        self.admission.progress()
        self._pause_input()

        def decided(outcome: LoginOutcome) -> None:
            # May run from the loop waker, outside pyftpdlib's error handling: a bug
            # here must close this session, not leave it paused with slots held.
            try:
                if not self._closed:
                    self._login_decided(gateway, username, outcome)
            except Exception:  # noqa: BLE001 - handed to the session's error handler
                self.handle_error()

        self.login_gate.attempt(gateway, username, line, self.client_ip, decided)

    def _login_decided(
        self, gateway: Gateway, username: str, outcome: LoginOutcome
    ) -> None:
        if not outcome.accepted:
            if outcome.reason in replies.LOGIN_QUEUE_REPLIES:
                self._login_queue_refused(gateway, outcome.reason)
                return
            self._login_failed(gateway, outcome.reason or "bad-password")
            return

        def slot_decided(refusal: str | None) -> None:
            # Arrives on the IO loop, perhaps from the supervisor's channel: as
            # above, a bug must close this session, not leave it paused.
            try:
                if not self._closed:
                    self._slot_decided(gateway, username, outcome, refusal)
            except Exception:  # noqa: BLE001 - handed to the session's error handler
                self.handle_error()

        # One request for the login slot; the session stays paused until it is
        # answered (server.max_sessions, _per_ip, _per_user count logged-in sessions).
        self.admission.login(username, slot_decided)

    def _slot_decided(
        self,
        gateway: Gateway,
        username: str,
        outcome: LoginOutcome,
        refusal: str | None,
    ) -> None:
        if refusal is not None:
            self.login_gate.refuse(gateway, refusal, self.client_ip)
            self.close_result = "refused"
            self.username = ""
            self._respond_and_close(replies.LIMIT_REPLIES[refusal])
            return
        try:
            access = FileAccess.for_user(gateway.config, username)
        except LookupError:  # a reload removed the user while its password was checked
            self.login_gate.refuse(gateway, "unknown-user", self.client_ip)
            self.close_result = "login-failed"
            self._respond_and_close(replies.LOGIN_FAILED_CLOSING)
            return
        self.file_access = access
        self._pinned_gateway = gateway
        self._apply_user_binding(gateway, username)
        self.cancel_login_timer()
        if self._auth_pending:
            self._writable_while_paused()
        self.handle_auth_success("/", "", replies.LOGIN_OK_TEXT)
        self.events.login_succeeded(cached=outcome.cached)
        self._resume_input()

    def _login_failed(self, gateway: Gateway, reason: str) -> None:
        """Refuse, then answer after a delay (RFC 2577); the session stays paused.

        A ban this failure earns (known now, or when the shared state answers,
        before the delayed reply) ends the session with the reply.
        """

        def banned() -> None:
            self._disconnect_after_failure = True
            self.close_result = "login-failed"

        self._disconnect_after_failure = False
        if self.login_gate.refuse(gateway, reason, self.client_ip, banned):
            banned()
        if self.attempted_logins + 1 >= self.max_login_attempts:
            self.close_result = "login-failed"
        self.username = ""
        self.attempted_logins += 1
        self.call_later(self.auth_failed_timeout, self._reply_login_failed)

    def _login_queue_refused(self, gateway: Gateway, reason: str) -> None:
        """421 from the login queue: unverified, so unscored; still after the
        failure delay, so a refused address cannot cycle connections at TLS speed."""
        self.login_gate.refuse(gateway, reason, self.client_ip)
        self.close_result = "refused"
        self.username = ""
        reply = replies.LOGIN_QUEUE_REPLIES[reason]
        self.call_later(
            self.auth_failed_timeout, lambda: self._respond_and_close(reply)
        )

    def _reply_login_failed(self) -> None:
        if (
            self.attempted_logins >= self.max_login_attempts
            or self._disconnect_after_failure
        ):
            self._respond_and_close(replies.LOGIN_FAILED_CLOSING)
            return
        self._writable_while_paused()
        self.respond(replies.LOGIN_FAILED)
        self._resume_input()

    def _apply_user_binding(self, gateway: Gateway, username: str) -> None:
        """Refine the network's data-connection policy with the user's settings."""
        user = gateway.config.user(username)
        network = self.network_policy
        if user is None or network is None or self.tls_context is None:
            return
        control_version = str(self.socket.version())
        refined = binding.user_binding(network, user, control_version)
        self.data_policy = refined.policy
        if refined.lower_max_version:
            self.tls_context.cap_data_version(refined.policy.max_version)
        if refined.conflict:
            self.events.note(
                "policy_conflict",
                control_version=control_version.removeprefix("TLSv"),
                data_max_version=refined.policy.max_version,
                policy=refined.policy.source,
            )

    # --- pausing input while the gate decides

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

    def _respond_and_close(self, reply: str) -> None:
        """Send a last reply (the session may be paused), then close it."""
        if self._closed:
            return
        self._writable_while_paused()
        self.respond(reply)
        self._auth_pending = False
        if not self._closed:
            self.close_when_done()

    def on_login_failed(self, username: str, password: str) -> None:
        """pyftpdlib hands this the clear-text attempt: ignored on purpose."""
