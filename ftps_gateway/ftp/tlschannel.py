"""Server-side TLS for pyftpdlib channels, on the standard library ``ssl`` module.

This replaces pyftpdlib's pyOpenSSL mixin (``handlers/ftps/ssl.py``) for both the
control and the data channels. What it does differently, and why:

- The handshake is driven explicitly and no payload can be written before it has
  completed *and* the channel has approved it (``handle_tls_established``): with
  pyOpenSSL, ``SSL_write`` could finish a handshake and send data before the policy
  check ran. Here ``send`` returns 0 until the channel is ``ESTABLISHED``.
- ``suppress_ragged_eofs=False``: a TCP FIN without the peer's ``close_notify`` raises
  ``SSLEOFError`` and marks the stream ``truncated``, so an upload cut short is never
  mistaken for a complete one (stock pyftpdlib answers 226 to it).
- The poller is asked for exactly what OpenSSL wants (read or write) while
  handshaking, and bytes OpenSSL already decrypted (``pending()``) are drained, so
  there are no busy loops and no stalls.
- No partial-write mode: ``SSLSocket.send`` writes the whole buffer or nothing, so a
  256 KiB buffer is encrypted in one call rather than re-sliced per 16 KiB record.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any, ClassVar

from pyftpdlib.exceptions import _RetryError
from pyftpdlib.ioloop import _ERRNOS_DISCONNECTED, IOLoop

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ftps_gateway.tls.contexts import SessionContext

# The poller's event bits, from the loop class the server runs (epoll on Linux:
# EPOLLIN 1, EPOLLOUT 4). WRITE used to be the literal 2, the base class's value,
# which epoll reads as EPOLLPRI: a channel that registered WRITE alone (a handshake
# that must send, a session pausing its input) was never told it could write.
READ: int = IOLoop.READ
WRITE: int = IOLoop.WRITE


class TLSState(enum.Enum):
    """Where a channel is in its TLS life."""

    PLAIN = "plain"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    FAILED = "failed"


def describe_tls_error(err: BaseException) -> str:
    """A short, stable reason for logs and metrics (never includes peer data)."""
    if isinstance(err, ssl.SSLEOFError):
        return "eof-during-handshake"
    if isinstance(err, ssl.SSLError):
        return (err.reason or "tls-error").lower().replace("_", "-")
    if isinstance(err, OSError) and err.errno in _ERRNOS_DISCONNECTED:
        return "peer-disconnected"
    return type(err).__name__


class TLSChannelMixin:
    """Adds ``start_tls`` to a pyftpdlib ``AsyncChat`` channel (server side only).

    Subclasses implement ``handle_tls_established`` and ``handle_tls_failed``.
    """

    tls_state: TLSState = TLSState.PLAIN
    # A data connection unless a class says otherwise: no session tickets, the user's
    # version cap. The control channel sets False.
    tls_data_channel: ClassVar[bool] = True
    # Replies pushed while one read event is handled leave in one TLS write at its
    # end (the control channel). See ``handle_read_event``.
    tls_coalesce_writes: ClassVar[bool] = False
    _write_batch = 0  # > 0: inside a read event, sends wait for its end
    _tls_write_pending = False  # an SSL_write must be retried with the same bytes
    tls_truncated = False  # the peer's stream ended without close_notify
    tls_peer_closed = False  # the peer sent close_notify
    _tls_read_wants_write = False
    _tls_write_wants_read = False
    _recv_buffer: bytearray | None = None

    # Provided by pyftpdlib's AsyncChat.
    socket: Any
    producer_fifo: Any
    ioloop: Any
    _fileno: int | None
    _closed: bool
    _wanted_io_events: int
    _current_io_events: int

    if TYPE_CHECKING:  # provided by asyncore/asynchat through the channel class

        def handle_read(self) -> None: ...
        def handle_write(self) -> None: ...
        def handle_close(self) -> None: ...

    # --- hooks

    def handle_tls_established(self) -> None:
        """Called once the handshake completed; nothing has been sent yet."""
        raise NotImplementedError

    def handle_tls_failed(self, reason: str) -> None:
        """Called when the handshake failed; the channel must close itself."""
        raise NotImplementedError

    def handle_tls_stream_error(self, err: OSError) -> None:
        """Reading the established stream failed; the channel closes next."""

    # --- state changes

    def start_tls(self, context: SessionContext) -> bool:
        """Wrap the connected socket and wait for the client's ClientHello.

        ``context`` is the control session's: it configures the connection for its
        role (``tls_data_channel``), which is what binds data to control.
        """
        try:
            self.socket = context.wrap_socket(self.socket, data=self.tls_data_channel)
        except OSError as err:  # the peer vanished between accept and wrap
            self.tls_state = TLSState.FAILED
            self.handle_tls_failed(describe_tls_error(err))
            return False
        self.tls_state = TLSState.HANDSHAKING
        self._set_io_events(READ)
        return True

    def _set_io_events(self, events: int) -> None:
        """Register exactly ``events``, keeping pyftpdlib's bookkeeping in step."""
        if self._closed or self._fileno is None:
            return
        if self._fileno not in self.ioloop.socket_map:
            self.ioloop.register(self._fileno, self, events)
        elif events != self._current_io_events:
            self.ioloop.modify(self._fileno, events)
        self._wanted_io_events = events
        self._current_io_events = events

    def _handshake_step(self) -> None:
        try:
            self.socket.do_handshake()
        except ssl.SSLWantReadError:
            self._set_io_events(READ)
        except ssl.SSLWantWriteError:
            self._set_io_events(WRITE)
        except OSError as err:  # SSLError is an OSError too
            self.tls_state = TLSState.FAILED
            self.handle_tls_failed(describe_tls_error(err))
        else:
            self.tls_state = TLSState.ESTABLISHED
            self.handle_tls_established()

    # --- poller events (pyftpdlib's epoll loop asks readable()/writable() first)

    def readable(self) -> bool:
        """While handshaking, OpenSSL decides; DTPHandler would close the channel."""
        if self.tls_state is TLSState.HANDSHAKING:
            return True
        if self.tls_state is TLSState.ESTABLISHED and self._tls_write_wants_read:
            return True
        return bool(super().readable())  # type: ignore[misc]

    def writable(self) -> bool:
        """See ``readable``."""
        if self.tls_state is TLSState.HANDSHAKING:
            return True
        if self.tls_state is TLSState.ESTABLISHED and self._tls_read_wants_write:
            return True
        return bool(super().writable())  # type: ignore[misc]

    def handle_read_event(self) -> None:
        """Route readiness to the handshake or to the channel, then drain OpenSSL."""
        state = self.tls_state
        if state is TLSState.PLAIN:
            super().handle_read_event()  # type: ignore[misc]
            return
        if state is TLSState.HANDSHAKING:
            self._handshake_step()
            return
        if state is not TLSState.ESTABLISHED:
            return
        if not self.tls_coalesce_writes:
            self._handle_tls_read()
            return
        # Commands that arrived together (a pipelining client, a multi-line reply)
        # get their replies in one SSL_write and one send, not one each: nothing the
        # client waits for is held beyond the handling of what it already sent.
        # ``replies_held`` spelled out: this runs for every command (decision 0014).
        self._write_batch += 1
        try:
            self._handle_tls_read()
        finally:
            self._write_batch -= 1
        if not self._write_batch and not self._closed and self.producer_fifo:
            self.initiate_send()

    @contextlib.contextmanager
    def replies_held(self) -> Iterator[None]:
        """Replies pushed inside leave together when the block ends (one TLS write).

        Also orders a reply after the bookkeeping that follows it in pyftpdlib's
        code (a transfer's 226 after its audit line and hook event).
        """
        self._write_batch += 1
        try:
            yield
        finally:
            self._write_batch -= 1
        if not self._write_batch and not self._closed and self.producer_fifo:
            self.initiate_send()

    def _handle_tls_read(self) -> None:
        if self._tls_write_wants_read:
            self._tls_write_wants_read = False
            self.handle_write()
        self.handle_read()
        # Decrypted bytes held inside OpenSSL do not make the socket readable.
        while (
            not self._closed
            and self.tls_state is TLSState.ESTABLISHED
            and self._wants_to_read()
            and self.socket.pending()
        ):
            self.handle_read()

    def initiate_send(self) -> None:
        """asynchat's send, with replies queued back to back joined into one write."""
        if self._write_batch:
            return  # handle_read_event sends once the event is handled
        if (
            self.tls_coalesce_writes
            and self.tls_state is TLSState.ESTABLISHED
            and not self._tls_write_pending
        ):
            _join_leading_bytes(self.producer_fifo)
        super().initiate_send()  # type: ignore[misc]

    def _wants_to_read(self) -> bool:
        return bool(self._current_io_events & READ)

    def handle_write_event(self) -> None:
        """Route write readiness to the handshake or to the channel."""
        state = self.tls_state
        if state is TLSState.PLAIN:
            super().handle_write_event()  # type: ignore[misc]
            return
        if state is TLSState.HANDSHAKING:
            self._handshake_step()
            return
        if state is not TLSState.ESTABLISHED:
            return
        if self._tls_read_wants_write:
            self._tls_read_wants_write = False
            self.handle_read_event()
            if self._closed:
                return
        self.handle_write()

    # --- I/O

    def tls_send(self, data: bytes) -> int:
        """Send ``data`` whole (no partial writes), or nothing and retry later."""
        if self.tls_state is not TLSState.ESTABLISHED:
            return 0  # the send gate: no byte leaves before the channel approved it
        try:
            sent = int(self.socket.send(data))
        except ssl.SSLWantWriteError:
            self._tls_write_pending = True
            return 0
        except ssl.SSLWantReadError:
            self._tls_write_pending = True
            self._tls_write_wants_read = True
            self._set_io_events(self._current_io_events | READ)
            return 0
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.handle_close()
            return 0
        except OSError as err:
            if err.errno in _ERRNOS_DISCONNECTED or err.errno == errno.EPIPE:
                self.handle_close()
                return 0
            raise
        self._tls_write_pending = False
        return sent

    def tls_recv(self, buffer_size: int) -> bytes:
        """Receive up to ``buffer_size`` bytes; ``b""`` means the stream has ended."""
        if self.tls_state is not TLSState.ESTABLISHED:
            raise _RetryError
        try:
            data = bytes(self.socket.recv(buffer_size))
        except ssl.SSLWantReadError:
            raise _RetryError from None
        except ssl.SSLWantWriteError:
            self._tls_read_wants_write = True
            self._set_io_events(self._current_io_events | WRITE)
            raise _RetryError from None
        except OSError as err:
            # SSLEOFError (FIN without close_notify), a reset, a bad record: in every
            # case the stream is not known to be complete.
            self.tls_truncated = True
            self.handle_tls_stream_error(err)
            self.handle_close()
            return b""
        if not data:
            self.tls_peer_closed = True
            self.handle_close()
        return data

    def tls_recv_many(self, limit: int) -> tuple[memoryview, bool]:
        """Up to ``limit`` bytes, several records at once, and whether the stream ended.

        One ``SSL_read`` returns one record (16 KiB at most): an upload read record
        by record would cost a file write (and a hash update) per 16 KiB. Unlike
        ``tls_recv`` this never closes the channel itself, so the caller can store
        what arrived before it handles the end of the stream. The data is a view of
        the channel's own buffer, valid until the next call: no copy, and no fresh
        megabyte (and its page faults) per read.
        """
        if self._recv_buffer is None or len(self._recv_buffer) < limit:
            # Reused for the channel's life: recv() would allocate ``limit`` bytes
            # for every 16 KiB record.
            self._recv_buffer = bytearray(limit)
        view = memoryview(self._recv_buffer)[:limit]
        total, ended = self.tls_recv_into(view)
        return view[:total], ended

    def tls_recv_into(self, view: memoryview) -> tuple[int, bool]:
        """Fill ``view`` with as many records as are there; (bytes, stream ended).

        ``tls_recv_many`` into a buffer the caller owns (an upload's receive ring,
        ``storage.hashlane``), so the bytes are written and hashed where they landed.
        """
        if self.tls_state is not TLSState.ESTABLISHED:
            return 0, False
        limit = len(view)
        total = 0
        ended = False
        while total < limit:
            if _fin_is_next(self.socket):
                self.tls_truncated = True
                ended = True
                break
            try:
                received = int(self.socket.recv_into(view[total:limit]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self._tls_read_wants_write = True
                self._set_io_events(self._current_io_events | WRITE)
                break
            except OSError:
                self.tls_truncated = True  # see tls_recv
                ended = True
                break
            if not received:
                self.tls_peer_closed = True
                ended = True
                break
            total += received
        return total, ended

    def send(self, data: bytes) -> int:
        """asyncore's send, through TLS once it is on."""
        if self.tls_state is TLSState.PLAIN:
            return int(super().send(data))  # type: ignore[misc]
        return self.tls_send(data)

    def recv(self, buffer_size: int) -> bytes:
        """asyncore's recv, through TLS once it is on."""
        if self.tls_state is TLSState.PLAIN:
            return bytes(super().recv(buffer_size))  # type: ignore[misc]
        return self.tls_recv(buffer_size)

    def _send_held_replies(self) -> None:
        """Replies held for the end of a read event still leave if the channel closes
        within it (once, best effort: the peer may be gone)."""
        fifo = self.producer_fifo
        if not self._write_batch or not fifo or self._tls_write_pending:
            return
        _join_leading_bytes(fifo)
        if _is_data(fifo[0]):
            with contextlib.suppress(OSError):
                self.socket.send(fifo[0])

    def tls_close(self) -> None:
        """Send close_notify if the session is healthy; never waits for the peer's."""
        if self.tls_state is TLSState.ESTABLISHED and not self._closed:
            self._send_held_replies()
            self.tls_state = TLSState.FAILED  # once only
            # WantRead: our close_notify is out, the peer's is not awaited.
            # WantWrite or a dead peer: nothing more to do.
            with contextlib.suppress(OSError, ValueError):
                self.socket.unwrap()


def _fin_is_next(connection: ssl.SSLSocket) -> bool:
    """True if the peer's TCP FIN (or a reset) is all that is left to read.

    Read through OpenSSL, a FIN without close_notify is a fatal "unexpected EOF":
    OpenSSL 3 then removes the connection's session from its context's cache and
    marks it unresumable (``ssl3_send_alert``, ``remove_session_lock``). On a data
    connection that session *is* its control session's: with TLS 1.2 session-id
    resumption (curl turns session tickets off) every later data connection of the
    partner's session was refused, 425, after one upload cut short (curl 7.88 cuts
    some: its issue 11383). A raw ``MSG_PEEK`` tells the end apart first, so the
    upload ends as truncated without OpenSSL ever seeing it, and the close sends our
    close_notify as usual. One system call per record, only when OpenSSL holds no
    decrypted bytes.
    """
    if connection.pending():
        return False
    try:
        peeked = socket.socket.recv(
            connection, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT
        )
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # a reset: nothing more will come
    return not peeked


def _join_leading_bytes(fifo: Any) -> None:
    """Join the byte strings at the head of asynchat's queue into one.

    asynchat sends one queue entry per call, so replies pushed back to back cost one
    ``SSL_write`` (a TLS record) and one ``send`` each. Entries after an end marker
    (``None``: close when done) or a producer stay where they are.
    """
    if not (len(fifo) > 1 and _is_data(fifo[0]) and _is_data(fifo[1])):
        return
    parts = []
    while fifo and _is_data(fifo[0]):
        parts.append(fifo.popleft())
    fifo.appendleft(b"".join(parts))


def _is_data(entry: object) -> bool:
    """Bytes to send (not a producer, not the end marker, not empty)."""
    return isinstance(entry, bytes | bytearray) and bool(entry)
