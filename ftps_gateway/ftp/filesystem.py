"""pyftpdlib's ``AbstractedFS`` over a ``vfs.MountTable``: confined paths and listings.

pyftpdlib maps paths with ``ftp2fs`` and checks ``validpath`` for most commands, but
(measured on 2.2.0) LIST shows symlink targets, MLSD reports facts of files outside the
home and STOU follows symlinked directories. Here the "filesystem path" pyftpdlib
carries between its methods is the *virtual* path itself: every operation maps it
through the session's mount table at the moment it touches the disk, so a path can
only ever reach the mount it belongs to, listings never describe a link or anything
outside the mount, and mount points appear in their parent's listing.

Every method that touches the disk asks the session's ``FileAccess`` first, on the
virtual path it was given (the path pyftpdlib finally uses, whatever verb, alias or
flag led there): the command gate in ``fileverbs`` answers first with a precise
reply, and this is the floor under it. A refusal here is ``PermissionError``, which
pyftpdlib answers ``550 Permission denied.``; the session audits the reason.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any

from pyftpdlib.filesystems import AbstractedFS

from ftps_gateway.session.fileaccess import Action, FileAccess, Kind, Refusal
from ftps_gateway.storage import vfs
from ftps_gateway.storage.renames import rename_noreplace

if TYPE_CHECKING:
    import contextlib

# What ftp2fs returns for a refused virtual path: pyftpdlib's own validpath() check
# then answers 550 instead of raising.
_REFUSED = "\x00refused"
# A stat result for virtual directories (no real folder behind them): read-only dir.
_VIRTUAL_DIR_STAT = os.stat_result((stat.S_IFDIR | 0o555, 0, 0, 2, 0, 0, 0, 0, 0, 0))


class GatewayFS(AbstractedFS):
    """One user's tree, as pyftpdlib sees it: paths are virtual end to end."""

    def __init__(self, root: str, cmd_channel: Any) -> None:
        super().__init__("/", cmd_channel)
        self.access: FileAccess = cmd_channel.file_access
        self.table: vfs.MountTable = self.access.table

    def _locate_absolute(self, path: str) -> vfs.Location:
        """``table.locate("/", path)``; remembered for the listing being rendered
        or the command being handled (``FileAccess.remembering``).

        A LIST line asks for one entry's location four times (visibility, mount
        point, virtual folder, real path), each a ``realpath`` of every component:
        20,000 entries cost ~36 lstat calls each. Within one listing (one thread,
        one moment) the answer is the same, so it is computed once.
        """
        return self.access.locate_from("/", path)

    def _one_listing(self) -> contextlib.AbstractContextManager[None]:
        return self.access.remembering()

    # --- path mapping

    def locate(self, path: str) -> vfs.Location:
        """Map a client path (relative to the cwd); raises vfs.PathRefused."""
        return self.access.locate_from(self.cwd, path)

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
            self.access.locate_from("/", path)
        except vfs.PathRefused:
            return False
        return True

    def realpath(self, path: str) -> str:
        """Virtual paths have no links: the path itself."""
        return path

    # --- the access floor

    def _location(self, path: str) -> vfs.Location:
        try:
            return self._locate_absolute(path)
        except vfs.PathRefused:
            # pyftpdlib writes an OSError's text into its 550 reply: the generic
            # one, never the refusal's reason ("folder unavailable", "outside home").
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES)) from None

    def _checked(
        self, action: Action, path: str, *, rename_source: vfs.Location | None = None
    ) -> vfs.Location:
        """The location of ``path`` if ``action`` is allowed there; else refuse."""
        location = self._location(path)
        refusal = self.access.decide(action, location, rename_source=rename_source)
        if refusal is not None:
            self._refuse(refusal, location)
        return location

    def _visible(self, path: str, *, also: vfs.Permission | None = None) -> None:
        """Refuse unless the user may see ``path``'s metadata (or holds ``also``)."""
        location = self._location(path)
        if self.access.may_see_metadata(location):
            return
        if also is not None and also in location.permissions:
            return
        self._refuse(Refusal("needs-list-or-download", Kind.DENIED), location)

    def _refuse(self, refusal: Refusal, location: vfs.Location) -> None:
        self.cmd_channel.on_access_refused(refusal, location)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    def _real(self, path: str) -> str:
        """The real path of a virtual one; OSError where there is none."""
        location = self._location(path)
        if location.real is None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return str(location.real)

    def _is_virtual_dir(self, path: str) -> bool:
        """No real folder, but mount points below: a directory that only lists them
        (``/`` without a home, or ``/a`` on the way to a mount at ``/a/b``)."""
        try:
            location = self._locate_absolute(path)
        except vfs.PathRefused:
            return False
        if location.real is None:
            return True
        return self.table.is_structural(location.virtual) and not os.path.isdir(
            location.real
        )

    def _stat(self, path: str) -> os.stat_result:
        """stat without the visibility check, for this class's own questions."""
        if self._is_virtual_dir(path):
            return _VIRTUAL_DIR_STAT
        return os.stat(self._real(path))

    # --- operations (pyftpdlib calls these with virtual paths)

    def open(self, filename: str, mode: str) -> Any:
        """Downloads only (uploads use ``AtomicUpload``); the file reports its
        virtual name, so transfer hooks and logs never show real paths."""
        if mode != "rb":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real = self._checked(Action.DOWNLOAD, filename).real
        file = open(str(real), "rb")  # noqa: SIM115 - pyftpdlib closes it
        setattr(file.raw, "name", filename)  # noqa: B010 - untyped attribute of FileIO
        return file

    def chdir(self, path: str) -> None:
        """Change the virtual cwd (the process cwd is never touched)."""
        location = self._checked(Action.ENTER, path)
        if not self.isdir(location.virtual):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.cwd = location.virtual

    def mkdir(self, path: str) -> None:
        """Create a directory (mode 0750)."""
        os.mkdir(str(self._checked(Action.MKDIR, path).real), 0o750)

    def rmdir(self, path: str) -> None:
        """Remove an empty directory."""
        os.rmdir(str(self._checked(Action.REMOVE, path).real))

    def remove(self, path: str) -> None:
        """Remove a file; this worker's quota walks of its scopes are forgotten, so
        the next upload here sees the room (nothing negative is reported to the
        shared state: ``session.quota`` says why)."""
        location = self._checked(Action.REMOVE, path)
        os.remove(str(location.real))
        control = self.cmd_channel
        if control is not None:
            control.gateway.quota_walks.forget(self.access.quota_scopes(location))

    def rename(self, src: str, dst: str) -> None:
        """Rename inside one mount; without ``overwrite``, never over anything.

        The check said the target is free; ``rename_noreplace`` makes the kernel
        hold to it, so a file that appeared since (a consumer, another session) is
        not replaced: ``EEXIST``, which pyftpdlib answers 550.
        """
        source = self._checked(Action.RENAME_FROM, src)
        target = self._checked(Action.RENAME_TO, dst, rename_source=source)
        if vfs.Permission.OVERWRITE in target.permissions:
            os.rename(str(source.real), str(target.real))
        else:
            rename_noreplace(str(source.real), str(target.real))

    def chmod(self, path: str, mode: int) -> None:
        """SITE CHMOD is disabled."""
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    def stat(self, path: str) -> os.stat_result:
        """Follow links (they stay inside the mount, or the path is refused); only
        for paths whose metadata the user may see.

        A mount point the user may not list shows as a bare folder: its real link
        count, size and date would tell how many subfolders it holds and when the
        last delivery came.
        """
        self._visible(path)
        location = self._location(path)
        if location.is_mount_point and not self.access.may_see_inside(location):
            return _VIRTUAL_DIR_STAT
        return self._stat(path)

    lstat = stat  # listings show what a link points to, never the link

    def utime(self, path: str, timeval: float) -> None:
        """MFMT."""
        real = self._checked(Action.SET_TIME, path).real
        os.utime(str(real), (timeval, timeval))

    def isfile(self, path: str) -> bool:
        """True for a regular file (links followed inside the mount)."""
        try:
            return stat.S_ISREG(self._stat(path).st_mode)
        except OSError:
            return False

    def isdir(self, path: str) -> bool:
        """True for a directory, virtual ones included."""
        try:
            return stat.S_ISDIR(self._stat(path).st_mode)
        except OSError:
            return False

    def islink(self, path: str) -> bool:
        """Links are never reported as links."""
        return False

    def lexists(self, path: str) -> bool:
        """True if there is something at ``path``."""
        try:
            self._stat(path)
        except OSError:
            return False
        return True

    def getsize(self, path: str) -> int:
        """Size in bytes, for users who may see it."""
        self._visible(path)
        return self._stat(path).st_size

    def getmtime(self, path: str) -> float:
        """Modification time, for users who may see it (or set it: MFMT answers
        with the time it just set)."""
        self._visible(path, also=vfs.Permission.OVERWRITE)
        return self._stat(path).st_mtime

    def readlink(self, path: str) -> str:
        """Link targets are never revealed."""
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    # --- listings: mount points, nothing outside the mount, no temp files

    def listdir(self, path: str) -> list[str]:
        """Entries a partner may see: the folder's own plus mount points in it."""
        location = self._checked(Action.LIST, path)
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

    def format_list(
        self, basedir: str, listing: list[str], ignore_err: bool = True
    ) -> Any:
        """LIST/STAT lines, only for a folder the user may list.

        Checked before the lines are produced (pyftpdlib consumes them later).
        """
        self._checked(Action.LIST, basedir)
        return super().format_list(basedir, listing, ignore_err)

    def format_mlsx(
        self,
        basedir: str,
        listing: list[str],
        perms: str,
        facts: list[str],
        ignore_err: bool = True,
    ) -> Any:
        """MLSD/MLST facts, only for a folder the user may list, with each entry's
        ``perm`` fact from its own mount."""
        self._checked(Action.LIST, basedir)
        return self._mlsx_lines(basedir, listing, facts, ignore_err)

    def _mlsx_lines(
        self, basedir: str, listing: list[str], facts: list[str], ignore_err: bool
    ) -> Any:
        for name in listing:
            virtual = os.path.join(basedir, name)
            yield from super().format_mlsx(
                basedir, [name], self.perm_letters(virtual), facts, ignore_err
            )

    def perm_letters(self, virtual: str) -> str:
        """RFC 3659 ``perm`` letters for a virtual path, from its mount's words."""
        try:
            location = self._locate_absolute(virtual)
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

    # --- a whole listing at once (for a file-work thread, off the IO loop)

    def render_listing(
        self, kind: str, path: str, *, perms: str = "", facts: list[str] | None = None
    ) -> bytes:
        """Everything ``kind`` (LIST, NLST, MLSD or STAT) sends for ``path``.

        pyftpdlib reads the folder on the IO loop and then stats (here also maps
        and ``realpath``-checks) one entry per step while the data connection
        drains, all on the loop: for a folder of many files that is the loop's
        time, not the partner's. This does all of it in one go, in the caller's
        thread; the result is held in memory (about 80 bytes per entry, the size
        of the name list ``listdir`` already builds).

        Raises:
            OSError: the folder cannot be read (the reply is 550 with its reason);
                for MLSD NotADirectoryError when ``path`` is something else (501),
                FileNotFoundError when nothing is there (550).
        """
        with self._one_listing():
            return self._render(kind, path, perms, facts or [])

    def _render(self, kind: str, path: str, perms: str, facts: list[str]) -> bytes:
        if kind == "MLSD":
            if not self.isdir(path):  # RFC 3659 7.2: 501 for a file, 550 for nothing
                if self.lexists(path):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            lines = self.format_mlsx(path, self.listdir(path), perms, facts)
            return b"".join(lines)
        if kind == "NLST":
            if self.isdir(path):
                names = self.listdir(path)
            else:
                self.lstat(path)  # raises if it is not there (or not visible)
                names = [os.path.basename(path)]
            text = "".join(f"{name}\r\n" for name in names)
            return text.encode(
                self.cmd_channel.encoding, self.cmd_channel.unicode_errors
            )
        if self.isdir(path):  # LIST and STAT
            return b"".join(self.format_list(path, self.listdir(path)))
        basedir, filename = os.path.split(path)
        self.lstat(path)
        return b"".join(self.format_list(basedir, [filename]))

    def get_user_by_uid(self, uid: int) -> str:
        """Do not reveal server account names in listings."""
        return "owner"

    def get_group_by_gid(self, gid: int) -> str:
        """Do not reveal server group names in listings."""
        return "group"

    def mkstemp(self, *args: Any, **kwargs: Any) -> Any:
        """STOU is disabled; it created files through symlinked directories."""
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
