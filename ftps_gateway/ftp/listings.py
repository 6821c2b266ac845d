"""LIST, NLST, MLSD and STAT of a path: the listing is produced off the IO loop.

A mixin for ``control.ControlHandler``. pyftpdlib's versions read the folder on the
loop and produce one line per step of the data connection, each line a ``stat``
(and, through ``filesystem.GatewayFS``, a mount lookup and a ``realpath`` check):
a folder of 100,000 files held every session of the worker for as long. Here the
whole listing is rendered on the file-work pool (``GatewayFS.render_listing``) while
the session's input is held, then handed to the data connection (or, for STAT, the
control connection) as bytes. Replies are pyftpdlib's own, named in ``replies``.

MLST (one entry, on the control connection) stays on the loop: one ``stat``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyftpdlib.ioloop import AsyncChat
from pyftpdlib.utils import strerror

from ftps_gateway.ftp import replies

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.ftp.filesystem import GatewayFS
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.work import Outcome


class ListingsMixin:
    """Directory listings of a logged-in session, rendered off the IO loop."""

    if TYPE_CHECKING:  # provided by ControlHandler / FileVerbsMixin / FTPHandler
        fs: GatewayFS
        events: SessionEvents
        username: str
        authorizer: Any
        _closed: bool
        _current_facts: list[str]

        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def push(self, data: str) -> None: ...
        def push_dtp_data(
            self, data: Any, isproducer: bool = ..., file: Any = ..., cmd: Any = ...
        ) -> None: ...
        def data_path_arranged(self) -> bool: ...
        def take_data_failure_reply(self) -> str: ...
        def run_file_job(
            self,
            job: Callable[[], Any],
            done: Callable[[Outcome[Any]], None],
            *,
            must_run: bool = ...,
        ) -> bool: ...

    def ftp_LIST(self, path: str) -> str | None:
        """``ls -l`` style lines over the data connection."""
        return self._list_to_data_connection("LIST", path)

    def ftp_NLST(self, path: str) -> str | None:
        """Names only, over the data connection."""
        return self._list_to_data_connection("NLST", path)

    def ftp_MLSD(self, path: str) -> str | None:
        """RFC 3659 facts per entry, over the data connection."""
        return self._list_to_data_connection("MLSD", path)

    def ftp_STAT(self, path: str) -> str | None:
        """Without a path, the session's status (pyftpdlib's); with one, its
        LIST lines on the control connection."""
        if not path:
            return super().ftp_STAT(path)  # type: ignore[misc, no-any-return]
        shown = self.fs.fs2ftp(path)

        def send(data: bytes) -> None:
            self.push(replies.STATUS_HEAD.format(path=shown) + "\r\n")
            self.push_bytes(data)
            self.respond(replies.STATUS_END)

        self._render("STAT", path, send)
        return path

    def push_bytes(self, data: bytes) -> None:
        """Queue bytes already encoded on the control connection (FTPHandler.push
        encodes text; this is asynchat's own)."""
        AsyncChat.push(self, data)

    def _list_to_data_connection(self, kind: str, path: str) -> str | None:
        if not self.data_path_arranged():  # 425 now, before any disk work
            self.respond(self.take_data_failure_reply())
            return None
        self._render(kind, path, lambda data: self.push_dtp_data(data, cmd=kind))
        return path

    def _render(self, kind: str, path: str, send: Callable[[bytes], None]) -> None:
        """Render the listing off the loop, then ``send`` it (or reply 550/501)."""
        fs = self.fs
        perms = self.authorizer.get_perms(self.username) if kind == "MLSD" else ""
        facts = list(self._current_facts) if kind == "MLSD" else None

        def job() -> bytes:
            return fs.render_listing(kind, path, perms=perms, facts=facts)

        def rendered(outcome: Outcome[bytes]) -> None:
            if self._closed:
                return
            try:
                data = outcome.result()
            except OSError as err:
                if kind == "MLSD" and isinstance(err, NotADirectoryError):
                    self.respond(replies.NOT_A_FOLDER)  # RFC 3659 7.2: 501
                elif kind == "MLSD" and isinstance(err, FileNotFoundError):
                    self.respond(replies.NO_SUCH_FOLDER)  # 550: rclone creates it
                else:
                    self.respond(replies.LISTING_FAILED.format(reason=strerror(err)))
                return
            send(data)

        if not self.run_file_job(job, rendered):
            self.events.note("listing_refused", command=kind, reason="file-work-full")
            self.respond(replies.FILE_WORK_BUSY)
