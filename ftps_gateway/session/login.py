"""The login gate: one USER/PASS attempt decided, off the IO loop where it is slow.

In order: a ban earned meanwhile (by another session) refuses at once; a user's own
network allowlist refuses without looking at the password, but still pays for one
verification so that its reply comes no sooner than a wrong password's (timing would
otherwise tell which users have an allowlist); a password verified a moment ago is
taken from the recent-login cache; anything else is an argon2id verification on the
password pool, whose result comes back through the loop waker. Every refusal is one
event (audit + metric) and scores a failure in the shared state (``session.state``),
whose answer (a ban, perhaps) comes back on the IO loop.

The client always hears the same reply (RFC 2577); the delay and the replies belong
to the protocol layer, which also pauses the session's input meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.policy.netpolicy import AccessList
from ftps_gateway.session.state import LIMIT_REASONS

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    from ftps_gateway.policy.defender import Ban
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import Gateway

logger = logging.getLogger("ftps_gateway")


@dataclass(frozen=True)
class LoginOutcome:
    """How an attempt ended: accepted, or refused for ``reason`` (audit only)."""

    accepted: bool
    reason: str | None = None
    cached: bool = False


class LoginGate:
    """Decides login attempts for one session."""

    def __init__(self, events: SessionEvents) -> None:
        self._events = events

    def attempt(
        self,
        gateway: Gateway,
        username: str,
        password: str,
        client_ip: str,
        done: Callable[[LoginOutcome], None],
    ) -> None:
        """Decide ``username``/``password``; ``done`` runs on the IO loop with the
        outcome (at once for a ban or a cached login, else after verification)."""
        if gateway.state.is_banned(client_ip):
            done(LoginOutcome(accepted=False, reason="banned"))
            return
        user = gateway.config.user(username)
        network_refused = user is not None and not AccessList(user.allow).is_allowed(
            client_ip
        )
        stored_hash = (
            user.password_hash if user is not None and not network_refused else None
        )
        token = None
        if stored_hash is not None:
            token = gateway.recent_logins.token(stored_hash, password)
            if gateway.recent_logins.hit(token):
                done(LoginOutcome(accepted=True, cached=True))
                return
        if network_refused:
            refused = "network-not-allowed"
        else:
            refused = "bad-password" if user is not None else "unknown-user"
        future = gateway.executor.submit(gateway.verifier.verify, stored_hash, password)

        def verified(result: Future[bool]) -> None:
            accepted = _accepted(result) and not network_refused
            if accepted and token is not None:
                gateway.recent_logins.remember(token)
            outcome = LoginOutcome(accepted, None if accepted else refused)
            gateway.waker.call_soon_threadsafe(lambda: done(outcome))

        future.add_done_callback(verified)

    def refuse(
        self,
        gateway: Gateway,
        reason: str,
        client_ip: str,
        on_ban: Callable[[], None] | None = None,
    ) -> bool:
        """Record a refused login and score it; True if the address was banned.

        Scoring is a request to the shared state: when it earns the address a ban,
        the ban is audited and ``on_ban`` runs, on the IO loop, possibly after this
        returns (the reply to a failed login waits ``auth_failed_timeout`` anyway).
        """
        self._events.login_failed(reason)
        if reason in LIMIT_REASONS:
            return False  # a full server is not the client's fault

        def scored(ban: Ban | None) -> None:
            if ban is not None:
                self._events.banned(ban)
                if on_ban is not None:
                    on_ban()

        gateway.state.record_failure(client_ip, scored)
        return reason == "banned"


def _accepted(result: Future[bool]) -> bool:
    """The verification's answer; an unexpected error counts as a wrong password."""
    try:
        return bool(result.result())
    except Exception:
        logger.exception("password verification failed unexpectedly")
        return False
