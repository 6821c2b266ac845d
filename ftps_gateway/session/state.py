"""What a gateway shares across its workers and nodes: bans, login slots, quota.

One interface, three homes (issues 14, 15, 17; docs/decisions/0005-shared-state.md):

- ``LocalState`` (here): in-process, for a single server, and the supervisor's own
  book for its workers;
- the supervisor's channel (``service.sharedstate.ChannelState``), for the workers of
  one node (over their socket pairs);
- Redis, for the nodes behind one balancer (``[cluster]``).

Rules every implementation keeps:

- **Never block the IO loop.** The per-connection question (is this address banned?)
  is answered from a local replica (``BanReplica``); bans are rare events, pushed to
  every replica. Everything else is a request whose answer arrives through ``done``
  on the IO loop (an in-process implementation may call ``done`` before the request
  returns). Fire-and-forget calls (``logout``, ``release``) may be batched. Only the
  operator's side (``StateAdmin``: list and lift bans, counts) may block, and only
  in the admin socket's thread.
- **Limits are exact.** A grant is decided where the counts live, atomically: two
  workers or nodes can never both take the last slot or the last byte of a quota.
- **What a holder holds dies with it.** A worker's slots and reservations are released
  when its channel closes; a node's, when its lease expires.
- **Addresses are keys** (``policy.netpolicy.address_key``): an IPv4 address, or the
  IPv6 prefix (``access.ipv6_prefix_length``, /64 by default) that one subscriber
  controls. Login slots carry the key (the caller computes it); the ban methods take
  the peer's address as seen, because ``access.safe`` is about real addresses: a
  safe address is never banned, also not by a ban on the prefix it sits in.

Quota accounting, exactly: an upload reserves bytes (in chunks, as it grows) and, for a
new file, one file, against each scope it counts in. A grant needs
``walked + committed_since_walk + reserved + asked <= limit``, where ``walked`` is a
tree walk made off the loop, ``committed_since_walk`` what uploads of the whole
gateway committed after the walk's mark (so a commit between someone's walk and their
reservation is never missed), ``reserved`` what every reservation holds in the scope
now (this one's earlier chunks included: they are not on disk under a name the walk
counts), and deletions are only seen by the next walk (the error errs on the side of
refusing). The upload path (``session.quota``) reserves one file for every upload,
an overwrite with the file it replaces as its credit, and reports no negative
amounts: a walk may already have seen what shrank.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ftps_gateway.policy.defender import Ban, Defender
from ftps_gateway.policy.netpolicy import (
    AccessList,
    address_key,
    parse_ip,
    parse_networks,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ftps_gateway.config import DefenderSettings, GatewayConfig, IPNetwork

# Why a login slot was refused (the 421 texts are the protocol layer's).
LIMIT_TOTAL = "limit-total"
LIMIT_PER_IP = "limit-per-ip"
LIMIT_PER_USER = "limit-per-user"
LIMIT_REASONS = frozenset({LIMIT_TOTAL, LIMIT_PER_IP, LIMIT_PER_USER})
# Why a login slot was refused by a cluster node whose Redis is unreachable, with
# ``cluster.on_unavailable = "refuse"`` (service.cluster; not the client's fault).
UNAVAILABLE = "cluster-unavailable"


@dataclass(frozen=True)
class LoginSlot:
    """What a logged-in session holds: one of the totals, its address's, its user's."""

    address: str  # an address key
    user: str


@dataclass(frozen=True)
class QuotaMark:
    """A scope's committed counters when a walk starts (see the module docstring)."""

    committed_bytes: int
    committed_files: int


@dataclass(frozen=True)
class QuotaClaim:
    """One scope's part of a reservation request."""

    scope: str  # "user acme", "mount /finance" (vfs.QuotaScope.name)
    max_bytes: int | None  # the scope's limits (None: unlimited)
    max_files: int | None
    # What the walk found, less what this upload replaces that the walk counted (a
    # file it overwrites, a partial it resumes: session.quota); may be negative
    # when those were committed after the walk's mark.
    walked_bytes: int
    walked_files: int
    mark: QuotaMark  # the committed counters read before that walk
    nbytes: int  # bytes asked now (added to what this reservation holds)
    files: int  # files asked now (1 for a new file, else 0)


@dataclass(frozen=True)
class StateSettings:
    """What a configuration says about the shared state (a reload changes it)."""

    defender: DefenderSettings
    safe: tuple[IPNetwork, ...]  # access.safe: never banned
    ipv6_prefix: int  # access.ipv6_prefix_length
    max_sessions: int  # logged-in sessions, all workers together
    max_sessions_per_ip: int  # ... from one address key
    max_sessions_per_user: int  # ... as one user

    @classmethod
    def from_config(cls, config: GatewayConfig) -> StateSettings:
        """The settings ``config`` gives."""
        server = config.server
        return cls(
            defender=config.defender,
            safe=config.access.safe,
            ipv6_prefix=config.access.ipv6_prefix_length,
            max_sessions=server.max_sessions,
            max_sessions_per_ip=server.max_sessions_per_ip,
            max_sessions_per_user=server.max_sessions_per_user,
        )


class StateSnapshot(NamedTuple):
    """Logged-in sessions now: in total, per address key, per user."""

    sessions: int
    per_address: dict[str, int]
    per_user: dict[str, int]


class SharedState(Protocol):
    """Bans, login slots and quota reservations, as sessions use them (IO loop)."""

    def update(self, settings: StateSettings) -> None:
        """Apply a reloaded configuration; bans, slots and reservations are kept."""
        ...

    # --- bans: a local replica answers the per-connection question

    def is_banned(self, ip: str) -> bool:
        """True if connections from ``ip`` (a peer address) must be dropped now."""
        ...

    def active_bans(self) -> int:
        """How many keys are banned now (the metrics gauge; any thread, cheap)."""
        ...

    def record_failure(self, ip: str, done: Callable[[Ban | None], None]) -> None:
        """Score a failed login from ``ip``; ``done`` gets the ban it triggered."""
        ...

    # --- login slots (server.max_sessions, _per_ip, _per_user)

    def login(self, slot: LoginSlot, done: Callable[[str | None], None]) -> None:
        """Take ``slot``; ``done(None)`` if granted, else the ``LIMIT_*`` reason."""
        ...

    def logout(self, slot: LoginSlot) -> None:
        """Give back a slot ``login`` granted (fire and forget)."""
        ...

    # --- quota reservations

    def quota_marks(
        self, scopes: Sequence[str], done: Callable[[Mapping[str, QuotaMark]], None]
    ) -> None:
        """Read the scopes' committed counters (before walking them)."""
        ...

    def reserve(
        self,
        reservation: str,
        claims: Sequence[QuotaClaim],
        done: Callable[[str | None], None],
    ) -> None:
        """Add ``claims`` to ``reservation`` (an id unique to one upload), all or
        nothing; ``done(None)`` if granted, else the name of the scope that is full."""
        ...

    def release(
        self, reservation: str, committed: Mapping[str, tuple[int, int]]
    ) -> None:
        """The upload ended: drop its reservation; ``committed`` maps each scope to
        the (bytes, files) its commit added (empty when discarded; bytes may be
        negative when a smaller file replaced a larger one)."""
        ...


class StateAdmin(Protocol):
    """The operator's side of the state: may block, never called on an IO loop."""

    def bans(self) -> list[Ban]:
        """Bans in force, soonest to end first."""
        ...

    def remove_ban(self, key: str) -> bool:
        """Lift the ban on ``key`` (see ``ban_key``); False if it was not banned."""
        ...

    def snapshot(self) -> StateSnapshot:
        """Logged-in sessions now."""
        ...

    def watch_bans(self, listener: Callable[[Ban], None]) -> None:
        """Call ``listener`` with every ban made or lifted from now on (in order;
        from any thread; it must only hand the change on)."""
        ...


class StateStore(SharedState, StateAdmin, Protocol):
    """Both sides: what the supervisor serves its workers from."""


def ban_key(value: str, ipv6_prefix: int) -> str | None:
    """The key an operator means by ``value``: an address, or a network as
    ``ban list`` shows it (``2001:db8::/64``); None if it is neither."""
    if "/" in value:
        try:
            (network,) = parse_networks([value])
        except ValueError:
            return None
        return address_key(str(network.network_address), ipv6_prefix)
    if parse_ip(value) is None:
        return None
    return address_key(value, ipv6_prefix)


class BanReplica:
    """A copy of the bans, fed by the place that decides them; answers locally.

    Used on the IO loop of a worker (and of a Redis-backed node): ``is_banned`` runs
    for every new connection, so it is a dictionary lookup, with no lock (changes
    are applied on the same loop) and no parsing while no ban is in force.
    ``count`` may run on the metrics thread; it only reads.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}  # key -> monotonic end
        self._safe: AccessList | None = None
        self._prefix = 64
        self.everyone = False  # fail closed: the source of bans is gone

    def configure(self, safe: Iterable[IPNetwork], ipv6_prefix: int) -> None:
        """The keys and the never-banned networks of the current configuration."""
        networks = tuple(safe)
        self._safe = AccessList(networks) if networks else None
        self._prefix = ipv6_prefix

    def apply(self, ban: Ban) -> None:
        """A ban made (``remaining_seconds`` > 0) or lifted."""
        if ban.remaining_seconds > 0:
            self._until[ban.ip] = self._clock() + ban.remaining_seconds
        else:
            self._until.pop(ban.ip, None)

    def replace(self, bans: Iterable[Ban]) -> None:
        """Start over from a full list."""
        self._until.clear()
        for ban in bans:
            self.apply(ban)

    def is_banned(self, ip: str) -> bool:
        """True if connections from ``ip`` must be dropped now."""
        if self.everyone:
            return True
        if not self._until:
            return False
        if self._safe is not None and self._safe.is_allowed(ip):
            return False
        key = address_key(ip, self._prefix)
        until = self._until.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._until[key]  # over: forget it
        return False

    def count(self) -> int:
        """Keys banned now."""
        now = self._clock()
        return sum(1 for until in list(self._until.values()) if until > now)


class LocalState:
    """The whole state in this process: bans, login slots, quota reservations.

    One lock around each decision, so the IO loop (a single server), the
    supervisor's channel threads and the admin thread may all call in; every
    ``done`` is called before the request returns, outside the lock.
    """

    def __init__(
        self,
        settings: StateSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._ban_lock = threading.Lock()  # a change and its notification, in order
        self._clock = clock
        self._defender = Defender(
            settings.defender, settings.safe, ipv6_prefix=settings.ipv6_prefix,
            clock=clock, wall_clock=wall_clock,
        )  # fmt: skip
        self._settings = settings
        self._listeners: list[Callable[[Ban], None]] = []
        self._sessions = 0
        self._per_address: dict[str, int] = {}
        self._per_user: dict[str, int] = {}
        self._committed: dict[str, tuple[int, int]] = {}  # scope -> bytes, files
        self._reserved: dict[str, tuple[int, int]] = {}  # scope -> all reservations
        self._reservations: dict[str, dict[str, tuple[int, int]]] = {}

    def update(self, settings: StateSettings) -> None:
        """New limits and defender settings; sessions already logged in stay."""
        self._defender.update(settings.defender, settings.safe, settings.ipv6_prefix)
        with self._lock:
            self._settings = settings

    # --- bans

    def is_banned(self, ip: str) -> bool:
        """True if connections from ``ip`` must be dropped now."""
        return self._defender.is_banned(ip)

    def active_bans(self) -> int:
        """How many keys are banned now."""
        return self._defender.active_count()

    def record_failure(self, ip: str, done: Callable[[Ban | None], None]) -> None:
        """Score a failed login; ``done`` gets the ban it triggered, if any."""
        with self._ban_lock:
            ban = self._defender.record_failure(ip)
            if ban is not None:
                self._notify(ban)
        done(ban)

    def bans(self) -> list[Ban]:
        """Bans in force, soonest to end first."""
        return self._defender.bans()

    def remove_ban(self, key: str) -> bool:
        """Lift the ban on ``key``; False if it was not banned."""
        with self._ban_lock:
            removed = self._defender.remove(key)
            if removed:
                self._notify(Ban(self._defender.key(key), 0.0, 0, 0.0))
        return removed

    def watch_bans(self, listener: Callable[[Ban], None]) -> None:
        """Call ``listener`` with every ban made or lifted from now on."""
        with self._ban_lock:
            self._listeners.append(listener)

    def _notify(self, ban: Ban) -> None:
        for listener in self._listeners:
            listener(ban)

    # --- login slots

    def login(self, slot: LoginSlot, done: Callable[[str | None], None]) -> None:
        """Take ``slot`` if every limit has room; ``done`` gets why not."""
        with self._lock:
            settings = self._settings
            if self._sessions >= settings.max_sessions:
                refusal: str | None = LIMIT_TOTAL
            elif self._per_address.get(slot.address, 0) >= settings.max_sessions_per_ip:
                refusal = LIMIT_PER_IP
            elif self._per_user.get(slot.user, 0) >= settings.max_sessions_per_user:
                refusal = LIMIT_PER_USER
            else:
                refusal = None
                self._sessions += 1
                _add(self._per_address, slot.address, 1)
                _add(self._per_user, slot.user, 1)
        done(refusal)

    def logout(self, slot: LoginSlot) -> None:
        """Give back a slot ``login`` granted."""
        with self._lock:
            if self._per_user.get(slot.user, 0) <= 0:
                return  # not held: never count below zero
            self._sessions -= 1
            _add(self._per_address, slot.address, -1)
            _add(self._per_user, slot.user, -1)

    def snapshot(self) -> StateSnapshot:
        """Logged-in sessions now."""
        with self._lock:
            return StateSnapshot(
                self._sessions, dict(self._per_address), dict(self._per_user)
            )

    # --- quota

    def quota_marks(
        self, scopes: Sequence[str], done: Callable[[Mapping[str, QuotaMark]], None]
    ) -> None:
        """The scopes' committed counters now."""
        with self._lock:
            marks = {
                scope: QuotaMark(*self._committed.get(scope, (0, 0)))
                for scope in scopes
            }
        done(marks)

    def reserve(
        self,
        reservation: str,
        claims: Sequence[QuotaClaim],
        done: Callable[[str | None], None],
    ) -> None:
        """Grant every claim or none (see the module docstring for the sum)."""
        full: str | None = None
        with self._lock:
            for claim in claims:
                if not self._fits(claim):
                    full = claim.scope
                    break
            else:
                held = self._reservations.setdefault(reservation, {})
                for claim in claims:
                    change = (claim.nbytes, claim.files)
                    held[claim.scope] = _plus(held.get(claim.scope, (0, 0)), change)
                    self._reserved[claim.scope] = _plus(
                        self._reserved.get(claim.scope, (0, 0)), change
                    )
        done(full)

    def _fits(self, claim: QuotaClaim) -> bool:
        committed_bytes, committed_files = self._committed.get(claim.scope, (0, 0))
        reserved_bytes, reserved_files = self._reserved.get(claim.scope, (0, 0))
        if claim.max_bytes is not None:
            used = (
                claim.walked_bytes
                + committed_bytes - claim.mark.committed_bytes
                + reserved_bytes
            )  # fmt: skip
            if used + claim.nbytes > claim.max_bytes:
                return False
        if claim.max_files is not None:
            used = (
                claim.walked_files
                + committed_files - claim.mark.committed_files
                + reserved_files
            )  # fmt: skip
            if used + claim.files > claim.max_files:
                return False
        return True

    def release(
        self, reservation: str, committed: Mapping[str, tuple[int, int]]
    ) -> None:
        """Drop ``reservation``; count what its commit added."""
        with self._lock:
            held = self._reservations.pop(reservation, {})
            for scope, amount in held.items():
                left = _plus(self._reserved.get(scope, (0, 0)), _minus(amount))
                if left == (0, 0):
                    self._reserved.pop(scope, None)
                else:
                    self._reserved[scope] = left
            for scope, amount in committed.items():
                self._committed[scope] = _plus(
                    self._committed.get(scope, (0, 0)), amount
                )

    def reservations(self) -> dict[str, dict[str, tuple[int, int]]]:
        """What every reservation holds now (for diagnostics and tests)."""
        with self._lock:
            return {name: dict(held) for name, held in self._reservations.items()}


def _add(counts: dict[str, int], key: str, change: int) -> None:
    value = counts.get(key, 0) + change
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def _minus(a: tuple[int, int]) -> tuple[int, int]:
    return -a[0], -a[1]
