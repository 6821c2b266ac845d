"""Firewall drops, told apart from closed ports: nftables inside a network namespace.

A drop cannot be made on the host without touching other people's traffic, so each
case runs the gateway and the self-test in a throw-away namespace
(``selftest_netns.py``). Needs root, ``unshare`` and ``nft``; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.network]

HELPER = Path(__file__).with_name("selftest_netns.py")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (unshare --net, nft)"
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--net", "nft", "list", "tables"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if probe.returncode != 0:
        return f"nftables unusable in a namespace: {probe.stderr.strip()}"
    return None


def _run(scenario: str) -> tuple[int, dict[str, Any]]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(HELPER), scenario],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    return answer["code"], answer["report"]


def _step(report: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["stage"] == stage)


def test_dropped_control_port_is_a_timeout_not_a_closed_port() -> None:
    """A firewall drop: no answer within --timeout; exit 11, reason tcp-timeout."""
    code, report = _run("control")
    assert code == 11
    assert report["failed_reason"] == "tcp-timeout"
    step = _step(report, "tcp")
    assert "did not answer within 2 s" in step["summary"]
    assert "allow outbound TCP" in step["action"]


def test_dropped_passive_range_names_the_range_and_the_rule() -> None:
    """Control works, data is dropped: exit 18 with the exact range to open."""
    code, report = _run("passive")
    assert code == 18
    assert report["failed_reason"] == "data-timeout"
    step = _step(report, "data-connect")
    assert "the passive range is what is blocked" in step["summary"]
    assert "allow TCP from 127.0.0.1 to 127.0.0.1 ports 40000-40009" in step["action"]
    scan = _step(report, "passive-scan")
    assert scan["status"] == "warn"
    assert scan["details"] == {"timeout": [40000, 40004, 40009]}
    assert report["steps"][-1]["stage"] == "passive-scan"  # stopped there
