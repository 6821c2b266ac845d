"""Issue 13: a dropbox partner never learns what the other partners delivered.

The attacker is a logged-in partner whose group mounts ``/drop`` as a dropbox
(upload only: no ``list``, no ``download``) and ``/reports/inbox`` as an upload-only
folder nested in a readable mount. Other partners' files already sit in both. Every
route a partner can type (every listing and status verb, pyftpdlib's rewrite of
unknown verbs ending in STAT, ``SITE XSTAT``, LIST/NLST dash arguments, ``//``,
``/./``, ``/.``, ``..`` spellings, relative paths after ``CWD``, globs, recursive
flags) is sent on a real FTPS session; the data connection of each is opened with
PASV/EPSV and a resumed TLS session, and everything on both channels is searched
for the names, sizes and dates of those files.

Why each route is here (pyftpdlib 2.2, ``handlers/ftp/control.py``):

- ``pre_process_command`` maps any verb it does not know whose last four letters are
  STAT, ABOR or QUIT to that verb (``XSTAT``, ``FOOSTAT``, ``xstat``), after turning
  ``SITE X`` into the verb ``SITE X`` (``SITE XSTAT``, ``SITE STAT``): a gate that
  judges the command text sees verbs it does not check.
- LIST treats only ``-a``, ``-l``, ``-al``, ``-la`` as flags (the cwd); any other
  argument, dashes included (``-x/../drop``), is a path that ``ftp2fs`` normalizes.
- STAT with an argument is a directory listing on the control channel; MLST is a
  fact line on the control channel; LIST, NLST and MLSD use the data channel.
- SIZE and MDTM must not tell a file inside from a missing one.

A fix that blocks everything fails here too: uploading into the dropbox and listing
the readable mount (and the home) must keep working, and every probe must be
answered on a session that stays usable. The property test at the end generates
verb/argument combinations on one session.

Only the partner's side lives here: the stdlib client the partners are told to use
(``selftest.client.ReusingFTP_TLS``), pyftpdlib's command table (the verbs a
partner can try) and the reply texts a partner reads, by their names in
``ftp.replies``; no server internals are imported.
"""

from __future__ import annotations

import calendar
import ftplib
import io
import os
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyftpdlib.handlers import FTPHandler

from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.control import exactly
from support.credentials import PASSWORD_HASH
from support.gateway import RunningGateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

StartGateway = Callable[..., RunningGateway]

TREE = """
[[groups]]
name = "partners"
[[groups.mounts]]
path = "/drop"
source = "shared/drop"
permissions = "dropbox"
[[groups.mounts]]
path = "/reports"
source = "shared/reports"
permissions = "read"
[[groups.mounts]]
path = "/reports/inbox"
source = "shared/inbox"
permissions = ["upload"]

[[users]]
name = "acme"
password = "HASH"
groups = ["partners"]
home_permissions = "read"
""".replace("HASH", PASSWORD_HASH)
# The home is read-only so that the generated commands cannot create, in a place the
# partner may list, a file that carries one of the secret names below: only the two
# upload-only folders accept anything, and nothing in them may ever be listed.

# Other partners' deliveries: relative path in a dropbox source -> size in bytes.
# Sizes and the date are distinctive so that a listing line gives itself away even
# where a name might be cut off.
DROP_FILES = {
    "secret-alpha.csv": 314159,
    "partner-gamma-invoice.pdf": 271828,
    "sub/secret-beta.txt": 161803,
    "hidden-delta/secret-epsilon.xml": 141421,
}
INBOX_FILES = {"nested-theta.csv": 173205}
SECRET_NAMES = frozenset(
    part
    for relative in (*DROP_FILES, *INBOX_FILES)
    for part in relative.split("/")
)  # fmt: skip
SECRET_MTIME = calendar.timegm((1999, 2, 3, 12, 0, 0))
SECRET_FACTS = (
    *(str(size) for size in (*DROP_FILES.values(), *INBOX_FILES.values())),
    "19990203",  # MLSD/MLST modify=, MDTM
    "Feb 03  1999",  # LIST and STAT lines (older than six months: the year)
)
_NAME_PATTERNS = {
    name: re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])")
    for name in SECRET_NAMES
}
# Files the partner may see: in its home and in the readable mount.
HOME_FILE = "home-note.txt"
REPORT_FILE = "q1-public.csv"
REPORT_BYTES = b"public figures\n"

UPLOAD_VERBS = frozenset({"STOR", "APPE", "STOU"})
REFUSED = "5"  # the reply class a refusal must have (550 Permission denied.)


@pytest.fixture
def dropbox(start_gateway: StartGateway) -> RunningGateway:
    """A gateway whose user acme has /drop and /reports/inbox (upload only, both
    holding other partners' files), /reports (read) and a read-only home."""
    gw = start_gateway(users=TREE)
    shared = gw.root / "shared"
    _deliver(shared / "drop", DROP_FILES)
    _deliver(shared / "inbox", INBOX_FILES)
    (shared / "reports").mkdir(parents=True)
    (shared / "reports" / REPORT_FILE).write_bytes(REPORT_BYTES)
    gw.home().mkdir(parents=True, exist_ok=True)
    (gw.home() / HOME_FILE).write_bytes(b"mine\n")
    return gw


def _deliver(source: Path, files: dict[str, int]) -> None:
    """Write ``files`` under ``source``, all dated SECRET_MTIME (folders too)."""
    for relative, size in files.items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    for path in sorted(source.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, (SECRET_MTIME, SECRET_MTIME))


def leaked(text: str, typed: str = "") -> list[str]:
    """Secret names (except those the partner typed itself) and secret sizes or
    dates found in ``text``."""
    names = [
        name
        for name, pattern in sorted(_NAME_PATTERNS.items())
        if name not in typed and pattern.search(text)
    ]
    return names + [fact for fact in SECRET_FACTS if fact in text]


# --- one probe: a command with a data connection ready, everything collected ------


@dataclass
class Exchange:
    """What one command line brought back, on both channels."""

    line: str
    cwd: str = "/"
    replies: list[str] = field(default_factory=list)
    data: bytes = b""
    closed: bool = False  # the server closed the control connection
    problem: str = ""  # no reply, or the data connection failed

    @property
    def control(self) -> str:
        """Every reply line, in order."""
        return "\n".join(self.replies)

    @property
    def final(self) -> str:
        """The last (final) reply, "" if none came."""
        return self.replies[-1] if self.replies else ""

    def leaks(self) -> list[str]:
        """Secrets on the control channel (beyond what the partner typed: the line and
        the working directory it changed to) or on the data channel."""
        typed = f"{self.cwd} {self.line}"
        return [f"control:{s}" for s in leaked(self.control, typed)] + [
            f"data:{s}" for s in leaked(self.data.decode("utf-8", "replace"))
        ]

    def evidence(self) -> str:
        """The exchange, cut short, for a failure message."""
        data = self.data.decode("utf-8", "replace")
        return (
            f"{self.line!r} -> {self.control[:400]!r}"
            + (f" data={data[:400]!r}" if data else "")
            + (f" problem={self.problem}" if self.problem else "")
        )


def probe(ftp: ftplib.FTP_TLS, line: str) -> Exchange:
    """Send ``line`` with a passive data connection arranged (EPSV, so that a
    generated ``EPSV ALL`` does not break the harness), as a client would: connect
    and resume the control connection's TLS session only after a 1xx reply, then
    read (or for uploads send) the data and the final reply."""
    exchange = Exchange(line)
    assert ftp.sock is not None
    port = ftplib.parse229(ftp.sendcmd("EPSV"), ftp.sock.getpeername())[1]
    try:
        ftp.putcmd(line)
        exchange.replies.append(ftp.getmultiline())
        if exchange.final.startswith("1"):
            exchange.data = _transfer(ftp, port, upload=_verb(line) in UPLOAD_VERBS)
            exchange.replies.append(ftp.getmultiline())
    except EOFError:
        exchange.closed = True
    except (OSError, ftplib.Error) as err:  # a timeout: the server did not answer
        exchange.problem = f"{type(err).__name__}: {err}"
    return exchange


def _verb(line: str) -> str:
    return line.split(" ", maxsplit=1)[0].upper()


def _transfer(ftp: ftplib.FTP_TLS, port: int, *, upload: bool) -> bytes:
    """The data connection of one transfer, TLS resumed from the control session."""
    assert isinstance(ftp.sock, ssl.SSLSocket)
    raw = socket.create_connection((ftp.host, port), timeout=10)
    conn = ftp.context.wrap_socket(
        raw, server_hostname=ftp.host, session=ftp.sock.session
    )
    received = bytearray()
    with conn:
        if upload:
            conn.sendall(b"probe upload\n")
        else:
            while chunk := conn.recv(65536):
                received += chunk
        conn.unwrap()
    return bytes(received)


class Session:
    """One logged-in session for many probes; reconnects after the server closed it."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.ftp: ReusingFTP_TLS | None = None

    def get(self) -> ReusingFTP_TLS:
        """The open session (a new one if the last was closed)."""
        if self.ftp is None:
            self.ftp = self.gw.client()
        return self.ftp

    def drop(self) -> None:
        """Forget a session the server closed."""
        if self.ftp is not None:
            self.ftp.close()
        self.ftp = None

    def close(self) -> None:
        """QUIT if still open."""
        if self.ftp is not None:
            try:
                self.ftp.quit()
            except (OSError, EOFError, ftplib.Error):
                self.ftp.close()
        self.ftp = None


def run_probe(session: Session, cwd: str, line: str) -> tuple[Exchange, list[str]]:
    """CWD to ``cwd``, probe ``line``, then check the session with NOOP.

    Returns the exchange and what went wrong beyond leaks: no reply, a session
    closed without a 221/421 goodbye, or a session that no longer answers NOOP.
    """
    ftp = session.get()
    ftp.cwd(cwd)
    ftp.voidcmd("TYPE I")  # SIZE answers only in binary mode
    exchange = probe(ftp, line)
    exchange.cwd = cwd
    problems = []
    if exchange.problem:
        problems.append(f"not answered ({exchange.problem})")
    elif not exchange.final[:3].isdigit():
        problems.append("no final reply")
    if exchange.closed:
        if not exchange.final.startswith(("221", "421")):
            problems.append("session closed without a goodbye")
        session.drop()
        return exchange, problems
    try:
        noop = ftp.voidcmd("NOOP")
        if not noop.startswith("200"):
            problems.append(f"NOOP afterwards: {noop}")
    except (OSError, EOFError, ftplib.Error) as err:
        session.drop()
        if isinstance(err, EOFError) and exchange.final.startswith(("221", "421")):
            exchange.closed = True  # a goodbye, then the close: not a fault here
        else:
            problems.append(f"session unusable afterwards: {err!r}")
    return exchange, problems


# --- the routes ------------------------------------------------------------------

# Verbs that list or describe a path, as pyftpdlib runs them (unknown *STAT verbs and
# SITE *STAT become STAT). Each must refuse the dropbox and everything in it.
LISTING_VERBS = ["LIST", "NLST", "MLSD", "MLST", "STAT", "XSTAT", "xstat",
                 "SITE XSTAT", "SITE STAT", "FOOSTAT"]  # fmt: skip
# The dropbox, spelled every way the path rules collapse to /drop (from cwd "/").
DROP_SPELLINGS = ["/drop", "//drop", "/./drop", "/drop/.", "/drop/", "/drop//",
                  "/drop/sub/..", "/x/../drop", "/drop/../drop", "drop", "./drop",
                  "drop/.", "/drop/./sub/..", "/drop/hidden-delta/.."]  # fmt: skip

DASH_ARGUMENTS = ["-x/../drop", "-/../drop", "-la/../drop", "-a/../drop/sub",
                  "-la /drop", "-al /drop", "-l /drop/sub", "-R /drop", "-lR /drop",
                  "-x/../drop/secret-alpha.csv", "-la //drop", "-la drop"]  # fmt: skip
INSIDE_DROP = ["/drop/secret-alpha.csv", "/drop/sub", "/drop/sub/secret-beta.txt",
               "/drop/sub/", "//drop/sub", "/drop/./sub", "drop/sub/."]  # fmt: skip
GLOBS = ["/drop/*", "/drop/secret*", "/drop/*.csv", "/drop/s?b", "drop/*",
         "/drop/[a-z]*", "/drop/sub/*"]  # fmt: skip
# Relative routes: what a partner types once CWD put it inside a dropbox.
IN_DROP = ["LIST", "LIST .", "LIST -a", "LIST -l", "LIST -la", "LIST -al", "LIST -R",
           "LIST -lR", "LIST -x", "NLST", "NLST .", "NLST -a", "NLST -la", "MLSD",
           "MLSD .", "MLST .", "STAT .", "XSTAT .", "SITE XSTAT .", "FOOSTAT .",
           "LIST sub", "STAT sub", "XSTAT sub", "LIST ../drop", "XSTAT ../drop",
           "LIST -x/..", "MLST secret-alpha.csv", "STAT secret-alpha.csv",
           "XSTAT secret-alpha.csv", "NLST secret-alpha.csv", "LIST *", "NLST *",
           "STAT *", "XSTAT *"]  # fmt: skip
IN_DROP_SUB = ["LIST", "NLST", "MLSD", "XSTAT .", "LIST -la", "LIST ..", "XSTAT ..",
               "LIST -x/.."]  # fmt: skip
# Routes from "/" that do not name a dropbox (recursion, bare flags, the root
# itself, status without argument): any reply, but nothing from a dropbox in it.
ELSEWHERE = ["LIST -R", "LIST -R /", "LIST -lR", "LIST -lR /", "LIST -a", "LIST -la",
             "NLST -R", "NLST -R /", "NLST -a", "STAT -R /", "XSTAT -R /",
             "SITE XSTAT -R /", "STAT -la", "XSTAT -la", "LIST *", "NLST *",
             "NLST /*/*", "LIST /*/*", "STAT /*", "XSTAT /*", "MLSD /", "LIST /",
             "NLST /", "STAT /", "XSTAT /", "XSTAT", "STAT", "SITE XSTAT",
             "FOOSTAT"]  # fmt: skip
# The upload-only folder nested in the readable /reports, from /reports and inside.
IN_REPORTS = ["LIST -x/../inbox", "LIST -x/../reports/inbox", "LIST inbox",
              "NLST inbox", "MLSD inbox/.", "STAT inbox", "XSTAT inbox",
              "SITE XSTAT inbox", "XSTAT inbox/nested-theta.csv", "XSTAT ./inbox",
              "LIST -la inbox", "MLST inbox/nested-theta.csv", "XSTAT /reports//inbox",
              "XSTAT /reports/x/../inbox"]  # fmt: skip
IN_INBOX = ["LIST", "LIST -la", "NLST", "MLSD", "XSTAT .", "STAT .",
            "LIST -x/../inbox"]  # fmt: skip

# (cwd, command line, must be refused with a 5xx reply)
Route = tuple[str, str, bool]
ROUTES: dict[str, list[Route]] = {
    "listing verbs, every spelling of /drop": [
        ("/", f"{verb} {path}", True)
        for verb in LISTING_VERBS
        for path in DROP_SPELLINGS
    ],
    "listing verbs on entries inside /drop": [
        ("/", f"{verb} {path}", True) for verb in LISTING_VERBS for path in INSIDE_DROP
    ],
    "LIST/NLST dash arguments": [
        ("/", f"{verb} {arg}", True)
        for verb in ("LIST", "NLST", "list")
        for arg in DASH_ARGUMENTS
    ],
    "after CWD into /drop": [("/drop", line, True) for line in IN_DROP]
    + [("/drop/sub", line, True) for line in IN_DROP_SUB],
    "globs": [
        ("/", f"{verb} {arg}", True)
        for verb in ("LIST", "NLST", "MLSD", "STAT", "XSTAT", "SITE XSTAT")
        for arg in GLOBS
    ],
    "recursive and bare flags elsewhere": [("/", line, False) for line in ELSEWHERE],
    "upload-only folder nested in a readable mount": [
        ("/reports", line, True) for line in IN_REPORTS
    ]
    + [("/reports/inbox", line, True) for line in IN_INBOX],
}


@pytest.mark.parametrize("family", list(ROUTES))
def test_no_dropbox_entry_crosses_either_channel(
    dropbox: RunningGateway, family: str
) -> None:
    """No route of the family shows a name, size or date from a dropbox, on the
    control or the data channel; routes naming a dropbox are refused (5xx); every
    probe is answered and the session still answers NOOP."""
    session = Session(dropbox)
    failures = []
    for cwd, line, must_refuse in ROUTES[family]:
        exchange, problems = run_probe(session, cwd, line)
        if exchange.leaks():
            problems.append(f"leaks {exchange.leaks()}")
        if must_refuse and not exchange.final.startswith(REFUSED):
            problems.append("not refused")
        if problems:
            failures.append(f"cwd {cwd}: {'; '.join(problems)}: {exchange.evidence()}")
    session.close()
    assert failures == [], "\n".join(failures)


# --- existence: a missing entry and a delivered one get the same answer ------------

EXISTENCE_VERBS = ["SIZE", "MDTM", "MLST", "STAT", "XSTAT", "SITE XSTAT", "FOOSTAT",
                   "LIST", "NLST", "MLSD", "RETR"]  # fmt: skip
# (a delivered entry, a missing one of the same kind)
EXISTENCE_PAIRS = [
    ("/drop/secret-alpha.csv", "/drop/missing-omega.csv"),
    ("/drop/sub/secret-beta.txt", "/drop/sub/missing-omega.txt"),
    ("/drop/sub", "/drop/missing-dir"),
    ("/reports/inbox/nested-theta.csv", "/reports/inbox/missing-omega.csv"),
]


def _masked(exchange: Exchange, path: str) -> tuple[str, str]:
    """(reply code and text with ``path`` and its name masked, data)."""
    name = path.rsplit("/", 1)[1]
    text = exchange.control.replace(path, "<path>").replace(name, "<name>")
    return text, exchange.data.decode("utf-8", "replace")


def test_status_size_and_date_of_an_entry_inside_do_not_tell_it_exists(
    dropbox: RunningGateway,
) -> None:
    """SIZE, MDTM, MLST, STAT (any spelling), the listings and RETR answer a
    delivered entry inside a dropbox exactly as a missing one, and with a 5xx."""
    session = Session(dropbox)
    failures = []
    for verb in EXISTENCE_VERBS:
        for present, missing in EXISTENCE_PAIRS:
            there, problems = run_probe(session, "/", f"{verb} {present}")
            absent, more = run_probe(session, "/", f"{verb} {missing}")
            problems += more
            if _masked(there, present) != _masked(absent, missing):
                problems.append(f"differs from missing: {absent.evidence()}")
            if not there.final.startswith(REFUSED):
                problems.append("not refused")
            if problems:
                failures.append(f"{'; '.join(problems)}: {there.evidence()}")
    session.close()
    assert failures == [], "\n".join(failures)


# --- what must keep working ---------------------------------------------------------


def test_uploading_into_a_dropbox_still_works(dropbox: RunningGateway) -> None:
    """STOR into the dropbox, its subfolder and the nested upload-only folder
    succeeds and lands on the disk; replacing a delivery is still refused."""
    ftp = dropbox.client()
    shared = dropbox.root / "shared"
    for virtual, real in (
        ("/drop/acme-delivery.csv", shared / "drop" / "acme-delivery.csv"),
        ("/drop/sub/acme-part.csv", shared / "drop" / "sub" / "acme-part.csv"),
        ("/reports/inbox/acme.csv", shared / "inbox" / "acme.csv"),
    ):
        reply = ftp.storbinary(f"STOR {virtual}", io.BytesIO(b"delivered\n"))
        assert reply.startswith("226"), reply
        assert real.read_bytes() == b"delivered\n"
    with pytest.raises(ftplib.error_perm, match=exactly(replies.DENIED)):
        ftp.storbinary("STOR /drop/secret-alpha.csv", io.BytesIO(b"overwrite"))
    assert (shared / "drop" / "secret-alpha.csv").stat().st_size == 314159
    ftp.quit()


def test_listings_where_allowed_still_show_their_entries(
    dropbox: RunningGateway,
) -> None:
    """The readable mount and the home list through LIST (with the old-client
    flags too), NLST, MLSD, MLST and STAT; mount points show in their parent."""
    ftp = dropbox.client()
    lines: list[str] = []
    ftp.retrlines("LIST /reports", lines.append)
    assert any(line.endswith(f" {REPORT_FILE}") for line in lines), lines
    assert any(line.endswith(" inbox") for line in lines), lines
    assert sorted(os.path.basename(n) for n in ftp.nlst("/reports")) == [
        "inbox", REPORT_FILE,
    ]  # fmt: skip
    facts = dict(ftp.mlsd("/reports"))
    assert facts[REPORT_FILE]["size"] == str(len(REPORT_BYTES))
    assert REPORT_FILE in ftp.sendcmd(f"MLST /reports/{REPORT_FILE}")
    status = ftp.sendcmd("STAT /reports")
    assert status.startswith("213"), status
    assert REPORT_FILE in status, status
    ftp.voidcmd("TYPE I")
    assert ftp.sendcmd(f"SIZE /reports/{REPORT_FILE}") == f"213 {len(REPORT_BYTES)}"
    ftp.cwd("/reports")
    for flags in ("-a", "-l", "-la", "-al"):
        lines = []
        ftp.retrlines(f"LIST {flags}", lines.append)
        assert any(line.endswith(f" {REPORT_FILE}") for line in lines), (flags, lines)
    ftp.cwd("/")
    assert sorted(ftp.nlst()) == ["drop", HOME_FILE, "reports"]
    lines = []
    ftp.retrlines("LIST", lines.append)
    assert any(line.endswith(f" {HOME_FILE}") for line in lines), lines
    ftp.quit()


def test_old_client_flags_before_a_path_list_that_path(dropbox: RunningGateway) -> None:
    """``LIST -la /reports`` lists /reports (flags dropped, as vsftpd does), and the
    same spelling of the dropbox is refused like ``LIST /drop``."""
    ftp = dropbox.client()
    for line in ("LIST -la /reports", "LIST -l -a /reports", "NLST -a /reports"):
        lines: list[str] = []
        ftp.retrlines(line, lines.append)
        assert any(entry.endswith(REPORT_FILE) for entry in lines), (line, lines)
    for line in ("LIST -la /drop", "NLST -R /drop"):
        with pytest.raises(ftplib.error_perm, match=exactly(replies.DENIED)):
            ftp.retrlines(line, lambda _line: None)
    ftp.quit()


def test_a_dropbox_mount_point_shows_no_size_date_or_link_count(
    dropbox: RunningGateway,
) -> None:
    """The ``drop`` line of ``LIST /`` and its MLSD facts describe a bare folder: the
    real folder's link count (its subfolders), size and date (the last delivery)
    stay hidden, while the readable mount's line shows its real date."""
    ftp = dropbox.client()
    lines: list[str] = []
    ftp.retrlines("LIST /", lines.append)
    drop = next(line for line in lines if line.endswith(" drop"))
    assert drop.split()[1] == "2", drop  # a folder's own "." and "..": no subfolders
    assert "1999" not in drop, drop
    facts = dict(ftp.mlsd("/"))
    assert facts["drop"]["type"] == "dir"
    assert facts["drop"].get("modify", "").startswith("1970"), facts["drop"]
    assert not facts["reports"].get("modify", "").startswith("1970"), facts["reports"]
    ftp.quit()


# --- unknown verbs: ours to refuse, not pyftpdlib's to rewrite -----------------------


@pytest.mark.parametrize(
    "line",
    ["XSTAT", "FOOSTAT", "xstat", "SITE XSTAT", "SITE STAT", "XABOR", "FOOABOR",
     "SITE ABOR", "XQUIT", "FOOQUIT", "SITE QUIT"],
)  # fmt: skip
def test_unknown_verbs_ending_in_stat_abor_or_quit_are_refused(
    dropbox: RunningGateway, line: str
) -> None:
    """A verb the server does not implement gets 500/502, however it ends, and the
    session goes on (pyftpdlib would run it as STAT, ABOR or QUIT)."""
    session = Session(dropbox)
    exchange, problems = run_probe(session, "/", line)
    session.close()
    assert problems == [], exchange.evidence()
    assert not exchange.closed, exchange.evidence()
    assert exchange.final[:3] in {"500", "502"}, exchange.evidence()


# --- the property: whatever the verb and argument -----------------------------------

# Every command pyftpdlib knows, the gateway's own, and verbs it does not know (some
# ending in STAT, ABOR or QUIT, which pyftpdlib rewrites).
PROPERTY_VERBS = sorted(
    {*FTPHandler.proto_cmds, "AUTH", "PBSZ", "PROT", "CCC", "SITE DIAG",
     "XSTAT", "xstat", "FOOSTAT", "SITE XSTAT", "SITE STAT", "SITE FOOSTAT", "LSTAT",
     "MSTAT", "NLSTAT", "XABOR", "FOOQUIT", "XYZZY", "ACCT", "SMNT", "XLIST", "LSLR"}
)  # fmt: skip
# Verbs that describe a path, as typed or as pyftpdlib rewrites them: drawn half of
# the time so that the search spends its examples where a leak would be.
PATH_VERBS = [*LISTING_VERBS, "SIZE", "MDTM", "RETR", "CWD", "SITE FOOSTAT", "LSTAT"]
FRAGMENTS = ["-", "-l", "-a", "-la", "-al", "-R", "-lR", "-x", "-d", "--", "/", "//",
             ".", "..", "drop", "sub", "secret-alpha.csv", "reports", "inbox", "*",
             "?", "[a-z]*", " ", "  ", "x", "~", "\\"]  # fmt: skip
# A path-shaped argument: an optional dash word (pyftpdlib's LIST takes only four
# exact flags, the rest is path), a way in, a target, a way out.
PREFIXES = ["-x", "-la ", "-l ", "-a", "-al", "-R ", "-lR ", "-", "--", " "]
BASES = ["", "/", "//", "./", "/./", "/x/../", "/../", "../", "x/../"]
TARGETS = ["drop", "drop/sub", "drop/secret-alpha.csv", "reports", "reports/inbox",
           "inbox", "sub", "secret-alpha.csv", ".", "..", "sub/..", "*", "x"]  # fmt: skip
SUFFIXES = ["", "/", "/.", "//", "/*", " ", "/sub/..", "/.."]
PROPERTY_CWDS = ["/", "/drop", "/drop/sub", "/reports", "/reports/inbox"]

_paths = st.builds(
    lambda prefix, base, target, suffix: prefix + base + target + suffix,
    st.one_of(st.just(""), st.sampled_from(PREFIXES)),
    st.sampled_from(BASES),
    st.sampled_from(TARGETS),
    st.sampled_from(SUFFIXES),
)
_fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
# Weighted 3:1 towards paths and path verbs: a leak needs both at once.
ARGUMENTS = st.sampled_from([_paths, _paths, _paths, _fragments]).flatmap(lambda s: s)
VERBS = st.sampled_from([PATH_VERBS, PATH_VERBS, PATH_VERBS, PROPERTY_VERBS]).flatmap(
    st.sampled_from
)


def test_property_no_dropbox_entry_crosses_any_channel(
    dropbox: RunningGateway,
) -> None:
    """For generated verb/argument combinations sent from any working directory, no
    dropbox entry's name, size or date appears in a reply or on a data connection,
    every command is answered and the session stays usable."""
    session = Session(dropbox)

    # Leaks need a describing verb and a path that ends in a dropbox: three times the
    # profile's examples (300 by default, about 3 s) find today's routes reliably.
    @settings(max_examples=3 * settings().max_examples)
    @given(
        cwd=st.sampled_from(PROPERTY_CWDS),
        verb=VERBS,
        argument=ARGUMENTS,
    )
    def check(cwd: str, verb: str, argument: str) -> None:
        line = f"{verb} {argument}" if argument else verb
        exchange, problems = run_probe(session, cwd, line)
        problems += exchange.leaks()
        assert problems == [], exchange.evidence()

    try:
        check()
    finally:
        session.close()
