"""The benchmark driver still runs end to end: both servers start, every row prints.

Figures are never asserted: benchmarks print numbers, tests check that the machinery
works (a broken driver would otherwise only be noticed when someone needs numbers).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[2] / "bench" / "bench.py"

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("curl") is None, reason="the driver needs curl"),
]


def run_driver(*args: str, timeout: float = 110) -> str:
    """Run bench.py with ``args``; its output, once it exited 0."""
    done = subprocess.run(
        [sys.executable, str(DRIVER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(180)
def test_smoke_run_prints_every_row_with_a_ratio() -> None:
    """``--smoke`` measures all rows against the reference and prints ratios (the
    login flood rows measure the gateway only)."""
    output = run_driver("--smoke", timeout=170)
    assert "| ratio gateway/pyftpdlib |" in output
    labels = [
        "| download |",
        "| upload |",
        "| sessions/s, 16 clients |",
        "| p99 session latency, 16 clients, ms |",
        "| KiB per idle TLS session (RSS) |",
        "| 4 KiB uploads/s, one session |",
        "| NOOP p99 ms, same worker, during APPE onto the big file |",
        "| NOOP p99 ms, same worker, during a big upload and its commit |",
        "| uncached login during a login flood, ms |",
        "| uncached login, no flood, ms |",
        "| uncached login during a login flood, new address, ms |",
    ]
    table = [line for line in output.splitlines() if line.startswith("| ")]
    for label in labels:
        row = next((line for line in table if line.startswith(label)), None)
        assert row is not None, f"missing row {label}\n{output}"
        if "login" in label:  # the reference hashes no passwords: not measured
            assert row.split("|")[2].strip() != "n/a", row
            continue
        ratio = row.split("|")[4].strip()
        # A handful of idle sessions may move RSS by 0 pages: 0/0 prints n/a.
        assert ratio != "n/a" or "idle" in label, row
    assert "machine:" in output
    assert "OpenSSL" in output
    assert "gateway audit file:" in output


def test_unknown_row_is_a_usage_error() -> None:
    """A misspelt ``--rows`` name exits 2 before starting anything."""
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--rows", "downlaod"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown rows ['downlaod']" in done.stderr


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="--cluster needs redis-server"
)
def test_cluster_run_compares_one_node_without_and_with_redis() -> None:
    """``--cluster`` adds a node with [cluster] and a table of the two, same run."""
    output = run_driver("--smoke", "--cluster", "--rows", "sessions")
    assert "| ratio gateway+redis/gateway |" in output
    table = [line for line in output.splitlines() if line.startswith("| ")]
    for label in ("| sessions/s, 16 clients |", "| p99 session latency"):
        rows = [line for line in table if line.startswith(label)]
        assert len(rows) == 2, output  # the main table and the cluster table
        assert rows[1].split("|")[4].strip() != "n/a", rows[1]
    assert "Redis round trips for" in output


def test_durable_run_prints_the_durability_floor() -> None:
    """``--durable`` adds stock pyftpdlib hashing and flushing each file, measured
    in the upload rows only, and a table of its ratio to stock and the gateway's
    ratio to it."""
    output = run_driver("--smoke", "--durable", "--rows", "uploads")
    assert "pyftpdlib+durable: 127.0.0.1:" in output
    assert "uploads pyftpdlib+durable round 1:" in output
    floor = [
        line
        for line in output.splitlines()
        if line.startswith("| 4 KiB uploads/s") and "(" in line.split("|")[2]
    ]
    assert len(floor) == 2, output  # the main table and the durability table
    cells = [cell.strip() for cell in floor[1].split("|")]
    assert float(cells[3]) > 0, floor[1]
    assert float(cells[4]) > 0, floor[1]
