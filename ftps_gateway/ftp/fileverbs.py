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
- Quotas are reserved through the shared state (``session.quota``): the scopes'
  marks are read, their usage walked off the loop with the open, a first chunk
  reserved before the 150, more as the upload writes (``data``); a refusal at any
  point is ``452`` and leaves nothing behind; the audit names the scope.
- Slow file work runs off the IO loop (``run_file_job``, on ``gateway.file_work``)
  while the session's input is held, as PASS holds it for the password check, so
  replies stay in order: an upload's open (with the quota walk, a resume's seed copy
  and hash) before its 150, its commit (fsync, rename) before its 226.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, TypeVar

from ftps_gateway.ftp import replies
from ftps_gateway.session.fileaccess import Action, Kind, Refusal
from ftps_gateway.session.quota import (
    Credit,
    QuotaPlan,
    QuotaUnavailableError,
    UploadReservation,
)
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import (
    AtomicUpload,
    QuotaExceededError,
    RestartOutOfRangeError,
    UploadBusyError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ftps_gateway.ftp.filesystem import GatewayFS
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.fileaccess import FileAccess
    from ftps_gateway.session.runtime import Gateway
    from ftps_gateway.session.state import QuotaMark
    from ftps_gateway.session.work import Outcome

logger = logging.getLogger("ftps_gateway")

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
_T = TypeVar("_T")
# A commit must run even when the file-work pool is full: it is tried again this
# often (a refusal would lose an upload the client has finished sending).
COMMIT_RETRY_SECONDS = 0.05


class NotAFileError(Exception):
    """The upload's name holds something other than a regular file."""


class FileVerbsMixin:
    """File commands of a logged-in session, over its ``FileAccess``."""

    file_access: FileAccess | None = None
    current_command = ""  # the canonical command being processed (for the audit)
    _held_for_files = 0  # file jobs running for this session (input held meanwhile)

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        events: SessionEvents
        fs: GatewayFS
        username: str
        session_id: str
        data_channel: Any
        ioloop: Any
        producer_fifo: Any
        _closed: bool
        _current_io_events: int
        _pending: tuple[Any, ...]  # data connections in their TLS handshake (datapath)
        _restart_position: int
        _in_dtp_queue: Any
        _current_type: str
        _rnfr: str | None

        @property
        def gateway(self) -> Gateway: ...
        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def data_path_arranged(self) -> bool: ...
        def take_data_failure_reply(self) -> str: ...
        def handle_error(self) -> None: ...
        def del_channel(self) -> None: ...
        def _pause_input(self) -> None: ...
        def _writable_while_paused(self) -> None: ...
        def _resume_input(self) -> None: ...

    # --- slow file work, off the IO loop, with the session's input held

    def run_file_job(
        self,
        job: Callable[[], Any],
        done: Callable[[Outcome[Any]], None],
        *,
        must_run: bool = False,
    ) -> bool:
        """Run ``job`` on the file-work pool; ``done(outcome)`` on the loop after.

        The session reads no command meanwhile (replies stay in order, as while
        PASS is checked); ``done`` may reply, then input resumes. ``done`` also
        runs when the session has closed meanwhile (to clean up; no reply then).

        Returns False, having run nothing, when the pool (or this session's share
        of it) is full; with ``must_run`` it is tried again until it gets in.
        """
        work = self.gateway.file_work
        self.hold_input()

        def finished(outcome: Outcome[Any]) -> None:
            try:
                if not self._closed:
                    self._writable_while_paused()
                done(outcome)
            except Exception:  # noqa: BLE001 - handed to the session's error handler
                self.handle_error()
            finally:
                self.release_input()

        def attempt() -> bool:
            if work.submit(self.session_id, job, finished):
                return True
            if must_run:
                self.ioloop.call_later(COMMIT_RETRY_SECONDS, attempt)
                return True
            self.release_input()
            return False

        return attempt()

    def await_answer(
        self, ask: Callable[[Callable[[_T], None]], None], done: Callable[[_T], None]
    ) -> None:
        """``ask(answered)`` (a shared-state request), input held until its answer;
        then ``done(answer)`` on the loop, which may reply (as ``run_file_job``'s
        ``done``, also when the session closed meanwhile)."""
        self.hold_input()

        def answered(answer: _T) -> None:
            try:
                if not self._closed:
                    self._writable_while_paused()
                done(answer)
            except Exception:  # noqa: BLE001 - handed to the session's error handler
                self.handle_error()
            finally:
                self.release_input()

        ask(answered)

    def hold_input(self) -> None:
        """Stop reading commands until ``release_input`` (counted: jobs may nest)."""
        self._held_for_files += 1
        if self._held_for_files == 1 and not self._closed:
            self._pause_input()
            # TLSChannelMixin drains OpenSSL's decrypted bytes while the channel
            # wants to read: it must not, or the next command would run now.
            self._current_io_events = 0

    def holding_input(self) -> bool:
        """True while a file job runs for this session (its reply is not out)."""
        return self._held_for_files > 0

    def release_input(self) -> None:
        """One file job ended; the last one resumes reading (and pending lines)."""
        self._held_for_files -= 1
        if self._closed:
            return
        if self._held_for_files == 0:
            for pending in self._pending:  # their client waited for our reply
                pending.restart_handshake_timer()
            self._resume_input()
        elif not self.producer_fifo:
            self.del_channel()  # a reply re-registered it; still held
            self._current_io_events = 0

    def transfer_in_progress(self) -> bool:
        """A file job counts as a transfer for the drain (its reply is due)."""
        return self._held_for_files > 0 or bool(super().transfer_in_progress())  # type: ignore[misc]

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
        """Receive into a hidden temporary file, renamed to ``file`` when complete.

        The temporary file is opened off the IO loop (with the quota walk, and for
        a resume the copy and hash of what is there); 150 follows when it is ready.
        """
        restart = self._restart_position or None
        self._restart_position = 0
        command = "APPE" if mode == "a" else "STOR"
        if not self.data_path_arranged():
            self.respond(self.take_data_failure_reply())
            return None
        access = self.file_access
        if access is None:
            return None
        location = access.locate(file)
        if location.real is None or location.mount is None:
            self.respond(replies.MOUNT_POINT)
            return None
        scopes = access.quota_scopes(location)
        resume = restart is not None or mode == "a"
        plan = (
            QuotaPlan(scopes, self.gateway.quota_walks, resume=resume)
            if scopes
            else None
        )
        prepare = self._upload_opener(location, restart, append=mode == "a", plan=plan)

        def opened(outcome: Outcome[AtomicUpload]) -> None:
            if self._closed:  # the client left meanwhile: nobody to answer
                if outcome.error is None:
                    outcome.result().discard()
                return
            upload = self._opened_upload(location, outcome)
            if upload is None:
                return
            self.reserve_upload_room(
                upload, lambda: self._start_upload(upload, command)
            )

        def open_upload() -> None:
            if not self.run_file_job(prepare, opened):
                self._refuse_upload(location, replies.FILE_WORK_BUSY, "file-work-full")

        self._read_quota_marks(plan, open_upload)
        return file

    def _read_quota_marks(
        self, plan: QuotaPlan | None, then: Callable[[], None]
    ) -> None:
        """Read the committed counters of the scopes ``plan`` walks afresh (before
        they are walked, in the open job), then ``then`` (input held meanwhile)."""
        if plan is None or not plan.needs_marks:
            then()
            return

        def marked(marks: Mapping[str, QuotaMark]) -> None:
            if not self._closed:
                plan.set_marks(marks)
                then()

        state, scopes = self.gateway.state, plan.needs_marks
        self.await_answer(lambda answered: state.quota_marks(scopes, answered), marked)

    def _upload_opener(
        self,
        location: vfs.Location,
        restart: int | None,
        *,
        append: bool,
        plan: QuotaPlan | None,
    ) -> Callable[[], AtomicUpload]:
        """The job that opens the upload (runs off the loop; touches the disk)."""
        fs, gateway = self.fs, self.gateway
        config, work, state = gateway.config, gateway.file_work, gateway.state
        real = location.real
        assert real is not None  # noqa: S101 - checked by the caller
        owner, session, later = self.username, self.session_id, self.ioloop.call_later

        def prepare() -> AtomicUpload:
            # The quota walks first (every file under the scopes' folders): what
            # the upload replaces is measured after them, so they counted it.
            walks = plan.walk() if plan is not None else {}
            # One lstat answers the usual cases (nothing there, a regular file);
            # anything else (a link) is asked of the filesystem floor.
            try:
                there: os.stat_result | None = os.lstat(real)
            except FileNotFoundError:
                there = None
            regular = there is not None and stat.S_ISREG(there.st_mode)
            if there is not None and not regular and not fs.isfile(location.virtual):
                raise NotAFileError(location.virtual)
            replaced = there.st_size if there is not None and regular else None
            upload = AtomicUpload(
                real, location.virtual, owner,
                restart=restart, append=append,
                retention_seconds=config.storage.partial_retention_seconds,
                quota_scope=plan.scopes[0].name if plan is not None else "",
                may_replace=vfs.Permission.OVERWRITE in location.permissions,
                digest=config.upload_sha256, lane=work.hashing, wake=work.wake,
            )  # fmt: skip
            if plan is not None:
                # A resume's walk is fresh and saw the partial it continues.
                found = upload.found_size if plan.resume else 0
                credit = Credit((replaced or 0) + found, int(replaced is not None))
                upload.quota = UploadReservation(
                    state, work.wake, session, scopes=plan.scopes, walks=walks,
                    credit=credit, start_size=upload.size, later=later,
                )  # fmt: skip
            return upload

        return prepare

    def _opened_upload(
        self, location: vfs.Location, outcome: Outcome[AtomicUpload]
    ) -> AtomicUpload | None:
        """The opened upload, or None after replying why not."""
        try:
            return outcome.result()
        except QuotaExceededError as exceeded:
            self._refuse_upload(location, replies.OVER_QUOTA, "quota",
                                scope=exceeded.scope)  # fmt: skip
        except QuotaUnavailableError as lost:  # fail closed
            self._refuse_upload(location, replies.OVER_QUOTA, "quota",
                                scope=lost.scope, detail="no-quota-mark")  # fmt: skip
        except UploadBusyError:
            self._refuse_upload(location, replies.UPLOAD_BUSY, "busy")
        except RestartOutOfRangeError as beyond:
            self._refuse_upload(location, replies.RESTART_BEYOND_DATA,
                                "restart-beyond-data", detail=str(beyond))  # fmt: skip
        except NotAFileError:
            self._refuse_upload(location, replies.NOT_A_FILE, "not-a-file")
        except CancelledError:  # the server is stopping
            self._refuse_upload(location, replies.FILE_WORK_BUSY, "file-work-stopped")
        except OSError as err:
            if err.errno in STORAGE_FULL_ERRNOS:
                self._refuse_upload(location, replies.STORAGE_FULL, "storage-full",
                                    detail=err.strerror)  # fmt: skip
            else:
                self._refuse_upload(location, replies.CANNOT_CREATE, err.strerror)
        return None

    def reserve_upload_room(
        self, upload: AtomicUpload, proceed: Callable[[], None]
    ) -> None:
        """The quota seam: take the upload's first reservation, then ``proceed``.

        The reservation (``session.quota.UploadReservation.start``: the size the
        upload starts at, a first chunk, one file) is asked through
        ``gateway.state``; input is held until the answer, so the 150 cannot
        overtake pipelined commands. Refused: ``452``, and the upload leaves
        nothing (a resume's partial stays as it was found).
        """
        quota = upload.quota
        if not isinstance(quota, UploadReservation):
            proceed()
            return

        def answered(full: str | None) -> None:
            if self._closed:
                self._drop_upload(upload, keep=None, then=None)
            elif full is None:
                proceed()
            else:
                self._refuse_reserved(upload, full)

        self.await_answer(quota.start, answered)

    def _refuse_reserved(self, upload: AtomicUpload, scope: str) -> None:
        """The first reservation was refused: 452 once the temporary is gone."""

        def refuse() -> None:
            self.events.note(
                "upload_refused", path=upload.name, reason="quota", scope=scope
            )
            if not self._closed:
                self.respond(replies.OVER_QUOTA)

        # A refused resume leaves the user's partial as it found it.
        self._drop_upload(upload, keep=upload.continued > 0, then=refuse)

    def _drop_upload(
        self,
        upload: AtomicUpload,
        *,
        keep: bool | None,
        then: Callable[[], None] | None,
    ) -> None:
        """Discard ``upload`` (its unlink off the loop: a resume's seed copy may be
        large), then run ``then`` on the loop (the reply, after the removal)."""
        leftover = upload.discard(keep=keep, defer_unlink=True)
        if leftover is None:
            if then is not None:
                then()
            return
        if then is None:
            if not self.gateway.file_work.submit(self.session_id, leftover.remove,
                                                 _ignore):  # fmt: skip
                leftover.remove()
            return
        self.run_file_job(leftover.remove, lambda _outcome: then(), must_run=True)

    def _start_upload(self, upload: AtomicUpload, command: str) -> None:
        """The upload is open: 150 (or 125), and the data connection receives."""
        if self._closed:
            upload.discard()
            return
        if not self.data_path_arranged():  # its passive port timed out meanwhile
            upload.discard()
            self.respond(self.take_data_failure_reply())
            return
        if upload.size:
            self.events.note("upload_resumed", path=upload.name, offset=upload.size)
        if self.data_channel is not None:
            self.respond(replies.DATA_ALREADY_OPEN)
            self.data_channel.file_obj = upload
            self.data_channel.enable_receiving(self._current_type, command)
        else:
            self.respond(replies.OPENING_DATA)
            self._in_dtp_queue = (upload, command)

    def _refuse_upload(
        self, location: vfs.Location, reply: str, reason: str | None, **detail: Any
    ) -> None:
        self.events.note(
            "upload_refused", path=location.virtual, reason=reason, **detail
        )
        self.respond(reply)


def _ignore(_outcome: Outcome[None]) -> None:
    """A job nobody waits for (removing a temporary nobody is told about)."""
