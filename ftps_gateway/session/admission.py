"""Admission of one connection: the checks before the banner, the slots it holds.

Two stages, two pools (issue 14 item 6, issue 17):

- **Before the banner**, everything is local and immediate (no other process is
  asked, so a slow supervisor or Redis never holds up the IO loop): the access list,
  the ban replica, draining, and this process's pool of connections that have not
  logged in yet (``UnauthenticatedPool``, ``server.max_unauthenticated`` and
  ``max_unauthenticated_per_ip``). A full pool never turns a newcomer away: it makes
  room by closing (421) the connection that has made no progress for longest, taken
  from the address key holding the most places, so a thousand idle strangers cannot
  keep a partner from logging in.
- **At login**, the session asks the shared state for a login slot (``state.login``:
  ``server.max_sessions``, ``_per_ip``, ``_per_user`` count logged-in sessions of the
  whole node), one request whose answer arrives on the IO loop while the session
  stays paused, as during PASS; the slot is given back when the session ends.

``Admission`` holds what one connection took and gives it back exactly once,
whatever path the session ends by (a slot granted after the session closed is given
back on arrival). Nothing protocol-specific: the ftp layer only acts on the verdict
(close silently, answer 421, or greet).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from ftps_gateway.policy.netpolicy import address_key
from ftps_gateway.session.state import LoginSlot

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.config import ServerSettings
    from ftps_gateway.session.events import SessionEvents
    from ftps_gateway.session.runtime import GatewayHolder, SessionHandle

# The audit reason and metric label of a connection closed to make room, and the
# ``pool`` field saying which limit was full.
EVICTED = "unauthenticated-evicted"
POOL_PER_ADDRESS = "per-ip"
POOL_TOTAL = "total"


class Verdict(enum.Enum):
    """What happens to a new connection."""

    ADMITTED = "admitted"  # greet it; it holds a place in the unauthenticated pool
    DROPPED = "dropped"  # close before the banner and before TLS: it learns nothing
    OVER_LIMIT = "over-limit"  # tell it 421 (after TLS, if implicit), then close


class Waiting(Protocol):
    """A member of the unauthenticated pool."""

    def evict(self, pool: str) -> None:
        """Removed from the pool to make room: close the connection (421)."""
        ...


class UnauthenticatedPool:
    """This process's connections that have not logged in yet; fair when full.

    Per process (per worker), not per node: it protects this IO loop's sockets,
    memory and handshakes, and it must answer at once, before the banner. Each
    member is kept under its address key in order of its last progress (connected,
    TLS established, USER, PASS; not NOOP, which any idler can send), so the
    stalest member of a key is its first.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_key: dict[str, OrderedDict[Waiting, float]] = {}
        self._keys: dict[Waiting, str] = {}

    def __len__(self) -> int:
        """Members now."""
        return len(self._keys)

    def count(self, key: str) -> int:
        """Members under ``key`` now."""
        return len(self._by_key.get(key, ()))

    def enter(self, member: Waiting, key: str, total: int, per_key: int) -> None:
        """Add ``member`` under ``key``, evicting one member first if a limit is full.

        ``key`` full (``per_key``): its own stalest member goes (the address competes
        only with itself). Pool full (``total``): the stalest member of the key that
        would hold the most places once ``member`` is in (ties: the stalest of
        them), so the pool's places end up shared evenly between addresses.
        """
        if self.count(key) >= per_key:
            self._evict(next(iter(self._by_key[key])), POOL_PER_ADDRESS)
        elif len(self._keys) >= total:
            self._evict(self._fairest_victim(key), POOL_TOTAL)
        self._by_key.setdefault(key, OrderedDict())[member] = self._clock()
        self._keys[member] = key

    def _fairest_victim(self, key: str) -> Waiting:
        mine = self.count(key) + 1
        heaviest = max(
            (len(members) for other, members in self._by_key.items() if other != key),
            default=0,
        )
        if mine > heaviest:
            return next(iter(self._by_key[key]))
        candidates = [
            members
            for other, members in self._by_key.items()
            if len(members) == heaviest or (other == key and mine == heaviest)
        ]
        stalest = min(candidates, key=lambda members: next(iter(members.values())))
        return next(iter(stalest))

    def _evict(self, victim: Waiting, pool: str) -> None:
        self.leave(victim)
        victim.evict(pool)

    def touch(self, member: Waiting) -> None:
        """``member`` made progress towards a login: it is the freshest of its key."""
        key = self._keys.get(member)
        if key is None:
            return
        members = self._by_key[key]
        members[member] = self._clock()
        members.move_to_end(member)

    def leave(self, member: Waiting) -> None:
        """``member`` logged in or closed (nothing if it was not in the pool)."""
        key = self._keys.pop(member, None)
        if key is None:
            return
        members = self._by_key[key]
        del members[member]
        if not members:
            del self._by_key[key]


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
        self.key = ""  # the client's address key
        self._slot: LoginSlot | None = None  # the login slot it holds
        self._released = False
        self._open = False  # counted in the metrics' active sessions

    def admit(self, client_ip: str) -> Verdict:
        """Decide for a connection from ``client_ip``: local checks only."""
        gateway = self._holder.current
        if not gateway.access.is_allowed(client_ip):
            return self._drop("not-allowed")
        if gateway.state.is_banned(client_ip):
            return self._drop("banned")
        self.admitted = True
        config = gateway.config
        self.key = address_key(client_ip, config.access.ipv6_prefix_length)
        if self._holder.draining:
            self.refusal = "draining"
            return Verdict.OVER_LIMIT
        self._open = True
        self._holder.sessions.add(self._session)
        self._events.session_opened()
        self._enter_pool(config.server)
        return Verdict.ADMITTED

    def _enter_pool(self, server: ServerSettings) -> None:
        self._holder.unauthenticated.enter(
            self, self.key, server.max_unauthenticated,
            server.max_unauthenticated_per_ip,
        )  # fmt: skip

    def _drop(self, reason: str) -> Verdict:
        self.refusal = reason
        self._events.connection_refused(reason)
        return Verdict.DROPPED

    def refuse_over_limit(self) -> None:
        """The 421 for an over-limit connection is being sent now."""
        if self.refusal is not None:
            self._events.connection_refused(self.refusal)

    def progress(self) -> None:
        """The connection moved towards a login (TLS up, USER, PASS)."""
        self._holder.unauthenticated.touch(self)

    def evict(self, pool: str) -> None:
        """The unauthenticated pool closes this connection to make room."""
        self._events.connection_refused(EVICTED, pool=pool)
        self._session.evict()

    def login(self, username: str, done: Callable[[str | None], None]) -> None:
        """Ask for ``username``'s login slot; ``done`` (on the IO loop) gets None if
        granted, else the limit's reason. Not called if the session ends first."""
        slot = LoginSlot(self.key, username)
        state = self._holder.current.state

        def decided(refusal: str | None) -> None:
            if refusal is None:
                if self._released:  # the session ended while it waited
                    state.logout(slot)
                    return
                self._slot = slot
                self._holder.unauthenticated.leave(self)
            if not self._released:
                done(refusal)

        state.login(slot, decided)

    def release(self, result: str) -> None:
        """Give back every slot held; ``result`` is how the session ended.

        Idempotent: the second and later calls change nothing.
        """
        if self._released:
            return
        self._released = True
        self._holder.unauthenticated.leave(self)
        if self._slot is not None:
            self._holder.current.state.logout(self._slot)
            self._slot = None
        if self._open:
            self._open = False
            self._holder.sessions.discard(self._session)
            self._events.session_closed(result)
