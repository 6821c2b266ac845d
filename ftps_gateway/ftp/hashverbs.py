"""File digests: HASH (draft-bryan-ftpext-hash-02) and ProFTPD's XSHA*/XMD5/XCRC.

A mixin for ``control.ControlHandler``. Partners verify that a delivery arrived
byte for byte without downloading it again (an upload-only partner may be granted
the ``hash`` permission word for exactly that).

Wire formats, as the references define them:

- ``HASH <path>`` (draft section 3): ``213 <algo> <start>-<end> <hex> <path>``, hex
  in lower case, ``<path>`` as the client sent it. FEAT lists ``HASH
  SHA-256*;SHA-512;SHA-1;MD5`` (section 3.1, the selected one starred), ``OPTS HASH``
  answers ``200 <algo>`` and ``OPTS HASH <algo>`` selects one (section 3.2; unknown:
  ``501``). ``<end>`` is the *exclusive* end offset, as ProFTPD's mod_digest writes it
  (``digest_hash``: ``start_pos``-``st_size``); the draft's examples read like an
  inclusive end, which cannot express an empty file. RANG (section 3.3) is optional
  and not offered: HASH always covers the whole file.
- ``XCRC|XMD5|XSHA1|XSHA256|XSHA512 <path> [<start> <end>]``, the aliases ProFTPD's
  mod_digest offers, answered ``213 <hex>`` (lower case) as issue 16 specifies, one
  line, like HASH. ProFTPD itself (``contrib/mod_digest.c``, ``digest_xcmd``) answers
  ``250-Computing SHA256 digest`` then ``250 <HEX>``: clients of these verbs take the
  digest from the last line and accept any 2xx. XCRC's digest is the 8 hex digits of
  the CRC-32. ``<end>`` is exclusive and may not pass the file's size (``501``).
  Unlike ProFTPD, ``start == end`` (and so a 0-byte file) is the empty digest, not
  ``501``.
- Errors (draft section 3.5): ``550`` for a missing file and for a path the user
  may not hash (the gateway's generic refusal, not the draft's ``552``), ``553`` for
  HASH of a folder (``550`` for the X* commands, as ProFTPD), ``450`` while the file is
  being uploaded or when the digest pool is full.

The decision (``download`` or ``hash`` on the final virtual path) is
``session.fileaccess``'s. The hashing runs on ``gateway.file_work`` off the IO loop,
one digest per session at a time: the session stops reading while its digest is
computed (as during a password check), so a command pipelined behind HASH waits and
replies never get out of order, while every other session is served.
"""

from __future__ import annotations

import re
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Final

from ftps_gateway.ftp import replies
from ftps_gateway.session.fileaccess import Action
from ftps_gateway.storage import vfs
from ftps_gateway.storage.digests import (
    ALGORITHMS,
    DEFAULT_HASH_ALGORITHM,
    HASH_ALGORITHMS,
    Algorithm,
    Digest,
    NotARegularFileError,
    RangeError,
    digest_file,
    find_algorithm,
)
from ftps_gateway.storage.uploads import upload_in_progress

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.ftp.filesystem import GatewayFS
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.fileaccess import FileAccess, Refusal
    from ftps_gateway.session.runtime import Gateway
    from ftps_gateway.session.work import Outcome

# The X* commands and the algorithm each one computes (ProFTPD mod_digest).
X_COMMANDS: Final = {
    "XCRC": "CRC32",
    "XMD5": "MD5",
    "XSHA1": "SHA-1",
    "XSHA256": "SHA-256",
    "XSHA512": "SHA-512",
}
_RANGE_HELP = "<SP> pathname [<SP> start <SP> end] (end exclusive)"
# pyftpdlib's command table entries. ``perm`` None: the path is mapped here (the X*
# arguments carry a range after it), on the session's tree, like every file command.
HASH_COMMANDS: Final[dict[str, dict[str, Any]]] = {
    "HASH": {
        "perm": None, "auth": True, "arg": True,
        "help": "Syntax: HASH <SP> pathname (digest, algorithm set by OPTS HASH).",
    },
    **{
        command: {
            "perm": None, "auth": True, "arg": True,
            "help": f"Syntax: {command} {_RANGE_HELP}.",
        }
        for command in X_COMMANDS
    },
}  # fmt: skip
# A byte offset: ASCII digits only, short enough to stay an ordinary int.
_OFFSET = re.compile(r"[0-9]{1,19}")


class DigestBusyError(Exception):
    """The file is being uploaded right now: its digest would describe half a file."""


class HashVerbsMixin:
    """HASH, OPTS HASH, the X* digest commands and their FEAT lines."""

    _hash_algorithm = DEFAULT_HASH_ALGORITHM  # OPTS HASH changes it per session

    if TYPE_CHECKING:  # provided by ControlHandler / pyftpdlib's FTPHandler
        events: SessionEvents
        fs: GatewayFS
        file_access: FileAccess | None
        session_id: str
        _extra_feats: list[str]
        _closed: bool

        @property
        def gateway(self) -> Gateway: ...
        def respond(self, resp: str, logfun: Any = ...) -> None: ...
        def push(self, data: str) -> None: ...
        def handle_error(self) -> None: ...
        def on_access_refused(
            self, refusal: Refusal, location: vfs.Location
        ) -> None: ...
        def _pause_input(self) -> None: ...
        def _writable_while_paused(self) -> None: ...
        def _resume_input(self) -> None: ...

    # --- FEAT and OPTS HASH (draft sections 3.1, 3.2)

    def ftp_FEAT(self, line: str) -> None:
        """FEAT with the HASH line (the session's algorithm starred) and the X* ones."""
        algorithms = ";".join(
            name + ("*" if name == self._hash_algorithm else "")
            for name in HASH_ALGORITHMS
        )
        feats = [feat for feat in self._extra_feats if not feat.startswith("HASH ")]
        feats.append(replies.HASH_FEATURE_TEXT.format(algorithms=algorithms))
        self._extra_feats = sorted({*feats, *X_COMMANDS})
        super().ftp_FEAT(line)  # type: ignore[misc]

    def ftp_OPTS(self, line: str) -> None:
        """``OPTS HASH [algorithm]``: show or select HASH's algorithm."""
        words = line.split()
        if not words or words[0].upper() != "HASH":
            super().ftp_OPTS(line)  # type: ignore[misc]
            return
        if len(words) > 2:  # noqa: PLR2004 - OPTS HASH [name]
            self.respond(replies.HASH_OPTS_SYNTAX)
            return
        if len(words) == 2:  # noqa: PLR2004
            chosen = find_algorithm(words[1])
            if chosen is None:
                self.respond(replies.HASH_UNKNOWN_ALGORITHM)
                return
            self._hash_algorithm = chosen.iana
        self.respond(replies.HASH_ALGORITHM.format(algorithm=self._hash_algorithm))

    # --- the commands

    def ftp_HASH(self, line: str) -> None:
        """The whole file's digest with the session's algorithm (draft section 3)."""
        self._digest("HASH", line, ALGORITHMS[self._hash_algorithm], None, None)

    def ftp_XCRC(self, line: str) -> None:
        """CRC-32 of the file or of ``start``-``end`` (ProFTPD mod_digest)."""
        self._x_digest("XCRC", line)

    def ftp_XMD5(self, line: str) -> None:
        """MD5 of the file or of ``start``-``end`` (ProFTPD mod_digest)."""
        self._x_digest("XMD5", line)

    def ftp_XSHA1(self, line: str) -> None:
        """SHA-1 of the file or of ``start``-``end`` (ProFTPD mod_digest)."""
        self._x_digest("XSHA1", line)

    def ftp_XSHA256(self, line: str) -> None:
        """SHA-256 of the file or of ``start``-``end`` (ProFTPD mod_digest)."""
        self._x_digest("XSHA256", line)

    def ftp_XSHA512(self, line: str) -> None:
        """SHA-512 of the file or of ``start``-``end`` (ProFTPD mod_digest)."""
        self._x_digest("XSHA512", line)

    def _x_digest(self, command: str, line: str) -> None:
        path, start, end = split_range(line)
        if not path:
            self.respond(replies.DIGEST_SYNTAX.format(command=command))
            return
        self._digest(command, path, ALGORITHMS[X_COMMANDS[command]], start, end)

    def _digest(
        self,
        command: str,
        path: str,
        algorithm: Algorithm,
        start: int | None,
        end: int | None,
    ) -> None:
        """Decide on the final path, then hash off the loop; the reply comes later."""
        location = self._hashable(command, path)
        if location is None or location.real is None:
            return
        gateway = self.gateway
        real: Path = location.real
        owners = [user.name for user in gateway.config.users]

        def job() -> Digest:
            if upload_in_progress(real, owners):
                raise DigestBusyError
            return digest_file(real, algorithm, start or 0, end)

        def done(outcome: Outcome[Digest]) -> None:
            # Runs from the loop waker, outside pyftpdlib's error handling.
            try:
                if not self._closed:
                    self._digest_done(command, path, location, algorithm, outcome)
            except Exception:  # noqa: BLE001 - handed to the session's error handler
                self.handle_error()

        if not gateway.file_work.submit(self.session_id, job, done):
            self._note_digest(command, location, algorithm, "pool-full")
            self.respond(replies.DIGEST_BUSY)
            return
        # ``done`` always comes back through the loop waker, never from here.
        self._pause_input()

    def _hashable(self, command: str, path: str) -> vfs.Location | None:
        """Where ``path`` leads if the user may hash it; else None, after replying."""
        access = self.file_access
        if access is None:
            return None
        try:
            location = self.fs.locate(path)
        except vfs.PathRefused as err:
            self.events.note("path_refused", command=command, reason=err.reason)
            self.respond(replies.INVALID_PATH)
            return None
        refusal = access.decide(Action.HASH, location)
        if refusal is not None:
            self.on_access_refused(refusal, location)
            self.respond(replies.DENIED)
            return None
        if location.real is None:  # a purely virtual folder
            self.respond(_not_a_file(command))
            return None
        return location

    def _digest_done(
        self,
        command: str,
        path: str,
        location: vfs.Location,
        algorithm: Algorithm,
        outcome: Outcome[Digest],
    ) -> None:
        try:
            digest = outcome.result()
        except DigestBusyError:
            reply, result = replies.DIGEST_UPLOADING, "uploading"
        except (FileNotFoundError, NotADirectoryError):
            reply, result = replies.NO_SUCH_FILE, "no-such-file"
        except (NotARegularFileError, IsADirectoryError):
            reply, result = _not_a_file(command), "not-a-file"
        except RangeError:
            reply, result = replies.DIGEST_BAD_RANGE, "bad-range"
        except CancelledError:  # the server is stopping
            reply, result = replies.DIGEST_FAILED, "cancelled"
        except OSError as err:
            reply, result = replies.DIGEST_FAILED, err.strerror or "read-error"
        else:
            self._finish_digest(
                command, location, algorithm, "ok", _ok_reply(command, path, algorithm,
                                                              digest),
                start=digest.start, end=digest.end,
            )  # fmt: skip
            return
        self._finish_digest(command, location, algorithm, result, reply)

    def _finish_digest(
        self,
        command: str,
        location: vfs.Location,
        algorithm: Algorithm,
        result: str,
        reply: str,
        **fields: int,
    ) -> None:
        self._note_digest(command, location, algorithm, result, **fields)
        self._writable_while_paused()
        self.respond(reply)
        self._resume_input()

    def _note_digest(
        self,
        command: str,
        location: vfs.Location,
        algorithm: Algorithm,
        result: str,
        **fields: int,
    ) -> None:
        self.events.note(
            "file_digest", command=command, path=location.virtual,
            algorithm=algorithm.iana, result=result, **fields,
        )  # fmt: skip


def split_range(line: str) -> tuple[str, int | None, int | None]:
    """``path [start end]`` -> (path, start, end); a path may contain spaces.

    Only two trailing words of digits are a range (ProFTPD's ``cmd path start end``);
    anything else is the path, so ``report 2024.csv`` stays one name.
    """
    words = line.rsplit(" ", 2)
    if (
        len(words) == 3  # noqa: PLR2004
        and _OFFSET.fullmatch(words[1])
        and _OFFSET.fullmatch(words[2])
    ):
        return words[0], int(words[1]), int(words[2])
    return line, None, None


def _not_a_file(command: str) -> str:
    return replies.HASH_NOT_A_FILE if command == "HASH" else replies.DIGEST_NOT_A_FILE


def _ok_reply(command: str, path: str, algorithm: Algorithm, digest: Digest) -> str:
    """One line, as issue 16 specifies: ``213 <algo> <start>-<end> <hex> <path>``
    for HASH (draft-bryan-ftpext-hash-02 section 3), ``213 <hex>`` for the X*
    commands. ProFTPD's mod_digest answers X* with ``250-Computing ...`` and
    upper-case hex; clients of these verbs read the last line's digest and accept
    any 2xx, so one code and one spelling (lower-case, as HASH) serve them all."""
    if command == "HASH":
        return replies.HASH_OK.format(
            algorithm=algorithm.iana,
            start=digest.start,
            end=digest.end,
            digest=digest.hexdigest,
            path=path,
        )
    return replies.DIGEST_OK.format(digest=digest.hexdigest)
