"""Bans and session limits that hold across worker processes.

With several workers, a partner's third session may land on any of them, and a
password guesser's attempts are spread over all of them: per-address and per-user
limits and the defender only mean something if one place keeps them. That place is
the supervisor: it owns the real ``Defender`` and ``SessionLimits`` and answers each
worker over a ``SOCK_SEQPACKET`` socket pair (one JSON message per request and per
answer, message boundaries kept by the kernel).

Why a round trip instead of shared memory: each call is ~50 µs on a local socket
pair and happens once per connection or login, not per byte; a shared-memory hash
table with a cross-process lock would be faster but far larger and harder to get
right (a worker dying while holding the lock). What a dying worker held (its open
sessions, its logins) is released by the supervisor when its socket closes, so a
crash never leaks a partner's session slots.

Workers also push their rendered metrics here every few seconds; the supervisor sums
them for its one ``/metrics`` (``workers.AggregatedMetrics``), and a worker's loop
watchdog says when its IO loop stalls and turns again (``/readyz`` lists it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ftps_gateway.policy.defender import LIMIT_TOTAL, Ban

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ftps_gateway.config import DefenderSettings, IPNetwork
    from ftps_gateway.policy.defender import Defender, SessionLimits

logger = logging.getLogger("ftps_gateway")

MAX_MESSAGE_BYTES = 1 << 20  # a metrics push is the largest message (~30 KiB)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end) of a new channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class StateService:
    """Supervisor side: answers the workers from the one Defender and SessionLimits."""

    def __init__(self, defender: Defender, limits: SessionLimits) -> None:
        self.defender = defender
        self.limits = limits
        self.metrics: dict[int, str] = {}  # worker index -> its last metrics text
        # worker index -> when (monotonic, here) its IO loop stopped turning
        self.loop_stalls: dict[int, float] = {}

    def serve(self, conn: socket.socket, worker: int) -> threading.Thread:
        """Answer ``worker`` on ``conn`` in a thread until the worker goes away."""
        thread = threading.Thread(
            target=self._serve, args=(conn, worker), name=f"state-{worker}", daemon=True
        )
        thread.start()
        return thread

    def _serve(self, conn: socket.socket, worker: int) -> None:
        held = _Held()
        try:
            while message := conn.recv(MAX_MESSAGE_BYTES):
                request = json.loads(message)
                if request["op"] == "metrics":  # a push: no answer
                    self.metrics[worker] = request["text"]
                    continue
                if request["op"] == "loop":  # the watchdog's push: no answer
                    self._loop_report(worker, float(request["stalled"]))
                    continue
                answer = getattr(self, f"_op_{request['op']}")
                result = answer(request.get("arg", ""), held)
                conn.send(json.dumps({"result": result}).encode())
        except (OSError, ValueError, KeyError, AttributeError):
            logger.exception("shared-state channel of worker %d failed", worker)
        finally:
            conn.close()
            self.metrics.pop(worker, None)
            self.loop_stalls.pop(worker, None)
            # Whatever the worker held dies with it.
            for ip, count in held.addresses.items():
                for _ in range(count):
                    self.limits.close(ip)
            for user, count in held.users.items():
                for _ in range(count):
                    self.limits.logout(user)

    def _loop_report(self, worker: int, stalled: float) -> None:
        if stalled > 0:
            self.loop_stalls[worker] = time.monotonic() - stalled
        else:
            self.loop_stalls.pop(worker, None)

    # One method per request; ``held`` is what the asking worker holds.

    def _op_open(self, ip: str, held: _Held) -> str | None:
        refusal = self.limits.open(ip)
        if refusal is None:
            held.addresses[ip] += 1
        return refusal

    def _op_close(self, ip: str, held: _Held) -> None:
        if held.addresses[ip] > 0:
            held.addresses[ip] -= 1
            self.limits.close(ip)

    def _op_login(self, user: str, held: _Held) -> str | None:
        refusal = self.limits.login(user)
        if refusal is None:
            held.users[user] += 1
        return refusal

    def _op_logout(self, user: str, held: _Held) -> None:
        if held.users[user] > 0:
            held.users[user] -= 1
            self.limits.logout(user)

    def _op_snapshot(self, _arg: str, _held: _Held) -> object:
        return self.limits.snapshot()

    def _op_is_banned(self, ip: str, _held: _Held) -> bool:
        return self.defender.is_banned(ip)

    def _op_record_failure(self, ip: str, _held: _Held) -> dict[str, Any] | None:
        ban = self.defender.record_failure(ip)
        return asdict(ban) if ban is not None else None

    def _op_bans(self, _arg: str, _held: _Held) -> list[dict[str, Any]]:
        return [asdict(ban) for ban in self.defender.bans()]

    def _op_remove(self, ip: str, _held: _Held) -> bool:
        return self.defender.remove(ip)


@dataclass
class _Held:
    """What one worker holds: counted sessions per address and logins per user."""

    addresses: Counter[str] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)


class StateChannel:
    """Worker side of the channel: blocking calls, failing closed."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def call(self, op: str, arg: object = "", *, fallback: object = None) -> Any:
        """Ask the supervisor; ``fallback`` if it cannot answer (it is gone)."""
        with self._lock:
            if self.broken:
                return fallback
            try:
                self._conn.send(json.dumps({"op": op, "arg": arg}).encode())
                return json.loads(self._conn.recv(MAX_MESSAGE_BYTES))["result"]
            except (OSError, ValueError, KeyError):
                logger.exception("lost the supervisor; refusing new sessions")
                self._break()
                return fallback

    def push_metrics(self, text: str) -> None:
        """Send this worker's metrics text (no answer)."""
        with self._lock:
            if self.broken:
                return
            try:
                self._conn.send(json.dumps({"op": "metrics", "text": text}).encode())
            except OSError:
                logger.exception("could not push metrics to the supervisor")
                self._break()

    def report_loop(self, stalled: float) -> None:
        """The loop watchdog's news: stalled for ``stalled`` s, or 0.0 (turns again).

        From the watchdog's thread, without the lock: the loop may be the one
        stuck, holding it in ``call``. A SOCK_SEQPACKET message goes whole, so it
        cannot mix with a request; it has no answer to take from the caller.
        """
        if self.broken:
            return
        with contextlib.suppress(OSError):
            self._conn.send(json.dumps({"op": "loop", "stalled": stalled}).encode())

    def _break(self) -> None:
        """Fail closed, then end this worker so the supervisor starts a fresh one.

        Closing the socket tells the supervisor to release what this worker held;
        SIGINT stops the worker's loop at once (its exit code is not the config
        error's, so the supervisor restarts it).
        """
        self.broken = True
        with contextlib.suppress(OSError):
            self._conn.close()
        os.kill(os.getpid(), signal.SIGINT)


class RemoteDefender:
    """The supervisor's Defender, as a worker sees it (``defender.BanKeeper``)."""

    def __init__(self, channel: StateChannel) -> None:
        self._channel = channel

    def update(self, settings: DefenderSettings, safe: Iterable[IPNetwork]) -> None:
        """Settings are the supervisor's (it reloads its own config)."""

    def is_banned(self, ip: str) -> bool:
        """Fail closed: without the supervisor, treat everyone as banned."""
        return bool(self._channel.call("is_banned", ip, fallback=True))

    def record_failure(self, ip: str) -> Ban | None:
        """Score a failure; the ban, if it triggered one."""
        fields = self._channel.call("record_failure", ip)
        return Ban(**fields) if isinstance(fields, dict) else None

    def bans(self) -> list[Ban]:
        """Active bans."""
        return [Ban(**fields) for fields in self._channel.call("bans", fallback=[])]

    def active_count(self) -> int:
        """How many addresses are banned."""
        return len(self.bans())

    def remove(self, ip: str) -> bool:
        """Lift a ban."""
        return bool(self._channel.call("remove", ip, fallback=False))


class RemoteLimits:
    """The supervisor's SessionLimits, as a worker sees them (``LimitKeeper``)."""

    def __init__(self, channel: StateChannel) -> None:
        self._channel = channel

    def update(self, total: int, per_ip: int, per_user: int) -> None:
        """Limits are the supervisor's (it reloads its own config)."""

    def open(self, ip: str) -> str | None:
        """Count a session, or why not; without the supervisor: refused."""
        result = self._channel.call("open", ip, fallback=LIMIT_TOTAL)
        return str(result) if result is not None else None

    def close(self, ip: str) -> None:
        """A session counted by ``open`` ended."""
        self._channel.call("close", ip)

    def login(self, user: str) -> str | None:
        """Count a login, or why not."""
        result = self._channel.call("login", user, fallback="limit-per-user")
        return str(result) if result is not None else None

    def logout(self, user: str) -> None:
        """A login counted by ``login`` ended."""
        self._channel.call("logout", user)

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(total, per address, per user) across all workers."""
        total, per_ip, per_user = self._channel.call("snapshot", fallback=(0, {}, {}))
        return int(total), dict(per_ip), dict(per_user)
