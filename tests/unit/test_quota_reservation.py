"""Upload quota reservations (``session.quota``) over a real ``LocalState``.

No sockets: reservations are driven by hand, the way the data connection does
(``start`` before the 150, ``prefetch`` as it writes, ``want`` when data arrives
beyond the grant); ``AtomicUpload`` reports its end on a real temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ftps_gateway.session.quota import (
    FIRST_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    Credit,
    QuotaPlan,
    QuotaUnavailableError,
    QuotaWalks,
    UploadReservation,
    Walk,
    committed_amounts,
)
from ftps_gateway.session.state import LocalState, QuotaClaim, QuotaMark
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import AtomicUpload, QuotaExceededError, UploadEnd
from support.state import Answers, Clock, local_state

SCOPE = vfs.QuotaScope("user acme", (Path("/nowhere"),), 1_000_000, 10, "user acme")
MOUNT = vfs.QuotaScope(
    "mount /shared", (Path("/nowhere/shared"),), None, 3, "mount /srv/shared"
)


class Deferred:
    """A ``SharedState``'s quota part whose answers wait until ``answer_all``."""

    def __init__(self, state: LocalState) -> None:
        self.state = state
        self.pending: list[Callable[[], None]] = []
        self.requests = 0

    def reserve(
        self, reservation: str, claims: Sequence[QuotaClaim], done: Callable[..., None]
    ) -> None:
        self.requests += 1
        self.pending.append(lambda: self.state.reserve(reservation, claims, done))

    def release(self, reservation: str, committed: Mapping[str, Any]) -> None:
        self.state.release(reservation, committed)

    def answer_all(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class Timers:
    """The loop's ``call_later`` and clock, run by hand."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.now = 0.0
        self.due: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def later(self, delay: float, callback: Callable[[], None]) -> None:
        self.due.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        """Move on, running what falls due."""
        self.now += seconds
        ready = [entry for entry in self.due if entry[0] <= self.now]
        self.due = [entry for entry in self.due if entry[0] > self.now]
        for _, callback in ready:
            callback()


class Counting(LocalState):
    """A ``LocalState`` that counts reservation requests."""

    requests = 0

    def reserve(self, *args: Any, **kwargs: Any) -> None:
        self.requests += 1
        super().reserve(*args, **kwargs)


def _walk(nbytes: int = 0, files: int = 0, mark: QuotaMark | None = None) -> Walk:
    return Walk(vfs.Usage(nbytes, files), mark or QuotaMark(0, 0), 0.0)


def reservation(
    state: Any,
    *,
    scopes: tuple[vfs.QuotaScope, ...] = (SCOPE,),
    used: int = 0,
    files: int = 0,
    credit: Credit | None = None,
    start_size: int = 0,
    timers: Timers | None = None,
) -> UploadReservation:
    """An upload's reservation over ``state``; ``wake`` runs at once; refused, it
    gives up at once unless ``timers`` (a fake loop clock) is given."""
    timers = timers or Timers(patience=0.0)
    return UploadReservation(
        state, lambda callback: callback(), "s1",
        scopes=scopes, walks={s.key: _walk(used, files) for s in scopes},
        credit=credit or Credit(), start_size=start_size,
        later=timers.later, clock=timers.clock, patience=lambda: timers.patience,
    )  # fmt: skip


def want(room: UploadReservation, size: int) -> str | None:
    answers = Answers()
    room.want(size, answers)
    assert len(answers.values) == 1
    return answers.values[0]  # type: ignore[no-any-return]


def started(room: UploadReservation) -> str | None:
    answers = Answers()
    room.start(answers)
    assert len(answers.values) == 1
    return answers.values[0]  # type: ignore[no-any-return]


# --- reservations ---------------------------------------------------------------------


def test_uploads_growing_together_never_pass_the_limit() -> None:
    """Uploads that each grow in chunks together hold at most the quota; the one
    that cannot grow is told which scope is full."""
    state = local_state()
    rooms = [reservation(state) for _ in range(4)]
    assert [started(room) for room in rooms] == [None] * 4
    refused: list[str] = []
    alive = list(rooms)
    size = 0
    while len(alive) > 1:
        size += 50_000
        for room in list(alive):
            answer = want(room, size)
            if answer is not None:
                refused.append(answer)
                alive.remove(room)
                room.ended(UploadEnd(committed=False, size=0, replaced=None,
                                     continued=0))  # fmt: skip
            assert sum(r.granted for r in alive) <= 1_000_000
    assert alive[0].granted >= size
    assert set(refused) == {"user acme"}


def test_a_refused_chunk_falls_back_to_what_the_data_needs() -> None:
    """Near the limit an upload still gets exactly what its data needs; one byte
    past the limit is refused."""
    state = local_state()
    hog = reservation(state)
    assert started(hog) is None
    assert want(hog, 950_000) is None  # the hog holds at least 950,000
    late = reservation(state)
    assert started(late) is None  # the file, and whatever bytes are left
    left = SCOPE.max_bytes - hog.granted  # type: ignore[operator]
    assert 0 <= late.granted <= left
    assert want(late, left) is None
    assert late.granted == left
    assert want(late, left + 1) == "user acme"


def test_prefetch_asks_once_per_half_chunk_not_per_read() -> None:
    """A 1 GiB upload read 16 KiB at a time asks the state about 70 times, and
    never has to wait: the grant always covers the next read."""
    state = Counting(local_state()._settings)  # same settings
    big = vfs.QuotaScope("user acme", (Path("/x"),), 1 << 40, None, "user acme")
    room = reservation(state, scopes=(big,))
    assert started(room) is None
    size = 0
    while size < 1 << 30:
        size += 16 * 1024
        assert size <= room.granted  # covered without waiting
        room.prefetch(size)
    assert state.requests < 100, state.requests
    assert room.granted - size <= MAX_CHUNK_BYTES


def test_one_request_at_a_time_and_a_want_waits_for_it() -> None:
    """A want that arrives while a look-ahead is out is answered after it."""
    deferred = Deferred(local_state())
    room = reservation(deferred)
    answers = Answers()
    room.start(answers)
    deferred.answer_all()
    assert answers.values == [None]
    room.prefetch(FIRST_CHUNK_BYTES - 1)  # less than half a chunk left: asks
    room.want(FIRST_CHUNK_BYTES + 10, answers)
    assert deferred.requests == 2  # start, the look-ahead: the want waits
    deferred.answer_all()
    assert answers.values == [None, None]
    assert room.granted >= FIRST_CHUNK_BYTES + 10


def test_a_blocked_upload_waits_for_room_then_gives_up() -> None:
    """Refused what its data needs, an upload waits (its patience) and goes on
    once another upload gives room back; with none coming back, it gets 452."""
    state = local_state()
    hog = reservation(state)
    assert started(hog) is None
    assert want(hog, 900_000) is None
    timers = Timers(patience=1.0)
    waiting = reservation(state, timers=timers)
    assert started(waiting) is None
    answers = Answers()
    waiting.want(500_000, answers)
    assert answers.values == []  # waiting, not refused
    timers.advance(0.5)
    assert answers.values == []
    hog.ended(UploadEnd(committed=False, size=0, replaced=None, continued=0))
    timers.advance(0.2)
    assert answers.values == [None]
    assert waiting.granted >= 500_000
    waiting.want(1_000_001, answers)  # more than the whole quota: no wait at all
    assert answers.values == [None, "user acme"]
    clock = Timers(patience=1.0)
    other = reservation(state, timers=clock)
    assert started(other) is None
    left = SCOPE.max_bytes - waiting.granted  # type: ignore[operator]
    assert want(other, left) is None
    assert other.granted == left
    blocked = Answers()
    other.want(other.granted + 1, blocked)
    clock.advance(0.9)
    assert blocked.values == []  # still patient
    for _ in range(5):
        clock.advance(0.2)
    assert blocked.values == ["user acme"]


def test_full_files_or_bytes_are_refused_without_asking() -> None:
    """A scope whose walk alone leaves no room refuses locally (no request)."""
    state = Counting(local_state()._settings)  # same settings
    assert started(reservation(state, scopes=(SCOPE, MOUNT), files=3)) == (
        "mount /shared"
    )
    room = reservation(state, used=SCOPE.max_bytes)  # type: ignore[arg-type]
    assert started(room) is None  # an empty file still fits
    assert want(room, 1) == "user acme"
    assert state.requests == 1


def test_an_overwrite_has_the_replaced_file_as_its_room() -> None:
    """Replacing a 600,000-byte file (and its one file) under a full file count:
    the upload may grow to 1,000,000; a new file alongside may not start."""
    state = local_state()
    scope = vfs.QuotaScope("user acme", (Path("/x"),), 1_000_000, 1, "user acme")
    over = reservation(state, scopes=(scope,), used=600_000, files=1,
                       credit=Credit(600_000, 1))  # fmt: skip
    assert started(over) is None
    assert want(over, 1_000_000) is None
    assert want(over, 1_000_001) == "user acme"
    new = reservation(state, scopes=(scope,), used=600_000, files=1)
    assert started(new) == "user acme"


def test_release_counts_the_commit_and_frees_the_rest() -> None:
    """At the end the reservation is gone and only the commit's bytes stay."""
    state = local_state()
    room = reservation(state)
    assert started(room) is None
    assert state.reservations()
    room.ended(UploadEnd(committed=True, size=1000, replaced=None, continued=0))
    assert state.reservations() == {}
    marks = Answers()
    state.quota_marks(["user acme"], marks)
    assert marks.values == [{"user acme": QuotaMark(1000, 1)}]


@pytest.mark.parametrize(
    ("end", "amounts"),
    [
        (UploadEnd(committed=True, size=10, replaced=None, continued=0), (10, 1)),
        (UploadEnd(committed=True, size=10, replaced=4, continued=0), (6, 0)),
        (UploadEnd(committed=True, size=10, replaced=40, continued=0), None),
        (UploadEnd(committed=True, size=50, replaced=None, continued=30), (20, 1)),
        (UploadEnd(committed=False, size=30, replaced=None, continued=10), (20, 0)),
        (UploadEnd(committed=False, size=0, replaced=None, continued=10), None),
    ],
    ids=["new", "larger", "smaller", "resumed", "kept", "removed"],
)
def test_committed_amounts_are_never_negative(
    end: UploadEnd, amounts: tuple[int, int] | None
) -> None:
    """What an upload adds to the committed counters; a shrink reports nothing."""
    expected = (
        {} if amounts is None else {"user acme": amounts, "mount /srv/shared": amounts}
    )
    assert committed_amounts((SCOPE, MOUNT), end) == expected


# --- walks ------------------------------------------------------------------------------


def test_walks_are_reused_for_a_while_and_forgotten_on_delete(tmp_path: Path) -> None:
    """A scope's walk (with its mark) is reused within the TTL; forgotten, or
    for a resume, it is walked again with the marks read for it."""
    (tmp_path / "a").write_bytes(b"x" * 10)
    scope = vfs.QuotaScope("user acme", (tmp_path,), 100, None, "user acme")
    clock = Clock()
    walks = QuotaWalks(2.0, clock=clock)
    plan = QuotaPlan([scope], walks, resume=False)
    assert plan.needs_marks == ["user acme"]
    with pytest.raises(QuotaUnavailableError):
        plan.walk()  # no mark read: never guessed
    plan.set_marks({"user acme": QuotaMark(5, 1)})
    assert plan.walk()["user acme"].usage == vfs.Usage(10, 1)
    (tmp_path / "b").write_bytes(b"y" * 20)
    again = QuotaPlan([scope], walks, resume=False)
    assert again.needs_marks == []
    assert again.walk()["user acme"].mark == QuotaMark(5, 1)  # reused
    assert QuotaPlan([scope], walks, resume=True).needs_marks == ["user acme"]
    clock.now += 2.5
    assert QuotaPlan([scope], walks, resume=False).needs_marks == ["user acme"]
    walks.remember(scope, Walk(vfs.Usage(1, 1), QuotaMark(0, 0), clock.now))
    walks.forget([scope])
    assert QuotaPlan([scope], walks, resume=False).needs_marks == ["user acme"]


def test_the_walk_cache_is_bounded() -> None:
    """At most ``max_entries`` scopes are remembered; the oldest go first."""
    clock = Clock()
    walks = QuotaWalks(60.0, clock=clock, max_entries=3)
    scopes = [vfs.QuotaScope(f"s{n}", (), 1, None, f"s{n}") for n in range(5)]
    for scope in scopes:
        walks.remember(scope, Walk(vfs.Usage(), QuotaMark(0, 0), clock.now))
    assert [walks.fresh(s) is not None for s in scopes] == [
        False,
        False,
        True,
        True,
        True,
    ]


# --- what an upload reports at its end ------------------------------------------------


class Recorder:
    """An ``UploadQuota`` that grants everything and records the end."""

    granted = 1 << 40
    ends: list[UploadEnd]

    def __init__(self) -> None:
        self.ends = []

    def want(self, size: int, done: Callable[[str | None], None]) -> None:
        done(None)

    def prefetch(self, size: int) -> None:
        pass

    def ended(self, end: UploadEnd) -> None:
        self.ends.append(end)

    def may_keep(self, size: int, continued: int) -> bool:
        return True


def _write(upload: AtomicUpload, data: bytes) -> None:
    upload.write(data)


def test_an_upload_reports_what_it_replaced_and_continued(tmp_path: Path) -> None:
    """Commit over a file reports its size; a kept partial reports its size; a
    resume of it reports what it continued; each end is reported once."""
    final = tmp_path / "report.csv"
    final.write_bytes(b"o" * 100)
    upload = AtomicUpload(final, "/report.csv", "acme", digest=False)
    upload.quota = recorder = Recorder()
    _write(upload, b"n" * 40)
    upload.commit()
    upload.discard()
    assert recorder.ends == [
        UploadEnd(committed=True, size=40, replaced=100, continued=0)
    ]

    partial = AtomicUpload(tmp_path / "p.bin", "/p.bin", "acme", retention_seconds=60,
                           digest=False)  # fmt: skip
    partial.quota = recorder = Recorder()
    _write(partial, b"p" * 30)
    partial.discard()  # kept for a resume
    assert recorder.ends == [
        UploadEnd(committed=False, size=30, replaced=None, continued=0)
    ]

    resumed = AtomicUpload(tmp_path / "p.bin", "/p.bin", "acme", retention_seconds=60,
                           append=True, digest=False)  # fmt: skip
    assert (resumed.found_size, resumed.continued, resumed.size) == (30, 30, 30)
    resumed.quota = recorder = Recorder()
    _write(resumed, b"q" * 5)
    resumed.commit()
    assert recorder.ends == [
        UploadEnd(committed=True, size=35, replaced=None, continued=30)
    ]


def test_a_write_past_the_grant_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    """``AtomicUpload`` never writes beyond what its quota granted."""
    upload = AtomicUpload(tmp_path / "x.bin", "/x.bin", "acme", digest=False,
                          quota_scope="user acme")  # fmt: skip
    upload.quota = recorder = Recorder()
    recorder.granted = 10
    _write(upload, b"1" * 10)
    with pytest.raises(QuotaExceededError) as refused:
        _write(upload, b"2")
    assert refused.value.scope == "user acme"
    assert os.path.getsize(upload.temp) == 10
    upload.discard()
    assert not upload.temp.exists()
    assert recorder.ends == [
        UploadEnd(committed=False, size=0, replaced=None, continued=0)
    ]
