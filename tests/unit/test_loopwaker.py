"""The IO loop's timer heap (``loopwaker.TimerScheduler``)."""

from __future__ import annotations

import logging
import time

import pytest
from pyftpdlib.ioloop import IOLoop

from ftps_gateway.ftp.loop import TimerScheduler


@pytest.mark.parametrize("patched", [True, False], ids=["ours", "pyftpdlib"])
def test_a_timer_cancelled_by_an_earlier_one_of_the_same_batch_is_skipped(
    caplog: pytest.LogCaptureFixture, *, patched: bool
) -> None:
    """Two due timers, the first cancelling the second: the second never runs and
    nothing is logged (pyftpdlib's own scheduler logs an AssertionError traceback)."""
    ioloop = IOLoop()
    if patched:
        ioloop.sched = TimerScheduler()
    ran: list[str] = []
    try:
        second = None

        def first() -> None:
            ran.append("first")
            assert second is not None
            second.cancel()

        ioloop.call_later(0.001, first)
        second = ioloop.call_later(0.002, ran.append, "second")
        time.sleep(0.01)
        with caplog.at_level(logging.ERROR, logger="pyftpdlib"):
            ioloop.sched.poll()
    finally:
        ioloop.close()
    assert ran == ["first"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (errors == []) is patched  # the stock scheduler shows the defect
