"""File commands over the session's mount table: permission gate, uploads, quotas.

A mixin for ``handler.ControlHandler``, kept apart from the TLS and login code so the
two can change independently. The rules (``vfs``, ``mounts``) are pure; this module
only applies them to pyftpdlib commands:

- Every path command is checked on its *virtual* path, against the permission words
  of the mount the path belongs to, before pyftpdlib runs it. Refusals are ``550``
  with a generic text; the audit log gets the reason.
- Mount points (and virtual directories leading to them) cannot be created, deleted,
  renamed or uploaded over, and nothing is renamed across mounts.
- Uploads are atomic and resumable (``filesystem.AtomicUpload``): ``REST n`` +
  ``STOR`` or ``APPE`` continue the user's own partial if one was kept, else the
  existing file. SIZE answers the partial's size while it exists, which is how curl
  (``-C -``) and lftp (``reput``) learn where to resume.
- Quotas are checked when an upload starts (files, and how large it may grow) and
  enforced on every write (``452``); a refused upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

from ftps_gateway.config import tree as mounts
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import (
    AtomicUpload,
    QuotaExceededError,
    RestartOutOfRangeError,
    UploadBusyError,
    partial_size,
)

if TYPE_CHECKING:
    from ftps_gateway.ftp.filesystem import GatewayFS
    from ftps_gateway.session.runtime import Gateway

logger = logging.getLogger("ftps_gateway")

P = vfs.Permission

# Commands whose virtual path needs one permission word in its mount.
REQUIRED: dict[str, P] = {
    "LIST": P.LIST, "NLST": P.LIST, "MLSD": P.LIST, "MLST": P.LIST, "STAT": P.LIST,
    "RETR": P.DOWNLOAD,
    "DELE": P.DELETE, "RMD": P.DELETE, "XRMD": P.DELETE,
    "MKD": P.MKDIR, "XMKD": P.MKDIR,
    "RNFR": P.RENAME, "RNTO": P.RENAME,
    "STOR": P.UPLOAD, "APPE": P.UPLOAD,
    "MFMT": P.OVERWRITE,
}  # fmt: skip
CHANGE_DIRECTORY = frozenset({"CWD", "XCWD", "CDUP", "XCUP"})
LISTINGS = frozenset({"LIST", "NLST", "MLSD", "MLST", "STAT"})
# Read a file's metadata: SIZE and MDTM need list or download (SIZE also answers an
# uploader about its own partial; see ftp_SIZE).
METADATA = frozenset({"SIZE", "MDTM"})
# Changes that a mount point (or a virtual directory) never accepts.
STRUCTURAL_CHANGES = frozenset(
    {"DELE", "RMD", "XRMD", "MKD", "XMKD", "RNFR", "RNTO", "STOR", "APPE", "MFMT"}
)

DENIED = "550 Permission denied."
MOUNT_POINT = "550 A mounted folder cannot be changed."
ACROSS_MOUNTS = "550 Cannot rename across mounted folders; upload a copy instead."
OVER_QUOTA = "452 Quota exceeded; upload not stored."
STORAGE_FULL = "452 Insufficient storage space."


class MountCommandsMixin:
    """File commands of a logged-in session, over its ``vfs.MountTable``."""

    mount_table: vfs.MountTable | None = None

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler

        @property
        def gateway(self) -> Gateway: ...

        fs: GatewayFS
        username: str
        data_channel: Any
        _restart_position: int
        _in_dtp_queue: Any
        _current_type: str
        _rnfr: str | None

        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def audit(self, event: str, **fields: Any) -> None: ...
        def _data_path_arranged(self) -> bool: ...
        def _take_data_failure_reply(self) -> str: ...

    # --- the tree, built at login

    def build_mount_table(self, username: str) -> None:
        """Plan ``username``'s tree from the config and create its folders.

        A folder that cannot be created is logged; paths into it are refused later
        ("folder unavailable") instead of failing the whole login.
        """
        cfg = self.gateway.config
        user = cfg.user(username)
        if user is None:  # the login path found the user; a reload may race it
            raise LookupError(username)
        table = mounts.plan_tree(cfg, user).table(user)
        for mount in table.mounts:
            try:
                mount.source.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as err:  # an operational fault, not a bug: no traceback
                logger.error(  # noqa: TRY400
                    "cannot create %s for %s: %s; paths into %s are refused",
                    mount.source, username, err.strerror, mount.virtual,
                )  # fmt: skip
        self.mount_table = table

    # --- the gate, before pyftpdlib runs a path command

    def mount_gate(self, cmd: str, arg: str) -> bool:
        """Check ``cmd`` on its virtual path; reply and return False to refuse it."""
        path = _target(cmd, arg)
        try:
            location = self.fs.locate(path)
        except vfs.PathRefused as refusal:
            self.audit("path_refused", command=cmd, reason=refusal.reason)
            self.respond("550 Invalid path.")
            return False
        reason, reply = self._refusal(cmd, location)
        if reason is None:
            return True
        self.audit(
            "permission_denied", command=cmd, path=location.virtual,
            mount=location.mount.virtual if location.mount else None, reason=reason,
        )  # fmt: skip
        self.respond(reply)
        return False

    def _refusal(self, cmd: str, location: vfs.Location) -> tuple[str | None, str]:
        """(reason for the audit log, reply), or (None, "") to allow."""
        if cmd in STRUCTURAL_CHANGES and self.fs.table.is_structural(location.virtual):
            return "mount-point", MOUNT_POINT
        reason = _missing_permission(cmd, location)
        if reason is not None:
            return reason, DENIED
        if cmd == "RNTO":
            return self._rename_refusal(location)
        replaces = cmd in {"STOR", "APPE"} and self.fs.lexists(location.virtual)
        if replaces and P.OVERWRITE not in location.permissions:
            return "needs-overwrite", DENIED
        return None, ""

    def _rename_refusal(self, target: vfs.Location) -> tuple[str | None, str]:
        if self._rnfr is None:
            return None, ""  # pyftpdlib answers 503
        try:
            source = self.fs.table.locate("/", self._rnfr)
        except vfs.PathRefused:
            return "rename-source-gone", DENIED
        if not self.fs.table.same_mount(source, target):
            self._rnfr = None
            return "across-mounts", ACROSS_MOUNTS
        if self.fs.lexists(target.virtual) and P.OVERWRITE not in target.permissions:
            self._rnfr = None
            return "needs-overwrite", DENIED
        return None, ""

    # --- SIZE: where to resume

    def ftp_SIZE(self, path: str) -> None:
        """The size of the user's own resumable partial if there is one, else the
        file's (for users who may list or download it)."""
        location = self.fs.table.locate("/", path)
        granted = location.permissions
        retention = self.gateway.config.storage.partial_retention_seconds
        if self._current_type != "a" and P.UPLOAD in granted and location.real:
            partial = partial_size(location.real, self.username, retention)
            if partial is not None:
                self.respond(f"213 {partial}")
                return
        if not granted & {P.LIST, P.DOWNLOAD}:
            # The same reply whether the file exists or not: a dropbox tells nothing.
            self.respond("550 Could not get file size.")
            return
        super().ftp_SIZE(path)  # type: ignore[misc]

    # --- uploads

    def ftp_APPE(self, file: str) -> str | None:
        """Continue the user's partial upload to ``file`` (or append to the file)."""
        if self._restart_position:
            self._restart_position = 0
            self.respond("450 Can't APPE while REST request is pending.")
            return None
        return self.ftp_STOR(file, mode="a")

    def ftp_STOR(self, file: str, mode: str = "w") -> str | None:
        """Receive into a hidden temporary file, renamed to ``file`` when complete."""
        restart = self._restart_position or None
        self._restart_position = 0
        command = "APPE" if mode == "a" else "STOR"
        if not self._data_path_arranged():
            self.respond(self._take_data_failure_reply())
            return None
        upload = self._open_upload(file, restart, append=mode == "a")
        if upload is None:
            return None
        if upload.size:
            self.audit("upload_resumed", path=upload.name, offset=upload.size)
        if self.data_channel is not None:
            self.respond("125 Data connection already open. Transfer starting.")
            self.data_channel.file_obj = upload
            self.data_channel.enable_receiving(self._current_type, command)
        else:
            self.respond("150 File status okay. About to open data connection.")
            self._in_dtp_queue = (upload, command)
        return file

    def _open_upload(  # noqa: PLR0911 - one return per refusal reply
        self, file: str, restart: int | None, *, append: bool
    ) -> AtomicUpload | None:
        """The upload for ``file``, or None after replying why not."""
        location = self.fs.table.locate("/", file)
        if location.real is None or location.mount is None:
            self.respond(MOUNT_POINT)
            return None
        exists = os.path.lexists(location.real)
        if exists and not self.fs.isfile(location.virtual):
            self.respond("550 Not a file.")
            return None
        try:
            max_size, scope = self._upload_room(location, exists=exists)
            return AtomicUpload(
                location.real, location.virtual, self.username,
                restart=restart, append=append,
                retention_seconds=self.gateway.config.storage.partial_retention_seconds,
                max_size=max_size, quota_scope=scope,
                may_replace=P.OVERWRITE in location.permissions,
                digest=self.gateway.config.upload_sha256,
            )  # fmt: skip
        except QuotaExceededError as exceeded:
            self.audit("upload_refused", path=location.virtual, reason="quota",
                       scope=exceeded.scope)  # fmt: skip
            self.respond(OVER_QUOTA)
            return None
        except UploadBusyError:
            self.audit("upload_refused", path=location.virtual, reason="busy")
            self.respond("450 This file is being uploaded by another session.")
            return None
        except RestartOutOfRangeError as beyond:
            self.audit("upload_refused", path=location.virtual,
                       reason="restart-beyond-data", detail=str(beyond))  # fmt: skip
            self.respond("554 Restart position beyond the data there is to resume.")
            return None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self.audit("upload_refused", path=location.virtual,
                           reason="storage-full", detail=err.strerror)  # fmt: skip
                self.respond(STORAGE_FULL)
                return None
            self.audit("upload_refused", path=location.virtual, reason=err.strerror)
            self.respond("550 Can't create file.")
        return None

    def _upload_room(
        self, location: vfs.Location, *, exists: bool
    ) -> tuple[int | None, str]:
        """(largest size the upload may reach, the scope that sets it).

        Usage is measured when the upload starts. The file being replaced and the
        user's own temporary file count as free room: both are gone once the upload
        is committed.

        Raises:
            QuotaExceededError: a new file would exceed a file-count limit, or
                there is no room at all.
        """
        if location.mount is None or location.real is None:
            return None, ""
        max_size: int | None = None
        limiting = ""
        replaced = location.real.stat().st_size if exists else 0
        temp = location.real.parent / vfs.upload_temp_name(
            location.real.name, vfs.partial_token(self.username, location.real.name)
        )
        own_temp = temp.stat().st_size if temp.is_file() else 0
        for scope in self.fs.table.quota_scopes(location.mount):
            used = vfs.usage(scope.roots)
            full = scope.max_files is not None and used.files + 1 > scope.max_files
            if full and not exists:
                raise QuotaExceededError(scope.name)
            if scope.max_bytes is not None:
                room = scope.max_bytes - (used.bytes - replaced - own_temp)
                if max_size is None or room < max_size:
                    max_size, limiting = max(room, 0), scope.name
        return max_size, limiting


def _missing_permission(cmd: str, location: vfs.Location) -> str | None:
    """The audit reason if ``location``'s permissions do not allow ``cmd``."""
    granted = location.permissions
    if location.mount is None:  # a virtual directory: enter and list only
        allowed = cmd in CHANGE_DIRECTORY or cmd in LISTINGS
        return None if allowed else "virtual-directory"
    if cmd in CHANGE_DIRECTORY:
        return None if granted else "no-permission"
    if cmd in METADATA:
        readable = granted & {P.LIST, P.DOWNLOAD}
        uploader = cmd == "SIZE" and P.UPLOAD in granted
        return None if readable or uploader else "needs-list-or-download"
    needed = REQUIRED.get(cmd)
    if needed is not None and needed not in granted:
        return f"needs-{needed.value}"
    return None


def _target(cmd: str, arg: str) -> str:
    """The path argument of ``cmd`` (the cwd when it names none)."""
    if cmd in {"CDUP", "XCUP"}:
        return ".."
    if cmd in {"CWD", "XCWD"}:
        return arg or "/"
    if cmd == "LIST" and arg.startswith("-"):
        return ""
    if cmd == "MFMT":
        return arg.split(" ", 1)[1] if " " in arg else ""
    return arg
