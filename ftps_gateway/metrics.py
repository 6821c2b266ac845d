"""Prometheus metrics: a private registry, and the verbs that sessions call.

Handlers call verbs (``login("ok")``, ``transfer_finished(...)``) and never touch a
prometheus object, so metric names and label vocabularies live here only, as in
sftpgo's ``internal/metric``. No pyftpdlib import; the HTTP side is ``health``.

Naming follows Prometheus: ``ftps_gateway_`` prefix, counters end in ``_total``,
units are spelled out (``_seconds``, ``_bytes``). Every label takes its value from a
fixed vocabulary below; anything else is counted as ``other`` (and logged once), so a
caller's bug or a peer-controlled string cannot create unbounded series.

Several worker processes (issue 8; decision 0012): every series here is a counter,
a histogram or a gauge whose per-process values add up (sessions active, passive ports
in use) or whose maximum is the figure (the oldest hook event), so the workers' values
combine without knowing each other. A worker's ``GatewayMetrics(worker=True)`` runs in
prometheus-client's multiprocess mode (``keep_values_in(folder)``, called once before
any metric exists): each counter, histogram and gauge writes its value into the
worker's mmap files as it changes, and the supervisor's ``/metrics`` reads them at
scrape time (``service.workermetrics``). Gauges say how they combine
(``multiprocess_mode``, always a "live" mode so a dead worker's gauges go with it);
the values read from their owners (passive ports, login queue, hook queue) are
written into such gauges by the worker's IO loop at start and every
``PUBLISH_SECONDS`` (``publish_scrape_time``). What every worker would report alike
(``REPORTED_ONCE``: build info, reloads, bans, the certificate's expiry) is left out
of a worker: the supervisor reports it once. ``process_*`` series stay out of the
workers' sum. A single process (and every in-thread test gateway) keeps its values
in memory, in its own registry.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from importlib import metadata
from typing import Final, Literal, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import ftps_gateway

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
# A Redis round trip: a few hundred microseconds on a LAN, up to the timeout.
REDIS_SECONDS_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
)  # fmt: skip

# --- limits ---------------------------------------------------------------------------

# Distinct users that get their own label value when per-user labels are on; later
# users share OTHER_USER. Each user costs about a dozen series.
MAX_USER_LABELS: Final = 100
# Not "other": that is a valid user name; parentheses are not (config._USER_NAME).
OTHER_USER: Final = "(other)"

# From a small listing to a multi-gigabyte upload over a slow partner line.
TRANSFER_SECONDS_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0
)  # fmt: skip

_MAX_LOGGED_LABEL_CHARS: Final = 64

# prometheus-client's folder for a process's mmap files (multiprocess mode).
MULTIPROCESS_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"

# Families one process reports for the whole gateway (a single server, or the
# supervisor of workers): every worker would report the same value, and a sum would
# count it once per worker. A worker's ``GatewayMetrics`` has none of them.
REPORTED_ONCE: Final = frozenset(
    {
        f"{PREFIX}build_info",
        f"{PREFIX}config_reloads",  # the family of config_reloads_total
        f"{PREFIX}config_last_reload_success_timestamp_seconds",
        f"{PREFIX}bans_active",
        f"{PREFIX}tls_certificate_expiry_timestamp_seconds",
    }
)

# Gauges read from their owners at scrape time (``_ScrapeTimeGauges``): name after
# the prefix -> help text.
_SCRAPE_TIME_HELP: Final = {
    "passive_ports_in_use": "Passive data ports listening or connected now.",
    "passive_ports_free": "Passive data ports free for the next PASV/EPSV.",
    "bans_active": "Bans in force now.",
    "login_queue_waiting": "Logins waiting for a password verification now.",
    "tls_certificate_expiry_timestamp_seconds": (
        "When the served certificate expires (Unix time)."
    ),
    "hook_events_queued": (
        "Hook events waiting for delivery (spooled or being spooled)."
    ),
    "hook_oldest_queued_age_seconds": (
        "Age of the oldest hook event waiting for delivery (0: none)."
    ),
}
# The ones a worker writes into gauges (``publish_scrape_time``), and how the
# supervisor combines the workers' values (prometheus-client's ``multiprocess_mode``).
# Always a "live" mode: ``mark_process_dead`` removes only live gauges' files, so a
# dead worker's ports, queue and hook backlog go with it (its replacement reports its
# own). Not "mostrecent": each worker holds a different part of the figure.
_WORKER_SCRAPE_TIME: Final[dict[str, Literal["livesum", "livemax"]]] = {
    "passive_ports_in_use": "livesum",  # each worker owns a disjoint share
    "passive_ports_free": "livesum",  # each worker's free share of the range
    "login_queue_waiting": "livesum",  # each worker has its own queue
    "hook_events_queued": "livesum",  # each worker has its own spool
    "hook_oldest_queued_age_seconds": "livemax",  # the oldest of all workers'
}


def keep_values_in(folder: str | None) -> None:
    """Choose, for this whole process, where metric values live: ``None`` in memory
    (one process, the supervisor, tests), else in mmap files in ``folder`` (a worker).

    prometheus-client picks its value class (``values.ValueClass``) once, when
    ``prometheus_client.values`` is first imported, from ``PROMETHEUS_MULTIPROC_DIR``
    (0.26; every metric then calls ``values.ValueClass`` when it is created). Left
    to that, the mode would depend on whether the variable was set before some import,
    and an operator's stray variable would put a single server into files. So the
    class is set here, explicitly, before any ``GatewayMetrics`` exists. A worker's
    variable is set too: ``MmapedValue`` reads its folder from it when it opens a file;
    in memory it is removed (prometheus-client would warn on label removal, and no
    child process inherits it by accident).
    """
    if folder is None:
        values.ValueClass = values.MutexValue
        os.environ.pop(MULTIPROCESS_VARIABLE, None)
        return
    os.environ[MULTIPROCESS_VARIABLE] = folder
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def _values_in_files() -> bool:
    """Whether this process's metrics write into multiprocess files."""
    return values.ValueClass is not values.MutexValue


# How often a worker writes its owner-read gauges (``_WORKER_SCRAPE_TIME``) into its
# files: they are at most this old at a scrape; each write costs ~15 us on the loop
# (decision 0012). Every other series is written when it changes.
PUBLISH_SECONDS: Final = 1.0

_T = TypeVar("_T")

PassivePortsSource = Callable[[], tuple[int, int]]  # (in use, size of the range)
HooksSource = Callable[[], tuple[int, float]]  # (events queued, oldest's age in s)
Timestamp = datetime | float  # aware datetime, or seconds since the epoch


def _as_frozen(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


_CHANNELS = _as_frozen(CHANNELS)
_SESSION_RESULTS = _as_frozen(SESSION_RESULTS)
_SESSION_REFUSALS = _as_frozen(SESSION_REFUSALS)
_LOGIN_RESULTS = _as_frozen(LOGIN_RESULTS)
_TLS_VERSIONS = _as_frozen(TLS_VERSIONS)
_TLS_FAILURE_REASONS = _as_frozen(TLS_FAILURE_REASONS)
_DATA_REFUSALS = _as_frozen(DATA_REFUSALS)
_TRANSFER_DIRECTIONS = _as_frozen(TRANSFER_DIRECTIONS)
_TRANSFER_RESULTS = _as_frozen(TRANSFER_RESULTS)
_RELOAD_RESULTS = _as_frozen(RELOAD_RESULTS)
_HOOK_RESULTS = _as_frozen(HOOK_RESULTS)
_REDIS_ERRORS = _as_frozen(REDIS_ERRORS)

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


def build_version() -> str:
    """The installed distribution's version; the package's own when not installed."""
    try:
        return metadata.version("ftps-gateway")
    except metadata.PackageNotFoundError:
        return ftps_gateway.__version__


class ClusterSeries:
    """A cluster node's Redis series (issue 15): where its state is decided, round
    trips, errors. In a single server's registry (``GatewayMetrics``), or in the
    supervisor's own, next to the workers' sums: with workers the supervisor holds
    the node's one Redis client."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._mode = Gauge(
            f"{PREFIX}cluster_mode",
            "1 for where this node's shared state is decided now: shared "
            "(Redis), local (its own), refusing (new logins refused).",
            ["mode"],
            registry=registry,
        )
        self._seconds = Histogram(
            f"{PREFIX}redis_round_trip_seconds",
            "Redis round trips (one pipeline of requests each).",
            buckets=REDIS_SECONDS_BUCKETS,
            registry=registry,
        )
        self._errors = Counter(
            f"{PREFIX}redis_errors_total",
            "Failed Redis calls, by kind.",
            ["kind"],
            registry=registry,
        )
        for kind in REDIS_ERRORS:
            self._errors.labels(kind)

    def cluster_mode(self, mode: str) -> None:
        """The node's shared state is now decided in ``mode`` (``CLUSTER_MODES``)."""
        for value in CLUSTER_MODES:
            self._mode.labels(value).set(1 if value == mode else 0)

    def redis_round_trip(self, seconds: float) -> None:
        """One Redis round trip (a pipeline of requests) took ``seconds``."""
        self._seconds.observe(seconds)

    def redis_error(self, kind: str) -> None:
        """A Redis call failed; ``kind`` is one of ``REDIS_ERRORS`` (else "other")."""
        self._errors.labels(kind if kind in _REDIS_ERRORS else OTHER).inc()


class GatewayMetrics:
    """Every metric of one gateway, in its own ``CollectorRegistry``.

    Never the global registry: two gateways in one process (tests) must not share
    counters or clash on registration. All verbs are thread-safe and cheap (a lock and
    an addition; in a worker also a write into an mmap), so the IO loop may call them
    directly. Construct one even when no endpoint is configured: counting costs next
    to nothing, and the handler then needs no "metrics off" branch.
    """

    def __init__(
        self,
        *,
        per_user_labels: bool = False,
        max_user_labels: int = MAX_USER_LABELS,
        process_metrics: bool = True,
        node: str = "",
        worker: bool = False,
    ) -> None:
        """Create and register every metric, with each known label value at zero.

        Series that exist from the start make ``rate()`` and "absent means zero"
        dashboards work before the first event.

        Args:
            per_user_labels: also count transfers per user (config
                ``metrics.per_user_labels``).
            max_user_labels: distinct users that get their own label value.
            process_metrics: add the standard ``process_*`` series (CPU, memory, fds).
            node: this node's name (``server.node_name``), a label of ``build_info``
                so dashboards can tell nodes behind a balancer apart.
            worker: one worker of several, in prometheus-client's multiprocess mode
                (its values land in the supervisor's files): without the
                ``REPORTED_ONCE`` series, the supervisor reports those.

        Raises:
            RuntimeError: the process's value store (``keep_values_in``) does not
                match ``worker``: a worker's counts would reach no ``/metrics``, or a
                single server's would land in files nobody reads.
        """
        if worker != _values_in_files():
            raise RuntimeError(
                "metrics: a worker needs keep_values_in(folder), any other process "
                "keep_values_in(None), before its GatewayMetrics"
            )
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._users: set[str] = set()
        self._max_users = max_user_labels
        registry = self.registry

        self._sessions_active = Gauge(
            f"{PREFIX}sessions_active",
            "Control sessions open now.",
            registry=registry,
            # Each worker counts its own sessions; a dead worker's are closed.
            multiprocess_mode="livesum",
        )
        self._sessions = Counter(
            f"{PREFIX}sessions_total",
            "Control sessions ended, by how they ended.",
            ["result"],
            registry=registry,
        )
        self._refusals = Counter(
            f"{PREFIX}sessions_refused_total",
            "Control connections or logins refused by policy, by reason.",
            ["reason"],
            registry=registry,
        )
        self._logins = Counter(
            f"{PREFIX}logins_total",
            "Login attempts, by result (clients see one generic failure reply).",
            ["result"],
            registry=registry,
        )
        self._handshakes = Counter(
            f"{PREFIX}tls_handshakes_total",
            "Completed TLS handshakes, by channel, protocol version and resumption.",
            ["channel", "version", "resumed"],
            registry=registry,
        )
        self._tls_failures = Counter(
            f"{PREFIX}tls_failures_total",
            "Failed TLS handshakes, by channel and cause.",
            ["channel", "reason"],
            registry=registry,
        )
        self._data_refusals = Counter(
            f"{PREFIX}data_connections_refused_total",
            "Data connections refused or failed before a transfer, by reason.",
            ["reason"],
            registry=registry,
        )
        self._transfers = Counter(
            f"{PREFIX}transfers_total",
            "Transfers ended, by direction and result.",
            ["direction", "result"],
            registry=registry,
        )
        self._transfer_bytes = Counter(
            f"{PREFIX}transfer_bytes_total",
            "Payload bytes moved over data connections, failed transfers included.",
            ["direction"],
            registry=registry,
        )
        self._durations = Histogram(
            f"{PREFIX}transfer_duration_seconds",
            "Duration of completed transfers (result ok), by direction.",
            ["direction"],
            buckets=TRANSFER_SECONDS_BUCKETS,
            registry=registry,
        )
        self._hook_deliveries = Counter(
            f"{PREFIX}hook_deliveries_total",
            "Hook delivery attempts and events, by result (see HOOK_RESULTS).",
            ["result"],
            registry=registry,
        )
        self._loop_stalls = Counter(
            f"{PREFIX}io_loop_stalls_total",
            "Times an IO loop went server.loop_stall_seconds without turning.",
            registry=registry,
        )
        self._loop_stalled = Gauge(
            f"{PREFIX}io_loop_stalled",
            "1 while the IO loop is stalled (summed over workers: how many are).",
            registry=registry,
            # The sum is how many workers are stalled; a dead one is not.
            multiprocess_mode="livesum",
        )
        # REPORTED_ONCE: not in a worker (its files would add them up).
        self._reloads: Counter | None = None
        self._last_reload: Gauge | None = None
        if not worker:
            self._reloads = Counter(
                f"{PREFIX}config_reloads_total",
                "Configuration reloads (SIGHUP), by result.",
                ["result"],
                registry=registry,
            )
            self._last_reload = Gauge(
                f"{PREFIX}config_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded (start or last good "
                "reload).",
                registry=registry,
            )
            self._last_reload.set_to_current_time()
            build = Gauge(
                f"{PREFIX}build_info",
                "Always 1; the labels say which build, Python and node runs.",
                ["version", "python", "node"],
                registry=registry,
            )
            build.labels(build_version(), platform.python_version(), node).set(1)

        self._cluster_series: ClusterSeries | None = None
        self._user_transfers: Counter | None = None
        self._user_bytes: Counter | None = None
        if per_user_labels:
            self._user_transfers = Counter(
                f"{PREFIX}user_transfers_total",
                f"Transfers ended, by user, direction and result (users beyond "
                f"{max_user_labels} share {OTHER_USER}).",
                ["user", "direction", "result"],
                registry=registry,
            )
            self._user_bytes = Counter(
                f"{PREFIX}user_transfer_bytes_total",
                "Payload bytes moved, by user and direction.",
                ["user", "direction"],
                registry=registry,
            )

        self._scrape_time = _ScrapeTimeGauges()
        registry.register(self._scrape_time)
        self._published: dict[str, Gauge] = {}  # publish_scrape_time's, by name
        if process_metrics:
            ProcessCollector(registry=registry)
        self._initialise_series()

    def _initialise_series(self) -> None:
        with_other = {
            name: (*values, OTHER)
            for name, values in (
                ("session", SESSION_RESULTS),
                ("refusal", SESSION_REFUSALS),
                ("login", LOGIN_RESULTS),
                ("version", TLS_VERSIONS),
                ("tls", TLS_FAILURE_REASONS),
                ("data", DATA_REFUSALS),
                ("transfer", TRANSFER_RESULTS),
                ("reload", RELOAD_RESULTS),
            )
        }
        series: list[tuple[Counter | Histogram | None, tuple[tuple[str, ...], ...]]] = [
            (self._sessions, (with_other["session"],)),
            (self._refusals, (with_other["refusal"],)),
            (self._logins, (with_other["login"],)),
            (self._handshakes, (CHANNELS, with_other["version"], ("true", "false"))),
            (self._tls_failures, (CHANNELS, with_other["tls"])),
            (self._data_refusals, (with_other["data"],)),
            (self._transfers, (TRANSFER_DIRECTIONS, with_other["transfer"])),
            (self._transfer_bytes, (TRANSFER_DIRECTIONS,)),
            (self._durations, (TRANSFER_DIRECTIONS,)),
            (self._reloads, (with_other["reload"],)),
            (self._hook_deliveries, (HOOK_RESULTS,)),
        ]
        for metric, label_values in series:
            for labels in itertools.product(*label_values):
                if metric is not None:  # reloads: not in a worker
                    metric.labels(*labels)

    # --- sessions -------------------------------------------------------------------

    def session_opened(self) -> None:
        """A control connection was accepted (after the connection-level checks).

        Call exactly once per session, and ``session_closed`` exactly once later.
        """
        self._sessions_active.inc()

    def session_closed(self, result: str) -> None:
        """An opened session ended; ``result`` is one of ``SESSION_RESULTS``."""
        self._sessions_active.dec()
        self._sessions.labels(
            self._known("session result", result, _SESSION_RESULTS)
        ).inc()

    def session_refused(self, reason: str) -> None:
        """A connection or login was refused by policy (``SESSION_REFUSALS``)."""
        self._refusals.labels(
            self._known("session refusal", reason, _SESSION_REFUSALS)
        ).inc()

    def login(self, result: str) -> None:
        """A login attempt was decided; ``result`` is one of ``LOGIN_RESULTS``."""
        self._logins.labels(self._known("login result", result, _LOGIN_RESULTS)).inc()

    # --- TLS and data connections -----------------------------------------------------

    def tls_handshake(self, channel: str, version: str | None, resumed: bool) -> None:
        """A TLS handshake completed.

        Args:
            channel: ``"control"`` or ``"data"``.
            version: ``SSLSocket.version()`` as returned (``"TLSv1.3"``).
            resumed: the session was resumed (always False on the control channel).
        """
        self._handshakes.labels(
            self._known("TLS channel", channel, _CHANNELS),
            self._known("TLS version", version or "", _TLS_VERSIONS),
            "true" if resumed else "false",
        ).inc()

    def tls_failure(self, channel: str, reason: str) -> None:
        """A TLS handshake failed; ``reason`` is a cause or a raw OpenSSL reason."""
        self._tls_failures.labels(
            self._known("TLS channel", channel, _CHANNELS), classify_tls_failure(reason)
        ).inc()

    def data_connection_refused(self, reason: str) -> None:
        """A data connection was refused or failed (``DATA_REFUSALS``)."""
        label = self._known("data refusal", reason, _DATA_REFUSALS)
        self._data_refusals.labels(label).inc()

    # --- transfers ------------------------------------------------------------------

    def transfer_finished(
        self,
        direction: str,
        result: str,
        nbytes: int,
        seconds: float,
        user: str | None = None,
    ) -> None:
        """A transfer ended, completed or not.

        Args:
            direction: one of ``TRANSFER_DIRECTIONS``.
            result: one of ``TRANSFER_RESULTS``.
            nbytes: payload bytes moved, even if the transfer failed.
            seconds: from the data connection's start to its end.
            user: the session's user; used only when per-user labels are on.
        """
        direction = self._known("transfer direction", direction, _TRANSFER_DIRECTIONS)
        result = self._known("transfer result", result, _TRANSFER_RESULTS)
        nbytes = max(nbytes, 0)
        self._transfers.labels(direction, result).inc()
        self._transfer_bytes.labels(direction).inc(nbytes)
        if result == "ok":
            self._durations.labels(direction).observe(max(seconds, 0.0))
        if user and self._user_transfers is not None and self._user_bytes is not None:
            who = self._user_label(user)
            self._user_transfers.labels(who, direction, result).inc()
            self._user_bytes.labels(who, direction).inc(nbytes)

    def _user_label(self, user: str) -> str:
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

    # --- configuration and scrape-time values -----------------------------------------

    def config_reloaded(self, result: str) -> None:
        """A reload (SIGHUP) finished; ``result`` is one of ``RELOAD_RESULTS``.

        Not counted in a worker: the supervisor validated the file and counts it.
        """
        label = self._known("reload result", result, _RELOAD_RESULTS)
        if self._reloads is None or self._last_reload is None:
            return
        self._reloads.labels(label).inc()
        if label == "ok":
            self._last_reload.set_to_current_time()

    def hook_delivery(self, result: str) -> None:
        """A hook event was delivered, failed an attempt, dead-lettered or dropped."""
        self._hook_deliveries.labels(
            self._known("hook result", result, _HOOK_RESULTS)
        ).inc()

    def track_hooks(self, source: HooksSource) -> None:
        """Report the hook queue at each scrape from ``source() -> (depth, age)``."""
        self._scrape_time.hooks = source

    def loop_stalled(self) -> None:
        """The IO loop has not turned for ``server.loop_stall_seconds`` (the
        watchdog thread calls this once per stall)."""
        self._loop_stalls.inc()
        self._loop_stalled.set(1)

    def loop_recovered(self) -> None:
        """The stalled IO loop turned again."""
        self._loop_stalled.set(0)

    # --- cluster state (Redis); the series exist on cluster nodes only ---------------

    def cluster_mode(self, mode: str) -> None:
        """The node's shared state is now decided in ``mode`` (``CLUSTER_MODES``)."""
        self.cluster_series().cluster_mode(mode)

    def redis_round_trip(self, seconds: float) -> None:
        """One Redis round trip (a pipeline of requests) took ``seconds``."""
        self.cluster_series().redis_round_trip(seconds)

    def redis_error(self, kind: str) -> None:
        """A Redis call failed; ``kind`` is one of ``REDIS_ERRORS``."""
        self.cluster_series().redis_error(kind)

    def cluster_series(self) -> ClusterSeries:
        """The cluster series in this registry (made on first use)."""
        with self._lock:
            if self._cluster_series is None:
                self._cluster_series = ClusterSeries(self.registry)
            return self._cluster_series

    def track_passive_ports(self, source: PassivePortsSource) -> None:
        """Report passive ports at each scrape from ``source() -> (in_use, total)``.

        ``source`` runs on the HTTP thread: it must be cheap and only read state.
        """
        self._scrape_time.passive_ports = source

    def track_bans(self, source: Callable[[], int]) -> None:
        """Report the number of active bans at each scrape from ``source()``."""
        self._scrape_time.bans = source

    def track_login_queue(self, source: Callable[[], int]) -> None:
        """Report the logins waiting for a password verification from ``source()``."""
        self._scrape_time.login_queue = source

    def track_certificate_expiry(
        self, source: Timestamp | Callable[[], Timestamp]
    ) -> None:
        """Report when the served certificate expires.

        Pass a callable to follow certificate reloads, or a fixed value to set it.
        """
        self._scrape_time.certificate_expiry = (
            source if callable(source) else (lambda: source)
        )

    def publish_scrape_time(self) -> None:
        """Write the owner-read values into gauges (a worker, multiprocess mode).

        The worker's IO loop calls this at start (so the first scrape has them) and
        every ``PUBLISH_SECONDS``. Only the worker's own sources are written
        (``_WORKER_SCRAPE_TIME``); a source never set makes no series (as in one
        process); one that fails writes NaN (a file cannot drop a series, and NaN is
        not a stale figure).
        """
        readings = dict(self._scrape_time.readings())
        for name, mode in _WORKER_SCRAPE_TIME.items():
            if name not in readings:
                continue
            value = readings[name]
            gauge = self._published.get(name)
            if gauge is None:
                gauge = self._published[name] = Gauge(
                    f"{PREFIX}{name}", _SCRAPE_TIME_HELP[name],
                    multiprocess_mode=mode, registry=None,
                )  # fmt: skip
            gauge.set(math.nan if value is None else value)

    def families(self) -> Iterable[Metric]:
        """This registry's families as ``render`` shows them (no ``_created``)."""
        return _WithoutCreated(self.registry).collect()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition of this registry and its content type.

        ``accept`` is the scraper's Accept header: OpenMetrics if it asks for it,
        the Prometheus text format otherwise.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(_WithoutCreated(self.registry)), content_type

    # --- label hygiene ----------------------------------------------------------------

    def _known(self, what: str, value: str, allowed: frozenset[str]) -> str:
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

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._warned:  # keys are fixed strings: the set stays small
                return
            self._warned.add(key)
        logger.warning(message, *args)


class _WithoutCreated(Collector):
    """A view of a registry without the ``*_created`` samples.

    prometheus-client adds a creation timestamp next to every labelled counter and
    histogram, which doubles the exposition for a value no dashboard here uses; its
    switch for that (``disable_created_metrics``) is process-global.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """The registry's metrics, ``_created`` samples dropped."""
        for family in self._registry.collect():
            created = f"{family.name}_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


class _ScrapeTimeGauges(Collector):
    """Gauges read from their owners when Prometheus scrapes, not pushed by events.

    A failing source drops its series from that scrape (a gap is honest; a stale
    or zero value would not be) and is logged once.
    """

    def __init__(self) -> None:
        self.passive_ports: PassivePortsSource | None = None
        self.bans: Callable[[], int] | None = None
        self.login_queue: Callable[[], int] | None = None
        self.certificate_expiry: Callable[[], Timestamp] | None = None
        self.hooks: HooksSource | None = None
        self._failed: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        """Yield the gauges whose sources are set and answered."""
        for name, value in self.readings():
            if value is not None:
                yield GaugeMetricFamily(
                    f"{PREFIX}{name}", _SCRAPE_TIME_HELP[name], value=value
                )

    def readings(self) -> Iterator[tuple[str, float | None]]:
        """(name after the prefix, value) of each gauge whose source is set; the
        value is None when the source failed."""
        if self.passive_ports is not None:
            ports = self._read("passive ports", self.passive_ports)
            in_use, total = ports if ports is not None else (None, None)
            yield "passive_ports_in_use", in_use
            # Not clamped at 0: a worker that borrowed ports of another worker's
            # share holds more than its own share, and the sum over workers is
            # exact only this way.
            free = None if in_use is None or total is None else total - in_use
            yield "passive_ports_free", free
        if self.bans is not None:
            yield "bans_active", self._read("bans", self.bans)
        if self.login_queue is not None:
            yield "login_queue_waiting", self._read("login queue", self.login_queue)
        if self.certificate_expiry is not None:
            expiry = self._read("certificate expiry", self.certificate_expiry)
            seconds = expiry.timestamp() if isinstance(expiry, datetime) else expiry
            yield "tls_certificate_expiry_timestamp_seconds", seconds
        if self.hooks is not None:
            queue = self._read("hook queue", self.hooks)
            depth, age = queue if queue is not None else (None, None)
            yield "hook_events_queued", depth
            yield "hook_oldest_queued_age_seconds", age

    def _read(self, what: str, source: Callable[[], _T]) -> _T | None:
        try:
            return source()
        except Exception:
            if what not in self._failed:
                self._failed.add(what)
                logger.warning("metrics: reading %s failed", what, exc_info=True)
            return None
