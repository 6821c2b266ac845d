"""sha256 of an upload on a second thread, overlapping its receive (no IO loop here).

The IO loop of a worker decrypts TLS and writes the file; hashing the same bytes on
the loop cost ~0.6 s per GB (SHA-NI, decision 0003) during which no other session of
that worker was served. ``hashlib`` releases the GIL for buffers over 2 KiB, so a
second thread hashes while the loop reads the next records.

The hand-off is bounded by construction, never a queue that can grow: an upload
owns a ring of ``RING_BUFFERS`` buffers. The loop receives into the current one,
writes what arrived to the file, and hands the buffer to the lane once it holds at
least ``HAND_OFF_BYTES``; when every buffer of the ring is still being hashed, the
upload asks the loop to stop reading (``buffer()`` is None) and the lane wakes it
(``wake``) when one is free. So at most ``RING_BUFFERS`` MiB per upload wait, and a
hash that falls behind slows that upload's reads (TCP backpressure), not the loop.

Small uploads never reach the lane: a 4 KiB file stays in the first buffer and is
hashed by ``finish`` in the commit job, off the loop as well (a hand-off per file
would cost more than the hash). One lane (one thread) per worker: the worker's loop
decrypts at most ~1.2 GB/s, under one SHA-NI core's ~1.8 GB/s.

The lane also keeps a few spare buffers: a fresh ``bytearray`` of 1 MiB per upload
is zeroed, faulted in page by page and unmapped again, which ``perf`` showed as a
visible share of a 4 KiB upload's cost.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

BUFFER_BYTES = 1 << 20  # one buffer; the most one readiness event reads (data.py)
HAND_OFF_BYTES = BUFFER_BYTES // 2  # a buffer this full goes to the lane
RING_BUFFERS = 3  # per upload: one filling, up to two being hashed
SPARE_BUFFERS = 8  # per lane (worker): buffers kept for the next uploads
JOIN_SECONDS = 2.0  # close() waits this long for the lane's last slice


class HashLane:
    """One thread that hashes the slices uploads hand it, in each upload's order."""

    def __init__(self, name: str = "upload-sha256") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._ready: collections.deque[UploadDigest] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False

        self._spare: list[bytearray] = []

    @property
    def closed(self) -> bool:
        """True once ``close`` was called: new slices are hashed by their owner."""
        return self._closed

    def take_buffer(self) -> bytearray:
        """A receive buffer: a spare one, else a new one."""
        with self._cond:
            if self._spare:
                return self._spare.pop()
        return bytearray(BUFFER_BYTES)

    def give_back(self, buffers: list[bytearray]) -> None:
        """Buffers nobody reads or writes any more (at most ``SPARE_BUFFERS`` kept)."""
        with self._cond:
            room = SPARE_BUFFERS - len(self._spare)
            self._spare.extend(buffers[: max(room, 0)])

    def announce(self, digest: UploadDigest) -> bool:
        """``digest`` has one more slice; False if the lane is closed."""
        with self._cond:
            if self._closed:
                return False
            self._ready.append(digest)
            if self._thread is None:
                self._start()
            self._cond.notify()
        return True

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def start(self) -> None:
        """Start the thread now (a worker's thread count then never changes)."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._closed:
                    self._cond.wait()
                if self._closed and not self._ready:
                    return
                digest = self._ready.popleft()
            digest.hash_one(on_lane=True)

    def close(self) -> None:
        """Stop after the slices already announced; wait a moment for the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(JOIN_SECONDS)


class UploadDigest:
    """The receive buffers and the running sha256 of one upload.

    Loop side: ``buffer``, ``received``, ``write``. Any thread, once the loop is
    done with the upload: ``finish`` (waits for the lane, hashes the rest) or
    ``cancel``.
    """

    def __init__(
        self,
        lane: HashLane | None,
        wake: Callable[[Callable[[], None]], None] | None = None,
        *,
        digest: bool = True,
        writeback: Callable[[int], None] | None = None,
    ) -> None:
        """Args:
        lane: where full buffers are hashed; None hashes them in the caller.
        wake: runs a callback on the IO loop (the loop waker); the lane uses it
            to resume a paused reader.
        digest: False keeps the buffers (the receive path is the same) but
            computes nothing.
        writeback: called on the lane's thread after each slice it hashed, with
            the file offset the slice ended at (``storage.writeback``: start the
            write-back of the pages received so far). Never on the loop, never
            when the lane is closed or ``finish`` hashes the slice.
        """
        self._lane = lane
        self._writeback = writeback
        self._wake = wake
        self._hash = hashlib.sha256() if digest else None
        self._ring: list[bytearray | None] = [None] * RING_BUFFERS
        self._current = 0  # the ring slot being filled
        self._fill = 0
        # Guarded by _lock: slices handed over and not hashed yet, in order; is a
        # thread hashing one now; a paused reader to wake when a slot frees.
        self._lock = threading.Condition()
        # (ring slot, slice, file offset at its end or -1)
        self._pending: collections.deque[tuple[int, memoryview, int]] = (
            collections.deque()
        )
        self._busy = False
        self._busy_slots: set[int] = set()
        self._waiter: Callable[[], None] | None = None
        self._cancelled = False
        self._done = False  # finished or cancelled: the buffers go back once idle

    @property
    def computing(self) -> bool:
        """False when the upload computes no digest."""
        return self._hash is not None

    def seed(self, data: bytes | memoryview) -> None:
        """Hash bytes that precede the upload (a resumed upload's existing part);
        before the first ``received``, on the thread that opens the upload."""
        if self._hash is not None:
            self._hash.update(data)

    # --- loop side

    def buffer(self, waiter: Callable[[], None]) -> memoryview | None:
        """Where the next bytes go (at least ``HAND_OFF_BYTES`` of room), or None
        when every buffer is still being hashed: then ``waiter`` runs on the loop
        once one is free, and the caller stops reading until it does."""
        slot = self._current
        with self._lock:
            if slot in self._busy_slots:
                self._waiter = waiter
                return None
        buffer = self._ring[slot]
        if buffer is None:
            buffer = self._ring[slot] = (
                self._lane.take_buffer()
                if self._lane is not None
                else bytearray(BUFFER_BYTES)
            )
        return memoryview(buffer)[self._fill :]

    def received(self, count: int) -> memoryview:
        """``count`` bytes arrived at the start of the last ``buffer()``: count them
        in and return them (valid until ``hand_off_if_full``)."""
        buffer = self._ring[self._current]
        assert buffer is not None  # noqa: S101 - buffer() came first
        start = self._fill
        self._fill += count
        return memoryview(buffer)[start : self._fill]

    def copy_in(self, data: bytes) -> memoryview:
        """Copy ``data`` (at most the room ``buffer()`` gave) into the ring, as if
        received (TYPE A uploads, whose bytes are converted first)."""
        view = self.buffer(lambda: None)
        if view is None or len(data) > len(view):
            raise BufferError("no room in the receive buffer")  # caller's bug
        view[: len(data)] = data
        return self.received(len(data))

    def hand_off_if_full(self, end: int = -1) -> None:
        """Once what ``received`` returned is stored: a full buffer goes to the lane
        (or, without a digest, is reused at once). ``end``: the file's size with
        these bytes (for ``writeback``)."""
        if self._fill < HAND_OFF_BYTES:
            return
        if self._hash is None:
            self._fill = 0  # nothing to compute: the same buffer again
            return
        slot, count = self._current, self._fill
        self._current = (slot + 1) % RING_BUFFERS
        self._fill = 0
        buffer = self._ring[slot]
        assert buffer is not None  # noqa: S101
        with self._lock:
            self._busy_slots.add(slot)
            self._pending.append((slot, memoryview(buffer)[:count], end))
        if self._lane is None or not self._lane.announce(self):
            self.hash_one()

    # --- lane side, or whoever finishes

    def hash_one(self, *, on_lane: bool = False) -> None:
        """Hash the oldest slice handed over (the lane calls this per announce,
        ``on_lane``: then the write-back of the slice's pages is started too)."""
        with self._lock:
            if self._busy or not self._pending:
                return  # finish() took it, or is hashing the one before it
            slot, data, end = self._pending.popleft()
            self._busy = True
        try:
            if self._hash is not None and not self._cancelled:
                self._hash.update(data)  # the GIL is released for the whole slice
        finally:
            data.release()
            with self._lock:
                self._busy = False
                self._busy_slots.discard(slot)
                waiter, self._waiter = self._waiter, None
                self._lock.notify_all()
                idle_after_end = self._done and not self._pending
        if idle_after_end:
            self._give_back()
        elif waiter is not None and self._wake is not None and not self._cancelled:
            self._wake(waiter)
        # After the reader was woken: the write-back may wait for the disk's queue.
        if on_lane and end >= 0 and self._writeback is not None and not self._done:
            self._writeback(end)

    def finish(self) -> str | None:
        """Wait for the slices handed over, hash the rest; the hex digest.

        Called off the loop once nothing more arrives (the commit job). Slices the
        lane has not started are hashed here, so a busy lane never delays a commit.
        """
        while True:
            with self._lock:
                if self._busy:
                    self._lock.wait()
                    continue
                if not self._pending:
                    break
            self.hash_one()
        result = None
        if self._hash is not None:
            buffer = self._ring[self._current]
            if self._fill and buffer is not None:
                with memoryview(buffer)[: self._fill] as rest:
                    self._hash.update(rest)
            result = self._hash.hexdigest()
        self._fill = 0
        self._end()
        return result

    def cancel(self) -> None:
        """The upload is discarded: pending slices are skipped, nobody is woken."""
        with self._lock:
            self._cancelled = True
            self._waiter = None
            while self._pending:
                slot, data, _end = self._pending.popleft()
                data.release()
                self._busy_slots.discard(slot)
        self._end()

    def _end(self) -> None:
        """No more bytes will come: the buffers go back to the lane, now if no
        slice is being hashed, else when that one is done (``hash_one``)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            idle = not self._busy
        if idle:
            self._give_back()

    def _give_back(self) -> None:
        with self._lock:
            buffers = [b for b in self._ring if b is not None]
            self._ring = [None] * RING_BUFFERS
        if buffers and self._lane is not None:
            self._lane.give_back(buffers)
