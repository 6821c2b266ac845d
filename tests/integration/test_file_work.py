"""Slow file work off the IO loop: another session keeps being served meanwhile.

Issue 14, item 3: APPE onto a 400 MiB file held every other session of the worker
1.3 s (seeding copies and hashes the existing file on the loop), and the quota walk,
fsync and listings ran there too. Here the big-file scenarios run against a real
one-worker server process (so the test's own clients share no GIL with it) with a
second session sending NOOPs the whole time: the round trips are printed (figures,
never asserted: the machine is shared), and what is asserted is order, which no
load can fake: NOOPs answered while the APPE waits for its 150, a 226 that never
comes before the fsync has returned.

``FTPS_TEST_BIG_MIB`` sets the big file's size (default 200; the bench's long form
measures 2 GiB).
"""

from __future__ import annotations

import contextlib
import errno
import ftplib
import hashlib
import os
import select
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.storage import uploads, vfs
from support.configs import write_config
from support.gateway import RunningGateway
from support.process import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1 << 20
BIG_BYTES = int(os.environ.get("FTPS_TEST_BIG_MIB", "200")) * MIB
PORTS = "43100-43139"
StartGateway = Callable[..., RunningGateway]


def _write_big(path: Path, size: int) -> bytes:
    """``size`` bytes of real (random) data; returns one MiB of it for checks."""
    chunk = os.urandom(MIB)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(chunk)
        out.write(chunk[: size % MIB])
    return chunk


def _sha_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


class NoopProber:
    """A second partner's session sending NOOP every 5 ms on its own thread."""

    def __init__(self, ftp: ReusingFTP_TLS) -> None:
        self.ftp = ftp
        self.samples: list[tuple[float, float]] = []  # (start, end), monotonic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                self.ftp.voidcmd("NOOP")
                self.samples.append((began, time.monotonic()))
                time.sleep(0.005)
        except BaseException as err:
            self.error = err

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.samples:  # at least one answer before the scenario starts
            assert self.error is None, self.error
            assert time.monotonic() < deadline, "no NOOP answered"
            time.sleep(0.01)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, repr(self.error)
        self.ftp.quit()

    def answered_within(self, began: float, ended: float) -> list[float]:
        """Round trips (s) of NOOPs sent and answered inside [began, ended]."""
        return [
            end - start for start, end in self.samples if began <= start <= end <= ended
        ]

    def in_flight(self, began: float, ended: float) -> list[float]:
        """Round trips (s) of NOOPs in flight at any moment of [began, ended]."""
        return sorted(end - start for start, end in self.samples
                      if start <= ended and end >= began)  # fmt: skip


def _figures(label: str, latencies: list[float]) -> str:
    if not latencies:
        return f"{label}: no NOOP"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"{label}: {len(ordered)} NOOPs, median {statistics.median(ordered) * 1000:.1f}"
        f" ms, p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


@pytest.fixture
def one_worker(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> Iterator[GatewayProcess]:
    """A real one-worker server process: both sessions share one IO loop."""
    config = write_config(
        tmp_path, cert_files, passive_ports=PORTS,
        server_extra="workers = 1\nlogin_timeout_seconds = 10\n",
        sections='[metrics]\nlisten = "127.0.0.1:0"\n',
    )  # fmt: skip
    server = GatewayProcess(config, cert_files[2], workers=1)
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.stderr)
        assert not server.tracebacks(), "".join(server.stderr)


def test_appe_onto_a_big_file_leaves_the_worker_answering(
    one_worker: GatewayProcess, tmp_path: Path
) -> None:
    """While APPE copies and hashes a big file into its temporary (before the 150),
    another session's NOOPs are answered; the result and its audited sha256 are the
    whole file."""
    home = tmp_path / "storage" / "home" / "acme"
    target = home / "big.bin"
    _write_big(target, BIG_BYTES)
    before = hashlib.sha256()
    with target.open("rb") as source:
        while block := source.read(4 * MIB):
            before.update(block)
    before.update(b"tail")
    uploader = one_worker.client()
    uploader.voidcmd("TYPE I")
    with NoopProber(one_worker.client()) as prober:
        sent = time.monotonic()
        conn = uploader.transfercmd("APPE big.bin")  # returns on the 150
        opened = time.monotonic()
        conn.sendall(b"tail")
        conn.unwrap()  # type: ignore[attr-defined]
        conn.close()
        uploader.voidresp()
        done = time.monotonic()
    uploader.quit()
    during_open = prober.answered_within(sent, opened)
    print(
        f"\nAPPE onto {BIG_BYTES // MIB} MiB: 150 after {opened - sent:.2f} s, 226 after"
        f" {done - sent:.2f} s; {_figures('NOOP during APPE', prober.in_flight(sent, done))}"
    )
    # Answered while the APPE's file was being prepared: the loop was not in it.
    assert len(during_open) >= 3, _figures("before the 150", during_open)
    assert target.stat().st_size == BIG_BYTES + 4
    assert _sha_of_file(target) == before.hexdigest()
    completed = one_worker.wait_for("upload_completed")
    assert completed[-1]["sha256"] == before.hexdigest()
    assert not [p for p in home.iterdir() if vfs.is_upload_temp(p.name)]


def test_a_big_upload_and_its_commit_leave_the_worker_answering(
    one_worker: GatewayProcess, tmp_path: Path
) -> None:
    """A big STOR (sha256 on the hash lane, fsync and rename off the loop): NOOP
    figures printed; the file and its audited sha256 are right."""
    source = tmp_path / "source.bin"
    _write_big(source, BIG_BYTES)
    expected = _sha_of_file(source)
    uploader = one_worker.client()
    uploader.voidcmd("TYPE I")
    with NoopProber(one_worker.client()) as prober, source.open("rb") as data:
        began = time.monotonic()
        conn = uploader.transfercmd("STOR big.bin")
        while block := data.read(MIB):
            conn.sendall(block)
        last_byte = time.monotonic()
        conn.unwrap()  # type: ignore[attr-defined]
        conn.close()
        uploader.voidresp()
        done = time.monotonic()
    uploader.quit()
    print(
        f"\nSTOR {BIG_BYTES // MIB} MiB: data {last_byte - began:.2f} s, last byte to"
        f" 226 {(done - last_byte) * 1000:.0f} ms;"
        f" {_figures('NOOP during upload', prober.in_flight(began, done))};"
        f" {_figures('NOOP last byte to 226', prober.in_flight(last_byte, done))}"
    )
    stored = tmp_path / "storage" / "home" / "acme" / "big.bin"
    assert _sha_of_file(stored) == expected
    assert one_worker.wait_for("upload_completed")[-1]["sha256"] == expected


# --- the 226 and the disk (in-process: the test holds the fsync) ----------------------


class HeldSync:
    """``uploads.sync_file`` wrapped: the real fsync, once the test lets it run."""

    def __init__(self, error: int | None = None) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.synced = threading.Event()
        self.error = error

    def __call__(self, fd: int) -> None:
        self.entered.set()
        assert self.release.wait(60), "the test never released the fsync"
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        os.fsync(fd)
        self.synced.set()


@contextlib.contextmanager
def _held_upload(
    gw: RunningGateway, name: str, payload: bytes, monkeypatch: pytest.MonkeyPatch,
    error: int | None = None,
) -> Iterator[tuple[ReusingFTP_TLS, HeldSync]]:  # fmt: skip
    """An upload sent whole, its commit held at the fsync; yields (client, hold)."""
    hold = HeldSync(error)
    monkeypatch.setattr(uploads, "sync_file", hold)
    ftp = gw.client()
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd(f"STOR {name}")
    conn.sendall(payload)
    conn.unwrap()  # type: ignore[attr-defined]
    conn.close()
    assert hold.entered.wait(30), "the commit never reached the fsync"
    try:
        yield ftp, hold
    finally:
        hold.release.set()


def _nothing_to_read(ftp: ReusingFTP_TLS, seconds: float) -> bool:
    """True if no reply reaches the control connection within ``seconds`` (the
    client has read everything up to the 150, so a reply would make it readable)."""
    sock = ftp.sock
    assert sock is not None
    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def test_226_only_once_the_upload_is_fsynced_and_in_place(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the commit waits in fsync: no 226, no file under its name, and another
    session's NOOPs are answered; the 226 comes after the fsync returned."""
    payload = os.urandom(3 * MIB + 5)
    other = gateway.client()
    with _held_upload(gateway, "held.bin", payload, monkeypatch) as (ftp, hold):
        for _ in range(5):
            assert other.voidcmd("NOOP").startswith("200")
        assert _nothing_to_read(ftp, 1.0), "a reply came before the fsync returned"
        assert not (gateway.home() / "held.bin").exists()
        hold.release.set()
        reply = ftp.voidresp()
        assert hold.synced.is_set()  # the fsync had returned before the 226 was read
    assert reply.startswith("226")
    assert (gateway.home() / "held.bin").read_bytes() == payload
    ftp.quit()
    other.quit()


@pytest.mark.parametrize(
    ("error", "reply"),
    [(errno.ENOSPC, replies.STORAGE_FULL), (errno.EIO, replies.UPLOAD_NOT_STORED)],
    ids=["enospc-452", "eio-451"],
)
def test_a_failed_fsync_is_answered_and_leaves_nothing(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, error: int, reply: str
) -> None:
    """fsync failing (disk full, I/O error): 452 or 451, the previous version of the
    file untouched, no temporary left, and the session goes on."""
    old = b"the previous version"
    (gateway.home() / "report.csv").write_bytes(old)
    with _held_upload(
        gateway, "report.csv", os.urandom(MIB), monkeypatch, error
    ) as (ftp, hold):  # fmt: skip
        hold.release.set()
        with pytest.raises(ftplib.Error) as refused:
            ftp.voidresp()
    assert str(refused.value) == reply
    assert (gateway.home() / "report.csv").read_bytes() == old
    assert not [p for p in gateway.home().iterdir() if vfs.is_upload_temp(p.name)]
    assert ftp.voidcmd("NOOP").startswith("200")
    ftp.quit()


def test_a_failed_rename_is_answered_451_and_leaves_nothing(
    gateway: RunningGateway,
) -> None:
    """A folder appears under the upload's name while it is sent (a local process):
    the rename fails for real, 451, the folder stays, no temporary is left."""
    ftp = gateway.client()
    ftp.voidcmd("TYPE I")
    conn = ftp.transfercmd("STOR clash.bin")
    conn.sendall(os.urandom(MIB))
    (gateway.home() / "clash.bin").mkdir()
    (gateway.home() / "clash.bin" / "inside.txt").write_text("kept")
    conn.unwrap()  # type: ignore[attr-defined]
    conn.close()
    with pytest.raises(ftplib.error_temp) as refused:
        ftp.voidresp()
    assert str(refused.value) == replies.UPLOAD_NOT_STORED
    assert (gateway.home() / "clash.bin" / "inside.txt").read_text() == "kept"
    assert not [p for p in gateway.home().iterdir() if vfs.is_upload_temp(p.name)]
    ftp.quit()


# --- listings ------------------------------------------------------------------------

LISTED_FILES = 20_000


def test_listing_a_big_folder_leaves_the_worker_answering(
    one_worker: GatewayProcess, tmp_path: Path
) -> None:
    """LIST, NLST and MLSD of a folder of 20,000 files are read and rendered off the
    loop (NOOPs answered before the 150) and come complete."""
    folder = tmp_path / "storage" / "home" / "acme" / "many"
    folder.mkdir(parents=True)
    for index in range(LISTED_FILES):
        os.close(os.open(folder / f"f{index:05d}.csv", os.O_CREAT | os.O_WRONLY))
    lister = one_worker.client()
    with NoopProber(one_worker.client()) as prober:
        for command in ("LIST many", "NLST many", "MLSD many"):
            lines: list[str] = []
            sent = time.monotonic()
            conn = lister.transfercmd(command)
            opened = time.monotonic()
            with conn.makefile("r", encoding="utf-8") as reader:
                lines = reader.read().splitlines()
            conn.unwrap()  # type: ignore[attr-defined]
            conn.close()
            lister.voidresp()
            done = time.monotonic()
            during = prober.answered_within(sent, opened)
            print(
                f"\n{command}: 150 after {opened - sent:.2f} s, 226 after "
                f"{done - sent:.2f} s; {_figures('NOOP', prober.in_flight(sent, done))}"
            )
            assert len(lines) == LISTED_FILES, command
            assert len(during) >= 3, _figures(f"{command} before the 150", during)
    status = lister.sendcmd("STAT many/f00042.csv")
    assert "f00042.csv" in status
    lister.quit()
