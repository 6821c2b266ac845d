"""Bans, login slots and quota reservations that hold across worker processes.

With several workers, a partner's third session may land on any of them, and a
password guesser's attempts are spread over all of them: limits and bans only mean
something if one place keeps them. That place is the supervisor: it keeps one
``session.state.LocalState`` (any ``StateStore``, so a Redis-backed one can take its
place) and serves each worker over a ``SOCK_SEQPACKET`` socket pair (one JSON message
per batch, message boundaries kept by the kernel).

Why no worker ever waits for an answer (issue 17: 22% of a worker's samples were a
synchronous round trip here, on the IO loop):

- **Bans are replicated.** The supervisor sends a worker the full ban list when its
  channel opens (the worker reads it before serving anyone), then every change as it
  happens; ``is_banned`` is a dictionary lookup in the worker (``BanReplica``).
- **Everything else is a request answered later.** ``ChannelState`` (the worker's
  side, in its IO loop through ``ftp.loop.MessagePort``) queues each request with an
  id and the callback that wants the answer; requests made in one turn of the loop
  leave as one message; the answers come back as one message and each callback runs
  on the loop. A session waiting for its login slot is paused, as during PASS.
  Logouts and quota releases are fire and forget.

What a worker held (its sessions' login slots, its uploads' reservations) is released
when its channel closes: the supervisor tracks holdings per channel, so a worker
killed with SIGKILL never leaks a partner's slots. Without the supervisor a worker
fails closed (every address banned, every login over the limit) and, through
``PR_SET_PDEATHSIG`` or ``ChannelState.lost``, stops so a fresh one can take its place.

A worker's loop watchdog says here when its IO loop stalls and turns again
(``/readyz`` lists it). Metrics do not travel here: each worker writes them into
prometheus-client's multiprocess files (``workermetrics``, decision 0012).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ftps_gateway.policy.defender import Ban
from ftps_gateway.session.state import (
    LIMIT_TOTAL,
    BanReplica,
    LoginSlot,
    QuotaClaim,
    QuotaMark,
    StateSettings,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ftps_gateway.session.state import StateStore

logger = logging.getLogger("ftps_gateway")

MAX_MESSAGE_BYTES = 1 << 20  # the largest message is a ban list chunk (~50 KiB)
# Requests or bans per message: a SOCK_SEQPACKET message must fit the socket's send
# buffer (~208 KiB by default); ~100 bytes each keeps a message under ~50 KiB.
MAX_ITEMS_PER_MESSAGE = 500
# Messages queued for one worker before it counts as stuck and its channel is cut
# (the worker then fails closed and is restarted): bans are rare, answers small.
MAX_QUEUED_MESSAGES = 10_000
SYNC_TIMEOUT_SECONDS = 30.0  # a new worker waits this long for the ban list

# Request names on the wire.
OP_LOGIN = "login"
OP_LOGOUT = "logout"
OP_FAILURE = "failure"
OP_MARKS = "marks"
OP_RESERVE = "reserve"
OP_RELEASE = "release"


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end) of a new channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# One encoder: ``json.dumps`` with options builds a new one per message (two per
# session: its open+login and logout+close batches; decision 0014).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode()


def _ban_fields(ban: Ban) -> list[Any]:
    return [ban.ip, ban.remaining_seconds, ban.offences, ban.until]


def _ban(fields: Sequence[Any]) -> Ban:
    ip, remaining, offences, until = fields
    return Ban(str(ip), float(remaining), int(offences), float(until))


def _claim(fields: Sequence[Any]) -> QuotaClaim:
    scope, max_bytes, max_files, walked_bytes, walked_files = fields[:5]
    mark_bytes, mark_files, nbytes, files = fields[5:]
    return QuotaClaim(
        str(scope), max_bytes, max_files, int(walked_bytes), int(walked_files),
        QuotaMark(int(mark_bytes), int(mark_files)), int(nbytes), int(files),
    )  # fmt: skip


def _claim_fields(claim: QuotaClaim) -> list[Any]:
    return [
        claim.scope, claim.max_bytes, claim.max_files, claim.walked_bytes,
        claim.walked_files, claim.mark.committed_bytes, claim.mark.committed_files,
        claim.nbytes, claim.files,
    ]  # fmt: skip


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), MAX_ITEMS_PER_MESSAGE):
        yield items[start : start + MAX_ITEMS_PER_MESSAGE]


# --- supervisor side ---------------------------------------------------------------


class StateService:
    """Supervisor side: serves every worker's channel from one ``StateStore``."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        # worker index -> when (monotonic, here) its IO loop stopped turning
        self.loop_stalls: dict[int, float] = {}
        self._lock = threading.Lock()
        self._peers: set[_Peer] = set()
        self._handlers: dict[str, Callable[[list[Any], _Peer, _Batch], None]] = {
            OP_LOGIN: self._login,
            OP_LOGOUT: self._logout,
            OP_FAILURE: self._failure,
            OP_MARKS: self._marks,
            OP_RESERVE: self._reserve,
            OP_RELEASE: self._release_one,
        }
        store.watch_bans(self._ban_changed)

    def serve(self, conn: socket.socket, worker: int) -> threading.Thread:
        """Send ``worker`` the ban list, then answer it in a thread until it goes."""
        peer = _Peer(conn, worker)
        with self._lock:
            peer.held_back = []  # changes while the list below is read
            self._peers.add(peer)
        bans = [_ban_fields(ban) for ban in self.store.bans()]
        with self._lock:
            for index, chunk in enumerate(_chunks(bans)):
                peer.put({"bans": list(chunk), "replace": index == 0})
            if not bans:
                peer.put({"bans": [], "replace": True})
            for fields in peer.held_back:
                peer.put({"bans": [fields]})
            peer.held_back = None
            peer.put({"synced": True})
        thread = threading.Thread(
            target=self._serve, args=(peer,), name=f"state-{worker}", daemon=True
        )
        thread.start()
        return thread

    def _ban_changed(self, ban: Ban) -> None:
        """A ban made or lifted: on to every worker's replica (in order)."""
        fields = _ban_fields(ban)
        with self._lock:
            for peer in self._peers:
                if peer.held_back is not None:
                    peer.held_back.append(fields)
                else:
                    peer.put({"bans": [fields]})

    def _serve(self, peer: _Peer) -> None:
        # One buffer for every message: recv(MAX_MESSAGE_BYTES) allocated (mmap) and
        # shrank (mremap, munmap) a MiB per message, two per session (decision 0014).
        buffer = bytearray(MAX_MESSAGE_BYTES)
        try:
            while size := peer.conn.recv_into(buffer):
                request = json.loads(buffer[:size])
                if "loop" in request:  # the watchdog's push: no answer
                    self._loop_report(peer.worker, float(request["loop"]))
                    continue
                batch = _Batch(peer)
                for op in request["ops"]:
                    self._apply(op, peer, batch)
                batch.close()
        except ConnectionResetError:
            # Killed with answers still unread (its exit is logged as such): an
            # end like EOF, not a fault of the channel.
            logger.info("shared-state channel of worker %d reset", peer.worker)
        except (OSError, ValueError, KeyError, TypeError):
            logger.exception("shared-state channel of worker %d failed", peer.worker)
        finally:
            with self._lock:
                self._peers.discard(peer)
            peer.close()
            self.loop_stalls.pop(peer.worker, None)
            self._release(peer.held)

    def _loop_report(self, worker: int, stalled: float) -> None:
        if stalled > 0:
            self.loop_stalls[worker] = time.monotonic() - stalled
        else:
            self.loop_stalls.pop(worker, None)

    def _release(self, held: _Held) -> None:
        """Whatever a worker held dies with it."""
        with held.lock:
            held.closed = True
            slots, held.slots = held.slots, Counter()
            reservations, held.reservations = held.reservations, set()
        for slot, count in slots.items():
            for _ in range(count):
                self.store.logout(slot)
        for reservation in reservations:
            self.store.release(reservation, {})

    def _apply(self, op: list[Any], peer: _Peer, batch: _Batch) -> None:
        """One request: ``[name, id, arguments...]`` (id 0: no answer wanted)."""
        self._handlers[op[0]](op, peer, batch)

    def _login(self, op: list[Any], peer: _Peer, batch: _Batch) -> None:
        request_id, slot = int(op[1]), LoginSlot(str(op[2]), str(op[3]))

        def granted(refusal: str | None) -> None:
            if refusal is None and not peer.held.take(slot):
                self.store.logout(slot)  # the worker is gone already
            batch.reply(request_id, refusal)

        self.store.login(slot, granted)

    def _logout(self, op: list[Any], peer: _Peer, _batch: _Batch) -> None:
        slot = LoginSlot(str(op[2]), str(op[3]))
        if peer.held.give_back(slot):
            self.store.logout(slot)

    def _failure(self, op: list[Any], _peer: _Peer, batch: _Batch) -> None:
        request_id = int(op[1])

        def scored(ban: Ban | None) -> None:
            batch.reply(request_id, _ban_fields(ban) if ban is not None else None)

        self.store.record_failure(str(op[2]), scored)

    def _marks(self, op: list[Any], _peer: _Peer, batch: _Batch) -> None:
        request_id = int(op[1])

        def read(marks: Mapping[str, QuotaMark]) -> None:
            batch.reply(
                request_id,
                {
                    scope: [mark.committed_bytes, mark.committed_files]
                    for scope, mark in marks.items()
                },
            )

        self.store.quota_marks([str(scope) for scope in op[2]], read)

    def _reserve(self, op: list[Any], peer: _Peer, batch: _Batch) -> None:
        request_id = int(op[1])
        reservation = f"w{peer.worker}:{op[2]}"  # unique across workers
        peer.held.reserving(reservation)
        self.store.reserve(
            reservation,
            [_claim(fields) for fields in op[3]],
            lambda full: batch.reply(request_id, full),
        )

    def _release_one(self, op: list[Any], peer: _Peer, _batch: _Batch) -> None:
        reservation = f"w{peer.worker}:{op[2]}"
        if peer.held.released(reservation):
            committed = {
                str(scope): (int(amount[0]), int(amount[1]))
                for scope, amount in op[3].items()
            }
            self.store.release(reservation, committed)


@dataclass
class _Held:
    """What one worker holds: login slots and open quota reservations."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: Counter[LoginSlot] = field(default_factory=Counter)
    reservations: set[str] = field(default_factory=set)
    closed: bool = False  # the worker is gone: nothing more is held for it

    def take(self, slot: LoginSlot) -> bool:
        """Count a granted slot; False if the worker is gone (give it back)."""
        with self.lock:
            if self.closed:
                return False
            self.slots[slot] += 1
            return True

    def give_back(self, slot: LoginSlot) -> bool:
        """Stop counting ``slot``; False if this worker did not hold it."""
        with self.lock:
            if self.slots[slot] <= 0:
                return False
            self.slots[slot] -= 1
            if not self.slots[slot]:
                del self.slots[slot]
            return True

    def reserving(self, reservation: str) -> None:
        """``reservation`` may hold quota from now on."""
        with self.lock:
            self.reservations.add(reservation)

    def released(self, reservation: str) -> bool:
        """Stop tracking ``reservation``; False if this worker did not hold it."""
        with self.lock:
            if reservation not in self.reservations:
                return False
            self.reservations.discard(reservation)
            return True


class _Peer:
    """One worker's channel: a writer thread sends what is queued, in order.

    Queuing never blocks (the ban listener runs under the store's lock, and a stuck
    worker must not hold up the others); a worker that lets ``MAX_QUEUED_MESSAGES``
    pile up is cut off.
    """

    def __init__(self, conn: socket.socket, worker: int) -> None:
        self.conn = conn
        self.worker = worker
        self.held = _Held()
        self.held_back: list[list[Any]] | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED_MESSAGES)
        self._writer = threading.Thread(
            target=self._write, name=f"state-{worker}-out", daemon=True
        )
        self._writer.start()

    def put(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the worker."""
        try:
            self._queue.put_nowait(_encode(message))
        except queue.Full:
            logger.error(  # noqa: TRY400 - no traceback: nothing failed here
                "worker %d reads no state messages; cutting it off", self.worker
            )
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)

    def _write(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self.conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        """Stop the writer and close the socket."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._writer.join(5)
        self.conn.close()


class _Batch:
    """The answers to one message's requests, sent together.

    A store that answers later (from another thread) gets its answer sent on its
    own once the batch has gone.
    """

    def __init__(self, peer: _Peer) -> None:
        self._peer = peer
        self._lock = threading.Lock()
        self._replies: list[list[Any]] | None = []

    def reply(self, request_id: int, result: Any) -> None:
        """The answer to request ``request_id``."""
        with self._lock:
            if self._replies is not None:
                self._replies.append([request_id, result])
                return
        self._peer.put({"replies": [[request_id, result]]})

    def close(self) -> None:
        """Send the answers given so far; later ones go one by one."""
        with self._lock:
            replies, self._replies = self._replies or [], None
        for chunk in _chunks(replies):
            self._peer.put({"replies": list(chunk)})


# --- worker side -------------------------------------------------------------------


class Port(Protocol):
    """The worker's end of the channel in its IO loop (``ftp.loop.MessagePort``)."""

    def send_message(self, data: bytes) -> None:
        """Send one message now, or queue it until the socket takes it."""
        ...

    def close(self) -> None:
        """Leave the loop and close the socket."""
        ...


class ChannelState:
    """The supervisor's state as a worker's sessions see it; never blocks the loop.

    Before the loop runs, ``sync`` reads the ban list (no session exists yet, so
    that one wait is harmless); then ``attach`` hands the socket to the loop. Every
    method is called on the IO loop, and every ``done`` runs there.
    """

    def __init__(
        self,
        conn: socket.socket,
        settings: StateSettings,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """``on_lost`` ends the worker when the supervisor is gone (default: SIGINT
        to this process, which stops its loop at once)."""
        self.conn = conn
        self._on_lost = on_lost or _interrupt_self
        self.replica = BanReplica()
        self.replica.configure(settings.safe, settings.ipv6_prefix)
        self.broken = False
        self._ids = itertools.count(1)
        self._pending: dict[int, Callable[[Any], None]] = {}
        self._fallbacks: dict[int, Any] = {}  # what each pending request gets if lost
        self._batch: list[list[Any]] = []
        self._port: Port | None = None
        self._soon: Callable[[Callable[[], None]], object] | None = None
        self._flush_scheduled = False

    # --- set-up

    def sync(self, timeout: float = SYNC_TIMEOUT_SECONDS) -> None:
        """Read the supervisor's ban list (blocking; before serving anyone).

        Raises:
            OSError: the supervisor did not send it within ``timeout``.
        """
        self.conn.settimeout(timeout)
        try:
            while True:
                message = self.conn.recv(MAX_MESSAGE_BYTES)
                if not message:
                    raise ConnectionError("the supervisor closed the state channel")
                if self._handle(json.loads(message)):
                    return
        finally:
            self.conn.setblocking(False)  # noqa: FBT003 - the stdlib's signature

    def attach(self, port: Port, soon: Callable[[Callable[[], None]], object]) -> None:
        """Send through ``port``; ``soon(f)`` runs ``f`` on the loop after this turn."""
        self._port = port
        self._soon = soon

    def update(self, settings: StateSettings) -> None:
        """A reload: the keys and safe networks change; the limits are the
        supervisor's (it reloads its own config)."""
        self.replica.configure(settings.safe, settings.ipv6_prefix)

    # --- SharedState

    def is_banned(self, ip: str) -> bool:
        """From the replica (fails closed once the supervisor is gone)."""
        return self.replica.is_banned(ip)

    def active_bans(self) -> int:
        """Bans in the replica."""
        return self.replica.count()

    def record_failure(self, ip: str, done: Callable[[Ban | None], None]) -> None:
        """Scored by the supervisor; ``done`` gets the ban it triggered."""

        def answered(fields: Any) -> None:
            done(_ban(fields) if fields else None)

        self._request(answered, None, OP_FAILURE, ip)

    def login(self, slot: LoginSlot, done: Callable[[str | None], None]) -> None:
        """Ask for ``slot``; without the supervisor: refused."""

        def answered(refusal: Any) -> None:
            done(None if refusal is None else str(refusal))

        self._request(answered, LIMIT_TOTAL, OP_LOGIN, slot.address, slot.user)

    def logout(self, slot: LoginSlot) -> None:
        """Give ``slot`` back (fire and forget)."""
        self._tell(OP_LOGOUT, slot.address, slot.user)

    def quota_marks(
        self, scopes: Sequence[str], done: Callable[[Mapping[str, QuotaMark]], None]
    ) -> None:
        """The scopes' committed counters, from the supervisor."""

        def answered(marks: Any) -> None:
            done({
                str(scope): QuotaMark(int(amount[0]), int(amount[1]))
                for scope, amount in (marks or {}).items()
            })  # fmt: skip

        self._request(answered, {}, OP_MARKS, list(scopes))

    def reserve(
        self,
        reservation: str,
        claims: Sequence[QuotaClaim],
        done: Callable[[str | None], None],
    ) -> None:
        """Ask the supervisor to grant ``claims``; without it: refused."""

        def answered(full: Any) -> None:
            done(None if full is None else str(full))

        refused = claims[0].scope if claims else None
        fields = [_claim_fields(claim) for claim in claims]
        self._request(answered, refused, OP_RESERVE, reservation, fields)

    def release(
        self, reservation: str, committed: Mapping[str, tuple[int, int]]
    ) -> None:
        """The upload ended (fire and forget)."""
        amounts = {scope: list(amount) for scope, amount in committed.items()}
        self._tell(OP_RELEASE, reservation, amounts)

    def report_loop(self, stalled: float) -> None:
        """The loop watchdog's news: stalled for ``stalled`` s, or 0.0 (turns again).

        From the watchdog's thread, straight on the socket: the loop may be the one
        stuck, so nothing of its port or batch is used. A SOCK_SEQPACKET message
        goes whole, so it cannot mix with the loop's own messages.
        """
        if self.broken:
            return
        with contextlib.suppress(OSError):
            self.conn.send(_encode({"loop": stalled}))

    # --- the wire

    def _request(self, done: Callable[[Any], None], fallback: Any, *op: Any) -> None:
        if self.broken:
            done(fallback)
            return
        request_id = next(self._ids)
        self._pending[request_id] = done
        self._fallbacks[request_id] = fallback
        self._queue([op[0], request_id, *op[1:]])

    def _tell(self, *op: Any) -> None:
        if not self.broken:
            self._queue([op[0], 0, *op[1:]])

    def _queue(self, op: list[Any]) -> None:
        """Requests made in one turn of the loop leave together, after it."""
        self._batch.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._soon is None:  # not attached (tests, start-up): at once
                self._flush()
            else:
                self._soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, []
        if self.broken or not batch:
            return
        for chunk in _chunks(batch):
            data = _encode({"ops": list(chunk)})
            if self._port is not None:
                self._port.send_message(data)
            else:
                self.conn.sendall(data)

    def handle_message(self, data: bytes) -> None:
        """A message from the supervisor (called by the port, on the loop)."""
        try:
            self._handle(json.loads(data))
        except (ValueError, KeyError, TypeError):
            logger.exception("unreadable message from the supervisor")
            self.lost()

    def _handle(self, message: dict[str, Any]) -> bool:
        """Apply one message; True once the initial ban list is complete."""
        if "replies" in message:
            for request_id, result in message["replies"]:
                done = self._pending.pop(request_id, None)
                self._fallbacks.pop(request_id, None)
                if done is not None:
                    _run(done, result)
        if "bans" in message:
            bans = [_ban(fields) for fields in message["bans"]]
            if message.get("replace"):
                self.replica.replace(bans)
            else:
                for ban in bans:
                    self.replica.apply(ban)
        return bool(message.get("synced"))

    def lost(self) -> None:
        """The supervisor is gone: fail closed, answer what waits, then stop.

        Closing the socket tells the supervisor (if alive) to release what this
        worker held; SIGINT stops the worker's loop at once (its exit code is not
        the config error's, so the supervisor restarts it).
        """
        if self.broken:
            return
        logger.error("lost the supervisor; refusing new sessions")
        self.broken = True
        self.replica.everyone = True
        pending, self._pending = self._pending, {}
        fallbacks, self._fallbacks = self._fallbacks, {}
        for request_id, done in pending.items():
            _run(done, fallbacks.get(request_id))
        with contextlib.suppress(OSError):
            if self._port is not None:
                self._port.close()  # out of the loop, then closed
            else:
                self.conn.close()
        self._on_lost()


def _interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _run(done: Callable[[Any], None], result: Any) -> None:
    """One callback's bug must not stop the others (or the channel)."""
    try:
        done(result)
    except Exception:
        logger.exception("a shared-state callback failed")
