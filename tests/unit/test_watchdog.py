"""LoopWatchdog: a loop that stops answering is reported once, and cleared after."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.service.watchdog import LoopWatchdog


class StuckLoop:
    """A waker whose loop runs nothing until ``turn`` (the test is the loop)."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []
        self.lock = threading.Lock()

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with self.lock:
            self.calls.append(callback)

    def turn(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for call in calls:
            call()


def _until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_stall_is_logged_once_counted_and_cleared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No answer for the threshold: one error with the loop's stack, the metric,
    ``problem()`` and the report; the answer undoes all but the count."""
    caplog.set_level(logging.INFO, logger="ftps_gateway")
    loop = StuckLoop()
    metrics = GatewayMetrics(process_metrics=False)
    reports: list[float] = []
    dog = LoopWatchdog(loop, lambda: 1, metrics, report=reports.append)
    held = threading.Event()
    stuck = threading.Thread(target=held.wait, args=(30,), name="the-loop")
    stuck.start()
    assert stuck.ident is not None
    dog.start(stuck.ident)
    try:
        _until(lambda: dog.problem() is not None, "the stall")
        problem = dog.problem()
        assert problem is not None
        assert problem.startswith("IO loop stalled for ")
        assert metrics.registry.get_sample_value("ftps_gateway_io_loop_stalled") == 1
        time.sleep(1.0)  # several more pings' worth: still one report, one log line
        errors = [r for r in caplog.records if "has not turned" in r.getMessage()]
        assert len(errors) == 1
        assert "in wait" in errors[0].getMessage()  # the stuck thread's stack
        assert len(reports) == 1
        assert reports[0] >= 1
        loop.turn()
        _until(lambda: dog.problem() is None, "the recovery")
        _until(lambda: len(reports) == 2, "the recovery report")
        assert reports[1] == 0.0
        assert metrics.registry.get_sample_value("ftps_gateway_io_loop_stalled") == 0
        assert (
            metrics.registry.get_sample_value("ftps_gateway_io_loop_stalls_total") == 1
        )
        assert any("turned again" in r.getMessage() for r in caplog.records)
    finally:
        held.set()
        dog.stop()
        stuck.join()


def test_a_loop_that_answers_is_never_reported() -> None:
    """A loop that turns (here: answers every ping at once) stays healthy."""

    class Turning:
        def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
            callback()

    metrics = GatewayMetrics(process_metrics=False)
    dog = LoopWatchdog(Turning(), lambda: 1, metrics)
    dog.start(threading.get_ident())
    time.sleep(1.5)
    dog.stop()
    assert dog.problem() is None
    assert metrics.registry.get_sample_value("ftps_gateway_io_loop_stalls_total") == 0


def test_zero_switches_it_off() -> None:
    """``loop_stall_seconds = 0``: a loop that never answers is not reported."""
    metrics = GatewayMetrics(process_metrics=False)
    dog = LoopWatchdog(StuckLoop(), lambda: 0, metrics)
    dog.start(threading.get_ident())
    time.sleep(1.5)
    dog.stop()
    assert dog.problem() is None
