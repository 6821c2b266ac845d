"""``RedisState``: bans, login slots and quota shared by a cluster's nodes (issue 15).

The ``session.state.StateStore`` of a node with ``[cluster]``: every node behind the
balancer asks one Redis, so ``max_failures`` counts failures on all nodes, a ban on
one node drops the address on all of them, ``max_sessions_per_user`` and the quotas
hold for the whole cluster. Redis, through the ``redis`` client from PyPI (the
maintained reference client; decision 0010): no protocol between nodes of our own.

Where it sits (decision 0005's two homes for it):

- **one process** (``server.workers = 1``): it is the server's ``gateway.state``;
  answers reach the IO loop through the loop waker;
- **a supervisor of workers**: it is the store ``sharedstate.StateService`` serves
  the workers from, so the node holds one lease whatever its worker count; answers
  are given on this module's thread (the service sends them on, ``_Batch``), ban
  changes reach the workers' replicas through ``watch_bans``, and the service gives
  back what a dead worker held (``logout``, ``release``) as it does for any store.

How it keeps the ``SharedState`` rules:

- **Never on the IO loop.** One thread ("redis-state") owns the connection for
  requests: the caller queues a request and returns; the thread sends everything
  queued as one pipeline (one round trip however many sessions asked meanwhile) and
  hands each answer back. Each decision is one Lua script (``redisscripts``), atomic
  in Redis: a login costs one round trip, a session end one (batched with whatever
  else ended), a ban check none (a local replica).
- **Bounded.** Every call times out after ``cluster.timeout_seconds`` (connect and
  read; redis-py's own retries are off, so the bound is not multiplied); requests
  that wait for an answer are bounded in number (``MAX_PENDING``), answered from the
  fallback beyond it. Fire-and-forget calls (logout, release) are never dropped: each
  gives back something a granted request took, so there are never more of them than
  slots and reservations held.
- **What a holder holds dies with it.** The node's holdings live in Redis under its
  name, with a lease renewed by a heartbeat every third of ``lease_seconds``; counts
  only ever sum live nodes, so a node killed with -9 stops counting when its lease
  ends. The node's own truth is kept here too (``_Holdings``): whenever Redis lost
  it (restart, the lease ran out while unreachable) the node writes it back whole.
- **Bans replicated.** Every ban change is published on a channel; a second thread
  keeps the replica that ``is_banned`` reads (a dict lookup, no round trip). Pub/sub
  rather than polling: a ban reaches every node in milliseconds, where a poll fast
  enough for the 2 s the issue asks would cost every node five reads a second, for
  an event that happens a few times a day. Every change carries the version Redis
  gave it: missed messages (a reconnect) are caught by the version the heartbeat
  reads (any gap reloads the whole list), and a change older than what the replica
  has is ignored, so listeners see the changes in Redis' order.
- **Addresses are keys** as everywhere (``policy.netpolicy.address_key``,
  ``access.ipv6_prefix_length``); the ban methods take the peer's address and test
  ``access.safe`` on it before keying it.

Redis unreachable (a timeout, a refused connection, a restart): the node says so
loudly (an error log line, an audit ``cluster_mode`` event, the
``ftps_gateway_cluster_mode`` gauge, ``/readyz``), and then ``on_unavailable``
decides: ``"local"`` serves on with this node's own counts (limits per node, bans
scored here), ``"refuse"`` answers new logins ``UNAVAILABLE`` (421); quota and bans
are always decided locally meanwhile (a running upload is not cut because Redis
blinked). The thread retries every ``RECONNECT_SECONDS``; when Redis answers again,
the node writes its holdings back, pushes the bans it decided alone, re-reads the
cluster's bans and returns to shared state.

The local fallback works on the node's own holdings (``_Holdings``) rather than on a
``session.state.LocalState`` beside them: the node's truth must carry over between
the two modes (a session granted by the cluster is still this node's session when
Redis goes away, and the other way round), and ``LocalState`` can only take what its
own limits grant, not record a grant decided elsewhere; its committed quota counters
would also start at zero, while the marks uploads took before the outage are the
cluster's (decision 0010).
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.retry import Retry

from ftps_gateway.config.describe import redacted
from ftps_gateway.errors import StartupError
from ftps_gateway.policy.defender import Ban, Defender
from ftps_gateway.policy.netpolicy import AccessList, address_key
from ftps_gateway.service import redisscripts
from ftps_gateway.session.state import (
    LIMIT_PER_IP,
    LIMIT_PER_USER,
    LIMIT_TOTAL,
    UNAVAILABLE,
    LoginSlot,
    QuotaClaim,
    QuotaMark,
    StateSettings,
    StateSnapshot,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import ClusterSettings, IPNetwork
    from ftps_gateway.session.runtime import Waker

logger = logging.getLogger("ftps_gateway")

# The modes (the ftps_gateway_cluster_mode gauge's label values).
SHARED = "shared"  # decisions in Redis, for the whole cluster
LOCAL = "local"  # Redis unreachable: this node's own state (on_unavailable="local")
REFUSING = "refusing"  # Redis unreachable: new logins refused (on_unavailable="refuse")
MODES = (SHARED, LOCAL, REFUSING)

# Requests waiting for an answer at most; beyond it they get the fallback's at once
# (Redis is far behind: queueing more would only make every login slower).
MAX_PENDING = 1024
# How often an unreachable Redis is tried again.
RECONNECT_SECONDS = 1.0
# The heartbeat runs this many times per lease: a lease survives two lost beats.
BEATS_PER_LEASE = 3
# Connections at most: the request thread, the ban listener, the admin socket.
MAX_CONNECTIONS = 8
# How long a start waits for a lease on this node name that another process holds
# (a node restarted after kill -9 waits for its own old lease), beyond the lease.
CLAIM_SLACK_SECONDS = 2.0


class ClusterMetrics(Protocol):
    """What this module counts (``metrics.ClusterSeries`` has these verbs)."""

    def redis_round_trip(self, seconds: float) -> None: ...
    def redis_error(self, kind: str) -> None: ...
    def cluster_mode(self, mode: str) -> None: ...


class _NoMetrics:
    def redis_round_trip(self, seconds: float) -> None:
        pass

    def redis_error(self, kind: str) -> None:
        pass

    def cluster_mode(self, mode: str) -> None:
        pass


@dataclass
class _Holdings:
    """What this node holds: its truth, written back to Redis whenever Redis lost it."""

    slots: Counter[LoginSlot] = field(default_factory=Counter)
    # reservation id -> scope -> [bytes, files]
    reservations: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def fields(self) -> dict[str, int]:
        """The node's hash in Redis (``redisscripts``), built from the truth."""
        out: Counter[str] = Counter()
        for slot, count in self.slots.items():
            out["t"] += count
            out[f"a|{slot.address}"] += count
            out[f"u|{slot.user}"] += count
        for scopes in self.reservations.values():
            for scope, (nbytes, files) in scopes.items():
                out[f"b|{scope}"] += nbytes
                out[f"f|{scope}"] += files
        return {name: value for name, value in out.items() if value > 0}

    def counts(self, slot: LoginSlot) -> tuple[int, int, int]:
        """(sessions, from ``slot.address``, as ``slot.user``) held here."""
        total = address = user = 0
        for held, count in self.slots.items():
            total += count
            address += count if held.address == slot.address else 0
            user += count if held.user == slot.user else 0
        return total, address, user

    def reserved(self, scope: str) -> tuple[int, int]:
        """(bytes, files) reserved here in ``scope``."""
        nbytes = files = 0
        for scopes in self.reservations.values():
            held = scopes.get(scope)
            if held is not None:
                nbytes += held[0]
                files += held[1]
        return nbytes, files


@dataclass
class _Request:
    """A request for the thread: ``op`` and its arguments; ``done`` gets the answer."""

    op: str  # login, failure, marks, reserve (answered); logout, release (not)
    args: tuple[Any, ...]
    done: Callable[[Any], None] | None = None
    handled: bool = False  # answered, or applied to the holdings


@dataclass(frozen=True)
class _Banned:
    deadline: float  # monotonic
    offences: int
    until: float  # wall clock, for ban list


class RedisState:
    """``StateStore`` in Redis, for one node of a cluster."""

    def __init__(
        self,
        cluster: ClusterSettings,
        node: str,
        settings: StateSettings,
        *,
        waker: Waker | None = None,
        audit: AuditLog | None = None,
        metrics: ClusterMetrics | None = None,
    ) -> None:
        """Prepare; nothing connects until ``start``.

        Args:
            node: ``server.node_name``: the lease and the holdings are keyed by it.
            waker: answers are handed to ``waker.call_soon_threadsafe`` (a single
                server's IO loop); None: given on this module's thread (the
                supervisor's ``StateService``, which sends them on).
        """
        self.cluster = cluster
        self.node = node
        self.where = redacted(cluster.redis_url)
        self._waker = waker
        self._audit = audit
        self._metrics: ClusterMetrics = metrics or _NoMetrics()
        self._token = secrets.token_hex(16)
        self._keys = cluster.key_prefix
        self._channel = f"{self._keys}bans"
        self._redis = _client(cluster)
        self._shas: dict[str, str] = {}
        self._lock = threading.RLock()  # the queue, the holdings, the mode
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[_Request] = collections.deque()
        self._pending = 0  # queued requests that wait for an answer
        self._holdings = _Holdings()
        self._settings = settings
        self._safe = _safe_list(settings.safe)
        self._local_defender = Defender(
            settings.defender, settings.safe, ipv6_prefix=settings.ipv6_prefix
        )
        self._local_bans = False  # the local defender has banned someone (ever)
        # The bans: key -> ban. Changed under _ban_lock (with the listeners told, in
        # order); read without it (a dict lookup is atomic).
        self._ban_lock = threading.Lock()
        self._replica: dict[str, _Banned] = {}
        self._listeners: list[Callable[[Ban], None]] = []
        self._bans_version = 0  # the newest change in the replica
        self._resync = threading.Event()
        # Scopes' committed counters as last read, plus what this node committed
        # since (read by quota marks while Redis is unreachable), and what it
        # committed while unreachable (added to Redis when it is back).
        self._committed: dict[str, list[int]] = {}
        self._unsent_commits: dict[str, list[int]] = {}
        self._mode = ""  # until start
        self._problem: str | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_beat = 0.0
        self._lease_lost = False

    # --- life

    def start(self) -> None:
        """Connect, take this node's lease, load the bans, start the threads.

        Raises:
            StartupError: Redis is unreachable, refuses the password or the TLS
                handshake fails (unless ``on_unavailable = "local"``: the node then
                starts in local mode and keeps trying), or another live node uses
                this ``server.node_name``.
        """
        try:
            self._connect()
        except _NodeNameTakenError as err:
            self._redis.close()
            raise StartupError(str(err)) from err
        except RedisError as err:
            problem = _describe(err)
            if self.cluster.on_unavailable != "local":
                self._redis.close()
                raise StartupError(
                    f"cluster.redis_url: {problem} ({self.where}); the node does not "
                    'start without its cluster state (cluster.on_unavailable = "local" '
                    "would start it with its own state)"
                ) from err
            self._enter_unavailable(problem)
        else:
            self._set_mode(SHARED, "connected")
        for name, target in (("redis-state", self._run), ("redis-bans", self._listen)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads and give this node's holdings back at once (once)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._wakeup:
            self._wakeup.notify_all()
        for thread in self._threads:
            thread.join(self.cluster.timeout_seconds * 3 + 2)
        if self._mode == SHARED:
            try:
                self._script("leave")
            except RedisError as err:
                logger.warning("could not give back this node's leases: %s", err)
        self._redis.close()

    def update(self, settings: StateSettings) -> None:
        """New defender settings, keys and limits (config reload); what is held
        stays (bans already in force keep the key they were made with)."""
        self._local_defender.update(
            settings.defender, settings.safe, settings.ipv6_prefix
        )
        with self._lock:
            self._settings = settings
            self._safe = _safe_list(settings.safe)

    @property
    def mode(self) -> str:
        """``SHARED``, ``LOCAL`` or ``REFUSING``."""
        return self._mode

    def problem(self) -> str | None:
        """Why this node refuses new logins (``/readyz``), or None."""
        return self._problem if self._mode == REFUSING else None

    def note(self) -> str | None:
        """What ``/readyz`` should say while serving on local state, or None."""
        return self._problem if self._mode == LOCAL else None

    # --- SharedState: bans

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

    def active_bans(self) -> int:
        """Bans in force that this node enforces (metrics gauge, no round trip)."""
        return len(self._replica_bans())

    def record_failure(self, ip: str, done: Callable[[Ban | None], None]) -> None:
        """Score a failed login from ``ip`` in Redis; ``done`` gets the ban it
        earned, if any."""
        if not self._settings.defender.enabled or self._is_safe(ip):
            done(None)
            return
        key = address_key(ip, self._settings.ipv6_prefix)
        self._submit(_Request("failure", (ip, key), done))

    # --- SharedState: login slots

    def login(self, slot: LoginSlot, done: Callable[[str | None], None]) -> None:
        """Take ``slot`` across the cluster (one round trip)."""
        self._submit(_Request("login", (slot,), done))

    def logout(self, slot: LoginSlot) -> None:
        """Give ``slot`` back (batched with other session ends)."""
        self._submit(_Request("logout", (slot,)))

    # --- SharedState: quota

    def quota_marks(
        self, scopes: Sequence[str], done: Callable[[Mapping[str, QuotaMark]], None]
    ) -> None:
        """The scopes' committed counters, as the cluster has them."""
        self._submit(_Request("marks", (tuple(scopes),), done))

    def reserve(
        self,
        reservation: str,
        claims: Sequence[QuotaClaim],
        done: Callable[[str | None], None],
    ) -> None:
        """Add ``claims`` to ``reservation``, all scopes or none, across the cluster."""
        self._submit(_Request("reserve", (reservation, tuple(claims)), done))

    def release(
        self, reservation: str, committed: Mapping[str, tuple[int, int]]
    ) -> None:
        """Drop ``reservation``; count what its commit added (batched)."""
        self._submit(_Request("release", (reservation, dict(committed))))

    # --- StateAdmin: the admin socket's thread (these calls block, bounded)

    def bans(self) -> list[Ban]:
        """The cluster's bans, soonest to end first (this node's view if Redis is
        unreachable)."""
        try:
            reply = self._script("bans")
        except RedisError as err:
            logger.warning("ban list from this node only: Redis: %s", _describe(err))
            return self._replica_bans()
        now_ms, entries = int(reply[0]), reply[2:]
        wall = time.time()
        found = []
        for index in range(0, len(entries), 3):
            remaining = (int(float(entries[index + 1])) - now_ms) / 1000
            key = _text(entries[index])
            offences = int(entries[index + 2])
            found.append(Ban(key, remaining, offences, wall + remaining))
        listed = {ban.ip for ban in found}
        found += [b for b in self._local_defender.bans() if b.ip not in listed]
        return sorted(found, key=lambda ban: ban.remaining_seconds)

    def remove_ban(self, key: str) -> bool:
        """Lift the ban on ``key`` (``session.state.ban_key``) on every node; False
        if it was not banned."""
        key = address_key(key, self._settings.ipv6_prefix)
        lifted_here = self._local_defender.remove(key)
        banned = self._replica.get(key)
        lifted_here = lifted_here or (
            banned is not None and banned.deadline > time.monotonic()
        )
        try:
            was_banned, version = self._script("unban", key)
        except RedisError as err:
            logger.warning(
                "ban on %s lifted on this node only: Redis: %s", key, _describe(err)
            )
            self._change_ban(key, None, None)
            return lifted_here
        # Here at once (the channel brings it to the other nodes, and here again).
        self._change_ban(key, None, int(version), bump=False)
        return bool(int(was_banned)) or lifted_here

    def snapshot(self) -> StateSnapshot:
        """Logged-in sessions of the cluster (this node's if Redis is unreachable)."""
        try:
            reply = self._script("totals")
            fields = {
                _text(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)
            }
        except RedisError:
            with self._lock:
                fields = self._holdings.fields()
        per_address = {
            k[2:]: v for k, v in fields.items() if k.startswith("a|") and v > 0
        }
        per_user = {k[2:]: v for k, v in fields.items() if k.startswith("u|") and v > 0}
        return StateSnapshot(fields.get("t", 0), per_address, per_user)

    def watch_bans(self, listener: Callable[[Ban], None]) -> None:
        """Call ``listener`` with every ban made or lifted from now on (a lifted one
        has ``remaining_seconds`` 0), in order, from this module's threads: it must
        only hand the change on (``StateService`` passing it to the workers)."""
        with self._ban_lock:
            self._listeners.append(listener)

    # --- the request thread

    def _submit(self, request: _Request) -> None:
        if self._stopping.is_set():  # closed: nobody sends it any more
            self._answer_locally([request], refuse_logins=True)
            return
        with self._wakeup:
            if request.done is not None:
                if self._pending >= MAX_PENDING:
                    overflow = True
                else:
                    overflow = False
                    self._pending += 1
                    self._queue.append(request)
            else:
                overflow = False
                self._queue.append(request)
            self._wakeup.notify()
        if overflow:
            logger.warning("Redis requests back up (%d waiting)", MAX_PENDING)
            self._metrics.redis_error("backlog")
            self._answer_locally([request], refuse_logins=True)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._wakeup:
                if not self._queue:
                    self._wakeup.wait(self._wait_seconds())
                batch = list(self._queue)
                self._queue.clear()
                self._pending = 0
            try:
                if self._mode == SHARED:
                    self._send(batch)
                else:
                    self._answer_locally(batch)
                self._maintain()
            except Exception:  # a bug must not end the thread every node depends on
                logger.exception("cluster state thread failed; retrying")
                self._answer_locally([r for r in batch if not r.handled])
                self._stopping.wait(RECONNECT_SECONDS)

    def _wait_seconds(self) -> float:
        if self._mode == SHARED:
            return max(0.0, self._next_beat - time.monotonic())
        return RECONNECT_SECONDS

    def _maintain(self) -> None:
        """Heartbeat when due; or, unreachable, try to come back."""
        if self._stopping.is_set():
            return
        if self._mode != SHARED:
            if time.monotonic() >= self._next_beat:
                self._next_beat = time.monotonic() + RECONNECT_SECONDS
                self._reconnect()
            return
        if time.monotonic() < self._next_beat:
            self._sync_if_asked()
            return
        self._next_beat = time.monotonic() + self._beat_seconds()
        try:
            state, version = self._script("heartbeat", self._lease_ms())
        except RedisError as err:
            self._enter_unavailable(_describe(err))
            return
        if _text(state) == "lost" or self._lease_lost:
            try:
                self._restore()
            except RedisError as err:
                self._enter_unavailable(_describe(err))
                return
        elif _text(state) == "taken":
            self._enter_unavailable(
                f"server.node_name {self.node!r} is used by another live node"
            )
            return
        if int(version) != self._bans_version:
            self._resync.set()
        self._sync_if_asked()

    def _sync_if_asked(self) -> None:
        """Reload the bans if the listener (re)subscribed or saw a gap."""
        if self._mode != SHARED or not self._resync.is_set():
            return
        try:
            self._sync_bans()
        except RedisError as err:
            self._enter_unavailable(_describe(err))

    def _beat_seconds(self) -> float:
        return self.cluster.lease_seconds / BEATS_PER_LEASE

    def _lease_ms(self) -> int:
        return self.cluster.lease_seconds * 1000

    def _send(self, batch: list[_Request]) -> None:
        """One pipeline for the whole batch: one round trip."""
        if not batch:
            return
        answered = [r for r in batch if r.done is not None]
        pipe = self._redis.pipeline(transaction=False)
        deltas, commits = self._deltas([r for r in batch if r.done is None])
        if deltas is not None:  # first: what ended frees room for what asks
            self._queue_script(pipe, "deltas", *deltas)
        for request in answered:
            self._queue_script(pipe, *self._encode(request))
        try:
            results = self._execute(pipe)
        except RedisError as err:
            self._lease_lost = True
            self._keep_unsent(commits)
            self._enter_unavailable(_describe(err))
            self._answer_locally(answered)
            return
        if deltas is not None:
            self._check_deltas(results.pop(0), commits)
        self._handle_results(answered, results)

    def _check_deltas(self, result: Any, commits: dict[str, list[int]]) -> None:
        if isinstance(result, Exception):
            logger.error("cluster state: giving back failed in Redis: %s", result)
            self._keep_unsent(commits)
            self._lease_lost = True
        elif _text(result) == "lost":
            self._lease_lost = True

    def _handle_results(self, answered: list[_Request], results: list[Any]) -> None:
        again = []
        for request, result in zip(answered, results, strict=True):
            if isinstance(result, NoScriptError) or _is_lost(result):
                again.append(request)
            elif isinstance(result, Exception):
                logger.error(
                    "cluster state: %s failed in Redis: %s", request.op, result
                )
                self._metrics.redis_error("response")
                self._answer_locally([request])
            else:
                self._finish(request, result)
        if again:
            self._retry(again)

    def _retry(self, requests: list[_Request]) -> None:
        """After Redis lost its scripts or this node's lease: fix that, send again."""
        try:
            self._load_scripts()
            self._restore()
        except RedisError as err:
            self._enter_unavailable(_describe(err))
            self._answer_locally(requests)
            return
        if self._mode == SHARED:
            self._send(requests)
        else:
            self._answer_locally(requests)

    def _deltas(
        self, requests: list[_Request]
    ) -> tuple[list[Any] | None, dict[str, list[int]]]:
        """Apply logouts and releases to the truth: the DELTAS script's arguments,
        and the commits among them."""
        fields: Counter[str] = Counter()
        commits: dict[str, list[int]] = {}
        if not requests:
            return None, commits
        with self._lock:
            for request in requests:
                request.handled = True
                if request.op == "logout":
                    self._drop_slot(request.args[0], fields)
                else:
                    reservation, committed = request.args
                    self._drop_reservation(reservation, committed, fields, commits)
        pairs: list[Any] = []
        for name, delta in fields.items():
            if delta:
                pairs += [name, delta]
        args: list[Any] = [len(pairs) // 2, *pairs]
        for scope, (nbytes, files) in commits.items():
            args += [scope, nbytes, files]
        return args, commits

    def _keep_unsent(self, commits: dict[str, list[int]]) -> None:
        """Commits Redis may not have counted: added when it is back (counting one
        twice errs on the side of refusing; losing one would not)."""
        with self._lock:
            for scope, (nbytes, files) in commits.items():
                unsent = self._unsent_commits.setdefault(scope, [0, 0])
                unsent[0] += nbytes
                unsent[1] += files

    def _drop_slot(self, slot: LoginSlot, fields: Counter[str]) -> None:
        if self._holdings.slots[slot] <= 0:
            return  # never granted (or given back twice): nothing to give back
        self._holdings.slots[slot] -= 1
        if not self._holdings.slots[slot]:
            del self._holdings.slots[slot]
        fields["t"] -= 1
        fields[f"a|{slot.address}"] -= 1
        fields[f"u|{slot.user}"] -= 1

    def _drop_reservation(
        self,
        reservation: str,
        committed: dict[str, tuple[int, int]],
        fields: Counter[str],
        commits: dict[str, list[int]],
    ) -> None:
        for scope, (nbytes, files) in self._holdings.reservations.pop(
            reservation, {}
        ).items():
            fields[f"b|{scope}"] -= nbytes
            fields[f"f|{scope}"] -= files
        for scope, (nbytes, files) in committed.items():
            total = commits.setdefault(scope, [0, 0])
            total[0] += nbytes
            total[1] += files
            known = self._committed.setdefault(scope, [0, 0])
            known[0] += nbytes
            known[1] += files

    def _encode(self, request: _Request) -> tuple[Any, ...]:
        settings = self._settings
        defender = settings.defender
        if request.op == "login":
            slot: LoginSlot = request.args[0]
            return ("login", slot.address, slot.user, settings.max_sessions,
                    settings.max_sessions_per_ip,
                    settings.max_sessions_per_user)  # fmt: skip
        if request.op == "failure":
            return ("failure", request.args[1], defender.max_failures,
                    defender.window_seconds * 1000, defender.ban_seconds * 1000,
                    defender.max_ban_seconds * 1000)  # fmt: skip
        if request.op == "marks":
            return ("marks", *request.args[0])
        claims = request.args[1]
        values: list[Any] = [len(claims)]
        for claim in claims:
            values += [
                claim.scope, _limit(claim.max_bytes), _limit(claim.max_files),
                claim.walked_bytes, claim.walked_files, claim.mark.committed_bytes,
                claim.mark.committed_files, claim.nbytes, claim.files,
            ]  # fmt: skip
        return ("reserve", *values)

    def _finish(self, request: _Request, result: Any) -> None:
        """An answer from Redis: update the truth, hand it to the loop."""
        if request.op == "login":
            reason = _text(result)
            if reason == "ok":
                with self._lock:
                    self._holdings.slots[request.args[0]] += 1
            self._deliver(request, None if reason == "ok" else reason)
        elif request.op == "failure":
            self._deliver(request, self._ban_from(request.args[1], result))
        elif request.op == "marks":
            scopes = request.args[0]
            marks = {}
            with self._lock:
                for index, scope in enumerate(scopes):
                    nbytes, files = int(result[2 * index]), int(result[2 * index + 1])
                    marks[scope] = QuotaMark(nbytes, files)
                    self._committed[scope] = [nbytes, files]
            self._deliver(request, marks)
        elif _text(result[0]) == "ok":
            self._hold(*request.args)
            self._deliver(request, None)
        else:
            self._deliver(request, _text(result[1]))

    def _hold(self, reservation: str, claims: Sequence[QuotaClaim]) -> None:
        with self._lock:
            scopes = self._holdings.reservations.setdefault(reservation, {})
            for claim in claims:
                held = scopes.setdefault(claim.scope, [0, 0])
                held[0] += claim.nbytes
                held[1] += claim.files

    def _ban_from(self, key: str, result: Any) -> Ban | None:
        """FAILURE's answer: {0}, or {1, until, now, offences, version}."""
        if not int(result[0]):
            return None
        until_ms, now_ms, offences = int(result[1]), int(result[2]), int(result[3])
        length = (until_ms - now_ms) / 1000
        banned = _Banned(time.monotonic() + length, offences, time.time() + length)
        # At once, not only when the channel brings it: the next connection of the
        # guesser may be a millisecond away.
        self._change_ban(key, banned, int(result[4]), bump=False)
        return Ban(key, length, offences, banned.until)

    def _deliver(self, request: _Request, answer: Any) -> None:
        done = request.done
        request.done = None  # answered: never twice
        request.handled = True
        if done is None:
            return
        if self._waker is not None:
            self._waker.call_soon_threadsafe(lambda: done(answer))
            return
        try:  # the supervisor's service: it only queues the answer
            done(answer)
        except Exception:  # a caller's bug must not stop the thread
            logger.exception("a cluster state callback failed")

    # --- without Redis

    def _answer_locally(
        self, requests: list[_Request], *, refuse_logins: bool = False
    ) -> None:
        """Decide from this node's own state (Redis unreachable or far behind)."""
        for request in requests:
            if request.handled:
                continue
            if request.op == "logout":
                request.handled = True
                with self._lock:
                    self._drop_slot(request.args[0], Counter())
            elif request.op == "release":
                request.handled = True
                self._release_locally(*request.args)
            elif request.op == "login":
                refuse = refuse_logins or self._mode == REFUSING
                self._deliver(
                    request, UNAVAILABLE if refuse else self._login_locally(request)
                )
            elif request.op == "failure":
                self._deliver(request, self._fail_locally(request.args[0]))
            elif request.op == "marks":
                with self._lock:
                    marks = {
                        scope: QuotaMark(*self._committed.get(scope, [0, 0]))
                        for scope in request.args[0]
                    }
                self._deliver(request, marks)
            else:
                self._deliver(request, self._reserve_locally(*request.args))

    def _fail_locally(self, ip: str) -> Ban | None:
        """Scored by this node alone; a ban reaches its listeners (workers) too and
        joins the cluster's when Redis is back (``_push_local_bans``)."""
        with self._ban_lock:
            ban = self._local_defender.record_failure(ip)
            if ban is not None:
                self._local_bans = True
                self._tell(ban)
        return ban

    def _login_locally(self, request: _Request) -> str | None:
        """The limits over this node's own sessions (session.state.LocalState's
        order: total, address, user)."""
        slot: LoginSlot = request.args[0]
        settings = self._settings
        with self._lock:
            total, address, user = self._holdings.counts(slot)
            if total >= settings.max_sessions:
                return LIMIT_TOTAL
            if address >= settings.max_sessions_per_ip:
                return LIMIT_PER_IP
            if user >= settings.max_sessions_per_user:
                return LIMIT_PER_USER
            self._holdings.slots[slot] += 1
        return None

    def _reserve_locally(
        self, reservation: str, claims: Sequence[QuotaClaim]
    ) -> str | None:
        """session.state's sum over what this node knows: the committed counters
        as last read plus its own commits since, its own reservations."""
        with self._lock:
            for claim in claims:
                held_bytes, held_files = self._holdings.reserved(claim.scope)
                known = self._committed.get(claim.scope, [0, 0])
                since_bytes = known[0] - claim.mark.committed_bytes
                since_files = known[1] - claim.mark.committed_files
                if claim.max_bytes is not None:
                    used = claim.walked_bytes + since_bytes + held_bytes
                    if used + claim.nbytes > claim.max_bytes:
                        return claim.scope
                if claim.max_files is not None:
                    used = claim.walked_files + since_files + held_files
                    if used + claim.files > claim.max_files:
                        return claim.scope
            self._hold(reservation, claims)
        return None

    def _release_locally(
        self, reservation: str, committed: dict[str, tuple[int, int]]
    ) -> None:
        with self._lock:
            self._drop_reservation(reservation, committed, Counter(), {})
        self._keep_unsent({scope: list(pair) for scope, pair in committed.items()})

    # --- connecting, losing Redis and coming back

    def _connect(self) -> None:
        """Scripts loaded, lease taken (waiting out a previous holder's), bans read."""
        self._load_scripts()
        deadline = time.monotonic() + self.cluster.lease_seconds + CLAIM_SLACK_SECONDS
        while _text(self._script("claim", self._lease_ms())) == "taken":
            if time.monotonic() >= deadline or self._stopping.is_set():
                raise _NodeNameTakenError(
                    f"server.node_name: {self.node!r} is held by another live node of "
                    f"the cluster at {self.where}; every node needs its own name"
                )
            logger.info(
                "waiting for the lease of node %r to end (a previous run of this "
                "node, or another node with the same name)",
                self.node,
            )
            time.sleep(min(1.0, self._beat_seconds()))
        self._next_beat = time.monotonic() + self._beat_seconds()
        self._lease_lost = False
        self._sync_bans()

    def _reconnect(self) -> None:
        try:
            self._load_scripts()
            self._restore()
            self._push_local_bans()
            self._sync_bans()
        except _NodeNameTakenError as err:
            self._problem = str(err)
            return
        except RedisError as err:
            self._problem = f"Redis unreachable at {self.where}: {_describe(err)}"
            return
        self._set_mode(SHARED, "Redis reachable again")

    def _restore(self) -> None:
        """Write this node's holdings back whole and take its lease again."""
        with self._lock:
            fields = self._holdings.fields()
            unsent = self._unsent_commits
            self._unsent_commits = {}
        if unsent:
            args: list[Any] = [0]
            for scope, (nbytes, files) in unsent.items():
                args += [scope, nbytes, files]
            try:
                self._script("deltas", *args)
            except RedisError:
                self._keep_unsent(unsent)  # for the next try
                raise
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, value]
        if _text(self._script("claim", self._lease_ms(), *pairs)) == "taken":
            raise _NodeNameTakenError(
                f"server.node_name {self.node!r} is used by another live node"
            )
        self._lease_lost = False
        self._next_beat = time.monotonic() + self._beat_seconds()
        logger.info(
            "cluster: wrote this node's holdings back to Redis (%d sessions)",
            fields.get("t", 0),
        )

    def _push_local_bans(self) -> None:
        """Bans this node decided alone join the cluster's."""
        max_ban_ms = self._settings.defender.max_ban_seconds * 1000
        for ban in self._local_defender.bans():
            remaining_ms = int(ban.remaining_seconds * 1000)
            if remaining_ms > 0:
                self._script("push_ban", ban.ip, remaining_ms, ban.offences, max_ban_ms)

    def _enter_unavailable(self, problem: str) -> None:
        mode = LOCAL if self.cluster.on_unavailable == "local" else REFUSING
        self._problem = f"Redis unreachable at {self.where}: {problem}"
        self._next_beat = time.monotonic() + RECONNECT_SECONDS
        self._set_mode(mode, problem)

    def _set_mode(self, mode: str, reason: str) -> None:
        previous, self._mode = self._mode, mode
        self._metrics.cluster_mode(mode)
        if previous == mode:
            return
        if mode == SHARED:
            self._problem = None
            logger.info(
                "cluster state shared through Redis at %s (%s)", self.where, reason
            )
        elif mode == LOCAL:
            logger.error(
                "CLUSTER STATE UNAVAILABLE (%s): serving on with this node's own "
                "state: session limits hold per node, bans from other nodes are not "
                "seen until Redis is back",
                reason,
            )
        else:
            logger.error(
                "CLUSTER STATE UNAVAILABLE (%s): new logins are refused (421) until "
                "Redis is back",
                reason,
            )
        if self._audit is not None:
            self._audit.event(
                "cluster_mode", mode=mode, previous=previous or None, node=self.node,
                reason=reason,
            )  # fmt: skip

    # --- bans: the replica

    def _listen(self) -> None:
        """Keep the replica current from the channel; resubscribe after any break."""
        while not self._stopping.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._channel)
                self._resync.set()  # whatever was published meanwhile
                with self._wakeup:
                    self._wakeup.notify()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._apply(message["data"])
            except RedisError:
                self._stopping.wait(RECONNECT_SECONDS)
            finally:
                pubsub.close()

    def _apply(self, data: bytes | str) -> None:
        """One message of the channel: a ban made or lifted, with its version."""
        try:
            change = json.loads(data)
            version = int(change["v"])
            key = str(change["ip"])
            banned = None
            if change["op"] == "ban":
                length = (int(change["until"]) - int(change["now"])) / 1000
                banned = _Banned(
                    time.monotonic() + length, int(change["n"]), time.time() + length
                )
        except (ValueError, KeyError, TypeError):
            logger.warning("cluster: ignored an unreadable ban message")
            return
        self._change_ban(key, banned, version)

    def _change_ban(
        self,
        key: str,
        banned: _Banned | None,
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
        with self._ban_lock:
            if version is not None:
                if version <= self._bans_version:
                    return
                if bump:
                    if version != self._bans_version + 1:
                        self._resync.set()  # a gap: reload the list at the next beat
                    self._bans_version = version
            if banned is None:
                self._replica.pop(key, None)
                self._local_defender.remove(key)
                self._tell(Ban(key, 0.0, 0, time.time()))
            else:
                self._replica[key] = banned
                remaining = banned.deadline - time.monotonic()
                self._tell(Ban(key, remaining, banned.offences, banned.until))

    def _tell(self, ban: Ban) -> None:
        """Hand ``ban`` to every listener (under ``_ban_lock``: in order)."""
        for listener in self._listeners:
            try:
                listener(ban)
            except Exception:  # one listener's bug must not stop the replica
                logger.exception("ban listener failed")

    def _sync_bans(self) -> None:
        """Replace the replica with the cluster's list of bans."""
        self._resync.clear()
        reply = self._script("bans")
        now_ms, version, entries = int(reply[0]), int(reply[1]), reply[2:]
        clock, wall = time.monotonic(), time.time()
        replica = {}
        for index in range(0, len(entries), 3):
            length = (int(float(entries[index + 1])) - now_ms) / 1000
            replica[_text(entries[index])] = _Banned(
                clock + length, int(entries[index + 2]), wall + length
            )
        with self._ban_lock:
            if version < self._bans_version:  # a newer change came meanwhile
                self._resync.set()  # read again at the next beat
                return
            before, self._replica = self._replica, replica
            self._bans_version = version
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

    def _replica_bans(self) -> list[Ban]:
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

    def _is_safe(self, ip: str) -> bool:
        """``access.safe`` is about real addresses (a key never parses: not safe)."""
        safe = self._safe
        return safe is not None and safe.is_allowed(ip)

    # --- Redis calls

    def _load_scripts(self) -> None:
        started = time.perf_counter()
        pipe = self._redis.pipeline(transaction=False)
        names = list(redisscripts.ALL)
        for name in names:
            pipe.script_load(redisscripts.ALL[name])
        shas = self._execute(pipe, started=started, raise_errors=True)
        self._shas = {name: _text(sha) for name, sha in zip(names, shas, strict=True)}

    def _queue_script(self, pipe: Any, name: str, *args: Any) -> None:
        pipe.evalsha(self._shas[name], 0, self._keys, self.node, self._token, *args)

    def _script(self, name: str, *args: Any) -> Any:
        """One script, one round trip (loading the scripts again if Redis lost them)."""
        if not self._shas:
            self._load_scripts()
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            self._queue_script(pipe, name, *args)
            try:
                return self._execute(pipe, raise_errors=True)[0]
            except NoScriptError:
                if attempt:
                    raise
                self._load_scripts()
        raise AssertionError  # pragma: no cover - the loop returns or raises

    def _execute(
        self, pipe: Any, *, started: float | None = None, raise_errors: bool = False
    ) -> list[Any]:
        started = time.perf_counter() if started is None else started
        try:
            results: list[Any] = pipe.execute(raise_on_error=raise_errors)
        except RedisError as err:
            self._metrics.redis_error(_error_kind(err))
            raise
        finally:
            pipe.reset()
        self._metrics.redis_round_trip(time.perf_counter() - started)
        return results


class _NodeNameTakenError(RedisError):
    """Another live process holds this node's lease."""


def _client(cluster: ClusterSettings) -> redis.Redis:
    """A client whose every call is bounded by ``timeout_seconds``, retries off."""
    options: dict[str, Any] = {
        "socket_timeout": cluster.timeout_seconds,
        "socket_connect_timeout": cluster.timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
        "client_name": "ftps-gateway",
    }
    if cluster.redis_url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        if cluster.ca_file is not None:
            options["ssl_ca_certs"] = str(cluster.ca_file)
    return redis.Redis.from_url(cluster.redis_url, **options)


def _describe(err: Exception) -> str:
    """What an operator needs to hear about a Redis failure."""
    text = str(err) or type(err).__name__
    if isinstance(err, AuthenticationError) or any(
        word in text for word in ("WRONGPASS", "NOAUTH", "invalid password")
    ):
        return f"authentication failed (check the password in the URL): {text}"
    if "SSL" in text or "certificate" in text or "TLS" in text:
        return (
            f"TLS failed (check cluster.ca_file and the server's certificate): {text}"
        )
    if isinstance(err, redis.exceptions.TimeoutError):
        return f"no answer within cluster.timeout_seconds: {text}"
    return text


def _error_kind(err: Exception) -> str:
    """The ``ftps_gateway_redis_errors_total`` label of ``err``."""
    described = _describe(err)
    if described.startswith("authentication"):
        return "auth"
    if described.startswith("TLS"):
        return "tls"
    if isinstance(err, redis.exceptions.TimeoutError):
        return "timeout"
    if isinstance(err, redis.exceptions.ConnectionError):
        return "connection"
    if isinstance(err, ResponseError):
        return "response"
    return "other"


def _safe_list(networks: Iterable[IPNetwork]) -> AccessList | None:
    """None for "nobody is safe" (an empty AccessList would allow everyone)."""
    networks = tuple(networks)
    return AccessList(networks) if networks else None


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_lost(result: Any) -> bool:
    if isinstance(result, list) and result:
        result = result[0]
    return not isinstance(result, Exception) and _text(result) == "lost"
