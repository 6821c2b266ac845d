"""Gauges read from their owners rather than counted by events: passive ports, bans,
the login queue, the certificate's expiry, the hook queue.

In one process they are read when Prometheus scrapes (``ScrapeTimeGauges.collect``),
so they are never stale and cost nothing between scrapes. A worker of several cannot
be asked at scrape time (the supervisor reads files, decision 0012): its IO loop
writes its own share into multiprocess gauges at start and every
``PUBLISH_SECONDS`` (``ScrapeTimeGauges.publish``), each with the
``multiprocess_mode`` that says how the workers' shares add up. Both paths read the
same sources through ``readings``, so the two cannot disagree on a value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Final, Literal, TypeVar

from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ftps_gateway.metrics.vocabulary import PREFIX

logger = logging.getLogger("ftps_gateway")

PassivePortsSource = Callable[[], tuple[int, int]]  # (in use, size of the range)
HooksSource = Callable[[], tuple[int, float]]  # (events queued, oldest's age in s)
Timestamp = datetime | float  # aware datetime, or seconds since the epoch

# Gauges read from their owners at scrape time (``ScrapeTimeGauges``): name after
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
# The ones a worker writes into gauges (``ScrapeTimeGauges.publish``), and how the
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

# How often a worker writes its owner-read gauges (``_WORKER_SCRAPE_TIME``) into its
# files: they are at most this old at a scrape; each write costs ~15 us on the loop
# (decision 0012). Every other series is written when it changes.
PUBLISH_SECONDS: Final = 1.0

_T = TypeVar("_T")


class ScrapeTimeGauges(Collector):
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
        self._published: dict[str, Gauge] = {}  # publish's gauges, by name

    def collect(self) -> Iterable[Metric]:
        """Yield the gauges whose sources are set and answered."""
        for name, value in self.readings():
            if value is not None:
                yield GaugeMetricFamily(
                    f"{PREFIX}{name}", _SCRAPE_TIME_HELP[name], value=value
                )

    def publish(self) -> None:
        """Write the owner-read values into gauges (a worker, multiprocess mode).

        The worker's IO loop calls this at start (so the first scrape has them) and
        every ``PUBLISH_SECONDS``. Only the worker's own sources are written
        (``_WORKER_SCRAPE_TIME``); a source never set makes no series (as in one
        process); one that fails writes NaN (a file cannot drop a series, and NaN is
        not a stale figure).
        """
        readings = dict(self.readings())
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
