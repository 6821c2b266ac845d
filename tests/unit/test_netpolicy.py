"""Unit tests for ftps_gateway.netpolicy (no sockets, no DNS: fakes are injected)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.config import PassiveOverride, PassiveSettings
from ftps_gateway.errors import GatewayError
from ftps_gateway.policy.netpolicy import (
    AccessList,
    PassiveAddressError,
    PassiveAddressPolicy,
    address_key,
    parse_ip,
    parse_networks,
)
from ftps_gateway.policy.passivenames import PassiveNames, resolve_ipv4

if TYPE_CHECKING:
    from collections.abc import Callable

# --- parse_networks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),  # mapped network becomes IPv4
        ("::ffff:10.1.2.3", "10.1.2.3/32"),
    ],
)
def test_parse_networks_accepts(text: str, expected: str) -> None:
    """Valid CIDRs parse; bare addresses are host networks; mapped ones unmapped."""
    assert parse_networks([text]) == (ipaddress.ip_network(expected),)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1/8",  # host bits set
        "10.0.0.300/24",
        "10.0.0.0/33",
        "",
        "any",
        " 10.0.0.0/8",
        "fe80::1%eth0",
        "fe80::%eth0/64",
        "010.0.0.0/8",
    ],
)
def test_parse_networks_refuses(text: str) -> None:
    """Anything but a strict CIDR or plain address is an error naming the value."""
    with pytest.raises(ValueError, match="not an IP network") as excinfo:
        parse_networks(["10.0.0.0/8", text])
    assert repr(text) in str(excinfo.value)


def test_parse_networks_keeps_order() -> None:
    """The result is a tuple in input order (first match wins downstream)."""
    assert [str(n) for n in parse_networks(["192.168.0.0/16", "10.0.0.0/8"])] == [
        "192.168.0.0/16",
        "10.0.0.0/8",
    ]


# --- parse_ip ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("::ffff:10.1.2.3", ipaddress.IPv4Address("10.1.2.3")),
        ("::FFFF:127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
        ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
        ("fe80::1%3", ipaddress.IPv6Address("fe80::1")),
        ("::1", ipaddress.IPv6Address("::1")),
    ],
)
def test_parse_ip(text: str, expected: ipaddress.IPv4Address) -> None:
    """Peer addresses parse; mapped IPv6 becomes IPv4; zone ids are dropped."""
    assert parse_ip(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "localhost", "10.0.0.300", "10.0.0.1%eth0", "10.0.0.0/8", " 10.0.0.1", "::g"],
)
def test_parse_ip_unparsable_is_none(text: str) -> None:
    """Unparsable input gives None (callers deny)."""
    assert parse_ip(text) is None


def test_parse_ip_zone_is_stripped_not_kept() -> None:
    """The returned address carries no scope id."""
    address = parse_ip("fe80::1%eth0")
    assert isinstance(address, ipaddress.IPv6Address)
    assert address.scope_id is None


# --- AccessList ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "ip", "allowed"),
    [
        ([], "10.1.2.3", True),
        ([], "2001:db8::1", True),
        ([], "not-an-ip", False),  # fail closed even with no list
        ([], "", False),
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # dual-stack socket, IPv4 peer
        (["10.0.0.0/8"], "::ffff:11.1.2.3", False),
        (["10.0.0.0/8"], "2001:db8::1", False),
        (["10.0.0.0/8"], "10.0.0.300", False),
        (["10.0.0.0/8"], "garbage", False),
        (["2001:db8::/32"], "2001:db8::5", True),
        (["2001:db8::/32"], "fe80::1%eth0", False),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["10.0.0.0/8", "192.168.1.7"], "192.168.1.7", True),
        (["10.0.0.0/8", "192.168.1.7"], "192.168.1.8", False),
        (["::ffff:10.0.0.0/104"], "10.9.9.9", True),
    ],
)
def test_access_list(networks: list[str], ip: str, allowed: bool) -> None:
    """is_allowed: empty allows all parsable; unparsable is always refused."""
    assert AccessList.from_strings(networks).is_allowed(ip) is allowed


def test_access_list_from_parsed_networks() -> None:
    """The constructor takes networks already parsed by the config loader."""
    acl = AccessList((ipaddress.IPv4Network("10.0.0.0/8"),))
    assert acl.networks == (ipaddress.IPv4Network("10.0.0.0/8"),)
    assert acl.is_allowed("10.0.0.1")
    assert not acl.is_allowed("127.0.0.1")


def test_access_list_does_not_reparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Networks are parsed once, at construction, not per check."""
    acl = AccessList.from_strings(["10.0.0.0/8"])

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-parsed")

    monkeypatch.setattr(ipaddress, "ip_network", boom)
    assert acl.is_allowed("10.1.1.1")


# --- PassiveAddressPolicy --------------------------------------------------------


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """A resolver with a fixed answer table; records lookups; can be made to fail."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = dict(answers)
        self.calls: list[str] = []
        self.failing = False

    def __call__(self, name: str) -> str:
        self.calls.append(name)
        if self.failing or name not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[name]


def settings(address: str = "", *overrides: tuple[list[str], str]) -> PassiveSettings:
    return PassiveSettings(
        port_min=60000,
        port_max=60099,
        address=address,
        overrides=tuple(
            PassiveOverride(parse_networks(nets), addr) for nets, addr in overrides
        ),
    )


NAT = settings(
    "203.0.113.10",
    (["10.0.0.0/8"], "10.0.0.5"),
    (["192.168.0.0/16", "fd00::/8"], ""),
    (["172.16.0.0/12"], "nat.example.test"),
    (["10.1.0.0/16"], "10.1.0.1"),  # shadowed by override #1: first match wins
)

RESOLVER_ANSWERS = {"nat.example.test": "198.51.100.7", "ftp.example.test": "192.0.2.9"}


def run_now(job: Callable[[], None]) -> None:
    """Run a lookup at once, in the caller: these tests follow the cache's rules
    step by step (tests/unit/test_passivenames.py has the threads)."""
    job()


def make_policy(
    passive: PassiveSettings,
    resolver: FakeResolver | None = None,
    clock: FakeClock | None = None,
    ttl: float = 30.0,
) -> PassiveAddressPolicy:
    names = PassiveNames(
        resolver=resolver or FakeResolver(RESOLVER_ANSWERS),
        clock=clock or FakeClock(),
        ttl_seconds=ttl,
        run=run_now,
    )
    return PassiveAddressPolicy(passive, names=names)


@pytest.mark.parametrize(
    ("passive", "client_ip", "local_ip", "expected", "rule"),
    [
        (NAT, "10.2.3.4", "172.31.0.2", "10.0.0.5", "override #1 (10.0.0.0/8)"),
        (NAT, "10.1.2.3", "172.31.0.2", "10.0.0.5", "override #1 (10.0.0.0/8)"),
        (
            NAT,
            "::ffff:10.2.3.4",
            "::ffff:172.31.0.2",
            "10.0.0.5",
            "override #1 (10.0.0.0/8)",
        ),
        (
            NAT,
            "192.168.4.4",
            "172.31.0.2",
            "172.31.0.2",
            "override #2 (192.168.0.0/16)",
        ),
        (
            NAT,
            "192.168.4.4",
            "::ffff:127.0.0.1",
            "127.0.0.1",
            "override #2 (192.168.0.0/16)",
        ),
        (NAT, "fd00::1", "172.31.0.2", "172.31.0.2", "override #2 (fd00::/8)"),
        (
            NAT,
            "172.20.0.1",
            "172.31.0.2",
            "198.51.100.7",
            "override #3 (172.16.0.0/12)",
        ),
        (NAT, "8.8.8.8", "172.31.0.2", "203.0.113.10", "default"),
        (NAT, "2001:db8::1", "172.31.0.2", "203.0.113.10", "default"),
        (NAT, "garbage", "172.31.0.2", "203.0.113.10", "default"),
        (NAT, "", "172.31.0.2", "203.0.113.10", "default"),
        (settings(), "8.8.8.8", "172.31.0.2", "172.31.0.2", "default"),
        (settings(), "8.8.8.8", "::ffff:127.0.0.1", "127.0.0.1", "default"),
        (settings("ftp.example.test"), "8.8.8.8", "127.0.0.1", "192.0.2.9", "default"),
        (settings("::ffff:192.0.2.1"), "8.8.8.8", "127.0.0.1", "192.0.2.1", "default"),
        (
            settings("", (["::ffff:10.0.0.0/104"], "10.0.0.9")),
            "10.3.3.3",
            "127.0.0.1",
            "10.0.0.9",
            "override #1 (10.0.0.0/8)",
        ),
    ],
)
def test_address_for(
    passive: PassiveSettings, client_ip: str, local_ip: str, expected: str, rule: str
) -> None:
    """The first matching override wins; "" means the local address; else default."""
    policy = make_policy(passive)
    assert policy.address_for(client_ip, local_ip) == expected
    assert policy.rule_for(client_ip) == rule


@pytest.mark.parametrize("local_ip", ["::1", "2001:db8::2", "", "junk"])
def test_local_address_must_be_ipv4(local_ip: str) -> None:
    """A non-IPv4 local address cannot go into a 227 reply: PassiveAddressError."""
    with pytest.raises(PassiveAddressError, match="not IPv4"):
        make_policy(settings()).address_for("8.8.8.8", local_ip)


def test_local_address_ignored_when_configured() -> None:
    """With a configured address, an IPv6 control connection still gets it."""
    assert make_policy(settings("203.0.113.1")).address_for("::1", "::1") == (
        "203.0.113.1"
    )


@pytest.mark.parametrize(
    "address",
    [
        "2001:db8::1",
        "fe80::1%eth0",
        "0.0.0.0",
        "10.0.0.300",
        "10.1",
        "bad name",
        "-bad.example",
        "a..b",
        "x" * 64 + ".example",
    ],
)
def test_unusable_configured_address_is_refused(address: str) -> None:
    """Addresses a 227 reply cannot carry are refused when the policy is built."""
    with pytest.raises(ValueError, match="passive address"):
        make_policy(settings(address))
    with pytest.raises(ValueError, match="passive address"):
        make_policy(settings("", (["10.0.0.0/8"], address)))


def test_passive_address_error_is_gateway_error() -> None:
    """PassiveAddressError is one of ours (the handler maps it to 425)."""
    assert issubclass(PassiveAddressError, GatewayError)


def test_dns_cache_hit() -> None:
    """Within the TTL a DNS name is resolved once (when the policy is built)."""
    resolver, clock = FakeResolver(RESOLVER_ANSWERS), FakeClock()
    policy = make_policy(settings("ftp.example.test"), resolver, clock)
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    clock.now += 29.9
    assert policy.address_for("8.8.4.4", "127.0.0.1") == "192.0.2.9"
    assert resolver.calls == ["ftp.example.test"]


def test_dns_cache_expiry_picks_up_new_address() -> None:
    """After the TTL the name is resolved again and a changed address is used."""
    resolver, clock = FakeResolver(RESOLVER_ANSWERS), FakeClock()
    policy = make_policy(settings("ftp.example.test"), resolver, clock)
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    resolver.answers["ftp.example.test"] = "192.0.2.10"
    clock.now += 30.0
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.10"
    assert resolver.calls == ["ftp.example.test", "ftp.example.test"]


def test_dns_ttl_is_injectable() -> None:
    """dns_ttl_seconds sets the cache lifetime."""
    resolver, clock = FakeResolver(RESOLVER_ANSWERS), FakeClock()
    policy = make_policy(settings("ftp.example.test"), resolver, clock, ttl=5)
    policy.address_for("8.8.8.8", "127.0.0.1")
    clock.now += 5
    policy.address_for("8.8.8.8", "127.0.0.1")
    assert len(resolver.calls) == 2


def test_dns_failure_falls_back_to_last_good(caplog: pytest.LogCaptureFixture) -> None:
    """A failed re-resolution reuses the last good address (and says so), then
    retries only after another TTL."""
    resolver, clock = FakeResolver(RESOLVER_ANSWERS), FakeClock()
    policy = make_policy(settings("ftp.example.test"), resolver, clock)
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    resolver.failing = True
    clock.now += 31
    with caplog.at_level(logging.WARNING):
        assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    assert "reusing 192.0.2.9" in caplog.text
    clock.now += 10
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    assert len(resolver.calls) == 2  # no DNS storm while the resolver is down
    resolver.failing = False
    resolver.answers["ftp.example.test"] = "192.0.2.77"
    clock.now += 30
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.77"


def test_dns_failure_without_last_good_raises() -> None:
    """A name that never resolved raises PassiveAddressError (the handler says 425)."""
    resolver = FakeResolver({})
    policy = make_policy(settings("ftp.example.test"), resolver)
    assert len(resolver.calls) == 1  # looked up when the policy was built
    with pytest.raises(PassiveAddressError, match="does not resolve"):
        policy.address_for("8.8.8.8", "127.0.0.1")
    with pytest.raises(PassiveAddressError):
        policy.address_for("8.8.8.8", "127.0.0.1")
    assert len(resolver.calls) == 3  # failures are not cached: each PASV retries


@pytest.mark.parametrize("answer", ["2001:db8::1", "not-an-address", ""])
def test_resolver_answer_must_be_ipv4(answer: str) -> None:
    """A resolver answer that is not IPv4 counts as a failed lookup."""
    resolver = FakeResolver({"ftp.example.test": answer})
    policy = make_policy(settings("ftp.example.test"), resolver)
    with pytest.raises(PassiveAddressError):
        policy.address_for("8.8.8.8", "127.0.0.1")


def test_override_name_is_cached_separately() -> None:
    """Each DNS name has its own cache entry."""
    resolver = FakeResolver(RESOLVER_ANSWERS)
    policy = make_policy(
        settings("ftp.example.test", (["10.0.0.0/8"], "nat.example.test")), resolver
    )
    assert policy.address_for("10.0.0.1", "127.0.0.1") == "198.51.100.7"
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    assert policy.address_for("10.0.0.2", "127.0.0.1") == "198.51.100.7"
    assert sorted(resolver.calls) == ["ftp.example.test", "nat.example.test"]


def test_literal_addresses_never_resolve() -> None:
    """IP literals and "" never reach the resolver (NAT's one name, of override
    #3, is looked up once, when the policy is built)."""
    resolver = FakeResolver({})
    policy = make_policy(NAT, resolver)
    for client in ("10.0.0.1", "192.168.0.1", "8.8.8.8"):
        policy.address_for(client, "127.0.0.1")
    assert resolver.calls == ["nat.example.test"]


def test_default_resolver_returns_ipv4() -> None:
    """The real resolver asks getaddrinfo for IPv4 only (localhost: /etc/hosts)."""
    assert resolve_ipv4("localhost") == "127.0.0.1"


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::9", 56, "2001:db8:1::/56"),
        ("2001:db8::1", 128, "2001:db8::1"),
        ("not-an-ip", 64, "not-an-ip"),
    ],
)
def test_address_key_groups_an_ipv6_subscriber(ip: str, prefix: int, key: str) -> None:
    """IPv6 addresses count as their prefix; IPv4 ones as themselves."""
    assert address_key(ip, prefix) == key
