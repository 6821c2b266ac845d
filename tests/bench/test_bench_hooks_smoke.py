"""The hooks benchmark still runs end to end: both gateways start, both rows print.

Figures are never asserted (benchmarks print numbers, tests check the machinery).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[2] / "bench" / "hooks.py"

pytestmark = [pytest.mark.bench]


@pytest.mark.timeout(180)
def test_smoke_run_prints_both_rows_and_the_hook_queue() -> None:
    """``--smoke`` measures with and without a hook and reports /metrics' queue."""
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--smoke"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    table = [line for line in output.splitlines() if line.startswith("| ")]
    for label in ("| 4 KiB uploads/s, one session |", "| server CPU per upload, ms |"):
        row = next((line for line in table if line.startswith(label)), None)
        assert row is not None, f"missing row {label}\n{output}"
        assert row.split("|")[4].strip() != "n/a", row
    assert "ftps_gateway_hook_events_queued" in output
    assert "dropped 0" in output


def test_unknown_option_is_a_usage_error() -> None:
    """A misspelt option exits 2 before starting anything."""
    done = subprocess.run(
        [sys.executable, str(DRIVER), "--lnog"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
