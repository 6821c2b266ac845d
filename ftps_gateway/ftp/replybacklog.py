"""Backpressure on the control channel: replies a client does not read are bounded.

A mixin for ``control.ControlHandler``. pyftpdlib answers every command line it has
read and queues the replies (``producer_fifo``) whether or not the client reads them:
one connection pipelining NOOP without reading, before TLS and before login, grew the
server by 50 MiB for 1,000,000 NOOPs (issue 14: 43 to 128 MiB in 9 s), and the
session stayed. Here the bytes queued and not sent yet are counted
(``reply_backlog``):

- past ``PAUSE_BYTES`` the session stops: it reads nothing more (TCP flow control
  then stops the client) and the lines it read already wait, unprocessed, in
  ``_held_input``; once the backlog is down to ``RESUME_BYTES`` it goes on with
  them, in order, then reads again;
- paused for ``STALL_SECONDS`` (the client took less than ~176 KiB of replies in
  that time: the kernel's buffer, then 48 KiB of ours), the session is closed, with
  no reply: it is not reading them. Not "no progress at all": a non-reading
  client's kernel still lets a few bytes through now and then (receive-queue
  collapsing), which kept a session paused for minutes in a first version. A
  client that reads never comes near it: only 64 KiB of unread replies (2,000 NOOP
  answers) pause a session at all;
- past ``MAX_BYTES`` it is closed at once: a safety net, since a paused session
  processes nothing that could add a reply.

A closing session whose client never reads its last reply (``close_when_done``) is
closed after ``CLOSE_GRACE_SECONDS`` instead of holding its socket forever. All of it
applies before TLS and before login too.

The kernel's send buffer of a control connection is fixed at
``KERNEL_SEND_BUFFER_BYTES`` (``limit_kernel_send_buffer``): autotuned, it grew to
3.9 MB for a client that did not read (measured on loopback), kernel memory the
process never sees, per connection, and the reason a non-reading client needed
seconds of reading to move the backlog at all. Replies need no such buffer; data
connections keep the autotuning.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any, Final

from pyftpdlib.ioloop import AsyncChat

from ftps_gateway.ftp.tlschannel import READ, WRITE

if TYPE_CHECKING:
    from ftps_gateway.session.events import SessionEvents

PAUSE_BYTES: Final = 64 * 1024
RESUME_BYTES: Final = 16 * 1024
MAX_BYTES: Final = 256 * 1024
STALL_SECONDS: Final = 10
CLOSE_GRACE_SECONDS: Final = 10
KERNEL_SEND_BUFFER_BYTES: Final = 64 * 1024  # Linux doubles it for its bookkeeping


def limit_kernel_send_buffer(sock: socket.socket) -> None:
    """Fix a control connection's kernel send buffer (see the module doc)."""
    with contextlib.suppress(OSError):  # the peer is gone already: nothing to do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER_BYTES)


class _CountedProducer:
    """A producer whose output counts as backlog when it is produced (lazily)."""

    def __init__(self, producer: Any, counted: Any) -> None:
        self._producer = producer
        self._counted = counted

    def more(self) -> bytes:
        data: bytes = self._producer.more()
        if data:
            self._counted(len(data))
        return data


class ReplyBacklogMixin:
    """Counts the replies queued for the client; pauses the session, closes it."""

    reply_backlog = 0  # bytes queued for the client and not sent yet
    _backlog_paused = False
    _held_input = b""  # lines read but not processed while paused
    _stall_timer: Any = None

    if TYPE_CHECKING:  # provided by ControlHandler / its mixins / pyftpdlib
        events: SessionEvents
        encoding: str
        close_result: str
        producer_fifo: Any
        socket: Any
        ioloop: Any
        ac_in_buffer: bytes
        _closed: bool
        _fileno: int | None
        _wanted_io_events: int
        _current_io_events: int
        _auth_pending: bool
        _write_batch: int
        _stashed_input: bytes
        _tls_write_wants_read: bool

        def close(self) -> None: ...
        def call_later(self, seconds: float, target: Any, *args: Any) -> Any: ...
        def handle_read_event(self) -> None: ...
        def _process_buffered_lines(self) -> None: ...

    # --- counting what is queued and what leaves

    def push(self, data: str) -> None:
        """Queue a reply (pyftpdlib's ``push``, counted)."""
        if self._closed:
            return
        encoded = data.encode(self.encoding)
        if self._queued(len(encoded)):
            AsyncChat.push(self, encoded)

    def push_with_producer(self, producer: Any) -> None:
        """Queue a lazy reply (STAT of a folder); counted as it is produced."""
        super().push_with_producer(  # type: ignore[misc]
            _CountedProducer(producer, self._queued)
        )

    def send(self, data: bytes) -> int:
        """Send through TLS (or not); what left is no longer backlog."""
        sent = int(super().send(data))  # type: ignore[misc]
        if sent > 0:
            self.reply_backlog = max(self.reply_backlog - sent, 0)
            if self._backlog_paused and self.reply_backlog <= RESUME_BYTES:
                self._backlog_paused = False
                self._cancel_stall_timer()
                # Not from inside asynchat's send step: go on at the next turn.
                self.call_later(0, self._resume_after_backlog)
        return sent

    def _queued(self, size: int) -> bool:
        """Count ``size`` more bytes; False (and the session closed) past the cap."""
        self.reply_backlog += size
        if self.reply_backlog > MAX_BYTES:
            self._close_backlogged("over-cap", MAX_BYTES)
            return False
        if self.reply_backlog > PAUSE_BYTES and not self._backlog_paused:
            self._backlog_paused = True
            self._stall_timer = self.call_later(STALL_SECONDS, self._stalled)
            self._watch_wanted()
        if self._backlog_paused and self.ac_in_buffer:
            # What is left of the input waits: asynchat's loop (and loginflow's)
            # stop once the buffer is empty.
            self._held_input = self.ac_in_buffer + self._held_input
            self.ac_in_buffer = b""
        return True

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._backlog_paused and not self._closed:
            self._close_backlogged("not-reading", PAUSE_BYTES)

    def _close_backlogged(self, reason: str, cap: int) -> None:
        self.events.reply_backlog_exceeded(reason, self.reply_backlog, cap)
        self.close_result = "reply-backlog"
        self.close()

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None and not self._stall_timer.cancelled:
            self._stall_timer.cancel()
        self._stall_timer = None

    # --- going on after a pause

    def _resume_after_backlog(self) -> None:
        """The held lines first, in order; then reading again."""
        if self._closed or self._backlog_paused:
            return
        self._watch_wanted()
        if self._auth_pending:  # a PASS among the held lines: loginflow goes on
            return
        self.ac_in_buffer, self._held_input = self._held_input + self.ac_in_buffer, b""
        self._process_buffered_lines()
        # Bytes OpenSSL decrypted already do not make the socket readable again.
        pending = getattr(self.socket, "pending", None)
        if self._wants_input() and pending is not None and pending():
            self.handle_read_event()

    def _resume_input(self) -> None:
        """A login decided while the backlog pauses the session: its lines wait."""
        if not self._backlog_paused:
            super()._resume_input()  # type: ignore[misc]
            return
        self._auth_pending = False
        self._held_input = self._stashed_input + self._held_input
        self._stashed_input = b""
        self._watch_wanted()

    # --- which events the poller watches

    def _wants_input(self) -> bool:
        if self._backlog_paused and not self._tls_write_wants_read:
            return False
        return not self._auth_pending

    def _watch_wanted(self) -> None:
        """Tell the poller exactly what this session wants now (both bookkeepings).

        Always written through: pyftpdlib's ``initiate_send`` changes the poller's
        events without updating ``_current_io_events``, so a comparison with it
        could skip a change that is needed.
        """
        if self._closed or self._fileno is None:
            return
        wanted = (READ if self._wants_input() else 0) | (
            WRITE if self.producer_fifo else 0
        )
        registered = self._fileno in self.ioloop.socket_map
        if not wanted:
            if registered:
                self.ioloop.unregister(self._fileno)
        elif registered:
            self.ioloop.modify(self._fileno, wanted)
        else:
            self.ioloop.register(self._fileno, self, wanted)
        self._wanted_io_events = self._current_io_events = wanted

    def initiate_send(self) -> None:
        """Send what is queued, then watch what this session wants.

        pyftpdlib's ``AsyncChat.initiate_send`` asks for READ whenever it sends, which
        would undo a pause (this one, or the login's in ``loginflow``): while paused,
        asynchat's own send step runs and the events are set here.
        """
        if self._write_batch:
            return  # replies held (tlschannel.replies_held): sent when the hold ends
        if self._backlog_paused or self._auth_pending:
            super(AsyncChat, self).initiate_send()  # type: ignore[misc]
            self._watch_wanted()
        else:
            super().initiate_send()  # type: ignore[misc]

    def readable(self) -> bool:
        """Not while paused (select/poll loops ask; epoll was told already)."""
        if self._backlog_paused and not self._tls_write_wants_read:
            return False
        return bool(super().readable())  # type: ignore[misc]

    # --- closing a session whose client does not read

    def close_when_done(self) -> None:
        """Close after the queued replies, or after a grace if they never leave."""
        super().close_when_done()  # type: ignore[misc]
        if not self._closed:
            self.call_later(CLOSE_GRACE_SECONDS, self._close_unread)

    def _close_unread(self) -> None:
        if not self._closed:
            self.close()
