"""Quotas hold across concurrent sessions and workers (issue 14, item 2).

A real ``ftps-gateway serve`` with two workers; real TLS clients (``ReusingFTP_TLS``)
in threads. Every upload here is *begun* (its 150 received and a first part sent)
before any of them is finished, so all of them are in flight at once: measuring
the room once at the start (main before this change) lets each of them store as
much as the whole quota. What is checked is the disk afterwards: the bytes and
files stored never exceed the quota, every refused upload was answered ``452`` and
left nothing (no file, no temporary), every accepted one is intact.
"""

from __future__ import annotations

import ftplib
import io
import os
import random
import signal
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.configs import write_config
from support.credentials import PASSWORD, PASSWORD_HASH
from support.gateway import RunningGateway
from support.process import GatewayProcess, connection_owner
from support.uploads import (
    Disk,
    Upload,
    begin,
    check_outcome,
    disk,
    finish,
    finish_together,
    run_concurrently,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PORTS = "43100-43179"
QUOTA_BYTES = 1_000_000
SESSIONS = 8  # of one user (or two users of one mount), on two workers
# Cached quota walks are reused this long (session.quota.WALK_TTL_SECONDS); the exact
# checks at the end wait it out, so they see a fresh walk.
WALK_TTL_WAIT_SECONDS = 3.0
SERVER = (
    "workers = 2\nlogin_timeout_seconds = 30\nmax_sessions_per_user = 16\n"
    "max_sessions_per_ip = 32\nshutdown_grace_seconds = 10"
)


class Cluster(GatewayProcess):
    """``ftps-gateway serve`` with two workers."""

    root = Path()  # storage.root

    def workers(self) -> list[int]:
        """PIDs of the worker processes."""
        return self.pids()[1:]

    def session(self, user: str, worker: int | None = None) -> ReusingFTP_TLS:
        """A logged-in session (PROT P) that ``worker`` serves (any if None).

        Both workers accept on one socket and the first one awake wins: pauses of
        random length between attempts shuffle who is awake first.
        """
        deadline = time.monotonic() + 60
        while True:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            ftp = ReusingFTP_TLS(context=context, timeout=60)
            ftp.connect("127.0.0.1", self.port)
            try:
                owner = connection_owner(
                    self.workers(), ftp.sock.getsockname(), self.port
                )
                if worker is None or owner == worker:
                    ftp.login(user, PASSWORD)
                    ftp.prot_p()
                    ftp.voidcmd("TYPE I")
                    return ftp
            except BaseException:
                ftp.close()
                raise
            ftp.close()
            assert time.monotonic() < deadline, f"worker {worker} got no connection"
            time.sleep(random.uniform(0, 0.05))

    def spread(self, users: list[str]) -> list[ReusingFTP_TLS]:
        """One session per entry of ``users``, alternately on each worker."""
        workers = self.workers()
        assert len(workers) == 2, workers
        return [
            self.session(user, workers[index % 2]) for index, user in enumerate(users)
        ]


@pytest.fixture
def start_cluster(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> Iterator[Callable[[str], Cluster]]:
    """Start a two-worker gateway with the given ``[storage]`` extras and users."""
    running: list[Cluster] = []

    def start(users: str) -> Cluster:
        path = write_config(
            tmp_path, cert_files, passive_ports=PORTS, users=users,
            server_extra=SERVER,
        )  # fmt: skip
        cluster = Cluster(path, cert_files[2], workers=2)
        cluster.root = tmp_path / "storage"
        running.append(cluster)
        return cluster

    yield start
    for cluster in running:
        code = cluster.stop()
        assert not cluster.tracebacks(), "".join(cluster.stderr)
        assert code == 0, "".join(cluster.stderr)


def _user(name: str, extra: str = "") -> str:
    return f'[[users]]\nname = "{name}"\npassword = "{PASSWORD_HASH}"\n{extra}\n'


# --- 8 sessions of one user, on two workers ------------------------------------------


@pytest.mark.parametrize(
    ("limit", "size"),
    [(f"quota_bytes = {QUOTA_BYTES}", 300_000), ("quota_files = 3", 2_000)],
    ids=["bytes", "files"],
)
def test_concurrent_sessions_of_one_user_never_pass_the_quota(
    start_cluster: Callable[[str], Cluster], limit: str, size: int
) -> None:
    """8 sessions of one user on 2 workers, all uploading at once: the files stored
    stay within quota_bytes / quota_files; the others got 452 and left nothing."""
    cluster = start_cluster(_user("acme", limit))
    sessions = cluster.spread(["acme"] * SESSIONS)
    names = [f"upload-{n}.bin" for n in range(SESSIONS)]
    payloads = [os.urandom(size) for _ in names]
    uploads = run_concurrently(sessions, [f"STOR {n}" for n in names], payloads)
    found = check_outcome(uploads, names, cluster_home(cluster, "acme"))
    _print_outcome(limit, uploads, found)
    assert found.bytes <= QUOTA_BYTES, found
    assert len(found.files) <= (3 if "files" in limit else SESSIONS), found
    assert any(u.stored for u in uploads), [u.reply for u in uploads]
    assert any(u.refused for u in uploads), [u.reply for u in uploads]
    refusals = [e for e in cluster.events("upload_refused") if e["reason"] == "quota"]
    assert {e["scope"] for e in refusals} == {"user acme"}
    for ftp in sessions:
        ftp.quit()


def _print_outcome(limit: str, uploads: list[Upload], found: Disk) -> None:
    """The figures of a run (not asserted: they depend on the race)."""
    stored = sum(u.stored for u in uploads)
    print(
        f"{limit}: {stored} stored, {len(uploads) - stored} refused (452), "
        f"{found.bytes} bytes in {len(found.files)} files on disk"
    )


def cluster_home(cluster: Cluster, user: str) -> Path:
    """``<storage.root>/home/<user>``."""
    return cluster.root / "home" / user


# --- two users, one mount quota -------------------------------------------------------

SHARED = (
    f"""
[[groups]]
name = "partners"
[[groups.mounts]]
path = "/shared"
source = "shared/pool"
permissions = "read-write"
quota_bytes = {QUOTA_BYTES}
quota_files = 5
"""
    + _user("acme", 'groups = ["partners"]')
    + _user("globex", 'groups = ["partners"]')
)


def test_two_users_of_one_mount_quota_never_pass_it(
    start_cluster: Callable[[str], Cluster],
) -> None:
    """Two users (4 sessions each, on both workers) upload into one mount at once:
    its quota holds for both together; refusals name the mount."""
    cluster = start_cluster(SHARED)
    users = ["acme", "globex"] * (SESSIONS // 2)
    sessions = cluster.spread(users)
    names = [f"{user}-{n}.bin" for n, user in enumerate(users)]
    payloads = [os.urandom(300_000) for _ in names]
    commands = [f"STOR /shared/{name}" for name in names]
    uploads = run_concurrently(sessions, commands, payloads)
    found = check_outcome(uploads, names, cluster.root / "shared" / "pool")
    _print_outcome("mount quota_bytes = 1000000, quota_files = 5", uploads, found)
    assert found.bytes <= QUOTA_BYTES, found
    assert len(found.files) <= 5, found
    assert any(u.stored for u in uploads), [u.reply for u in uploads]
    assert any(u.refused for u in uploads), [u.reply for u in uploads]
    refusals = [e for e in cluster.events("upload_refused") if e["reason"] == "quota"]
    assert {e["scope"] for e in refusals} == {"mount /shared"}
    for ftp in sessions:
        ftp.quit()


# --- overwrite, APPE, REST: what they replace or continue counts once --------------


def _interrupted(ftp: ReusingFTP_TLS, name: str, data: bytes) -> None:
    """Send ``data`` to STOR ``name`` and cut the connection (no close_notify): the
    server keeps it as a resumable partial (426)."""
    conn, _ = ftp.ntransfercmd(f"STOR {name}")
    conn.sendall(data)
    time.sleep(0.5)  # let the server write what arrived
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    with pytest.raises(ftplib.error_temp, match="^426"):
        ftp.voidresp()


def _on_disk(folder: Path) -> int:
    """Bytes under ``folder``, kept partials included (they occupy the quota too)."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def _begin_race(
    case: str, one: ReusingFTP_TLS, other: ReusingFTP_TLS, home: Path
) -> tuple[list[Upload], dict[str, bytes]]:
    """Set ``case`` up and begin its two uploads; what each name holds once its
    upload is stored."""
    if case == "overwrite":  # 600,000 -> 900,000 against a new file of 300,000
        old, new = os.urandom(600_000), os.urandom(900_000)
        assert finish(begin(one, "STOR a.bin", old)).stored
        racing = [
            begin(one, "STOR a.bin", new),
            begin(other, "STOR b.bin", os.urandom(300_000)),
        ]
        return racing, {"a.bin": new, "b.bin": racing[1].data}
    if case == "appe":  # 500,000 + 300,000 against a new file of 300,000 begun first
        old, extra = os.urandom(500_000), os.urandom(300_000)
        assert finish(begin(one, "STOR a.bin", old)).stored
        racing = [
            begin(other, "STOR c.bin", os.urandom(300_000)),
            begin(one, "APPE a.bin", extra),
        ]
        return racing, {"c.bin": racing[0].data, "a.bin": old + extra}
    # REST: a kept partial of 100,000 resumed to 500,000, against a new file of
    # 550,000 begun first.
    whole = os.urandom(500_000)
    _interrupted(one, "p.bin", whole[:100_000])
    kept = int(one.sendcmd("SIZE p.bin").split()[1])
    assert kept == 100_000
    assert _on_disk(home) == kept  # the partial occupies its room
    racing = [
        begin(other, "STOR d.bin", os.urandom(550_000)),
        begin(one, "STOR p.bin", whole[kept:], rest=kept),
    ]
    return racing, {"d.bin": racing[0].data, "p.bin": whole}


@pytest.mark.parametrize("case", ["overwrite", "appe", "rest"])
def test_what_an_upload_replaces_or_continues_counts_once(
    start_cluster: Callable[[str], Cluster], case: str
) -> None:
    """An overwrite, an APPE or a REST resume racing a new upload on the other worker
    (each fits alone, both do not) never leaves more than the quota on disk; after
    it, the room left is exactly the quota minus what is on disk, to the byte."""
    cluster = start_cluster(
        "partial_retention_seconds = 3600\n"
        + _user("acme", f"quota_bytes = {QUOTA_BYTES}")
    )
    home = cluster_home(cluster, "acme")
    one, other = cluster.spread(["acme", "acme"])
    racing, wanted = _begin_race(case, one, other, home)
    before = disk(home).files  # as the race found it
    finish_together(racing)
    found = disk(home)
    assert _on_disk(home) <= QUOTA_BYTES, (found, [u.reply for u in racing])
    assert any(u.refused for u in racing), [u.reply for u in racing]
    for upload, (name, data) in zip(racing, wanted.items(), strict=True):
        assert upload.stored or upload.refused, upload.reply
        if upload.stored:
            assert found.files[name] == data, name
        else:
            assert found.files.get(name) == before.get(name), name
    assert found.temporaries == [] or case == "rest", found

    # Exact afterwards (a fresh walk): what is left can be filled to the byte, and
    # not one byte more.
    time.sleep(WALK_TTL_WAIT_SECONDS)
    left = QUOTA_BYTES - _on_disk(home)
    assert left > 0, (left, found)
    assert finish(begin(other, "STOR fill.bin", os.urandom(left))).stored
    over = finish(begin(one, "STOR over.bin", b"x"))
    assert over.refused, over.reply
    assert _on_disk(home) == QUOTA_BYTES
    assert "over.bin" not in disk(home).files
    for ftp in (one, other):
        ftp.quit()


# --- one process: TYPE A, and answers that come at once ---------------------------


def test_ascii_uploads_grow_within_the_quota(
    start_gateway: Callable[..., RunningGateway],
) -> None:
    """One process (the state answers at once): a TYPE A upload grows chunk by chunk
    up to the quota; one that would pass it gets 452 and leaves nothing."""
    gw = start_gateway(users=_user("acme", "quota_bytes = 2000000"))
    ftp = gw.client()
    line = b"0123456789" * 9 + b"abcdefgh\r\n"  # 100 bytes, stored as 99
    fits = line * 15_000  # 1,485,000 bytes stored
    ftp.storlines("STOR fits.txt", io.BytesIO(fits))
    assert (gw.home() / "fits.txt").stat().st_size == len(fits) - 15_000
    ftp.voidcmd("TYPE A")
    over = finish(begin(ftp, "STOR over.txt", line * 6_000))  # 594,000 more
    assert over.refused, over.reply
    found = disk(gw.home())
    assert sorted(found.files) == ["fits.txt"]
    assert found.temporaries == []
    ftp.quit()


# --- a killed worker's reservation ----------------------------------------------------


def test_a_killed_workers_reservations_are_released(
    start_cluster: Callable[[str], Cluster],
) -> None:
    """An upload in flight holds its file of quota_files = 1 (a second upload gets
    452 on either worker); kill -9 of its worker gives it back."""
    cluster = start_cluster(_user("acme", "quota_files = 1"))
    victim, survivor = cluster.workers()
    holder = cluster.session("acme", victim)
    held = begin(holder, "STOR held.bin", os.urandom(100_000))
    assert held.conn is not None, held.reply
    other = cluster.session("acme", survivor)
    refused = finish(begin(other, "STOR second.bin", b"second"))
    assert refused.refused, refused.reply
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the supervisor notices the closed channel and releases
        attempt = finish(begin(other, "STOR second.bin", b"second"))
        if attempt.stored:
            break
        assert attempt.refused, attempt.reply
        assert time.monotonic() < deadline, "the reservation was never released"
        time.sleep(0.2)
    assert (cluster_home(cluster, "acme") / "second.bin").read_bytes() == b"second"
    assert held.conn is not None
    held.conn.close()
    holder.close()
    other.quit()
