"""A data connection: TLS first (the send gate), then the transfer pyftpdlib queued.

Uploads are received many TLS records per readiness event, straight into the
upload's receive buffers (their sha256 is computed on the hash lane meanwhile), and
count as complete only when the client's close_notify arrived; a full disk or quota
answers 452 and leaves nothing behind. A complete upload is committed (fsync,
rename) off the IO loop, and its 226 is sent only once the file is durable.

Quota: an upload with a reservation (``session.quota``) asks for its next chunk
ahead of need as it writes (``prefetch``); data that arrives beyond the grant is
held, unstored, and the connection reads nothing more until the answer (TCP
backpressure on the client): stored and read on if granted, ``452`` if refused.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from pyftpdlib.exceptions import _FileReadWriteError
from pyftpdlib.handlers import DTPHandler
from pyftpdlib.ioloop import AsyncChat

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.fileverbs import STORAGE_FULL_ERRNOS
from ftps_gateway.ftp.tlschannel import READ, TLSChannelMixin, TLSState
from ftps_gateway.storage.uploads import AtomicUpload, QuotaExceededError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.ftp.control import ControlHandler
    from ftps_gateway.session.work import Outcome
    from ftps_gateway.storage.uploads import Discarded

logger = logging.getLogger("ftps_gateway")


class DataHandler(TLSChannelMixin, DTPHandler):
    """A data connection: TLS first, then the transfer pyftpdlib queued for it."""

    ac_in_buffer_size = 256 * 1024
    ac_out_buffer_size = 256 * 1024

    @property
    def timeout(self) -> int:
        """Idle seconds before a stalled transfer is closed (the session's config)."""
        control: ControlHandler = self.cmd_channel
        return control.gateway.config.server.idle_timeout_seconds

    def __init__(self, sock: Any, cmd_channel: ControlHandler) -> None:
        self.peer_ip = ""  # set by the control session at accept (stays if reset)
        self.approved = False
        self.resumed: bool | None = None
        self.settling = False  # the upload is being committed or removed off the loop
        self._discard_keep: bool | None = None  # False: never keep a partial
        # The data connection itself ended the upload (quota, disk full, cut): its
        # reply waits until the temporary is gone. Closed from a command (ABOR,
        # PASV, the session's end) the reply goes at once, the unlink follows.
        self._reply_after_removal = False
        self._handshake_timer: Any = None
        # Received data the upload's grant does not cover yet (how to store it, and
        # whether the stream ended with it): nothing more is read until room comes.
        self._held: tuple[Callable[[], object], bool] | None = None
        super().__init__(sock, cmd_channel)
        if not self.connected or self._closed:
            return
        self.restart_handshake_timer()
        context = cmd_channel.tls_context
        if context is not None:
            self.start_tls(context)

    # --- TLS hooks

    def handle_tls_established(self) -> None:
        """Apply the session's policy, then hand the channel to its control session.

        Runs before anything can be sent (the send gate in ``tlschannel``): a refused
        connection is closed without a byte of payload.
        """
        self._cancel_handshake_timer()
        self.resumed = bool(self.socket.session_reused)
        if not self.cmd_channel.accept_data_channel(self):
            self.close()  # not approved: a quiet close, no transfer bookkeeping
            return
        self.approved = True
        self._set_io_events(READ)
        self.cmd_channel.on_data_channel_ready(self)

    def handle_tls_failed(self, reason: str) -> None:
        """The client could not (or would not) negotiate TLS on the data connection."""
        self._cancel_handshake_timer()
        self.cmd_channel.on_data_channel_failed(self, f"tls-handshake: {reason}")
        self.close()

    def restart_handshake_timer(self) -> None:
        """Give the client ``connect_timeout_seconds`` from now for its handshake.

        Clients (ftplib, curl) start TLS on the data connection only after the
        command's 150, so time the server spends before that 150 (an upload's open,
        a listing, off the loop) is not theirs: the session restarts the timer
        when that work ends.
        """
        self._cancel_handshake_timer()
        self._handshake_timer = self.ioloop.call_later(
            self.cmd_channel.gateway.config.passive.connect_timeout_seconds,
            self._on_handshake_timeout,
        )

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.cmd_channel.holding_input():
            self.restart_handshake_timer()  # waiting for our own 150, not the client
            return
        self.cmd_channel.on_data_channel_failed(self, "tls-handshake: timeout")
        self.close()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None and not self._handshake_timer.cancelled:
            self._handshake_timer.cancel()
        self._handshake_timer = None

    # --- I/O

    def send(self, data: bytes) -> int:
        """Count what TLS accepted (pyftpdlib's own ``send`` is bypassed)."""
        sent = self.tls_send(data)
        self.tot_bytes_sent += sent
        return sent

    def enable_receiving(self, type: str, cmd: str) -> None:  # noqa: A002 - pyftpdlib's name
        """Start an upload; data that came with the handshake is read now.

        TLS reads ahead (``tlschannel``): records a client sent right behind its
        Finished, before this transfer started, are in memory and the socket will
        not report them (a client that sent a small file whole and waits for our
        close_notify would wait for ever).
        """
        super().enable_receiving(type, cmd)
        if self.tls_state is TLSState.ESTABLISHED and self.socket.pending():
            self.call_later(0, self._resume_receiving)

    def handle_read(self) -> None:
        """Receive upload data: many records per readiness event, one file write."""
        if self._closed or self.settling or not self.receive:
            return  # a download, or a transfer not started: no bytes are taken
        if self._held is not None:  # waiting for quota room: read nothing more
            self._set_io_events(0)
            return
        upload = self.file_obj
        try:
            if self._data_wrapper is None:
                ended = self._receive_binary(upload)
            else:  # TYPE A: line endings converted, then stored
                ended = self._receive_converted(upload)
        except QuotaExceededError as exceeded:
            self._refuse_over_quota(exceeded)
            return
        except OSError as err:
            if err.errno in STORAGE_FULL_ERRNOS:
                self._refuse_storage_full(err)
                return
            raise _FileReadWriteError(err) from err
        if ended and not self._closed:
            self.handle_close()

    def _receive_binary(self, upload: AtomicUpload) -> bool:
        """Decrypt straight into the upload's buffer; True when the stream ended."""
        target = upload.buffer(self._resume_receiving)
        if target is None:  # every buffer is still being hashed
            self._set_io_events(0)
            return False
        count, ended = self.tls_recv_into(target)
        if count:
            self.tot_bytes_received += count
            if not self._room_for(upload, count, lambda: upload.received(count), ended):
                return False
            upload.received(count)
        return ended

    def _receive_converted(self, upload: AtomicUpload) -> bool:
        room = upload.buffer(self._resume_receiving)
        if room is None:
            self._set_io_events(0)
            return False
        # At most one byte longer once converted (a CR held back from before).
        view, ended = self.tls_recv_many(len(room) - 1)
        if view:
            self.tot_bytes_received += len(view)
            data = self._data_wrapper(bytes(view))
            if not self._room_for(upload, len(data), lambda: upload.write(data), ended):
                return False
            upload.write(data)
        return ended

    def _room_for(
        self,
        upload: AtomicUpload,
        count: int,
        store: Callable[[], object],
        ended: bool,
    ) -> bool:
        """True if ``count`` more bytes fit the upload's reservation now (the next
        chunk is asked ahead). Else the data is held, reading stops, and more room
        is asked: ``store`` runs once it is granted.

        Raises:
            QuotaExceededError: refused at once (the state answered synchronously).
        """
        quota = upload.quota
        if quota is None:
            return True
        size = upload.size + count
        if size <= quota.granted:
            quota.prefetch(size)
            return True
        answers: list[str | None] = []
        inline = True

        def answered(full: str | None) -> None:
            if inline:
                answers.append(full)
            else:
                self._on_room(full)

        quota.want(size, answered)
        inline = False
        if answers:
            if answers[0] is not None:
                raise QuotaExceededError(answers[0])
            return True
        self._held = (store, ended)
        self._set_io_events(0)
        return False

    def _on_room(self, full: str | None) -> None:
        """The answer for held data (on the loop): store it and read on, or 452."""
        held, self._held = self._held, None
        if held is None or self._closed or self.settling:
            return
        store, ended = held
        if full is not None:
            self._refuse_over_quota(QuotaExceededError(full))
            return
        try:
            try:
                store()
            except OSError as err:
                if err.errno in STORAGE_FULL_ERRNOS:
                    self._refuse_storage_full(err)
                    return
                raise _FileReadWriteError(err) from err
        except QuotaExceededError as exceeded:  # a bug: the grant covers it
            self._refuse_over_quota(exceeded)
            return
        except Exception:  # noqa: BLE001 - as pyftpdlib's loop: the channel's handler
            self.handle_error()
            return
        if ended:
            self.handle_close()
        else:
            self._resume_receiving()

    def _resume_receiving(self) -> None:
        """The hash lane freed a buffer: read again (runs on the loop)."""
        if self._closed or self.settling:
            return
        try:
            self._set_io_events(READ)
            if self.socket.pending():  # records read into memory already
                self.handle_read_event()
        except Exception:  # noqa: BLE001 - as pyftpdlib's loop: the channel's handler
            self.handle_error()

    def _refuse_over_quota(self, exceeded: QuotaExceededError) -> None:
        """452, and the upload is discarded (not kept as a partial)."""
        self._discard_keep = False
        self.cmd_channel.events.note(
            "upload_refused", path=getattr(self.file_obj, "name", None),
            reason="quota", scope=exceeded.scope,
        )  # fmt: skip
        self.transfer_finished = False
        self._resp = (replies.OVER_QUOTA, logger.info)
        self._reply_after_removal = True
        self.close()

    def _refuse_storage_full(self, err: OSError) -> None:
        """452, and the temporary file is removed: kept, it would hold the space."""
        upload = self.file_obj
        self._discard_keep = False
        self.cmd_channel.events.note(
            "upload_refused", path=getattr(upload, "name", None),
            reason="storage-full", detail=err.strerror,
        )  # fmt: skip
        self.transfer_finished = False
        self._resp = (replies.STORAGE_FULL, logger.warning)
        self._reply_after_removal = True
        self.close()

    def handle_close(self) -> None:
        """An upload counts as complete only if the client's close_notify arrived."""
        if self._held is not None and not self._closed:
            return  # its last data waits for room; the answer finishes it
        if not self._closed and self.receive and not self.tls_peer_closed:
            self.transfer_finished = False
            self._resp = (replies.UPLOAD_CUT, logger.info)
            self._reply_after_removal = True
            self.close()
            return
        super().handle_close()

    def close(self) -> None:
        """Finish or discard the upload before pyftpdlib sends the final reply."""
        if self._closed or self.settling:
            return
        self._cancel_handshake_timer()
        if not self.approved:
            # Never handed to the control session: close quietly, without the
            # transfer bookkeeping (and replies) of DTPHandler.close. A refused
            # connection whose handshake completed gets a clean close_notify, so the
            # client sees an empty stream and reads the 425 on its control channel.
            self.tls_close()
            self.tls_state = TLSState.FAILED
            if self._idler is not None and not self._idler.cancelled:
                self._idler.cancel()
            AsyncChat.close(self)
            return
        upload = self.file_obj if isinstance(self.file_obj, AtomicUpload) else None
        if upload is not None and not upload.closed:
            if self.receive and self.transfer_finished and not self.tls_truncated:
                self._settle(upload.commit, commit=upload)
                return
            leftover = self._discard(upload)
            if leftover is not None and self._reply_after_removal:
                self._settle(leftover.remove)
                return
            if leftover is not None:  # the reply goes now; the unlink follows
                control = self.cmd_channel
                work = control.gateway.file_work
                if not work.submit(control.session_id, leftover.remove, _ignore):
                    leftover.remove()
        self.tls_close()
        self._finish()

    def _finish(self) -> None:
        """DTPHandler.close: the final reply, then the transfer's bookkeeping
        (``log_transfer``: audit line, metric, hook event). The reply is held until
        the bookkeeping ran, so a transfer's record exists before its client reads
        the 226 (a downstream job watching the audit log never lags the partner)."""
        with self.cmd_channel.replies_held():
            super().close()

    def _settle(
        self, job: Callable[[], None], *, commit: AtomicUpload | None = None
    ) -> None:
        """Run ``job`` (the commit, or removing a discarded temporary) off the loop;
        DTPHandler.close, with its reply (the 226), after.

        The connection is closed now, as DTPHandler.close would (our close_notify
        first); the rest of DTPHandler.close waits for the job: the session holds
        its input meanwhile and counts as transferring (a drain waits for it).
        """
        self.settling = True
        self.tls_close()
        self.del_channel()
        # The fd number may be reused by the next connection: from here on nothing
        # may unregister this channel by number (AsyncChat.close skips None).
        self._fileno = None
        with contextlib.suppress(OSError):
            self.socket.close()
        if self._idler is not None and not self._idler.cancelled:
            self._idler.cancel()  # a slow fsync is not an idle client
        control = self.cmd_channel

        def settled(outcome: Outcome[None]) -> None:
            self.settling = False
            if commit is not None and outcome.error is not None:
                self.transfer_finished = False
                self._resp = _commit_failure_reply(commit, outcome.error)
            if control._closed:  # noqa: SLF001 - the client left: nobody to answer
                self._resp = ()  # type: ignore[assignment]  # DTPHandler's "no reply"
            self._finish()

        control.run_file_job(job, settled, must_run=True)

    def _discard(self, upload: AtomicUpload) -> Discarded | None:
        """Keep it as a resumable partial if the config says so, else set it aside
        for removal (the unlink, which frees the blocks, runs off the loop)."""
        leftover = upload.discard(keep=self._discard_keep, defer_unlink=True)
        self.transfer_finished = False
        if not self._resp or self._resp[0].startswith("226"):
            self._resp = (replies.TRANSFER_ABORTED, logger.info)
        return leftover


def _commit_failure_reply(
    upload: AtomicUpload, error: BaseException
) -> tuple[str, Any]:
    """The reply to an upload whose commit failed (the temporary is gone)."""
    if isinstance(error, FileExistsError):
        # No overwrite permission, and the name appeared during the upload.
        return replies.UPLOAD_NAME_TAKEN, logger.info
    if isinstance(error, OSError) and error.errno in STORAGE_FULL_ERRNOS:
        return replies.STORAGE_FULL, logger.warning  # fsync found no room
    logger.error("could not move upload into place: %s: %s", upload.final, error)
    return replies.UPLOAD_NOT_STORED, logger.error


def _ignore(_outcome: Outcome[None]) -> None:
    """A job nobody waits for (its failure changes nothing the client sees)."""
