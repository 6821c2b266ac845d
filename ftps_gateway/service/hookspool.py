"""The hook spool on disk: what makes a queued event survive a crash (issue 16).

Everything here is a plain file operation, usable from any process: the delivering
worker (``service.hooks.HookDispatcher``) writes and reads its folder through
``SpoolFolder``; ``SpoolAdmin`` is what ``ftps-gateway hooks list|retry`` works on,
from the admin socket of the server or the supervisor, while workers deliver.

Where the spool lives: ``<storage.root>/.ftps-gateway/hooks/<node>-<worker>/``, one
folder per worker process, each with a ``flock`` held by the process that delivers
it (two processes never deliver one folder). Why per worker and not the supervisor:
docs/decisions/0008-event-hooks.md.

An event counts as queued once its segment file has been written to ``tmp/``,
fsync'ed, renamed into ``queue/`` and the folder fsync'ed (``write_durably``,
``fsync_folder``): a crash after that loses nothing. A done marker is not fsync'ed:
losing one delivers that event once more, which at-least-once allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ftps_gateway.config.model import STATE_DIRECTORY

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ftps_gateway.config import GatewayConfig

SPOOL_DIRECTORY: Final = "hooks"  # under <storage.root>/<STATE_DIRECTORY>
QUEUE, DEAD, TMP, RETRY, DONE, STATE = "queue", "dead", "tmp", "retry", "done", "state"
PARTS: Final = (QUEUE, DEAD, TMP, RETRY, DONE, STATE)
LOCK_FILE: Final = "lock"  # flock'ed by the process that delivers the folder
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def spool_root(config: GatewayConfig) -> Path:
    """Where every process's hook folders are."""
    return config.storage.root / STATE_DIRECTORY / SPOOL_DIRECTORY


def folder_name(node: str, index: int) -> str:
    """``<node>-<worker>``: the folder one worker process delivers."""
    return f"{_UNSAFE.sub('_', node) or 'node'}-{index}"


@dataclass
class Entry:
    """One event for one hook: entry ``index`` of the segment file ``segment``."""

    segment: str  # "<ns since the epoch>-<random>": spool order, unique everywhere
    index: int
    hook: str
    event: dict[str, Any]
    queued_at: float
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    in_flight: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        """``<segment>-<index>``: the names of its done marker, state, dead letter."""
        return f"{self.segment}-{self.index:04d}"

    @property
    def keys(self) -> frozenset[tuple[str, str]]:
        """(hook, path) pairs that order this entry after earlier ones."""
        names = (self.event.get("path"), self.event.get("target"))
        return frozenset((self.hook, name) for name in names if name)

    def record(self) -> dict[str, Any]:
        """The entry as a segment (and a dead letter) holds it."""
        return {
            "hook": self.hook,
            "event": self.event,
            "queued_at": self.queued_at,
            "attempts": self.attempts,
            "next_at": self.next_at,
            "last_error": self.last_error,
        }

    def state(self) -> dict[str, Any]:
        """What changes after a failed attempt (``state/<name>.json``)."""
        return {
            "attempts": self.attempts,
            "next_at": self.next_at,
            "last_error": self.last_error,
        }

    @classmethod
    def from_record(cls, segment: str, index: int, data: dict[str, Any]) -> Entry:
        """An entry from a segment's record; raises KeyError/TypeError/ValueError."""
        return cls(
            segment=segment,
            index=index,
            hook=str(data["hook"]),
            event=dict(data["event"]),
            queued_at=float(data["queued_at"]),
            attempts=int(data.get("attempts", 0)),
            next_at=float(data.get("next_at", 0.0)),
            last_error=data.get("last_error"),
        )


def write_durably(path: Path, data: bytes, tmp: Path) -> None:
    """Write ``data`` to ``tmp/<name>``, fsync it, rename it to ``path``.

    The folder of ``path`` is not fsync'ed here (callers batch that).
    """
    temp = tmp / path.name
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    temp.replace(path)


def fsync_folder(path: Path) -> None:
    """Make the names in ``path`` durable (renames and new files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolFolder:
    """One worker's spool on disk (everything here is a plain file operation).

    - ``queue/<segment>.json``: a batch of entries, written to ``tmp/``, fsync'ed,
      renamed, the folder fsync'ed: one fsync pair per batch, not per event.
    - ``state/<entry>.json``: attempts, next attempt and last error after a failure.
    - ``done/<entry>``: delivered or dead-lettered. Not fsync'ed: losing one in a
      crash delivers that event once more, which at-least-once allows.
    - ``dead/<entry>.json``: a dead letter (the entry, its last error, when).
    - ``retry/<segment>.json``: dead letters queued again by ``hooks retry``.
    A segment whose entries are all done is removed with its markers and states.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def part(self, name: str) -> Path:
        """One of the subfolders."""
        return self.path / name

    def prepare(self) -> None:
        """Create the subfolders (mode 0700)."""
        for name in PARTS:
            self.part(name).mkdir(mode=0o700, parents=True, exist_ok=True)

    def write_segment(self, records: list[dict[str, Any]], part: str = QUEUE) -> str:
        """Write ``records`` as one segment, durably; returns its name."""
        segment = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        data = json.dumps({"version": 2, "entries": records}).encode()
        write_durably(self.part(part) / f"{segment}.json", data, self.part(TMP))
        fsync_folder(self.part(part))
        return segment

    def segments(self, part: str = QUEUE) -> list[str]:
        """Segment names in ``part``, oldest first."""
        return [name.removesuffix(".json") for name in _names(self.part(part))]

    def load_segment(self, segment: str, part: str = QUEUE) -> list[Entry]:
        """The entries of ``segment`` not yet done, with their latest state.

        Raises:
            OSError, ValueError, KeyError, TypeError: the segment is unusable.
        """
        data = json.loads((self.part(part) / f"{segment}.json").read_bytes())
        done = set(_prefixed(self.part(DONE), segment))
        states = {
            name.removesuffix(".json") for name in _prefixed(self.part(STATE), segment)
        }
        entries = []
        for index, record in enumerate(data["entries"]):
            entry = Entry.from_record(segment, index, record)
            if entry.name in done:
                continue
            if entry.name in states:
                with contextlib.suppress(OSError, ValueError):
                    state = json.loads(
                        (self.part(STATE) / f"{entry.name}.json").read_bytes()
                    )
                    entry.attempts = int(state["attempts"])
                    entry.next_at = float(state["next_at"])
                    entry.last_error = state.get("last_error")
            entries.append(entry)
        return entries

    def save_state(self, entry: Entry) -> None:
        """Record a failed attempt (fsync'ed: the backoff survives a restart)."""
        data = json.dumps(entry.state()).encode()
        write_durably(self.part(STATE) / f"{entry.name}.json", data, self.part(TMP))

    def mark_done(self, entry: Entry) -> None:
        """Delivered or dead-lettered: never attempted again (see the class doc)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        os.close(os.open(self.part(DONE) / entry.name, flags, 0o600))

    def dead_letter(self, entry: Entry) -> None:
        """Write the dead letter durably, then mark the entry done."""
        data = json.dumps(entry.record() | {"dead_at": time.time()}).encode()
        write_durably(self.part(DEAD) / f"{entry.name}.json", data, self.part(TMP))
        fsync_folder(self.part(DEAD))
        self.mark_done(entry)

    def remove_segment(self, segment: str) -> None:
        """A segment with nothing left to deliver: it, its markers, its states."""
        with contextlib.suppress(FileNotFoundError):
            (self.part(QUEUE) / f"{segment}.json").unlink()
        for part in (DONE, STATE):
            for name in _prefixed(self.part(part), segment):
                with contextlib.suppress(FileNotFoundError):
                    (self.part(part) / name).unlink()

    def move_segment(self, segment: str, source: SpoolFolder, part: str) -> None:
        """Take over ``source``'s segment (its markers and states first)."""
        for sub in (DONE, STATE):
            for name in _prefixed(source.part(sub), segment):
                (source.part(sub) / name).replace(self.part(sub) / name)
        (source.part(part) / f"{segment}.json").replace(
            self.part(QUEUE) / f"{segment}.json"
        )

    def clean(self) -> None:
        """At start: drop tmp/ leftovers (never counted) and orphaned markers."""
        for name in _all_names(self.part(TMP)):
            with contextlib.suppress(OSError):
                (self.part(TMP) / name).unlink()
        live = set(self.segments())
        for part in (DONE, STATE):
            for name in _all_names(self.part(part)):
                if name[:29] not in live:  # "<20 digits>-<8 hex>"
                    with contextlib.suppress(OSError):
                        (self.part(part) / name).unlink()

    def holds_segments(self, part: str) -> bool:
        """Is there a segment in ``part`` (nothing if the folder does not exist)?"""
        return bool(_names(self.part(part)))

    def take_dead_letters(self, source: SpoolFolder) -> None:
        """Move ``source``'s dead letters here (one that cannot move stays)."""
        for name in _all_names(source.part(DEAD)):
            with contextlib.suppress(OSError):
                (source.part(DEAD) / name).replace(self.part(DEAD) / name)

    def lock(self) -> int:
        """Take the folder's lock for this process; returns the fd that holds it.

        Closing the fd releases it (the kernel does so too when the process dies,
        however it dies: a worker killed by -9 never leaves its folder locked).

        Raises:
            BlockingIOError: another running process holds it.
            OSError: the lock file cannot be opened.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path / LOCK_FILE, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def is_unlocked(self) -> bool:
        """True if no running process holds the folder's lock."""
        try:
            fd = os.open(
                self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True


class SpoolAdmin:
    """``ftps-gateway hooks list|retry``: the spool as files, for any process."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def listing(self, limit: int = 1000) -> dict[str, Any]:
        """Queued and dead-lettered events (at most ``limit`` of each), oldest first."""
        queued: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        for path in self._folders():
            folder = SpoolFolder(path)
            for part in (QUEUE, RETRY):
                for segment in folder.segments(part):
                    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                        queued += [
                            _shown(path, entry.name, entry.record())
                            for entry in folder.load_segment(segment, part)
                        ]
            for name in _names(folder.part(DEAD)):
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads((folder.part(DEAD) / name).read_bytes())
                    dead.append(_shown(path, name.removesuffix(".json"), record))
        queued.sort(key=lambda item: str(item["file"]))
        dead.sort(key=lambda item: str(item["file"]))
        return {
            QUEUE: queued[:limit],
            f"{QUEUE}_total": len(queued),
            DEAD: dead[:limit],
            f"{DEAD}_total": len(dead),
        }

    def retry(self, ids: Iterable[str] | None) -> int:
        """Queue dead-lettered events again (all, or those with these event ids).

        Each becomes a segment in its folder's ``retry/`` inbox, its attempts and age
        reset; the delivering process queues it within its poll interval
        (``service.hooks.POLL_SECONDS``).
        """
        wanted = None if ids is None else set(ids)
        moved = 0
        for path in self._folders():
            folder = SpoolFolder(path)
            for name in _names(folder.part(DEAD)):
                source = folder.part(DEAD) / name
                try:
                    record = json.loads(source.read_bytes())
                except (OSError, ValueError):
                    continue
                if (
                    wanted is not None
                    and record.get("event", {}).get("id") not in wanted
                ):
                    continue
                record |= {"attempts": 0, "next_at": 0.0, "queued_at": time.time()}
                record.pop("dead_at", None)
                folder.prepare()
                folder.write_segment([record], part=RETRY)
                source.unlink()
                moved += 1
        return moved

    def _folders(self) -> list[Path]:
        with contextlib.suppress(OSError):
            return sorted(
                Path(entry.path)
                for entry in os.scandir(self.root)
                if entry.is_dir(follow_symlinks=False)
            )
        return []


def _shown(folder: Path, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """One line of ``hooks list``."""
    event = record.get("event", {})
    fields = ("hook", "attempts", "queued_at", "next_at", "last_error", "dead_at")
    return (
        {"folder": folder.name, "file": name}
        | {key: event.get(key) for key in ("id", "event", "path", "target")}
        | {key: record.get(key) for key in fields}
    )


def _names(folder: Path) -> list[str]:
    """The spool files in ``folder`` (none if it does not exist)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
    except OSError:
        return []


def _all_names(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def _prefixed(folder: Path, segment: str) -> list[str]:
    """Markers or states of ``segment``'s entries in ``folder``."""
    return [name for name in _all_names(folder) if name.startswith(segment + "-")]
