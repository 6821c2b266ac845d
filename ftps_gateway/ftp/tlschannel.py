"""Server-side TLS for pyftpdlib channels, on the standard library ``ssl`` module.

This replaces pyftpdlib's pyOpenSSL mixin (``handlers/ftps/ssl.py``) for both the
control and the data channels. TLS runs in memory (``SSLContext.wrap_bio``: an
``SSLObject`` between two ``MemoryBIO``); this module moves the ciphertext between
them and the socket itself (decision 0015). What it does, and why:

- The handshake is driven explicitly and no payload can be written before it has
  completed *and* the channel has approved it (``handle_tls_established``): with
  pyOpenSSL, ``SSL_write`` could finish a handshake and send data before the policy
  check ran. Here ``send`` returns 0 until the channel is ``ESTABLISHED``, and the
  socket object refuses plain ``send``/``recv`` (``TLSSocket``).
- Ciphertext is read in large pieces: one ``recv_into`` brings up to
  ``DATA_READ_BYTES`` (16 records) into the incoming BIO, where OpenSSL, reading
  through a socket, made two ``read(2)`` per record (header, body: ``read_ahead``
  is not exposed by ``ssl``). Several records' ciphertext leave in one ``send``.
  Measured on an upload of 1 GiB: decision 0015.
- A TCP FIN without the peer's ``close_notify`` marks the stream ``truncated``, so an
  upload cut short is never mistaken for a complete one (stock pyftpdlib answers 226
  to it). The FIN is seen here, on the socket, and never given to OpenSSL
  (``MemoryBIO.write_eof``): read through OpenSSL, a FIN without close_notify is a
  fatal "unexpected EOF" after which OpenSSL 3 removes the connection's session from
  its context's cache and marks it unresumable (``ssl3_send_alert``,
  ``remove_session_lock``). On a data connection that session *is* its control
  session's: with TLS 1.2 session-id resumption (curl turns session tickets off)
  every later data connection of the partner's session was refused, 425, after one
  upload cut short (curl 7.88 cuts some: its issue 11383). So the session stays
  resumable, and our close sends close_notify as usual.
- The poller is asked for exactly what is needed: READ while OpenSSL waits for
  input, WRITE only while ciphertext waits for room in the kernel (kept, bounded:
  one write's worth, see ``tls_send``), and bytes already read into memory
  (``TLSSocket.pending``) are drained, so there are no busy loops and no stalls.
- No partial-write mode: a buffer is encrypted whole (one ``SSL_write``); if its
  ciphertext cannot all leave now, ``send`` reports 0 and the same buffer is offered
  again (asynchat keeps it queued), exactly the retry contract of ``SSL_write``: the
  queue never counts bytes as sent before they are on the wire, and a close queued
  behind them waits for them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import socket
import ssl
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

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

# Ciphertext one recv_into takes from an established data connection (an upload):
# 16 full records per system call. The buffer is the channel's own, allocated at
# its first read after the handshake (downloads never read) and reused.
DATA_READ_BYTES = 256 * 1024
# Ciphertext one recv takes on a control connection, or during a handshake: no
# buffer is kept (an idle session holds no receive buffer), the bytes object is
# transient. A ClientHello, a few commands.
CONTROL_READ_BYTES = 16 * 1024
# Plaintext encrypted per write on a control connection. The outgoing memory BIO
# keeps the size of the largest write for the connection's life (OpenSSL's BUF_MEM
# never shrinks): a long STAT listing must not leave an idle session holding 64 KiB.
CONTROL_WRITE_BYTES = 16 * 1024


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


def _unexpected_eof() -> ssl.SSLEOFError:
    """What OpenSSL would have raised for a FIN without close_notify."""
    return ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")


class TLSSocket(socket.socket):
    """A channel's socket once TLS is on: the same descriptor, with its TLS attached.

    The rest of the gateway reads the connection's TLS facts from the channel's
    ``socket`` as it did from an ``ssl.SSLSocket``: ``version()``, ``cipher()``,
    ``session_reused``, ``session``, ``context``, ``pending()``; ``tls.contexts``
    reaches the ``SSL*`` through ``_sslobj`` as it does for ``SSLObject``. Plain
    ``send``/``recv`` raise: nothing may bypass TLS by mistake (this module uses
    ``socket.socket``'s own methods).
    """

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO  # ciphertext read from the socket, for OpenSSL
    outgoing: ssl.MemoryBIO  # ciphertext OpenSSL produced, for the socket
    # The last TLS read needed bytes ``incoming`` does not hold: what is there (part
    # of a record) is no progress without the socket.
    starved = False
    eof = False  # the peer's FIN (or a reset) was read from the socket
    eof_error: OSError | None = None  # the reset, if it was one

    @classmethod
    def wrap(
        cls, sock: socket.socket, context: SessionContext, *, data: bool
    ) -> TLSSocket:
        """Move ``sock``'s descriptor into a TLSSocket with a server-side TLS
        connection configured for its role (the handshake is not started)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, data=data)
        wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.fileno())
        wrapped.settimeout(sock.gettimeout())
        sock.detach()
        wrapped.tls, wrapped.incoming, wrapped.outgoing = tls, incoming, outgoing
        return wrapped

    # --- what the gateway reads of an established connection (as on SSLSocket)

    def version(self) -> str | None:
        """The negotiated protocol (``"TLSv1.3"``)."""
        return self.tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The negotiated cipher suite."""
        return self.tls.cipher()

    @property
    def session_reused(self) -> bool:
        """Whether the handshake resumed a session."""
        return bool(self.tls.session_reused)

    @property
    def session(self) -> ssl.SSLSession | None:
        """The connection's TLS session."""
        return self.tls.session

    @property
    def context(self) -> ssl.SSLContext:
        """The ``SSLContext`` the connection was made on."""
        return self.tls.context

    @property
    def _sslobj(self) -> Any:
        """The ``_ssl`` object that holds the ``SSL*`` (``tls.contexts`` reads it)."""
        return self.tls._sslobj  # type: ignore[attr-defined]  # noqa: SLF001

    def pending(self) -> bool:
        """Is there input to process without waiting for the socket?

        Decrypted bytes of a record, or ciphertext already read that may hold a whole
        record: neither makes the socket readable again.
        """
        return bool(self.tls.pending()) or (
            bool(self.incoming.pending) and not self.starved
        )

    # --- plain I/O would bypass TLS

    def send(self, *_args: object) -> NoReturn:
        """Refused: bytes go through ``TLSChannelMixin``."""
        raise ValueError("plain send on a TLS socket")

    def sendall(self, *_args: object) -> NoReturn:
        """Refused: bytes go through ``TLSChannelMixin``."""
        raise ValueError("plain sendall on a TLS socket")

    def recv(self, *_args: object) -> NoReturn:
        """Refused: bytes go through ``TLSChannelMixin``."""
        raise ValueError("plain recv on a TLS socket")

    def recv_into(self, *_args: object) -> NoReturn:
        """Refused: bytes go through ``TLSChannelMixin``."""
        raise ValueError("plain recv_into on a TLS socket")


_raw_send = socket.socket.send
_raw_recv = socket.socket.recv
_raw_recv_into = socket.socket.recv_into


class TLSChannelMixin:
    """Adds ``start_tls`` to a pyftpdlib ``AsyncChat`` channel (server side only).

    Subclasses implement ``handle_tls_established`` and ``handle_tls_failed``.
    """

    tls_state: TLSState = TLSState.PLAIN
    # A data connection unless a class says otherwise: no session tickets, the user's
    # version cap, a receive buffer for uploads. The control channel sets False.
    tls_data_channel: ClassVar[bool] = True
    # Replies pushed while one read event is handled leave in one TLS write at its
    # end (the control channel). See ``handle_read_event``.
    tls_coalesce_writes: ClassVar[bool] = False
    _write_batch = 0  # > 0: inside a read event, sends wait for its end
    # The queue's head was encrypted and its ciphertext (``_tls_out``) has not all
    # left: ``send`` reports it (``_tls_write_size`` bytes) once it has.
    _tls_write_pending = False
    _tls_write_size = 0
    _tls_out: memoryview | None = None  # ciphertext the kernel had no room for yet
    tls_truncated = False  # the peer's stream ended without close_notify
    tls_peer_closed = False  # the peer sent close_notify
    _tls_write_wants_read = False
    _tls_reads = 0  # TLS reads attempted: the read-ahead drain stops without progress
    _rx_drained = False  # this event found the socket empty: no second recv
    _rx_view: memoryview | None = None  # an upload's ciphertext buffer (data channel)
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
        """Put TLS on the connected socket and wait for the client's ClientHello.

        ``context`` is the control session's: it configures the connection for its
        role (``tls_data_channel``), which is what binds data to control.
        """
        try:
            self.socket = TLSSocket.wrap(
                self.socket, context, data=self.tls_data_channel
            )
        except OSError as err:  # the binding could not be set on this connection
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

    def _tls_want_write(self) -> None:
        """Also watch WRITE: ciphertext no queued write accounts for waits (the end
        of a handshake, an answer OpenSSL wrote while reading). Written through,
        since pyftpdlib's ``initiate_send`` updates only ``_wanted_io_events``."""
        if self._closed or self._fileno is None:
            return
        if self._fileno not in self.ioloop.socket_map:
            return  # paused (a login, a file job): the next reply registers it
        events = self._wanted_io_events | WRITE
        self.ioloop.modify(self._fileno, events)
        self._wanted_io_events = self._current_io_events = events

    def _handshake_step(self) -> None:
        sock: TLSSocket = self.socket
        self._rx_drained = False
        try:
            if not self._handshake_progress(sock):
                return
        except OSError as err:  # SSLError is an OSError too
            with contextlib.suppress(OSError):
                self._tls_flush()  # the alert OpenSSL wrote, if the peer still reads
            self._tls_out = None
            self.tls_state = TLSState.FAILED
            self.handle_tls_failed(describe_tls_error(err))
            return
        self.tls_state = TLSState.ESTABLISHED
        try:
            flushed = self._tls_flush()  # the handshake's last flight, tickets
        except OSError:  # the peer is gone: reading finds the end
            flushed, self._tls_out = True, None
        self.handle_tls_established()
        if self._closed or self.tls_state is not TLSState.ESTABLISHED:
            return
        if not flushed:
            self._tls_want_write()
        # A client may send its first command (or data) right behind its Finished;
        # it is in memory now, and the socket will not say so.
        if self._wants_to_read() and sock.pending():
            self.handle_read_event()

    def _handshake_progress(self, sock: TLSSocket) -> bool:
        """Drive the handshake as far as the socket allows; True once complete.

        Raises:
            OSError: it failed (``SSLEOFError`` for a FIN, as OpenSSL would).
        """
        while True:
            try:
                sock.tls.do_handshake()
            except ssl.SSLWantReadError:
                sock.starved = True
                if not self._tls_flush():
                    self._set_io_events(WRITE)  # our flight first
                    return False
                if self._tls_fill():
                    continue
                if sock.eof:
                    raise sock.eof_error or _unexpected_eof() from None
                self._set_io_events(READ)
                return False
            return True

    # --- poller events (pyftpdlib's epoll loop asks readable()/writable() first)

    def readable(self) -> bool:
        """While handshaking, OpenSSL decides; DTPHandler would close the channel."""
        if self.tls_state is TLSState.HANDSHAKING:
            return True
        if self.tls_state is TLSState.ESTABLISHED and self._tls_write_wants_read:
            return True
        return bool(super().readable())  # type: ignore[misc]

    def writable(self) -> bool:
        """See ``readable``; and while ciphertext waits for the kernel."""
        if self.tls_state is TLSState.HANDSHAKING:
            return True
        if self.tls_state is TLSState.ESTABLISHED and self._tls_out is not None:
            return True
        return bool(super().writable())  # type: ignore[misc]

    def handle_read_event(self) -> None:
        """Route readiness to the handshake or to the channel, then drain memory."""
        state = self.tls_state
        if state is TLSState.PLAIN:
            super().handle_read_event()  # type: ignore[misc]
            return
        if state is TLSState.HANDSHAKING:
            self._handshake_step()
            return
        if state is not TLSState.ESTABLISHED:
            return
        self._rx_drained = False
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
        # Records already in memory (decrypted, or read with others) do not make
        # the socket readable. A channel that takes nothing now (no transfer yet)
        # leaves them for later (``TLSSocket.pending`` is checked when it resumes).
        while (
            not self._closed
            and self.tls_state is TLSState.ESTABLISHED
            and self._wants_to_read()
            and self.socket.pending()
        ):
            reads = self._tls_reads
            self.handle_read()
            if self._tls_reads == reads:
                break

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
        """Reading is on: READ is asked and the poller watches the channel (a paused
        session is taken out of it, ``del_channel``)."""
        return bool(self._current_io_events & READ) and (
            self._fileno in self.ioloop.socket_map
        )

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
        if self._tls_out is not None and not self._tls_write_pending:
            try:
                if not self._tls_flush():
                    return
            except OSError:
                self.handle_close()
                return
        self.handle_write()  # also drops WRITE once nothing is queued

    # --- moving ciphertext between the socket and OpenSSL

    def _tls_fill(self) -> bool:
        """Read ciphertext from the socket into OpenSSL's input; False if none came.

        One system call: up to ``DATA_READ_BYTES`` on an established data
        connection (its reused buffer), else ``CONTROL_READ_BYTES``. A short read
        means the socket is empty: it is not asked again in this event (the
        poller is level-triggered and says when more arrives).
        """
        sock: TLSSocket = self.socket
        if sock.eof or self._rx_drained:
            return False
        view = self._rx_view
        if (
            view is None
            and self.tls_data_channel
            and self.tls_state is TLSState.ESTABLISHED
        ):
            view = self._rx_view = memoryview(bytearray(DATA_READ_BYTES))
        try:
            if view is not None:
                count = _raw_recv_into(sock, view)
                size = len(view)
                data: bytes | memoryview = view[:count]
            else:
                data = _raw_recv(sock, CONTROL_READ_BYTES)
                count, size = len(data), CONTROL_READ_BYTES
        except (BlockingIOError, InterruptedError):
            self._rx_drained = True
            return False
        except OSError as err:  # a reset: nothing more will come
            sock.eof, sock.eof_error = True, err
            return False
        if not count:  # the FIN: seen here, never shown to OpenSSL (module doc)
            sock.eof = True
            return False
        sock.incoming.write(data)
        sock.starved = False
        if count < size:
            self._rx_drained = True
        return True

    def _tls_flush(self) -> bool:
        """Send the ciphertext OpenSSL produced, after any left from before; True
        when nothing is left. One ``send``: a partial one means the kernel is full.

        Raises:
            OSError: the connection is gone (the bytes stay, unsent).
        """
        sock: TLSSocket = self.socket
        out = self._tls_out
        if sock.outgoing.pending:
            fresh = sock.outgoing.read()
            out = memoryview(fresh if out is None else bytes(out) + fresh)
        if out is None:
            return True
        self._tls_out = out
        try:
            sent = _raw_send(sock, out)
        except (BlockingIOError, InterruptedError):
            return False
        if sent < len(out):
            self._tls_out = out[sent:]
            return False
        self._tls_out = None
        return True

    def _tls_answer_reads(self) -> None:
        """Send what OpenSSL wrote while reading (a TLS 1.3 KeyUpdate's answer)."""
        try:
            flushed = self._tls_flush()
        except OSError:
            return  # the read side finds the end
        if not flushed and not self._tls_write_pending:
            self._tls_want_write()

    # --- I/O

    def tls_send(self, data: bytes) -> int:
        """Encrypt ``data`` whole and send it; 0 until all its ciphertext has left.

        The contract of ``SSL_write``: after 0 the same buffer is offered again
        (asynchat keeps it at the head of its queue) and is then reported sent
        once its ciphertext is out; nothing more is encrypted meanwhile, so at most
        one write's ciphertext (256 KiB of a download, ``CONTROL_WRITE_BYTES`` of
        replies) waits in memory.
        """
        if self.tls_state is not TLSState.ESTABLISHED:
            return 0  # the send gate: no byte leaves before the channel approved it
        try:
            return self._tls_write(data)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.handle_close()
            return 0
        except OSError as err:
            if err.errno in _ERRNOS_DISCONNECTED or err.errno == errno.EPIPE:
                self.handle_close()
                return 0
            raise

    def _tls_write(self, data: bytes) -> int:
        if self._tls_out is not None and not self._tls_flush():
            return 0
        if self._tls_write_pending:  # the last write's ciphertext has left
            self._tls_write_pending = False
            return self._tls_write_size
        if not self.tls_data_channel and len(data) > CONTROL_WRITE_BYTES:
            data = data[:CONTROL_WRITE_BYTES]
        try:
            size = int(self.socket.tls.write(data))
        except ssl.SSLWantReadError:  # no renegotiation here; kept for safety
            self._tls_write_wants_read = True
            self._set_io_events(self._current_io_events | READ)
            return 0
        if self._tls_flush():
            return size
        self._tls_write_pending = True
        self._tls_write_size = size
        return 0

    def tls_recv(self, buffer_size: int) -> bytes:
        """Receive up to ``buffer_size`` bytes; ``b""`` means the stream has ended."""
        if self.tls_state is not TLSState.ESTABLISHED:
            raise _RetryError
        sock: TLSSocket = self.socket
        self._tls_reads += 1
        data = self._tls_read_record(sock, buffer_size)
        if isinstance(data, OSError):
            # A FIN without close_notify, a reset, a bad record: in every case the
            # stream is not known to be complete.
            self.tls_truncated = True
            self.handle_tls_stream_error(data)
            self.handle_close()
            return b""
        if sock.outgoing.pending:
            self._tls_answer_reads()
        if not data:
            self.tls_peer_closed = True
            self.handle_close()
        return data

    def _tls_read_record(self, sock: TLSSocket, size: int) -> bytes | OSError:
        """One record's bytes (``b""``: close_notify), or what ended the stream.

        Raises:
            _RetryError: nothing to read yet.
        """
        while True:
            try:
                return bytes(sock.tls.read(size))
            except ssl.SSLWantReadError:
                sock.starved = True
                if self._tls_fill():
                    continue
                if sock.eof:
                    return sock.eof_error or _unexpected_eof()
                if sock.outgoing.pending:  # a refused renegotiation's alert
                    self._tls_answer_reads()
                raise _RetryError from None
            except ssl.SSLWantWriteError:  # never with a memory BIO
                raise _RetryError from None
            except OSError as err:
                return err

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
        The end of the stream is close_notify (``tls_peer_closed``) or anything else
        (``tls_truncated``: a FIN or reset, seen on the socket, or a bad record).
        """
        if self.tls_state is not TLSState.ESTABLISHED:
            return 0, False
        sock: TLSSocket = self.socket
        tls = sock.tls
        self._tls_reads += 1
        limit = len(view)
        total = 0
        ended = False
        while total < limit:
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                received: int = tls.read(limit - total, view[total:])  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                sock.starved = True
                if self._tls_fill():
                    continue
                if sock.eof:
                    self.tls_truncated = True
                    ended = True
                break
            except ssl.SSLWantWriteError:  # never with a memory BIO
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
        if sock.outgoing.pending:
            self._tls_answer_reads()
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

    def _write_held_replies(self) -> None:
        """Replies held for the end of a read event still leave if the channel closes
        within it (once, best effort: the peer may be gone). Called with nothing
        left in ``_tls_out``."""
        fifo = self.producer_fifo
        if not self._write_batch or not fifo:
            return
        if self._tls_write_pending:  # the head's ciphertext has just left
            self._tls_write_pending = False
            head = fifo.popleft()
            if _is_data(head) and len(head) > self._tls_write_size:
                fifo.appendleft(head[self._tls_write_size :])
        _join_leading_bytes(fifo)
        if fifo and _is_data(fifo[0]):
            self.socket.tls.write(fifo[0])

    def tls_close(self) -> None:
        """Send close_notify if the session is healthy; never waits for the peer's."""
        if self.tls_state is TLSState.ESTABLISHED and not self._closed:
            self.tls_state = TLSState.FAILED  # once only
            tls = self.socket.tls
            with contextlib.suppress(OSError, ValueError):
                # What an earlier write left goes first; if it cannot, nothing
                # after it can.
                if self._tls_out is None or self._tls_flush():
                    self._write_held_replies()
                    # WantRead: our close_notify is written, the peer's is not
                    # awaited.
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.unwrap()
                    self._tls_flush()
            self._tls_out = None


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
