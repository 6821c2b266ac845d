"""Admission of one connection: the checks before the banner, the slots it holds.

``Admission`` decides whether a new control connection may be served (access list,
bans, draining, session limits), holds the slots it took (the address's session, the
user's login) and gives them back exactly once, whatever path the session ends by.
Nothing protocol-specific: the ftp layer only acts on the verdict (close silently,
answer 421, or greet).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import GatewayHolder, SessionHandle


class Verdict(enum.Enum):
    """What happens to a new connection."""

    ADMITTED = "admitted"  # greet it; it holds a session slot
    DROPPED = "dropped"  # close before the banner and before TLS: it learns nothing
    OVER_LIMIT = "over-limit"  # tell it 421 (after TLS, if implicit), then close


class Admission:
    """One connection's admission and the slots it holds (released once)."""

    def __init__(
        self, holder: GatewayHolder, session: SessionHandle, events: SessionEvents
    ) -> None:
        self._holder = holder
        self._session = session
        self._events = events
        self.refusal: str | None = None  # why OVER_LIMIT or DROPPED
        self.admitted = False  # passed the access and ban checks (audit its end)
        self._ip = ""
        self._counted = False  # holds an address slot (SessionLimits.open)
        self._login = ""  # the user whose login slot it holds
        self._open = False  # counted in the metrics' active sessions

    def admit(self, client_ip: str) -> Verdict:
        """Decide for a connection from ``client_ip`` and take its session slot."""
        gateway = self._holder.current
        if not gateway.access.is_allowed(client_ip):
            return self._drop("not-allowed")
        if gateway.defender.is_banned(client_ip):
            return self._drop("banned")
        self.admitted = True
        self._ip = client_ip
        refusal = "draining" if self._holder.draining else None
        refusal = refusal or gateway.limits.open(client_ip)
        if refusal is not None:
            self.refusal = refusal
            return Verdict.OVER_LIMIT
        self._counted = self._open = True
        self._holder.sessions.add(self._session)
        self._events.session_opened()
        return Verdict.ADMITTED

    def _drop(self, reason: str) -> Verdict:
        self.refusal = reason
        self._events.connection_refused(reason)
        return Verdict.DROPPED

    def refuse_over_limit(self) -> None:
        """The 421 for an over-limit connection is being sent now."""
        if self.refusal is not None:
            self._events.connection_refused(self.refusal)

    def is_banned(self, client_ip: str) -> bool:
        """Banned meanwhile (by another session's failures)?"""
        return self._holder.current.defender.is_banned(client_ip)

    def login(self, username: str) -> str | None:
        """Take ``username``'s login slot; the limit's reason if it is full."""
        refusal = self._holder.current.limits.login(username)
        if refusal is None:
            self._login = username
        return refusal

    def release(self, result: str) -> None:
        """Give back every slot held; ``result`` is how the session ended.

        Idempotent: the second and later calls change nothing.
        """
        limits = self._holder.current.limits
        if self._counted:
            self._counted = False
            limits.close(self._ip)
        if self._login:
            limits.logout(self._login)
            self._login = ""
        if self._open:
            self._open = False
            self._holder.sessions.discard(self._session)
            self._events.session_closed(result)
