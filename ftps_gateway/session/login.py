"""The login gate: one USER/PASS attempt decided, off the IO loop where it is slow.

In order: a ban earned meanwhile (by another session) refuses at once; a user's own
network allowlist refuses without looking at the password, but still pays for one
verification so that its reply comes no sooner than a wrong password's (timing would
otherwise tell which users have an allowlist); a password verified a moment ago is
taken from the recent-login cache; anything else is an argon2id verification through
the login queue (``session.loginqueue``: bounded, fair across addresses, failures
charged when submitted), whose verdict comes back through the loop waker. Every
refusal is one event (audit + metric) and scores a failure in the shared state
(``session.state``), whose answer (a ban, perhaps) comes back on the IO loop.

A verified failure is scored by the queue as it ends and written here (audit +
metric) at once, even if the session has gone meanwhile; every other refusal (a ban,
a full queue, a session limit) is written by ``refuse`` when the protocol layer acts
on it. The client always hears the same reply for a wrong password (RFC 2577); the
delay and the replies belong to the protocol layer, which also pauses the session's
input meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.policy.netpolicy import AccessList, address_key
from ftps_gateway.session.loginqueue import (
    ADDRESS_FULL,
    QUEUE_FULL,
    FailureBudget,
    LoginQueue,
    Ticket,
    Verdict,
)
from ftps_gateway.session.state import UNAVAILABLE

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.policy.defender import Ban
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import Gateway

# Refusals that say nothing about the client's password: never scored.
UNSCORED = frozenset(
    {"limit-total", "limit-per-ip", "limit-per-user", UNAVAILABLE, QUEUE_FULL,
     ADDRESS_FULL}
)  # fmt: skip


@dataclass(frozen=True)
class LoginOutcome:
    """How an attempt ended: accepted, or refused for ``reason`` (audit only)."""

    accepted: bool
    reason: str | None = None
    cached: bool = False
    recorded: bool = False  # audited and scored already (a verified failure)
    banned: bool = False  # and that failure earned the address a ban


class LoginGate:
    """Decides login attempts for one session."""

    def __init__(self, events: SessionEvents) -> None:
        self._events = events
        self._queue: LoginQueue | None = None
        self._ticket: Ticket | None = None
        self._delivered: LoginOutcome | None = None  # the last outcome handed out

    def attempt(
        self,
        gateway: Gateway,
        username: str,
        password: str,
        client_ip: str,
        done: Callable[[LoginOutcome], None],
    ) -> None:
        """Decide ``username``/``password``; ``done`` runs on the IO loop with the
        outcome (at once for a ban, a cached login or a full queue, else after
        verification)."""
        queue = gateway.login_queue
        key = address_key(client_ip, gateway.config.access.ipv6_prefix_length)
        if queue.is_banned(key):
            self._deliver(done, LoginOutcome(accepted=False, reason="banned"))
            return
        user = gateway.config.user(username)
        network_refused = user is not None and not AccessList(user.allow).is_allowed(
            client_ip
        )
        stored_hash = (
            user.password_hash if user is not None and not network_refused else None
        )
        recent, verifier = gateway.recent_logins, gateway.verifier
        token = None
        if stored_hash is not None:
            token = recent.token(stored_hash, password)
            if recent.hit(token):
                queue.succeeded(key)
                self._deliver(done, LoginOutcome(accepted=True, cached=True))
                return
        if network_refused:
            refused = "network-not-allowed"
        else:
            refused = "bad-password" if user is not None else "unknown-user"

        def verify() -> bool:  # on a queue thread
            accepted = verifier.verify(stored_hash, password)
            if accepted and token is not None:
                recent.remember(token)
            return accepted and not network_refused

        def cached() -> bool:  # on the loop, when the attempt's turn comes
            return token is not None and recent.hit(token)

        def decided(verdict: Verdict) -> None:
            self._ticket = None
            self._deliver(done, self._outcome(verdict, refused))

        self._queue = queue
        self._ticket = queue.submit(
            key,
            _budget(gateway, client_ip),
            verify=verify,
            cached=cached,
            done=decided,
            same_as=token,
        )

    def _outcome(self, verdict: Verdict, refused: str) -> LoginOutcome:
        """The session's outcome; a verified failure is audited here, at once."""
        if verdict.accepted:
            return LoginOutcome(accepted=True, cached=verdict.cached)
        if not verdict.verified:
            return LoginOutcome(accepted=False, reason=verdict.reason)
        self._events.login_failed(refused)
        if verdict.ban is not None:
            self._events.banned(verdict.ban)
        return LoginOutcome(
            accepted=False,
            reason=refused,
            recorded=True,
            banned=verdict.ban is not None,
        )

    def _deliver(
        self, done: Callable[[LoginOutcome], None], outcome: LoginOutcome
    ) -> None:
        self._delivered = outcome
        done(outcome)

    def withdraw(self) -> None:
        """The session is closing: an attempt still waiting in the queue is dropped
        (no verification, no score: its client will never hear the answer)."""
        if self._queue is not None and self._ticket is not None:
            self._queue.withdraw(self._ticket)
        self._ticket = None

    def refuse(
        self,
        gateway: Gateway,
        reason: str,
        client_ip: str,
        on_ban: Callable[[], None] | None = None,
    ) -> bool:
        """Record a refused login and score it; True if the address is banned.

        A verified failure was recorded and scored when its verdict came
        (``attempt``, through the login queue); for it only its ban is reported
        back here. Any other refusal is scored now, as a request to the shared
        state: when it earns the address a ban, the ban is audited and ``on_ban``
        runs, on the IO loop, possibly after this returns (the reply to a failed
        login waits ``auth_failed_timeout`` anyway).
        """
        delivered, self._delivered = self._delivered, None
        if delivered is not None and delivered.recorded and delivered.reason == reason:
            return delivered.banned
        self._events.login_failed(reason)
        if reason in UNSCORED:
            return False  # a full server or queue is not the client's fault

        def scored(ban: Ban | None) -> None:
            if ban is not None:
                self._events.banned(ban)
                if on_ban is not None:
                    on_ban()

        gateway.state.record_failure(client_ip, scored)
        return reason == "banned"


def _budget(gateway: Gateway, client_ip: str) -> FailureBudget:
    """The failures ``client_ip`` may make before a ban, as ``[defender]`` counts."""
    settings = gateway.config.defender
    safe = gateway.config.access.safe
    never = not settings.enabled or bool(
        safe and AccessList(safe).is_allowed(client_ip)
    )
    return FailureBudget(
        max_failures=None if never else settings.max_failures,
        window_seconds=settings.window_seconds,
    )
