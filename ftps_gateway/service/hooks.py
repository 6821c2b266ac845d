"""Event hooks: a durable spool, bounded delivery, retries, dead letters (issue 16).

``HookDispatcher`` is the gateway's ``session.events.HookSink``. What happens to an
event, and on which thread:

1. ``submit`` (IO loop): match the event against the hooks (kind, users, groups,
   path globs) and put it on a bounded in-memory queue. Nothing else: no disk, no
   network. A full queue drops the event, counted and audited.
2. The spool writer (a thread): gathers what arrives within 50 ms into one segment
   file, written to ``tmp/``, fsync'ed, renamed into ``queue/``, the folder
   fsync'ed (``SpoolFolder``). Only then does an event count as queued: a crash
   after that loses nothing.
3. The scheduler (a thread) hands due entries to ``DELIVERY_THREADS`` delivery
   threads, in spool order, one at a time per hook and file: an event for a path (or
   a rename's target) waits while an earlier event of the same hook for the same
   path is being delivered or waiting for its retry, so a receiver sees each file's
   events in order.
4. A delivery thread runs the command (argv, no shell, event as JSON on stdin and as
   ``FTPS_*`` variables, killed with its process group at the timeout; exit 0 =
   delivered) or POSTs the JSON (``X-FTPS-Gateway-Signature: sha256=<hex HMAC>``;
   2xx = delivered). Delivered: a done marker. Failed: the attempt count, the time
   of the next attempt (``backoff_seconds``) and the error are written next to the
   segment. After ``max_attempts`` or ``max_age_seconds`` the entry goes to ``dead/``
   with its last error, and an audit line says so. A segment whose entries are all
   done is removed.

Delivery is at least once: a crash between a delivery and its done marker reaching
the disk delivers it again after the restart, with the same ``id``. ``close`` (the
drain, or any stop) writes whatever is still in memory to the spool and stops; the
next start, of this process or its successor, delivers what is left.

Where the spool lives: ``<storage.root>/.ftps-gateway/hooks/<node>-<worker>/``. Each
worker process delivers its own folder (and holds a ``flock`` on it: two processes
never deliver one folder); worker 0 adopts the folders of workers that no longer
exist (fewer workers after a restart). Why per worker and not the supervisor:
docs/decisions/0008-event-hooks.md. ``SpoolAdmin`` is what ``ftps-gateway hooks
list|retry`` works on, from the admin socket of the server or the supervisor.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import heapq
import hmac
import json
import logging
import os
import queue
import random
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import urllib3

from ftps_gateway.config.model import STATE_DIRECTORY
from ftps_gateway.errors import StartupError
from ftps_gateway.metrics import build_version

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import GatewayConfig, HookSettings
    from ftps_gateway.metrics import GatewayMetrics

logger = logging.getLogger("ftps_gateway")

SPOOL_DIRECTORY: Final = "hooks"  # under <storage.root>/<STATE_DIRECTORY>
QUEUE, DEAD, TMP, RETRY, DONE, STATE = "queue", "dead", "tmp", "retry", "done", "state"
PARTS: Final = (QUEUE, DEAD, TMP, RETRY, DONE, STATE)
# Concurrent deliveries per process: a slow receiver (1 s per request) holds one
# thread per request, so 4 keep 4 requests in flight, and a hung command costs one
# thread until its timeout. Transfers never wait for any of them.
DELIVERY_THREADS: Final = 4
MAX_PENDING_WRITES: Final = 10_000  # events handed over, not yet on disk
MAX_QUEUED: Final = 100_000  # spooled events per process; beyond: dropped, audited
WRITE_BATCH: Final = 256  # entries per segment at most
# How long the spool writer gathers events into one segment: one fsync pair per
# batch instead of per event (measured: 0.47 ms CPU and 5.4 ms of fsyncs per event
# on the development VM; the uploads' own fsyncs queue behind them in the journal).
WRITE_WINDOW_SECONDS: Final = 0.05
BACKOFF_FIRST_SECONDS: Final = 1.0
BACKOFF_MAX_SECONDS: Final = 300.0
JITTER: Final = 0.2  # a retry waits 80-100 % of the doubled delay
POLL_SECONDS: Final = 1.0  # retry/ inbox and abandoned worker folders
CLOSE_SECONDS: Final = 5.0  # deliveries in flight may finish within this at a stop
MAX_ERROR_CHARS: Final = 500
MAX_RESPONSE_BYTES: Final = 64 * 1024
COMMAND_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
SIGNATURE_HEADER: Final = "X-FTPS-Gateway-Signature"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class DeliveryError(Exception):
    """One attempt failed; the message is the event's ``last_error``."""


def spool_root(config: GatewayConfig) -> Path:
    """Where every process's hook folders are."""
    return config.storage.root / STATE_DIRECTORY / SPOOL_DIRECTORY


def folder_name(node: str, index: int) -> str:
    """``<node>-<worker>``: the folder one worker process delivers."""
    return f"{_UNSAFE.sub('_', node) or 'node'}-{index}"


def backoff_seconds(attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Wait before the next attempt after ``attempts`` failed ones.

    1 s after the first failure, doubling, at most 300 s; each wait is cut by up to
    ``JITTER`` at random so retries of many events spread out instead of arriving
    at a recovering receiver together.
    """
    base = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** max(attempts - 1, 0))
    return float(base * (1 - JITTER * rng()))


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-FTPS-Gateway-Signature`` value: ``sha256=<lower-case hex HMAC>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def event_body(event: dict[str, Any], *, with_real_path: bool) -> bytes:
    """The event as delivered: compact JSON, keys sorted (what is signed)."""
    shown = {k: v for k, v in event.items() if with_real_path or k != "real_path"}
    return json.dumps(shown, separators=(",", ":"), sort_keys=True).encode()


def event_matches(
    hook: HookSettings, event: dict[str, Any], groups_of: dict[str, frozenset[str]]
) -> bool:
    """Does ``event`` pass ``hook``'s kind, users, groups and path filters?"""
    if event["event"] not in hook.events:
        return False
    user = event.get("user")
    if hook.users and user not in hook.users:
        return False
    if hook.groups and not (groups_of.get(user or "", frozenset()) & hook.groups):
        return False
    if hook.paths:
        names = [name for name in (event.get("path"), event.get("target")) if name]
        if not any(fnmatchcase(n, glob) for n in names for glob in hook.paths):
            return False
    return True


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


class HookDispatcher:
    """One process's hooks: ``submit`` on the loop, everything else on its threads."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        audit: AuditLog,
        metrics: GatewayMetrics,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        """Prepare (and lock) this process's spool folder if hooks or events exist.

        Raises:
            StartupError: the folder cannot be made, or another running process
                delivers it (two gateways with one node name on one storage root).
        """
        self._root = spool_root(config)
        self._node = config.server.node_name or socket.gethostname()
        self._index, self._count = worker
        self._folder = self._root / folder_name(self._node, self._index)
        self._spool_folder = SpoolFolder(self._folder)
        self._audit = audit
        self._metrics = metrics
        self._hooks: dict[str, HookSettings] = {}
        self._wanted: frozenset[str] = frozenset()
        self._real_path_kinds: frozenset[str] = frozenset()
        self._groups_of: dict[str, frozenset[str]] = {}
        self._pending: queue.Queue[tuple[dict[str, Any], tuple[str, ...]] | None] = (
            queue.Queue(MAX_PENDING_WRITES)
        )
        self._work: queue.Queue[Entry | None] = queue.Queue()
        self._cond = threading.Condition()
        # Under self._cond: every queued entry; per (hook, path) the entries in spool
        # order (only the head of all its chains may be delivered); entries that may
        # be due (checked when popped); entries waiting for a retry, by due time.
        self._entries: dict[str, Entry] = {}
        self._chains: dict[tuple[str, str], collections.deque[str]] = {}
        self._candidates: collections.deque[str] = collections.deque()
        self._timers: list[tuple[float, str]] = []
        self._remaining: dict[str, int] = {}  # segment -> entries not yet done
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._lock_fd = -1
        self._started = False
        self._closing = False
        self._pools: dict[tuple[str, str, str], urllib3.PoolManager] = {}
        self._pools_lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()
        self._failing: set[str] = set()  # hooks whose last attempt failed (logs)
        self._threads_wanted = False  # start() was asked for (serve_forever)
        self._apply(config)
        if self._hooks or self._has_spooled_events():
            self._prepare_folder()

    # --- configuration

    def configure(self, config: GatewayConfig) -> None:
        """Follow a reloaded config (on the IO loop): new hooks apply to new events.

        Queued events find their hook by name; one whose hook is gone is
        dead-lettered when it is due ("hook no longer configured").

        Raises:
            StartupError: hooks were added and the spool folder is unusable.
        """
        if config.hooks and self._lock_fd < 0:
            self._prepare_folder()  # may raise: then nothing has changed
        self._apply(config)
        if self._threads_wanted:
            self.start()

    def _apply(self, config: GatewayConfig) -> None:
        hooks = {hook.name: hook for hook in config.hooks}
        self._groups_of = {user.name: frozenset(user.groups) for user in config.users}
        self._hooks = hooks
        self._wanted = frozenset(
            kind for hook in hooks.values() for kind in hook.events
        )
        self._real_path_kinds = frozenset(
            kind for hook in hooks.values() if hook.command for kind in hook.events
        )
        with self._pools_lock:  # a changed URL or CA gets a new pool
            keep = {(h.name, h.url, str(h.ca_file)) for h in hooks.values()}
            for key in [key for key in self._pools if key not in keep]:
                self._pools.pop(key).clear()

    # --- the sink (IO loop)

    def wants(self, event: str) -> bool:
        """Does a hook name this kind of event?"""
        return event in self._wanted

    def needs_real_path(self, event: str) -> bool:
        """Does a command hook name this kind of event?"""
        return event in self._real_path_kinds

    def submit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for the hooks it matches; never blocks."""
        if self._closing:
            return
        hooks = tuple(
            name
            for name, hook in self._hooks.items()
            if event_matches(hook, event, self._groups_of)
        )
        if not hooks:
            return
        try:
            self._pending.put_nowait((event, hooks))
        except queue.Full:
            self._dropped(event, hooks, "queue full")

    # --- life

    def start(self) -> None:
        """Start the threads (if there is anything to deliver); idempotent."""
        self._threads_wanted = True
        if self._started or self._lock_fd < 0:
            return
        self._started = True
        targets: list[tuple[str, Callable[[], None]]] = [
            ("hook-spool", self._write_loop),
            ("hook-schedule", self._schedule_loop),
        ]
        targets += [
            (f"hook-deliver-{n}", self._deliver_loop) for n in range(DELIVERY_THREADS)
        ]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Spool what is still in memory, stop, and leave the rest for the next start.

        Deliveries in flight may finish within ``timeout``; commands still running
        then are killed (their events stay queued: delivered again next time).
        """
        if self._closing:
            return
        deadline = time.monotonic() + timeout
        self._closing = True
        if self._started:
            self._pending.put(None)  # after everything already handed over
            self._threads[0].join(max(deadline - time.monotonic(), 0.1))
            with self._cond:
                self._cond.notify_all()
            for _ in range(DELIVERY_THREADS):
                self._work.put(None)
            for thread in self._threads[1:]:
                thread.join(max(deadline - time.monotonic(), 0.0))
            for process in list(self._processes):
                _kill_group(process)
            for thread in self._threads[1:]:
                thread.join(1.0)
        with self._pools_lock:
            for pool in self._pools.values():
                pool.clear()
            self._pools.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def snapshot(self) -> tuple[int, float]:
        """(events queued, age in seconds of the oldest) for the metrics."""
        with self._cond:
            oldest = min((e.queued_at for e in self._entries.values()), default=None)
            depth = len(self._entries)
        depth += self._pending.qsize()
        return depth, 0.0 if oldest is None else max(time.time() - oldest, 0.0)

    @property
    def folder(self) -> Path:
        """This process's spool folder."""
        return self._folder

    # --- the spool folder

    def _has_spooled_events(self) -> bool:
        folders = [self._folder]
        if self._index == 0:
            folders += self._abandoned_folders()
        return any(
            _non_empty(folder / part) for folder in folders for part in (QUEUE, RETRY)
        )

    def _prepare_folder(self) -> None:
        try:
            self._spool_folder.prepare()
            # Events name partners, files and addresses: for the service user only.
            for folder in (self._root.parent, self._root, self._folder):
                folder.chmod(0o700)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self._folder / "lock", flags, 0o600)
        except OSError as err:
            problem = f"cannot use the hook spool {self._folder}: {err.strerror}"
            raise StartupError(f"storage.root: {problem}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"storage.root: the hook spool {self._folder} is in use by another "
                "process (two gateways with the same server.node_name on one "
                "storage.root?)"
            ) from None
        self._lock_fd = fd

    def _abandoned_folders(self) -> list[Path]:
        """This node's folders of worker indexes that no longer exist."""
        prefix = folder_name(self._node, 0)[:-1]  # "<node>-"
        found: list[Path] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._root):
                suffix = entry.name.removeprefix(prefix)
                if (
                    entry.name.startswith(prefix)
                    and suffix.isdigit()
                    and int(suffix) >= self._count
                    and entry.is_dir(follow_symlinks=False)
                ):
                    found.append(Path(entry.path))
        return found

    def _recover(self) -> None:
        """Load the spool at start (tmp/ leftovers never counted as queued)."""
        folder = self._spool_folder
        folder.clean()
        count = 0
        for segment in folder.segments():
            count += self._load(folder, segment)
        if count:
            logger.info("hooks: %d queued events from %s", count, self._folder)

    def _load(self, folder: SpoolFolder, segment: str) -> int:
        """Queue the undone entries of one of this folder's segments."""
        try:
            entries = folder.load_segment(segment)
        except (OSError, ValueError, KeyError, TypeError) as err:
            source = folder.part(QUEUE) / f"{segment}.json"
            with contextlib.suppress(OSError):
                source.replace(folder.part(DEAD) / f"{segment}.unreadable")
            logger.error(  # noqa: TRY400 - an operational fault, not a bug
                "hooks: unreadable spool file %s (%s); moved to dead/", source, err
            )
            return 0
        if not entries:
            folder.remove_segment(segment)
            return 0
        with self._cond:
            self._remaining[segment] = len(entries)
            for entry in entries:
                self._enqueue(entry)
            self._cond.notify_all()
        return len(entries)

    def _poll_inboxes(self) -> None:
        """Adopt retried events (``hooks retry``) and abandoned workers' folders."""
        own = self._spool_folder
        moves = [(own, RETRY)]
        if self._index == 0:
            for path in self._abandoned_folders():
                if _lock_free(path):
                    other = SpoolFolder(path)
                    moves += [(other, RETRY), (other, QUEUE)]
                    for name in _all_names(other.part(DEAD)):
                        with contextlib.suppress(OSError):
                            (other.part(DEAD) / name).replace(own.part(DEAD) / name)
        taken = []
        for source, part in moves:
            for segment in source.segments(part):
                try:
                    own.move_segment(segment, source, part)
                except OSError as err:
                    logger.error(  # noqa: TRY400 - an operational fault, not a bug
                        "hooks: cannot take over %s from %s: %s", segment,
                        source.path, err.strerror,
                    )  # fmt: skip
                    continue
                taken.append(segment)
        if taken:
            fsync_folder(own.part(QUEUE))
        for segment in sorted(taken):
            self._load(own, segment)

    # --- thread: the spool writer

    def _write_loop(self) -> None:
        """Load the spool, then spool what ``submit`` hands over, in batches.

        The spool is loaded here, before anything new is written, so events of an
        earlier run keep their place ahead of new ones. A batch is what arrives
        within ``WRITE_WINDOW_SECONDS`` of its first event. ``None`` ends it (close).
        """
        self._recover()
        while True:
            item = self._pending.get()
            if item is None:
                return
            batch = [item]
            stop = False
            deadline = time.monotonic() + WRITE_WINDOW_SECONDS
            while len(batch) < WRITE_BATCH:
                wait = 0.0 if self._closing else deadline - time.monotonic()
                try:
                    more = (
                        self._pending.get(timeout=wait)
                        if wait > 0
                        else self._pending.get_nowait()  # closing: no window
                    )
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._spool(batch)
            if stop:
                return

    def _spool(self, batch: list[tuple[dict[str, Any], tuple[str, ...]]]) -> None:
        """One segment for the batch: written and fsync'ed, then queued."""
        now = time.time()
        pairs: list[tuple[dict[str, Any], str]] = []
        for event, hooks in batch:
            for hook in hooks:
                if len(self._entries) + len(pairs) >= MAX_QUEUED:
                    self._dropped(event, (hook,), f"more than {MAX_QUEUED} queued")
                else:
                    pairs.append((event, hook))
        if not pairs:
            return
        records = [
            {"hook": hook, "event": event, "queued_at": now} for event, hook in pairs
        ]
        try:
            segment = self._spool_folder.write_segment(records)
        except OSError as err:
            for event, hook in pairs:
                self._dropped(event, (hook,), f"spool write failed: {err.strerror}")
            return
        entries = [
            Entry(segment, index, hook, event, now)
            for index, (event, hook) in enumerate(pairs)
        ]
        with self._cond:
            self._remaining[segment] = len(entries)
            for entry in entries:
                self._enqueue(entry)
            self._cond.notify_all()

    def _dropped(
        self, event: dict[str, Any], hooks: Iterable[str], reason: str
    ) -> None:
        for hook in hooks:
            self._metrics.hook_delivery("dropped")
            self._audit.event(
                "hook_event_dropped", id=event.get("id"), hook=hook,
                kind=event.get("event"), path=event.get("path"), reason=reason,
            )  # fmt: skip

    # --- thread: the scheduler

    def _schedule_loop(self) -> None:
        next_poll = time.monotonic()
        while True:
            if time.monotonic() >= next_poll:
                try:
                    self._poll_inboxes()
                except Exception:
                    logger.exception("hooks: polling %s failed", self._folder)
                next_poll = time.monotonic() + POLL_SECONDS
            with self._cond:
                if self._closing:
                    return
                delay = self._dispatch_due(time.time())
                self._cond.wait(min(delay, max(next_poll - time.monotonic(), 0.0)))

    def _enqueue(self, entry: Entry) -> None:
        """Queue ``entry`` behind the earlier entries of its chains (under the lock)."""
        self._entries[entry.name] = entry
        for key in entry.keys:
            self._chains.setdefault(key, collections.deque()).append(entry.name)
        if entry.next_at > time.time():
            heapq.heappush(self._timers, (entry.next_at, entry.name))
        else:
            self._candidates.append(entry.name)

    def _is_head(self, entry: Entry) -> bool:
        return all(self._chains[key][0] == entry.name for key in entry.keys)

    def _dispatch_due(self, now: float) -> float:
        """Hand due entries to the delivery threads; seconds until the next is due.

        Runs under the condition's lock. Candidates are looked at in the order they
        became candidates (spool order for new events); one that is not yet at the
        head of all its chains is dropped, and comes back when its predecessor is
        done. Each entry costs O(log n) to schedule, however many wait: a receiver
        down for a day with 100,000 events queued does not make the loop spin.
        """
        while self._timers and self._timers[0][0] <= now:
            self._candidates.append(heapq.heappop(self._timers)[1])
        capacity = DELIVERY_THREADS - self._in_flight
        while capacity > 0 and self._candidates:
            entry = self._entries.get(self._candidates.popleft())
            if (
                entry is None
                or entry.in_flight
                or entry.next_at > now
                or not self._is_head(entry)
            ):
                continue
            entry.in_flight = True
            self._in_flight += 1
            capacity -= 1
            self._work.put(entry)
        delay = self._timers[0][0] - now if self._timers else POLL_SECONDS
        return min(max(delay, 0.01), POLL_SECONDS)

    def _settled(self, entry: Entry, *, remove: bool) -> None:
        """An attempt ended: the entry is done (``remove``) or waits for a retry."""
        with self._cond:
            entry.in_flight = False
            self._in_flight -= 1
            if remove:
                self._entries.pop(entry.name, None)
                for key in entry.keys:
                    chain = self._chains[key]
                    with contextlib.suppress(ValueError):
                        chain.remove(entry.name)  # the head, in practice
                    if chain:
                        self._candidates.append(chain[0])
                    else:
                        del self._chains[key]
            elif entry.next_at > time.time():
                heapq.heappush(self._timers, (entry.next_at, entry.name))
            else:
                self._candidates.append(entry.name)
            self._cond.notify_all()

    # --- threads: delivery

    def _deliver_loop(self) -> None:
        while True:
            entry = self._work.get()
            if entry is None:
                return
            if self._closing:
                self._settled(entry, remove=False)
                continue
            try:
                self._attempt(entry)
            except Exception:  # a bug must not kill a delivery thread
                logger.exception("hooks: delivering %s failed", entry.name)
                self._settled(entry, remove=False)

    def _attempt(self, entry: Entry) -> None:
        hook = self._hooks.get(entry.hook)
        if hook is None:
            entry.last_error = f"hook {entry.hook!r} is no longer configured"
            self._dead_letter(entry)
            return
        try:
            self._deliver(hook, entry.event)
        except DeliveryError as err:
            error = str(err)
        else:
            self._metrics.hook_delivery("delivered")
            if hook.name in self._failing:
                self._failing.discard(hook.name)
                logger.info("hooks: %s delivers again", hook.name)
            self._finish(entry)
            return
        now = time.time()
        entry.attempts += 1
        entry.last_error = error[:MAX_ERROR_CHARS]
        too_old = now - entry.queued_at >= hook.max_age_seconds
        if entry.attempts >= hook.max_attempts or too_old:
            self._dead_letter(entry)
            return
        entry.next_at = now + backoff_seconds(entry.attempts)
        self._metrics.hook_delivery("failed")
        if hook.name not in self._failing:
            self._failing.add(hook.name)
            logger.warning("hooks: %s failing: %s (retrying)", hook.name, error)
        try:
            self._spool_folder.save_state(entry)
        except OSError as err:  # the old state stays: more attempts, nothing lost
            logger.error(  # noqa: TRY400 - an operational fault, not a bug
                "hooks: cannot update %s: %s", entry.name, err.strerror
            )
        self._settled(entry, remove=False)

    def _finish(self, entry: Entry) -> None:
        """Delivered: never again; the segment goes once all of it is done."""
        try:
            self._spool_folder.mark_done(entry)
        except OSError as err:  # delivered again after a restart: at least once
            logger.error(  # noqa: TRY400 - an operational fault, not a bug
                "hooks: cannot mark %s done: %s", entry.name, err.strerror
            )
        self._settled(entry, remove=True)
        with self._cond:
            left = self._remaining.get(entry.segment, 1) - 1
            if left > 0:
                self._remaining[entry.segment] = left
            else:
                self._remaining.pop(entry.segment, None)
        if left <= 0:
            self._spool_folder.remove_segment(entry.segment)

    def _dead_letter(self, entry: Entry) -> None:
        try:
            self._spool_folder.dead_letter(entry)
        except OSError as err:
            logger.error(  # noqa: TRY400 - an operational fault, not a bug
                "hooks: cannot dead-letter %s: %s", entry.name, err.strerror
            )
        self._metrics.hook_delivery("dead-lettered")
        event = entry.event
        self._audit.event(
            "hook_dead_lettered", id=event.get("id"), hook=entry.hook,
            kind=event.get("event"), path=event.get("path"),
            attempts=entry.attempts, error=entry.last_error,
        )  # fmt: skip
        self._finish(entry)

    def _deliver(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """One attempt; raises DeliveryError."""
        if hook.command:
            self._run(hook, event)
        else:
            self._post(hook, event)

    def _run(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """The command, with the event on stdin and in ``FTPS_*`` variables.

        No shell, no inherited environment (it may hold the gateway's secrets): PATH
        and LANG, then one variable per key that has a value. Its own process group,
        so the timeout kills what it started too.
        """
        env = {"PATH": COMMAND_PATH, "LANG": "C.UTF-8"}
        env |= {f"FTPS_{k.upper()}": str(v) for k, v in event.items() if v is not None}
        body = event_body(event, with_real_path=True)
        with tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(  # noqa: S603 - an operator's argv, no shell
                    hook.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=stderr, env=env, cwd="/", start_new_session=True,
                    close_fds=True,
                )  # fmt: skip
            except OSError as err:
                raise DeliveryError(f"cannot run {hook.command[0]}: {err}") from err
            self._processes.add(process)
            try:
                process.communicate(body, timeout=hook.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait()
                raise DeliveryError(
                    f"timed out after {hook.timeout_seconds} s; killed"
                ) from None
            finally:
                self._processes.discard(process)
            code = process.returncode
            if code == 0:
                return
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(stderr.tell() - 300, 0))
            tail = stderr.read().decode("utf-8", "replace").strip()
        what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise DeliveryError(f"{what}: {tail}" if tail else what)

    def _post(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """POST the signed JSON; 2xx = delivered. No redirects, no retries here."""
        body = event_body(event, with_real_path=False)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(hook.secret, body),
            "User-Agent": f"ftps-gateway/{build_version()}",
        }
        try:
            response = self._pool(hook).request(
                "POST", hook.url, body=body, headers=headers,
                timeout=urllib3.Timeout(total=hook.timeout_seconds),
                retries=False, redirect=False, preload_content=False,
            )  # fmt: skip
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise DeliveryError(_describe_http_error(err)) from err
        try:
            text = response.read(MAX_RESPONSE_BYTES)
        except (urllib3.exceptions.HTTPError, OSError):
            text = b""
        finally:
            if response.length_remaining == 0:
                response.release_conn()
            else:
                response.close()  # a body left unread: never reuse that connection
        if not 200 <= response.status < 300:  # noqa: PLR2004
            shown = text[:200].decode("utf-8", "replace").strip()
            raise DeliveryError(
                f"HTTP {response.status}" + (f": {shown}" if shown else "")
            )

    def _pool(self, hook: HookSettings) -> urllib3.PoolManager:
        key = (hook.name, hook.url, str(hook.ca_file))
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = urllib3.PoolManager(
                    num_pools=4, maxsize=DELIVERY_THREADS, cert_reqs="CERT_REQUIRED",
                    ca_certs=str(hook.ca_file) if hook.ca_file else None,
                )  # fmt: skip
                self._pools[key] = pool
            return pool


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
        reset; the delivering process queues it within ``POLL_SECONDS``.
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


def _non_empty(folder: Path) -> bool:
    return bool(_names(folder))


def _lock_free(folder: Path) -> bool:
    """True if no running process holds ``folder``'s lock."""
    try:
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _describe_http_error(err: BaseException) -> str:
    """A short, useful reason for a failed request (no traceback, no URL query)."""
    reason = getattr(err, "reason", None) or err
    text = str(reason)
    if isinstance(err, urllib3.exceptions.SSLError) or "CERTIFICATE_VERIFY" in text:
        return f"TLS: {text}"
    if isinstance(err, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"timed out: {text}"
    return f"{type(reason).__name__}: {text}"
