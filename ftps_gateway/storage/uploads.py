"""Atomic, resumable uploads and the sweep of their leftovers (no IO loop, no FTP).

Uploads are written under a hidden temporary name that only a completed transfer
renames into place; an interrupted upload's temporary file can be kept for a while
and resumed by the same user (``AtomicUpload``).

Which parts may block, so the protocol layer runs them off the IO loop: opening
(``AtomicUpload(...)``: the open, seeding a resume by copying the existing file,
hashing the bytes already there) and ``commit`` (the rest of the sha256, fsync,
rename). ``buffer``/``received`` and ``discard`` are what the loop itself calls: a
write into the page cache, a rename and a close (a discarded temporary's unlink,
which frees its blocks, is handed back as ``Discarded`` to run elsewhere).

Quotas: an upload may carry an ``UploadQuota`` (``session.quota``: the room reserved
for it, grown in chunks as it writes); a write past what it grants raises
``QuotaExceededError``, and the upload tells it once how it ended (``UploadEnd``:
committed over what, kept as a partial, or removed), from whichever thread ended it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ftps_gateway.storage import vfs
from ftps_gateway.storage.hashlane import UploadDigest
from ftps_gateway.storage.writeback import WriteBack

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from ftps_gateway.storage.hashlane import HashLane

_COPY_CHUNK = 1 << 20
# The sweep leaves younger unlocked temporaries alone: an upload creates its file and
# locks it in the next system call, so this only has to cover a stalled process. It
# was 60 s, which kept a crash's leftovers past the sweep at start-up (retention 0).
TEMP_MIN_AGE_SECONDS = 10


class UploadBusyError(Exception):
    """Another session of the same user is uploading to the same name right now."""


class RestartOutOfRangeError(Exception):
    """REST asked for an offset beyond the data there is to resume from."""


def sync_file(fd: int) -> None:
    """Make the upload's data durable (``os.fsync``); one seam, so tests can hold
    a commit at the moment it waits for the disk."""
    os.fsync(fd)


def sync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable: fsync(2) of a file does not cover the
    directory entry that names it, so after a power loss a file already answered
    226 could be missing. Filesystems that cannot fsync a directory (EINVAL) are
    skipped: the rename is still atomic there."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


class QuotaExceededError(Exception):
    """Writing more would exceed a quota; ``scope`` says which one."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(scope)


class UploadEnd(NamedTuple):
    """How an upload ended: what its quota counts as committed (``UploadQuota``)."""

    committed: bool
    size: int  # the committed file's bytes, or the kept partial's (0: removed)
    # Bytes of the regular file the commit replaced; None: there was none (the
    # upload added a file). Measured just before the rename.
    replaced: int | None
    continued: int  # bytes of an earlier partial the upload continued (on disk before)


class UploadQuota(Protocol):
    """The room an upload may fill, reserved as it grows (``session.quota``).

    ``granted``, ``want`` and ``prefetch`` are called on the IO loop (their answers
    arrive there); ``ended`` once, from the thread that ended the upload.
    """

    @property
    def granted(self) -> int:
        """The size the upload may reach now."""
        ...

    def want(self, size: int, done: Callable[[str | None], None]) -> None:
        """Make the upload's room at least ``size``; ``done(None)`` once it is, or
        ``done(scope)`` naming the full scope (the upload must stop)."""
        ...

    def prefetch(self, size: int) -> None:
        """The upload has reached ``size``: ask for more ahead, if it is due."""
        ...

    def ended(self, end: UploadEnd) -> None:
        """The upload was committed or discarded (any thread; once)."""
        ...

    def may_keep(self, size: int, continued: int) -> bool:
        """May the upload, ended uncommitted, stay as a partial of ``size`` bytes
        (``continued`` of them an earlier partial's)? Only if its reservation
        covered it beside the file it meant to replace, which stays."""
        ...


class AtomicUpload:
    """An upload in progress: a hidden temporary file next to its final name.

    ``commit`` makes the data durable and renames it over the final name in one step;
    anything else (``close`` without commit) removes the temporary file, or keeps it
    as a *partial* that a later ``REST n`` + ``STOR`` or ``APPE`` of the same user to
    the same name continues. So a partner's batch job never sees a half-written file,
    and a failed upload leaves the previous version untouched.

    The temporary name is derived from the user and the final name
    (``vfs.partial_token``), so it is found again by the same user only; an
    exclusive ``flock`` on it keeps two sessions of that user from writing it at once.
    """

    def __init__(
        self,
        final: Path,
        virtual: str,
        owner: str,
        *,
        restart: int | None = None,
        append: bool = False,
        retention_seconds: int = 0,
        max_size: int | None = None,
        quota_scope: str = "",
        may_replace: bool = True,
        digest: bool = True,
        lane: HashLane | None = None,
        wake: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """Open (or reopen) the temporary file and position it.

        Args:
            restart: a REST offset: continue from there (the partial, else the
                existing file, must hold at least that many bytes).
            append: APPE: continue at the end of the partial, else of the file.
            retention_seconds: how long a partial stays resumable (0: never kept).
            max_size: largest size the final file may reach (quotas); None: no limit.
            may_replace: False makes ``commit`` fail if the final name appeared
                meanwhile (the user has no ``overwrite`` permission).
            digest: compute the sha256 of the whole file (``sha256``) for the audit
                log; a resumed upload re-reads the part already there.
            lane: the thread that hashes received data (``storage.hashlane``); None
                hashes in the thread that commits.
            wake: runs a callback on the IO loop (resumes reading once the lane
                has freed a buffer).

        Raises:
            UploadBusyError, RestartOutOfRangeError, QuotaExceededError, OSError.
        """
        self.final = final
        self.name = virtual  # what pyftpdlib reports in its transfer hooks
        self.temp = final.parent / vfs.upload_temp_name(
            final.name, vfs.partial_token(owner, final.name)
        )
        self.retention_seconds = retention_seconds
        self.max_size = max_size
        self.quota_scope = quota_scope
        self.may_replace = may_replace
        self.over_quota = False
        # The room reserved for it (set by the opener once it is known); None: only
        # ``max_size`` limits it.
        self.quota: UploadQuota | None = None
        self.continued = 0  # bytes of an earlier partial this upload continues
        self.sha256: str | None = None  # hex sha256 of the whole file, once committed
        self._committed = False
        self._ended = False
        self._writeback: WriteBack | None = None
        self._digest = UploadDigest(
            lane, wake, digest=digest, writeback=self._advance_writeback
        )
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.temp, flags, 0o640)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise UploadBusyError(str(final)) from None
        # What the temporary held when this upload took it (a kept partial, a
        # crash's leftover): a quota walk made before now counted those bytes.
        self.found_size = os.fstat(self._fd).st_size
        # The temporary holds the user's partial (not a copy made now): a failed
        # open leaves it as it was, and only it.
        self._holds_partial = self.found_size > 0
        self._hashed = 0  # leading bytes already hashed while seeding
        try:
            self.size = self._position(restart, append)
            if self._digest.computing and self.size > self._hashed:
                self._hash_existing(self.size)
            if self._digest.computing and lane is not None:
                # Only the lane starts write-back (after hashing a slice).
                self._writeback = WriteBack(self.temp, start=self.size)
        except BaseException:
            # A partial stays as found; a copy of the final file made for this
            # resume (REST past its end) goes: nothing reserved it, and kept it
            # doubled the file on disk, uncounted, for the partial's retention.
            self.discard(keep=self._holds_partial)
            raise

    def _hash_existing(self, size: int) -> None:
        """Hash the bytes a resumed upload starts from that seeding did not hash."""
        offset = self._hashed
        while offset < size:
            chunk = os.pread(self._fd, min(_COPY_CHUNK, size - offset), offset)
            if not chunk:
                break
            self._digest.seed(chunk)
            offset += len(chunk)

    @property
    def closed(self) -> bool:
        """True once committed or discarded."""
        return self._fd < 0

    def _position(self, restart: int | None, append: bool) -> int:
        if restart is None and not append:
            if self.found_size:  # a new temporary is empty: no truncate to journal
                os.ftruncate(self._fd, 0)
            return 0
        partial = self._partial_size()
        self._holds_partial = partial is not None
        base = partial
        if base is None:
            base = self._seed_from_final(restart)
        offset = base if restart is None else restart
        if offset > base:
            raise RestartOutOfRangeError(f"{offset} > {base}")
        self._check_quota(offset)
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        if partial is not None:
            self.continued = offset
        return offset

    def _partial_size(self) -> int | None:
        """The size of a resumable partial in the temporary file, else None."""
        info = os.fstat(self._fd)
        if self.retention_seconds <= 0 or info.st_size == 0:
            return None
        if time.time() - info.st_mtime > self.retention_seconds:
            return None  # expired: start over
        return info.st_size

    def _seed_from_final(self, restart: int | None) -> int:
        """Copy the existing final file into the temporary one (resume without a
        partial: standard REST/APPE semantics, made atomic).

        The bytes the upload continues from (all of them for APPE, the first
        ``restart`` for REST) are hashed on the way, so a resumed upload reads the
        existing file once, not twice.
        """
        keep = restart if restart is not None else -1
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        try:
            source = os.open(self.final, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        copied = 0
        try:
            if not stat.S_ISREG(os.fstat(source).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            while chunk := os.read(source, _COPY_CHUNK):
                self._check_quota(copied + len(chunk))
                self._write_all(chunk)
                if self._digest.computing and (keep < 0 or copied < keep):
                    take = len(chunk) if keep < 0 else min(len(chunk), keep - copied)
                    self._digest.seed(memoryview(chunk)[:take])
                    self._hashed += take
                copied += len(chunk)
        finally:
            os.close(source)
        return copied

    def _check_quota(self, size: int) -> None:
        limit = self.max_size if self.quota is None else self.quota.granted
        if limit is not None and size > limit:
            self.over_quota = True
            raise QuotaExceededError(self.quota_scope)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    # --- receiving (on the IO loop: page-cache writes only)

    def buffer(self, waiter: Callable[[], None]) -> memoryview | None:
        """Where to receive the next bytes (``received`` says how many came), or
        None while every receive buffer is still being hashed: stop reading until
        ``waiter`` runs (on the loop, through ``wake``)."""
        return self._digest.buffer(waiter)

    def received(self, count: int) -> None:
        """Store the ``count`` bytes received into the last ``buffer()``.

        Raises:
            QuotaExceededError: before writing anything past the quota.
        """
        self._check_quota(self.size + count)
        self._write_all(self._digest.received(count))
        self.size += count
        self._digest.hand_off_if_full(self.size)

    def write(self, data: bytes) -> int:
        """Store ``data`` (at most the room ``buffer()`` offers; TYPE A uploads,
        whose bytes are converted before they are stored).

        Raises:
            QuotaExceededError: before writing anything past the quota.
        """
        self._check_quota(self.size + len(data))
        self._write_all(self._digest.copy_in(data))
        self.size += len(data)
        self._digest.hand_off_if_full(self.size)
        return len(data)

    # --- the end (commit off the loop; discard on it)

    def commit(self) -> None:
        """Finish the sha256, fsync and rename over the final name; raises OSError.

        Blocks on the disk (and on the hash lane): never on the IO loop. Without
        permission to replace, the final name is created with ``link``, which
        fails if it exists: no race between the permission check and now can
        overwrite someone's file.
        """
        replaced: int | None = None
        try:
            sync_file(self._fd)
            if self.may_replace:
                # Only a quota counts what was replaced (an lstat less without one).
                if self.quota is not None:
                    replaced = regular_size(self.final)
                os.replace(self.temp, self.final)
            else:
                os.link(self.temp, self.final, follow_symlinks=False)
                self._unlink_temp()
            sync_directory(self.final.parent)
        except OSError:
            self._digest.cancel()
            self.discard(keep=False, defer_unlink=False)
            raise
        self._committed = True
        self._close_fd()
        self._end(
            UploadEnd(committed=True, size=self.size, replaced=replaced,
                      continued=self.continued)
        )  # fmt: skip
        # Last: the lane hashed along during the fsync; the rest is in memory.
        self.sha256 = self._digest.finish()

    def discard(
        self, *, keep: bool | None = None, defer_unlink: bool = False
    ) -> Discarded | None:
        """Drop the data, or keep it as a resumable partial.

        ``keep`` defaults to: partials are kept (retention > 0), the upload wrote
        something and did not hit a quota (quota refusals leave nothing behind),
        and, under a quota, its reservation covers the partial beside the file it
        was to replace (``UploadQuota.may_keep``): an overwrite, APPE or REST cut
        short otherwise left file and partial together past the quota.

        With ``defer_unlink`` a temporary to remove is renamed to a unique hidden
        name and returned (``Discarded``): unlinking a large file frees its blocks,
        which may take a while; the caller runs it off the loop. The rename keeps
        the flock until the name is free, so the same user's next upload to this
        name (a resume) can never meet the old temporary.
        """
        if self._fd < 0:
            return None
        self._digest.cancel()
        if keep is None:
            keep = self.retention_seconds > 0 and not self.over_quota
            if keep and self.quota is not None:
                size = os.fstat(self._fd).st_size
                keep = self.quota.may_keep(size, self.continued)
        leftover = None
        kept = 0
        if self._committed:
            keep = True
        elif not keep or (kept := os.fstat(self._fd).st_size) == 0:
            kept = 0
            leftover = self._set_aside() if defer_unlink else None
            if leftover is None:
                self._unlink_temp()
        self._close_fd()
        self._end(
            UploadEnd(committed=False, size=kept, replaced=None,
                      continued=self.continued)
        )  # fmt: skip
        return leftover

    def _end(self, end: UploadEnd) -> None:
        """Tell the quota how the upload ended (once)."""
        if self._ended:
            return
        self._ended = True
        if self.quota is not None:
            self.quota.ended(end)

    def _set_aside(self) -> Discarded | None:
        """Rename the temporary to a name of its own; None if that failed."""
        aside = self.temp.parent / vfs.upload_temp_name(
            "discarded", secrets.token_hex(12)
        )
        try:
            os.rename(self.temp, aside)
        except OSError:
            return None
        return Discarded(aside)

    def close(self) -> None:
        """pyftpdlib closes file objects on every exit path: discard by default."""
        self.discard()

    def _advance_writeback(self, end: int) -> None:
        """On the hash lane: the file holds ``end`` bytes (``storage.writeback``)."""
        writeback = self._writeback
        if writeback is not None:
            writeback.advance(end)

    def _close_fd(self) -> None:
        if self._writeback is not None:
            self._writeback.close()
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def _unlink_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def regular_size(path: Path) -> int | None:
    """The size of the regular file at ``path`` (a link is not one); None if there
    is none."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


class Discarded:
    """A discarded upload's temporary, renamed aside, waiting to be unlinked."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def remove(self) -> None:
        """Unlink it (off the loop: freeing a large file's blocks takes time)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def partial_size(final: Path, owner: str, retention_seconds: int) -> int | None:
    """The size of ``owner``'s resumable partial upload to ``final``, or None.

    This is what SIZE answers while a partial exists: clients (curl ``-C -``, lftp
    ``reput``) ask SIZE of the target to learn where to resume.
    """
    if retention_seconds <= 0:
        return None
    temp = final.parent / vfs.upload_temp_name(
        final.name, vfs.partial_token(owner, final.name)
    )
    try:
        info = os.stat(temp, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return None
    if time.time() - info.st_mtime > retention_seconds:
        return None
    return info.st_size


def upload_in_progress(final: Path, owners: Iterable[str]) -> bool:
    """True if one of ``owners`` is uploading to ``final`` right now.

    An upload holds an exclusive ``flock`` on its temporary file for as long as it
    runs (``AtomicUpload``); a kept partial is unlocked. The temporary names are
    derived from user and final name, so this looks at one name per user instead of
    listing a folder that may hold thousands of deliveries.
    """
    for owner in owners:
        try:
            temp = final.parent / vfs.upload_temp_name(
                final.name, vfs.partial_token(owner, final.name)
            )
        except ValueError:  # not a file name ("/"): nothing is uploaded there
            return False
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
        finally:
            os.close(fd)  # also releases the shared lock
    return False


def sweep_partials(roots: list[Path], retention_seconds: int) -> int:
    """Remove upload temporaries idle longer than the retention; return the count.

    A temporary that some upload holds (its flock) is in use and skipped, whatever its
    age. Leftovers of a crash are unlocked, so they go too, at the start-up sweep
    after a restart; a minimum age (``TEMP_MIN_AGE_SECONDS``) keeps a temporary that
    was created a moment ago (and is about to be locked) safe.
    """
    min_age = max(retention_seconds, TEMP_MIN_AGE_SECONDS)
    now = time.time()
    cutoff = now - min_age
    removed = 0
    for entry in vfs.walk_entries(roots):
        if vfs.is_upload_temp(entry.name) and _remove_if_stale(entry.path, cutoff):
            removed += 1
    return removed


def _remove_if_stale(path: str, cutoff: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_mtime > cutoff:
            return False
        os.unlink(path)
    except OSError:  # locked (BlockingIOError) or already gone
        return False
    finally:
        os.close(fd)
    return True
