"""The xferlog line (``audit.xferlog_line``): one line per transfer, whatever the name."""

from __future__ import annotations

import pytest

from ftps_gateway.audit import RefusalDigest, Transfer, xferlog_line

FIELDS = 18  # the date is 5 space-separated words, then 13 fields


@pytest.mark.parametrize(
    "name",
    [
        "/a b.csv",
        "/forged\nFri Jan 01 00:00:00 2038 1 10.0.0.1 0 /x b _ o r root ftp 0 * c",
        "/nel\x85line",
        "/ls\u2028ps\u2029",
        "/invoice\u202efdp.exe",
        "/iso\u2066late\u2069",
        "/tab\tname",
    ],
)
def test_xferlog_line_is_one_line_of_fixed_fields(name: str) -> None:
    """Line breaks of any kind, bidi controls and blanks never reach the xferlog."""
    line = xferlog_line(
        Transfer(
            end=0,
            seconds=1,
            client_ip="127.0.0.1",
            nbytes=5,
            path=name,
            upload=True,
            user="acme",
            completed=True,
        )
    )
    assert len(line.splitlines()) == 1
    assert len(line.split(" ")) == FIELDS
    assert not any(
        0x202A <= ord(c) <= 0x202E or 0x2066 <= ord(c) <= 0x2069 for c in line
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_digest_writes_the_first_then_counts_per_interval() -> None:
    """Per (event, reason, address): one first line per interval, then a count."""
    clock = _Clock()
    digest = RefusalDigest(interval_seconds=60, max_addresses=10, clock=clock)
    firsts = [
        digest.first("connection_refused", "banned", "192.0.2.1") for _ in range(5)
    ]
    assert firsts == [True, False, False, False, False]
    assert digest.first("connection_refused", "not-allowed", "192.0.2.1")
    assert digest.take() == []  # the interval is not over
    clock.now = 61
    assert digest.take() == [
        {"event": "connection_refused_repeated", "reason": "banned",
         "address": "192.0.2.1", "count": 4, "seconds": 61}
    ]  # fmt: skip
    assert digest.first("connection_refused", "banned", "192.0.2.1")  # a new interval


def test_digest_bounds_the_lines_whatever_the_number_of_addresses() -> None:
    """Past max_addresses, refusals are only counted, under "other"."""
    digest = RefusalDigest(interval_seconds=60, max_addresses=3, clock=_Clock())
    written = sum(
        digest.first("data_refused", "foreign-ip", f"198.51.100.{n}")
        for n in range(200)
    )
    assert written == 3
    summaries = digest.take(force=True)
    assert summaries == [
        {"event": "data_refused_repeated", "reason": "foreign-ip", "address": "other",
         "count": 197, "seconds": 0}
    ]  # fmt: skip
