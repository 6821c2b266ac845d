"""Quota of uploads, exact across sessions, workers and nodes: walks and reservations.

Issue 14 (item 2): room measured once when an upload starts let every session of a
user (and every user of a shared mount) store a whole quota. Here an upload
*reserves* its room through the shared state (``session.state``: in-process, the
supervisor's, or Redis, whichever ``gateway.state`` is), so a grant is decided
where every upload's reservations are counted:

- **At the start** (``QuotaPlan``, then ``UploadReservation.start``): the usage of
  each scope the upload counts in (``vfs.QuotaScope``: the mount's, the user's) is
  walked off the loop, with the scope's committed counters read *before* the walk
  (``state.quota_marks``), and a first chunk is reserved: the upload's current size
  (what a resume starts from) plus ``FIRST_CHUNK_BYTES``, and one file. A refusal is
  ``452`` and leaves nothing.
- **As it writes** (``want``, ``prefetch``): an upload's size is unknown in advance,
  so it asks for more ahead of need, the next chunk half as large as what it holds
  (``FIRST_CHUNK_BYTES`` to ``MAX_CHUNK_BYTES``: one request per 16 MiB at most
  for a big file, never one per network read). Only when data arrives that the
  grant does not cover does the data connection stop reading until the answer.
  Refused, it asks for less (a quarter each time) down to exactly what the data
  in hand needs; refused that, it waits for room to come back (other uploads
  ending) for a while, then ``452``. Uploads that fill a quota together would
  otherwise be refused together, each while the others still hold their part
  (measured, 8 x 300,000 bytes at once into 1,000,000 on two workers: refusing at
  once stored 0 to 3 files, 2.0 on average over 11 runs; waiting stored 3, the most
  that fit, in 10 of 10); each waits a random part of ``QUOTA_WAIT_SECONDS``, so
  one gives up first and the others go on with its room.
- **At the end** (``ended``, from ``AtomicUpload``): the reservation is released
  with what the upload changed on disk, in the scope's committed counters.

The arithmetic (per scope; ``state`` grants iff every scope fits):
``walked - credit + committed since the mark + every reservation + asked <= limit``.
The *credit* is what the upload will replace, which the walk counted: the existing
file it overwrites (bytes and its one file, measured after the walk), and for a
resume the partial it continues (only with a fresh walk made in the same job, after
the temporary was found). Its reservation then covers the whole size the file may
reach. At the end it reports ``size - replaced - continued`` bytes and, if it added
a name, one file; never less than zero (see below).

Why nothing negative is reported (a smaller file replacing a larger one, DELE):
a walk running while a file shrinks or disappears may already have seen it gone,
and if its mark was read before the report, subtracting it again would undercount
and grant more than the limit. Counted only by the next walk, the freed room is
late, never wrong. A DELE through the gateway forgets this worker's cached walks
of the file's scopes, so the next upload here walks again.

Walks are cached per scope for ``WALK_TTL_SECONDS`` with their mark
(``QuotaWalks``): a cached walk plus the committed counters since its mark is still
exact for everything committed through the gateway (that is what the counters are
for); what the cache can miss for that long is what changed outside the gateway,
deletions on other workers (late room, never excess) and a worker killed between
a commit's rename and its report. A resume walks afresh. The in-flight temporaries
of other uploads are counted by a walk and by their reservations both: errs towards
refusing while they run, for at most one cached walk's lifetime.

Protocol-neutral; imports the storage floor and ``session.state``.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.session.state import QuotaClaim, QuotaMark
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ftps_gateway.session.state import SharedState
    from ftps_gateway.storage.uploads import UploadEnd

# The first chunk an upload reserves beyond the size it starts at, and the largest
# it asks at once. Small enough that eight uploads starting together into a 1 MB
# quota do not each take it all; large enough that a 1 GiB upload asks ~70 times.
FIRST_CHUNK_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
# How long an upload whose data needs more room than is free waits at most for room
# to come back before 452 (each a random part of it: a quarter to all), and how often
# it asks again meanwhile (with jitter).
QUOTA_WAIT_SECONDS = 2.0
QUOTA_RETRY_SECONDS = 0.1
# How long a scope's walk (with its mark) is reused by later uploads of this worker.
WALK_TTL_SECONDS = 2.0
MAX_CACHED_WALKS = 4096  # scopes remembered per worker (oldest forgotten first)

_ids = itertools.count(1)


class QuotaUnavailableError(Exception):
    """A scope's committed counters could not be read (the shared state is gone):
    the upload is refused, as every reservation would be."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(scope)


@dataclass(frozen=True)
class Walk:
    """A scope's usage, and its committed counters read before it was measured."""

    usage: vfs.Usage
    mark: QuotaMark
    at: float  # monotonic time of the walk


class QuotaWalks:
    """Recent walks of quota scopes, shared by a worker's sessions (any thread)."""

    def __init__(
        self,
        ttl_seconds: float = WALK_TTL_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_CACHED_WALKS,
    ) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._walks: dict[tuple[str, tuple[str, ...]], Walk] = {}

    @staticmethod
    def _key(scope: vfs.QuotaScope) -> tuple[str, tuple[str, ...]]:
        return scope.key, tuple(str(root) for root in scope.roots)

    def fresh(self, scope: vfs.QuotaScope) -> Walk | None:
        """The scope's walk if it is recent enough to reuse."""
        with self._lock:
            walk = self._walks.get(self._key(scope))
        if walk is None or self._clock() - walk.at > self._ttl:
            return None
        return walk

    def now(self) -> float:
        """The clock walks are stamped with."""
        return self._clock()

    def remember(self, scope: vfs.QuotaScope, walk: Walk) -> None:
        """Keep ``walk`` for later uploads (a newer walk replaces an older one)."""
        key = self._key(scope)
        with self._lock:
            known = self._walks.get(key)
            if known is not None and known.at > walk.at:
                return
            self._walks.pop(key, None)
            self._walks[key] = walk
            while len(self._walks) > self._max:
                del self._walks[next(iter(self._walks))]

    def forget(self, scopes: Sequence[vfs.QuotaScope]) -> None:
        """Drop the walks of ``scopes`` (something in them was deleted)."""
        with self._lock:
            for scope in scopes:
                self._walks.pop(self._key(scope), None)


class QuotaPlan:
    """Which walks an upload needs, made on the loop before its open job.

    ``needs_marks`` are the scopes to walk afresh (no recent walk, or a resume);
    the loop reads their marks (``state.quota_marks``) and hands them in with
    ``set_marks``; the job then walks them (``walk``), reusing the others.
    """

    def __init__(
        self,
        scopes: Sequence[vfs.QuotaScope],
        walks: QuotaWalks,
        *,
        resume: bool,
    ) -> None:
        self.scopes = tuple(scopes)
        self.walks = walks
        self.resume = resume
        self._cached = {} if resume else {s.key: walks.fresh(s) for s in scopes}
        self._marks: dict[str, QuotaMark] = {}

    @property
    def needs_marks(self) -> list[str]:
        """Keys of the scopes to walk afresh."""
        return [s.key for s in self.scopes if self._cached.get(s.key) is None]

    def set_marks(self, marks: Mapping[str, QuotaMark]) -> None:
        """The committed counters, read before walking (missing: refuse to guess)."""
        self._marks = dict(marks)

    def walk(self) -> dict[str, Walk]:
        """Each scope's walk: reused, or made now (off the loop: it reads the disk).

        Raises:
            QuotaUnavailableError: a scope's mark was never read.
        """
        found: dict[str, Walk] = {}
        for scope in self.scopes:
            cached = self._cached.get(scope.key)
            if cached is not None:
                found[scope.key] = cached
                continue
            mark = self._marks.get(scope.key)
            if mark is None:
                raise QuotaUnavailableError(scope.name)
            at = self.walks.now()
            walk = Walk(vfs.usage(scope.roots), mark, at)
            self.walks.remember(scope, walk)
            found[scope.key] = walk
        return found


@dataclass(frozen=True)
class Credit:
    """What an upload will replace that the walks counted (see the module docstring)."""

    nbytes: int = 0
    files: int = 0


class UploadReservation:
    """One upload's room, reserved through the shared state as it grows.

    Implements ``storage.uploads.UploadQuota``. Loop side: ``start``, ``want``,
    ``prefetch``, ``granted``; ``ended`` from any thread (it hops to the loop).
    At most one request is in flight at a time.
    """

    def __init__(
        self,
        state: SharedState,
        wake: Callable[[Callable[[], None]], None],
        owner: str,
        *,
        scopes: Sequence[vfs.QuotaScope],
        walks: Mapping[str, Walk],
        credit: Credit,
        start_size: int,
        later: Callable[[float, Callable[[], None]], object],
        clock: Callable[[], float] = time.monotonic,
        patience: Callable[[], float] | None = None,
    ) -> None:
        """Args:
        state: where reservations are granted (``gateway.state``; on the loop).
        wake: runs a callback on the IO loop from any thread.
        owner: the session's id (reservation ids start with it).
        walks: each scope's walk, by key (``QuotaPlan.walk``).
        credit: what the upload replaces that the walks counted.
        start_size: the size the upload starts at (a resume's data).
        later: ``later(seconds, callback)`` on the loop (the loop's call_later).
        patience: how long this upload waits for room once refused (default: a
            random part of ``QUOTA_WAIT_SECONDS``).
        """
        self._state = state
        self._wake = wake
        self.reservation = f"{owner}.{next(_ids)}"
        self._scopes = tuple(scopes)
        self._walks = dict(walks)
        self._credit = credit
        self._names = {scope.key: scope.name for scope in scopes}
        self._start_size = start_size
        self._granted = 0
        self._chunk = FIRST_CHUNK_BYTES
        self._asking = False
        self._asked = False  # something was requested: a release is due at the end
        self._tight = False  # a look-ahead was refused: ask only for what is needed
        self._waiting: tuple[int, Callable[[str | None], None]] | None = None
        self._ended = False
        self._later = later
        self._clock = clock
        self._patience = patience or _random_patience
        self._wait_until: float | None = None  # refused: waiting for room until then

    @property
    def granted(self) -> int:
        """The size the upload may reach now."""
        return self._granted

    @property
    def first_scope(self) -> str:
        """The name of the first scope (what a write past the grant reports)."""
        return self._scopes[0].name if self._scopes else ""

    # --- asking

    def start(self, done: Callable[[str | None], None]) -> None:
        """Reserve the upload's start: its current size, a first chunk, one file."""
        self._want(self._start_size, done, files=1)

    def want(self, size: int, done: Callable[[str | None], None]) -> None:
        """Make the room at least ``size``; ``done(None)``, or the full scope's name."""
        self._want(size, done, files=0)

    def prefetch(self, size: int) -> None:
        """Ask for the next chunk once less than half a chunk is left."""
        if self._asking or self._tight or self._ended:
            return
        if self._granted - size >= self._chunk // 2:
            return
        ask = self._chunk
        room = self._local_room()
        if room is not None:
            ask = min(ask, room)
        if ask <= 0:
            self._tight = True
            return

        def answered(full: str | None) -> None:
            if full is not None:
                self._tight = True
            self._after_answer()

        self._ask(ask, 0, answered)

    def _want(self, size: int, done: Callable[[str | None], None], files: int) -> None:
        if self._ended:
            done(self.first_scope)
            return
        if self._asking:
            self._waiting = (size, done)  # after the answer on its way
            return
        need = size - self._granted
        if need <= 0 and not files:
            done(None)
            return
        need = max(need, 0)
        full = self._locally_full(need, files)
        if full is not None:
            done(full)  # cannot fit, whatever the others hold: no request
            return
        room = self._local_room()
        # The start asks its size plus a chunk; growth asks a chunk (at least the
        # need); neither more than could fit.
        ask = need + (self._chunk if files else max(self._chunk - need, 0))
        if room is not None:
            ask = min(ask, room)
        self._try(ask, need, size, files, done)

    def _try(
        self,
        ask: int,
        need: int,
        size: int,
        files: int,
        done: Callable[[str | None], None],
    ) -> None:
        def answered(full: str | None) -> None:
            if full is None or self._ended:
                done(None if full is None else self._names.get(full, full))
            elif ask > need:
                self._try(max(need, ask // 4), need, size, files, done)
                return
            elif not files and self._may_wait():  # growing: room may come back
                delay = QUOTA_RETRY_SECONDS * random.uniform(0.5, 1.5)  # noqa: S311 - jitter
                self._later(delay, lambda: self._want(size, done, files=0))
                return
            else:
                done(self._names.get(full, full))
            self._after_answer()

        self._ask(ask, files, answered)

    def _may_wait(self) -> bool:
        """Refused what the data needs: wait (a while) for room to come back?"""
        now = self._clock()
        if self._wait_until is None:
            self._wait_until = now + self._patience()
        return now < self._wait_until

    def _ask(self, nbytes: int, files: int, then: Callable[[str | None], None]) -> None:
        self._asking = True
        self._asked = True
        claims = [self._claim(scope, nbytes, files) for scope in self._scopes]

        def answered(full: str | None) -> None:
            self._asking = False
            if full is None and not self._ended:
                self._wait_until = None
                self._granted += nbytes
                self._chunk = min(
                    MAX_CHUNK_BYTES, max(FIRST_CHUNK_BYTES, self._granted // 2)
                )
            then(full)

        self._state.reserve(self.reservation, claims, answered)

    def _after_answer(self) -> None:
        """A want that came while a request was out: now."""
        if self._waiting is not None and not self._asking:
            size, done = self._waiting
            self._waiting = None
            self.want(size, done)

    def _claim(self, scope: vfs.QuotaScope, nbytes: int, files: int) -> QuotaClaim:
        walk = self._walks[scope.key]
        return QuotaClaim(
            scope=scope.key,
            max_bytes=scope.max_bytes,
            max_files=scope.max_files,
            walked_bytes=walk.usage.bytes - self._credit.nbytes,
            walked_files=walk.usage.files - self._credit.files,
            mark=walk.mark,
            nbytes=nbytes,
            files=files,
        )

    def _local_room(self) -> int | None:
        """Bytes more than the grant that could fit at best (others ignored); None
        when no scope limits bytes. The store can only grant less."""
        rooms = [
            scope.max_bytes
            - (self._walks[scope.key].usage.bytes - self._credit.nbytes)
            - self._granted
            for scope in self._scopes
            if scope.max_bytes is not None
        ]
        return min(rooms) if rooms else None

    def _locally_full(self, need: int, files: int) -> str | None:
        """The name of a scope that cannot fit ``need`` more bytes (and ``files``)
        even if nothing else were held or committed there; None if each could."""
        for scope in self._scopes:
            usage = self._walks[scope.key].usage
            used = usage.bytes - self._credit.nbytes + self._granted
            if scope.max_bytes is not None and used + need > scope.max_bytes:
                return scope.name
            counted = usage.files - self._credit.files + files
            if files and scope.max_files is not None and counted > scope.max_files:
                return scope.name
        return None

    # --- the end

    def may_keep(self, size: int, continued: int) -> bool:
        """May the upload stay as a partial of ``size`` bytes (``continued`` of them
        an earlier partial's)? See ``storage.uploads.UploadQuota``.

        Its grant was decided with the *credit* (the file it replaces, the partial
        it continues) taken off the walk; a kept partial leaves that file in place
        and counts ``size - continued`` more. That fits only if it is within the
        grant less the credit; a partial that added nothing always stays (it is
        no larger than it was). Otherwise it is removed: the client resumes from
        the file's size (SIZE answers it), losing only this attempt's bytes.
        """
        added = size - continued
        return added <= 0 or added <= self._granted - self._credit.nbytes

    def ended(self, end: UploadEnd) -> None:
        """The upload ended: release the reservation, on the loop (any thread)."""
        self._ended = True
        self._wake(lambda: self._release(end))

    def _release(self, end: UploadEnd) -> None:
        if not self._asked:
            return  # nothing was ever requested: nothing to give back
        self._state.release(self.reservation, committed_amounts(self._scopes, end))


def _random_patience() -> float:
    return QUOTA_WAIT_SECONDS * random.uniform(0.25, 1.0)  # noqa: S311 - not a secret


def committed_amounts(
    scopes: Sequence[vfs.QuotaScope], end: UploadEnd
) -> dict[str, tuple[int, int]]:
    """What ``end`` added to each scope, as the committed counters count it: never
    less than zero (see the module docstring); empty when it added nothing."""
    if end.committed:
        nbytes = end.size - (end.replaced or 0) - end.continued
        files = 1 if end.replaced is None else 0
    else:  # kept as a partial (size > 0), or removed (size 0)
        nbytes = end.size - end.continued
        files = 0
    amount = (max(nbytes, 0), files)
    if amount == (0, 0):
        return {}
    return {scope.key: amount for scope in scopes}
