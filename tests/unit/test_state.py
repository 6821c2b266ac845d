"""The shared state in one process: login slots, bans keyed per prefix, quota
exactness, and the unauthenticated pool, on a fake clock (the supervisor's channel:
tests/integration/test_state_channel.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from ftps_gateway.policy.defender import Ban
from ftps_gateway.session.admission import (
    POOL_PER_ADDRESS,
    POOL_TOTAL,
    UnauthenticatedPool,
)
from ftps_gateway.session.state import (
    LIMIT_PER_IP,
    LIMIT_PER_USER,
    LIMIT_TOTAL,
    BanReplica,
    LoginSlot,
    QuotaMark,
    ban_key,
)
from support.state import SAFE, Clock, answered, claim, local_state, login, settings

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ftps_gateway.session.state import QuotaClaim


def _fail(state: Any, ip: str) -> Ban | None:
    return answered(state.record_failure, ip)  # type: ignore[no-any-return]


def _reserve(state: Any, reservation: str, *claims: QuotaClaim) -> str | None:
    return answered(state.reserve, reservation, list(claims))  # type: ignore[no-any-return]


def _marks(state: Any, *scopes: str) -> Mapping[str, QuotaMark]:
    return answered(state.quota_marks, list(scopes))  # type: ignore[no-any-return]


# --- login slots


def test_login_slots_total_per_address_per_user() -> None:
    """Each limit refuses with its own reason; a logout frees exactly one slot."""
    state = local_state(total=3, per_ip=2, per_user=2)
    assert login(state, "198.51.100.1", "acme") is None
    assert login(state, "198.51.100.1", "acme") is None
    assert login(state, "198.51.100.1", "globex") == LIMIT_PER_IP
    assert login(state, "198.51.100.2", "acme") == LIMIT_PER_USER
    assert login(state, "198.51.100.2", "globex") is None
    assert login(state, "198.51.100.3", "initech") == LIMIT_TOTAL
    state.logout(LoginSlot("198.51.100.1", "acme"))
    assert login(state, "198.51.100.3", "initech") is None
    assert state.snapshot() == (
        3,
        {"198.51.100.1": 1, "198.51.100.2": 1, "198.51.100.3": 1},
        {"acme": 1, "globex": 1, "initech": 1},
    )


def test_lower_limits_never_cut_logged_in_sessions() -> None:
    """A reload that lowers the limits keeps the sessions counted; the next waits."""
    state = local_state(total=5, per_ip=5, per_user=5)
    for _ in range(3):
        assert login(state, "198.51.100.1", "acme") is None
    state.update(settings(total=1, per_ip=1, per_user=1))
    assert state.snapshot().sessions == 3
    assert login(state, "198.51.100.2", "globex") == LIMIT_TOTAL
    for _ in range(3):
        state.logout(LoginSlot("198.51.100.1", "acme"))
    assert login(state, "198.51.100.2", "globex") is None


def test_a_logout_never_counts_below_zero() -> None:
    """A stray logout (not granted) changes nothing."""
    state = local_state(total=1)
    state.logout(LoginSlot("198.51.100.1", "acme"))
    assert state.snapshot() == (0, {}, {})
    assert login(state, "198.51.100.1", "acme") is None
    assert login(state, "198.51.100.2", "globex") == LIMIT_TOTAL


# --- bans


def test_bans_are_keyed_per_ipv6_prefix() -> None:
    """Failures spread over one /64 ban the whole /64, not the next one; a safe
    address inside it stays reachable."""
    state = local_state()
    assert _fail(state, "2001:db8::1") is None
    assert _fail(state, "2001:db8::2") is None
    ban = _fail(state, "2001:db8::ffff:ffff:ffff:3")
    assert ban is not None
    assert ban.ip == "2001:db8::/64"
    assert state.is_banned("2001:db8::9999")
    assert not state.is_banned("2001:db8::7")  # access.safe
    assert not state.is_banned("2001:db8:0:1::1")
    assert state.active_bans() == 1
    assert [b.ip for b in state.bans()] == ["2001:db8::/64"]


def test_ban_changes_reach_watchers_in_order() -> None:
    """A watcher hears each ban made and lifted (lifted: remaining 0)."""
    state = local_state()
    heard: list[Ban] = []
    state.watch_bans(heard.append)
    for _ in range(3):
        _fail(state, "203.0.113.5")
    assert state.remove_ban("203.0.113.5")
    assert not state.remove_ban("203.0.113.5")
    assert [(b.ip, b.remaining_seconds > 0) for b in heard] == [
        ("203.0.113.5", True),
        ("203.0.113.5", False),
    ]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("2001:db8::5", "2001:db8::/64"),
        ("2001:db8::/64", "2001:db8::/64"),
        ("2001:0db8:0000::/64", "2001:db8::/64"),
        ("example.com", None),
        ("2001:db8::5/64", None),  # host bits: not a key as ban list shows it
    ],
)
def test_ban_key_of_what_an_operator_types(value: str, key: str | None) -> None:
    """``ban remove`` takes an address or the key ``ban list`` showed."""
    assert ban_key(value, 64) == key


def test_replica_answers_from_what_it_was_told() -> None:
    """Bans applied, expired, lifted, replaced; safe addresses and failing closed."""
    clock = Clock()
    replica = BanReplica(clock)
    replica.configure(SAFE, 64)
    assert not replica.is_banned("2001:db8::1")
    replica.apply(Ban("2001:db8::/64", 10, 1, 0))
    assert replica.is_banned("2001:db8::1")
    assert not replica.is_banned("2001:db8::7")
    assert replica.count() == 1
    clock.now += 10
    assert not replica.is_banned("2001:db8::1")
    replica.apply(Ban("198.51.100.7", 10, 1, 0))
    replica.apply(Ban("198.51.100.7", 0, 0, 0))
    assert not replica.is_banned("198.51.100.7")
    replica.replace([Ban("198.51.100.8", 5, 1, 0)])
    assert replica.is_banned("::ffff:198.51.100.8")
    replica.everyone = True
    assert replica.is_banned("192.0.2.1")


# --- quota


def test_two_reservations_race_for_the_last_bytes() -> None:
    """900 bytes on disk, 100 left: the first reservation takes them, the second
    gets none, also not one byte, until the first lets go."""
    state = local_state()
    assert _reserve(state, "a", claim(60, walked=900)) is None
    assert _reserve(state, "a", claim(40, walked=900)) is None  # grows in chunks
    assert _reserve(state, "b", claim(1, walked=900)) == "user acme"
    state.release("a", {})  # discarded: nothing committed
    assert _reserve(state, "b", claim(100, walked=900)) is None
    assert _reserve(state, "c", claim(1, walked=900)) == "user acme"


def test_a_commit_between_mark_and_reservation_is_counted() -> None:
    """An upload that commits after another's mark (so its walk missed it) still
    counts against the other's reservation."""
    state = local_state()
    mark = _marks(state, "user acme")["user acme"]
    assert mark == QuotaMark(0, 0)
    assert _reserve(state, "first", claim(300, files=1)) is None
    state.release("first", {"user acme": (300, 1)})  # committed
    # The second upload walked before that commit: it saw nothing on disk.
    assert _reserve(state, "second", claim(701, mark=mark)) == "user acme"
    assert _reserve(state, "second", claim(700, mark=mark)) is None
    later = _marks(state, "user acme")["user acme"]
    assert later == QuotaMark(300, 1)
    # A walk after the commit sees the file; the mark then subtracts nothing twice.
    assert _reserve(state, "third", claim(1, walked=300, mark=later)) == "user acme"


def test_file_counts_and_negative_commits() -> None:
    """quota_files counts new files; a smaller replacement commits negative bytes."""
    state = local_state()
    limit = {"max_bytes": None, "max_files": 2}
    assert _reserve(state, "a", claim(10, files=1, walked_files=1, **limit)) is None
    assert _reserve(state, "b", claim(10, files=1, walked_files=1, **limit)) == (
        "user acme"
    )
    state.release("a", {"user acme": (-500, 0)})  # replaced a larger file
    assert _marks(state, "user acme")["user acme"] == QuotaMark(-500, 0)


def test_a_reservation_is_all_or_nothing_across_scopes() -> None:
    """The user's quota has room, the mount's has not: nothing is reserved."""
    state = local_state()
    user = claim(100, scope="user acme", max_bytes=1000)
    mount = claim(100, scope="mount /finance", max_bytes=50)
    assert _reserve(state, "a", user, mount) == "mount /finance"
    assert state.reservations() == {}
    assert _reserve(state, "b", claim(1000, scope="user acme")) is None


# --- the unauthenticated pool


class Member:
    """A pool member that records its eviction."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted: str | None = None

    def evict(self, pool: str) -> None:
        self.evicted = pool

    def __repr__(self) -> str:
        return self.name


def _fill(
    pool: UnauthenticatedPool, clock: Clock, key: str, count: int, total: int = 100
) -> list[Member]:
    members = []
    for index in range(count):
        member = Member(f"{key}#{index}")
        clock.now += 1
        pool.enter(member, key, total, 100)
        members.append(member)
    return members


def test_a_full_address_makes_room_from_its_own_stalest() -> None:
    """Past the per-address limit the address's own longest-idle member goes."""
    clock = Clock()
    pool = UnauthenticatedPool(clock)
    others = _fill(pool, clock, "192.0.2.9", 2)
    first, second, third = (Member(f"m{n}") for n in range(3))
    for member in (first, second, third):
        clock.now += 1
        pool.enter(member, "192.0.2.1", 100, 2)
    assert (first.evicted, second.evicted, third.evicted) == (
        POOL_PER_ADDRESS, None, None,
    )  # fmt: skip
    clock.now += 1
    pool.touch(second)  # progress: now the freshest
    fourth = Member("m3")
    pool.enter(fourth, "192.0.2.1", 100, 2)
    assert third.evicted == POOL_PER_ADDRESS
    assert second.evicted is None
    assert all(member.evicted is None for member in others)


def test_a_full_pool_makes_room_from_the_busiest_address() -> None:
    """1,000 idlers from five addresses fill the pool; a partner from a sixth gets
    in, and the places end up shared evenly between addresses."""
    clock = Clock()
    pool = UnauthenticatedPool(clock)
    idle = [
        member
        for index in range(1000)
        for member in _fill(pool, clock, f"192.0.2.{1 + index % 5}", 1, total=100)
    ]
    assert len(pool) == 100
    assert {pool.count(f"192.0.2.{n}") for n in range(1, 6)} == {20}
    partner = Member("partner")
    pool.enter(partner, "198.51.100.1", 100, 100)
    assert len(pool) == 100
    assert pool.count("198.51.100.1") == 1
    assert sum(member.evicted == POOL_TOTAL for member in idle) == 901
    # The partner is never the victim while any address holds more than one.
    for _ in range(500):
        clock.now += 1
        _fill(pool, clock, "192.0.2.200", 1, total=100)
    assert partner.evicted is None


def test_ties_evict_the_stalest_of_the_busiest() -> None:
    """With every address at one place, the longest-idle member goes first."""
    clock = Clock()
    pool = UnauthenticatedPool(clock)
    members = [_fill(pool, clock, f"192.0.2.{n}", 1, total=3)[0] for n in range(3)]
    clock.now += 1
    pool.touch(members[0])
    newcomer = Member("new")
    pool.enter(newcomer, "192.0.2.50", 3, 100)
    assert [m.evicted for m in members] == [None, POOL_TOTAL, None]
    pool.leave(members[0])
    pool.leave(members[0])  # twice: nothing more happens
    assert len(pool) == 2
