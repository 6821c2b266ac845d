"""The audit trail: one JSON object per line, on its own logger.

Kept apart from the diagnostic log (``ftps_gateway`` / ``pyftpdlib`` loggers) so it can
go to its own file or collector, as uvicorn keeps ``uvicorn.access`` apart. Events carry
the session id, user and client IP; never a password or a hash. The client sees
generic replies; the real reason for a refusal is written here.

Refusals of strangers (connections not allowed, banned, over a limit, foreign peers on
a passive port) are digested (``RefusalDigest``): per address and interval the first
is written whole, the rest are counted into one ``<event>_repeated`` line, so a
scanner cannot set the log's growth rate. The metrics still count every one.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

AUDIT_LOGGER_NAME = "ftps_gateway.audit"
XFERLOG_LOGGER_NAME = "ftps_gateway.xferlog"

# Field names that must never reach the audit log, whatever a caller passes.
_SECRET_FIELDS = frozenset({"password", "password_hash", "hash", "secret"})

# One encoder for every line: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


def _c_encoder() -> Any:
    """The C encoder ``_ENCODER.encode`` builds anew for every call, built once.

    The same arguments ``JSONEncoder.iterencode`` passes, except the circular-
    reference memo (``None``): an audit record is a flat dict the gateway builds,
    whatever it holds becomes its ``str()``. None where the C accelerator is
    missing or takes other arguments: ``_ENCODER.encode`` then.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        # markers, default, encoder, indent, separators, sort_keys, skipkeys,
        # allow_nan: positional only, as iterencode passes them.
        sort_keys = skipkeys = False
        allow_nan = True
        encoder = make(None, str, json.encoder.encode_basestring_ascii, None, ":",
                       ",", sort_keys, skipkeys, allow_nan)  # fmt: skip
        if "".join(encoder({"a": [1.5, None, "\u00e9"]}, 0)) != _ENCODER.encode(
            {"a": [1.5, None, "\u00e9"]}
        ):
            return None
    except TypeError:
        return None
    return encoder


_C_ENCODER = _c_encoder()


def encode_line(record: dict[str, Any]) -> str:
    """``record`` as one compact JSON line (``_ENCODER.encode``, cheaper)."""
    if _C_ENCODER is None:
        return _ENCODER.encode(record)
    return "".join(_C_ENCODER(record, 0))


# One digest interval: per address and refusal, at most one whole line and one
# ``_repeated`` line in this many seconds.
REFUSAL_DIGEST_SECONDS: Final = 60
# Distinct addresses digested per interval; beyond, refusals are only counted, under
# the address "other" (no line each): the bound on lines per interval whatever a
# scanner with many addresses (or an IPv6 /48) does: 2 x this + a few.
REFUSAL_DIGEST_MAX_ADDRESSES: Final = 1000
OTHER_ADDRESSES: Final = "other"


class RefusalDigest:
    """Counts refusals per (event, reason, address) within fixed intervals.

    Thread-safe (a lock): refusals are noted on the IO loop, the summary may be taken
    by a timer. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        interval_seconds: float = REFUSAL_DIGEST_SECONDS,
        max_addresses: int = REFUSAL_DIGEST_MAX_ADDRESSES,
        clock: Any = time.monotonic,
    ) -> None:
        self.interval_seconds = interval_seconds
        self._max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._repeats: dict[tuple[str, str, str], int] = {}
        self._addresses: set[str] = set()

    def first(self, event: str, reason: str, address: str) -> bool:
        """Note one refusal; True if it is the first of its kind this interval."""
        with self._lock:
            if address not in self._addresses:
                if len(self._addresses) >= self._max_addresses:
                    address = OTHER_ADDRESSES  # counted, never written one by one
                else:
                    self._addresses.add(address)
            key = (event, reason, address)
            seen = self._repeats.get(key)
            self._repeats[key] = 0 if seen is None else seen + 1
            return seen is None and address != OTHER_ADDRESSES

    def take(self, *, force: bool = False) -> list[dict[str, Any]]:
        """The summaries of an interval that is over (or of this one, ``force``)."""
        with self._lock:
            now = self._clock()
            if not force and now - self._started < self.interval_seconds:
                return []
            seconds = round(now - self._started)
            found = [
                {"event": f"{event}_repeated", "reason": reason, "address": address,
                 "count": count + (address == OTHER_ADDRESSES), "seconds": seconds}
                for (event, reason, address), count in self._repeats.items()
                if count or address == OTHER_ADDRESSES
            ]  # fmt: skip
            self._repeats.clear()
            self._addresses.clear()
            self._started = now
            return found


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
        self.refusals = RefusalDigest()

    def refused(self, name: str, address: str, **fields: Any) -> None:
        """A stranger's refusal: written if first for ``address`` this interval.

        ``address`` is what it is digested by (an address key: IPv6 per prefix);
        ``fields`` must hold the ``reason``.
        """
        self.flush_refusals()
        if self.refusals.first(name, str(fields.get("reason")), address):
            self.event(name, **fields)

    def flush_refusals(self, *, force: bool = False) -> None:
        """Write the ``_repeated`` lines of an interval that is over (a timer calls
        this every interval; ``force``: end the interval now)."""
        for summary in self.refusals.take(force=force):
            name = summary.pop("event")
            self.event(name, **summary)

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
        if _SECRET_FIELDS.isdisjoint(fields):
            record.update(fields)
        else:
            record.update(
                {k: value for k, value in fields.items() if k not in _SECRET_FIELDS}
            )
        line = encode_line(record)
        handlers = logger.handlers
        if (
            len(handlers) == 1
            and not logger.propagate
            and not logger.filters
            and not logger.disabled
        ):
            handler = handlers[0]
            if isinstance(handler, LineWriter) and not handler.filters:
                handler.write_line(line, logger)
                return
        # What Logger.info does, minus findCaller (its stack walk was a tenth of it).
        logger.handle(_record(logger, line))

    @property
    def writes_xferlog(self) -> bool:
        """Is an xferlog written (else a caller need not build its ``Transfer``)?"""
        return self._xferlog.isEnabledFor(logging.INFO)

    def xferlog(self, transfer: Transfer) -> None:
        """The wu-ftpd xferlog line for ``transfer`` (if a handler is configured)."""
        if self._xferlog.isEnabledFor(logging.INFO):
            self._xferlog.info(xferlog_line(transfer))


def _record(logger: logging.Logger, line: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, "(audit)", 0, line, (), None)


class LineWriter:
    """A handler whose lines the audit log writes without a ``LogRecord``.

    The configured audit handler (``cli.configure_logging``) is the only handler
    of a logger that does not propagate: a line then goes where ``Logger.handle``
    would put it (the same lock, logrotate check, write and flush per line) minus
    the record, its filters and its formatting (``%(message)s``): about two thirds
    of an audit line's cost, six lines per session (docs/decisions/0014).
    Anything else (a test's ``caplog``, a filter, a second handler) takes the
    ``logging`` path.
    """

    terminator = "\n"
    stream: Any
    lock: Any

    def reopen_if_needed(self) -> None:
        """What ``WatchedFileHandler.emit`` does first (nothing for a stream)."""

    def write_line(self, line: str, logger: logging.Logger) -> None:
        """Write ``line`` as ``emit`` of a ``%(message)s`` record would, flushed."""
        try:
            with self.lock:
                self.reopen_if_needed()
                stream = self.stream
                if stream is not None:  # a closed "w" file writes nothing (emit)
                    stream.write(line + self.terminator)
                    stream.flush()
        except Exception:  # noqa: BLE001 - what Handler.emit does with any error
            self.handleError(_record(logger, line))  # type: ignore[attr-defined]


class LineFileHandler(LineWriter, logging.handlers.WatchedFileHandler):
    """The audit file: reopened when logrotate moved it (``WatchedFileHandler``)."""

    def reopen_if_needed(self) -> None:
        """A moved file is reopened; a closed handler reopens its file (``emit``)."""
        self.reopenIfNeeded()
        if self.stream is None and (
            self.mode != "w" or not getattr(self, "_closed", False)
        ):
            self.stream = self._open()


class LineStreamHandler(LineWriter, logging.StreamHandler):  # type: ignore[type-arg]
    """The audit trail on stdout (no ``audit_file``)."""


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
