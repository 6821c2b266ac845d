"""The hook dispatcher without a gateway: backoff, matching, order, the spool on disk.

Real files in ``tmp_path`` and real threads; the hook runs ``false`` (each attempt
fails at once, no socket), so only the spool's behaviour shows.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ftps_gateway import config
from ftps_gateway.audit import AuditLog
from ftps_gateway.config import GatewayConfig, HookSettings
from ftps_gateway.errors import StartupError
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.service.hooks import (
    DELIVERY_THREADS,
    HookDispatcher,
    backoff_seconds,
    event_matches,
)
from ftps_gateway.service.hookspool import Entry, SpoolAdmin, SpoolFolder, spool_root
from support.configs import write_config

FALSE = shutil.which("false") or "/bin/false"


def _config(tmp_path: Path, cert_files: tuple[Path, Path, Path]) -> GatewayConfig:
    section = (
        f'[[hooks]]\nname = "web"\nevents = ["upload", "rename"]\n'
        f'command = ["{FALSE}"]\nmax_attempts = 1000\n'
    )
    return config.load(write_config(tmp_path, cert_files, sections=section))


def _event(
    n: int, path: str | None = None, target: str | None = None
) -> dict[str, object]:
    event: dict[str, object] = {"id": f"id-{n}", "event": "upload", "user": "acme",
                                "path": path or f"/f{n}.csv"}  # fmt: skip
    if target is not None:
        event |= {"event": "rename", "target": target}
    return event


def _dispatcher(cfg: GatewayConfig, worker: tuple[int, int] = (0, 1)) -> HookDispatcher:
    return HookDispatcher(
        cfg, audit=AuditLog(), metrics=GatewayMetrics(process_metrics=False),
        worker=worker,
    )  # fmt: skip


def test_backoff_doubles_from_one_second_to_300_with_jitter() -> None:
    """1, 2, 4 ... 256, then 300 s; jitter takes at most 20 % off, never adds."""
    highest = [backoff_seconds(n, rng=lambda: 0.0) for n in range(1, 13)]
    assert highest == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    lowest = [backoff_seconds(n, rng=lambda: 1.0) for n in range(1, 13)]
    assert lowest == [pytest.approx(0.8 * h) for h in highest]
    spread = {round(backoff_seconds(3), 3) for _ in range(50)}
    assert len(spread) > 1
    assert all(3.2 <= value <= 4 for value in spread)


def test_filters_kind_users_groups_and_path_globs() -> None:
    """An event must pass every filter a hook sets; a path glob also sees a target."""
    hook = HookSettings(
        name="h", key="hooks[0]", events=frozenset({"upload", "rename", "ban"}),
        users=frozenset({"acme"}), groups=frozenset({"finance"}),
        paths=("/in/*",), url="https://x/",
    )  # fmt: skip
    groups = {"acme": frozenset({"finance"}), "beta": frozenset({"finance"})}
    ok = {"event": "upload", "user": "acme", "path": "/in/sub/a.csv"}
    assert event_matches(hook, ok, groups)
    assert not event_matches(hook, ok | {"event": "download"}, groups)
    assert not event_matches(hook, ok | {"user": "beta"}, groups)
    assert not event_matches(hook, ok | {"path": "/out/a.csv"}, groups)
    assert not event_matches(hook, ok, {"acme": frozenset()})
    moved_in = {"event": "rename", "user": "acme", "path": "/out/a", "target": "/in/a"}
    assert event_matches(hook, moved_in, groups)
    assert not event_matches(hook, {"event": "ban", "user": None, "path": None}, groups)


def test_each_files_events_wait_for_the_earlier_ones(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Spool order; a later event of the same hook and path (or rename target) waits
    while an earlier one is in flight or waiting for its retry; others go ahead, at
    most DELIVERY_THREADS at once."""
    dispatcher = _dispatcher(_config(tmp_path, cert_files))
    now = time.time()
    entries = [
        Entry("1", 0, "web", _event(1, "/a"), now),
        Entry("2", 0, "web", _event(2, "/a"), now),  # behind 1
        Entry("3", 0, "web", _event(3, "/b"), now, attempts=1, next_at=now + 5),
        Entry("4", 0, "web", _event(4, "/c", target="/b"), now),  # behind 3 (target)
        Entry("5", 0, "other", _event(5, "/a"), now),  # another hook: its own order
        Entry("6", 0, "web", _event(6, "/d"), now),
        Entry("7", 0, "web", _event(7, "/e"), now),
        Entry("8", 0, "web", _event(8, "/f"), now),
    ]
    with dispatcher._cond:
        for entry in entries:
            dispatcher._enqueue(entry)

    def handed() -> list[str]:
        names = []
        while not dispatcher._work.empty():
            entry = dispatcher._work.get_nowait()
            assert entry is not None
            names.append(entry.segment)
        return names

    with dispatcher._cond:
        delay = dispatcher._dispatch_due(now)
    assert DELIVERY_THREADS == 4
    assert handed() == ["1", "5", "6", "7"]
    assert delay == pytest.approx(1.0)  # the poll interval; entry 3 is due in 5 s
    for done in ("5", "6", "7"):  # free three threads: 8 goes, 2 and 4 still wait
        dispatcher._settled(dispatcher._entries[f"{done}-0000"], remove=True)
    with dispatcher._cond:
        dispatcher._dispatch_due(now)
    assert handed() == ["8"]
    dispatcher._settled(entries[0], remove=True)  # 1 delivered: 2 may go now
    with dispatcher._cond:
        dispatcher._dispatch_due(now)
    assert handed() == ["2"]
    with dispatcher._cond:  # 3 is due (and fails again): 4 still waits behind it
        dispatcher._dispatch_due(now + 6)
    assert handed() == ["3"]
    entries[2].next_at = now + 20
    dispatcher._settled(entries[2], remove=False)
    with dispatcher._cond:
        dispatcher._dispatch_due(now + 7)
    assert handed() == []
    with dispatcher._cond:  # 3 delivered on its next attempt: now 4
        dispatcher._dispatch_due(now + 21)
    assert handed() == ["3"]
    dispatcher._settled(entries[2], remove=True)
    with dispatcher._cond:
        dispatcher._dispatch_due(now + 21)
    assert handed() == ["4"]
    dispatcher.close()


def test_close_spools_everything_handed_over_and_a_restart_recovers_it(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """close() returns only when every submitted event is on disk (a few segment
    files, mode 0600 in 0700 folders); the next dispatcher queues all of them again,
    in order, and a crash's leftovers in tmp/ do not count."""
    cfg = _config(tmp_path, cert_files)
    first = _dispatcher(cfg)
    first.start()
    for n in range(300):
        first.submit(_event(n))
    first.close()
    folder = first.folder
    segments = sorted((folder / "queue").glob("*.json"))
    assert 1 <= len(segments) < 300  # batched: one fsync pair per segment
    assert oct(segments[0].stat().st_mode & 0o777) == "0o600"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    listing = SpoolAdmin(spool_root(cfg)).listing()
    assert listing["queue_total"] == 300
    assert [item["id"] for item in listing["queue"]] == [f"id-{n}" for n in range(300)]
    (folder / "tmp" / "leftover.json").write_text("{half")  # a crash mid-write
    second = _dispatcher(cfg)
    second.start()
    deadline = time.monotonic() + 10
    while second.snapshot()[0] < 300:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not (folder / "tmp" / "leftover.json").exists()
    depth, age = second.snapshot()
    assert depth == 300
    assert age > 0
    second.close()


def test_done_entries_and_failed_attempts_survive_a_restart(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A delivered entry is not queued again after a restart; a failed one keeps its
    attempts and its next attempt; a segment with nothing left is removed."""
    cfg = _config(tmp_path, cert_files)
    dispatcher = _dispatcher(cfg)
    spool = SpoolFolder(dispatcher.folder)
    segment = spool.write_segment(
        [{"hook": "web", "event": _event(n), "queued_at": 1.0} for n in range(3)]
    )
    delivered, failed, untouched = spool.load_segment(segment)
    spool.mark_done(delivered)
    failed.attempts, failed.next_at, failed.last_error = (
        4,
        time.time() + 600,
        "HTTP 503",
    )
    spool.save_state(failed)
    again = spool.load_segment(segment)
    assert [e.name for e in again] == [failed.name, untouched.name]
    assert (again[0].attempts, again[0].last_error) == (4, "HTTP 503")
    assert again[0].next_at == pytest.approx(failed.next_at)
    for entry in again:
        spool.mark_done(entry)
    dispatcher.start()  # loads the segment: nothing left, so it is removed
    deadline = time.monotonic() + 10
    while (dispatcher.folder / "queue" / f"{segment}.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    dispatcher.close()
    assert not list((dispatcher.folder / "done").iterdir())
    assert not list((dispatcher.folder / "state").iterdir())


def test_one_folder_is_delivered_by_one_process_only(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A second dispatcher for the same node and worker is refused at start-up."""
    cfg = _config(tmp_path, cert_files)
    first = _dispatcher(cfg)
    with pytest.raises(StartupError, match="in use by another process"):
        _dispatcher(cfg)
    first.close()
    _dispatcher(cfg).close()  # free again once the first one stopped


def test_worker_0_adopts_the_folders_of_workers_that_no_longer_exist(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Events spooled by worker 2 of 3 are delivered by worker 0 of 1 after a restart
    with fewer workers; dead letters move along."""
    cfg = _config(tmp_path, cert_files)
    old = _dispatcher(cfg, worker=(2, 3))
    old.start()
    for n in range(5):
        old.submit(_event(n))
    old.close()
    dead = old.folder / "dead" / "00000000000000000001-00000000-0000.json"
    dead.write_text(json.dumps(Entry("x", 0, "web", _event(9), 1.0).record()))
    survivor = _dispatcher(cfg, worker=(0, 1))
    survivor.start()
    deadline = time.monotonic() + 10
    while survivor.snapshot()[0] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    survivor.close()
    assert not list((old.folder / "queue").glob("*.json"))
    assert (survivor.folder / "dead" / dead.name).exists()


def test_spool_admin_lists_and_retries_dead_letters(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """retry turns a dead letter into a segment of its folder's retry inbox with its
    count reset; the dispatcher queues it from there."""
    cfg = _config(tmp_path, cert_files)
    dispatcher = _dispatcher(cfg)
    entry = Entry("00000000000000000005-abcdef01", 0, "web", _event(5), 1.0,
                  attempts=20, last_error="HTTP 500")  # fmt: skip
    record = entry.record() | {"dead_at": 2.0}
    (dispatcher.folder / "dead" / f"{entry.name}.json").write_text(json.dumps(record))
    admin = SpoolAdmin(spool_root(cfg))
    listing = admin.listing()
    assert (listing["queue_total"], listing["dead_total"]) == (0, 1)
    (shown,) = listing["dead"]
    assert (shown["id"], shown["attempts"], shown["last_error"]) == (
        "id-5",
        20,
        "HTTP 500",
    )
    assert admin.retry(["another-id"]) == 0
    assert admin.retry(None) == 1
    (inbox,) = (dispatcher.folder / "retry").glob("*.json")
    (retried,) = json.loads(inbox.read_text())["entries"]
    assert (retried["attempts"], retried["next_at"]) == (0, 0.0)
    assert "dead_at" not in retried
    assert admin.listing()["queue_total"] == 1  # listed while in the inbox too
    dispatcher.start()
    deadline = time.monotonic() + 10
    while not list((dispatcher.folder / "queue").glob("*.json")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    dispatcher.close()
    assert admin.listing()["queue_total"] == 1
    assert not list((dispatcher.folder / "retry").glob("*.json"))
