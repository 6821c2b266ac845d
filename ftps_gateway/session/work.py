"""Slow work off the IO loop, bounded: file copies, hashing, fsync, tree walks.

One IO loop serves every session of a worker, so anything that waits on the disk or
burns CPU for long (seeding a resumed upload, hashing a file, fsync and rename of a
finished upload, walking a quota scope) runs here, on a small thread pool, and its
result comes back to the loop through the waker, like a password verification. hashlib,
os.fsync and file IO release the GIL, so the loop keeps turning meanwhile.

Every queue has a bound: at most ``max_queued`` jobs wait in all, at most
``max_per_owner`` for one session, so one partner cannot starve the others. A refused
submission is the caller's to answer (a 4xx reply); nothing waits unboundedly. A
session holds its input while its job runs, so it has one open or listing job and one
commit at a time: 512 is a real overload (the default ``max_sessions``), not a burst
of small uploads from many partners.

Four threads: a job here mostly waits for the disk (a 2 GiB seed copy, the fsync of
a big upload), holding no CPU, so two long jobs must still leave threads for the
small ones (a 4 KiB upload's open and commit, a listing). They start with the pool,
not on demand, so a worker's thread count is the same from its first upload on
(the fault tests check it returns to where it was). The pool also owns the worker's
hash lane (``storage.hashlane``): uploads' sha256 on its own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ftps_gateway.storage.hashlane import HashLane

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.session.runtime import Waker

logger = logging.getLogger("ftps_gateway")

# shutdown() waits this long for running jobs (a commit's fsync) before it returns.
SHUTDOWN_WAIT_SECONDS = 5.0

_T = TypeVar("_T")


class Outcome(Generic[_T]):
    """What a job returned, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: _T | None, error: BaseException | None) -> None:
        self.value = value
        self.error = error

    def result(self) -> _T:
        """The value, or raise the job's exception."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class FileWork:
    """A bounded pool for one worker's slow file work."""

    def __init__(
        self,
        waker: Waker,
        *,
        threads: int = 4,
        max_queued: int = 512,
        max_per_owner: int = 4,
    ) -> None:
        self._waker = waker
        self.hashing = HashLane()  # uploads' sha256, overlapping their receive
        self.hashing.start()
        self._max_queued = max_queued
        self._max_per_owner = max_per_owner
        self._lock = threading.Lock()
        self._pending = 0
        self._per_owner: dict[str, int] = {}
        self._stopping = False
        # Bounded by max_queued through submit(): never more jobs than that in it.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"file-work_{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running now (for metrics and tests)."""
        return self._pending

    def submit(
        self,
        owner: str,
        job: Callable[[], _T],
        done: Callable[[Outcome[_T]], None],
    ) -> bool:
        """Run ``job`` off the loop; ``done`` runs on the loop with its outcome.

        Returns False (and runs nothing) when the pool or ``owner``'s share is full.
        """
        with self._lock:
            if self._stopping:
                return False
            mine = self._per_owner.get(owner, 0)
            if self._pending >= self._max_queued or mine >= self._max_per_owner:
                return False
            self._pending += 1
            self._per_owner[owner] = mine + 1
        self._jobs.put(_Job(owner, job, done))
        return True

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            if self._stopping:
                self._deliver(item, Outcome(None, CancelledError()))
                continue
            try:
                outcome: Outcome[Any] = Outcome(item.job(), None)
            except BaseException as err:  # noqa: BLE001 - handed to ``done``
                outcome = Outcome(None, err)
            self._deliver(item, outcome)

    def _deliver(self, item: _Job, outcome: Outcome[Any]) -> None:
        self._finished(item.owner)
        done = item.done
        self._waker.call_soon_threadsafe(lambda: done(outcome))

    def _finished(self, owner: str) -> None:
        with self._lock:
            self._pending -= 1
            left = self._per_owner.get(owner, 0) - 1
            if left > 0:
                self._per_owner[owner] = left
            else:
                self._per_owner.pop(owner, None)

    def wake(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the IO loop (for work that reports by itself)."""
        self._waker.call_soon_threadsafe(callback)

    def shutdown(self, wait_seconds: float = SHUTDOWN_WAIT_SECONDS) -> None:
        """Stop taking work; queued jobs are dropped (their ``done`` gets a
        CancelledError), running ones may finish within ``wait_seconds`` (a commit
        half done is still a commit)."""
        with self._lock:
            self._stopping = True
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + wait_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.hashing.close()


class _Job:
    __slots__ = ("done", "job", "owner")

    def __init__(
        self, owner: str, job: Callable[[], Any], done: Callable[[Outcome[Any]], None]
    ) -> None:
        self.owner = owner
        self.job = job
        self.done = done
