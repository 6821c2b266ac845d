"""FileWork: slow jobs off the loop, bounded in all and per owner, results on the loop."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from ftps_gateway.session.work import FileWork, Outcome


class QueueWaker:
    """Collects what would run on the loop; ``drain`` runs it (the test is the loop)."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []
        self.arrived = threading.Semaphore(0)

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self.calls.append(callback)
        self.arrived.release()

    def run(self, count: int) -> None:
        for _ in range(count):
            assert self.arrived.acquire(timeout=5)
        while self.calls:
            self.calls.pop(0)()


def test_results_and_errors_come_back_through_the_waker() -> None:
    """A job's value, or its exception, reaches ``done`` only from the loop side."""
    waker = QueueWaker()
    work = FileWork(waker, threads=1)
    seen: list[Outcome[int]] = []
    assert work.submit("s1", lambda: 6 * 7, seen.append)
    assert work.submit("s1", lambda: 1 // 0, seen.append)
    waker.run(2)
    assert seen[0].result() == 42
    with pytest.raises(ZeroDivisionError):
        seen[1].result()
    assert work.pending == 0
    work.shutdown()


def test_one_owner_cannot_take_the_whole_pool() -> None:
    """Past ``max_per_owner`` an owner is refused while others still get in; past
    ``max_queued`` everyone is; finished jobs free their places."""
    waker = QueueWaker()
    gate = threading.Event()
    work = FileWork(waker, threads=1, max_queued=3, max_per_owner=2)
    done: list[Outcome[bool]] = []
    assert work.submit("greedy", gate.wait, done.append)
    assert work.submit("greedy", gate.wait, done.append)
    assert not work.submit("greedy", gate.wait, done.append)
    assert work.submit("other", gate.wait, done.append)
    assert not work.submit("third", gate.wait, done.append)
    gate.set()
    waker.run(3)
    assert len(done) == 3
    assert work.submit("greedy", lambda: True, done.append)
    waker.run(1)
    work.shutdown()
