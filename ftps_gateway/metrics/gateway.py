"""The metrics of one gateway: a private registry, and the verbs that sessions call.

Handlers call verbs (``login("ok")``, ``transfer_finished(...)``) and never touch a
prometheus object, so metric names, help texts and which series exist from the start
live here only, as in sftpgo's ``internal/metric``. The label vocabularies and their
guard are ``metrics.vocabulary``; the gauges read from their owners are
``metrics.scrapetime``; a cluster node's Redis series ``metrics.clusterseries``;
where values live (memory or a worker's files) ``metrics.valuestore``.

Naming follows Prometheus: ``ftps_gateway_`` prefix, counters end in ``_total``,
units are spelled out (``_seconds``, ``_bytes``).

Several worker processes (issue 8; decision 0012): every series here is a counter,
a histogram or a gauge whose per-process values add up (sessions active, an IO loop
stalled), so the workers' values combine without knowing each other. A worker's
``GatewayMetrics(worker=True)`` writes each value into its mmap files as it changes
(``keep_values_in(folder)`` first), and the supervisor's ``/metrics`` reads them at
scrape time (``service.workermetrics``). Gauges say how they combine
(``multiprocess_mode``, always a "live" mode so a dead worker's gauges go with it).
What every worker would report alike (``REPORTED_ONCE``: build info, reloads, bans,
the certificate's expiry) is left out of a worker: the supervisor reports it once.
``process_*`` series stay out of the workers' sum. A single process (and every
in-thread test gateway) keeps its values in memory, in its own registry.
"""

from __future__ import annotations

import itertools
import platform
import threading
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import ftps_gateway
from ftps_gateway.metrics.clusterseries import ClusterSeries
from ftps_gateway.metrics.scrapetime import (
    HooksSource,
    PassivePortsSource,
    ScrapeTimeGauges,
    Timestamp,
)
from ftps_gateway.metrics.valuestore import writes_to_files
from ftps_gateway.metrics.vocabulary import (
    CHANNELS,
    DATA_REFUSALS,
    HOOK_RESULTS,
    LOGIN_RESULTS,
    MAX_USER_LABELS,
    OTHER,
    OTHER_USER,
    PREFIX,
    RELOAD_RESULTS,
    SESSION_REFUSALS,
    SESSION_RESULTS,
    TLS_FAILURE_REASONS,
    TLS_VERSIONS,
    TRANSFER_DIRECTIONS,
    TRANSFER_RESULTS,
    LabelGuard,
    classify_tls_failure,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from prometheus_client.core import Metric

# From a small listing to a multi-gigabyte upload over a slow partner line.
TRANSFER_SECONDS_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0
)  # fmt: skip

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

# The vocabularies each verb checks against (frozen for a cheap ``in``).
_CHANNELS = frozenset(CHANNELS)
_SESSION_RESULTS = frozenset(SESSION_RESULTS)
_SESSION_REFUSALS = frozenset(SESSION_REFUSALS)
_LOGIN_RESULTS = frozenset(LOGIN_RESULTS)
_TLS_VERSIONS = frozenset(TLS_VERSIONS)
_DATA_REFUSALS = frozenset(DATA_REFUSALS)
_TRANSFER_DIRECTIONS = frozenset(TRANSFER_DIRECTIONS)
_TRANSFER_RESULTS = frozenset(TRANSFER_RESULTS)
_RELOAD_RESULTS = frozenset(RELOAD_RESULTS)
_HOOK_RESULTS = frozenset(HOOK_RESULTS)


def build_version() -> str:
    """The installed distribution's version; the package's own when not installed."""
    try:
        return metadata.version("ftps-gateway")
    except metadata.PackageNotFoundError:
        return ftps_gateway.__version__


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
        if worker != writes_to_files():
            raise RuntimeError(
                "metrics: a worker needs keep_values_in(folder), any other process "
                "keep_values_in(None), before its GatewayMetrics"
            )
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # cluster_series: made once
        self._labels = LabelGuard(max_user_labels)
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

        self._scrape_time = ScrapeTimeGauges()
        registry.register(self._scrape_time)
        if process_metrics:
            ProcessCollector(registry=registry)
        # The labelled children of every series that exists from the start.
        self._children: dict[tuple[object, ...], Any] = {}
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
                    self._children[(metric, *labels)] = metric.labels(*labels)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: every session asks for the same few
        children (``labels`` takes a lock and checks its arguments; decision 0014)."""
        child = self._children.get((metric, *labels))
        return metric.labels(*labels) if child is None else child

    # --- sessions -------------------------------------------------------------------

    def session_opened(self) -> None:
        """A control connection was accepted (after the connection-level checks).

        Call exactly once per session, and ``session_closed`` exactly once later.
        """
        self._sessions_active.inc()

    def session_closed(self, result: str) -> None:
        """An opened session ended; ``result`` is one of ``SESSION_RESULTS``."""
        self._sessions_active.dec()
        self._child(
            self._sessions,
            self._labels.known("session result", result, _SESSION_RESULTS),
        ).inc()

    def session_refused(self, reason: str) -> None:
        """A connection or login was refused by policy (``SESSION_REFUSALS``)."""
        self._child(
            self._refusals,
            self._labels.known("session refusal", reason, _SESSION_REFUSALS),
        ).inc()

    def login(self, result: str) -> None:
        """A login attempt was decided; ``result`` is one of ``LOGIN_RESULTS``."""
        self._child(
            self._logins, self._labels.known("login result", result, _LOGIN_RESULTS)
        ).inc()

    # --- TLS and data connections -----------------------------------------------------

    def tls_handshake(self, channel: str, version: str | None, resumed: bool) -> None:
        """A TLS handshake completed.

        Args:
            channel: ``"control"`` or ``"data"``.
            version: ``SSLSocket.version()`` as returned (``"TLSv1.3"``).
            resumed: the session was resumed (always False on the control channel).
        """
        self._child(
            self._handshakes,
            self._labels.known("TLS channel", channel, _CHANNELS),
            self._labels.known("TLS version", version or "", _TLS_VERSIONS),
            "true" if resumed else "false",
        ).inc()

    def tls_failure(self, channel: str, reason: str) -> None:
        """A TLS handshake failed; ``reason`` is a cause or a raw OpenSSL reason."""
        self._child(
            self._tls_failures,
            self._labels.known("TLS channel", channel, _CHANNELS),
            classify_tls_failure(reason),
        ).inc()

    def data_connection_refused(self, reason: str) -> None:
        """A data connection was refused or failed (``DATA_REFUSALS``)."""
        label = self._labels.known("data refusal", reason, _DATA_REFUSALS)
        self._child(self._data_refusals, label).inc()

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
        direction = self._labels.known(
            "transfer direction", direction, _TRANSFER_DIRECTIONS
        )
        result = self._labels.known("transfer result", result, _TRANSFER_RESULTS)
        nbytes = max(nbytes, 0)
        self._child(self._transfers, direction, result).inc()
        self._child(self._transfer_bytes, direction).inc(nbytes)
        if result == "ok":
            self._child(self._durations, direction).observe(max(seconds, 0.0))
        if user and self._user_transfers is not None and self._user_bytes is not None:
            who = self._labels.user(user)
            self._user_transfers.labels(who, direction, result).inc()
            self._user_bytes.labels(who, direction).inc(nbytes)

    # --- configuration and scrape-time values -----------------------------------------

    def config_reloaded(self, result: str) -> None:
        """A reload (SIGHUP) finished; ``result`` is one of ``RELOAD_RESULTS``.

        Not counted in a worker: the supervisor validated the file and counts it.
        """
        label = self._labels.known("reload result", result, _RELOAD_RESULTS)
        if self._reloads is None or self._last_reload is None:
            return
        self._reloads.labels(label).inc()
        if label == "ok":
            self._last_reload.set_to_current_time()

    def hook_delivery(self, result: str) -> None:
        """A hook event was delivered, failed an attempt, dead-lettered or dropped."""
        self._hook_deliveries.labels(
            self._labels.known("hook result", result, _HOOK_RESULTS)
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
        every ``PUBLISH_SECONDS``; what is written is ``ScrapeTimeGauges.publish``'s.
        """
        self._scrape_time.publish()

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
