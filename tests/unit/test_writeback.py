"""Write-back of an upload's pages during its receive (``storage.writeback``)."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
from pathlib import Path

import pytest

from ftps_gateway.storage import writeback
from ftps_gateway.storage.hashlane import HashLane
from ftps_gateway.storage.uploads import AtomicUpload

needs_sync_file_range = pytest.mark.skipif(
    not writeback.available(), reason="no sync_file_range on this system"
)


def receive(upload: AtomicUpload, data: bytes, chunk: int = 256 * 1024) -> None:
    """What the data channel does with a binary upload (pausing while the ring is
    full, until the lane frees a buffer)."""
    ready = threading.Event()
    offset = 0
    while offset < len(data):
        target = upload.buffer(ready.set)
        if target is None:
            assert ready.wait(10)
            ready.clear()
            continue
        count = min(chunk, len(target), len(data) - offset)
        target[:count] = data[offset : offset + count]
        upload.received(count)
        offset += count


def run_upload(folder: Path, data: bytes) -> AtomicUpload:
    lane = HashLane()
    try:
        upload = AtomicUpload(
            folder / "big.bin", "/big.bin", "alice", lane=lane, wake=lambda cb: cb()
        )
        receive(upload, data)
        upload.commit()
    finally:
        lane.close()
    return upload


@needs_sync_file_range
def test_write_back_is_started_every_step_while_receiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 MiB upload starts the write-back of each 8 MiB step, in order and from
    the lane's thread, and is stored with the right sha256."""
    calls: list[tuple[int, int, str]] = []
    real = writeback.sync_range

    def counting(fd: int, offset: int, nbytes: int) -> None:
        calls.append((offset, nbytes, threading.current_thread().name))
        real(fd, offset, nbytes)

    monkeypatch.setattr(writeback, "sync_range", counting)
    data = os.urandom(40 << 20)
    upload = run_upload(tmp_path, data)
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "big.bin").read_bytes() == data
    # 40 MiB: 5 steps; the commit may hash the last slices itself (no write-back).
    assert 3 <= len(calls) <= 5
    assert calls[0][0] == 0
    for (offset, nbytes, _), (following, _, _) in itertools.pairwise(calls):
        assert following == offset + nbytes  # contiguous ranges, in order
    assert all(n >= writeback.STEP_BYTES for _, n, _ in calls)
    assert {thread for _, _, thread in calls} == {"upload-sha256"}


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_a_failing_sync_file_range_does_not_fail_the_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """EINVAL (a file system without it) or ENOSYS: write-back stops after the first
    refusal, the upload is committed whole with its sha256 all the same."""
    attempts: list[int] = []

    def refusing(fd: int, offset: int, nbytes: int) -> None:
        attempts.append(offset)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", lambda *args: None)
    monkeypatch.setattr(writeback, "sync_range", refusing)
    data = os.urandom(40 << 20)
    upload = run_upload(tmp_path, data)
    assert attempts == [0]
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "big.bin").read_bytes() == data


def test_without_sync_file_range_nothing_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the system has no sync_file_range the policy does nothing at all."""
    monkeypatch.setattr(writeback, "_SYNC_FILE_RANGE", None)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    policy = writeback.WriteBack(path)
    assert not policy.active
    policy.advance(1 << 30)
    assert policy.calls == 0
    policy.close()


@needs_sync_file_range
def test_close_during_a_call_leaves_the_descriptor_to_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` from the loop never waits: a descriptor in use by a write-back call
    stays open until that call returns, then it is closed (never a reused number)."""
    entered, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def slow(fd: int, offset: int, nbytes: int) -> None:
        seen.append(fd)
        entered.set()
        assert release.wait(10)

    monkeypatch.setattr(writeback, "sync_range", slow)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    policy = writeback.WriteBack(path, step=10)
    caller = threading.Thread(target=policy.advance, args=(100,))
    caller.start()
    assert entered.wait(10)
    policy.close()  # returns at once
    os.fstat(seen[0])  # still open: the call holds it
    release.set()
    caller.join(10)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(seen[0])
    assert not policy.active


def cached(path: Path, offset: int) -> bool:
    """True if the page at ``offset`` is in the page cache (a read that must not
    wait for the disk succeeds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as err:  # no RWF_NOWAIT for buffered reads here
        pytest.skip(f"preadv(RWF_NOWAIT): {err}")
    finally:
        os.close(fd)
    return True


@needs_sync_file_range
@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT")
def test_pages_written_back_are_dropped_behind_the_upload(tmp_path: Path) -> None:
    """A big upload does not keep its whole size in the page cache: pages two steps
    behind are waited for and dropped, the newest stay."""
    data = os.urandom(40 << 20)
    upload = run_upload(tmp_path, data)
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    final = tmp_path / "big.bin"
    assert not cached(final, 0)
    assert cached(final, len(data) - 4096)
    assert final.read_bytes() == data
