"""One call per happening in a session: the audit line and the metric, together.

Audit events and metric samples used to be written in hand-made pairs by the protocol
handler and drifted apart (a login refused after a reload was audited, never
counted). Each method here is one happening, in one vocabulary: the audit event name
and fields stay what operators already parse, the metric label comes from the same
reason. Imports the leaves and ``policy.netpolicy.address_key``; the session is seen
through ``SessionIdentity``.

The happenings a ``[[hooks]]`` entry can name (``config.HOOK_EVENTS``: upload,
download, delete, rename, mkdir, rmdir, login-failed, ban) are also handed, as one
event each, to the gateway's ``HookSink`` (``service.hooks`` spools and delivers
them): the same call that writes the audit line, so a hook never sees a happening
the audit log does not, nor one twice. Building the event costs nothing unless a
hook wants its kind.

Refusals of strangers (the connection's own address refused, a foreign peer on a
passive port) go through the audit log's digest (``AuditLog.refused``), keyed by
address (IPv6 per ``access.ipv6_prefix_length``): a scanner gets one line per
interval and a count, not a line per attempt. Their metrics still count each one.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from ftps_gateway.audit import Transfer
from ftps_gateway.policy.netpolicy import address_key

if TYPE_CHECKING:
    from ftps_gateway.policy.defender import Ban
    from ftps_gateway.session.runtime import Gateway

# Audit reasons of a failed login -> the login metric's result.
LOGIN_RESULTS: Final = {
    "bad-password": "bad-credentials",
    "unknown-user": "bad-credentials",
    "network-not-allowed": "not-allowed-from-network",
    "banned": "banned",
    "limit-total": "limit",
    "limit-per-ip": "limit",
    "limit-per-user": "limit",
    "cluster-unavailable": "limit",  # Redis unreachable, on_unavailable = "refuse"
    "login-queue-full": "queue-full",
    "login-queue-address": "queue-full",
}
# Session-limit reasons, also counted as refused sessions when a login hits them
# ("cluster-unavailable": Redis is unreachable and cluster.on_unavailable = "refuse").
LIMIT_REASONS: Final = frozenset(
    {"limit-total", "limit-per-ip", "limit-per-user", "cluster-unavailable"}
)
# The login queue's refusals (421, the session closes): counted the same way.
QUEUE_REASONS: Final = frozenset({"login-queue-full", "login-queue-address"})

# Audit reasons of a refused data connection -> the data-refusal metric's label.
DATA_REFUSAL_LABELS: Final = {
    "not-resumed": "not-resumed",
    "foreign-ip": "foreign-ip",
    "passive-range-exhausted": "passive-range-exhausted",
    "passive-limit-per-user": "passive-limit",
    "passive-limit-per-ip": "passive-limit",
    "passive-address": "passive-address",
    "no-connection-within-timeout": "timeout",
    "pending-evicted": "pending-evicted",
}
# Any other reason is a failed data handshake ("tls-handshake: <cause>").
DATA_HANDSHAKE_LABEL: Final = "tls-handshake-failed"


class SessionIdentity(Protocol):
    """Who an event is about: read at the moment it happens (PROXY, login change it)."""

    session_id: str
    username: str

    @property
    def client_ip(self) -> str: ...

    @property
    def gateway(self) -> Gateway: ...

    def real_path(self, virtual: str) -> str | None:
        """Where ``virtual`` is on disk (for command hooks), or None."""
        ...


class HookSink(Protocol):
    """Where hookable happenings go: ``service.hooks.HookDispatcher``.

    Both calls run on the IO loop and must return at once: ``submit`` only queues
    (the spool write, its fsync and the delivery happen on threads of their own).
    """

    def wants(self, event: str) -> bool:
        """Does any hook name this kind of event (``config.HOOK_EVENTS``)?"""
        ...

    def needs_real_path(self, event: str) -> bool:
        """Does a command hook want this kind (only commands get ``real_path``)?"""
        ...

    def submit(self, event: dict[str, Any]) -> None:
        """Queue one event (the JSON object a hook receives)."""
        ...


class NoHooks:
    """The sink of a gateway without hooks (and of tests that build a ``Gateway``)."""

    def wants(self, event: str) -> bool:
        """No hook wants anything."""
        return False

    def needs_real_path(self, event: str) -> bool:
        """Nothing to run."""
        return False

    def submit(self, event: dict[str, Any]) -> None:
        """Nothing to queue."""


NO_HOOKS: Final = NoHooks()


class SessionEvents:
    """The audit trail and the metrics of one session."""

    def __init__(self, session: SessionIdentity) -> None:
        self._session = session
        self._tls_version: str | None = None  # the control connection's, for hooks

    def note(self, event: str, **fields: Any) -> None:
        """An audit-only event (no metric describes it): connect, path refusals..."""
        session = self._session
        session.gateway.audit.event(
            event,
            session=session.session_id,
            client_ip=session.client_ip,
            user=session.username or None,
            **fields,
        )

    @property
    def _metrics(self) -> Any:
        return self._session.gateway.metrics

    # --- the session's life

    def session_opened(self) -> None:
        """The session holds a slot from now on (``session_closed`` exactly once)."""
        self._metrics.session_opened()

    def session_closed(self, result: str) -> None:
        """An opened session ended; ``result``: one of the metrics' session results."""
        self._metrics.session_closed(result)

    def connection_refused(self, reason: str, **detail: Any) -> None:
        """The connection is refused by policy (not allowed, banned, a limit...)."""
        self._refused(
            "connection_refused", self._session.client_ip, reason=reason, **detail
        )
        self._metrics.session_refused(reason)

    def _refused(self, event: str, address: str, **fields: Any) -> None:
        """A stranger's refusal, digested per ``address`` (see the module doc)."""
        session = self._session
        gateway = session.gateway
        gateway.audit.refused(
            event,
            address_key(address, gateway.config.access.ipv6_prefix_length),
            session=session.session_id,
            client_ip=session.client_ip,
            user=session.username or None,
            **fields,
        )

    def reply_backlog_exceeded(self, reason: str, backlog: int, cap: int) -> None:
        """The client queued more replies than it reads: the session is closed.

        ``reason``: "over-cap" (the backlog passed the hard cap) or "not-reading"
        (paused past the soft cap, and the client took nothing for a while).
        """
        self.note("reply_backlog_exceeded", reason=reason, bytes=backlog, cap=cap)

    # --- login

    def login_failed(self, reason: str) -> None:
        """A login was refused; the client hears one generic reply for every reason."""
        self.note("login_failed", reason=reason)
        self._metrics.login(LOGIN_RESULTS[reason])
        if reason in LIMIT_REASONS or reason in QUEUE_REASONS:
            self._metrics.session_refused(reason)
        self._hook("login-failed")

    def login_succeeded(self, *, cached: bool) -> None:
        """The session is logged in (``cached``: the password was verified recently)."""
        self.note("login_ok", **({"cached": True} if cached else {}))
        self._metrics.login("ok")

    def banned(self, ban: Ban) -> None:
        """This session's failures earned its address a ban."""
        self.note(
            "ban", banned_ip=ban.ip, seconds=round(ban.remaining_seconds),
            offences=ban.offences,
        )  # fmt: skip
        self._hook("ban", client_ip=ban.ip, anonymous=True)

    # --- TLS

    def tls_established(
        self, channel: str, version: str | None, *, cipher: str | None = None,
        resumed: bool = False,
    ) -> None:  # fmt: skip
        """A handshake completed (data: after the binding check accepted it)."""
        fields: dict[str, Any] = {"channel": channel, "version": version}
        if channel == "control":
            fields["cipher"] = cipher
            self._tls_version = version
        else:
            fields["resumed"] = resumed
        self.note("tls_established", **fields)
        if channel == "control":
            self._metrics.tls_handshake(channel, version, resumed=False)

    def data_handshake_done(self, version: str | None, *, resumed: bool) -> None:
        """A data connection's handshake completed, before the binding check."""
        self._metrics.tls_handshake("data", version, resumed)

    def tls_failed(self, channel: str, reason: str, **fields: Any) -> None:
        """A handshake failed, stalled, or the established stream broke."""
        self.note("tls_failed", channel=channel, reason=reason, **fields)
        self._metrics.tls_failure(channel, reason)

    # --- data connections

    def data_refused(self, reason: str, **fields: Any) -> None:
        """A data connection (or the port for one) was refused or failed."""
        peer = fields.get("peer_ip")
        if peer and peer != self._session.client_ip:  # a stranger: digested
            self._refused("data_refused", str(peer), reason=reason, **fields)
        else:
            self.note("data_refused", reason=reason, **fields)
        label = DATA_REFUSAL_LABELS.get(reason)
        if label is None:
            self._metrics.tls_failure("data", reason)
            label = DATA_HANDSHAKE_LABEL
        self._metrics.data_connection_refused(label)

    def data_command_refused(self, label: str) -> None:
        """PASV/PORT refused before any connection (no PROT P, active mode off)."""
        self._metrics.data_connection_refused(label)

    def prot_c_refused(self) -> None:
        """A client asked for clear-text data connections (PROT C)."""
        self.note("prot_c_refused")
        self._metrics.data_connection_refused("prot-c")

    # --- transfers

    def transfer_finished(
        self, *, upload: bool, path: str, nbytes: int, seconds: float, result: str,
        binary: bool, sha256: str | None = None, file_size: int | None = None,
    ) -> None:  # fmt: skip
        """A file transfer ended: audit line, metric sample and xferlog line.

        A completed one is also an ``upload``/``download`` hook event; its ``size`` is
        ``file_size`` (an upload's whole file, resumed part included) or ``nbytes``.
        """
        session = self._session
        completed = result == "ok"
        direction = "upload" if upload else "download"
        extra: dict[str, Any] = {} if completed else {"result": result}
        if completed and sha256:
            extra["sha256"] = sha256
        self.note(
            f"{direction}_{'completed' if completed else 'failed'}", path=path,
            bytes=nbytes, seconds=seconds, **extra,
        )  # fmt: skip
        self._metrics.transfer_finished(
            direction, result, nbytes, seconds, user=session.username or None
        )
        audit = session.gateway.audit
        if audit.writes_xferlog:  # else no Transfer to build (off by default)
            audit.xferlog(
                Transfer(
                    end=time.time(), seconds=seconds, client_ip=session.client_ip,
                    nbytes=nbytes, path=path, upload=upload, user=session.username,
                    completed=completed, binary=binary,
                )
            )  # fmt: skip
        if completed:
            size = nbytes if file_size is None else file_size
            self._hook(
                direction, path=path, size=size, sha256=sha256 if upload else None
            )

    # --- the tree

    def tree_changed(
        self, event: str, *, path: str, ok: bool, source: str | None = None,
        reply: int | None = None,
    ) -> None:  # fmt: skip
        """DELE, RMD, MKD or RNTO ran (``event``: delete, rmdir, mkdir, rename).

        ``path`` is the name acted on (a rename's new name, ``source`` its old one);
        ``reply`` the error code of a failed one. A successful one is a hook event:
        a rename's ``path`` is its old name and ``target`` the new one.
        """
        fields: dict[str, Any] = {"path": path, "ok": ok}
        if source is not None:
            fields["from"] = source
        if reply is not None:
            fields["reply"] = reply
        self.note(event, **fields)
        if not ok:
            return
        if event == "rename":
            self._hook(event, path=source, target=path)
        else:
            self._hook(event, path=path)

    # --- hooks

    def _hook(
        self, event: str, *, path: str | None = None, size: int | None = None,
        sha256: str | None = None, target: str | None = None,
        client_ip: str | None = None, anonymous: bool = False,
    ) -> None:  # fmt: skip
        """Hand one event to the hooks, if any hook wants its kind.

        The keys are issue 16's: ``id`` (the receiver's idempotency key: a retried
        delivery carries the same one), ``time`` (RFC 3339, UTC), ``node``,
        ``event``, ``user``, ``client_ip``, ``path`` (absolute, virtual) and
        ``real_path`` (removed for url hooks), ``size``, ``sha256``, ``session``,
        ``tls_version``, and ``target`` for renames. ``anonymous`` leaves the user
        out (a ban is about an address, not about whoever tried last).
        """
        session = self._session
        gateway = session.gateway
        hooks = gateway.hooks
        if not hooks.wants(event):
            return
        # Mapping a path costs a realpath() walk (~80 us measured on a deep tree):
        # only for command hooks, the only ones that get it.
        real = (
            session.real_path(path) if path and hooks.needs_real_path(event) else None
        )
        record: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "time": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "node": gateway.node_name,
            "event": event,
            "user": None if anonymous else (session.username or None),
            "client_ip": client_ip or session.client_ip,
            "path": path,
            "real_path": real,
            "size": size,
            "sha256": sha256,
            "session": session.session_id,
            "tls_version": self._tls_version,
        }
        if target is not None:
            record["target"] = target
        hooks.submit(record)
