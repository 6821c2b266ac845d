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
from typing import Any

AUDIT_LOGGER_NAME = "ftps_gateway.audit"

# Field names that must never reach the audit log, whatever a caller passes.
_SECRET_FIELDS = frozenset({"password", "password_hash", "hash", "secret"})


class AuditLog:
    """Writes audit events as JSON lines."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(AUDIT_LOGGER_NAME)

    def event(self, name: str, **fields: Any) -> None:
        """Record event ``name`` with ``fields`` (secret-looking fields are dropped)."""
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "event": name,
        }
        record.update(
            (key, value) for key, value in fields.items() if key not in _SECRET_FIELDS
        )
        self._logger.info(json.dumps(record, default=str, separators=(",", ":")))
