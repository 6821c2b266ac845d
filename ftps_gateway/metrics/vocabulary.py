"""The names every gateway metric uses: the prefix, each label's closed vocabulary,
and the guard that keeps label values inside them.

Every label takes its value from a fixed vocabulary here; anything else is counted as
``other`` (and logged once), so a caller's bug or a peer-controlled string cannot
create unbounded series. The handler, the tests and the dashboard use these names;
keeping them apart from the prometheus objects (``metrics.gateway``) lets a caller
or a test name a label value without building a registry. Per-user labels are
capped (``MAX_USER_LABELS``) by the same guard.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

logger = logging.getLogger("ftps_gateway")

PREFIX: Final = "ftps_gateway_"
OTHER: Final = "other"  # the label value for anything outside a vocabulary

# --- vocabularies: the handler, the tests and the dashboard use these names ----------

CHANNELS: Final = ("control", "data")

# How an opened session ended (``session_closed``).
SESSION_RESULTS: Final = (
    "ok",  # logged in, then QUIT or a client disconnect
    "no-login",  # the client left before logging in
    "login-failed",  # too many failed logins
    "login-timeout",  # no login within server.login_timeout_seconds
    "idle-timeout",  # no command within server.idle_timeout_seconds
    "reply-backlog",  # pipelined commands without reading the replies, past the cap
    "tls-failed",  # the control channel's TLS handshake failed
    "refused",  # opened, then refused by policy (e.g. limit-per-user at login)
    "shutdown",  # the server stopped (drain grace period over)
    "error",  # an unexpected exception closed it
)

# Why a session was refused (``session_refused``).
SESSION_REFUSALS: Final = (
    "not-allowed",  # client IP in no allowed network
    "banned",  # client IP (or user) banned after failures
    "limit-total",  # server.max_sessions reached
    "limit-per-ip",
    "limit-per-user",
    "draining",  # SIGTERM received: no new sessions
    "cluster-unavailable",  # Redis unreachable, cluster.on_unavailable = "refuse"
    "proxy-header",  # a balancer's connection without a valid PROXY header
    "login-queue-full",  # PASS while the login queue was full (421)
    "login-queue-address",  # PASS beyond the address's share of the login queue (421)
    # Closed before login to make room in a full server.max_unauthenticated pool.
    "unauthenticated-evicted",
)

# Login outcomes (``login``). The client hears one generic 530 for all failures;
# the real reason is here and in the audit log.
LOGIN_RESULTS: Final = (
    "ok",
    "bad-credentials",  # unknown user or wrong password (not told apart: enumeration)
    "not-allowed-from-network",  # the user may not log in from this client IP
    "banned",
    "limit",  # a session limit refused the login
    "queue-full",  # the login queue refused it unverified (see sessions_refused_total)
)

# ``ssl.SSLSocket.version()`` spelling, so the handler passes it through as is.
TLS_VERSIONS: Final = ("TLSv1.2", "TLSv1.3")

# TLS failures, grouped into causes an operator can act on. ``tls_failure`` accepts
# these or the raw reason from ``ftp.tlschannel.describe_tls_error`` (see
# ``classify_tls_failure``).
TLS_FAILURE_REASONS: Final = (
    "timeout",  # no handshake within the time allowed
    "peer-closed",  # the client went away mid-handshake
    "not-tls",  # plain text, HTTP or garbage where a ClientHello belongs
    "protocol-version",  # client's TLS version below tls.min_version (or too old)
    "no-shared-cipher",  # no common cipher suite, group or signature algorithm
    "certificate-rejected",  # the client does not trust our certificate
)

# Why a data connection was refused or failed (``data_connection_refused``).
DATA_REFUSALS: Final = (
    "not-resumed",  # TLS session not resumed from the control session (RFC 4217 s. 10)
    "foreign-ip",  # the connection came from another IP than the control connection
    "prot-c",  # PROT C attempted (refused, 534)
    "prot-p-required",  # PASV/EPSV/PORT before PROT P (521)
    "active-mode-disabled",  # PORT/EPRT: active mode is not supported (decision 0009)
    "passive-range-exhausted",  # no free port in passive.ports (425)
    "passive-limit",  # the user or client address holds its share of the range (425)
    "passive-address",  # no IPv4 address to advertise in a 227 reply
    "timeout",  # nobody connected to the passive port in time
    "tls-handshake-failed",  # the data channel's TLS handshake failed or timed out
    "pending-evicted",  # a newer connection to the port took a waiting one's place
)

# A listing (LIST, NLST, MLSD) uses a data connection too and fails the same ways.
TRANSFER_DIRECTIONS: Final = ("upload", "download", "listing")

TRANSFER_RESULTS: Final = (
    "ok",  # complete (uploads: close_notify arrived, file renamed into place)
    "aborted",  # ABOR, or the control session went away
    "truncated",  # connection reset or closed without TLS close_notify
    "timeout",  # the data channel was idle too long
    "local-error",  # the server could not read or store the file
    "error",
)

RELOAD_RESULTS: Final = ("ok", "invalid-config", "error")

# What became of one attempt to deliver a hook event (``hook_delivery``).
HOOK_RESULTS: Final = (
    "delivered",  # the command exited 0 / the URL answered 2xx
    "failed",  # the attempt failed; the event waits for its next attempt
    "dead-lettered",  # attempts or age used up: moved to the dead-letter folder
    "dropped",  # never spooled: the in-memory queue or the spool was full, or a
    # write failed (the audit log has each one)
)
# Where a cluster node's shared state is decided (``cluster_mode``; issue 15).
CLUSTER_MODES: Final = (
    "shared",  # in Redis, for every node
    "local",  # Redis unreachable: this node's own state (on_unavailable = "local")
    "refusing",  # Redis unreachable: new logins refused (on_unavailable = "refuse")
)
# Why a Redis call failed (``redis_error``).
REDIS_ERRORS: Final = (
    "timeout",  # no answer within cluster.timeout_seconds
    "connection",  # refused, reset, closed
    "auth",  # wrong or missing password
    "tls",  # handshake or certificate failure
    "response",  # Redis answered an error (a script failed)
    "backlog",  # too many requests waiting: answered without Redis
    "other",
)

# --- limits ---------------------------------------------------------------------------

# Distinct users that get their own label value when per-user labels are on; later
# users share OTHER_USER. Each user costs about a dozen series.
MAX_USER_LABELS: Final = 100
# Not "other": that is a valid user name; parentheses are not (config._USER_NAME).
OTHER_USER: Final = "(other)"

_MAX_LOGGED_LABEL_CHARS: Final = 64

_TLS_FAILURE_REASONS = frozenset(TLS_FAILURE_REASONS)

# OpenSSL reason fragments (lower case, "_" as "-", as describe_tls_error writes them)
# and the cause each one points to. First match wins.
_TLS_REASON_RULES: Final = (
    ("timeout", "timeout"),
    ("eof", "peer-closed"),
    ("disconnected", "peer-closed"),
    ("connection-reset", "peer-closed"),
    ("wrong-version-number", "not-tls"),
    ("http-request", "not-tls"),
    ("https-proxy-request", "not-tls"),
    ("packet-length-too-long", "not-tls"),
    ("record-layer-failure", "not-tls"),
    ("protocol-version", "protocol-version"),
    ("unsupported-protocol", "protocol-version"),
    ("version-too-low", "protocol-version"),
    ("no-protocols-available", "protocol-version"),
    ("inappropriate-fallback", "protocol-version"),
    ("cipher", "no-shared-cipher"),
    ("no-suitable", "no-shared-cipher"),
    ("no-shared-group", "no-shared-cipher"),
    ("certificate", "certificate-rejected"),
    ("unknown-ca", "certificate-rejected"),
)


def classify_tls_failure(reason: str) -> str:
    """Map a raw TLS failure reason to one of ``TLS_FAILURE_REASONS`` or ``OTHER``.

    OpenSSL has hundreds of reason codes; a dashboard needs the handful of causes an
    operator can act on. The raw reason belongs in the audit log.
    """
    text = reason.lower().replace("_", "-").removeprefix("tls-handshake: ")
    if text in _TLS_FAILURE_REASONS:
        return text
    for fragment, cause in _TLS_REASON_RULES:
        if fragment in text:
            return cause
    return OTHER


class LabelGuard:
    """Keeps one registry's label values inside their vocabularies, and its per-user
    label values under ``max_users``.

    A value outside its vocabulary is a caller's bug: it is counted as ``OTHER`` and
    logged once per kind, never minted as a new series. Thread-safe: the IO loop, the
    watchdog and the HTTP thread all count.
    """

    def __init__(self, max_users: int = MAX_USER_LABELS) -> None:
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._users: set[str] = set()
        self._max_users = max_users

    def known(self, what: str, value: str, allowed: frozenset[str]) -> str:
        """``value`` if it is in ``allowed``, else ``OTHER`` (``what`` names the
        vocabulary in the one warning)."""
        if value in allowed:
            return value
        # A caller's bug: count it, say so once, never mint a new series.
        self._warn_once(
            what,
            "metrics: unknown %s %r counted as %r",
            what,
            value[:_MAX_LOGGED_LABEL_CHARS],
            OTHER,
        )
        return OTHER

    def user(self, user: str) -> str:
        """``user`` while fewer than ``max_users`` users have a label value, else
        ``OTHER_USER``."""
        with self._lock:
            if user in self._users:
                return user
            if len(self._users) < self._max_users:
                self._users.add(user)
                return user
        self._warn_once(
            "user-cap",
            "metrics: more than %d users; the rest are counted as %s",
            self._max_users,
            OTHER_USER,
        )
        return OTHER_USER

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:  # keys are fixed strings: the set stays small
                return
            self._warned.add(key)
        logger.warning(message, *args)
