"""Start the write-back of an upload's dirty pages while it is received (no IO loop).

The 226 of an upload means "durable": the commit fsyncs the file. Left alone, the
kernel writes a 1 GiB upload's pages back late (``dirty_expire_centisecs``, 30 s),
so that fsync found almost the whole file dirty and took 0.35-0.41 s between the
last byte and the 226 (bench/RESULTS.md, issue 17). ``sync_file_range(2)`` with
``SYNC_FILE_RANGE_WRITE`` starts the write-back of a range and returns without
waiting for it: called every ``STEP_BYTES`` during the upload, the final fsync
only waits for the last few MiB (decision 0007, addendum for issue 17). The pages
two steps behind are then waited for and dropped from the page cache
(``drop_behind``): an upload recycles a few MiB of cache instead of taking its
whole size in fresh memory, which measured as the IO loop's largest cost.

Where it runs: on the hash lane's thread (``storage.hashlane``), after it hashed a
slice, never on the IO loop (the call can block when the device's queue is full).
That is also its bound: it is synchronous on the lane, so nothing queues; a slow
disk slows the lane, the ring fills and the upload's reads stop (TCP backpressure).

CPython has no ``os.sync_file_range``: the libc function is called through ctypes
(which releases the GIL for the call). Where there is none (not Linux), or the
file system refuses it (EINVAL, ENOSYS, ESPIPE...), nothing is done: the commit's
fsync still makes the file durable, only later.

The range is written through a descriptor of its own (a second open of the
temporary, read-only, made by the lane at the first step): the upload's descriptor
carries the flock that marks it as being uploaded and is closed on the IO loop, so
a thread still using its number could hit a reused one. This descriptor is closed
by whichever side finishes last.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

# Start write-back every this many bytes. Measured 8, 16 and 32 MiB on a 1 GiB
# upload (decision 0007): see there for the figures.
STEP_BYTES = 8 << 20
SYNC_FILE_RANGE_WRITE = getattr(os, "SYNC_FILE_RANGE_WRITE", 2)  # linux/fs.h
# WAIT_BEFORE | WRITE | WAIT_AFTER: the range is on the disk when the call returns.
SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4
# Pages this far behind the newest are waited for and dropped from the page cache
# (``drop_behind``): two steps, so the disk has one step's time to write them.
DROP_BEHIND_BYTES = 2 * STEP_BYTES


def _libc_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """``sync_file_range`` from the C library, or None where there is none."""
    native = getattr(os, "sync_file_range", None)
    if native is not None:  # a future CPython
        return native  # type: ignore[no-any-return]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def call(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if function(fd, offset, nbytes, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return call


_SYNC_FILE_RANGE = _libc_sync_file_range()


def available() -> bool:
    """True where this system has ``sync_file_range``."""
    return _SYNC_FILE_RANGE is not None


def sync_range(fd: int, offset: int, nbytes: int) -> None:
    """Start writing back ``nbytes`` from ``offset``; one seam, so tests can count
    the calls and make them fail."""
    if _SYNC_FILE_RANGE is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def drop_behind(fd: int, offset: int, nbytes: int) -> None:
    """Wait until the range is written, then drop its pages from the page cache.

    Why: an upload writes a new temporary beside the file it replaces, so without
    this every upload of 1 GiB takes 1 GiB of fresh page-cache memory while the old
    file's pages are still cached. On this machine (a VM whose free memory goes back
    to the host) writing into fresh pages cost 1.7-2.8 s of system time per GiB
    against 0.3 s into recycled ones (decision 0007): the IO loop's largest cost.
    Dropped pages are recycled by the upload's next writes. The price: a file just
    uploaded is read from the disk, not the cache, by its first download.
    """
    if _SYNC_FILE_RANGE is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WAIT_ALL)
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class WriteBack:
    """The write-back policy of one upload: ``advance`` from the lane, ``close``
    from whichever thread ends the upload."""

    def __init__(self, path: Path, start: int = 0, step: int = STEP_BYTES) -> None:
        """``path``: the upload's temporary (created and locked by it); ``start``:
        the offset the upload continues from (bytes already there). Nothing is
        opened until the first step: a small upload costs no system call here."""
        self._path = path
        self._step = step
        self._started = start  # write-back was started up to here
        self._dropped = start  # pages before this were written and dropped
        self._lock = threading.Lock()
        self._busy = False  # a thread is in advance() with the descriptor
        self._closed = not available()  # ended, failed, or nothing to call
        self.calls = 0  # sync_range calls made (tests, the decision's figures)
        self._fd = -1

    @property
    def active(self) -> bool:
        """False once write-back is off for this upload (unavailable, failed, ended)."""
        return not self._closed

    def advance(self, end: int) -> None:
        """The file holds ``end`` bytes: start the write-back of what is new, once
        ``step`` bytes gathered. Off the IO loop; calls come in order (one lane)."""
        if end - self._started < self._step:
            return
        with self._lock:
            if self._closed:
                return
            self._busy = True
            fd = self._fd
        try:
            if fd < 0:
                # Opened here, at the first step, by path: the upload holds the
                # name (its flock) until it ends, and an upload that ended
                # meanwhile is seen below before anything is written back.
                fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                if not self._adopt(fd):
                    return  # the upload ended meanwhile: the finally closes it
            sync_range(fd, self._started, end - self._started)
            self.calls += 1
            self._started = end
            behind = self._started - DROP_BEHIND_BYTES
            if behind - self._dropped >= self._step:
                drop_behind(fd, self._dropped, behind - self._dropped)
                self._dropped = behind
        except OSError:
            # EINVAL (a file system without it), ENOSYS, EIO...: no more write-back
            # for this upload; it still succeeds, and the commit's fsync reports a
            # real disk error.
            self._stop()
        finally:
            if self._release():
                self._close_fd()

    def _adopt(self, fd: int) -> bool:
        """Keep the descriptor just opened; False if the upload ended meanwhile."""
        with self._lock:
            self._fd = fd
            return not self._closed

    def _release(self) -> bool:
        """The call returned; True if the descriptor is to be closed now."""
        with self._lock:
            self._busy = False
            return self._closed

    def _stop(self) -> None:
        with self._lock:
            self._closed = True

    def close(self) -> None:
        """The upload ended: the descriptor goes now, or after a call in progress.
        Never waits (the IO loop calls this when it discards an upload)."""
        with self._lock:
            self._closed = True
            if self._busy:
                return  # advance() closes it when its call returns
        self._close_fd()

    def _close_fd(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
