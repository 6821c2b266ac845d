"""The audit trail: one JSON object per line, on its own logger.

Kept apart from the diagnostic log (``ftps_gateway`` / ``pyftpdlib`` loggers) so it can
go to its own file or collector, as uvicorn keeps ``uvicorn.access`` apart. Events carry
the session id, user and client IP; never a password or a hash. The client sees
generic replies; the real reason for a refusal is written here.
"""

from __future__ import annotations

import json
import logging
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

AUDIT_LOGGER_NAME = "ftps_gateway.audit"
XFERLOG_LOGGER_NAME = "ftps_gateway.xferlog"

# Field names that must never reach the audit log, whatever a caller passes.
_SECRET_FIELDS = frozenset({"password", "password_hash", "hash", "secret"})

# One encoder for every line: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


class AuditLog:
    """Writes audit events as JSON lines.

    A session writes about six (docs/decisions/0011): the line is built without
    the per-call costs ``logger.info(json.dumps(...))`` had (a new JSON encoder, a
    ``strftime`` per line, a walk up the stack for a caller nobody prints).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(AUDIT_LOGGER_NAME)
        self._xferlog = logging.getLogger(XFERLOG_LOGGER_NAME)
        self._second: tuple[int, str] = (-1, "")  # (epoch second, its ISO text)

    def event(self, name: str, **fields: Any) -> None:
        """Record event ``name`` with ``fields`` (secret-looking fields are dropped)."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        second, text = self._second
        if int(now) != second:  # one tuple: threads never pair a second with another
            second = int(now)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        record: dict[str, Any] = {
            "ts": f"{text}.{int(now * 1000) % 1000:03d}Z",
            "event": name,
        }
        record.update(
            {key: value for key, value in fields.items() if key not in _SECRET_FIELDS}
        )
        line = _ENCODER.encode(record)
        # What Logger.info does, minus findCaller (its stack walk was a tenth of it).
        logger.handle(
            logger.makeRecord(logger.name, logging.INFO, "(audit)", 0, line, (), None)
        )

    def xferlog(self, transfer: Transfer) -> None:
        """The wu-ftpd xferlog line for ``transfer`` (if a handler is configured)."""
        if self._xferlog.isEnabledFor(logging.INFO):
            self._xferlog.info(xferlog_line(transfer))


@dataclass(frozen=True)
class Transfer:
    """One finished file transfer, as the xferlog format describes it."""

    end: float  # epoch seconds
    seconds: float
    client_ip: str
    nbytes: int
    path: str
    upload: bool
    user: str
    completed: bool
    binary: bool = True


def xferlog_line(transfer: Transfer) -> str:
    """Format ``transfer`` as one xferlog(5) line (wu-ftpd, ProFTPD, vsftpd).

    Fields: time, transfer seconds, remote host, bytes, file name, type (a/b),
    special action (_ = none), direction (i/o), access mode (r = real user),
    user, service, authentication method (0 = none, as for other password logins),
    authenticated user id (*), completion (c/i). Spaces in the file name become
    underscores, as wu-ftpd does, so each line keeps its field count; so does every
    other blank, control, line or paragraph separator and bidi control (``_unsafe``),
    so a name can neither forge a line nor reorder what a reader sees. The session
    refuses such names already (``storage.vfs``); this holds for any that get here.
    """
    when = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(transfer.end))
    name = "".join("_" if _unsafe(char) else char for char in transfer.path) or "-"
    return " ".join(
        (
            when,
            str(max(1, round(transfer.seconds))),
            transfer.client_ip,
            str(transfer.nbytes),
            name,
            "b" if transfer.binary else "a",
            "_",
            "i" if transfer.upload else "o",
            "r",
            transfer.user,
            "ftp",
            "0",
            "*",
            "c" if transfer.completed else "i",
        )
    )


def _unsafe(char: str) -> bool:
    """Blank, control (Cc), format (Cf: bidi controls), line or paragraph separator."""
    return char.isspace() or unicodedata.category(char) in {"Cc", "Cf", "Zl", "Zp"}
