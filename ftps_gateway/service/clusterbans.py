"""A cluster node's bans: the replica of the cluster's list, and its own (issue 15).

``BanReplica`` answers ``is_banned`` for ``cluster.RedisState`` without a round trip:
it runs for every new connection, on the IO loop, so it must be a dict lookup (and no
parsing at all while no ban is in force). It owns:

- **the replica**, kept current by the "redis-bans" thread (``listen``). Every ban
  change is published on a channel. Pub/sub rather than polling: a ban reaches every
  node in milliseconds, where a poll fast enough for the 2 s the issue asks would cost
  every node five reads a second, for an event that happens a few times a day. Every
  change carries the version Redis gave it: missed messages (a reconnect) are caught
  by the version the heartbeat reads (any gap reloads the whole list, ``sync``), and a
  change older than what the replica has is ignored, so listeners (``watch``: a
  supervisor's workers) see the changes in Redis' order;
- **this node's own defender**, which scores failures while Redis is unreachable;
  its bans join the cluster's when Redis is back (``push_local``);
- **the keys**: addresses are keyed as everywhere (``policy.netpolicy.address_key``,
  ``access.ipv6_prefix_length``); the ban methods take the peer's address and test
  ``access.safe`` on it before keying it.

Scoring a failure in Redis is one of the state's batched requests (``cluster``); its
answer comes back through ``ban_from``, which puts the ban in the replica at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ftps_gateway.policy.defender import Ban, Defender
from ftps_gateway.policy.netpolicy import AccessList, address_key
from ftps_gateway.service.redisclient import RECONNECT_SECONDS, describe, reply_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ftps_gateway.config import IPNetwork
    from ftps_gateway.service.redisclient import RedisScripts
    from ftps_gateway.session.state import StateSettings

logger = logging.getLogger("ftps_gateway")


@dataclass(frozen=True)
class Banned:
    """One ban in the replica."""

    deadline: float  # monotonic
    offences: int
    until: float  # wall clock, for ban list


class BanReplica:
    """The bans this node enforces: the cluster's (replicated) and its own."""

    def __init__(self, redis: RedisScripts, settings: StateSettings) -> None:
        self._redis = redis
        self._settings = settings
        self._safe = _safe_list(settings.safe)
        self._local_defender = Defender(
            settings.defender, settings.safe, ipv6_prefix=settings.ipv6_prefix
        )
        self._local_bans = False  # the local defender has banned someone (ever)
        # The bans: key -> ban. Changed under _lock (with the listeners told, in
        # order); read without it (a dict lookup is atomic).
        self._lock = threading.Lock()
        self._replica: dict[str, Banned] = {}
        self._listeners: list[Callable[[Ban], None]] = []
        self._version = 0  # the newest change in the replica
        self._resync = threading.Event()

    def update(self, settings: StateSettings) -> None:
        """New defender settings and keys (config reload); bans already in force
        keep the key they were made with."""
        self._local_defender.update(
            settings.defender, settings.safe, settings.ipv6_prefix
        )
        self._settings = settings
        self._safe = _safe_list(settings.safe)

    # --- asked on the IO loop

    def is_banned(self, ip: str) -> bool:
        """From the replica (and this node's own bans while Redis was away).

        ``ip`` is a peer address (or an address key, as the login queue asks); an
        address in ``access.safe`` is never banned. No parsing while no ban is in
        force: this runs for every new connection.
        """
        if not self._replica and not self._local_bans:
            return False
        if self._is_safe(ip):
            return False
        key = address_key(ip, self._settings.ipv6_prefix)
        banned = self._replica.get(key)
        if banned is not None and banned.deadline > time.monotonic():
            return True
        return self._local_bans and self._local_defender.is_banned(ip)

    def failure_key(self, ip: str) -> str | None:
        """The key a failed login from ``ip`` is scored under; None: not scored
        (the defender is off, or ``ip`` is in ``access.safe``)."""
        if not self._settings.defender.enabled or self._is_safe(ip):
            return None
        return address_key(ip, self._settings.ipv6_prefix)

    def enforced(self) -> list[Ban]:
        """The bans in force here, soonest to end first (no round trip)."""
        now, wall = time.monotonic(), time.time()
        found = {
            key: Ban(key, b.deadline - now, b.offences, wall + b.deadline - now)
            for key, b in list(self._replica.items())
            if b.deadline > now
        }
        if self._local_bans:
            for ban in self._local_defender.bans():
                found.setdefault(ban.ip, ban)
        return sorted(found.values(), key=lambda ban: ban.remaining_seconds)

    # --- changes

    def ban_from(self, key: str, result: Any) -> Ban | None:
        """FAILURE's answer: {0}, or {1, until, now, offences, version}."""
        if not int(result[0]):
            return None
        until_ms, now_ms, offences = int(result[1]), int(result[2]), int(result[3])
        length = (until_ms - now_ms) / 1000
        banned = Banned(time.monotonic() + length, offences, time.time() + length)
        # At once, not only when the channel brings it: the next connection of the
        # guesser may be a millisecond away.
        self._change(key, banned, int(result[4]), bump=False)
        return Ban(key, length, offences, banned.until)

    def fail_locally(self, ip: str) -> Ban | None:
        """Scored by this node alone; a ban reaches its listeners (workers) too and
        joins the cluster's when Redis is back (``push_local``)."""
        with self._lock:
            ban = self._local_defender.record_failure(ip)
            if ban is not None:
                self._local_bans = True
                self._tell(ban)
        return ban

    def push_local(self) -> None:
        """Bans this node decided alone join the cluster's (raises RedisError)."""
        max_ban_ms = self._settings.defender.max_ban_seconds * 1000
        for ban in self._local_defender.bans():
            remaining_ms = int(ban.remaining_seconds * 1000)
            if remaining_ms > 0:
                self._redis.call(
                    "push_ban", ban.ip, remaining_ms, ban.offences, max_ban_ms
                )

    def watch(self, listener: Callable[[Ban], None]) -> None:
        """Call ``listener`` with every ban made or lifted from now on, in order."""
        with self._lock:
            self._listeners.append(listener)

    # --- the admin socket's thread (these calls block, bounded)

    def cluster_bans(self) -> list[Ban]:
        """The cluster's bans, soonest to end first (this node's view if Redis is
        unreachable)."""
        try:
            reply = self._redis.call("bans")
        except RedisError as err:
            logger.warning("ban list from this node only: Redis: %s", describe(err))
            return self.enforced()
        now_ms, entries = int(reply[0]), reply[2:]
        wall = time.time()
        found = []
        for index in range(0, len(entries), 3):
            remaining = (int(float(entries[index + 1])) - now_ms) / 1000
            key = reply_text(entries[index])
            offences = int(entries[index + 2])
            found.append(Ban(key, remaining, offences, wall + remaining))
        listed = {ban.ip for ban in found}
        found += [b for b in self._local_defender.bans() if b.ip not in listed]
        return sorted(found, key=lambda ban: ban.remaining_seconds)

    def remove(self, key: str) -> bool:
        """Lift the ban on ``key`` (``session.state.ban_key``) on every node; False
        if it was not banned."""
        key = address_key(key, self._settings.ipv6_prefix)
        lifted_here = self._local_defender.remove(key)
        banned = self._replica.get(key)
        lifted_here = lifted_here or (
            banned is not None and banned.deadline > time.monotonic()
        )
        try:
            was_banned, version = self._redis.call("unban", key)
        except RedisError as err:
            logger.warning(
                "ban on %s lifted on this node only: Redis: %s", key, describe(err)
            )
            self._change(key, None, None)
            return lifted_here
        # Here at once (the channel brings it to the other nodes, and here again).
        self._change(key, None, int(version), bump=False)
        return bool(int(was_banned)) or lifted_here

    # --- keeping the replica current

    @property
    def version(self) -> int:
        """Redis' number of the newest change in the replica."""
        return self._version

    def ask_resync(self) -> None:
        """Reload the whole list at the next chance (a version gap, a resubscribe)."""
        self._resync.set()

    def resync_asked(self) -> bool:
        """Whether the list should be reloaded (``sync``)."""
        return self._resync.is_set()

    def listen(self, stopping: threading.Event, wake: Callable[[], None]) -> None:
        """The "redis-bans" thread: keep the replica current from the channel,
        resubscribe after any break; ``wake`` gets the request thread to reload the
        list (whatever was published while nobody listened)."""
        while not stopping.is_set():
            pubsub = self._redis.pubsub()
            try:
                pubsub.subscribe(self._redis.bans_channel)
                self._resync.set()  # whatever was published meanwhile
                wake()
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._apply(message["data"])
            except RedisError:
                stopping.wait(RECONNECT_SECONDS)
            finally:
                pubsub.close()

    def sync(self) -> None:
        """Replace the replica with the cluster's list of bans (raises RedisError)."""
        self._resync.clear()
        reply = self._redis.call("bans")
        now_ms, version, entries = int(reply[0]), int(reply[1]), reply[2:]
        clock, wall = time.monotonic(), time.time()
        replica = {}
        for index in range(0, len(entries), 3):
            length = (int(float(entries[index + 1])) - now_ms) / 1000
            replica[reply_text(entries[index])] = Banned(
                clock + length, int(entries[index + 2]), wall + length
            )
        with self._lock:
            if version < self._version:  # a newer change came meanwhile
                self._resync.set()  # read again at the next beat
                return
            before, self._replica = self._replica, replica
            self._version = version
            for key in before.keys() - replica.keys():
                self._tell(Ban(key, 0.0, 0, wall))
            for key, banned in replica.items():
                old = before.get(key)
                if old is None or (old.offences, round(old.until)) != (
                    banned.offences,
                    round(banned.until),
                ):
                    remaining = banned.deadline - clock
                    self._tell(Ban(key, remaining, banned.offences, banned.until))

    def _apply(self, data: bytes | str) -> None:
        """One message of the channel: a ban made or lifted, with its version."""
        try:
            change = json.loads(data)
            version = int(change["v"])
            key = str(change["ip"])
            banned = None
            if change["op"] == "ban":
                length = (int(change["until"]) - int(change["now"])) / 1000
                banned = Banned(
                    time.monotonic() + length, int(change["n"]), time.time() + length
                )
        except (ValueError, KeyError, TypeError):
            logger.warning("cluster: ignored an unreadable ban message")
            return
        self._change(key, banned, version)

    def _change(
        self,
        key: str,
        banned: Banned | None,
        version: int | None,
        *,
        bump: bool = True,
    ) -> None:
        """Apply one change to the replica and tell the listeners, in order.

        ``version`` is Redis' number for the change (None: decided here alone). A
        change not newer than the replica is old news (the channel and this node's
        own request both bring a ban or a lift; a resync may have read it already).
        ``bump``: the replica is now at ``version`` (False when this node's own
        request answered it: its message on the channel still comes, in order, and
        the gap check counts on it; an older message arriving meanwhile may briefly
        undo it until then).
        """
        with self._lock:
            if version is not None:
                if version <= self._version:
                    return
                if bump:
                    if version != self._version + 1:
                        self._resync.set()  # a gap: reload the list at the next beat
                    self._version = version
            if banned is None:
                self._replica.pop(key, None)
                self._local_defender.remove(key)
                self._tell(Ban(key, 0.0, 0, time.time()))
            else:
                self._replica[key] = banned
                remaining = banned.deadline - time.monotonic()
                self._tell(Ban(key, remaining, banned.offences, banned.until))

    def _tell(self, ban: Ban) -> None:
        """Hand ``ban`` to every listener (under ``_lock``: in order)."""
        for listener in self._listeners:
            try:
                listener(ban)
            except Exception:  # one listener's bug must not stop the replica
                logger.exception("ban listener failed")

    def _is_safe(self, ip: str) -> bool:
        """``access.safe`` is about real addresses (a key never parses: not safe)."""
        safe = self._safe
        return safe is not None and safe.is_allowed(ip)


def _safe_list(networks: Iterable[IPNetwork]) -> AccessList | None:
    """None for "nobody is safe" (an empty AccessList would allow everyone)."""
    networks = tuple(networks)
    return AccessList(networks) if networks else None
