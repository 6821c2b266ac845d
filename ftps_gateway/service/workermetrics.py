"""The supervisor's ``/metrics``: every worker's series, read at scrape time from
prometheus-client's multiprocess files, and the series the supervisor reports itself.

Why this shape (docs/decisions/0012-metrics-multiprocess.md has the measurements):
workers used to render their registry every 2 s and push the text over the state
channel; the supervisor parsed and added up the last texts. A scrape right after
start had no worker samples, and every value was up to 2 s old. prometheus-client's
multiprocess mode does the job without a push: each worker's counters, histograms and
gauges write their value into the worker's own mmap files as they change
(``metrics.gateway.GatewayMetrics(worker=True)``), and a scrape reads the files.

- **The folder** (``PROMETHEUS_MULTIPROC_DIR``): one per supervisor run, private
  (mode 0700, ``mkdtemp``), made when it starts (in systemd's ``RUNTIME_DIRECTORY``,
  a tmpfs, when there is one; else the temp dir) and removed when it stops; the
  supervisor hands it to each worker in its environment, and the worker selects
  the file-backed value class explicitly (``metrics.valuestore.keep_values_in``).
- **A dead worker** (``worker_gone``): its gauges go (``mark_process_dead``; every
  worker gauge has a "live" mode), its counters and histograms stay, folded into
  ``counter_gone.db`` and ``histogram_gone.db``: Prometheus counters must never go
  backwards, and the folder holds at most one file per worker and kind, however often
  workers restart. Folding and reading hold one lock, so no scrape sees a dead
  worker's counts twice or not at all.
- **Owner-read gauges** (passive ports, login queue, hook queue): each worker's IO
  loop writes them at start and every ``metrics.scrapetime.PUBLISH_SECONDS``;
  nothing about metrics travels over the state channel, and a scrape never waits for
  a worker.
- **What the supervisor reports itself** (``metrics.gateway.REPORTED_ONCE``: build info,
  config reloads, bans, the certificate's expiry; a cluster node's Redis series): from
  its own ``GatewayMetrics``, which also gives ``/metrics`` its shape: every worker
  series is there at zero before a worker has written anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector, CollectorRegistry

from ftps_gateway.errors import StartupError
from ftps_gateway.metrics.valuestore import MULTIPROCESS_VARIABLE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from prometheus_client.core import Metric
    from prometheus_client.samples import Sample

    from ftps_gateway.metrics.gateway import GatewayMetrics

logger = logging.getLogger("ftps_gateway")

ENVIRONMENT = MULTIPROCESS_VARIABLE  # the folder, in a worker's environment
FOLDED = ("counter", "histogram")  # what a dead worker leaves behind (never gauges)
_GONE = "gone"  # counter_gone.db: the dead workers' counts, folded together

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class WorkerMetrics(Collector):
    """``/metrics`` of a supervisor: the workers' files and the supervisor's own."""

    def __init__(self, own: GatewayMetrics) -> None:
        """Nothing is made on disk until ``open``.

        Args:
            own: the supervisor's metrics: the ``REPORTED_ONCE`` and cluster series,
                and the shape of every worker series (at zero).
        """
        self.own = own
        self._lock = threading.Lock()  # reading the files vs folding a dead worker's
        self.folder: Path | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # --- the folder

    def open(self) -> Path:
        """Make this run's folder; the workers get it as ``PROMETHEUS_MULTIPROC_DIR``.

        Raises:
            StartupError: it cannot be made.
        """
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        parent = runtime if runtime and Path(runtime).is_dir() else None
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="metrics-", dir=parent))
        except OSError as err:
            raise StartupError(
                f"cannot make the workers' metrics folder: {err}"
            ) from err
        return self.folder

    def environment(self) -> Mapping[str, str]:
        """What a worker's environment gets (after ``open``)."""
        if self.folder is None:
            raise AssertionError("WorkerMetrics.open was not called")
        return {ENVIRONMENT: str(self.folder)}

    def close(self) -> None:
        """Remove the folder (the workers are gone)."""
        with self._lock:
            folder, self.folder = self.folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def worker_gone(self, pid: int) -> None:
        """Worker ``pid`` exited (and was reaped): its gauges go, its counts stay."""
        with self._lock:
            if self.folder is None:
                return
            try:
                mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]
                for kind in FOLDED:
                    dead = self.folder / f"{kind}_{pid}.db"
                    if dead.exists():
                        _fold(dead, self.folder / f"{kind}_{_GONE}.db")
            except (OSError, RuntimeError, ValueError):
                # Left as it is, the file is still read (and summed) at each scrape.
                logger.exception("metrics: folding worker %d's files failed", pid)

    # --- the exposition

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Exposition for ``HealthServer`` (same interface as ``GatewayMetrics``)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def collect(self) -> Iterable[Metric]:
        """The supervisor's families, each worker series with the workers' values."""
        with self._lock:
            files = [str(f) for f in self.folder.glob("*.db")] if self.folder else []
            theirs = {family.name: family for family in _merge(files, accumulate=True)}
        for family in self.own.families():
            workers = theirs.pop(family.name, None)
            if workers is not None:
                family.samples = _overlay(family.samples, workers.samples)
            yield family
        yield from theirs.values()  # series only workers have (none so far)


def _key(sample: Sample) -> SampleKey:
    return sample.name, tuple(sorted(sample.labels.items()))


def _overlay(own: list[Sample], workers: list[Sample]) -> list[Sample]:
    """``own``'s samples (zero for a worker series), replaced by the workers' values;
    samples only the workers have (a user's first transfer) come after."""
    values = {_key(sample): sample for sample in workers}
    merged = [values.pop(_key(sample), sample) for sample in own]
    return merged + list(values.values())


def _fold(dead: Path, kept: Path) -> None:
    """Add the counts in ``dead`` to ``kept`` (a new file, renamed in place), then
    remove ``dead``. Histogram buckets are folded per bucket (not accumulated)."""
    files = [str(path) for path in (kept, dead) if path.exists()]
    merged = _merge(files, accumulate=False)
    new = kept.with_suffix(".new")  # not *.db: never read half written
    new.unlink(missing_ok=True)
    out = MmapedDict(str(new))  # type: ignore[no-untyped-call]
    try:
        for family in merged:
            for sample in family.samples:
                key = mmap_key(
                    family.name, sample.name, list(sample.labels),
                    list(sample.labels.values()), family.documentation,
                )  # fmt: skip
                out.write_value(key, sample.value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        out.close()  # type: ignore[no-untyped-call]
    new.replace(kept)
    with contextlib.suppress(FileNotFoundError):
        dead.unlink()


def _merge(files: list[str], *, accumulate: bool) -> Iterable[Metric]:
    """prometheus-client's merge of multiprocess files (it has no annotations)."""
    merged: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
        files, accumulate=accumulate
    )
    return merged
