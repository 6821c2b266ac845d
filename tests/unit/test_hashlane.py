"""UploadDigest and HashLane: sha256 on a second thread, through a bounded ring."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable

import pytest

from ftps_gateway.storage.hashlane import (
    BUFFER_BYTES,
    HAND_OFF_BYTES,
    RING_BUFFERS,
    SPARE_BUFFERS,
    HashLane,
    UploadDigest,
)


class ManualLane(HashLane):
    """A lane whose thread is the test: announced slices wait until ``run``."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[UploadDigest] = []

    def announce(self, digest: UploadDigest) -> bool:
        self.announced.append(digest)
        return True

    def run(self, count: int = 1) -> None:
        for _ in range(count):
            self.announced.pop(0).hash_one()


class Loop:
    """Collects what the lane asks to run on the IO loop."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def wake(self, callback: Callable[[], None]) -> None:
        self.calls.append(callback)


def at_once(callback: Callable[[], None]) -> None:
    """A "loop" that runs the lane's wake-up right away (on the lane's thread)."""
    callback()


def feed(
    digest: UploadDigest, data: bytes, chunk: int, ready: threading.Event | None = None
) -> None:
    """What the data channel does: receive into the ring, then store; with
    ``ready``, wait (as the channel stops reading) until the lane frees a buffer."""
    offset = 0
    while offset < len(data):
        target = digest.buffer(ready.set if ready is not None else lambda: None)
        if target is None:
            assert ready is not None, "the ring is full"
            assert ready.wait(10)
            ready.clear()
            continue
        count = min(chunk, len(target), len(data) - offset)
        target[:count] = data[offset : offset + count]
        digest.received(count)
        digest.hand_off_if_full()
        offset += count


@pytest.mark.parametrize("chunk", [1, 4096, 16_384, HAND_OFF_BYTES + 1, BUFFER_BYTES])
def test_digest_on_the_lane_equals_hashlib(chunk: int) -> None:
    """Whatever the read sizes, the lane's digest is the sha256 of every byte in order."""
    size = 3 * BUFFER_BYTES + 12_345 if chunk > 1 else 70_000
    data = os.urandom(size)
    lane = HashLane()
    digest = UploadDigest(lane, at_once)
    digest.seed(b"existing part ")
    feed(digest, data, chunk, threading.Event())
    assert digest.finish() == hashlib.sha256(b"existing part " + data).hexdigest()
    lane.close()


def test_small_uploads_never_reach_the_lane() -> None:
    """A 4 KiB file stays in the first buffer; finish() hashes it (off the loop)."""
    lane = ManualLane()
    digest = UploadDigest(lane)
    feed(digest, b"x" * 4096, 4096)
    assert lane.announced == []
    assert digest.finish() == hashlib.sha256(b"x" * 4096).hexdigest()


def test_ring_is_the_bound_and_the_lane_wakes_the_reader() -> None:
    """With every buffer waiting for the lane, ``buffer`` is None (the reader stops);
    the first slice hashed frees one and the waiter runs on the loop, once."""
    lane, loop = ManualLane(), Loop()
    digest = UploadDigest(lane, loop.wake)
    data = os.urandom(RING_BUFFERS * HAND_OFF_BYTES)
    feed(digest, data, HAND_OFF_BYTES)
    assert len(lane.announced) == RING_BUFFERS
    woken: list[str] = []
    assert digest.buffer(lambda: woken.append("resume")) is None
    lane.run()
    assert len(loop.calls) == 1
    loop.calls.pop()()
    assert woken == ["resume"]
    assert digest.buffer(lambda: None) is not None
    lane.run(RING_BUFFERS - 1)
    assert loop.calls == []  # nobody was waiting any more
    assert digest.finish() == hashlib.sha256(data).hexdigest()


def test_finish_hashes_what_the_lane_has_not_started() -> None:
    """A busy lane never delays a commit: finish() takes the waiting slices itself."""
    lane = ManualLane()
    digest = UploadDigest(lane)
    data = os.urandom(2 * HAND_OFF_BYTES + 100)
    feed(digest, data, HAND_OFF_BYTES)
    assert len(lane.announced) == 2
    assert digest.finish() == hashlib.sha256(data).hexdigest()
    lane.run(2)  # the lane finds nothing left to do


def test_cancel_drops_waiting_slices_and_wakes_nobody() -> None:
    """A discarded upload's slices are skipped; no paused reader is resumed."""
    lane, loop = ManualLane(), Loop()
    digest = UploadDigest(lane, loop.wake)
    feed(digest, os.urandom(RING_BUFFERS * HAND_OFF_BYTES), HAND_OFF_BYTES)
    assert digest.buffer(lambda: None) is None
    digest.cancel()
    lane.run(RING_BUFFERS)
    assert loop.calls == []


def test_without_a_digest_one_buffer_is_reused() -> None:
    """``upload_sha256 = false``: nothing goes to the lane, nothing is computed."""
    lane = ManualLane()
    digest = UploadDigest(lane, digest=False)
    feed(digest, os.urandom(5 * BUFFER_BYTES), BUFFER_BYTES)
    assert lane.announced == []
    assert digest.finish() is None


def test_many_uploads_share_one_lane_in_order() -> None:
    """Interleaved uploads on one lane each get their own correct digest."""
    lane = HashLane()
    uploads = [(UploadDigest(lane, at_once), os.urandom(random.randrange(1, 4) << 20))
               for _ in range(4)]  # fmt: skip
    ready = threading.Event()
    offsets = [0] * len(uploads)
    while any(o < len(d) for o, (_, d) in zip(offsets, uploads, strict=True)):
        for index, (digest, data) in enumerate(uploads):
            if offsets[index] < len(data):
                take = min(300_000, len(data) - offsets[index])
                feed(digest, data[offsets[index] : offsets[index] + take], take, ready)
                offsets[index] += take
    for digest, data in uploads:
        assert digest.finish() == hashlib.sha256(data).hexdigest()
    lane.close()


def test_buffers_go_back_to_the_lane_once_the_upload_ends() -> None:
    """A finished or discarded upload's buffers serve the next uploads (no fresh MiB
    per file); the lane keeps a bounded number."""
    lane = ManualLane()
    first = UploadDigest(lane)
    feed(first, b"x" * 4096, 4096)
    view = first.buffer(lambda: None)
    assert view is not None
    buffer = view.obj
    first.finish()
    second = UploadDigest(lane)
    again = second.buffer(lambda: None)
    assert again is not None
    assert again.obj is buffer
    second.cancel()
    uploads = [UploadDigest(lane) for _ in range(SPARE_BUFFERS + 4)]
    for upload in uploads:
        assert upload.buffer(lambda: None) is not None
    for upload in uploads:
        upload.cancel()
    assert len(lane._spare) == SPARE_BUFFERS  # the bound
