"""A cluster node's lease, its heartbeat, and the mode it decides in (issue 15).

``NodeLease`` is this node's membership of the cluster for ``cluster.RedisState``,
driven from its "redis-state" thread (``maintain`` between batches):

- **What a holder holds dies with it.** The node's holdings live in Redis under its
  name, with a lease renewed by a heartbeat every third of ``lease_seconds``; counts
  only ever sum live nodes, so a node killed with -9 stops counting when its lease
  ends. Whenever Redis lost the holdings (a restart, the lease ran out while
  unreachable, a script answered ``lost``) the node writes its truth
  (``clusterholdings``) back whole (``restore``). The lease's token also stops a
  second live process with the same ``server.node_name``: a start waits out one lease
  (a node restarted after kill -9 finds its own old lease), then refuses.
- **The mode.** ``SHARED`` while Redis answers. Unreachable (a timeout, a refused
  connection, a restart), the node says so loudly (an error log line, an audit
  ``cluster_mode`` event, the ``ftps_gateway_cluster_mode`` gauge, ``/readyz``), and
  then ``on_unavailable`` decides: ``"local"`` serves on with this node's own counts
  (``LOCAL``: limits per node, bans scored here), ``"refuse"`` answers new logins
  ``UNAVAILABLE`` (421, ``REFUSING``); quota and bans are always decided locally
  meanwhile (a running upload is not cut because Redis blinked). Every
  ``RECONNECT_SECONDS`` it tries again; when Redis answers, the node writes its
  holdings back, pushes the bans it decided alone, re-reads the cluster's bans and
  returns to ``SHARED``.
- **The ban list's version.** The heartbeat reads Redis' ban version; a replica
  behind it (messages missed during a reconnect) is reloaded whole
  (``clusterbans``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ftps_gateway.errors import StartupError
from ftps_gateway.service.redisclient import (
    RECONNECT_SECONDS,
    NodeNameTakenError,
    describe,
    reply_text,
)

if TYPE_CHECKING:
    import threading
    from typing import Any

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import ClusterSettings
    from ftps_gateway.service.clusterbans import BanReplica
    from ftps_gateway.service.clusterholdings import NodeHoldings
    from ftps_gateway.service.redisclient import ClusterMetrics, RedisScripts

logger = logging.getLogger("ftps_gateway")

# The modes (the ftps_gateway_cluster_mode gauge's label values).
SHARED = "shared"  # decisions in Redis, for the whole cluster
LOCAL = "local"  # Redis unreachable: this node's own state (on_unavailable="local")
REFUSING = "refusing"  # Redis unreachable: new logins refused (on_unavailable="refuse")
MODES = (SHARED, LOCAL, REFUSING)

# The heartbeat runs this many times per lease: a lease survives two lost beats.
BEATS_PER_LEASE = 3
# How long a start waits for a lease on this node name that another process holds
# (a node restarted after kill -9 waits for its own old lease), beyond the lease.
CLAIM_SLACK_SECONDS = 2.0


class NodeLease:
    """This node's lease in Redis, its heartbeat, and the mode that follows."""

    def __init__(
        self,
        cluster: ClusterSettings,
        redis: RedisScripts,
        holdings: NodeHoldings,
        bans: BanReplica,
        stopping: threading.Event,
        *,
        audit: AuditLog | None,
        metrics: ClusterMetrics,
    ) -> None:
        self.cluster = cluster
        self._redis = redis
        self._holdings = holdings
        self._bans = bans
        self._stopping = stopping
        self._audit = audit
        self._metrics = metrics
        self._mode = ""  # until join
        self._problem: str | None = None
        self._next_beat = 0.0
        self._lost = False

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

    # --- joining and leaving

    def join(self) -> None:
        """Connect, take this node's lease, load the bans: ``SHARED``.

        Raises:
            StartupError: Redis is unreachable, refuses the password or the TLS
                handshake fails (unless ``on_unavailable = "local"``: the node then
                starts in local mode and keeps trying), or another live node uses
                this ``server.node_name``.
        """
        try:
            self._connect()
        except NodeNameTakenError as err:
            raise StartupError(str(err)) from err
        except RedisError as err:
            problem = describe(err)
            if self.cluster.on_unavailable != "local":
                raise StartupError(
                    f"cluster.redis_url: {problem} ({self._redis.where}); the node "
                    "does not start without its cluster state (cluster.on_unavailable"
                    ' = "local" would start it with its own state)'
                ) from err
            self.unavailable(problem)
        else:
            self._set_mode(SHARED, "connected")

    def leave(self) -> None:
        """Give this node's holdings back at once (if Redis is reachable)."""
        if self._mode != SHARED:
            return
        try:
            self._redis.call("leave")
        except RedisError as err:
            logger.warning("could not give back this node's leases: %s", err)

    # --- the request thread, between batches

    def wait_seconds(self) -> float:
        """How long the thread may wait for requests before ``maintain`` is due."""
        if self._mode == SHARED:
            return max(0.0, self._next_beat - time.monotonic())
        return RECONNECT_SECONDS

    def maintain(self) -> None:
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
            state, version = self._redis.call("heartbeat", self._lease_ms())
        except RedisError as err:
            self.unavailable(describe(err))
            return
        if reply_text(state) == "lost" or self._lost:
            try:
                self.restore()
            except RedisError as err:
                self.unavailable(describe(err))
                return
        elif reply_text(state) == "taken":
            self.unavailable(
                f"server.node_name {self._redis.node!r} is used by another live node"
            )
            return
        if int(version) != self._bans.version:
            self._bans.ask_resync()
        self._sync_if_asked()

    def mark_lost(self) -> None:
        """Redis may not have what this node holds (a failed or lost write): the
        next heartbeat writes it back whole."""
        self._lost = True

    def restore(self) -> None:
        """Write this node's holdings back whole and take its lease again."""
        fields, unsent = self._holdings.take_write_back()
        if unsent:
            args: list[Any] = [0]
            for scope, (nbytes, files) in unsent.items():
                args += [scope, nbytes, files]
            try:
                self._redis.call("deltas", *args)
            except RedisError:
                self._holdings.keep_unsent(unsent)  # for the next try
                raise
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, value]
        if reply_text(self._redis.call("claim", self._lease_ms(), *pairs)) == "taken":
            raise NodeNameTakenError(
                f"server.node_name {self._redis.node!r} is used by another live node"
            )
        self._lost = False
        self._next_beat = time.monotonic() + self._beat_seconds()
        logger.info(
            "cluster: wrote this node's holdings back to Redis (%d sessions)",
            fields.get("t", 0),
        )

    def unavailable(self, problem: str) -> None:
        """Redis did not answer: ``LOCAL`` or ``REFUSING`` until it does again."""
        mode = LOCAL if self.cluster.on_unavailable == "local" else REFUSING
        self._problem = f"Redis unreachable at {self._redis.where}: {problem}"
        self._next_beat = time.monotonic() + RECONNECT_SECONDS
        self._set_mode(mode, problem)

    # --- connecting, losing Redis and coming back

    def _connect(self) -> None:
        """Scripts loaded, lease taken (waiting out a previous holder's), bans read."""
        self._redis.load()
        deadline = time.monotonic() + self.cluster.lease_seconds + CLAIM_SLACK_SECONDS
        while reply_text(self._redis.call("claim", self._lease_ms())) == "taken":
            if time.monotonic() >= deadline or self._stopping.is_set():
                raise NodeNameTakenError(
                    f"server.node_name: {self._redis.node!r} is held by another live "
                    f"node of the cluster at {self._redis.where}; every node needs "
                    "its own name"
                )
            logger.info(
                "waiting for the lease of node %r to end (a previous run of this "
                "node, or another node with the same name)",
                self._redis.node,
            )
            time.sleep(min(1.0, self._beat_seconds()))
        self._next_beat = time.monotonic() + self._beat_seconds()
        self._lost = False
        self._bans.sync()

    def _reconnect(self) -> None:
        try:
            self._redis.load()
            self.restore()
            self._bans.push_local()
            self._bans.sync()
        except NodeNameTakenError as err:
            self._problem = str(err)
            return
        except RedisError as err:
            self._problem = f"Redis unreachable at {self._redis.where}: {describe(err)}"
            return
        self._set_mode(SHARED, "Redis reachable again")

    def _sync_if_asked(self) -> None:
        """Reload the bans if the listener (re)subscribed or saw a gap."""
        if self._mode != SHARED or not self._bans.resync_asked():
            return
        try:
            self._bans.sync()
        except RedisError as err:
            self.unavailable(describe(err))

    def _beat_seconds(self) -> float:
        return self.cluster.lease_seconds / BEATS_PER_LEASE

    def _lease_ms(self) -> int:
        return self.cluster.lease_seconds * 1000

    def _set_mode(self, mode: str, reason: str) -> None:
        previous, self._mode = self._mode, mode
        self._metrics.cluster_mode(mode)
        if previous == mode:
            return
        if mode == SHARED:
            self._problem = None
            logger.info(
                "cluster state shared through Redis at %s (%s)",
                self._redis.where,
                reason,
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
                "cluster_mode", mode=mode, previous=previous or None,
                node=self._redis.node, reason=reason,
            )  # fmt: skip
