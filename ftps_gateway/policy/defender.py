"""Bans for repeated failed logins: scores per address key, bans that grow.

Plain Python, no sockets: ``session.state.LocalState`` asks and reports (on the IO
loop of a single server, or in the supervisor for its workers), tests drive a fake
clock. Every method takes a lock: the IO loop or the supervisor's channel threads
score failures, the admin socket's thread lists and lifts bans.

Why scoring per source address, and why bans grow: password guessing comes from few
addresses and many attempts; a fixed short ban only slows it down, a doubling ban
makes a persistent guesser's rate fall off geometrically. IPv6 addresses are scored
per prefix (``netpolicy.address_key``, ``access.ipv6_prefix_length``): one subscriber
holds a whole /64, so a per-address ban would cost it nothing. An address in
``access.safe`` (monitoring, the operator's own offices) is never banned, also not
by a ban of the prefix it sits in, so a misconfigured health check cannot lock the
operator out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.policy.netpolicy import AccessList, address_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ftps_gateway.config import DefenderSettings, IPNetwork

# Addresses tracked for failures at most; beyond it the stalest are forgotten, so a
# spray from a botnet cannot grow this table without bound.
MAX_TRACKED_ADDRESSES = 100_000


@dataclass(frozen=True)
class Ban:
    """One banned address key, as ``ftps-gateway ban list`` shows it.

    Also how a change travels to replicas (``session.state.BanReplica``): a lifted
    ban is one with ``remaining_seconds`` 0.
    """

    ip: str  # an address key: an IPv4 address or an IPv6 prefix ("2001:db8::/64")
    remaining_seconds: float
    offences: int  # how many times this address was banned (this one included)
    until: float  # wall-clock time (epoch seconds) the ban ends


@dataclass
class _Offender:
    failures: deque[float]
    offences: int = 0
    banned_until: float = 0.0  # monotonic; 0 = not banned
    last_seen: float = 0.0


class Defender:
    """Failed logins scored per source address; bans with growing length."""

    def __init__(
        self,
        settings: DefenderSettings,
        safe: Iterable[IPNetwork] = (),
        *,
        ipv6_prefix: int = 64,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._offenders: dict[str, _Offender] = {}
        self.update(settings, safe, ipv6_prefix)

    def update(
        self,
        settings: DefenderSettings,
        safe: Iterable[IPNetwork],
        ipv6_prefix: int = 64,
    ) -> None:
        """Apply new settings (config reload); bans and scores are kept.

        A new ``ipv6_prefix`` applies to failures and lookups from now on; bans
        already in force keep the key they were made with until they end.
        """
        networks = tuple(safe)
        with self._lock:
            self._settings = settings
            self._prefix = ipv6_prefix
            # AccessList with no networks allows everything; "no safe networks"
            # must mean "nobody is safe", so keep None for that case.
            self._safe = AccessList(networks) if networks else None

    def is_safe(self, ip: str) -> bool:
        """True if ``ip`` is in ``access.safe`` (never banned)."""
        return self._safe is not None and self._safe.is_allowed(ip)

    def key(self, ip: str) -> str:
        """The key ``ip`` is scored and banned under."""
        return address_key(ip, self._prefix)

    def is_banned(self, ip: str) -> bool:
        """True if connections from ``ip`` must be dropped now."""
        if self.is_safe(ip):
            return False
        key = self.key(ip)
        with self._lock:
            offender = self._offenders.get(key)
            return offender is not None and offender.banned_until > self._clock()

    def record_failure(self, ip: str) -> Ban | None:
        """Score one failed login from ``ip``; return the ban it triggered, if any."""
        settings = self._settings
        if not settings.enabled or self.is_safe(ip):
            return None
        key = self.key(ip)
        now = self._clock()
        with self._lock:
            offender = self._offenders.get(key)
            if offender is None:
                self._make_room(now)
                offender = _Offender(deque())
                self._offenders[key] = offender
            offender.last_seen = now
            if offender.banned_until > now:
                return None  # already banned (a session that was open before)
            self._forget_old_offences(offender, now)
            window_start = now - settings.window_seconds
            while offender.failures and offender.failures[0] <= window_start:
                offender.failures.popleft()
            offender.failures.append(now)
            if len(offender.failures) < settings.max_failures:
                return None
            offender.failures.clear()
            offender.offences += 1
            length = min(
                settings.ban_seconds * 2 ** (offender.offences - 1),
                settings.max_ban_seconds,
            )
            offender.banned_until = now + length
            return Ban(key, length, offender.offences, self._wall_clock() + length)

    def bans(self) -> list[Ban]:
        """Active bans, soonest to end first."""
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            active = [
                Ban(ip, o.banned_until - now, o.offences, wall + o.banned_until - now)
                for ip, o in self._offenders.items()
                if o.banned_until > now
            ]
        return sorted(active, key=lambda ban: ban.remaining_seconds)

    def active_count(self) -> int:
        """How many addresses are banned now (for the metrics gauge)."""
        return len(self.bans())

    def remove(self, ip: str) -> bool:
        """Lift the ban on ``ip`` (an address, or a key as ``bans`` lists it) and
        forget its record; False if it was not banned."""
        key = self.key(ip)
        with self._lock:
            offender = self._offenders.pop(key, None)
        return offender is not None and offender.banned_until > self._clock()

    def _forget_old_offences(self, offender: _Offender, now: float) -> None:
        # An address that behaved for max_ban_seconds after its last ban ended
        # starts over: repeat offences are about persistence, not ancient history.
        if (
            offender.offences
            and now > offender.banned_until + self._settings.max_ban_seconds
        ):
            offender.offences = 0

    def _make_room(self, now: float) -> None:
        if len(self._offenders) < MAX_TRACKED_ADDRESSES:
            return
        # Drop addresses that are not banned, stalest first; bans are never dropped.
        idle = sorted(
            (o.last_seen, ip)
            for ip, o in self._offenders.items()
            if o.banned_until <= now
        )
        for _, ip in idle[: max(1, len(idle) // 10)]:
            del self._offenders[ip]
