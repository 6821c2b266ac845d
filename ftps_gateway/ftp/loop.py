"""What the IO loop needs beyond pyftpdlib: a waker, a message port, a timer heap.

pyftpdlib's IOLoop is single-threaded and has no thread-safe ``call_soon``. Password
verification (argon2id, tens of milliseconds by design) must run off the loop so a
burst of logins never stalls transfers; its result comes back through ``LoopWaker``:
a socketpair whose read end sits in the loop, and a queue of callbacks. A worker's
channel to its supervisor (``service.sharedstate``) sits in the loop as a
``MessagePort``: whole messages in and out, never a blocking call.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import socket
import traceback
from typing import TYPE_CHECKING

from pyftpdlib.ioloop import AsyncChat, _Scheduler, timer
from pyftpdlib.log import logger

if TYPE_CHECKING:
    from collections.abc import Callable


# pyftpdlib's threshold for rebuilding the heap without its cancelled timers.
REHEAPIFY_CANCELLATIONS = 512


class LoopWaker(AsyncChat):
    """A loop member that runs callbacks handed to it by ``call_soon_threadsafe``."""

    def __init__(self, ioloop: object) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.settimeout(0.0)
        self._writer.settimeout(0.0)
        # deque.append and popleft are atomic in CPython: no lock, so a signal
        # handler may queue a callback even while the loop thread is running them
        # (a Lock there would deadlock the main thread against itself).
        self._callbacks: collections.deque[Callable[[], object]] = collections.deque()
        self.stop_requested = False
        super().__init__(self._reader, ioloop=ioloop)

    def request_stop(self) -> None:
        """Ask the loop to close everything; safe in a signal handler (no lock)."""
        self.stop_requested = True
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Queue ``callback`` to run on the loop thread; safe in a signal handler."""
        self._callbacks.append(callback)
        # A full buffer means the loop is already awake; an error, that it is gone.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def handle_read(self) -> None:
        """Drain the wake-up bytes, then run every queued callback."""
        try:
            while self._reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        if self.stop_requested:
            self.ioloop.close()
            return
        while True:
            try:
                callback = self._callbacks.popleft()
            except IndexError:
                return
            try:
                callback()
            except Exception:  # noqa: BLE001 - one callback's bug must not stop the loop
                logger.exception("callback scheduled on the IO loop failed")

    def writable(self) -> bool:
        """Never interested in writing."""
        return False

    def close(self) -> None:
        """Close both ends."""
        super().close()
        self._writer.close()


class MessagePort(AsyncChat):
    """A ``SOCK_SEQPACKET`` socket in the IO loop: whole messages, never blocking.

    Each message that arrives goes to ``on_message``; ``send_message`` sends at once
    when the socket has room and otherwise queues (in order) until it has. When the
    other end goes away, ``on_closed`` runs once. Closing the loop closes the port
    without calling ``on_closed`` (a normal stop).
    """

    def __init__(
        self,
        sock: socket.socket,
        ioloop: object,
        on_message: Callable[[bytes], None],
        on_closed: Callable[[], None],
        *,
        max_message_bytes: int,
    ) -> None:
        self._outbox: collections.deque[bytes] = collections.deque()
        self._on_message = on_message
        self._on_closed = on_closed
        # One buffer for every message (up to ``max_message_bytes``): a recv of that
        # size allocated and shrank a MiB per message (decision 0014).
        self._buffer = bytearray(max_message_bytes)
        self._view = memoryview(self._buffer)
        super().__init__(sock, ioloop=ioloop)

    def send_message(self, data: bytes) -> None:
        """Send ``data`` as one message (queued behind earlier ones if any wait)."""
        if self._closed:
            return
        if not self._outbox:
            try:
                self.socket.send(data)
            except BlockingIOError:
                pass
            except OSError:
                self.handle_close()
                return
            else:
                return
        self._outbox.append(data)
        self.modify_ioloop_events(self.ioloop.READ | self.ioloop.WRITE)

    def handle_read(self) -> None:
        """Every message waiting, one by one."""
        while not self._closed:
            try:
                size = self.socket.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError:
                self.handle_close()
                return
            if not size:
                self.handle_close()
                return
            self._on_message(bytes(self._view[:size]))

    def writable(self) -> bool:
        """Only while messages wait."""
        return bool(self._outbox)

    def handle_write(self) -> None:
        """Send what waits, until the socket is full again."""
        while self._outbox:
            try:
                self.socket.send(self._outbox[0])
            except BlockingIOError:
                return
            except OSError:
                self.handle_close()
                return
            self._outbox.popleft()
        self.modify_ioloop_events(self.ioloop.READ)

    def handle_close(self) -> None:
        """The other end went away."""
        if self._closed:
            return
        self.close()
        self._on_closed()

    def handle_error(self) -> None:
        """A bug in a message's handler: log it; the port stays open."""
        logger.exception("message port: handling a message failed")


class TimerScheduler(_Scheduler):
    """pyftpdlib's timer heap, minus a spurious traceback.

    ``_Scheduler.poll`` (pyftpdlib 2.2) first collects every timer that is due, then
    runs them. When one of them cancels another of the same batch (a control
    session's timeout closes the session, which cancels its data connection's
    handshake timer), the second one's ``call()`` fails ``assert not
    self.cancelled`` and the loop logs an ERROR traceback. Seen with clients that
    crawl or vanish (tests/integration/test_faults.py); here a timer cancelled
    meanwhile is skipped.
    """

    def poll(self) -> float | None:
        """Run the due timers that are still wanted; seconds until the next one."""
        now = timer()
        calls = []
        while self._tasks and now >= self._tasks[0].timeout:
            call = heapq.heappop(self._tasks)
            if call.cancelled:
                self._cancellations -= 1
            else:
                calls.append(call)
        for call in calls:
            if call._repush:  # noqa: SLF001 - reset() while due: schedule again
                heapq.heappush(self._tasks, call)
                call._repush = False  # noqa: SLF001
                continue
            if call.cancelled:  # cancelled by an earlier call of this batch
                continue
            try:
                call.call()
            except Exception:  # noqa: BLE001 - as pyftpdlib: log, keep the loop
                logger.error(traceback.format_exc())
        if self._cancellations > REHEAPIFY_CANCELLATIONS and self._cancellations > (
            len(self._tasks) >> 1
        ):
            self.reheapify()
        return max(0.0, self._tasks[0].timeout - now) if self._tasks else None
