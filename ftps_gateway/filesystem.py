"""pyftpdlib's ``AbstractedFS`` over ``vfs.HomeTree``: confinement and atomic uploads.

pyftpdlib maps paths with ``ftp2fs`` and checks ``validpath`` for most commands, but
(measured on 2.2.0) LIST shows symlink targets, MLSD reports facts of files outside the
home and STOU follows symlinked directories. Here every path goes through the pure
``vfs`` resolver, listings never describe a link or anything outside the home, and
uploads are written under a hidden temporary name that only a completed transfer
renames into place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from pyftpdlib.filesystems import AbstractedFS

from ftps_gateway import vfs

# A real path no file can have: what ftp2fs returns for a refused virtual path, so
# that pyftpdlib's own validpath() check answers 550 instead of raising.
_REFUSED = "\x00refused"


class AtomicUpload:
    """An upload in progress: a hidden temporary file next to its final name.

    ``commit`` makes the data durable and renames it over the final name in one step;
    anything else (``close`` without commit, ``discard``) removes the temporary file.
    So a partner's batch job never sees a half-written file, and a failed upload
    leaves the previous version untouched.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.name = str(final)  # what pyftpdlib reports in its transfer hooks
        self.temp = final.parent / vfs.upload_temp_name(
            final.name, secrets.token_hex(8)
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.temp, flags, 0o640)
        self._committed = False
        self.bytes_written = 0

    @property
    def closed(self) -> bool:
        """True once committed or discarded."""
        return self._fd < 0

    def write(self, data: bytes) -> int:
        """Append ``data`` (short writes are retried)."""
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.bytes_written += len(data)
        return len(data)

    def commit(self) -> None:
        """fsync, close and rename over the final name; raises OSError on failure."""
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1
        try:
            os.replace(self.temp, self.final)
        except OSError:
            self._unlink_temp()
            raise
        self._committed = True

    def discard(self) -> None:
        """Drop the partial data."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._committed:
            self._unlink_temp()

    close = discard  # pyftpdlib closes file objects on every exit path

    def _unlink_temp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


class GatewayFS(AbstractedFS):
    """One user's home, as pyftpdlib sees it."""

    def __init__(self, root: str, cmd_channel: Any) -> None:
        super().__init__(root, cmd_channel)
        self.tree = vfs.HomeTree(Path(root))

    # --- path mapping

    def check_virtual(self, path: str) -> str:
        """Normalize a client path against the cwd; raises vfs.PathRefused."""
        return self.tree.normalize(self.cwd, path)

    def ftpnorm(self, ftppath: str) -> str:
        """Virtual normalization that never raises (refusals map to a bad path)."""
        try:
            return self.tree.normalize(self.cwd, ftppath)
        except vfs.PathRefused:
            return _REFUSED

    def ftp2fs(self, ftppath: str) -> str:
        """Virtual -> real; a refused path becomes one that ``validpath`` rejects."""
        try:
            return str(self.tree.to_real(self.tree.normalize(self.cwd, ftppath)))
        except vfs.PathRefused:
            return _REFUSED

    def fs2ftp(self, fspath: str) -> str:
        """Real -> virtual (``/`` for anything that is not inside the home)."""
        if fspath == _REFUSED:
            return "/"
        try:
            return self.tree.to_virtual(Path(fspath))
        except vfs.PathRefused:
            return "/"

    def validpath(self, path: str) -> bool:
        """True only for real paths inside the home (symlinks resolved)."""
        return path != _REFUSED and self.tree.is_inside(path)

    # --- listings: nothing outside the home, no link targets, no temp files

    def listdir(self, path: str) -> list[str]:
        """Entries a partner may see."""
        names = []
        for name in os.listdir(path):
            if vfs.is_upload_temp(name):
                continue
            if self.tree.is_inside(os.path.join(path, name)):
                names.append(name)
        return names

    def listdirinfo(self, path: str) -> list[str]:
        """Same as ``listdir`` (pyftpdlib's hook for faster listings)."""
        return self.listdir(path)

    def lstat(self, path: str) -> os.stat_result:
        """Follow links: listings show what a link points to, never the link."""
        return os.stat(path)

    def islink(self, path: str) -> bool:
        """Links are never reported as links."""
        return False

    def readlink(self, path: str) -> str:
        """Link targets are never revealed."""
        raise OSError(os.strerror(22))

    def get_user_by_uid(self, uid: int) -> str:
        """Do not reveal server account names in listings."""
        return "owner"

    def get_group_by_gid(self, gid: int) -> str:
        """Do not reveal server group names in listings."""
        return "group"

    # --- uploads

    def open_upload(self, real_path: str) -> AtomicUpload:
        """Start an atomic upload to ``real_path`` (already validated)."""
        return AtomicUpload(Path(real_path))

    def mkstemp(self, *args: Any, **kwargs: Any) -> Any:
        """STOU is disabled; it created files through symlinked directories."""
        raise OSError(os.strerror(1))
