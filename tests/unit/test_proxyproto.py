"""PROXY protocol v1 and v2 parsing, including every way a header can be wrong."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftps_gateway.policy import proxyproto
from ftps_gateway.policy.proxyproto import ProxyHeader, ProxyProtocolError

V1 = b"PROXY TCP4 198.51.100.7 10.0.0.5 40123 21\r\n"


def _read(data: bytes) -> tuple[ProxyHeader, bytes]:
    """Feed ``data`` byte by byte as a socket would; return header and the rest."""
    for size in range(len(data) + 1):
        length = proxyproto.header_length(data[:size])
        if length is not None:
            assert length <= len(data)
            return proxyproto.parse(data[:length]), data[length:]
    raise AssertionError("header never complete")


def test_v1_tcp4_and_what_follows_is_untouched() -> None:
    header, rest = _read(V1 + b"\x16\x03\x01")
    assert header == ProxyHeader("198.51.100.7", 40123, len(V1))
    assert rest == b"\x16\x03\x01"


def test_v1_tcp6_and_unknown() -> None:
    v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40123 21\r\n"
    assert _read(v6)[0].client_ip == "2001:db8::7"
    assert _read(b"PROXY UNKNOWN\r\n")[0].client_ip is None


def test_v2_tcp4_tcp6_and_local() -> None:
    header = proxyproto.v2_header("203.0.113.9", 5000, "10.0.0.5", 21)
    parsed, rest = _read(header + b"USER x\r\n")
    assert (parsed.client_ip, parsed.client_port) == ("203.0.113.9", 5000)
    assert rest == b"USER x\r\n"
    assert _read(proxyproto.v2_header("2001:db8::9", 1, "2001:db8::1", 21))[
        0
    ].client_ip == ("2001:db8::9")
    local = proxyproto.V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    assert _read(local)[0].client_ip is None


def test_v2_with_tlvs_skips_them() -> None:
    base = proxyproto.v2_header("203.0.113.9", 5000, "10.0.0.5", 21)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    body = base[16:] + tlv
    header = base[:14] + struct.pack("!H", len(body)) + body
    assert _read(header)[0].client_ip == "203.0.113.9"


@pytest.mark.parametrize(
    "data",
    [
        b"USER acme\r\n",
        b"\x16\x03\x01\x00\xa5",  # a TLS ClientHello without a header
        b"PROXY TCP4 198.51.100.7\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.5 1 21\r\n",
        b"PROXY TCP4 198.51.100.7 10.0.0.5 99999 21\r\n",
        b"PROXY TCP5 198.51.100.7 10.0.0.5 1 21\r\n",
        b"PROXY TCP4 " + b"1" * 120,
        b"PROXY \xff\xfe 1 2 3 4\r\n",
    ],
)
def test_bad_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        length = proxyproto.header_length(data)
        if length is None:
            raise ProxyProtocolError("incomplete")  # the caller's timeout
        proxyproto.parse(data[:length])


def test_v2_refusals() -> None:
    sig = proxyproto.V2_SIGNATURE
    with pytest.raises(ProxyProtocolError, match="too long"):
        proxyproto.header_length(sig + bytes([0x21, 0x11]) + struct.pack("!H", 60000))
    with pytest.raises(ProxyProtocolError, match="unknown command"):
        proxyproto.parse(sig + bytes([0x2F, 0x11]) + struct.pack("!H", 0))
    with pytest.raises(ProxyProtocolError, match="without a TCP address"):
        proxyproto.parse(sig + bytes([0x21, 0x12]) + struct.pack("!H", 0))  # UDP
    with pytest.raises(ProxyProtocolError, match="shorter"):
        proxyproto.parse(sig + bytes([0x21, 0x11]) + struct.pack("!H", 4) + b"\0" * 4)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        length = proxyproto.header_length(data)
        if length is not None and length <= len(data):
            proxyproto.parse(data[:length])
    except ProxyProtocolError:
        pass
