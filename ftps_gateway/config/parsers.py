"""Value parsers: a string in, a value out, or ``BadValueError(problem)``.

The checks shared by the sections (``loader``) and the accounts (``users``):
listeners, port ranges, advertised addresses, networks, names, paths, choices; and
``unique_networks``, the network-array reader both of them use.

May import: ``config.model``, ``config.values``; nothing else in the package.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from ftps_gateway.config.model import (
    MAX_BANNER_CHARS,
    MAX_HOSTNAME_CHARS,
    MAX_PASSIVE_PORTS,
    PASSIVE_PORT_MIN,
    PORT_MAX,
    ListenAddress,
)
from ftps_gateway.config.values import BadValueError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from ftps_gateway.config.model import IPNetwork
    from ftps_gateway.config.values import Table

_PORT = re.compile(r"[0-9]{1,5}")
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123


def parse_listen(text: str) -> ListenAddress:
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
    else:
        host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise BadValueError("not IP:PORT or [IPv6]:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadValueError(
            "host is not an IP address (names are not resolved)"
        ) from None
    if (ip.version == 6) != text.startswith("["):  # noqa: PLR2004
        raise BadValueError("an IPv6 address needs brackets, IPv4 must not have them")
    if not _PORT.fullmatch(port) or not 0 <= int(port) <= PORT_MAX:
        raise BadValueError(f"port must be 0 to {PORT_MAX} (0: any free port)")
    return ListenAddress(str(ip), int(port))


def parse_optional_listen(text: str) -> ListenAddress | None:
    """``IP:PORT`` as for ``server.listen``; "" means "off"."""
    return parse_listen(text) if text else None


def parse_port_range(text: str) -> tuple[int, int]:
    match = _PORT_RANGE.fullmatch(text)
    if match is None:
        raise BadValueError("not a START-END port range")
    start, end = int(match[1]), int(match[2])
    if start < PASSIVE_PORT_MIN or end > PORT_MAX:
        raise BadValueError(f"ports must be {PASSIVE_PORT_MIN} to {PORT_MAX}")
    if start > end:
        raise BadValueError("inverted range, start above end")
    if end - start + 1 > MAX_PASSIVE_PORTS:
        raise BadValueError(f"more than {MAX_PASSIVE_PORTS} ports")
    return start, end


def parse_advertised(text: str) -> str:
    """An address for 227 replies: IPv4, a DNS name, or "" for the local address."""
    if not text or _is_hostname(text):
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise BadValueError("not an IPv4 address or DNS hostname") from None
    # PASV's 227 reply has room for four octets only (RFC 959); EPSV sends no address.
    if ip.version == 6:  # noqa: PLR2004
        raise BadValueError("a PASV reply can only advertise an IPv4 address")
    if ip.is_unspecified:
        raise BadValueError(
            'not an address a client can reach; "" means the local address'
        )
    return text


def _is_hostname(text: str) -> bool:
    name = text.removesuffix(".")
    labels = name.split(".")
    return (
        len(name) <= MAX_HOSTNAME_CHARS
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        # An all-digit last label is a mistyped IPv4 address (10.0.0.300), never a
        # name: no top-level domain is numeric (RFC 3696 section 2).
        and not labels[-1].isdigit()
    )


def parse_network(text: str) -> IPNetwork:
    if "%" in text:  # ipaddress accepts fe80::%eth0/64, but a network has no zone
        raise BadValueError("a network cannot carry a zone id (%...)")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise BadValueError(
            "not an IP network (CIDR like 10.0.0.0/8, or one IP)"
        ) from None
    # strict=False would quietly turn 10.0.0.1/8 into 10.0.0.0/8; say so instead,
    # since the operator may have meant 10.0.0.1/32.
    if ipaddress.ip_interface(text).ip != network.network_address:
        raise BadValueError(f"host bits set; the network would be {network}")
    return network


def parse_node_name(text: str) -> str:
    if text == "":
        return text  # the documented default: the host name
    if not _NODE_NAME.fullmatch(text):
        raise BadValueError("must be 1 to 63 of A-Z a-z 0-9 . _ -")
    return text


def parse_banner(text: str) -> str:
    if not 1 <= len(text) <= MAX_BANNER_CHARS:
        raise BadValueError(f"must be 1 to {MAX_BANNER_CHARS} characters")
    if "\r" in text or "\n" in text:
        raise BadValueError("must be one line (a line break would end the 220 reply)")
    return text


def path_under(base: Path) -> Callable[[str], Path]:
    """A parser for a path; relative ones are taken from the config file's directory."""

    def parse(text: str) -> Path:
        if not text:
            raise BadValueError("must not be empty")
        if "\x00" in text:  # no file has such a name; os calls raise ValueError
            raise BadValueError("must not contain a NUL character")
        return base / text

    return parse


def optional_path_under(base: Path) -> Callable[[str], Path | None]:
    """Like ``path_under``, but "" means "not set" (the key's default)."""
    parse = path_under(base)

    def parse_optional(text: str) -> Path | None:
        return parse(text) if text else None

    return parse_optional


def one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise BadValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def unique_networks(
    table: Table, name: str, first: dict[IPNetwork, str], *, required: bool
) -> tuple[IPNetwork, ...]:
    """An array of networks; the very same network twice is a copy-paste slip.

    Overlapping networks are fine (first match wins, so a /24 can carve an exception
    out of a /8 listed later). ``first`` spans the arrays that must not repeat.
    """
    networks: list[IPNetwork] = []
    for entry in table.strings(name, parse_network, required=required):
        if entry.value in first:
            problem = f"network listed twice, first at {first[entry.value]}"
            table.problems.add(entry.key, problem, entry.text)
        else:
            first[entry.value] = entry.key
            networks.append(entry.value)
    return tuple(networks)
