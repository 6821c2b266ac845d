"""File verbs of a logged-in session: the command gate, uploads, SIZE.

A mixin for ``control.ControlHandler``. The decisions are the session's
(``session.fileaccess``); here they meet FTP:

- ``file_gate`` maps each file command to an ``Action`` and asks ``FileAccess`` about
  the *final* virtual path, the one pyftpdlib is about to use (aliases such as XMKD
  and XSTAT, LIST flags, ``..`` and ``//`` are resolved by then). It is the fast
  first answer with a precise reply; ``filesystem.GatewayFS`` checks again where the
  disk is touched. Refusals are ``550`` with a generic text; the audit log gets why.
- Uploads are atomic and resumable (``storage.uploads.AtomicUpload``): ``REST n`` +
  ``STOR`` or ``APPE`` continue the user's own partial if one was kept, else the
  existing file. SIZE answers the partial's size while it exists, which is how curl
  (``-C -``) and lftp (``reput``) learn where to resume.
- Quotas are checked when an upload starts and enforced on every write (``452``); a
  refused upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from ftps_gateway.ftp import replies
from ftps_gateway.session.fileaccess import Action, Kind, Refusal
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import (
    AtomicUpload,
    QuotaExceededError,
    RestartOutOfRangeError,
    UploadBusyError,
)

if TYPE_CHECKING:
    from ftps_gateway.ftp.filesystem import GatewayFS
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.fileaccess import FileAccess
    from ftps_gateway.session.runtime import Gateway

# Each file command (pyftpdlib's canonical name) and what it does to its path.
COMMAND_ACTIONS: dict[str, Action] = {
    "CWD": Action.ENTER, "XCWD": Action.ENTER, "CDUP": Action.ENTER,
    "XCUP": Action.ENTER,
    "LIST": Action.LIST, "NLST": Action.LIST, "MLSD": Action.LIST,
    "MLST": Action.LIST, "STAT": Action.LIST,
    "SIZE": Action.SIZE, "MDTM": Action.READ_METADATA,
    "RETR": Action.DOWNLOAD,
    "STOR": Action.UPLOAD, "APPE": Action.UPLOAD,
    "MKD": Action.MKDIR, "XMKD": Action.MKDIR,
    "DELE": Action.REMOVE, "RMD": Action.REMOVE, "XRMD": Action.REMOVE,
    "RNFR": Action.RENAME_FROM, "RNTO": Action.RENAME_TO,
    "MFMT": Action.SET_TIME,
}  # fmt: skip

REFUSAL_REPLIES = {
    Kind.DENIED: replies.DENIED,
    Kind.MOUNT_POINT: replies.MOUNT_POINT,
    Kind.ACROSS_MOUNTS: replies.ACROSS_MOUNTS,
}
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class FileVerbsMixin:
    """File commands of a logged-in session, over its ``FileAccess``."""

    file_access: FileAccess | None = None
    current_command = ""  # the canonical command being processed (for the audit)

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        events: SessionEvents
        fs: GatewayFS
        username: str
        data_channel: Any
        _restart_position: int
        _in_dtp_queue: Any
        _current_type: str
        _rnfr: str | None

        @property
        def gateway(self) -> Gateway: ...
        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def data_path_arranged(self) -> bool: ...
        def take_data_failure_reply(self) -> str: ...

    # --- the gate, on the path pyftpdlib is about to use

    def file_gate(self, cmd: str, path: str) -> bool:
        """Check ``cmd`` on its final virtual ``path``; reply and False to refuse."""
        action = COMMAND_ACTIONS.get(cmd)
        access = self.file_access
        if action is None or access is None:
            return True
        try:
            location = access.locate(path)
        except vfs.PathRefused as err:
            self.events.note("path_refused", command=cmd, reason=err.reason)
            self.respond(replies.INVALID_PATH)
            return False
        source = None
        refusal: Refusal | None = None
        if action is Action.RENAME_TO and self._rnfr is not None:
            try:
                source = access.locate(self._rnfr)
            except vfs.PathRefused:
                refusal = Refusal("rename-source-gone", Kind.DENIED)
        refusal = refusal or access.decide(action, location, rename_source=source)
        if refusal is None:
            return True
        if action is Action.RENAME_TO:
            self._rnfr = None  # a refused RNTO ends the rename
        self.on_access_refused(refusal, location)
        self.respond(REFUSAL_REPLIES[refusal.kind])
        return False

    def on_access_refused(self, refusal: Refusal, location: vfs.Location) -> None:
        """Audit a refusal (the gate's, or the filesystem floor's)."""
        self.events.note(
            "permission_denied", command=self.current_command or None,
            path=location.virtual,
            mount=location.mount.virtual if location.mount else None,
            reason=refusal.reason,
        )  # fmt: skip

    # --- SIZE: where to resume

    def ftp_SIZE(self, path: str) -> None:
        """The size of the user's own resumable partial if there is one, else the
        file's (for users who may see it)."""
        access = self.file_access
        if access is None:
            return
        location = access.locate(path)
        binary = self._current_type != "a"
        partial = access.own_partial_size(location, binary=binary)
        if partial is not None:
            self.respond(replies.SIZE.format(size=partial))
            return
        if not access.may_see_metadata(location):
            # The same reply whether the file exists or not: a dropbox tells nothing.
            self.respond(replies.NO_SIZE)
            return
        super().ftp_SIZE(path)  # type: ignore[misc]

    # --- uploads

    def ftp_APPE(self, file: str) -> str | None:
        """Continue the user's partial upload to ``file`` (or append to the file)."""
        if self._restart_position:
            self._restart_position = 0
            self.respond(replies.APPE_AFTER_REST)
            return None
        return self.ftp_STOR(file, mode="a")

    def ftp_STOR(self, file: str, mode: str = "w") -> str | None:
        """Receive into a hidden temporary file, renamed to ``file`` when complete."""
        restart = self._restart_position or None
        self._restart_position = 0
        command = "APPE" if mode == "a" else "STOR"
        if not self.data_path_arranged():
            self.respond(self.take_data_failure_reply())
            return None
        upload = self._open_upload(file, restart, append=mode == "a")
        if upload is None:
            return None
        if upload.size:
            self.events.note("upload_resumed", path=upload.name, offset=upload.size)
        if self.data_channel is not None:
            self.respond(replies.DATA_ALREADY_OPEN)
            self.data_channel.file_obj = upload
            self.data_channel.enable_receiving(self._current_type, command)
        else:
            self.respond(replies.OPENING_DATA)
            self._in_dtp_queue = (upload, command)
        return file

    def _open_upload(
        self, file: str, restart: int | None, *, append: bool
    ) -> AtomicUpload | None:
        """The upload for ``file``, or None after replying why not."""
        access = self.file_access
        if access is None:
            return None
        location = access.locate(file)
        if location.real is None or location.mount is None:
            self.respond(replies.MOUNT_POINT)
            return None
        exists = os.path.lexists(location.real)
        if exists and not self.fs.isfile(location.virtual):
            self.respond(replies.NOT_A_FILE)
            return None
        config = self.gateway.config
        try:
            max_size, scope = access.upload_room(location, exists=exists)
            return AtomicUpload(
                location.real, location.virtual, self.username,
                restart=restart, append=append,
                retention_seconds=config.storage.partial_retention_seconds,
                max_size=max_size, quota_scope=scope,
                may_replace=vfs.Permission.OVERWRITE in location.permissions,
                digest=config.upload_sha256,
            )  # fmt: skip
        except QuotaExceededError as exceeded:
            self._refuse_upload(location, replies.OVER_QUOTA, "quota",
                                scope=exceeded.scope)  # fmt: skip
        except UploadBusyError:
            self._refuse_upload(location, replies.UPLOAD_BUSY, "busy")
        except RestartOutOfRangeError as beyond:
            self._refuse_upload(location, replies.RESTART_BEYOND_DATA,
                                "restart-beyond-data", detail=str(beyond))  # fmt: skip
        except OSError as err:
            if err.errno in STORAGE_FULL_ERRNOS:
                self._refuse_upload(location, replies.STORAGE_FULL, "storage-full",
                                    detail=err.strerror)  # fmt: skip
            else:
                self._refuse_upload(location, replies.CANNOT_CREATE, err.strerror)
        return None

    def _refuse_upload(
        self, location: vfs.Location, reply: str, reason: str | None, **detail: Any
    ) -> None:
        self.events.note(
            "upload_refused", path=location.virtual, reason=reason, **detail
        )
        self.respond(reply)
