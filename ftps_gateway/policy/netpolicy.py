"""Network policy: client allowlists and the address advertised in 227 (PASV) replies.

Plain Python (no pyftpdlib import). Networks are parsed once, at construction, and
every check on a peer address fails closed: an address that does not parse matches
nothing and is allowed nowhere.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.errors import GatewayError
from ftps_gateway.policy.passivenames import PassiveNames, UnresolvedNameError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ftps_gateway.config import (
        IPNetwork,
        PassiveSettings,
        TLSSettings,
        UserSettings,
    )

__all__ = [
    "AccessList",
    "DataChannelPolicy",
    "IPAddress",
    "PassiveAddressError",
    "PassiveAddressPolicy",
    "TLSPolicyTable",
    "parse_ip",
    "parse_networks",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# ::ffff:0:0/96 (RFC 4291 section 2.5.5.2): how a dual-stack socket shows IPv4 peers.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
IPV6_BITS = 128
_IPV4_MAPPED_PREFIXLEN = 96

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens. The
# underscore is tolerated because internal DNS zones use it; anything else is a typo.
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


class PassiveAddressError(GatewayError):
    """No IPv4 address can be advertised for a passive connection.

    The handler answers 425 ("Can't open data connection") rather than advertise a
    wrong address: a wrong address makes the client wait for a connect timeout.
    """


def _unmap_network(network: IPNetwork) -> IPNetwork:
    """Turn ``::ffff:a.b.c.d/N`` (N >= 96) into the IPv4 network it stands for.

    ``parse_ip`` turns mapped peer addresses into IPv4 ones, so a mapped network left
    as IPv6 would silently never match.
    """
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= _IPV4_MAPPED_PREFIXLEN
        and network.subnet_of(_IPV4_MAPPED)
    ):
        ipv4 = network.network_address.ipv4_mapped
        if ipv4 is not None:
            return ipaddress.IPv4Network(
                (ipv4, network.prefixlen - _IPV4_MAPPED_PREFIXLEN)
            )
    return network


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings strictly; a bare address is a /32 (IPv4) or /128 (IPv6).

    Strict means host bits must be zero (``10.0.0.1/8`` is refused: it is usually a
    typo for ``10.0.0.0/8`` or ``10.0.0.1/32``, and guessing would widen access) and
    no zone id (``fe80::1%eth0``) is allowed, as a zone is not part of a network.
    IPv4-mapped IPv6 networks become IPv4 networks.

    Raises:
        ValueError: naming the first value that is not an IP network.
    """
    networks: list[IPNetwork] = []
    for value in values:
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError:
            raise ValueError(f"not an IP network: {value!r}") from None
        if "%" in value:
            raise ValueError(f"not an IP network (zone id not allowed): {value!r}")
        networks.append(_unmap_network(network))
    return tuple(networks)


def unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1`` (RFC 4291 2.5.5.2); others unchanged.

    A dual-stack socket shows IPv4 peers this way; every rule about IPv4 networks
    must see them as the IPv4 addresses they are.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def strip_mapped(ip: str) -> str:
    """``unmapped`` for an address string as sockets report it (no parsing: this
    runs for every audit line)."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


# Parsed addresses are immutable, and a session parses its own few again and again
# (four per 4 KiB upload: the passive holder, the 227 address; docs/decisions/0013).
PARSED_ADDRESSES_KEPT = 1024


@functools.lru_cache(maxsize=PARSED_ADDRESSES_KEPT)
def parse_ip(value: str) -> IPAddress | None:
    """Parse a peer address as the socket layer reports it; None if it does not parse.

    ``::ffff:10.1.2.3`` (an IPv4 peer on a dual-stack socket) becomes IPv4Address
    ``10.1.2.3`` so that IPv4 networks match it, and an IPv6 zone id (``fe80::1%eth0``)
    is dropped. Callers must treat None as "deny".
    """
    host, percent, _zone = value.partition("%")
    if percent and ":" not in host:
        return None  # zone ids exist only on IPv6 addresses
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return unmapped(address)


@functools.lru_cache(maxsize=PARSED_ADDRESSES_KEPT)
def address_key(ip: str, ipv6_prefix: int = 64) -> str:
    """The key bans, limits and queues count ``ip`` under.

    An IPv4 address is itself (IPv4-mapped spellings unwrapped). An IPv6 address
    counts as its ``/ipv6_prefix`` network: one subscriber gets a whole /64 (RFC 6177),
    so keying by the full address would let one attacker appear as 2**64 clients.
    A string that is no address keys as itself (callers deny it anyway).
    Kept like ``parse_ip``: six keys per session, each a ``str`` of an address.
    """
    address = parse_ip(ip)
    if address is None:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < IPV6_BITS:
        network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
        return str(network)
    return str(address)


def _contains(networks: tuple[IPNetwork, ...], address: IPAddress) -> IPNetwork | None:
    # ``in`` is False (not an error) when the IP versions differ.
    for network in networks:
        if address in network:
            return network
    return None


class AccessList:
    """The networks a user may log in from.

    An empty list allows every address, but an address that does not parse is
    refused even then. SFTPGo's ``IsLoginFromAddrAllowed`` allows a login when the
    peer address does not parse and re-parses its CIDR list on every login; this
    class does neither.
    """

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        """Keep ``networks`` (already parsed, e.g. by the config loader)."""
        self._networks = tuple(_unmap_network(network) for network in networks)

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> AccessList:
        """Build from CIDR strings (see ``parse_networks``)."""
        return cls(parse_networks(values))

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """The allowed networks; empty means any parsable address."""
        return self._networks

    def rule_for(self, ip: str) -> str:
        """Which entry admits ``ip``, for diagnostics: a network, "any", or "none"."""
        address = parse_ip(ip)
        if address is None:
            return "none"
        if not self._networks:
            return "any (no list)"
        network = _contains(self._networks, address)
        return str(network) if network is not None else "none"

    def is_allowed(self, ip: str) -> bool:
        """Return True if a client at ``ip`` may log in."""
        address = parse_ip(ip)
        if address is None:
            return False
        if not self._networks:
            return True
        return _contains(self._networks, address) is not None


@dataclass(frozen=True)
class _Target:
    """Where one rule sends clients: a literal IPv4 address, a DNS name, or local."""

    literal: str | None = None  # dotted IPv4
    name: str | None = None  # DNS name, resolved through the cache


def _target(address: str) -> _Target:
    """Classify a configured passive address; refuse what a 227 reply cannot carry."""
    if address == "":
        return _Target()
    ip = parse_ip(address)
    if ip is not None:
        if "%" in address:
            raise ValueError(f"passive address must not carry a zone id: {address!r}")
        if isinstance(ip, ipaddress.IPv6Address):
            # RFC 959's 227 reply has room for four IPv4 octets only.
            raise ValueError(f"passive address must be IPv4: {address!r}")
        if ip.is_unspecified:
            raise ValueError(f"passive address 0.0.0.0 is unreachable: {address!r}")
        return _Target(literal=str(ip))
    # A numeric last label (10.0.0.300) is a mistyped address, never a name (no
    # top-level domain is numeric, RFC 3696 section 2); as a name it would fail only
    # at the first PASV.
    last_label = address.removesuffix(".").rsplit(".", 1)[-1]
    if _HOSTNAME.fullmatch(address) is None or last_label.isdigit():
        raise ValueError(
            f"passive address is neither an IPv4 address nor a DNS name: {address!r}"
        )
    return _Target(name=address)


class PassiveAddressPolicy:
    """Pick the IPv4 address a 227 reply advertises, per client network.

    This is SFTPGo's ``PassiveIPOverrides``: clients behind the same NAT as the
    server are told its private address, everyone else the public one. (pyftpdlib's
    own ``masquerade_address_map`` is keyed by the server's local address, not the
    client's network, so it cannot express this.)

    DNS names are resolved by ``PassiveNames`` in threads of their own, started
    here for every name of the settings: the PASV path only reads the last answer
    and never waits for DNS (``policy.passivenames``).
    """

    def __init__(
        self, settings: PassiveSettings, *, names: PassiveNames | None = None
    ) -> None:
        """Parse the settings once; start looking up the DNS names among them.

        Args:
            settings: ``[passive]`` from the configuration.
            names: the server's cache of passive DNS names (kept across reloads);
                None: one of this policy's own.

        Raises:
            ValueError: an address is IPv6 or neither an IP address nor a DNS name.
        """
        self._default = _target(settings.address)
        self._overrides = tuple(
            (
                tuple(_unmap_network(network) for network in override.networks),
                _target(override.address),
            )
            for override in settings.overrides
        )
        self._names = names if names is not None else PassiveNames()
        targets = [self._default, *(target for _, target in self._overrides)]
        self._names.prefetch(t.name for t in targets if t.name is not None)

    @property
    def names(self) -> PassiveNames:
        """The cache its DNS names are looked up through."""
        return self._names

    def address_for(self, client_ip: str, local_ip: str) -> str:
        """Return the dotted IPv4 address to put in the 227 reply for this client.

        Args:
            client_ip: the client's address as the socket reports it. If it does not
                parse, no override matches and the default applies.
            local_ip: the server's end of the control connection, used where the
                configuration says "" (IPv4-mapped addresses are unmapped).

        Raises:
            PassiveAddressError: a DNS name never resolved, or the local address is
                needed but is not IPv4 (an IPv6 control connection: use EPSV).
        """
        _rule, target = self._match(client_ip)
        if target.literal is not None:
            return target.literal
        if target.name is not None:
            return self._resolve(target.name)
        local = parse_ip(local_ip)
        if not isinstance(local, ipaddress.IPv4Address):
            raise PassiveAddressError(
                f"local address {local_ip!r} is not IPv4; "
                "a 227 reply cannot carry it (set [passive] address)"
            )
        return str(local)

    def rule_for(self, client_ip: str) -> str:
        """Describe the rule that applies to ``client_ip``, for diagnostics.

        Returns:
            ``"override #N (NETWORK)"`` (1-based, with the network that matched) or
            ``"default"``.
        """
        rule, _target = self._match(client_ip)
        return rule

    def _match(self, client_ip: str) -> tuple[str, _Target]:
        address = parse_ip(client_ip)
        if address is not None:
            for index, (networks, target) in enumerate(self._overrides, start=1):
                network = _contains(networks, address)
                if network is not None:
                    return f"override #{index} ({network})", target
        return "default", self._default

    def _resolve(self, name: str) -> str:
        try:
            return self._names.address(name)
        except UnresolvedNameError as err:
            raise PassiveAddressError(f"passive address {name!r} {err}") from err


@dataclass(frozen=True)
class DataChannelPolicy:
    """What one session's data connections must satisfy, and its TLS ceiling.

    ``reuse`` is ``"required"`` (resume the control connection's own TLS session)
    or ``"ip-match"`` (the address check only); ``max_version`` is ``"1.2"`` or
    ``"1.3"``. ``source`` says which rule decided, for the audit log and SITE DIAG.
    """

    reuse: str
    max_version: str
    source: str = "default"


class TLSPolicyTable:
    """The TLS policy for a client network, then refined for the user who logs in.

    The network part is decided when the client connects, before any TLS: it caps
    the control connection's version. The user part is known only after login, so a
    user's ``max_version`` can only cap its data connections (and a data connection
    cannot resume a TLS 1.3 control session over TLS 1.2: ``conflict`` says so).
    """

    def __init__(self, settings: TLSSettings) -> None:
        """Parse ``[tls]`` and its overrides once."""
        self._default = DataChannelPolicy(settings.reuse, settings.max_version)
        self._overrides = tuple(
            (
                tuple(_unmap_network(network) for network in override.networks),
                override,
            )
            for override in settings.overrides
        )

    def for_client(self, client_ip: str) -> DataChannelPolicy:
        """The policy for a client at ``client_ip`` (first matching override wins)."""
        address = parse_ip(client_ip)
        if address is not None:
            for index, (networks, override) in enumerate(self._overrides, start=1):
                network = _contains(networks, address)
                if network is not None:
                    return DataChannelPolicy(
                        override.reuse or self._default.reuse,
                        override.max_version or self._default.max_version,
                        f"tls override #{index} ({network})",
                    )
        return self._default

    @staticmethod
    def for_user(network: DataChannelPolicy, user: UserSettings) -> DataChannelPolicy:
        """Refine the network's policy with the user's own settings, if any."""
        if user.reuse is None and user.max_version is None:
            return network
        max_version = network.max_version
        if user.max_version is not None:
            max_version = min(max_version, user.max_version)
        return DataChannelPolicy(
            user.reuse or network.reuse, max_version, f"user {user.name}"
        )
