"""The xferlog line (``audit.xferlog_line``): one line per transfer, whatever the name."""

from __future__ import annotations

import pytest

from ftps_gateway.audit import Transfer, xferlog_line

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
