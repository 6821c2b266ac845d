"""What a cluster node holds, and the decisions it takes alone while Redis is away.

``NodeHoldings`` is the node's truth: the login slots and quota reservations it
holds (granted by the cluster or by itself), the scopes' committed counters as last
read plus what it committed since, and the commits Redis may not have counted.
``cluster.RedisState`` records every grant and every end here; the lease
(``clusterlease``) writes it back to Redis whole (``held:<node>``, the ``claim``
script) whenever Redis lost it: a restart, a lease that ran out while Redis was
unreachable, a reply lost in flight.

While Redis is unreachable (or far behind) the node decides from these holdings
(``login_locally``, ``reserve_locally``) rather than from a
``session.state.LocalState`` beside them: the node's truth must carry over between
the two modes (a session granted by the cluster is still this node's session when
Redis goes away, and the other way round), and ``LocalState`` can only take what its
own limits grant, not record a grant decided elsewhere; its committed quota counters
would also start at zero, while the marks uploads took before the outage are the
cluster's (decision 0010). The limits are checked in ``LocalState``'s order and the
quota is ``session.state``'s sum.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

from ftps_gateway.session.state import (
    LIMIT_PER_IP,
    LIMIT_PER_USER,
    LIMIT_TOTAL,
    QuotaMark,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from ftps_gateway.session.state import LoginSlot, QuotaClaim, StateSettings


class NodeHoldings:
    """This node's slots, reservations and commits: its truth in both modes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: Counter[LoginSlot] = Counter()
        # reservation id -> scope -> [bytes, files]
        self._reservations: dict[str, dict[str, list[int]]] = {}
        # Scopes' committed counters as last read, plus what this node committed
        # since (read by quota marks while Redis is unreachable), and what it
        # committed while unreachable (added to Redis when it is back).
        self._committed: dict[str, list[int]] = {}
        self._unsent_commits: dict[str, list[int]] = {}

    # --- what Redis should have

    def fields(self) -> dict[str, int]:
        """The node's hash in Redis (``redisscripts``), built from the truth."""
        with self._lock:
            return self._fields()

    def take_write_back(self) -> tuple[dict[str, int], dict[str, list[int]]]:
        """The node's hash and the commits Redis has not counted yet (taken: give
        them back with ``keep_unsent`` if writing them fails)."""
        with self._lock:
            unsent, self._unsent_commits = self._unsent_commits, {}
            return self._fields(), unsent

    def keep_unsent(self, commits: Mapping[str, Sequence[int]]) -> None:
        """Commits Redis may not have counted: added when it is back (counting one
        twice errs on the side of refusing; losing one would not)."""
        with self._lock:
            for scope, (nbytes, files) in commits.items():
                unsent = self._unsent_commits.setdefault(scope, [0, 0])
                unsent[0] += nbytes
                unsent[1] += files

    # --- grants and ends

    def add_slot(self, slot: LoginSlot) -> None:
        """The cluster granted ``slot`` to this node."""
        with self._lock:
            self._slots[slot] += 1

    def hold(self, reservation: str, claims: Sequence[QuotaClaim]) -> None:
        """The cluster granted ``claims`` to ``reservation``."""
        with self._lock:
            self._hold(reservation, claims)

    def give_back(
        self,
        slots: Iterable[LoginSlot],
        releases: Iterable[tuple[str, Mapping[str, tuple[int, int]]]],
    ) -> tuple[Counter[str], dict[str, list[int]]]:
        """Sessions ended and reservations released (with their commits), all at
        once: the changes to the node's hash, and the commits per scope."""
        fields: Counter[str] = Counter()
        commits: dict[str, list[int]] = {}
        with self._lock:
            for slot in slots:
                self._drop_slot(slot, fields)
            for reservation, committed in releases:
                self._drop_reservation(reservation, committed, fields, commits)
        return fields, commits

    def note_marks(self, marks: Mapping[str, QuotaMark]) -> None:
        """The scopes' committed counters, as the cluster just gave them."""
        with self._lock:
            for scope, mark in marks.items():
                self._committed[scope] = [mark.committed_bytes, mark.committed_files]

    # --- deciding alone (Redis unreachable or far behind)

    def known_marks(self, scopes: Iterable[str]) -> dict[str, QuotaMark]:
        """The scopes' committed counters as this node knows them."""
        with self._lock:
            return {
                scope: QuotaMark(*self._committed.get(scope, [0, 0]))
                for scope in scopes
            }

    def login_locally(self, slot: LoginSlot, settings: StateSettings) -> str | None:
        """The limits over this node's own sessions (session.state.LocalState's
        order: total, address, user)."""
        with self._lock:
            total, address, user = self._counts(slot)
            if total >= settings.max_sessions:
                return LIMIT_TOTAL
            if address >= settings.max_sessions_per_ip:
                return LIMIT_PER_IP
            if user >= settings.max_sessions_per_user:
                return LIMIT_PER_USER
            self._slots[slot] += 1
        return None

    def reserve_locally(
        self, reservation: str, claims: Sequence[QuotaClaim]
    ) -> str | None:
        """session.state's sum over what this node knows: the committed counters
        as last read plus its own commits since, its own reservations."""
        with self._lock:
            for claim in claims:
                held_bytes, held_files = self._reserved(claim.scope)
                known = self._committed.get(claim.scope, [0, 0])
                since_bytes = known[0] - claim.mark.committed_bytes
                since_files = known[1] - claim.mark.committed_files
                if claim.max_bytes is not None:
                    used = claim.walked_bytes + since_bytes + held_bytes
                    if used + claim.nbytes > claim.max_bytes:
                        return claim.scope
                if claim.max_files is not None:
                    used = claim.walked_files + since_files + held_files
                    if used + claim.files > claim.max_files:
                        return claim.scope
            self._hold(reservation, claims)
        return None

    def release_locally(
        self, reservation: str, committed: Mapping[str, tuple[int, int]]
    ) -> None:
        """Drop ``reservation``; its commit waits for Redis (``keep_unsent``)."""
        _, commits = self.give_back((), [(reservation, committed)])
        self.keep_unsent(commits)

    # --- under _lock

    def _fields(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for slot, count in self._slots.items():
            out["t"] += count
            out[f"a|{slot.address}"] += count
            out[f"u|{slot.user}"] += count
        for scopes in self._reservations.values():
            for scope, (nbytes, files) in scopes.items():
                out[f"b|{scope}"] += nbytes
                out[f"f|{scope}"] += files
        return {name: value for name, value in out.items() if value > 0}

    def _counts(self, slot: LoginSlot) -> tuple[int, int, int]:
        """(sessions, from ``slot.address``, as ``slot.user``) held here."""
        total = address = user = 0
        for held, count in self._slots.items():
            total += count
            address += count if held.address == slot.address else 0
            user += count if held.user == slot.user else 0
        return total, address, user

    def _reserved(self, scope: str) -> tuple[int, int]:
        """(bytes, files) reserved here in ``scope``."""
        nbytes = files = 0
        for scopes in self._reservations.values():
            held = scopes.get(scope)
            if held is not None:
                nbytes += held[0]
                files += held[1]
        return nbytes, files

    def _hold(self, reservation: str, claims: Sequence[QuotaClaim]) -> None:
        scopes = self._reservations.setdefault(reservation, {})
        for claim in claims:
            held = scopes.setdefault(claim.scope, [0, 0])
            held[0] += claim.nbytes
            held[1] += claim.files

    def _drop_slot(self, slot: LoginSlot, fields: Counter[str]) -> None:
        if self._slots[slot] <= 0:
            return  # never granted (or given back twice): nothing to give back
        self._slots[slot] -= 1
        if not self._slots[slot]:
            del self._slots[slot]
        fields["t"] -= 1
        fields[f"a|{slot.address}"] -= 1
        fields[f"u|{slot.user}"] -= 1

    def _drop_reservation(
        self,
        reservation: str,
        committed: Mapping[str, tuple[int, int]],
        fields: Counter[str],
        commits: dict[str, list[int]],
    ) -> None:
        for scope, (nbytes, files) in self._reservations.pop(reservation, {}).items():
            fields[f"b|{scope}"] -= nbytes
            fields[f"f|{scope}"] -= files
        for scope, (nbytes, files) in committed.items():
            total = commits.setdefault(scope, [0, 0])
            total[0] += nbytes
            total[1] += files
            known = self._committed.setdefault(scope, [0, 0])
            known[0] += nbytes
            known[1] += files
