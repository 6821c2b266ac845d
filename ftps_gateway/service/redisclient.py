"""A cluster node's Redis client: bounded calls, scripts by name, failures named.

``RedisScripts`` is the only thing in the cluster state that talks to the ``redis``
client (redis-py; decision 0010): it builds the client from ``[cluster]``
(``redis_url``, ``rediss://`` with ``ca_file``), loads ``redisscripts`` and runs them
with the node's name and lease token, times every round trip and counts every error
for ``metrics.clusterseries.ClusterSeries``. The state itself
(``cluster.RedisState``), the lease (``clusterlease``) and the ban replica
(``clusterbans``) only say which script to run.

Why one place: every call must be bounded by ``cluster.timeout_seconds`` (connect and
read; redis-py's own retries are off, so the bound is not multiplied: redis-py 6+
retries three times by default), every round trip is measured and every failure
turned into the words an operator needs (the password, the TLS chain, a timeout).
Those rules held once, here, cannot drift between the callers.
"""

from __future__ import annotations

import secrets
import time
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
from ftps_gateway.service import redisscripts

if TYPE_CHECKING:
    from redis.client import PubSub

    from ftps_gateway.config import ClusterSettings

# How often an unreachable Redis is tried again.
RECONNECT_SECONDS = 1.0
# Connections at most: the request thread, the ban listener, the admin socket.
MAX_CONNECTIONS = 8


class ClusterMetrics(Protocol):
    """What the cluster state counts (``metrics.clusterseries.ClusterSeries`` has
    these verbs)."""

    def redis_round_trip(self, seconds: float) -> None: ...
    def redis_error(self, kind: str) -> None: ...
    def cluster_mode(self, mode: str) -> None: ...


class NoMetrics:
    """``ClusterMetrics`` that counts nothing (a store built without metrics)."""

    def redis_round_trip(self, seconds: float) -> None:
        pass

    def redis_error(self, kind: str) -> None:
        pass

    def cluster_mode(self, mode: str) -> None:
        pass


class NodeNameTakenError(RedisError):
    """Another live process holds this node's lease."""


class RedisScripts:
    """The node's Redis client and the ``redisscripts`` it runs, by name."""

    def __init__(
        self, cluster: ClusterSettings, node: str, metrics: ClusterMetrics
    ) -> None:
        """Prepare the client; nothing connects until the first call.

        Args:
            node: ``server.node_name``: every script runs for it, with this run's
                token (the lease's owner mark).
        """
        self.node = node
        self.where = redacted(cluster.redis_url)
        # The channel every ban change is published on (``redisscripts``: P bans).
        self.bans_channel = f"{cluster.key_prefix}bans"
        self._keys = cluster.key_prefix
        self._token = secrets.token_hex(16)
        self._metrics = metrics
        self._redis = _client(cluster)
        self._shas: dict[str, str] = {}

    def close(self) -> None:
        """Close the client's connections."""
        self._redis.close()

    def pipeline(self) -> Any:
        """A pipeline (no MULTI): what is queued on it goes in one round trip."""
        return self._redis.pipeline(transaction=False)

    def pubsub(self) -> PubSub:
        """A subscriber connection (the ban listener's)."""
        return self._redis.pubsub(ignore_subscribe_messages=True)

    def load(self) -> None:
        """Load every script (again: Redis forgets them when it restarts)."""
        started = time.perf_counter()
        pipe = self.pipeline()
        names = list(redisscripts.ALL)
        for name in names:
            pipe.script_load(redisscripts.ALL[name])
        shas = self.execute(pipe, started=started, raise_errors=True)
        self._shas = {
            name: reply_text(sha) for name, sha in zip(names, shas, strict=True)
        }

    def queue(self, pipe: Any, name: str, *args: Any) -> None:
        """Queue script ``name`` on ``pipe`` for this node."""
        pipe.evalsha(self._shas[name], 0, self._keys, self.node, self._token, *args)

    def call(self, name: str, *args: Any) -> Any:
        """One script, one round trip (loading the scripts again if Redis lost them)."""
        if not self._shas:
            self.load()
        for attempt in range(2):
            pipe = self.pipeline()
            self.queue(pipe, name, *args)
            try:
                return self.execute(pipe, raise_errors=True)[0]
            except NoScriptError:
                if attempt:
                    raise
                self.load()
        raise AssertionError  # pragma: no cover - the loop returns or raises

    def execute(
        self, pipe: Any, *, started: float | None = None, raise_errors: bool = False
    ) -> list[Any]:
        """Send ``pipe``: its replies (errors among them unless ``raise_errors``),
        the round trip timed, a failure counted by kind."""
        started = time.perf_counter() if started is None else started
        try:
            results: list[Any] = pipe.execute(raise_on_error=raise_errors)
        except RedisError as err:
            self._metrics.redis_error(error_kind(err))
            raise
        finally:
            pipe.reset()
        self._metrics.redis_round_trip(time.perf_counter() - started)
        return results


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


def describe(err: Exception) -> str:
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


def error_kind(err: Exception) -> str:
    """The ``ftps_gateway_redis_errors_total`` label of ``err``."""
    described = describe(err)
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


def reply_text(value: Any) -> str:
    """A Redis reply as text (the client answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_lost(result: Any) -> bool:
    """A script's reply says Redis lost this node's lease (write holdings back)."""
    if isinstance(result, list) and result:
        result = result[0]
    return not isinstance(result, Exception) and reply_text(result) == "lost"
