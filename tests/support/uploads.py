"""Uploads begun and finished apart, and what they left on disk (quota tests).

An upload is *begun* (its 150 received and a first ``HEAD`` bytes sent) before any
of a group is finished, so all of them are in flight at once; the disk is then read
as the partner would see it: delivered files, and upload temporaries that must not
be left behind. Shared by ``test_quota`` (workers of one node) and ``test_cluster``
(nodes of one cluster). Real sockets and TLS: a ``ReusingFTP_TLS`` per session.
"""

from __future__ import annotations

import contextlib
import ftplib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.storage import vfs

HEAD = 1024  # what each upload sends before every upload has begun


# --- one upload, begun and finished apart ---------------------------------------------


@dataclass
class Upload:
    """An upload begun (150 and a first part sent) or refused at once."""

    ftp: ReusingFTP_TLS
    command: str
    data: bytes
    conn: ssl.SSLSocket | None = None
    reply: str = ""  # the final reply, once known
    sent: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def stored(self) -> bool:
        """Answered 226."""
        return self.reply.startswith("226")

    @property
    def refused(self) -> bool:
        """Answered 452, the quota's reply."""
        return self.reply == replies.OVER_QUOTA


def begin(
    ftp: ReusingFTP_TLS, command: str, data: bytes, rest: int | None = None
) -> Upload:
    """Send ``command``; once its 150 arrived, send the first ``HEAD`` bytes."""
    upload = Upload(ftp, command, data)
    try:
        conn, _ = ftp.ntransfercmd(command, rest)
    except ftplib.error_temp as refused:
        upload.reply = str(refused)
        return upload
    assert isinstance(conn, ssl.SSLSocket)
    upload.conn = conn
    try:
        conn.sendall(data[:HEAD])
        upload.sent = min(HEAD, len(data))
    except OSError as err:  # refused already (quota): the reply says why
        upload.errors.append(repr(err))
    return upload


def finish(upload: Upload) -> Upload:
    """Send the rest (with close_notify) and read the final reply."""
    conn = upload.conn
    if conn is None:
        return upload
    try:
        if upload.sent == min(HEAD, len(upload.data)):
            conn.sendall(upload.data[HEAD:])
            conn.unwrap()
    except OSError as err:  # the server cut the data connection: 452
        upload.errors.append(repr(err))
    finally:
        conn.close()
    try:
        upload.reply = upload.ftp.voidresp()
    except ftplib.error_temp as refused:
        upload.reply = str(refused)
    return upload


def run_concurrently(
    sessions: list[ReusingFTP_TLS],
    commands: list[str],
    payloads: list[bytes],
) -> list[Upload]:
    """Begin every upload (each session in its own thread, all at once), then
    finish them all together."""
    gate = threading.Barrier(len(sessions))
    uploads: list[Upload | None] = [None] * len(sessions)
    failures: list[BaseException] = []

    def one(index: int) -> None:
        try:
            upload = begin(sessions[index], commands[index], payloads[index])
            uploads[index] = upload
            with contextlib.suppress(threading.BrokenBarrierError):
                gate.wait(120)  # every upload begun (or refused): now finish
            finish(upload)
        except BaseException as err:  # reported by the test thread
            failures.append(err)
            gate.abort()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not failures, failures
    done = [upload for upload in uploads if upload is not None]
    assert len(done) == len(sessions)
    return done


def finish_together(uploads: list[Upload]) -> None:
    """Finish uploads begun one after another, all at once."""
    threads = [threading.Thread(target=finish, args=(u,)) for u in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)


# --- the disk ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    """What a folder holds: delivered files and upload temporaries."""

    files: dict[str, bytes]  # relative name -> content
    temporaries: list[str]

    @property
    def bytes(self) -> int:
        """Bytes of the delivered files."""
        return sum(len(data) for data in self.files.values())

    def __repr__(self) -> str:
        sizes = {name: len(data) for name, data in self.files.items()}
        return f"Disk(files={sizes}, temporaries={self.temporaries})"


def disk(folder: Path) -> Disk:
    """Every regular file under ``folder``."""
    files: dict[str, bytes] = {}
    temporaries: list[str] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if vfs.is_upload_temp(path.name):
            temporaries.append(path.name)
        else:
            files[str(path.relative_to(folder))] = path.read_bytes()
    return Disk(files, temporaries)


def check_outcome(uploads: list[Upload], names: list[str], folder: Path) -> Disk:
    """Each upload was stored intact (226) or refused (452) leaving nothing."""
    found = disk(folder)
    for upload, name in zip(uploads, names, strict=True):
        assert upload.stored or upload.refused, (upload.command, upload.reply)
        if upload.stored:
            assert found.files.get(name) == upload.data, name
        else:
            assert name not in found.files, name
    assert found.temporaries == [], found.temporaries
    return found
