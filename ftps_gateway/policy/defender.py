"""Who may hold a session right now: bans for repeated failed logins, session limits.

Plain Python, no sockets: the control handler asks and reports, tests drive a fake
clock. State lives for the life of the process and survives config reloads (the
settings are swapped, the bans and counts stay). Every method takes a lock: the IO
loop asks on every connection, the admin socket's thread lists and lifts bans.

Why scoring per source address, and why bans grow: password guessing comes from few
addresses and many attempts; a fixed short ban only slows it down, a doubling ban
makes a persistent guesser's rate fall off geometrically. Bans are kept per
``netpolicy.address_key``: an IPv6 client counts as its /64, the block one
subscriber controls, or one attacker would have 2**64 fresh addresses to guess from.
An address in ``access.safe`` (monitoring, the operator's own offices) is never
banned, so a misconfigured health check cannot lock the operator out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ftps_gateway.policy.netpolicy import AccessList, address_key, parse_ip

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ftps_gateway.config import DefenderSettings, IPNetwork

# Addresses tracked for failures at most; beyond it the stalest are forgotten, so a
# spray from a botnet cannot grow this table without bound.
MAX_TRACKED_ADDRESSES = 100_000

LIMIT_TOTAL = "limit-total"
LIMIT_PER_IP = "limit-per-ip"
LIMIT_PER_USER = "limit-per-user"


class BanKeeper(Protocol):
    """The defender as sessions and the admin socket use it (local or remote)."""

    def update(self, settings: DefenderSettings, safe: Iterable[IPNetwork]) -> None: ...
    def is_banned(self, ip: str) -> bool: ...
    def record_failure(self, ip: str) -> Ban | None: ...
    def bans(self) -> list[Ban]: ...
    def active_count(self) -> int: ...
    def remove(self, ip: str) -> bool: ...


class LimitKeeper(Protocol):
    """Session limits as sessions and the admin socket use them (local or remote)."""

    def update(self, total: int, per_ip: int, per_user: int) -> None: ...
    def open(self, ip: str) -> str | None: ...
    def close(self, ip: str) -> None: ...
    def login(self, user: str) -> str | None: ...
    def logout(self, user: str) -> None: ...
    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]: ...


@dataclass(frozen=True)
class Ban:
    """One banned address, as ``ftps-gateway ban list`` shows it."""

    ip: str
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
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._offenders: dict[str, _Offender] = {}
        self.update(settings, safe)

    def update(self, settings: DefenderSettings, safe: Iterable[IPNetwork]) -> None:
        """Apply new settings (config reload); bans and scores are kept."""
        networks = tuple(safe)
        with self._lock:
            self._settings = settings
            # AccessList with no networks allows everything; "no safe networks"
            # must mean "nobody is safe", so keep None for that case.
            self._safe = AccessList(networks) if networks else None

    def is_safe(self, ip: str) -> bool:
        """True if ``ip`` is in ``access.safe`` (never banned)."""
        return self._safe is not None and self._safe.is_allowed(ip)

    def is_banned(self, ip: str) -> bool:
        """True if connections from ``ip`` must be dropped now."""
        key = address_key(ip)
        with self._lock:
            offender = self._offenders.get(key)
            return offender is not None and offender.banned_until > self._clock()

    def record_failure(self, ip: str) -> Ban | None:
        """Score one failed login from ``ip``; return the ban it triggered, if any."""
        settings = self._settings
        if not settings.enabled or self.is_safe(ip):
            return None
        key = address_key(ip)
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
        """Lift the ban on ``ip`` and forget its record; False if it was not banned."""
        key = address_key(ip)
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


def _key(ip: str) -> str:
    """One spelling per address (``::ffff:10.0.0.1`` is ``10.0.0.1``)."""
    address = parse_ip(ip)
    return str(address) if address is not None else ip


class SessionLimits:
    """Sessions in total, per client address and per user, each with its own limit.

    pyftpdlib's ``max_cons`` counts every socket in its map (listeners and data
    connections too), so it is not a session limit; this class counts sessions.
    """

    def __init__(self, total: int, per_ip: int, per_user: int) -> None:
        self._lock = threading.Lock()
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}
        self._total = 0
        self.update(total, per_ip, per_user)

    def update(self, total: int, per_ip: int, per_user: int) -> None:
        """New limits (config reload); sessions already open are never cut."""
        with self._lock:
            self._limits = (total, per_ip, per_user)

    def open(self, ip: str) -> str | None:
        """Count a new session from ``ip``, or return why it is refused."""
        key = _key(ip)
        total, per_ip, _ = self._limits
        with self._lock:
            if self._total >= total:
                return LIMIT_TOTAL
            if self._per_ip.get(key, 0) >= per_ip:
                return LIMIT_PER_IP
            self._total += 1
            self._per_ip[key] = self._per_ip.get(key, 0) + 1
            return None

    def close(self, ip: str) -> None:
        """A session counted by ``open`` ended."""
        key = _key(ip)
        with self._lock:
            self._total -= 1
            _decrement(self._per_ip, key)

    def login(self, user: str) -> str | None:
        """Count a login as ``user``, or return why it is refused."""
        _, _, per_user = self._limits
        with self._lock:
            if self._per_user.get(user, 0) >= per_user:
                return LIMIT_PER_USER
            self._per_user[user] = self._per_user.get(user, 0) + 1
            return None

    def logout(self, user: str) -> None:
        """A session counted by ``login`` ended."""
        with self._lock:
            _decrement(self._per_user, user)

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(total, per address, per user), for diagnostics and tests."""
        with self._lock:
            return self._total, dict(self._per_ip), dict(self._per_user)


def _decrement(counts: dict[str, int], key: str) -> None:
    remaining = counts.get(key, 0) - 1
    if remaining > 0:
        counts[key] = remaining
    else:
        counts.pop(key, None)
