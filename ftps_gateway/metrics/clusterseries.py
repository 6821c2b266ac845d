"""A cluster node's Redis series (issue 15): where its shared state is decided, the
round trips, the errors.

Apart from ``GatewayMetrics`` because they exist on cluster nodes only and are made on
first use (``GatewayMetrics.cluster_series``), and because their owner differs with
the process layout: a single server's registry, or the supervisor's own next to the
workers' sums (with workers the supervisor holds the node's one Redis client).
``service.cluster`` counts through its ``ClusterMetrics`` Protocol, which this class
satisfies.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ftps_gateway.metrics.vocabulary import CLUSTER_MODES, OTHER, PREFIX, REDIS_ERRORS

# A Redis round trip: a few hundred microseconds on a LAN, up to the timeout.
REDIS_SECONDS_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
)  # fmt: skip

_REDIS_ERRORS = frozenset(REDIS_ERRORS)


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
