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

This module owns the requests: the interface, the queue, the batches sent to Redis
and their answers, and answering locally when Redis cannot. The rest has a module
each: the client and its bounded calls (``redisclient``), the node's lease and mode
(``clusterlease``), its holdings and local decisions (``clusterholdings``), the ban
replica (``clusterbans``); the scripts themselves are ``redisscripts``.

How it keeps the ``SharedState`` rules:

- **Never on the IO loop.** One thread ("redis-state") owns the connection for
  requests: the caller queues a request and returns; the thread sends everything
  queued as one pipeline (one round trip however many sessions asked meanwhile) and
  hands each answer back. Each decision is one Lua script (``redisscripts``), atomic
  in Redis: a login costs one round trip, a session end one (batched with whatever
  else ended), a ban check none (a local replica).
- **Bounded.** Every call times out after ``cluster.timeout_seconds``
  (``redisclient``); requests that wait for an answer are bounded in number
  (``MAX_PENDING``), answered from the fallback beyond it. Fire-and-forget calls
  (logout, release) are never dropped: each gives back something a granted request
  took, so there are never more of them than slots and reservations held.
- **What a holder holds dies with it**, and Redis unreachable: ``clusterlease``.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, RedisError

from ftps_gateway.errors import StartupError
from ftps_gateway.service.clusterbans import BanReplica
from ftps_gateway.service.clusterholdings import NodeHoldings
from ftps_gateway.service.clusterlease import REFUSING, SHARED, NodeLease
from ftps_gateway.service.redisclient import (
    RECONNECT_SECONDS,
    NoMetrics,
    RedisScripts,
    describe,
    is_lost,
    reply_text,
)
from ftps_gateway.session.state import UNAVAILABLE, QuotaMark, StateSnapshot

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import ClusterSettings
    from ftps_gateway.policy.defender import Ban
    from ftps_gateway.service.redisclient import ClusterMetrics
    from ftps_gateway.session.runtime import Waker
    from ftps_gateway.session.state import LoginSlot, QuotaClaim, StateSettings

logger = logging.getLogger("ftps_gateway")

# Requests waiting for an answer at most; beyond it they get the fallback's at once
# (Redis is far behind: queueing more would only make every login slower).
MAX_PENDING = 1024


@dataclass
class _Request:
    """A request for the thread: ``op`` and its arguments; ``done`` gets the answer."""

    op: str  # login, failure, marks, reserve (answered); logout, release (not)
    args: tuple[Any, ...]
    done: Callable[[Any], None] | None = None
    handled: bool = False  # answered, or applied to the holdings


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
        self._waker = waker
        self._metrics: ClusterMetrics = metrics or NoMetrics()
        self._redis = RedisScripts(cluster, node, self._metrics)
        self.where = self._redis.where
        self._lock = threading.RLock()  # the queue (a holder may still queue)
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[_Request] = collections.deque()
        self._pending = 0  # queued requests that wait for an answer
        self._settings = settings
        self._holdings = NodeHoldings()
        self._bans = BanReplica(self._redis, settings)
        self._stopping = threading.Event()
        self._lease = NodeLease(
            cluster, self._redis, self._holdings, self._bans, self._stopping,
            audit=audit, metrics=self._metrics,
        )  # fmt: skip
        self._threads: list[threading.Thread] = []

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
            self._lease.join()
        except StartupError:
            self._redis.close()
            raise
        threads = (("redis-state", self._run), ("redis-bans", self._listen))
        for name, target in threads:
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
        self._lease.leave()
        self._redis.close()

    def update(self, settings: StateSettings) -> None:
        """New defender settings, keys and limits (config reload); what is held
        stays (bans already in force keep the key they were made with)."""
        self._bans.update(settings)
        self._settings = settings

    @property
    def mode(self) -> str:
        """``SHARED``, ``LOCAL`` or ``REFUSING`` (``clusterlease``)."""
        return self._lease.mode

    def problem(self) -> str | None:
        """Why this node refuses new logins (``/readyz``), or None."""
        return self._lease.problem()

    def note(self) -> str | None:
        """What ``/readyz`` should say while serving on local state, or None."""
        return self._lease.note()

    # --- SharedState: bans

    def is_banned(self, ip: str) -> bool:
        """From the replica (``clusterbans``): a dict lookup, no round trip."""
        return self._bans.is_banned(ip)

    def active_bans(self) -> int:
        """Bans in force that this node enforces (metrics gauge, no round trip)."""
        return len(self._bans.enforced())

    def record_failure(self, ip: str, done: Callable[[Ban | None], None]) -> None:
        """Score a failed login from ``ip`` in Redis; ``done`` gets the ban it
        earned, if any."""
        key = self._bans.failure_key(ip)
        if key is None:
            done(None)
            return
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
        return self._bans.cluster_bans()

    def remove_ban(self, key: str) -> bool:
        """Lift the ban on ``key`` (``session.state.ban_key``) on every node; False
        if it was not banned."""
        return self._bans.remove(key)

    def snapshot(self) -> StateSnapshot:
        """Logged-in sessions of the cluster (this node's if Redis is unreachable)."""
        try:
            reply = self._redis.call("totals")
            fields = {
                reply_text(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)
            }
        except RedisError:
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
        self._bans.watch(listener)

    # --- the ban listener thread

    def _listen(self) -> None:
        """Keep the replica current; wake the request thread to reload the list."""
        self._bans.listen(self._stopping, self._wake)

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

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
                    self._wakeup.wait(self._lease.wait_seconds())
                batch = list(self._queue)
                self._queue.clear()
                self._pending = 0
            try:
                if self._lease.mode == SHARED:
                    self._send(batch)
                else:
                    self._answer_locally(batch)
                self._lease.maintain()
            except Exception:  # a bug must not end the thread every node depends on
                logger.exception("cluster state thread failed; retrying")
                self._answer_locally([r for r in batch if not r.handled])
                self._stopping.wait(RECONNECT_SECONDS)

    def _send(self, batch: list[_Request]) -> None:
        """One pipeline for the whole batch: one round trip."""
        if not batch:
            return
        answered = [r for r in batch if r.done is not None]
        pipe = self._redis.pipeline()
        deltas, commits = self._deltas([r for r in batch if r.done is None])
        if deltas is not None:  # first: what ended frees room for what asks
            self._redis.queue(pipe, "deltas", *deltas)
        for request in answered:
            self._redis.queue(pipe, *self._encode(request))
        try:
            results = self._redis.execute(pipe)
        except RedisError as err:
            self._lease.mark_lost()
            self._holdings.keep_unsent(commits)
            self._lease.unavailable(describe(err))
            self._answer_locally(answered)
            return
        if deltas is not None:
            self._check_deltas(results.pop(0), commits)
        self._handle_results(answered, results)

    def _check_deltas(self, result: Any, commits: dict[str, list[int]]) -> None:
        if isinstance(result, Exception):
            logger.error("cluster state: giving back failed in Redis: %s", result)
            self._holdings.keep_unsent(commits)
            self._lease.mark_lost()
        elif reply_text(result) == "lost":
            self._lease.mark_lost()

    def _handle_results(self, answered: list[_Request], results: list[Any]) -> None:
        again = []
        for request, result in zip(answered, results, strict=True):
            if isinstance(result, NoScriptError) or is_lost(result):
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
            self._redis.load()
            self._lease.restore()
        except RedisError as err:
            self._lease.unavailable(describe(err))
            self._answer_locally(requests)
            return
        if self._lease.mode == SHARED:
            self._send(requests)
        else:
            self._answer_locally(requests)

    def _deltas(
        self, requests: list[_Request]
    ) -> tuple[list[Any] | None, dict[str, list[int]]]:
        """Apply logouts and releases to the truth: the DELTAS script's arguments,
        and the commits among them."""
        if not requests:
            return None, {}
        for request in requests:
            request.handled = True
        fields, commits = self._holdings.give_back(
            [r.args[0] for r in requests if r.op == "logout"],
            [r.args for r in requests if r.op != "logout"],
        )
        pairs: list[Any] = []
        for name, delta in fields.items():
            if delta:
                pairs += [name, delta]
        args: list[Any] = [len(pairs) // 2, *pairs]
        for scope, (nbytes, files) in commits.items():
            args += [scope, nbytes, files]
        return args, commits

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
            reason = reply_text(result)
            if reason == "ok":
                self._holdings.add_slot(request.args[0])
            self._deliver(request, None if reason == "ok" else reason)
        elif request.op == "failure":
            self._deliver(request, self._bans.ban_from(request.args[1], result))
        elif request.op == "marks":
            scopes = request.args[0]
            marks = {}
            for index, scope in enumerate(scopes):
                nbytes, files = int(result[2 * index]), int(result[2 * index + 1])
                marks[scope] = QuotaMark(nbytes, files)
            self._holdings.note_marks(marks)
            self._deliver(request, marks)
        elif reply_text(result[0]) == "ok":
            self._holdings.hold(*request.args)
            self._deliver(request, None)
        else:
            self._deliver(request, reply_text(result[1]))

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
                self._holdings.give_back([request.args[0]], ())
            elif request.op == "release":
                request.handled = True
                self._holdings.release_locally(*request.args)
            elif request.op == "login":
                if refuse_logins or self._lease.mode == REFUSING:
                    self._deliver(request, UNAVAILABLE)
                else:
                    slot, settings = request.args[0], self._settings
                    self._deliver(request, self._holdings.login_locally(slot, settings))
            elif request.op == "failure":
                self._deliver(request, self._bans.fail_locally(request.args[0]))
            elif request.op == "marks":
                self._deliver(request, self._holdings.known_marks(request.args[0]))
            else:
                self._deliver(request, self._holdings.reserve_locally(*request.args))


def _limit(value: int | None) -> int:
    return -1 if value is None else value
