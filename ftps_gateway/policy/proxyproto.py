"""The PROXY protocol (HAProxy, versions 1 and 2), server side, control port only.

A load balancer that connects to the gateway from its own address hides the partner:
allowlists, bans, limits and the audit log would all see the balancer. With the
PROXY protocol it sends, before anything else, a header naming the real client. This
module only parses; the control handler decides whom to believe (configured
balancer addresses only) and reads exactly the header's bytes, never more, because
an implicit-TLS ClientHello may follow in the same segment.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ftps_gateway.errors import GatewayError
from ftps_gateway.policy.netpolicy import unmapped

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the specification's worst case, CRLF included
V2_HEADER_BYTES = 16
V2_MAX_BYTES = V2_HEADER_BYTES + 216  # addresses of AF_UNIX; TLVs may add, capped
V2_MAX_TLV_BYTES = 1024  # TLVs we skip; more is refused rather than buffered
MAX_HEADER_BYTES = max(V1_MAX_BYTES, V2_HEADER_BYTES + V2_MAX_TLV_BYTES + 216)

_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL (the balancer's own health check)
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21
_V2_ADDRESS_BYTES = {_V2_TCP4: 12, _V2_TCP6: 36}


class ProxyProtocolError(GatewayError):
    """The bytes are not a valid PROXY header (the connection is closed)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer says about the connection.

    ``client_ip`` is None for a LOCAL (v2) or UNKNOWN (v1) header: the balancer is
    speaking for itself (health checks), so its own address stands.
    """

    client_ip: str | None
    client_port: int | None = None
    length: int = 0  # bytes the header occupied


def header_length(data: bytes) -> int | None:
    """How many bytes the header at the start of ``data`` occupies.

    Returns None if more bytes are needed to tell.

    Raises:
        ProxyProtocolError: ``data`` cannot start a PROXY header.
    """
    if len(data) < len(V2_SIGNATURE) and V2_SIGNATURE.startswith(data):
        return None  # still possibly v2 (the signatures share no first byte)
    if data.startswith(V2_SIGNATURE):
        if len(data) < V2_HEADER_BYTES:
            return None
        length = int.from_bytes(data[14:16], "big")
        if length > MAX_HEADER_BYTES - V2_HEADER_BYTES:
            raise ProxyProtocolError("PROXY v2 header too long")
        return V2_HEADER_BYTES + length
    if len(data) < len(V1_PREFIX) and V1_PREFIX.startswith(data):
        return None
    if data.startswith(V1_PREFIX):
        end = data.find(b"\r\n", 0, V1_MAX_BYTES)
        if end >= 0:
            return end + 2
        if len(data) >= V1_MAX_BYTES:
            raise ProxyProtocolError("PROXY v1 header without CRLF in 107 bytes")
        return None
    raise ProxyProtocolError("no PROXY header where one is required")


def header_bytes_in(received: bytes, available: bytes) -> int:
    """How many of the ``available`` (peeked) bytes belong to the header.

    ``received`` is what was already consumed of it. Consuming exactly this many
    never swallows what follows the header, and always makes progress (no bytes
    left waiting that would wake a level-triggered poller again and again).

    Raises:
        ProxyProtocolError: the bytes cannot start a PROXY header.
    """
    length = header_length(received + available)
    if length is None:
        return len(available)  # all of it is (an incomplete) header
    return max(0, length - len(received))


def parse(header: bytes) -> ProxyHeader:
    """Parse a complete header (exactly ``header_length`` bytes).

    Raises:
        ProxyProtocolError: malformed header.
    """
    if header.startswith(V2_SIGNATURE):
        return _parse_v2(header)
    return _parse_v1(header)


def _parse_v1(header: bytes) -> ProxyHeader:
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 header is not ASCII") from None
    parts = text.removesuffix("\r\n").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":  # noqa: PLR2004
        return ProxyHeader(None, length=len(header))
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):  # noqa: PLR2004
        raise ProxyProtocolError("PROXY v1 header malformed")
    _, family, source, _destination, source_port, _destination_port = parts
    try:
        address = ipaddress.ip_address(source)
        port = int(source_port)
    except ValueError:
        raise ProxyProtocolError("PROXY v1 header has a bad address") from None
    if (address.version == 4) != (family == "TCP4") or not 0 <= port <= 65535:  # noqa: PLR2004
        raise ProxyProtocolError("PROXY v1 header has a bad address")
    return ProxyHeader(str(address), port, len(header))


def _parse_v2(header: bytes) -> ProxyHeader:
    command, family = header[12], header[13]
    if command == _V2_LOCAL:
        return ProxyHeader(None, length=len(header))
    if command != _V2_PROXY:
        raise ProxyProtocolError("PROXY v2 header with an unknown command")
    needed = _V2_ADDRESS_BYTES.get(family)
    if needed is None:
        # UNSPEC, UDP or UNIX: nothing a TCP client address can be taken from.
        raise ProxyProtocolError("PROXY v2 header without a TCP address")
    body = header[V2_HEADER_BYTES:]
    if len(body) < needed:
        raise ProxyProtocolError("PROXY v2 header shorter than its addresses")
    if family == _V2_TCP4:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
            body[0:4]
        )
        (port,) = struct.unpack("!H", body[8:10])
    else:
        address = ipaddress.IPv6Address(body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
    return ProxyHeader(str(unmapped(address)), port, len(header))


def v1_header(
    client_ip: str, client_port: int, server_ip: str, server_port: int
) -> bytes:
    """A v1 header, as a balancer would send it (for tests and the self-test)."""
    family = "TCP6" if ":" in client_ip else "TCP4"
    return (
        f"PROXY {family} {client_ip} {server_ip} {client_port} {server_port}\r\n"
    ).encode()


def v2_header(
    client_ip: str, client_port: int, server_ip: str, server_port: int
) -> bytes:
    """A v2 PROXY header for TCP over IPv4 or IPv6 (for tests)."""
    source, destination = (
        ipaddress.ip_address(client_ip),
        ipaddress.ip_address(server_ip),
    )
    family = _V2_TCP4 if source.version == 4 else _V2_TCP6  # noqa: PLR2004
    body = (
        source.packed
        + destination.packed
        + struct.pack("!HH", client_port, server_port)
    )
    return (
        V2_SIGNATURE + bytes([_V2_PROXY, family]) + struct.pack("!H", len(body)) + body
    )
