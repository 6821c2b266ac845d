"""A seeded random driver on a real logged-in session: no crash, no desync, no traceback.

Each step sends one random command line (valid, invalid, odd bytes, over-long,
sometimes several pipelined in one write) followed by a ``NOOP`` marker, then reads
replies until the marker's 200. Exactly one final reply must come before it: a
server one reply behind, or one that closed the session, fails the step. The seed
is printed in the failure message; ``FTPS_FUZZ_STEPS`` (default 300) makes it longer,
``FTPS_FUZZ_SEED`` replays one run.
"""

from __future__ import annotations

import ftplib
import logging
import os
import random
import re
import time
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.ftp.control import MAX_COMMAND_BYTES
from support.control import exactly

if TYPE_CHECKING:
    import socket

    from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

COMMANDS = [
    "NOOP", "PWD", "CWD", "CDUP", "LIST", "NLST", "MLSD", "MLST", "STAT", "SIZE", "MDTM",
    "RETR", "STOR", "APPE", "DELE", "RMD", "MKD", "RNFR", "RNTO", "REST", "TYPE", "MODE",
    "STRU", "OPTS", "FEAT", "SYST", "HELP", "SITE", "SITE DIAG", "SITE CHMOD", "ALLO",
    "ABOR", "PBSZ", "PROT", "CCC", "AUTH", "USER", "PASS", "ACCT", "SMNT", "REIN",
    "PORT", "EPRT", "STOU", "MFMT", "XPWD", "XCWD", "XMKD", "XRMD", "HOST", "LANG",
    "CLNT", "AVBL", "XYZZY", "",
]  # fmt: skip
# Commands whose reply starts a data transfer wait for a data connection: the server
# answers 425 (no PASV) at once, which is what this driver wants to see.
ARGUMENTS = [
    "", "/", "..", "../../../../etc/passwd", "x", "in", "report.csv", "-la", "*",
    "/in/../..", "\u20ac.txt", "a b", "  ", "I", "A", "E", "UTF8 ON", "MLST type;size;",
    "0", "-1", "99999999999999999999", "P", "C", "TLS", "acme", "777 x",
    "20250101000000 x", "|1|127.0.0.1|1|", "127,0,0,1,1,1", "%s%n%x", "'\"`",
    "\\\\server\\share", ".ftps-upload-1-x",
]  # fmt: skip
ODD_BYTES = [b"\x00", b"\r", b"\n", b"\xff\xf4\xff\xf2", b"\xc3\x28", b"\x80", b"\t",
             b"\x1b[2J", b"\xef\xbb\xbf"]  # fmt: skip

_FINAL = re.compile(rb"^\d{3} ")
_MARKER = b"200 I successfully did nothing"


def random_line(rng: random.Random) -> bytes:
    """One command line, without its CRLF."""
    kind = rng.random()
    command = rng.choice(COMMANDS)
    if rng.random() < 0.3:
        command = command.lower()
    argument = rng.choice(ARGUMENTS) if rng.random() < 0.7 else ""
    line = (f"{command} {argument}" if argument else command).encode()
    if kind < 0.15:  # odd bytes somewhere
        at = rng.randrange(len(line) + 1)
        line = line[:at] + rng.choice(ODD_BYTES) + line[at:]
    elif kind < 0.2:  # at, just under or over the limit
        size = MAX_COMMAND_BYTES + rng.choice([-1, 0, 1, 2, 100, 20_000])
        line = (line + b" " + b"X" * size)[:size]
    elif kind < 0.25:
        line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        line = line.replace(b"\r\n", b"")
    return line


def read_reply(sock: socket.socket, pending: bytearray) -> bytes:
    """The next final reply line (multi-line replies skipped to their last line)."""
    deadline = time.monotonic() + 10
    while True:
        index = pending.find(b"\r\n")
        if index >= 0:
            line = bytes(pending[:index])
            del pending[: index + 2]
            if _FINAL.match(line):
                return line
            continue
        if time.monotonic() > deadline:
            raise TimeoutError("no reply within 10 s")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the session")
        pending += chunk


@pytest.mark.timeout(600)
def test_random_commands_keep_the_session_in_step(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Random command sequences: one final reply each, the NOOP marker right after."""
    caplog.set_level(logging.INFO)
    steps = int(os.environ.get("FTPS_FUZZ_STEPS", "300"))
    seed = int(os.environ.get("FTPS_FUZZ_SEED", str(random.randrange(2**32))))
    rng = random.Random(seed)
    home = gateway.home()
    (home / "in").mkdir(exist_ok=True)
    (home / "report.csv").write_text("x")
    ftp = gateway.client()
    try:
        run_steps(ftp.sock, rng, steps, seed)
        assert ftp.voidcmd("NOOP").startswith("200")
        ftp.quit()
    finally:
        ftp.close()
    assert_no_traceback(caplog.records)


def run_steps(sock: socket.socket, rng: random.Random, steps: int, seed: int) -> None:
    """Send ``steps`` random batches, each line followed by a NOOP marker."""
    pending = bytearray()
    history: list[bytes] = []
    for step in range(steps):
        batch = [random_line(rng) for _ in range(rng.choice([1, 1, 1, 2, 5]))]
        stream = b"".join(
            line + b"\r\nNOOP\r\n"
            for line in batch
            if not line.upper().startswith((b"QUIT", b"ABOR"))  # checked below
        )
        sent = [
            line for line in batch if not line.upper().startswith((b"QUIT", b"ABOR"))
        ]
        history.extend(sent)
        context = f"seed={seed} step={step} last={[h[:60] for h in history[-5:]]!r}"
        sock.sendall(stream)
        for line in sent:
            try:
                reply = read_reply(sock, pending)
                marker = read_reply(sock, pending)
            except (OSError, TimeoutError) as err:
                pytest.fail(f"session lost ({err}) after {line[:60]!r}; {context}")
            assert not reply.startswith(_MARKER) or line.upper().startswith(b"NOOP"), (
                f"no reply to {line[:60]!r} before the NOOP marker; {context}"
            )
            assert marker.startswith(_MARKER), (
                f"desynchronised after {line[:60]!r}: got {marker[:60]!r}; {context}"
            )


def assert_no_traceback(records: list[logging.LogRecord]) -> None:
    """No exception logged by the server, in any logger, during the run."""
    bad = [
        r
        for r in records
        if r.exc_info is not None
        or "Traceback" in r.getMessage()
        or "exception" in r.getMessage().lower()
        or r.levelno >= logging.ERROR
    ]
    assert not bad, [r.getMessage()[:500] for r in bad]


@pytest.mark.parametrize("size", [MAX_COMMAND_BYTES, MAX_COMMAND_BYTES + 1, 70_000])
def test_line_at_and_over_the_limit_gets_one_reply(
    gateway: RunningGateway, size: int
) -> None:
    """At the limit the line is read as a command; over it, one 500, then in step."""
    ftp = gateway.client()
    sock = ftp.sock
    pending = bytearray()
    line = "X" * (size - 4) + "DELE"
    sock.sendall(line.encode() + b"\r\nNOOP\r\n")
    reply = read_reply(sock, pending)
    expected = (
        replies.COMMAND_TOO_LONG
        if size > MAX_COMMAND_BYTES
        else replies.NOT_UNDERSTOOD.format(command=line)
    )
    assert reply.startswith(expected.encode())
    assert read_reply(sock, pending).startswith(_MARKER)
    ftp.quit()


def test_cr_lf_inside_a_line_are_refused_in_one_reply(
    gateway: RunningGateway,
) -> None:
    """A bare LF is not a line end: ``FOO\\nNOOP`` gets one 501, not a split 500."""
    ftp = gateway.client()
    sock = ftp.sock
    pending = bytearray()
    for line in (b"FOO\nNOOP", b"NOOP\rX", b"CWD a\r\x00b"):
        sock.sendall(line + b"\r\nNOOP\r\n")
        assert read_reply(sock, pending) == replies.CONTROL_CHARACTERS.encode()
        assert read_reply(sock, pending).startswith(_MARKER)
    ftp.quit()


def test_user_after_login_is_refused(gateway: RunningGateway) -> None:
    """Regression: USER after login logged the session out (no timer, limits miscounted)."""
    ftp = gateway.client()
    with pytest.raises(ftplib.error_perm, match=exactly(replies.ALREADY_LOGGED_IN)):
        ftp.sendcmd("USER acme")
    with pytest.raises(ftplib.error_perm, match=exactly(replies.ALREADY_AUTHENTICATED)):
        ftp.sendcmd("PASS x")
    assert ftp.pwd() == "/"  # still logged in, and counted once by the session limits
    assert gateway.server.state_admin.snapshot().per_user == {"acme": 1}
    ftp.quit()
