"""What a serving process does the same way alone or as the supervisor of workers.

``GatewayServer`` (one process, or one worker) and ``Supervisor`` (several workers)
are two shapes of one service: both bind the configured listeners, keep the shared
state (bans, login slots, quota reservations) that outlives a configuration, reload
on SIGHUP or the admin socket, tell systemd and ``/readyz`` how they are doing, and
map the same three signals. Each of those jobs is written once, here, so the two
shapes cannot drift apart (issue 13: they had: the supervisor's reload told systemd
only on SIGHUP, and its bind errors came out as tracebacks).

This module owns no process and no IO loop: it must not import pyftpdlib, ``ftp/``,
``server`` or ``supervisor`` (both import it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ftps_gateway import config as config_module
from ftps_gateway.config import endpoint
from ftps_gateway.config.tree import home_source
from ftps_gateway.errors import ConfigError, GatewayError, StartupError
from ftps_gateway.service import sdnotify
from ftps_gateway.service.cluster import RedisState
from ftps_gateway.service.health import HealthServer, MetricsSource, ReadinessState
from ftps_gateway.session.state import LocalState, StateSettings

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from types import FrameType

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import GatewayConfig, ListenAddress
    from ftps_gateway.metrics.gateway import GatewayMetrics
    from ftps_gateway.service.redisclient import ClusterMetrics
    from ftps_gateway.session.runtime import Waker
    from ftps_gateway.session.state import SharedState, StateStore

logger = logging.getLogger("ftps_gateway")

LISTEN_BACKLOG = 128

# /readyz reports "storage full" when less than this is free on storage.root (statvfs
# f_bavail: what an unprivileged writer may still use), or no inode is left: uploads
# would get "452 Insufficient storage space". One MiB: a node that cannot take a
# small file should get no new sessions; anything more is capacity planning, which
# belongs to the disk-space alerts (node_exporter), not to the balancer.
STORAGE_FULL_BELOW_BYTES = 1 << 20


# --- start-up: listeners and homes


def bind_listener(listen: ListenAddress) -> socket.socket:
    """A listening TCP socket for ``listen`` (SO_REUSEADDR, non-blocking)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(LISTEN_BACKLOG)
        sock.settimeout(0.0)
    except OSError:
        sock.close()
        raise
    return sock


def bind_listeners(addresses: Sequence[ListenAddress], key: str) -> list[socket.socket]:
    """A listening socket per address, or none at all.

    Raises:
        StartupError: one address cannot be bound (named by the config ``key``);
            the sockets bound before it are closed.
    """
    sockets: list[socket.socket] = []
    for listen in addresses:
        try:
            sockets.append(bind_listener(listen))
        except OSError as err:
            for sock in sockets:
                sock.close()
            raise StartupError(
                f"{key}: cannot listen on {endpoint(listen)}: {err.strerror}"
            ) from err
    return sockets


def prepare_homes(config: GatewayConfig) -> None:
    """Create every user's home (mode 0750, parents included) if missing."""
    try:
        for user in config.users:
            if user.home:  # other folders are created at login (they may hold {user})
                home_source(config, user.name).mkdir(
                    mode=0o750, parents=True, exist_ok=True
                )
    except OSError as err:
        raise StartupError(
            f"storage.root: cannot create user homes under {config.storage.root}: "
            f"{err.strerror}"
        ) from err


# --- the state that outlives a configuration


def new_kept_state(
    config: GatewayConfig,
    *,
    waker: Waker | None = None,
    audit: AuditLog | None = None,
    metrics: ClusterMetrics | None = None,
) -> StateStore:
    """The bans, login slots and quota reservations of a new server (or supervisor).

    They belong to the server, not to a config: a reload updates their settings
    (``update_kept_state``) and keeps what they hold. In-process (``LocalState``),
    or with ``[cluster]`` this node's share of the cluster's, in Redis, connected
    and leased before anything is bound (``close_kept_state`` gives it back).

    Args:
        waker: where a cluster store hands its answers (a single server's IO
            loop); None: on its own thread (the supervisor's ``StateService``).
        audit: where a cluster store writes its mode changes.
        metrics: where a cluster store counts Redis round trips, errors, its mode.

    Raises:
        StartupError: Redis unreachable, refusing the password or the TLS handshake
            (unless ``cluster.on_unavailable = "local"``), or the node name is
            another live node's.
    """
    settings = StateSettings.from_config(config)
    if config.cluster is None:
        return LocalState(settings)
    store = RedisState(
        config.cluster, config.server.node_name, settings,
        waker=waker, audit=audit, metrics=metrics,
    )  # fmt: skip
    store.start()
    return store


def watch_kept_state(state: object, ready: ReadinessState) -> None:
    """A cluster store's mode in ``/readyz``: failing while it refuses logins (Redis
    unreachable, ``on_unavailable = "refuse"``), a note while it serves on local
    state (failing it would take every node out of the balancer at once)."""
    if isinstance(state, RedisState):
        ready.add_check(state.problem)
        ready.add_note(state.note)


def close_kept_state(state: object) -> None:
    """Stop a cluster store and give this node's holdings back at once."""
    if isinstance(state, RedisState):
        state.close()


def update_kept_state(config: GatewayConfig, state: SharedState) -> None:
    """Apply a reloaded ``config``'s defender, key and limit settings; bans stay."""
    state.update(StateSettings.from_config(config))


# --- reload


def unreloadable_changes(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Settings a reload cannot apply (bound sockets, processes); restart for them."""
    problems = []
    for key, before, after in (
        ("server.listen", old.server.listen, new.server.listen),
        ("server.implicit_listen", old.server.implicit_listen,
         new.server.implicit_listen),
        ("server.workers", old.server.workers, new.server.workers),
        ("admin.socket", old.admin.socket, new.admin.socket),
        ("metrics.listen", old.metrics.listen, new.metrics.listen),
        # The node's Redis client and lease are made once, at start-up.
        ("cluster", old.cluster, new.cluster),
        ("server.node_name", old.server.node_name if old.cluster else "",
         new.server.node_name if new.cluster else ""),
    ):  # fmt: skip
        if before != after:
            problems.append(f"{key}: changed; this takes effect only on restart")
    return problems


def reload_config(
    current: GatewayConfig,
    apply: Callable[[GatewayConfig], None],
    *,
    audit: AuditLog,
    metrics: GatewayMetrics | None,
    tell_systemd: bool,
) -> list[str]:
    """Re-read ``current``'s file and hand the new config to ``apply``, or refuse it.

    ``apply`` raises (ConfigError, or another GatewayError) to refuse what only
    building reveals (an unusable certificate); it must then have changed nothing.

    Args:
        metrics: where the outcome is counted (with workers: the supervisor's;
            a worker's ``GatewayMetrics`` leaves it to the supervisor).
        tell_systemd: this process speaks for the service (not a worker).

    Returns:
        The problems that kept the new config out (empty: it is in force).
    """
    if tell_systemd:
        sdnotify.reloading()
    source = current.source
    if source is None:
        problems = ["the built-in demo has no config file to reload"]
    else:
        try:
            new = config_module.load(source)
            problems = unreloadable_changes(current, new)
            if not problems:
                apply(new)
        except ConfigError as err:
            problems = list(err.problems)
        except GatewayError as err:
            problems = [str(err)]
    _report_reload(problems, source, audit, metrics, tell_systemd=tell_systemd)
    return problems


def _report_reload(
    problems: list[str],
    source: Path | None,
    audit: AuditLog,
    metrics: GatewayMetrics | None,
    *,
    tell_systemd: bool,
) -> None:
    """One reload's outcome: audit line, metric, log lines, systemd status."""
    if problems:
        audit.event("config_reload", result="refused", problems=problems)
        if metrics is not None:
            metrics.config_reloaded("invalid-config")
        for problem in problems:
            logger.error("reload refused: %s", problem)
    else:
        audit.event("config_reload", result="ok", source=str(source))
        if metrics is not None:
            metrics.config_reloaded("ok")
        logger.info("configuration reloaded from %s", source)
    if tell_systemd:
        status = "reload refused" if problems else "reloaded"
        sdnotify.notify("READY=1", f"STATUS={status}")


# --- readiness and the HTTP endpoint


def certificate_problem(not_after: datetime) -> str | None:
    """Why ``/readyz`` fails for a certificate that ends at ``not_after``; else None."""
    if not_after <= datetime.now(UTC):
        return "the TLS certificate has expired"
    return None


def storage_problem(root: Path) -> str | None:
    """Why ``root`` cannot take uploads (full, or gone), for ``/readyz``; else None."""
    try:
        stats = os.statvfs(root)
    except OSError as err:
        return f"storage root unavailable: {err.strerror}"
    free = stats.f_bavail * stats.f_frsize
    if free < STORAGE_FULL_BELOW_BYTES or (stats.f_files and not stats.f_favail):
        return f"storage full: {free} bytes free on storage.root"
    return None


def readiness(
    own_problem: Callable[[], str | None],
    config: Callable[[], GatewayConfig],
    not_after: Callable[[], datetime],
) -> ReadinessState:
    """``/readyz``'s checks, in the order it lists them.

    Args:
        own_problem: what only this shape knows (a free passive port, all workers
            up).
        config: the configuration in force now (a reload replaces it).
        not_after: when the certificate served now expires.
    """
    state = ReadinessState()
    state.add_check(own_problem)
    state.add_check(lambda: certificate_problem(not_after()))
    state.add_check(lambda: storage_problem(config().storage.root))
    return state


def health_endpoint(
    config: GatewayConfig, metrics: MetricsSource, ready: ReadinessState
) -> HealthServer | None:
    """The ``metrics.listen`` endpoint, not started yet; None when not configured."""
    listen = config.metrics.listen
    if listen is None:
        return None
    return HealthServer(metrics, listen.host, listen.port, readiness=ready)


def announce_draining(ready: ReadinessState, *, tell_systemd: bool) -> None:
    """A drain begins: ``/readyz`` fails from now on, and systemd is told."""
    if tell_systemd:
        sdnotify.notify("STOPPING=1", "STATUS=draining")
    ready.start_draining()


# --- signals


def install_signal_handlers(
    *,
    drain: Callable[[], None],
    stop: Callable[[], None],
    reload: Callable[[], None],
) -> Callable[[], None]:
    """SIGTERM drains, SIGINT stops at once, SIGHUP reloads; main thread only.

    The callbacks run inside the signal handler, between two bytecodes of whatever
    the main thread was doing: they may only set a flag or hand work on (no logging:
    a logging handler's lock may be held by the interrupted code).

    Returns:
        A function that puts back the handlers found here, for a caller that asks
        (a test, an embedding program). The gateway's own processes keep theirs to
        the end: a stop signal in the last moments of exit then finds a handler,
        not the default action, and the exit code stays the one ``serve`` chose.
    """

    def handler(action: Callable[[], None]) -> Callable[[int, FrameType | None], None]:
        return lambda _signum, _frame: action()

    actions = {signal.SIGTERM: drain, signal.SIGINT: stop, signal.SIGHUP: reload}
    previous = {
        signum: signal.signal(signum, handler(action))
        for signum, action in actions.items()
    }

    def restore() -> None:
        for signum, handler in previous.items():
            # None: a handler not installed from Python; the default is the best guess.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    return restore
