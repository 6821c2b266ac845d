"""Faults: the server killed, the disk full, storage gone, clients that die or crawl.

Every test runs the server as a real process tree (``ftps-gateway serve``, two
workers unless said otherwise) and checks three things: what the client gets, what
is left on disk, and that the rest keeps serving.
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import io
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.ftp import replies
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import TEMP_MIN_AGE_SECONDS
from support.configs import write_config
from support.credentials import PASSWORD_HASH
from support.process import GatewayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MIB = 1 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (upload temporaries left out): content."""
    tree = {}
    for path in sorted(root.rglob("*")):
        if vfs.is_upload_temp(path.name):
            continue
        relative = str(path.relative_to(root))
        tree[relative] = "dir" if path.is_dir() else _sha(path.read_bytes())
    return tree


def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if vfs.is_upload_temp(p.name))


def _config(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    ports: str,
    *,
    workers: int = 2,
    retention: int = 0,
    server: str = "",
    users: str | None = None,
) -> Path:
    path = write_config(
        tmp_path, cert_files, passive_ports=ports,
        extra="connect_timeout_seconds = 3",
        server_extra=f"workers = {workers}\nlogin_timeout_seconds = 10\n{server}",
        sections='[metrics]\nlisten = "127.0.0.1:0"\n', users=users,
    )  # fmt: skip
    if retention:
        text = path.read_text(encoding="utf-8")
        storage = f'root = "{tmp_path / "storage"}"\n'
        text = text.replace(
            storage, storage + f"partial_retention_seconds = {retention}\n"
        )
        path.write_text(text, encoding="utf-8")
    return path


def _wait(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stopped_cleanly(server: GatewayProcess) -> None:
    assert server.stop() == 0, "".join(server.stderr)
    assert not server.tracebacks(), "".join(server.stderr)


# --- kill -9 during uploads ----------------------------------------------------------


@pytest.mark.parametrize("retention", [3600, 0], ids=["partials-kept", "retention-0"])
def test_kill_9_during_uploads_leaves_no_partial_file_under_a_final_name(  # noqa: PLR0915 - one scenario, before and after the restart
    tmp_path: Path, cert_files: tuple[Path, Path, Path], retention: int
) -> None:
    """kill -9 of the whole tree mid-upload: no final name appears, the old version
    stays, the partials are resumed to the right sha256 (retention > 0) or removed by
    the start-up sweep (retention 0), and nothing else in the tree changes."""
    config = _config(tmp_path, cert_files, "41600-41639", retention=retention)
    home = tmp_path / "storage" / "home" / "acme"
    (home / "sub").mkdir(parents=True)
    (home / "existing.bin").write_bytes(os.urandom(MIB))
    (home / "sub" / "doc.txt").write_text("unrelated\n")
    (home / "target.bin").write_bytes(b"previous version\n")
    before = _snapshot(tmp_path / "storage")

    payload = os.urandom(12 * MIB)
    sent = 3 * MIB
    names = ["target.bin", "new.bin", "sub/new2.bin"]
    server = GatewayProcess(config, cert_files[2], workers=2)
    sessions, conns = [], []
    try:
        for name in names:
            ftp = server.client()
            ftp.voidcmd("TYPE I")
            conn, _ = ftp.ntransfercmd(f"STOR {name}")
            conn.sendall(payload[:sent])
            sessions.append(ftp)
            conns.append(conn)
        # Every byte sent has reached the temporary files: the partials are exact.
        _wait(
            lambda: [p.stat().st_size for p in _temps(home)] == [sent] * len(names),
            "the uploads' data on disk",
        )
    finally:
        server.kill()
        for conn in conns:
            conn.close()
        for ftp in sessions:
            ftp.close()

    # Nothing under a final name; the previous version untouched.
    assert not (home / "new.bin").exists()
    assert not (home / "sub" / "new2.bin").exists()
    assert _snapshot(tmp_path / "storage") == before
    assert len(_temps(home)) == len(names)
    # A crash's leftovers are as old as their last write: let them age past the
    # sweep's safety margin, then restart.
    newest = max(p.stat().st_mtime for p in _temps(home))
    time.sleep(max(0.0, newest + TEMP_MIN_AGE_SECONDS + 1 - time.time()))

    server = GatewayProcess(config, cert_files[2], workers=2)
    try:
        if retention:
            for name in names:
                ftp = server.client()
                ftp.voidcmd("TYPE I")
                assert ftp.sendcmd(f"SIZE {name}") == replies.SIZE.format(size=sent)
                ftp.storbinary(f"STOR {name}", io.BytesIO(payload[sent:]), rest=sent)
                received = io.BytesIO()
                ftp.retrbinary(f"RETR {name}", received.write)
                assert _sha(received.getvalue()) == _sha(payload)
                ftp.quit()
            completed = server.wait_for("upload_completed", len(names))
            assert {r["sha256"] for r in completed} == {_sha(payload)}
            assert {r["path"] for r in completed} == {f"/{n}" for n in names}
            for name in names:
                assert _sha((home / name).read_bytes()) == _sha(payload)
            after = _snapshot(tmp_path / "storage")
            changed = {k for k in before.keys() | after.keys()
                       if before.get(k) != after.get(k)}  # fmt: skip
            assert changed == {"home/acme/" + n for n in names}
            assert _temps(home) == []
        else:
            _wait(lambda: _temps(home) == [], "the start-up sweep")
            assert _snapshot(tmp_path / "storage") == before
            ftp = server.client()
            ftp.voidcmd("TYPE I")
            assert ftp.sendcmd("SIZE target.bin") == "213 17"  # the old file's size
            ftp.quit()
    finally:
        _stopped_cleanly(server)


# --- disk full -----------------------------------------------------------------------


@pytest.fixture
def small_storage(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted as storage.root; unmounted on every exit path."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    root = tmp_path / "storage"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(root)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], check=False).returncode:
            subprocess.run(["umount", "-l", str(root)], check=False)


def _upload_expecting_refusal(ftp: ftplib.FTP, name: str, data: bytes) -> str:
    """Send ``data`` as ``name``; the server may close the data connection early."""
    ftp.voidcmd("TYPE I")
    conn, _ = ftp.ntransfercmd(f"STOR {name}")
    with contextlib.suppress(OSError):
        for offset in range(0, len(data), 256 * 1024):
            conn.sendall(data[offset : offset + 256 * 1024])
        conn.unwrap()  # type: ignore[attr-defined]
    conn.close()
    with pytest.raises(ftplib.error_temp) as refused:
        ftp.voidresp()
    return str(refused.value)


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the filesystem says it is full."""
    with path.open("wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()


def test_disk_full_answers_452_removes_the_upload_and_keeps_serving(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], small_storage: Path
) -> None:
    """ENOSPC mid-upload: 452 to the client, no temporary left (even with partials
    kept), another session's download works, and /readyz says "storage full" while
    the storage root has no room."""
    config = _config(tmp_path, cert_files, "41640-41679", retention=3600)
    home = small_storage / "home" / "acme"
    server = GatewayProcess(config, cert_files[2], workers=2)
    try:
        assert server.readyz() == (200, "ready\n")
        keep = os.urandom(256 * 1024)
        other = server.client()
        other.storbinary("STOR keep.bin", io.BytesIO(keep))

        ballast = small_storage / "ballast"
        ballast.write_bytes(b"\0" * (6 * MIB))
        uploader = server.client()
        reply = _upload_expecting_refusal(uploader, "big.bin", os.urandom(4 * MIB))
        assert reply == replies.STORAGE_FULL
        assert server.wait_for("upload_refused")[0]["reason"] == "storage-full"
        assert not (home / "big.bin").exists()
        assert _temps(small_storage) == []
        assert uploader.sendcmd("NOOP").startswith("200")  # the session goes on

        # Full to the last block: not ready; downloads still work.
        _fill(small_storage / "ballast2")
        status, body = server.readyz()
        assert status == 503
        assert "storage full" in body
        received = io.BytesIO()
        other.retrbinary("RETR keep.bin", received.write)
        assert received.getvalue() == keep
        reply = _upload_expecting_refusal(uploader, "small.bin", os.urandom(MIB))
        assert reply == replies.STORAGE_FULL
        assert _temps(small_storage) == []

        (small_storage / "ballast2").unlink()
        ballast.unlink()
        assert server.readyz() == (200, "ready\n")
        uploader.storbinary("STOR big.bin", io.BytesIO(b"x" * (4 * MIB)))
        assert (home / "big.bin").stat().st_size == 4 * MIB
        uploader.quit()
        other.quit()
    finally:
        _stopped_cleanly(server)


# --- storage trouble -------------------------------------------------------------------


def _without_dac_override() -> tuple[str, ...]:
    """A command prefix under which permission bits bind (root ignores them)."""
    if os.geteuid() != 0:
        return ()
    caps = "-dac_override,-dac_read_search"
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop CAP_DAC_OVERRIDE as root")
    return ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}")


def test_unreadable_storage_root_is_a_clear_error_not_a_crash(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Storage root without permissions: a start-up names it and exits 1; while
    running, sessions get 550 replies and stay usable, and service resumes once the
    permissions are back."""
    config = _config(tmp_path, cert_files, "41680-41699")
    root = tmp_path / "storage"
    root.mkdir()
    prefix = _without_dac_override()
    root.chmod(0)
    try:
        refused = subprocess.run(
            [*prefix, sys.executable, "-m", "ftps_gateway", "serve",
             "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        root.chmod(0o755)
    assert refused.returncode == 1, refused.stderr
    assert f"storage.root: cannot create user homes under {root}" in refused.stderr
    assert "Permission denied" in refused.stderr
    assert "Traceback" not in refused.stderr

    server = GatewayProcess(config, cert_files[2], workers=2, prefix=prefix)
    try:
        ftp = server.client()
        ftp.storbinary("STOR before.txt", io.BytesIO(b"before"))
        root.chmod(0)
        try:
            with pytest.raises(ftplib.error_perm, match="^550"):
                ftp.storbinary("STOR during.txt", io.BytesIO(b"during"))
            with pytest.raises(ftplib.error_perm, match="^550"):
                ftp.retrbinary("RETR before.txt", lambda _: None)
            assert ftp.sendcmd("NOOP").startswith("200")
        finally:
            root.chmod(0o755)
        received = io.BytesIO()
        ftp.retrbinary("RETR before.txt", received.write)
        assert received.getvalue() == b"before"
        ftp.quit()
        refusals = server.events("upload_refused")
        assert [r["reason"] for r in refusals] == ["Permission denied"]
    finally:
        _stopped_cleanly(server)


def test_home_deleted_while_logged_in(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A user's home removed under a logged-in session: its commands fail with
    5xx replies, the session and the server go on, and the next login recreates it."""
    config = _config(tmp_path, cert_files, "41700-41719")
    server = GatewayProcess(config, cert_files[2], workers=2)
    home = tmp_path / "storage" / "home" / "acme"
    try:
        ftp = server.client()
        ftp.storbinary("STOR a.txt", io.BytesIO(b"a"))
        shutil.rmtree(home)
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.storbinary("STOR b.txt", io.BytesIO(b"b"))
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.retrbinary("RETR a.txt", lambda _: None)
        assert ftp.nlst() == []  # "/" without its folder lists as empty
        assert ftp.sendcmd("NOOP").startswith("200")
        ftp.quit()

        again = server.client()  # the login creates the home again
        again.storbinary("STOR c.txt", io.BytesIO(b"c"))
        assert again.nlst() == ["c.txt"]
        again.quit()
    finally:
        _stopped_cleanly(server)


def test_missing_mount_source_at_start_up(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A mount whose source cannot exist (its parent is a file): the server starts,
    the log names the folder, paths into that mount get 550, the rest works."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a folder should be\n")
    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
        f'[[users.mounts]]\npath = "/partner"\nsource = "{blocker / "partner"}"\n'
        'permissions = "read-write"\n'
    )
    config = _config(tmp_path, cert_files, "41720-41739", users=users)
    server = GatewayProcess(config, cert_files[2], workers=2)
    try:
        ftp = server.client()
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.storbinary("STOR /partner/x.txt", io.BytesIO(b"x"))
        with pytest.raises(ftplib.error_perm, match="^550"):
            ftp.nlst("/partner")
        ftp.storbinary("STOR /home.txt", io.BytesIO(b"home"))
        assert "home.txt" in ftp.nlst("/")
        ftp.quit()
        logged = f"cannot create {blocker / 'partner'} for acme: Not a directory"
        assert any(logged in line for line in server.stderr), server.stderr
    finally:
        _stopped_cleanly(server)


# --- clients that die or crawl ---------------------------------------------------------


def _tls_client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), for raw sockets."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert sock.recv(1024).startswith(b"220")
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed client (or a pulled cable) does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_dying_and_crawling_clients_cost_bounded_resources_and_no_cpu(  # noqa: PLR0915 - the crawlers must overlap in one measurement
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Clients that die mid-handshake, mid-transfer and between PASV and connect,
    and slowloris on the control and data channels: timers close them, the server's
    fds and passive ports return to where they were, no temporary file is left, it
    spends (almost) no CPU while they crawl, and a normal session works throughout."""
    config = _config(
        tmp_path, cert_files, "41740-41749", workers=1,
        server="idle_timeout_seconds = 4",
    )  # fmt: skip
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            "login_timeout_seconds = 10", "login_timeout_seconds = 4"
        ),
        encoding="utf-8",
    )
    server = GatewayProcess(config, cert_files[2], workers=1)
    home = tmp_path / "storage" / "home" / "acme"
    hello = _tls_client_hello()
    try:
        warm = server.client()
        warm.storbinary("STOR warm.bin", io.BytesIO(b"w" * 1000))
        warm.quit()
        time.sleep(1)
        baseline = server.usage()

        # Mid-handshake: a partial ClientHello, then a reset.
        sock = _connect(server.port)
        sock.sendall(b"AUTH TLS\r\n")
        assert sock.recv(1024).startswith(b"234")
        sock.sendall(hello[: len(hello) // 2])
        _reset(sock)

        # Mid-transfer: 1 MiB of a STOR, then both connections reset.
        ftp = server.client()
        ftp.voidcmd("TYPE I")
        conn, _ = ftp.ntransfercmd("STOR dead.bin")
        conn.sendall(os.urandom(MIB))
        _reset(conn)
        _reset(ftp.sock)
        ftp.close()

        # Between PASV and connect: the session vanishes with a port open for it.
        ftp = server.client()
        ftp.sendcmd("PASV")
        _reset(ftp.sock)
        ftp.close()

        # PASV, then nobody connects: 425 after passive.connect_timeout_seconds.
        lingering = server.client()
        lingering.sendcmd("EPSV")
        lingering.putcmd("LIST")
        assert lingering.getresp().startswith("150")
        with pytest.raises(ftplib.error_temp, match="^425"):
            lingering.getresp()

        # Slowloris, control channel: bytes of "USER" that never end a line, before
        # TLS and inside TLS (after AUTH TLS), and after login.
        crawlers = []
        plain = _connect(server.port)
        crawlers.append(("control-plain", plain, plain))
        tls_control = server.client()
        crawlers.append(("control-logged-in", tls_control.sock, tls_control.sock))
        # Slowloris, data channel: the TLS handshake one byte at a time.
        data_ftp = server.client()
        port = int(data_ftp.sendcmd("EPSV").split("|")[-2])
        data_raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        crawlers.append(("data-handshake", data_raw, data_raw))

        cpu_before = server.cpu_seconds()
        started = time.monotonic()
        closed: dict[str, bool] = {}
        for step in range(10):  # one byte per crawler every second, for 10 s
            for name, sock, _ in crawlers:
                if name in closed:
                    continue
                byte = hello[step : step + 1] if name == "data-handshake" else b"U"
                try:
                    sock.send(byte)
                except OSError:
                    closed[name] = True
            time.sleep(1)
        elapsed = time.monotonic() - started
        cpu = server.cpu_seconds() - cpu_before
        for name, sock, _ in crawlers:
            if name not in closed:
                closed[name] = _closed_by_server(sock, 15)
            sock.close()
        tls_control.close()
        assert closed == dict.fromkeys(closed, True)
        # No busy loop: ten seconds of crawling clients cost a few timer wake-ups.
        assert cpu < 0.1 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s"
        lingering.close()  # idle longer than its timeout: closed by the server
        data_ftp.close()

        # A normal session meanwhile and afterwards.
        ftp = server.client()
        ftp.storbinary("STOR after.bin", io.BytesIO(b"a" * 1000))
        ftp.quit()

        # Everything those clients held is released.
        pid = server.pids()[0]
        _wait(lambda: server.usage()[pid].fds == baseline[pid].fds, "fds released")
        assert server.usage()[pid].threads == baseline[pid].threads
        assert not (home / "dead.bin").exists()
        assert _temps(home) == []
        reasons = {r.get("reason") for r in server.events("data_refused")}
        assert "no-connection-within-timeout" in reasons
        assert any(str(r.get("reason", "")).startswith("tls-handshake") for r in
                   server.events("data_refused"))  # fmt: skip
        # Both control-channel crawlers were closed by a timer (idle or login).
        timers = server.events("idle_timeout") + server.events("login_timeout")
        assert len(timers) >= 2, timers
        failed = server.events("upload_failed")
        assert [r["path"] for r in failed] == ["/dead.bin"]
    finally:
        _stopped_cleanly(server)
