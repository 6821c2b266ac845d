"""Benchmark driver for issue 8: ftps-gateway against stock pyftpdlib, in one run.

Why in the repo: performance claims in ``bench/RESULTS.md`` must be reproducible on
the machine they were made on, with the versions printed next to them, and a
reference server measured in the same run (interleaved) so that a noisy machine
moves both columns alike and the *ratio* stays meaningful.

Run it from the repository root, in the project's virtualenv (``scripts/test.sh``
makes ``.venv``)::

    .venv/bin/python bench/bench.py --quick          # about 2 minutes, 64 MiB files
    .venv/bin/python bench/bench.py                  # the issue's sizes: 1 GiB, 1,000 idle
    .venv/bin/python bench/bench.py --rows sessions,idle --rounds 5
    .venv/bin/python bench/bench.py --smoke          # seconds; what the smoke test runs
    .venv/bin/python bench/bench.py --rows flood --flood-long   # issue 14's login flood

What it starts, both bound to 127.0.0.1 on ports the OS chooses:

* the gateway: ``python -m ftps_gateway serve --config <generated>`` with an ECDSA
  P-256 certificate from ``ftps-gateway gen-cert``, ``reuse = "required"``
  (default), a password hashed with the production argon2id parameters
  (``ftps-gateway hash-password``), audit to a file, metrics endpoint on, defender
  and atomic uploads with sha256 on (defaults). Only the session limits are raised,
  so that 1,000 idle sessions from one address and one user are admitted.
* the reference: stock pyftpdlib ``TLS_FTPHandler`` (pyOpenSSL), same certificate,
  ``tls_control_required``/``tls_data_required``, a ``DummyAuthorizer`` user with a
  home, stock INFO logging (to a file, as the gateway's audit goes to a file).

Rows (the issue's table): download and upload MB/s (curl, TLS 1.3, 1e6 bytes per MB,
counted from curl's ``time_pretransfer`` so the login is not in the figure),
sessions/s with 16 concurrent client *processes* each doing TLS login, PASV, 4 KiB
RETR and QUIT in a loop (``ReusingFTP_TLS``), p99 session latency of that run, KiB of
server memory per idle logged-in TLS session (RSS and PSS delta of the server's
process tree over N sessions, divided by N), and 4 KiB uploads/s in one session.

The ``flood`` row (issue 14, gateway only: the reference hashes no passwords) times a
partner's uncached login (production argon2id, an account of its own for each timed
login) without load, then during a login flood: 64 addresses with 4 connections each
sending wrong passwords, the partner logging in 2 s into it from an address it logged
in from before (``127.0.0.1``) and from one it never used. The flood stops once the
partners are in; ``--flood-long`` floods from 250 addresses with 8 connections each
and lasts until every one of them is banned.

Comparing another FTPS server (vsftpd, ProFTPD, Pure-FTPd; explicit TLS, AUTH TLS)::

    .venv/bin/python bench/bench.py --quick --target 127.0.0.1:2121 --user bench \\
        --password-file pw.txt --cafile /etc/vsftpd/ca.pem \\
        [--target-name vsftpd] [--target-pid "$(pidof -s vsftpd)"]

The target replaces the gateway column; the pyftpdlib reference still runs. The
driver uploads ``bench-big.bin`` and ``bench-4k.bin`` to the user's login directory
first and deletes them at the end, so the user needs write and delete rights. The
idle-memory row and the server CPU figures need ``--target-pid`` (the daemon's PID;
its whole process tree is counted, which covers fork-per-session servers). The
certificate must be valid for the target host as written (an IP needs an IP SAN).
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import functools
import hashlib
import io
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.connection import Connection

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # ftps_gateway.client, when run without installing

sys.path.insert(0, str(REPO / "tests"))  # support.loginflood, the flood row's client

from ftps_gateway.policy.passwords import hash_password  # noqa: E402 - after the path fix
from ftps_gateway.selftest.client import ReusingFTP_TLS  # noqa: E402
from support import loginflood  # noqa: E402

BIG_NAME = "bench-big.bin"
SMALL_NAME = "bench-4k.bin"
SMALL_BYTES = 4096
USER = "bench"
MB = 1_000_000
ROW_NAMES = (
    "download", "upload", "sessions", "idle", "uploads", "noop-appe", "noop-commit",
    "flood",
)  # fmt: skip
APPE_NAME = "bench-appe.bin"  # the big file the noop-appe row appends to
COMMIT_NAME = "bench-commit.bin"  # the big file the noop-commit row uploads
FLOOD_LOGINS = 3  # timed logins per flood measurement, each with its own account


@dataclass(frozen=True)
class Profile:
    """Sizes and durations of one run (long form, --quick or --smoke)."""

    big_bytes: int
    session_seconds: float
    clients: int
    idle_sessions: int
    upload_seconds: float
    rounds: int
    flood: Flood
    appe_bytes: int = 1 << 20  # the file APPE appends to (noop-appe)
    commit_bytes: int = 1 << 20  # the upload whose commit is watched (noop-commit)


@dataclass(frozen=True)
class Flood:
    """The login flood of the ``flood`` row."""

    addresses: int  # attacking source addresses (127.1.<round>.<n>)
    connections: int  # each keeps this many connections guessing
    partner_after: float  # seconds into the flood the partners log in
    until_banned: bool  # flood until every attacker is banned (else: stop after)


SHORT_FLOOD = Flood(64, 4, 2.0, until_banned=False)
LONG_FLOOD = Flood(250, 8, 5.0, until_banned=True)  # --flood-long

PROFILES = {
    # Issue 14's sizes: APPE onto 2 GiB, the commit of a 1 GiB upload.
    "long": Profile(1 << 30, 20.0, 16, 1000, 10.0, 5, SHORT_FLOOD, 2 << 30, 1 << 30),
    "quick": Profile(64 << 20, 5.0, 16, 100, 3.0, 3, SHORT_FLOOD, 200 << 20, 200 << 20),
    "smoke": Profile(
        1 << 20,
        1.0,
        2,
        8,
        1.0,
        1,
        Flood(8, 2, 0.5, until_banned=False),
        4 << 20,
        4 << 20,
    ),
}


@dataclass(frozen=True)
class Endpoint:
    """Where and how clients log in; picklable for the client processes."""

    name: str
    host: str
    port: int
    user: str
    password: str
    cafile: str


@dataclass
class Server:
    """A server under test: its endpoint and, when known, its PID for /proc figures."""

    endpoint: Endpoint
    pid: int | None = None
    process: subprocess.Popen[str] | None = None
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    metrics_url: str | None = None
    audit_file: Path | None = None
    home: Path | None = None  # the bench user's folder, for local servers
    rows: frozenset[str] | None = None  # measured only in these rows (None: all)
    helper: subprocess.Popen[bytes] | None = None  # redis-server, stopped with it


@dataclass
class Sample:
    """One measurement: the row's value plus CPU context for the details section."""

    value: float
    server_cpu_seconds: float | None = None
    client_cpu_seconds: float | None = None
    wall_seconds: float = 0.0
    note: str = ""
    work: float = 0.0  # bytes, sessions or uploads done, for CPU per unit
    cleanup: list[str] = field(default_factory=list)  # files to delete, untimed
    extras: dict[str, float] = field(default_factory=dict)  # more figures of the row


class BenchError(Exception):
    """A measurement or a server start failed; the message says which and why."""


# ---------------------------------------------------------------- /proc helpers


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: worker processes and fork-per-session servers."""
    children, tree, todo = _children_map(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the live process tree of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def tree_memory_kib(pid: int) -> tuple[int, int | None]:
    """(RSS, PSS) in KiB summed over the process tree; PSS None if unreadable.

    PSS splits shared pages between the processes sharing them, so forked workers
    are not counted twice; for a single process it equals RSS minus shared libraries'
    other users' share.
    """
    rss, pss, pss_known = 0, 0, True
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)
        rss += int(match.group(1)) if match else 0
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.MULTILINE).group(1))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pss_known = False
    return rss, pss if pss_known else None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- servers


def _free_port_block(size: int) -> tuple[int, int]:
    """A passive range below the ephemeral ports, free now, and not the tests' 40000s."""
    for _ in range(50):
        start = random.randrange(20000, 30000 - size)
        probes = [start, start + size // 2, start + size - 1]
        try:
            for port in probes:
                with socket.create_server(("127.0.0.1", port)):
                    pass
        except OSError:
            continue
        return start, start + size - 1
    raise BenchError("no free passive port block in 20000-29999")


def _drain(
    stream: Iterator[str],
    tail: deque[str],
    ready: list[str],
    event: threading.Event,
    patterns: tuple[str, ...],
) -> None:
    """Keep reading a server's output (a full pipe would stall it); spot its ports."""
    for line in stream:
        tail.append(line.rstrip())
        ready.extend(line for pattern in patterns if re.search(pattern, line))
        if len(ready) >= len(patterns):
            event.set()
    event.set()


def _start_process(
    command: list[str],
    patterns: tuple[str, ...],
    *,
    log: Path,
    output: str,
    timeout: float = 60,
) -> tuple[subprocess.Popen[str], deque[str], list[str]]:
    """Start a server; wait until every pattern appeared on ``output`` (its port lines).

    The other stream goes to ``log``: a full pipe nobody reads would stall the server.
    """
    with log.open("a") as sink:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE if output == "stdout" else sink,
            stderr=subprocess.PIPE if output == "stderr" else sink,
            text=True,
            cwd=REPO,
        )
    stream = process.stdout if output == "stdout" else process.stderr
    tail: deque[str] = deque(maxlen=40)
    ready: list[str] = []
    event = threading.Event()
    threading.Thread(
        target=_drain, args=(stream, tail, ready, event, patterns), daemon=True
    ).start()
    event.wait(timeout)
    if len(ready) < len(patterns):
        process.kill()
        raise BenchError(f"{command[2:4]} did not start:\n" + "\n".join(tail))
    return process, tail, ready


def _port_of(line: str) -> tuple[str, int]:
    host, port = re.search(r"(\d+\.\d+\.\d+\.\d+):(\d+)", line).groups()  # type: ignore[union-attr]
    return host, int(port)


@dataclass(frozen=True)
class Workspace:
    """Files shared by both local servers: certificate, password, data files."""

    root: Path
    cert: Path
    key: Path
    password: str
    password_hash: str
    big: Path
    small: Path
    flood_users: tuple[tuple[str, str], ...] = ()  # (name, hash): one login each


def prepare_workspace(root: Path, big_bytes: int, flood_users: int = 0) -> Workspace:
    """Certificate via ``gen-cert``, a production argon2id hash, random data files.

    ``flood_users`` accounts share the password, each with a hash of its own (the
    recent-login cache is keyed by the hash), for the flood row's uncached logins.
    """
    run = [sys.executable, "-m", "ftps_gateway"]
    subprocess.run(
        [*run, "gen-cert", "--hostname", "localhost", "--out", str(root / "certs")],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    password = f"bench-{random.getrandbits(64):x}"
    hashed = subprocess.run(
        [*run, "hash-password"],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        cwd=REPO,
    ).stdout.strip()
    data = root / "data"
    data.mkdir()
    big, small = data / BIG_NAME, data / SMALL_NAME
    _write_random(big, big_bytes)
    small.write_bytes(os.urandom(SMALL_BYTES))
    certs = root / "certs"
    accounts = tuple(
        (f"flood-{index}", hash_password(password)) for index in range(flood_users)
    )
    return Workspace(
        root,
        certs / "server.crt",
        certs / "server.key",
        password,
        hashed,
        big,
        small,
        accounts,
    )


def _write_random(path: Path, size: int) -> None:
    """``size`` bytes of random data (one random MiB repeated: nothing compresses it)."""
    with path.open("wb") as out:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            out.write(chunk)
        out.write(chunk[: size & ((1 << 20) - 1)])


def _link_data(space: Workspace, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    for source in (space.big, space.small):
        os.link(source, home / source.name)


def start_gateway(
    space: Workspace,
    profile_to: Path | None = None,
    *,
    wrapper: tuple[str, ...] = (),
    workers: int | None = None,
    redis_url: str | None = None,
) -> Server:
    """The gateway as operators run it, every security feature on.

    With ``profile_to`` it runs under cProfile (main thread only: argon2 runs in
    worker threads and shows there as waiting), written when it stops. ``wrapper``
    goes in front of the command (``session_cost.py`` runs it under callgrind);
    ``workers`` sets ``server.workers`` (default: "auto").
    With ``redis_url`` it is one node of a cluster (``[cluster]``): bans, login
    slots and quota decided in that Redis (the ``gateway+redis`` column of
    ``--cluster``).
    """
    name = "gateway+redis" if redis_url else "gateway"
    directory = space.root / name
    storage = directory / "storage"
    cluster = (
        f'[cluster]\nredis_url = "{redis_url}"\non_unavailable = "refuse"\n'
        if redis_url
        else ""
    )
    _link_data(space, storage / "home" / USER)
    low, high = _free_port_block(400)
    audit = directory / "audit.jsonl"
    config = directory / "gateway.toml"
    config.write_text(
        f"""
[server]
listen = ["127.0.0.1:0"]
{f"workers = {workers}" if workers else ""}
node_name = "bench-1"
# Raised from 512/16/8: the idle row holds rounds x 1,000 sessions of one user.
max_sessions = 20000
max_sessions_per_ip = 20000
max_sessions_per_user = 20000
# Raised from 256/32 per worker: every client connects from 127.0.0.1, 64 at once.
max_unauthenticated = 20000
max_unauthenticated_per_ip = 20000
idle_timeout_seconds = 900
login_timeout_seconds = 120
[tls]
certificate = "{space.cert}"
private_key = "{space.key}"
reuse = "required"
[passive]
ports = "{low}-{high}"
[storage]
root = "{storage}"
[access]
allow = ["127.0.0.0/8"]
[defender]
enabled = true
[admin]
socket = "{directory / "admin.sock"}"
[logging]
level = "info"
audit_file = "{audit}"
upload_sha256 = true
[metrics]
listen = "127.0.0.1:0"
{cluster}
[[users]]
name = "{USER}"
password = "{space.password_hash}"
"""
        + "".join(
            f'[[users]]\nname = "{name}"\npassword = "{hashed}"\n'
            for name, hashed in space.flood_users
        ),
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "ftps_gateway", "serve", "--config", str(config)]
    if profile_to is not None:
        command[1:1] = ["-m", "cProfile", "-o", str(profile_to.resolve())]
    process, tail, ready = _start_process(
        [*wrapper, *command],
        (r"listening for explicit FTPS on", r"serving /metrics"),
        log=directory / "stdout.log",
        output="stderr",
        timeout=600 if wrapper else 60,
    )
    host, port = _port_of(next(line for line in ready if "explicit FTPS" in line))
    m_host, m_port = _port_of(next(line for line in ready if "/metrics" in line))
    server = Server(
        Endpoint(name, host, port, USER, space.password, str(space.cert)),
        process.pid,
        process,
        tail,
        f"http://{m_host}:{m_port}",
        audit,
        storage / "home" / USER,
    )
    _wait_ready(f"{server.metrics_url}/readyz")
    return server


# Rows the gateway+redis column measures: what a shared state costs is the login
# and the session end; transfers never ask Redis.
CLUSTER_ROWS = frozenset({"sessions"})


def start_cluster_node(space: Workspace) -> Server:
    """A redis-server on a Unix socket, and a gateway node using it (``--cluster``).

    Redis runs as a cluster's would (no persistence needed for the figure); its
    process is stopped with the node.
    """
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise BenchError("--cluster needs redis-server (apt-get install redis-server)")
    directory = space.root / "redis"
    directory.mkdir()
    sock = directory / "redis.sock"
    redis = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory),
         "--logfile", str(directory / "redis.log")],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not sock.exists():
        if redis.poll() is not None or time.monotonic() > deadline:
            raise BenchError("redis-server did not start")
        time.sleep(0.05)
    try:
        server = start_gateway(space, redis_url=f"unix://{sock}")
    except BenchError:
        redis.kill()
        raise
    server.rows = CLUSTER_ROWS
    server.helper = redis
    return server


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{url} never answered 200")


DURABLE_NAME = "pyftpdlib+durable"
# The rows where the durable reference tells something: the ones that store files.
DURABLE_ROWS = frozenset({"uploads", "upload"})


def start_reference(
    space: Workspace, *, wrapper: tuple[str, ...] = (), durable: bool = False
) -> Server:
    """Stock pyftpdlib ``TLS_FTPHandler`` (pyOpenSSL) in its own process.

    ``durable``: the same server, but each received file is hashed (sha256) as it
    arrives and flushed to the disk (``fsync`` of the file, then of its folder)
    before the 226, all synchronously on its loop: the least any server must add to
    keep the gateway's promises (226 = durable, the sha256 of every upload), with no
    thread hand-off and no atomic rename. Its ratio to stock is the ceiling any such
    server reaches on this machine (``--durable``).
    """
    name = DURABLE_NAME if durable else "pyftpdlib"
    directory = space.root / ("reference-durable" if durable else "reference")
    home = directory / "home"
    _link_data(space, home)
    secret = directory / "password"
    secret.write_text(space.password)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--durable-reference-server" if durable else "--reference-server",
        str(space.cert),
        str(space.key),
        str(home),
        str(secret),
    ]
    process, tail, ready = _start_process(
        [*wrapper, *command],
        (r"reference listening on",),
        log=directory / "pyftpdlib.log",
        output="stdout",
        timeout=600 if wrapper else 60,
    )
    host, port = _port_of(ready[0])
    return Server(
        Endpoint(name, host, port, USER, space.password, str(space.cert)),
        process.pid,
        process,
        tail,
        home=home,
        rows=DURABLE_ROWS if durable else None,
    )


def serve_reference(
    cert: str, key: str, home: str, password_file: str, *, durable: bool = False
) -> None:
    """Run stock pyftpdlib over TLS until killed (the ``--reference-server`` mode).

    Nothing is tuned: the class attributes set are the TLS requirements and the
    connection caps, raised only so 1,000 idle sessions are admitted. ``durable``
    (``--durable-reference-server``): files opened for writing are hashed as written
    and fsynced, and their folder too, when pyftpdlib closes them, which it does
    before the 226.
    """
    from pyftpdlib.authorizers import DummyAuthorizer  # noqa: PLC0415
    from pyftpdlib.filesystems import AbstractedFS  # noqa: PLC0415
    from pyftpdlib.handlers import TLS_FTPHandler  # noqa: PLC0415
    from pyftpdlib.servers import FTPServer  # noqa: PLC0415

    class DurableFile(io.BufferedWriter):
        """A written file that is hashed, and on the disk, name included, once closed."""

        def __init__(self, raw: io.FileIO) -> None:
            super().__init__(raw)
            self.digest = hashlib.sha256()

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.digest.update(data)
            return super().write(data)

        def close(self) -> None:
            if not self.closed:
                self.digest.hexdigest()
                self.flush()
                os.fsync(self.fileno())
                folder = os.open(Path(self.name).parent, os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
            super().close()

    class DurableFS(AbstractedFS):  # type: ignore[misc]
        def open(self, filename: str, mode: str) -> object:
            if "r" in mode:
                return super().open(filename, mode)
            raw = io.FileIO(filename, mode.replace("b", ""))
            return DurableFile(raw)

    authorizer = DummyAuthorizer()
    password = Path(password_file).read_text().strip()
    authorizer.add_user(USER, password, home, perm="elradfmwMT")

    class ReferenceHandler(TLS_FTPHandler):  # type: ignore[misc]
        """A subclass, so the stock class attributes stay untouched."""

        certfile, keyfile = cert, key
        tls_control_required = tls_data_required = True

    ReferenceHandler.authorizer = authorizer
    if durable:
        ReferenceHandler.abstracted_fs = DurableFS
    server = FTPServer(("127.0.0.1", 0), ReferenceHandler)
    server.max_cons, server.max_cons_per_ip = 20000, 0
    host, port = server.address
    print(f"reference listening on {host}:{port}", flush=True)
    server.serve_forever()


def stop_server(server: Server) -> None:
    """SIGINT (the gateway's "stop now"; KeyboardInterrupt for pyftpdlib), then kill."""
    if server.process is None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    if server.helper is not None:
        server.helper.kill()
        server.helper.wait()


# ---------------------------------------------------------------- clients


def client_context(cafile: str) -> ssl.SSLContext:
    """TLS 1.3 only, verifying the server against ``cafile``."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class BenchFTP(ReusingFTP_TLS):
    """``ReusingFTP_TLS`` with TCP_NODELAY on every socket, as curl and lftp set it.

    Without it the client, not the server, sets the pace of small uploads: ftplib
    writes the last data record and then close_notify as two small segments, and
    Nagle holds the second until the server's delayed ACK (40 ms on Linux), which
    measured ~45 ms per 4 KiB STOR against either server.
    """

    def connect(self, *args: object, **kwargs: object) -> str:
        """Connect the control connection, then turn Nagle off on it."""
        welcome = super().connect(*args, **kwargs)  # type: ignore[arg-type]
        if self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return welcome

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        """Open the data connection (resuming TLS) with Nagle off."""
        conn, size = super().ntransfercmd(cmd, rest)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, size


def login(endpoint: Endpoint, context: ssl.SSLContext) -> ReusingFTP_TLS:
    """A logged-in session with PROT P whose data connections resume its TLS session."""
    ftp = BenchFTP(context=context, timeout=60)
    ftp.connect(endpoint.host, endpoint.port)
    ftp.login(endpoint.user, endpoint.password)
    ftp.prot_p()
    return ftp


def _curl(endpoint: Endpoint, args: list[str], path: str) -> tuple[float, float, float]:
    """Run curl; return (seconds of the data phase, seconds in all, curl CPU seconds).

    The user and password go through ``-K -`` (stdin), never argv. The data phase is
    ``time_total - time_pretransfer``: login (argon2 on the gateway) is the sessions
    row's business, not the throughput's.
    """
    command = [
        "curl",
        "-sS",
        "--ssl-reqd",
        "--tlsv1.3",
        "--cacert",
        endpoint.cafile,
        "-K",
        "-",
        "-w",
        "%{time_pretransfer} %{time_total}",
        *args,
        f"ftp://{endpoint.host}:{endpoint.port}/{path}",
    ]
    secret = f'user = "{endpoint.user}:{endpoint.password}"\n'
    cpu = _children_cpu()
    done = subprocess.run(
        command, input=secret, capture_output=True, text=True, check=False, timeout=600
    )
    cpu = _children_cpu() - cpu
    if done.returncode != 0:
        raise BenchError(f"curl exit {done.returncode}: {done.stderr.strip()}")
    pretransfer, total = (float(x) for x in done.stdout.split())
    return total - pretransfer, total, cpu


def _with_server_cpu(server: Server, measure: Callable[[], Sample]) -> Sample:
    before = tree_cpu_seconds(server.pid) if server.pid else None
    sample = measure()
    if before is not None and server.pid:
        sample.server_cpu_seconds = tree_cpu_seconds(server.pid) - before
    return sample


def measure_download(server: Server, profile: Profile, _pool: object) -> Sample:
    """MB/s of one curl download of the big file to /dev/null."""
    seconds, total, cpu = _curl(server.endpoint, ["-o", "/dev/null"], BIG_NAME)
    return Sample(
        profile.big_bytes / MB / seconds,
        client_cpu_seconds=cpu,
        wall_seconds=total,
        work=profile.big_bytes,
    )


def measure_upload(server: Server, profile: Profile, _pool: object) -> Sample:
    """MB/s of one curl upload of the big file (226 comes after rename and sha256)."""
    name = f"bench-up-{random.getrandbits(32):x}.bin"
    source = BENCH_STATE["big_file"]
    seconds, total, cpu = _curl(server.endpoint, ["-T", str(source)], name)
    return Sample(
        profile.big_bytes / MB / seconds,
        client_cpu_seconds=cpu,
        wall_seconds=total,
        work=profile.big_bytes,
        cleanup=[name],
    )


def _delete(endpoint: Endpoint, names: list[str]) -> None:
    ftp = login(endpoint, client_context(endpoint.cafile))
    for name in names:
        ftp.delete(name)
    ftp.quit()


def session_worker(
    endpoint: Endpoint, start: float, stop: float
) -> tuple[list[float], float, float, int]:
    """One client process: full sessions in a loop from ``start`` until ``stop``.

    Returns (latencies, CPU seconds used, monotonic time of the last completion,
    failures). Clocks are CLOCK_MONOTONIC, shared by all processes on Linux.
    """
    context = client_context(endpoint.cafile)
    latencies: list[float] = []
    failures = 0
    time.sleep(max(0.0, start - time.monotonic()))
    cpu = time.process_time()
    last = start
    while time.monotonic() < stop:
        began = time.perf_counter()
        try:
            ftp = login(endpoint, context)
            data = bytearray()
            ftp.retrbinary(f"RETR {SMALL_NAME}", data.extend)
            ftp.quit()
        except (OSError, EOFError, ftplib.Error):
            failures += 1
            continue
        if len(data) != SMALL_BYTES:
            failures += 1
            continue
        latencies.append(time.perf_counter() - began)
        last = time.monotonic()
    return latencies, time.process_time() - cpu, last, failures


def measure_sessions(
    server: Server, profile: Profile, pool: ProcessPoolExecutor
) -> Sample:
    """Sessions/s of ``clients`` processes; the p99 latency rides along in ``note``."""
    start = time.monotonic() + 1.0  # every process starts together
    stop = start + profile.session_seconds
    futures = [
        pool.submit(session_worker, server.endpoint, start, stop)
        for _ in range(profile.clients)
    ]
    results = [future.result() for future in futures]
    latencies = sorted(x for result in results for x in result[0])
    failures = sum(result[3] for result in results)
    wall = max(result[2] for result in results) - start
    if not latencies:
        raise BenchError(f"no session completed ({failures} failed)")
    p99 = _percentile(latencies, 0.99)
    sample = Sample(
        len(latencies) / wall,
        client_cpu_seconds=sum(r[1] for r in results),
        wall_seconds=wall,
        note=f"{p99 * 1000:.1f}",
        work=len(latencies),
    )
    if failures:
        raise BenchError(f"{failures} sessions failed")
    return sample


def _pool_member(seconds: float) -> int:
    """Occupy one client process for a moment; its PID says which one ran."""
    time.sleep(seconds)
    return os.getpid()


def warm_pool(pool: ProcessPoolExecutor, clients: int, timeout: float = 120) -> None:
    """Start every client process before the first measured round.

    A spawn-context pool starts its processes on demand, and each imports Python,
    ``ssl`` and this module: with 64 clients that took longer than the 1 s head
    start of ``measure_sessions`` on 2 cores, so the first round measured mostly
    the clients starting (the gateway, measured first, got 2.5-11 sessions/s
    against ~260 in the next round). Tasks that hold a process for a moment are
    sent until every process has answered.
    """
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < clients:
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(seen)} of {clients} client processes started")
        futures = [pool.submit(_pool_member, 0.2) for _ in range(clients)]
        seen.update(future.result() for future in futures)


def _percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile: with few samples p99 is (close to) the maximum."""
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def idle_worker(endpoint: Endpoint, count: int, channel: Connection) -> None:
    """Hold ``count`` logged-in TLS sessions open until told to close them."""
    context = client_context(endpoint.cafile)
    sessions: list[ReusingFTP_TLS] = []
    try:
        while len(sessions) < count:  # one by one, so a failure keeps the count
            sessions.append(login(endpoint, context))
        channel.send(len(sessions))
    except (OSError, EOFError, ftplib.Error) as err:
        channel.send(f"{len(sessions)} opened, then {err!r}")
    with contextlib.suppress(EOFError):  # EOF: the driver died; close anyway
        channel.recv()
    for ftp in sessions:
        ftp.close()
    with contextlib.suppress(OSError):
        channel.send("closed")


IdleHolder = tuple[multiprocessing.process.BaseProcess, "Connection"]
_IDLE_HOLDERS: dict[str, list[IdleHolder]] = {}
WARM_UP_SESSIONS = 8


def _open_idle(endpoint: Endpoint, count: int, processes: int) -> list[IdleHolder]:
    """Spread ``count`` idle sessions over client processes; wait until all are in."""
    ctx = multiprocessing.get_context("spawn")
    processes = max(1, min(processes, count))
    holders: list[IdleHolder] = []
    for index in range(processes):
        share = count // processes + (index < count % processes)
        parent, child = ctx.Pipe()
        process = ctx.Process(target=idle_worker, args=(endpoint, share, child))
        process.start()
        holders.append((process, parent))
    answers = [parent.recv() for _, parent in holders]
    _IDLE_HOLDERS.setdefault(endpoint.name, []).extend(holders)
    problems = [answer for answer in answers if isinstance(answer, str)]
    if problems:
        raise BenchError("; ".join(problems))
    return holders


def release_idle(endpoint: Endpoint) -> None:
    """Close every idle session the idle row opened against ``endpoint``."""
    holders = _IDLE_HOLDERS.pop(endpoint.name, [])
    for _, parent in holders:
        parent.send("close")
    for process, parent in holders:
        with contextlib.suppress(EOFError, OSError):
            parent.recv()
        process.join(30)


def measure_idle(server: Server, profile: Profile, _pool: object) -> Sample:
    """KiB of server memory per idle logged-in session: tree RSS (PSS) delta / N.

    Sessions stay open across rounds: round r measures N more on top of the
    (r-1)*N already held. Closing them between rounds would free memory into the
    allocator, and the next round would re-use it and measure (close to) 0. The
    first round is preceded by a few warm-up sessions (also held), so one-time
    allocations (thread pools, lazily built tables) are not charged per session.
    """
    if server.pid is None:
        raise BenchError("needs the server's PID (--target-pid)")
    if server.endpoint.name not in _IDLE_HOLDERS:
        _open_idle(server.endpoint, WARM_UP_SESSIONS, 1)
    time.sleep(1.0)  # let the server finish the last logins' bookkeeping
    rss_before, pss_before = tree_memory_kib(server.pid)
    began = time.monotonic()
    _open_idle(server.endpoint, profile.idle_sessions, 8)
    opened = time.monotonic() - began
    time.sleep(1.0)
    rss_after, pss_after = tree_memory_kib(server.pid)
    count = profile.idle_sessions
    note = (
        ""
        if pss_before is None or pss_after is None
        else f"{(pss_after - pss_before) / count:.1f}"
    )
    return Sample(
        (rss_after - rss_before) / count, wall_seconds=opened, note=note, work=count
    )


def measure_uploads(server: Server, profile: Profile, _pool: object) -> Sample:
    """4 KiB STORs per second in one session (each: PASV, resumed data TLS, 226)."""
    ftp = login(server.endpoint, client_context(server.endpoint.cafile))
    payload = os.urandom(SMALL_BYTES)
    names: list[str] = []
    cpu = time.process_time()
    began = time.perf_counter()
    deadline = began + profile.upload_seconds
    while time.perf_counter() < deadline:
        name = f"bench-small-{len(names)}.bin"
        ftp.storbinary(f"STOR {name}", _Reader(payload))
        names.append(name)
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu
    ftp.quit()
    return Sample(
        len(names) / wall,
        client_cpu_seconds=cpu,
        wall_seconds=wall,
        work=len(names),
        cleanup=names,
    )


# ---------------------------------------------------------------- NOOPs during slow file work

NOOP_PACE_SECONDS = 0.005  # one NOOP every 5 ms (plus its round trip) per prober
# Sessions a prober tries to find one on the uploader's worker, a short pause between
# tries: a busy worker loses the accept race on the shared socket to an idle one.
PROBE_SESSIONS = 64
PROBE_PAUSE_SECONDS = 0.05


def _worker_of(ftp: ReusingFTP_TLS) -> str | None:
    """``SITE DIAG``'s worker line ("1 of 2"); None from a server without it."""
    try:
        text = ftp.sendcmd("SITE DIAG")
    except ftplib.Error:
        return None
    match = re.search(r"worker: (\d+ of \d+)", text)
    return match.group(1) if match else None


def noop_prober(endpoint: Endpoint, worker: str | None, channel: Connection) -> None:
    """Another partner on the uploader's worker: NOOP round trips until told to stop.

    Sends "ready" once it holds a session on ``worker`` (any session when None), then
    a list of (start, seconds) per NOOP, start on CLOCK_MONOTONIC (the driver's clock).
    """
    context = client_context(endpoint.cafile)
    spare: list[ReusingFTP_TLS] = []
    chosen = None
    try:
        for _ in range(PROBE_SESSIONS):
            ftp = login(endpoint, context)
            if worker is None or _worker_of(ftp) == worker:
                chosen = ftp
                break
            spare.append(ftp)
            time.sleep(PROBE_PAUSE_SECONDS)
    except (OSError, EOFError, ftplib.Error) as err:
        channel.send(f"prober login failed: {err!r}")
        return
    for ftp in spare:
        ftp.close()
    if chosen is None:
        channel.send(f"no session landed on worker {worker}")
        return
    chosen.voidcmd("NOOP")
    channel.send("ready")
    samples: list[tuple[float, float]] = []
    while not channel.poll():
        began = time.monotonic()
        chosen.voidcmd("NOOP")
        samples.append((began, time.monotonic() - began))
        time.sleep(NOOP_PACE_SECONDS)
    channel.recv()
    chosen.quit()
    channel.send(samples)


@contextlib.contextmanager
def _prober(
    endpoint: Endpoint, worker: str | None
) -> Iterator[Callable[[], list[tuple[float, float]]]]:
    """Run ``noop_prober`` in a spawned process; yields "stop and give me the samples"."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=noop_prober, args=(endpoint, worker, child))
    process.start()
    try:
        answer = parent.recv()
        if answer != "ready":
            raise BenchError(str(answer))

        def stop() -> list[tuple[float, float]]:
            parent.send("stop")
            samples: list[tuple[float, float]] = parent.recv()
            return samples

        yield stop
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def _seed_big_file(server: Server, name: str, size: int) -> None:
    """Put ``name`` (``size`` bytes) in the bench user's folder, once per server."""
    key = f"{server.endpoint.name}:{name}"
    if key in BENCH_SEEDED:
        return
    source = BENCH_STATE["data"] / name
    if not source.exists():
        _write_random(source, size)
    if server.home is not None:
        with contextlib.suppress(FileExistsError):
            os.link(source, server.home / name)
    else:
        _curl(server.endpoint, ["-T", str(source)], name)
    BENCH_SEEDED.add(key)


def _during(
    samples: list[tuple[float, float]], began: float, ended: float
) -> list[float]:
    """Round trips (sorted) of the NOOPs in flight at any moment of [began, ended];
    if none overlaps (a window shorter than one NOOP), the first one after it."""
    inside = sorted(s for start, s in samples if start <= ended and start + s >= began)
    if inside:
        return inside
    after = [s for start, s in samples if start >= began]
    return after[:1]


def _noop_summary(
    samples: list[tuple[float, float]], began: float, ended: float
) -> str:
    """p99 (ms) of the NOOPs in flight during [began, ended], and how many."""
    inside = _during(samples, began, ended)
    if not inside:
        return "no NOOP"
    return f"{_percentile(inside, 0.99) * 1000:.1f} ms p99 of {len(inside)}"


def measure_noop_appe(server: Server, profile: Profile, _pool: object) -> Sample:
    """p99 NOOP round trip (ms) of a session on the same worker while another
    session APPEs 4 bytes onto a big file (the gateway copies and hashes it first)."""
    _seed_big_file(server, APPE_NAME, profile.appe_bytes)
    ftp = login(server.endpoint, client_context(server.endpoint.cafile))
    with _prober(server.endpoint, _worker_of(ftp)) as stop:
        began = time.monotonic()
        ftp.storbinary(f"APPE {APPE_NAME}", _Reader(b"tail"))
        ended = time.monotonic()
        # An APPE shorter than one NOOP (stock pyftpdlib: ~1 ms) overlaps none:
        # let one more start after it, which _during then takes.
        time.sleep(10 * NOOP_PACE_SECONDS)
        samples = stop()
    ftp.quit()
    latencies = _during(samples, began, ended)
    if not latencies:
        raise BenchError("no NOOP completed during the APPE")
    return Sample(
        _percentile(latencies, 0.99) * 1000,
        wall_seconds=ended - began,
        note=f"{max(latencies) * 1000:.1f}",
        work=len(latencies),
    )


def measure_noop_commit(server: Server, profile: Profile, _pool: object) -> Sample:
    """p99 NOOP round trip (ms) of a session on the same worker during a big upload,
    from its first byte to its 226 (sha256, fsync and rename on the gateway)."""
    source = BENCH_STATE["data"] / COMMIT_NAME
    if not source.exists():
        _write_random(source, profile.commit_bytes)
    name = f"bench-commit-{random.getrandbits(32):x}.bin"
    ftp = login(server.endpoint, client_context(server.endpoint.cafile))
    ftp.voidcmd("TYPE I")
    with _prober(server.endpoint, _worker_of(ftp)) as stop, source.open("rb") as data:
        began = time.monotonic()
        conn = ftp.transfercmd(f"STOR {name}")
        while block := data.read(1 << 20):
            conn.sendall(block)
        sent = time.monotonic()  # the server may still be reading and storing
        conn.unwrap()  # type: ignore[attr-defined]
        conn.close()
        ftp.voidresp()
        ended = time.monotonic()
        samples = stop()
    ftp.quit()
    latencies = _during(samples, began, ended)
    if not latencies:
        raise BenchError("no NOOP completed during the upload")
    commit = _noop_summary(samples, sent, ended)
    print(
        f"    {server.endpoint.name}: data {sent - began:.2f} s, last byte to 226 "
        f"{(ended - sent) * 1000:.0f} ms ({commit}), max NOOP "
        f"{max(latencies) * 1000:.1f} ms",
        flush=True,
    )
    return Sample(
        _percentile(latencies, 0.99) * 1000,
        wall_seconds=ended - began,
        note=f"{max(latencies) * 1000:.1f}",
        work=len(latencies),
        cleanup=[name],
    )


BENCH_SEEDED: set[str] = set()


class _Reader:
    """A file-like object over bytes, for ``storbinary`` without temp files."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def read(self, _size: int = -1) -> bytes:
        data, self._data = self._data or b"", None
        return data


FLOOD_ROUNDS = iter(range(1, 255))  # the second octet's round: fresh addresses each
FLOOD_ACCOUNTS: list[str] = []  # flood-N accounts not logged into yet (uncached)
KNOWN_PARTNER = "127.0.0.1"  # where every other row logs in from
REGULAR_LOGINS = 8  # the partner's logins before a flood (on every worker, surely)


def measure_login_flood(server: Server, profile: Profile, _pool: object) -> Sample:
    """ms of a partner's uncached login during a login flood (gateway only).

    The partner logs in from ``KNOWN_PARTNER`` a few times first (cached logins, as a
    partner's automation does all day), so every worker has seen that address log in.
    The sample's value is that partner's uncached login during the flood; ``note``
    is the same login without a flood, measured just before; ``extras["new"]`` is
    the login of an address the server never saw, during the flood.
    """
    if len(FLOOD_ACCOUNTS) < FLOOD_LOGINS:
        raise BenchError("no uncached flood-N account left (more rounds than made)")
    endpoint, flood = server.endpoint, profile.flood
    for _ in range(REGULAR_LOGINS):
        login(endpoint, client_context(endpoint.cafile)).quit()
    warm_up, partner, fresh = (FLOOD_ACCOUNTS.pop() for _ in range(FLOOD_LOGINS))
    round_number = next(FLOOD_ROUNDS)
    report = loginflood.flood(
        loginflood.Plan(
            host=endpoint.host,
            port=endpoint.port,
            sources=[
                f"127.1.{round_number}.{n}" for n in range(1, flood.addresses + 1)
            ],
            per_source=flood.connections,
            user=endpoint.user,
            wrong_password="not-" + endpoint.password,
            password=endpoint.password,
            partner_source=KNOWN_PARTNER,
            fresh_source=f"127.2.{round_number}.1",
            seconds=900.0,
            partner_after=flood.partner_after,
            until_banned=flood.until_banned,
            warm_up_user=warm_up,
            partner_user=partner,
            fresh_user=fresh,
        )
    )
    baseline = _login_ms(report.baseline, "no flood")
    during = _login_ms(report.partner, "flood")
    extras: dict[str, float] = {}
    if report.fresh is not None and report.fresh.seconds is not None:
        extras["new"] = report.fresh.seconds * 1000
    heard = ", ".join(f"{count} x {reply}" for reply, count in report.replies.items())
    print(
        f"    flood: {flood.addresses} addresses x {flood.connections}: {heard}; "
        f"{len(report.banned)} banned in {report.flood_seconds:.1f} s; new address: "
        f"{report.fresh.reply if report.fresh else '-'}",
        flush=True,
    )
    return Sample(
        during, wall_seconds=report.flood_seconds, note=f"{baseline:.1f}", extras=extras
    )


def _login_ms(timed: loginflood.Login | None, what: str) -> float:
    """A timed partner login in ms; a failed one fails the measurement."""
    if timed is None or timed.seconds is None:
        raise BenchError(f"the partner's login ({what}) failed: {timed}")
    return timed.seconds * 1000


BENCH_STATE: dict[str, Path] = {}  # "big_file", "data" (the workspace's data folder)
LOGIN_CPU: dict[str, float | None] = {}  # server name -> CPU seconds per login


# ---------------------------------------------------------------- rows and report


# Client processes of the sessions row in this run (``--clients``), for the labels.
SESSION_CLIENTS = [16]


@dataclass(frozen=True)
class Row:
    """One line of the issue's table: how to measure it and its target."""

    key: str
    label: str
    unit: str
    measure: Callable[[Server, Profile, ProcessPoolExecutor], Sample]
    target: str
    higher_is_better: bool = True
    target_value: float = 0.0
    gateway_only: bool = False  # the reference (and a --target) are not measured


ROWS = {
    "download": Row(
        "download",
        "download",
        "MB/s",
        measure_download,
        "≥ 1.1x Pure-FTPd = 1,535",
        target_value=1.1 * 1395,
    ),
    "upload": Row(
        "upload",
        "upload",
        "MB/s",
        measure_upload,
        "≥ 1.0x Pure-FTPd = 1,101",
        target_value=1101,
    ),
    "sessions": Row(
        "sessions",
        "sessions/s, 16 clients",
        "1/s",
        measure_sessions,
        "≥ 2x Pure-FTPd = 480 and ≥ 0.8x pyftpdlib",
        target_value=480,
    ),
    "idle": Row(
        "idle",
        "KiB per idle TLS session (RSS)",
        "KiB",
        measure_idle,
        "≤ 64",
        higher_is_better=False,
        target_value=64,
    ),
    "uploads": Row(
        "uploads",
        "4 KiB uploads/s, one session",
        "1/s",
        measure_uploads,
        "≥ best C server = 551",
        target_value=551,
    ),
    "noop-appe": Row(
        "noop-appe",
        "NOOP p99 ms, same worker, during APPE onto the big file",
        "ms",
        measure_noop_appe,
        "< 50 (issue 14)",
        higher_is_better=False,
        target_value=50,
    ),
    "noop-commit": Row(
        "noop-commit",
        "NOOP p99 ms, same worker, during a big upload and its commit",
        "ms",
        measure_noop_commit,
        "< 50 (issue 14)",
        higher_is_better=False,
        target_value=50,
    ),
    "flood": Row(
        "flood",
        "uncached login during a login flood, ms",
        "ms",
        measure_login_flood,
        "< 2,000 (issue 14)",
        higher_is_better=False,
        target_value=2000,
        gateway_only=True,
    ),
}


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(subject: float | None, reference: float | None) -> str:
    if subject is None or not reference:
        return "n/a"
    return f"{subject / reference:.2f}"


def _verdict(
    median: float | None, target: float, *, higher_is_better: bool = True
) -> str:
    """ "met", or how far from the target the median is (a factor, said which way)."""
    if median is None:
        return "n/a"
    if higher_is_better:
        return "met" if median >= target else f"gap: {median / target:.2f}x of target"
    return "met" if median <= target else f"gap: {median / target:.1f}x the limit"


def _line(
    label: str,
    values: dict[str, list[float]],
    names: list[str],
    target: str,
    verdict: str,
) -> None:
    subject, reference = names[0], names[-1]
    ratio = _ratio(_median(values[subject]), _median(values[reference]))
    print(
        f"| {label} | {_stats(values[subject])} | {_stats(values[reference])} "
        f"| {ratio} | {target} | {verdict} |"
    )


def report(results: dict[str, dict[str, list[Sample]]], names: list[str]) -> None:
    """Print the table (markdown) and the per-row CPU details."""
    subject, reference = names[0], names[-1]
    print(
        f"\n| row | {subject} median (min-max) | {reference} median (min-max) "
        f"| ratio {subject}/{reference} | target | {subject} vs target |"
    )
    print("|---|---|---|---|---|---|")
    for key, per_server in results.items():
        row = ROWS[key]
        values = {n: [s.value for s in per_server.get(n, [])] for n in names}
        median = _median(values[subject])
        verdict = _verdict(
            median, row.target_value, higher_is_better=row.higher_is_better
        )
        if key == "sessions" and verdict == "met":
            floor = 0.8 * (_median(values[reference]) or 0.0)
            verdict = _verdict(median, floor)  # also >= 0.8x stock pyftpdlib
        _line(row.label, values, names, row.target, verdict)
        notes = {
            n: [float(s.note) for s in per_server.get(n, []) if s.note] for n in names
        }
        if key == "sessions":
            limit = _verdict(_median(notes[subject]), 60, higher_is_better=False)
            label = f"p99 session latency, {SESSION_CLIENTS[0]} clients, ms"
            _line(label, notes, names, "≤ 60", limit)
        if key == "idle":
            limit = _verdict(_median(notes[subject]), 64, higher_is_better=False)
            _line("KiB per idle TLS session (PSS)", notes, names, "≤ 64", limit)
        if key in {"noop-appe", "noop-commit"}:
            _line(f"{key}: slowest NOOP, ms", notes, names, "-", "-")
        if key == "flood":
            _line("uncached login, no flood, ms", notes, names, "-", "-")
            new = {
                n: [s.extras["new"] for s in per_server.get(n, []) if "new" in s.extras]
                for n in names
            }
            limit = _verdict(_median(new[subject]), 2000, higher_is_better=False)
            _line(
                "uncached login during a login flood, new address, ms",
                new,
                names,
                "< 2,000 (issue 14)",
                limit,
            )
    print(
        "\nDetails (medians): server CPU = the server process tree, client CPU = "
        "curl or the client processes"
    )
    for key, per_server in results.items():
        for name in names:
            samples = per_server.get(name, [])
            if samples:
                print(f"  {key:9} {name:10} {_details(key, name, samples)}")


def report_durable(
    results: dict[str, dict[str, list[Sample]]], subject: str, reference: str
) -> None:
    """Stock pyftpdlib with and without the durability promise, and the gateway
    against both: how much of a gap to stock is the disk's flush alone."""
    print(
        f"\n| durability floor, same run | {DURABLE_NAME} median (min-max) "
        f"| ratio {DURABLE_NAME}/{reference} | ratio {subject}/{DURABLE_NAME} |"
    )
    print("|---|---|---|---|")
    for key, per_server in results.items():
        durable = [s.value for s in per_server.get(DURABLE_NAME, [])]
        if not durable:
            continue
        stock = _median([s.value for s in per_server.get(reference, [])])
        ours = _median([s.value for s in per_server.get(subject, [])])
        floor = _median(durable)
        print(
            f"| {ROWS[key].label} | {_stats(durable)} | {_ratio(floor, stock)} "
            f"| {_ratio(ours, floor)} |"
        )
    for key, per_server in results.items():
        samples = per_server.get(DURABLE_NAME, [])
        if samples:
            print(f"  {key:9} {DURABLE_NAME} {_details(key, DURABLE_NAME, samples)}")


def report_cluster(
    results: dict[str, dict[str, list[Sample]]], plain: str, node: Server
) -> None:
    """The same node without and with ``[cluster]`` (one Redis), same run."""
    clustered = node.endpoint.name
    per_server = results.get("sessions", {})
    if not per_server.get(clustered):
        return
    print(
        f"\n| one node, same run | {plain} median (min-max) | {clustered} median "
        f"(min-max) | ratio {clustered}/{plain} |"
    )
    print("|---|---|---|---|")
    for label, read in (
        (f"sessions/s, {SESSION_CLIENTS[0]} clients", lambda s: s.value),
        (
            f"p99 session latency, {SESSION_CLIENTS[0]} clients, ms",
            lambda s: float(s.note),
        ),
    ):
        plain_values = [read(s) for s in per_server.get(plain, [])]
        node_values = [read(s) for s in per_server.get(clustered, [])]
        ratio = _ratio(_median(node_values), _median(plain_values))
        print(f"| {label} | {_stats(plain_values)} | {_stats(node_values)} | {ratio} |")
    if node.metrics_url:
        with urllib.request.urlopen(f"{node.metrics_url}/metrics", timeout=5) as got:
            text = got.read().decode()
        trips = re.search(
            r"^ftps_gateway_redis_round_trip_seconds_count (\S+)", text, re.MULTILINE
        )
        sums = re.search(
            r"^ftps_gateway_redis_round_trip_seconds_sum (\S+)", text, re.MULTILINE
        )
        logins = re.findall(
            r'^ftps_gateway_logins_total\{[^}]*result="ok"[^}]*\} (\S+)',
            text,
            re.MULTILINE,
        )
        ok = sum(float(x) for x in logins)
        if trips and sums and ok:
            count, total = float(trips[1]), float(sums[1])
            print(
                f"{clustered}: {count:.0f} Redis round trips for {ok:.0f} sessions "
                f"({count / ok:.2f} per session: its login, its end (batched), "
                f"heartbeats), {1e6 * total / max(count, 1):.0f} µs each on average"
            )


def _details(key: str, name: str, samples: list[Sample]) -> str:
    wall = statistics.median(s.wall_seconds for s in samples)
    parts = [f"wall {wall:.2f} s"]
    server = [s.server_cpu_seconds for s in samples if s.server_cpu_seconds is not None]
    client = [s.client_cpu_seconds for s in samples if s.client_cpu_seconds is not None]
    if server:
        parts.append(
            f"server CPU {statistics.median(server):.2f} s "
            f"({statistics.median(server) / wall:.2f} cores)"
        )
    if client:
        parts.append(
            f"client CPU {statistics.median(client):.2f} s "
            f"({statistics.median(client) / wall:.2f} cores)"
        )
    per_unit = [
        s.server_cpu_seconds / s.work
        for s in samples
        if s.server_cpu_seconds is not None and s.work
    ]
    if per_unit and key in {"sessions", "uploads"}:
        parts.append(f"server CPU {1000 * statistics.median(per_unit):.1f} ms each")
    login_cpu = LOGIN_CPU.get(name)
    if server and login_cpu is not None and key in {"download", "upload"}:
        per_gb = [
            (s.server_cpu_seconds - login_cpu) / s.work * 1e9
            for s in samples
            if s.server_cpu_seconds is not None and s.work
        ]
        parts.append(
            f"server CPU {statistics.median(per_gb):.2f} s/GB "
            f"(after subtracting one login, {1000 * login_cpu:.1f} ms)"
        )
    return ", ".join(parts)


def machine_lines() -> list[str]:
    """CPU, cores, load, and the versions that shape the figures."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    lines = [
        (
            f"machine: {model.group(1) if model else platform.processor()}, "
            f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"Linux {platform.release()}"
        ),
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION} (stdlib ssl)",
    ]
    try:
        from OpenSSL import SSL, __version__  # noqa: PLC0415

        linked = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        lines.append(
            f"pyftpdlib {metadata.version('pyftpdlib')}, "
            f"pyOpenSSL {__version__} ({linked})"
        )
    except (ImportError, metadata.PackageNotFoundError) as err:
        lines.append(f"reference server unavailable: {err}")
    curl = subprocess.run(
        ["curl", "--version"], capture_output=True, text=True, check=False
    )
    lines.append(curl.stdout.splitlines()[0] if curl.stdout else "curl: not found")
    from ftps_gateway import __version__ as gateway_version  # noqa: PLC0415

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines.append(f"ftps-gateway {gateway_version} (git {commit or '?'})")
    return lines


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; ``--reference-server`` is the internal mode of the child process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="64 MiB, 100 idle, ~2 min")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument(
        "--rows",
        default=",".join(ROW_NAMES),
        help=f"comma-separated subset of {','.join(ROW_NAMES)}",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds per row")
    parser.add_argument(
        "--clients", type=int, help="client processes of the sessions row (16)"
    )
    parser.add_argument(
        "--flood-long",
        action="store_true",
        help="flood row: 250 addresses x 8 connections, until all are banned",
    )
    parser.add_argument("--idle-sessions", type=int, help="sessions for the idle row")
    parser.add_argument(
        "--appe-mib", type=int, help="size of the file noop-appe appends to (MiB)"
    )
    parser.add_argument(
        "--commit-mib", type=int, help="size of the upload noop-commit watches (MiB)"
    )
    parser.add_argument(
        "--target", help="HOST:PORT of another FTPS server (explicit TLS)"
    )
    parser.add_argument("--target-name", default="target")
    parser.add_argument("--target-pid", type=int, help="its PID, for memory and CPU")
    parser.add_argument("--user", help="login for --target")
    parser.add_argument("--password-file", type=Path, help="password for --target")
    parser.add_argument("--cafile", help="CA (or self-signed cert) for --target")
    parser.add_argument(
        "--profile-gateway", type=Path, help="write a cProfile of the gateway here"
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also measure sessions/s and p99 of a gateway node with [cluster] "
        "(a local redis-server), interleaved with the plain one",
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help=f"also measure {DURABLE_NAME} in the upload rows: stock pyftpdlib "
        "hashing each file and flushing it and its folder before the 226 (the "
        "floor of the gateway's upload promises)",
    )
    parser.add_argument("--reference-server", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--durable-reference-server", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROW_NAMES)}")
    args.rows = rows
    if args.target and not (args.user and args.password_file and args.cafile):
        parser.error("--target needs --user, --password-file and --cafile")
    return args


def _profile(args: argparse.Namespace) -> Profile:
    base = PROFILES["smoke" if args.smoke else "quick" if args.quick else "long"]
    return Profile(
        base.big_bytes,
        base.session_seconds,
        args.clients or base.clients,
        args.idle_sessions or base.idle_sessions,
        base.upload_seconds,
        args.rounds or base.rounds,
        LONG_FLOOD if args.flood_long else base.flood,
        (args.appe_mib << 20) if args.appe_mib else base.appe_bytes,
        (args.commit_mib << 20) if args.commit_mib else base.commit_bytes,
    )


def _target_server(args: argparse.Namespace, space: Workspace) -> Server:
    """The --target server, seeded with the files the rows read."""
    host, _, port = args.target.rpartition(":")
    password = args.password_file.read_text().strip()
    endpoint = Endpoint(
        args.target_name, host, int(port), args.user, password, args.cafile
    )
    for source in (space.big, space.small):
        _curl(endpoint, ["-T", str(source)], source.name)
    return Server(endpoint, args.target_pid)


def _start_servers(
    args: argparse.Namespace, space: Workspace, servers: list[Server]
) -> None:
    """Subject first, stock pyftpdlib last, optional comparisons between (appended
    one by one, so the caller stops whatever started if a later one fails)."""
    servers.append(
        _target_server(args, space)
        if args.target
        else start_gateway(space, args.profile_gateway)
    )
    if args.cluster and not args.target:
        servers.append(start_cluster_node(space))
    if args.durable:
        servers.append(start_reference(space, durable=True))
    servers.append(start_reference(space))


def run(args: argparse.Namespace) -> int:
    """Start the servers, measure the rows interleaved, print the report."""
    profile = _profile(args)
    kind = "smoke" if args.smoke else "quick" if args.quick else "long"
    for line in machine_lines():
        print(line)
    print(f"profile: {kind} {profile}")
    root = Path(tempfile.mkdtemp(prefix="ftpsbench-"))
    servers: list[Server] = []
    failures = 0
    try:
        floods = FLOOD_LOGINS * profile.rounds if "flood" in args.rows else 0
        space = prepare_workspace(root, profile.big_bytes, floods)
        FLOOD_ACCOUNTS.extend(name for name, _ in space.flood_users)
        BENCH_STATE["big_file"] = space.big
        BENCH_STATE["data"] = space.big.parent
        _start_servers(args, space, servers)
        for server in servers:
            print(
                f"{server.endpoint.name}: {server.endpoint.host}:{server.endpoint.port}"
                f" pid {server.pid}"
            )
        results, failures = measure_all(args.rows, servers, profile)
        names = [s.endpoint.name for s in servers]
        report(results, [names[0], names[-1]])
        for extra in servers[1:-1]:
            if extra.endpoint.name == DURABLE_NAME:
                report_durable(results, names[0], names[-1])
            else:  # gateway, gateway+redis, reference
                report_cluster(results, names[0], extra)
        _report_features(servers[0])
    except BenchError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            release_idle(server.endpoint)
            stop_server(server)
        if args.target and servers:
            with contextlib.suppress(OSError, ftplib.Error):
                _delete(servers[0].endpoint, [BIG_NAME, SMALL_NAME])
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if failures:
        print(f"{failures} measurements failed (see above)", file=sys.stderr)
        return 1
    return 0


def login_cpu_seconds(server: Server, logins: int = 3) -> float | None:
    """Server CPU of one login (connect, TLS, USER/PASS, QUIT): argon2 on the gateway.

    Transfer rows include one login in their server-CPU window; this is subtracted
    from them for the CPU-per-GB figure.
    """
    if server.pid is None:
        return None
    context = client_context(server.endpoint.cafile)
    before = tree_cpu_seconds(server.pid)
    for _ in range(logins):
        login(server.endpoint, context).quit()
    return (tree_cpu_seconds(server.pid) - before) / logins


def measure_all(
    rows: list[str], servers: list[Server], profile: Profile
) -> tuple[dict[str, dict[str, list[Sample]]], int]:
    """Each row, ``rounds`` times, alternating servers: gateway, reference, gateway..."""
    results: dict[str, dict[str, list[Sample]]] = {}
    failures = 0
    ctx = multiprocessing.get_context("spawn")
    for server in servers:
        LOGIN_CPU[server.endpoint.name] = login_cpu_seconds(server)
    with ProcessPoolExecutor(max_workers=profile.clients, mp_context=ctx) as pool:
        warm_pool(pool, profile.clients)
        for key in rows:
            row = ROWS[key]
            results[key] = {}
            for round_number in range(profile.rounds):
                for server in servers:
                    name = server.endpoint.name
                    if (row.gateway_only and name != "gateway") or (
                        server.rows is not None and key not in server.rows
                    ):
                        continue
                    try:
                        measure = functools.partial(row.measure, server, profile, pool)
                        sample = _with_server_cpu(server, measure)
                    except (BenchError, OSError, EOFError, ftplib.Error) as err:
                        failures += 1
                        print(f"  {key} {name} round {round_number + 1}: failed: {err}")
                        continue
                    if sample.cleanup:  # outside the server-CPU window
                        _delete(server.endpoint, sample.cleanup)
                    results[key].setdefault(name, []).append(sample)
                    extra = f" ({sample.note})" if sample.note else ""
                    print(
                        f"  {key} {name} round {round_number + 1}: "
                        f"{sample.value:,.1f} {row.unit}{extra}",
                        flush=True,
                    )
            if key == "idle":
                for server in servers:
                    release_idle(server.endpoint)
    return results, failures


def _report_features(server: Server) -> None:
    """Evidence that audit and metrics were really on during the gateway's run."""
    if server.audit_file is not None and server.audit_file.exists():
        with server.audit_file.open() as audit:
            print(f"gateway audit file: {sum(1 for _ in audit)} events")
    if server.metrics_url:
        with urllib.request.urlopen(
            f"{server.metrics_url}/metrics", timeout=5
        ) as answer:
            text = answer.read().decode()
        logins = re.findall(
            r'^ftps_gateway_logins_total\{[^}]*result="ok"[^}]*\} (\S+)',
            text,
            re.MULTILINE,
        )
        series = sum(
            1 for line in text.splitlines() if line.startswith("ftps_gateway_")
        )
        print(
            f"gateway /metrics: {series} series, successful logins counted: "
            f"{sum(float(x) for x in logins):.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.clients:
        SESSION_CLIENTS[0] = args.clients
        ROWS["sessions"] = replace(
            ROWS["sessions"], label=f"sessions/s, {args.clients} clients"
        )
    if args.reference_server:
        serve_reference(*args.reference_server)
        return 0
    if args.durable_reference_server:
        serve_reference(*args.durable_reference_server, durable=True)
        return 0
    if shutil.which("curl") is None:
        print("curl is needed (apt-get install curl)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
