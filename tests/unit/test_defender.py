"""Bans, on a fake clock (login slots and quota: test_state.py)."""

from __future__ import annotations

import ipaddress

import pytest

from ftps_gateway.config import DefenderSettings
from ftps_gateway.policy.defender import Defender


class Clock:
    """Monotonic and wall time that only move when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now


SETTINGS = DefenderSettings(
    max_failures=3, window_seconds=60, ban_seconds=100, max_ban_seconds=350
)


def _defender(clock: Clock, prefix: int = 64, **changes: object) -> Defender:
    settings = DefenderSettings(**{**SETTINGS.__dict__, **changes})  # type: ignore[arg-type]
    safe = (ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("2001:db8::7"))
    return Defender(
        settings, safe, ipv6_prefix=prefix, clock=clock, wall_clock=clock.wall
    )


def test_ban_after_max_failures_within_window() -> None:
    clock = Clock()
    defender = _defender(clock)
    assert defender.record_failure("198.51.100.7") is None
    clock.now += 10
    assert defender.record_failure("198.51.100.7") is None
    assert not defender.is_banned("198.51.100.7")
    ban = defender.record_failure("198.51.100.7")
    assert ban is not None
    assert (ban.ip, ban.remaining_seconds, ban.offences) == ("198.51.100.7", 100, 1)
    assert ban.until == clock.wall() + 100
    assert defender.is_banned("198.51.100.7")
    assert not defender.is_banned("198.51.100.8")
    clock.now += 100
    assert not defender.is_banned("198.51.100.7")


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    defender = _defender(clock)
    for _ in range(10):
        assert defender.record_failure("198.51.100.7") is None
        clock.now += 31  # two failures per 60 s window at most


def test_repeat_offences_double_the_ban_up_to_the_cap() -> None:
    clock = Clock()
    defender = _defender(clock)
    lengths = []
    for _ in range(4):
        ban = None
        for _ in range(3):
            ban = defender.record_failure("203.0.113.5")
        assert ban is not None
        lengths.append(ban.remaining_seconds)
        clock.now += ban.remaining_seconds
    assert lengths == [100, 200, 350, 350]


def test_offences_are_forgotten_after_good_behaviour() -> None:
    clock = Clock()
    defender = _defender(clock)
    for _ in range(3):
        defender.record_failure("203.0.113.5")
    clock.now += 100 + 351  # ban over, then max_ban_seconds of quiet
    ban = None
    for _ in range(3):
        ban = defender.record_failure("203.0.113.5")
    assert ban is not None
    assert ban.offences == 1
    assert ban.remaining_seconds == 100


def test_safe_networks_are_never_banned() -> None:
    clock = Clock()
    defender = _defender(clock)
    for _ in range(20):
        assert defender.record_failure("10.9.1.1") is None
    assert not defender.is_banned("10.9.1.1")
    assert defender.is_safe("10.9.1.1")
    assert not defender.is_safe("10.8.1.1")


def test_no_safe_networks_means_nobody_is_safe() -> None:
    defender = Defender(SETTINGS, ())
    assert not defender.is_safe("10.9.1.1")


def test_disabled_defender_never_bans() -> None:
    clock = Clock()
    defender = _defender(clock, enabled=False)
    for _ in range(10):
        assert defender.record_failure("198.51.100.7") is None
    assert defender.bans() == []


def test_mapped_addresses_are_the_same_offender() -> None:
    clock = Clock()
    defender = _defender(clock)
    defender.record_failure("::ffff:198.51.100.7")
    defender.record_failure("198.51.100.7")
    assert defender.record_failure("::ffff:198.51.100.7") is not None
    assert defender.is_banned("198.51.100.7")


def test_ipv6_addresses_of_one_subscriber_share_a_ban() -> None:
    """Failures from three addresses of one /64 earn that /64 one ban (issue 14)."""
    clock = Clock()
    defender = _defender(clock)
    assert defender.record_failure("2001:db8:1:2::a") is None
    assert defender.record_failure("2001:db8:1:2::b") is None
    ban = defender.record_failure("2001:db8:1:2:ffff::c")
    assert ban is not None
    assert ban.ip == "2001:db8:1:2::/64"
    assert defender.is_banned("2001:db8:1:2::1234")
    assert defender.is_banned("2001:db8:1:2::/64")  # as the login queue asks
    assert not defender.is_banned("2001:db8:1:3::a")
    assert defender.remove("2001:db8:1:2::a")  # any address of it lifts the ban


def test_list_and_remove() -> None:
    clock = Clock()
    defender = _defender(clock)
    for ip in ("198.51.100.1", "198.51.100.2"):
        for _ in range(3):
            defender.record_failure(ip)
        clock.now += 10
    assert [ban.ip for ban in defender.bans()] == ["198.51.100.1", "198.51.100.2"]
    assert defender.active_count() == 2
    assert defender.remove("198.51.100.1")
    assert not defender.remove("198.51.100.1")
    assert not defender.is_banned("198.51.100.1")
    assert [ban.ip for ban in defender.bans()] == ["198.51.100.2"]


def test_update_keeps_bans_and_applies_new_settings() -> None:
    clock = Clock()
    defender = _defender(clock)
    for _ in range(3):
        defender.record_failure("198.51.100.1")
    defender.update(
        DefenderSettings(max_failures=1, ban_seconds=5, max_ban_seconds=5), ()
    )
    assert defender.is_banned("198.51.100.1")
    assert defender.record_failure("198.51.100.2") is not None


@pytest.mark.parametrize("ip", ["not-an-ip", ""])
def test_unparsable_addresses_do_not_crash(ip: str) -> None:
    defender = _defender(Clock())
    defender.record_failure(ip)
    assert not defender.is_banned("198.51.100.1")


def test_ipv6_failures_count_per_prefix() -> None:
    """Failures from three addresses of one /64 earn one ban on the whole /64."""
    clock = Clock()
    defender = _defender(clock)
    assert defender.record_failure("2001:db8::1") is None
    assert defender.record_failure("2001:db8::2") is None
    ban = defender.record_failure("2001:db8::ffff:1")
    assert ban is not None
    assert ban.ip == "2001:db8::/64"
    assert defender.is_banned("2001:db8::abcd")
    assert not defender.is_banned("2001:db8:0:1::1")  # the next /64
    assert defender.remove("2001:db8::/64")
    assert not defender.is_banned("2001:db8::abcd")


def test_a_safe_address_is_not_banned_by_its_prefix_ban() -> None:
    """access.safe wins over a ban of the /64 the safe address sits in."""
    clock = Clock()
    defender = _defender(clock)
    for _ in range(3):
        defender.record_failure("2001:db8::1")
    assert defender.is_banned("2001:db8::1")
    assert not defender.is_banned("2001:db8::7")


def test_prefix_128_counts_each_ipv6_address_apart() -> None:
    """With ipv6_prefix_length = 128 an address is its own key, as before."""
    clock = Clock()
    defender = _defender(clock, prefix=128)
    for index in range(1, 10):
        assert defender.record_failure(f"2001:db8::{index}") is None
    assert not defender.is_banned("2001:db8::1")
