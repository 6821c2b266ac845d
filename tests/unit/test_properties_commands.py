"""Command framing as the control channel sees it: any bytes, any record split.

The channel is driven through asynchat's own ``handle_read`` with a stubbed
``recv``, so the test sees what the server does with every line: exactly one reply
per CRLF, whatever the bytes, the length or how TLS records cut them.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ftps_gateway.ftp.control import MAX_COMMAND_BYTES, ControlHandler
from ftps_gateway.ftp.replies import COMMAND_TOO_LONG, CONTROL_CHARACTERS

DISPATCHED = "200 dispatched"


class FramingHarness(ControlHandler):
    """A control channel without socket or session: lines in, replies out."""

    def __init__(self, chunks: list[bytes]) -> None:  # no super(): no socket
        self._chunks = chunks
        self._in_buffer: list[bytes] = []
        self._in_buffer_len = 0
        self._line_too_long = False
        self._idler = None
        self.ac_in_buffer = b""
        self.terminator = b"\r\n"
        self.replies: list[str] = []
        self.lines: list[str] = []

    def recv(self, buffer_size: int) -> bytes:
        return self._chunks.pop(0)

    def respond(self, resp: str, logfun: Any = None) -> None:
        self.replies.append(resp)

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        self.lines.append(line)
        self.replies.append(DISPATCHED)

    def feed_all(self) -> None:
        while self._chunks:
            self.handle_read()


# Odd bytes on purpose: CR and LF alone, NUL, Telnet IAC, invalid UTF-8, plain text.
_ODD = st.sampled_from([b"\r", b"\n", b"\x00", b"\xff\xf4", b"\xc3", b"\x80", b" "])
_TEXT = st.sampled_from(
    [b"NOOP", b"CWD ", b"../", b"RETR x", b"A" * 700, b"\xe2\x82\xac"]
)
LINES = (
    st.lists(st.one_of(_ODD, _TEXT, st.binary(max_size=40)), max_size=12)
    .map(b"".join)
    .filter(lambda line: b"\r\n" not in line)
)
# Some lines right at and just over the limit, where pyftpdlib's check sits.
EDGE = st.sampled_from(
    [MAX_COMMAND_BYTES - 1, MAX_COMMAND_BYTES, MAX_COMMAND_BYTES + 1]
)


def expected_reply(line: bytes) -> str:
    """The one reply the channel owes ``line``."""
    if len(line) > MAX_COMMAND_BYTES:
        return COMMAND_TOO_LONG
    if b"\r" in line or b"\n" in line:
        return CONTROL_CHARACTERS
    return DISPATCHED


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at the positions ``cuts`` (as TCP segments or TLS records cut it)."""
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(
    lines=st.lists(
        st.one_of(LINES, EDGE.map(lambda size: b"N" * size)), min_size=1, max_size=8
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10),
)
def test_every_line_gets_exactly_one_reply(lines: list[bytes], cuts: list[int]) -> None:
    """One reply per CRLF, in order: the right one for long, broken and normal lines."""
    stream = b"".join(line + b"\r\n" for line in lines)
    channel = FramingHarness(split(stream, cuts))
    channel.feed_all()
    assert [expected_reply(line) for line in lines] == channel.replies
    dispatched = [line for line in lines if expected_reply(line) == DISPATCHED]
    assert [line.decode("utf-8", "replace") for line in dispatched] == channel.lines


@given(
    head=st.integers(min_value=MAX_COMMAND_BYTES + 1, max_value=40_000),
    record=st.integers(min_value=1, max_value=16_384),
)
def test_tail_of_a_long_line_never_runs_as_a_command(head: int, record: int) -> None:
    """``DELE`` at the end of an over-long line is discarded with it, wherever it is cut."""
    stream = b"X" * head + b"DELE important.csv\r\nNOOP\r\n"
    chunks = [stream[i : i + record] for i in range(0, len(stream), record)]
    channel = FramingHarness(chunks)
    channel.feed_all()
    assert channel.replies == [COMMAND_TOO_LONG, DISPATCHED]
    assert channel.lines == ["NOOP"]


def test_pyftpdlib_alone_would_answer_a_long_line_twice() -> None:
    """The defect the override fixes: stock framing gives one long line two replies."""
    from pyftpdlib.handlers import FTPHandler

    class Stock(FramingHarness):
        collect_incoming_data = FTPHandler.collect_incoming_data
        found_terminator = FTPHandler.found_terminator

    channel = Stock([b"X" * (MAX_COMMAND_BYTES + 1) + b"\r\n"])
    channel.feed_all()
    assert len(channel.replies) == 2
