"""/metrics of a gateway with workers: scrape latency, how stale a count is, and
what the metrics path costs while sessions sit idle (decision 0012).

What it does: starts the gateway as operators run it (``bench.start_gateway``,
``server.workers = 2``: a supervisor and two workers), then

1. **first scrape**: right after the endpoint answers ``/readyz``, whether the
   workers' series have values yet (``passive_ports_free`` is the size of both
   workers' shares once they are in; 0 before);
2. opens ``--sessions`` logged-in TLS sessions and leaves them idle;
3. **scrape latency**: ``--scrapes`` scrapes one after another (wall time each, and
   the supervisor's CPU seconds per scrape from ``/proc``);
4. **staleness**: ``--logins`` times, logs one more session in and scrapes as fast
   as it can until ``logins_total`` shows it: the delay after the login's 230;
5. **idle cost**: CPU seconds of the whole process tree over ``--idle`` seconds
   with the sessions open and nobody scraping (what the push or the publishing
   timer costs when nothing happens).

    .venv/bin/python bench/metrics_scrape.py --sessions 200

Run it from a checkout: the gateway started is that checkout's (``bench.REPO``).
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as driver

if TYPE_CHECKING:
    import ssl

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _scrape(url: str) -> tuple[float, dict[str, float], int]:
    """(seconds, unlabelled and summed-by-name sample values, body bytes)."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        body = reply.read()
    took = time.perf_counter() - started
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = sample.name + "".join(
                f"|{k}={v}" for k, v in sorted(sample.labels.items())
            )
            values[key] = sample.value
    return took, values, len(body)


def _stats(values: list[float], unit: float = 1e3) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return (
        f"median {statistics.median(ordered) * unit:.1f}, p95 {p95 * unit:.1f}, "
        f"max {ordered[-1] * unit:.1f}"
    )


LOGINS_OK = "ftps_gateway_logins_total|result=ok"


def _open_sessions(
    endpoint: driver.Endpoint, context: ssl.SSLContext, count: int
) -> list[driver.ReusingFTP_TLS]:
    def login(_: int) -> driver.ReusingFTP_TLS:
        # One address: the login queue's per-address share answers 421 when too
        # many wait at once; try again.
        for _attempt in range(50):
            with contextlib.suppress(ftplib.error_temp):
                return driver.login(endpoint, context)
            time.sleep(0.1)
        raise driver.BenchError("logins kept getting 421")

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(login, range(count)))


def _scrape_latency(url: str, pid: int, scrapes: int, sessions: int) -> None:
    took: list[float] = []
    cpu_before = _cpu_seconds(pid)
    values: dict[str, float] = {}
    size = 0
    for _ in range(scrapes):
        seconds, values, size = _scrape(url)
        took.append(seconds)
    cpu = (_cpu_seconds(pid) - cpu_before) / scrapes
    print(
        f"scrape, {sessions} idle sessions, 2 workers: {_stats(took)} ms; "
        f"supervisor CPU {cpu * 1e3:.2f} ms per scrape; {size} bytes; "
        f"sessions_active {values.get('ftps_gateway_sessions_active')}"
    )


def _staleness(
    url: str, endpoint: driver.Endpoint, context: ssl.SSLContext, logins: int
) -> list[driver.ReusingFTP_TLS]:
    delays: list[float] = []
    sessions = []
    for _ in range(logins):
        before = _scrape(url)[1][LOGINS_OK]
        sessions.append(driver.login(endpoint, context))
        done = time.perf_counter()
        while _scrape(url)[1][LOGINS_OK] <= before:
            if time.perf_counter() - done > 30:
                raise driver.BenchError("a login never reached /metrics")
        delays.append(time.perf_counter() - done)
    print(f"login -> visible at /metrics: {_stats(delays)} ms")
    return sessions


def _idle_cost(pid: int, seconds: float, sessions: int) -> None:
    time.sleep(1.0)
    before = driver.tree_cpu_seconds(pid)
    time.sleep(seconds)
    idle = driver.tree_cpu_seconds(pid) - before
    print(
        f"idle, {sessions} sessions, no scrapes: tree CPU "
        f"{idle / seconds * 1e3:.2f} ms per second"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure and print; the exit code is 1 when the gateway did not start."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--logins", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args(argv)
    for line in driver.machine_lines():
        print(line)
    root = Path(tempfile.mkdtemp(prefix="ftpsmetrics-"))
    server: driver.Server | None = None
    sessions: list[driver.ReusingFTP_TLS] = []
    try:
        space = driver.prepare_workspace(root, 1 << 20)
        server = driver.start_gateway(space, workers=2)
        url, pid = server.metrics_url, server.pid
        assert url is not None, "start_gateway sets it"
        assert pid is not None, "start_gateway sets it"
        _, first, size = _scrape(url)
        print(
            "first scrape after /readyz: passive_ports_free "
            f"{first.get('ftps_gateway_passive_ports_free', 'absent')}, "
            f"{len(first)} samples, {size} bytes"
        )
        context = driver.client_context(space.cert.as_posix())
        sessions = _open_sessions(server.endpoint, context, args.sessions)
        time.sleep(3.0)  # past one push period of the old design
        _scrape_latency(url, pid, args.scrapes, args.sessions)
        sessions += _staleness(url, server.endpoint, context, args.logins)
        _idle_cost(pid, args.idle, len(sessions))
    except driver.BenchError as err:
        print(f"measurement failed: {err}", file=sys.stderr)
        return 1
    finally:
        for ftp in sessions:
            ftp.close()
        if server is not None:
            driver.stop_server(server)
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
