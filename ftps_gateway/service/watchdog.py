"""The IO loop watchdog: notice, from outside, a loop that has stopped turning.

One IO loop serves every session of a worker, so a loop that blocks (a slow disk
under a file operation still on the loop, a bug, a lock) freezes all of them while
the process looks alive: ``/healthz`` is answered by another thread and ``/readyz``
stayed green (issue 14, item 3). A thread per worker pings the loop through its
waker every ``period`` seconds; an answer that has not come back within
``server.loop_stall_seconds`` is a stall. Once per stall it logs the loop thread's
stack (where it is stuck), counts ``ftps_gateway_io_loop_stalls_total``, sets
``ftps_gateway_io_loop_stalled`` and reports ``problem()`` to ``/readyz`` (and,
in a worker, to the supervisor, whose ``/readyz`` is the one served); when the
answer comes, all of that is undone and the stall's length logged.

No pyftpdlib: the waker is anything with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.metrics.gateway import GatewayMetrics
    from ftps_gateway.session.runtime import Waker

logger = logging.getLogger("ftps_gateway")

MAX_PERIOD_SECONDS = 1.0  # pings at most this far apart (the detection delay)
IDLE_PERIOD_SECONDS = 1.0  # how often a switched-off watchdog looks at its setting


class LoopWatchdog:
    """Pings one IO loop from a thread of its own; reports when it stops turning."""

    def __init__(
        self,
        waker: Waker,
        threshold: Callable[[], int],
        metrics: GatewayMetrics,
        *,
        report: Callable[[float], None] | None = None,
        name: str = "loop-watchdog",
    ) -> None:
        """Args:
        threshold: ``server.loop_stall_seconds`` in force now (0: off); read at
            every ping, so a reload changes it.
        report: told the stall's length in seconds when one starts, 0.0 when
            it ends (a worker passes it on to the supervisor); any thread.
        """
        self._waker = waker
        self._threshold = threshold
        self._metrics = metrics
        self._report = report
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread: int | None = None
        self._answered = threading.Event()
        self._sent_at = 0.0
        self._stalled_since: float | None = None  # monotonic, while stalled

    @property
    def stalled_seconds(self) -> float | None:
        """How long the loop has been stuck, or None."""
        since = self._stalled_since
        return None if since is None else time.monotonic() - since

    def problem(self) -> str | None:
        """``/readyz``'s line while the loop is stuck; None otherwise."""
        stuck = self.stalled_seconds
        if stuck is None:
            return None
        return f"IO loop stalled for {stuck:.0f} s"

    def start(self, loop_thread: int) -> None:
        """Watch the loop that runs on thread ``loop_thread`` (an ident)."""
        if self._thread is not None:
            return
        self._loop_thread = loop_thread
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread (before the loop's own shutdown, which may take a while)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * MAX_PERIOD_SECONDS)
            self._thread = None

    # --- the watchdog thread

    def _run(self) -> None:
        self._answered.set()
        while not self._stop.is_set():
            threshold = self._threshold()
            if threshold <= 0:
                self._answered.set()
                self._end_stall()
                self._stop.wait(IDLE_PERIOD_SECONDS)
                continue
            period = min(MAX_PERIOD_SECONDS, threshold / 4)
            if self._answered.is_set():
                self._end_stall()
                self._answered.clear()
                self._sent_at = time.monotonic()
                self._waker.call_soon_threadsafe(self._answered.set)
            elif time.monotonic() - self._sent_at >= threshold:
                self._begin_stall(time.monotonic() - self._sent_at)
            self._stop.wait(period)

    def _begin_stall(self, waited: float) -> None:
        if self._stalled_since is not None:
            return  # once per stall
        self._stalled_since = self._sent_at
        self._metrics.loop_stalled()
        logger.error(
            "IO loop has not turned for %.1f s (server.loop_stall_seconds); every "
            "session of this process waits; /readyz fails until it turns. It is "
            "at:\n%s",
            waited,
            self._loop_stack(),
        )
        if self._report is not None:
            self._report(waited)

    def _end_stall(self) -> None:
        since = self._stalled_since
        if since is None:
            return
        self._stalled_since = None
        self._metrics.loop_recovered()
        logger.warning(
            "IO loop turned again after a %.1f s stall", time.monotonic() - since
        )
        if self._report is not None:
            self._report(0.0)

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread or -1)  # noqa: SLF001 - the documented way to see another thread's stack
        if frame is None:
            return "  (the loop thread is gone)"
        return "".join(traceback.format_stack(frame)).rstrip()
