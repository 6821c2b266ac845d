"""What a gateway shares across its workers and nodes: bans, login slots, quota.

One interface, three homes (issues 14, 15, 17):

- in-process, for a single worker (and the supervisor's own bookkeeping);
- the supervisor, for the workers of one node (over their socket pairs);
- Redis, for the nodes behind one balancer (``[cluster]``).

Rules every implementation keeps:

- **Never block the IO loop.** The per-connection question (is this address banned?)
  is answered from a local replica; bans are rare events, pushed to every replica.
  Everything else is a request whose answer arrives through ``done`` on the IO loop
  (through the loop waker; an in-process implementation may call ``done`` before the
  request returns). Fire-and-forget calls (``logout``, ``release``) may be batched.
- **Limits are exact.** A grant is decided where the counts live, atomically: two
  workers or nodes can never both take the last slot or the last byte of a quota.
- **What a holder holds dies with it.** A worker's slots and reservations are released
  when its channel closes; a node's, when its lease expires.
- **Addresses are keys** (``policy.netpolicy.address_key``): an IPv4 address, or the
  IPv6 prefix (``/64`` by default) that one subscriber controls.

Quota accounting, exactly: an upload reserves bytes (in chunks, as it grows) and, for a
new file, one file, against each scope it counts in. A grant needs
``walked + committed_since_walk + reserved_by_others + asked <= limit``, where
``walked`` is a tree walk made off the loop, ``committed_since_walk`` what uploads of
the whole gateway committed after the walk's mark (so a commit between someone's walk
and their reservation is never missed), and deletions are only seen by the next walk
(the error errs on the side of refusing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ftps_gateway.policy.defender import Ban

# Why a login slot was refused (the 421 texts are the protocol layer's).
LIMIT_TOTAL = "limit-total"
LIMIT_PER_IP = "limit-per-ip"
LIMIT_PER_USER = "limit-per-user"


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
    walked_bytes: int  # what the walk found
    walked_files: int
    mark: QuotaMark  # the committed counters read before that walk
    nbytes: int  # bytes asked now (added to what this reservation holds)
    files: int  # files asked now (1 for a new file, else 0)


class SharedState(Protocol):
    """Bans, login slots and quota reservations, wherever they live."""

    # --- bans: a local replica answers the per-connection question

    def is_banned(self, address: str) -> bool:
        """True if connections from ``address`` (a key) must be dropped now."""
        ...

    def record_failure(self, address: str, done: Callable[[Ban | None], None]) -> None:
        """Score a failed login; ``done`` gets the ban it triggered, if any."""
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
