"""WorkerMetrics: the supervisor's /metrics over real multiprocess files.

Each "worker" here is a real Python process in prometheus-client's multiprocess mode
(``keep_values_in(folder)``, as a worker does; prometheus-client is imported before,
without the variable, so the mode cannot come from import order) that counts with
``GatewayMetrics(worker=True)`` and exits; the test process reads the files the way
the supervisor does.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.metrics.gateway import REPORTED_ONCE, GatewayMetrics
from ftps_gateway.service.workermetrics import ENVIRONMENT, WorkerMetrics

P = "ftps_gateway_"

WORKER = """
import os
import sys
import prometheus_client  # first, without the variable: memory values chosen
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.metrics.valuestore import keep_values_in

keep_values_in(sys.argv[1])
m = GatewayMetrics(worker=True, process_metrics=False)
for _ in range({logins}):
    m.session_opened()
    m.login("ok")
m.transfer_finished("upload", "ok", 1000, 0.2)
m.track_passive_ports(lambda: ({in_use}, 20))
m.track_hooks(lambda: (1, {age}))
def broken():
    raise RuntimeError("gone")
m.track_login_queue(broken)
m.config_reloaded("ok")  # the supervisor's to count: not written here
m.publish_scrape_time()
print(os.getpid())
"""


def _worker(folder: Path, logins: int, in_use: int, age: float) -> int:
    """Run one worker process to its end; its PID."""
    script = WORKER.format(logins=logins, in_use=in_use, age=age)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(folder)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout)


def _scrape(
    metrics: WorkerMetrics,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def supervisor(tmp_path: Path) -> WorkerMetrics:
    own = GatewayMetrics(process_metrics=False)
    own.track_passive_ports(lambda: (0, 0))
    own.track_login_queue(lambda: 0)
    metrics = WorkerMetrics(own)
    metrics.open()
    return metrics


def test_workers_add_up_and_a_dead_one_keeps_its_counts(
    supervisor: WorkerMetrics,
) -> None:
    """Counters and histograms add up; gauges by their mode; after a worker dies its
    counts stay (folded into one file) and its gauges go."""
    folder = supervisor.folder
    assert folder is not None
    first = _worker(folder, logins=3, in_use=2, age=9.0)
    second = _worker(folder, logins=4, in_use=5, age=1.5)
    login = (f"{P}logins_total", (("result", "ok"),))
    uploads = (f"{P}transfer_duration_seconds_count", (("direction", "upload"),))
    bucket = (
        f"{P}transfer_duration_seconds_bucket",
        (("direction", "upload"), ("le", "0.25")),
    )
    samples = _scrape(supervisor)
    assert samples[login] == 7
    assert samples[uploads] == 2
    assert samples[bucket] == 2
    assert samples[(f"{P}sessions_active", ())] == 7
    assert samples[(f"{P}passive_ports_in_use", ())] == 7
    assert samples[(f"{P}passive_ports_free", ())] == 33
    assert samples[(f"{P}hook_oldest_queued_age_seconds", ())] == 9.0  # the max
    assert math.isnan(samples[(f"{P}login_queue_waiting", ())])  # its source failed
    assert samples[(f"{P}config_reloads_total", (("result", "ok"),))] == 0
    in_files = {family.name for family in MultiProcessCollector(None, folder).collect()}
    assert f"{P}logins" in in_files
    assert not in_files & REPORTED_ONCE  # the supervisor reports those

    supervisor.worker_gone(first)
    samples = _scrape(supervisor)
    assert samples[login] == 7
    assert samples[uploads] == 2
    assert samples[bucket] == 2
    assert samples[(f"{P}sessions_active", ())] == 4
    assert samples[(f"{P}passive_ports_in_use", ())] == 5
    assert samples[(f"{P}hook_oldest_queued_age_seconds", ())] == 1.5

    supervisor.worker_gone(second)
    third = _worker(folder, logins=1, in_use=0, age=0.0)
    supervisor.worker_gone(third)
    samples = _scrape(supervisor)
    assert samples[login] == 8
    assert samples[uploads] == 3
    assert samples[bucket] == 3
    assert samples[(f"{P}sessions_active", ())] == 0  # the supervisor's zero
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["counter_gone.db", "histogram_gone.db"]


def test_a_single_process_reports_what_workers_leave_out() -> None:
    """A single process has the build, reload and reload-time series (the workers'
    files have none: see the first test)."""
    single = GatewayMetrics(process_metrics=False)
    single.config_reloaded("ok")
    assert {f.name for f in single.families()} & REPORTED_ONCE == {
        f"{P}build_info",
        f"{P}config_reloads",
        f"{P}config_last_reload_success_timestamp_seconds",
    }


STRAY = """
import sys
import prometheus_client  # the variable is set: prometheus picks file values
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.metrics.valuestore import keep_values_in

try:
    GatewayMetrics(process_metrics=False)
except RuntimeError:
    print("refused")
keep_values_in(None)
m = GatewayMetrics(process_metrics=False)
m.login("ok")
try:
    GatewayMetrics(worker=True, process_metrics=False)
except RuntimeError:
    print("refused")
"""


def test_the_value_store_is_chosen_explicitly_not_by_import_order(
    tmp_path: Path,
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set before prometheus-client's import, a single
    process still keeps its values in memory once it says so (no file appears), and
    a GatewayMetrics whose role does not match the store is refused."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STRAY)],
        env={ENVIRONMENT: str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == ["refused", "refused"]
    assert not list(tmp_path.iterdir())


def test_the_folder_goes_on_close(supervisor: WorkerMetrics) -> None:
    """close() removes the folder; a scrape then still has every series (at zero)."""
    folder = supervisor.folder
    assert folder is not None
    _worker(folder, logins=1, in_use=0, age=0.0)
    supervisor.close()
    assert not folder.exists()
    assert _scrape(supervisor)[(f"{P}logins_total", (("result", "ok"),))] == 0
