"""pyftpdlib's ``AbstractedFS`` over a ``vfs.MountTable``: confinement, atomic uploads.

pyftpdlib maps paths with ``ftp2fs`` and checks ``validpath`` for most commands, but
(measured on 2.2.0) LIST shows symlink targets, MLSD reports facts of files outside the
home and STOU follows symlinked directories. Here the "filesystem path" pyftpdlib
carries between its methods is the *virtual* path itself: every operation maps it
through the session's mount table at the moment it touches the disk, so a path can
only ever reach the mount it belongs to, listings never describe a link or anything
outside the mount, and mount points appear in their parent's listing.

Uploads are written under a hidden temporary name that only a completed transfer
renames into place; an interrupted upload's temporary file can be kept for a while
and resumed by the same user (``AtomicUpload``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
from typing import TYPE_CHECKING, Any

from pyftpdlib.filesystems import AbstractedFS

from ftps_gateway import vfs

if TYPE_CHECKING:
    from pathlib import Path

# What ftp2fs returns for a refused virtual path: pyftpdlib's own validpath() check
# then answers 550 instead of raising.
_REFUSED = "\x00refused"
# A stat result for virtual directories (no real folder behind them): read-only dir.
_VIRTUAL_DIR_STAT = os.stat_result((stat.S_IFDIR | 0o555, 0, 0, 2, 0, 0, 0, 0, 0, 0))
_COPY_CHUNK = 1 << 20
# The sweep leaves younger unlocked temporaries alone: an upload creates its file and
# locks it in the next system call, so this only has to cover a stalled process. It
# was 60 s, which kept a crash's leftovers past the sweep at start-up (retention 0).
TEMP_MIN_AGE_SECONDS = 10


class UploadBusyError(Exception):
    """Another session of the same user is uploading to the same name right now."""


class RestartOutOfRangeError(Exception):
    """REST asked for an offset beyond the data there is to resume from."""


class QuotaExceededError(Exception):
    """Writing more would exceed a quota; ``scope`` says which one."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(scope)


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
        self._committed = False
        self._hash = hashlib.sha256() if digest else None
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.temp, flags, 0o640)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise UploadBusyError(str(final)) from None
        try:
            self.size = self._position(restart, append)
            if self._hash is not None and self.size:
                self._hash_existing(self.size)
        except BaseException:
            self.discard(keep=True)
            raise

    @property
    def sha256(self) -> str | None:
        """Hex sha256 of the whole file as written so far (None: not computed)."""
        return self._hash.hexdigest() if self._hash is not None else None

    def _hash_existing(self, size: int) -> None:
        """Hash the bytes a resumed upload starts from (they were written earlier)."""
        if self._hash is None:
            return
        offset = 0
        while offset < size:
            chunk = os.pread(self._fd, min(_COPY_CHUNK, size - offset), offset)
            if not chunk:
                break
            self._hash.update(chunk)
            offset += len(chunk)

    @property
    def closed(self) -> bool:
        """True once committed or discarded."""
        return self._fd < 0

    def _position(self, restart: int | None, append: bool) -> int:
        partial = self._partial_size()
        if restart is None and not append:
            os.ftruncate(self._fd, 0)
            return 0
        base = partial
        if base is None:
            base = self._seed_from_final()
        offset = base if restart is None else restart
        if offset > base:
            raise RestartOutOfRangeError(f"{offset} > {base}")
        self._check_quota(offset)
        os.ftruncate(self._fd, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        return offset

    def _partial_size(self) -> int | None:
        """The size of a resumable partial in the temporary file, else None."""
        info = os.fstat(self._fd)
        if self.retention_seconds <= 0 or info.st_size == 0:
            return None
        if time.time() - info.st_mtime > self.retention_seconds:
            return None  # expired: start over
        return info.st_size

    def _seed_from_final(self) -> int:
        """Copy the existing final file into the temporary one (resume without a
        partial: standard REST/APPE semantics, made atomic)."""
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
                copied += len(chunk)
        finally:
            os.close(source)
        return copied

    def _check_quota(self, size: int) -> None:
        if self.max_size is not None and size > self.max_size:
            self.over_quota = True
            raise QuotaExceededError(self.quota_scope)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def write(self, data: bytes | memoryview) -> int:
        """Append ``data`` (short writes are retried).

        Raises:
            QuotaExceededError: before writing anything past the quota.
        """
        self._check_quota(self.size + len(data))
        self._write_all(data)
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)
        return len(data)

    def commit(self) -> None:
        """fsync and rename over the final name; raises OSError on failure.

        Without permission to replace, the final name is created with ``link``,
        which fails if it exists: no race between the permission check and now can
        overwrite someone's file.
        """
        try:
            os.fsync(self._fd)
            if self.may_replace:
                os.replace(self.temp, self.final)
            else:
                os.link(self.temp, self.final, follow_symlinks=False)
                self._unlink_temp()
        except OSError:
            self.discard(keep=False)
            raise
        self._committed = True
        self._close_fd()

    def discard(self, *, keep: bool | None = None) -> None:
        """Drop the data, or keep it as a resumable partial.

        ``keep`` defaults to: partials are kept (retention > 0), the upload wrote
        something and did not hit a quota (quota refusals leave nothing behind).
        """
        if self._fd < 0:
            return
        if keep is None:
            keep = self.retention_seconds > 0 and not self.over_quota
        if self._committed:
            keep = True
        elif not keep or os.fstat(self._fd).st_size == 0:
            self._unlink_temp()
        self._close_fd()

    def close(self) -> None:
        """pyftpdlib closes file objects on every exit path: discard by default."""
        self.discard()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def _unlink_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


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


class GatewayFS(AbstractedFS):
    """One user's tree, as pyftpdlib sees it: paths are virtual end to end."""

    def __init__(self, root: str, cmd_channel: Any) -> None:
        super().__init__("/", cmd_channel)
        self.table: vfs.MountTable = cmd_channel.mount_table

    # --- path mapping

    def locate(self, path: str) -> vfs.Location:
        """Map a client path (relative to the cwd); raises vfs.PathRefused."""
        return self.table.locate(self.cwd, path)

    def check_virtual(self, path: str) -> str:
        """Normalize a client path against the cwd; raises vfs.PathRefused."""
        return self.table.normalize(self.cwd, path)

    def ftpnorm(self, ftppath: str) -> str:
        """Virtual normalization that never raises (refusals map to a bad path)."""
        try:
            return self.table.normalize(self.cwd, ftppath)
        except vfs.PathRefused:
            return _REFUSED

    def ftp2fs(self, ftppath: str) -> str:
        """The virtual path itself, once it is known to map into some mount."""
        try:
            return self.locate(ftppath).virtual
        except vfs.PathRefused:
            return _REFUSED

    def fs2ftp(self, fspath: str) -> str:
        """Paths are virtual already (``/`` for a refused one)."""
        return fspath if fspath.startswith("/") else "/"

    def validpath(self, path: str) -> bool:
        """True for virtual paths that map into a mount (or are virtual dirs)."""
        if path == _REFUSED:
            return False
        try:
            self.table.locate("/", path)
        except vfs.PathRefused:
            return False
        return True

    def realpath(self, path: str) -> str:
        """Virtual paths have no links: the path itself."""
        return path

    def _real(self, path: str) -> str:
        """The real path of a virtual one; OSError where there is none."""
        try:
            location = self.table.locate("/", path)
        except vfs.PathRefused as refusal:
            raise PermissionError(errno.EACCES, refusal.reason) from None
        if location.real is None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return str(location.real)

    def _is_virtual_dir(self, path: str) -> bool:
        """No real folder, but mount points below: a directory that only lists them
        (``/`` without a home, or ``/a`` on the way to a mount at ``/a/b``)."""
        try:
            location = self.table.locate("/", path)
        except vfs.PathRefused:
            return False
        if location.real is None:
            return True
        return self.table.is_structural(location.virtual) and not os.path.isdir(
            location.real
        )

    # --- operations (pyftpdlib calls these with virtual paths)

    def open(self, filename: str, mode: str) -> Any:
        """Downloads only (uploads use ``AtomicUpload``); the file reports its
        virtual name, so transfer hooks and logs never show real paths."""
        if mode != "rb":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        file = open(self._real(filename), "rb")  # noqa: SIM115 - pyftpdlib closes it
        setattr(file.raw, "name", filename)  # noqa: B010 - untyped attribute of FileIO
        return file

    def chdir(self, path: str) -> None:
        """Change the virtual cwd (the process cwd is never touched)."""
        location = self.table.locate("/", path)
        if not self.isdir(location.virtual):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.cwd = location.virtual

    def mkdir(self, path: str) -> None:
        """Create a directory (mode 0750)."""
        os.mkdir(self._real(path), 0o750)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        os.rmdir(self._real(path))

    def remove(self, path: str) -> None:
        """Remove a file."""
        os.remove(self._real(path))

    def rename(self, src: str, dst: str) -> None:
        """Rename inside one mount (the handler refuses anything else first)."""
        os.rename(self._real(src), self._real(dst))

    def chmod(self, path: str, mode: int) -> None:
        """SITE CHMOD is disabled."""
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    def stat(self, path: str) -> os.stat_result:
        """Follow links (they stay inside the mount, or the path is refused)."""
        if self._is_virtual_dir(path):
            return _VIRTUAL_DIR_STAT
        return os.stat(self._real(path))

    lstat = stat  # listings show what a link points to, never the link

    def utime(self, path: str, timeval: float) -> None:
        """MFMT."""
        os.utime(self._real(path), (timeval, timeval))

    def isfile(self, path: str) -> bool:
        """True for a regular file (links followed inside the mount)."""
        try:
            return stat.S_ISREG(self.stat(path).st_mode)
        except OSError:
            return False

    def isdir(self, path: str) -> bool:
        """True for a directory, virtual ones included."""
        try:
            return stat.S_ISDIR(self.stat(path).st_mode)
        except OSError:
            return False

    def islink(self, path: str) -> bool:
        """Links are never reported as links."""
        return False

    def lexists(self, path: str) -> bool:
        """True if there is something at ``path``."""
        try:
            self.stat(path)
        except OSError:
            return False
        return True

    def getsize(self, path: str) -> int:
        """Size in bytes."""
        return self.stat(path).st_size

    def getmtime(self, path: str) -> float:
        """Modification time."""
        return self.stat(path).st_mtime

    def readlink(self, path: str) -> str:
        """Link targets are never revealed."""
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    # --- listings: mount points, nothing outside the mount, no temp files

    def listdir(self, path: str) -> list[str]:
        """Entries a partner may see: the folder's own plus mount points in it."""
        location = self.table.locate("/", path)
        children = self.table.children(location.virtual)
        names = set(children)
        if location.mount is not None and not self._is_virtual_dir(location.virtual):
            real = str(self._real(location.virtual))
            for name in os.listdir(real):
                if name in children or not self._is_showable(name):
                    continue
                if self.table.is_visible(location.mount, os.path.join(real, name)):
                    names.add(name)
        return sorted(names)

    @staticmethod
    def _is_showable(name: str) -> bool:
        """Names a partner could also address (no temporaries, no control chars)."""
        try:
            vfs.normalize_virtual("/", name)
        except vfs.PathRefused:
            return False
        return True

    def listdirinfo(self, path: str) -> list[str]:
        """Same as ``listdir`` (pyftpdlib's hook for faster listings)."""
        return self.listdir(path)

    def format_mlsx(
        self,
        basedir: str,
        listing: list[str],
        perms: str,
        facts: list[str],
        ignore_err: bool = True,
    ) -> Any:
        """MLSD/MLST facts, with each entry's ``perm`` fact from its own mount."""
        for name in listing:
            virtual = os.path.join(basedir, name)
            yield from super().format_mlsx(
                basedir, [name], self.perm_letters(virtual), facts, ignore_err
            )

    def perm_letters(self, virtual: str) -> str:
        """RFC 3659 ``perm`` letters for a virtual path, from its mount's words."""
        try:
            location = self.table.locate("/", virtual)
        except vfs.PathRefused:
            return ""
        granted = location.permissions
        letters = "e" if granted or location.mount is None else ""
        letters += "l" if vfs.Permission.LIST in granted or not location.mount else ""
        mapping = {vfs.Permission.DOWNLOAD: "r", vfs.Permission.UPLOAD: "w",
                   vfs.Permission.MKDIR: "m"}  # fmt: skip
        if not self.table.is_structural(location.virtual):
            mapping |= {vfs.Permission.DELETE: "d", vfs.Permission.RENAME: "f"}
        letters += "".join(letter for p, letter in mapping.items() if p in granted)
        return letters

    def get_user_by_uid(self, uid: int) -> str:
        """Do not reveal server account names in listings."""
        return "owner"

    def get_group_by_gid(self, gid: int) -> str:
        """Do not reveal server group names in listings."""
        return "group"

    def mkstemp(self, *args: Any, **kwargs: Any) -> Any:
        """STOU is disabled; it created files through symlinked directories."""
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
