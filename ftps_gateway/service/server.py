"""Build a running gateway from a validated config: listeners, loop, workers, homes.

pyftpdlib keeps all settings in class attributes, so any change is global. Each
``GatewayServer`` therefore builds its own handler subclasses that carry a
``GatewayHolder``, and its own IO loop: two servers in one process (as in the tests)
never see each other's settings.

Reload (SIGHUP, ``ftps-gateway reload``) builds a complete new ``Gateway`` from the
config file first and swaps it in only if that worked: an invalid config changes
nothing. Sessions that have logged in keep the ``Gateway`` they logged in under; the
defender's bans and the session counts belong to the server, not to a config, and
carry over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

from ftps_gateway import config as config_module
from ftps_gateway.audit import AuditLog
from ftps_gateway.config import endpoint
from ftps_gateway.config.tree import home_source, sweep_roots
from ftps_gateway.errors import ConfigError, GatewayError, StartupError
from ftps_gateway.ftp.control import ControlHandler
from ftps_gateway.ftp.loop import LoopWaker, TimerScheduler
from ftps_gateway.ftp.passive import worker_ports
from ftps_gateway.metrics import GatewayMetrics
from ftps_gateway.policy.defender import BanKeeper, Defender, LimitKeeper, SessionLimits
from ftps_gateway.policy.netpolicy import (
    AccessList,
    PassiveAddressPolicy,
    TLSPolicyTable,
)
from ftps_gateway.policy.passwords import PasswordVerifier, RecentLogins
from ftps_gateway.service import sdnotify
from ftps_gateway.service.admin import AdminServer
from ftps_gateway.service.health import HealthServer, ReadinessState
from ftps_gateway.service.sharedstate import RemoteDefender, RemoteLimits, StateChannel
from ftps_gateway.session.runtime import (
    PASSWORD_WORKERS,
    SHARED_PARTS,
    Gateway,
    GatewayHolder,
    PortsInUse,
)
from ftps_gateway.storage.uploads import sweep_partials
from ftps_gateway.tls.contexts import (
    TicketRefresher,
    TLSContextFactory,
    prove_session_binding,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ftps_gateway.config import GatewayConfig, ListenAddress

logger = logging.getLogger("ftps_gateway")

# How often expired partial uploads are looked for (at most; see _start_sweeper).
SWEEP_INTERVAL_SECONDS = 600

# /readyz reports "storage full" when less than this is free on storage.root (statvfs
# f_bavail: what an unprivileged writer may still use), or no inode is left: uploads
# would get "452 Insufficient storage space". One MiB: a node that cannot take a
# small file should get no new sessions; anything more is capacity planning, which
# belongs to the disk-space alerts (node_exporter), not to the balancer.
STORAGE_FULL_BELOW_BYTES = 1 << 20

RELOAD_TIMEOUT_SECONDS = 30.0
METRICS_PUSH_SECONDS = 2.0  # a worker's metrics reach the supervisor this often
LISTEN_BACKLOG = 128


@dataclass
class WorkerRole:
    """What makes a GatewayServer one worker of several (see ``workers``)."""

    index: int
    count: int
    explicit: list[socket.socket]  # listening sockets, bound by the supervisor
    implicit: list[socket.socket]
    channel: StateChannel


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


# How often a drain looks for sessions whose transfer has finished.
DRAIN_POLL_SECONDS = 0.2


def build_gateway(
    config: GatewayConfig, shared: Gateway | None = None, **parts: Any
) -> Gateway:
    """A ``Gateway`` for ``config``; the server's own parts come from ``shared``.

    Raises:
        ConfigError: the certificate or key is unusable.
        StartupError: TLS session binding cannot be enforced on this runtime.
    """
    tls_factory = TLSContextFactory(config.tls)
    tickets = shared.tickets if shared is not None else parts.get("tickets")
    if tickets is None:
        tickets = parts["tickets"] = TicketRefresher()
    prove_session_binding(tls_factory, tickets)
    if not tickets.available and not tickets.warned:
        tickets.warned = True
        logger.warning(
            "TLS 1.3 clients that keep one session (curl) resume only their first "
            "data connection per session: cannot issue fresh tickets (%s)",
            tickets.problem,
        )
    server = config.server
    if shared is not None:
        shared.defender.update(config.defender, config.access.safe)
        shared.limits.update(
            server.max_sessions,
            server.max_sessions_per_ip,
            server.max_sessions_per_user,
        )
        parts = {name: getattr(shared, name) for name in SHARED_PARTS}
    else:
        parts.setdefault("defender", Defender(config.defender, config.access.safe))
        parts.setdefault(
            "metrics",
            GatewayMetrics(
                per_user_labels=config.metrics.per_user_labels,
                node=config.server.node_name or socket.gethostname(),
            ),
        )
        parts.setdefault("passive_ports", PortsInUse())
        parts.setdefault(
            "limits",
            SessionLimits(
                server.max_sessions,
                server.max_sessions_per_ip,
                server.max_sessions_per_user,
            ),
        )
    return Gateway(
        config=config,
        tls=tls_factory,
        tls_policies=TLSPolicyTable(config.tls),
        passive_policy=PassiveAddressPolicy(config.passive),
        access=AccessList(config.access.allow),
        proxy_sources=(
            AccessList(config.server.proxy_protocol_from)
            if config.server.proxy_protocol_from
            else None
        ),
        recent_logins=RecentLogins(config.server.login_cache_seconds),
        **parts,
    )


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


class GatewayServer:
    """One gateway: its listeners and the IO loop that serves them."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        verifier: PasswordVerifier | None = None,
        audit: AuditLog | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        """Build everything and bind; ``serve_forever`` runs it.

        Args:
            worker: set when this is one of several worker processes: listeners
                come bound from the supervisor, bans and limits are the
                supervisor's (over ``worker.channel``), and the admin socket and the
                HTTP endpoint are the supervisor's too.
        """
        prepare_homes(config)
        self.ioloop = IOLoop()
        self.ioloop.sched = TimerScheduler()  # no traceback for a cancelled timer
        self.waker = LoopWaker(self.ioloop)
        self.worker = worker
        executor = ThreadPoolExecutor(PASSWORD_WORKERS, thread_name_prefix="argon2")
        shared: dict[str, Any] = {}
        if worker is not None:
            shared = {
                "defender": RemoteDefender(worker.channel),
                "limits": RemoteLimits(worker.channel),
            }
        try:
            gateway = build_gateway(
                config,
                verifier=verifier or PasswordVerifier(),
                executor=executor,
                waker=self.waker,
                audit=audit or AuditLog(),
                **shared,
            )
        except GatewayError:
            executor.shutdown(wait=False)
            self.ioloop.close()
            raise
        self.holder = GatewayHolder(gateway)
        if worker is not None:
            self.holder.worker = (worker.index, worker.count)
        self.listeners: list[FTPServer] = []
        self.implicit_listeners: list[FTPServer] = []
        self.admin: AdminServer | None = None
        self.health: HealthServer | None = None
        self.readiness = ReadinessState()
        self._stopped = threading.Event()
        try:
            if worker is None:
                self._listen(config.server.listen, implicit=False)
                self._listen(config.server.implicit_listen, implicit=True)
                self.admin = AdminServer(config.admin.socket, self)
            else:
                self._adopt(worker.explicit, implicit=False)
                self._adopt(worker.implicit, implicit=True)
            self._start_monitoring(config)
        except BaseException:
            self._release()
            raise
        if worker is None or worker.index == 0:
            self._start_sweeper()

    def _listen(self, addresses: Sequence[ListenAddress], *, implicit: bool) -> None:
        key = "server.implicit_listen" if implicit else "server.listen"
        sockets = []
        for listen in addresses:
            try:
                sockets.append(bind_listener(listen))
            except OSError as err:
                for sock in sockets:
                    sock.close()
                raise StartupError(
                    f"{key}: cannot listen on {endpoint(listen)}: {err.strerror}"
                ) from err
        self._adopt(sockets, implicit=implicit)

    def _adopt(self, sockets: Sequence[socket.socket], *, implicit: bool) -> None:
        """Serve already listening sockets (this process's, or the supervisor's)."""
        handler_class = build_handler_class(self.holder, implicit=implicit)
        for sock in sockets:
            listener = FTPServer(sock, handler_class, ioloop=self.ioloop)
            listener.max_cons = 0  # SessionLimits counts sessions, not sockets
            (self.implicit_listeners if implicit else self.listeners).append(listener)

    def _start_monitoring(self, config: GatewayConfig) -> None:
        """Metrics gauges read at scrape time, readiness checks, the HTTP endpoint."""
        metrics = self.gateway.metrics
        metrics.track_passive_ports(self._passive_ports)
        metrics.track_bans(self.gateway.defender.active_count)
        metrics.track_certificate_expiry(self._certificate_expiry)
        self.readiness.add_check(self._passive_ports_problem)
        self.readiness.add_check(self._certificate_problem)
        self.readiness.add_check(lambda: storage_problem(self.config.storage.root))
        listen = config.metrics.listen
        if self.worker is not None:
            # The supervisor serves one /metrics that adds up the workers' pushes.
            channel = self.worker.channel

            def push() -> None:
                channel.push_metrics(metrics.render()[0].decode())

            self.ioloop.call_later(0, push)  # at once: /metrics is whole from the start
            self.ioloop.call_every(METRICS_PUSH_SECONDS, push)
        elif listen is not None:
            self.health = HealthServer(
                metrics, listen.host, listen.port, readiness=self.readiness
            )
            self.health.start()  # logs where it serves

    def _passive_ports(self) -> tuple[int, int]:
        passive = self.config.passive
        share = worker_ports(passive.port_min, passive.port_max, self.holder.worker)
        return self.gateway.passive_ports.count, len(share)

    def _passive_ports_problem(self) -> str | None:
        in_use, total = self._passive_ports()
        return "no passive port free" if in_use >= total else None

    def _certificate_expiry(self) -> float:
        return self.gateway.tls.not_after.timestamp()

    def _certificate_problem(self) -> str | None:
        if self.gateway.tls.not_after <= datetime.now(UTC):
            return "the TLS certificate has expired"
        return None

    @property
    def gateway(self) -> Gateway:
        """The current configuration's runtime objects."""
        return self.holder.current

    # --- what the admin socket works on (admin.AdminTarget)

    @property
    def defender(self) -> BanKeeper:
        """The bans (kept across reloads)."""
        return self.gateway.defender

    @property
    def limits(self) -> LimitKeeper:
        """The session counts (kept across reloads)."""
        return self.gateway.limits

    @property
    def audit(self) -> AuditLog:
        """The audit log."""
        return self.gateway.audit

    def reload_from_thread(self) -> list[str]:
        """``reload`` on the IO loop, waited for from another thread."""
        done: Future[list[str]] = Future()

        def run() -> None:
            try:
                done.set_result(self.reload())
            except Exception as err:  # noqa: BLE001 - handed to the waiting thread
                done.set_exception(err)

        self.waker.call_soon_threadsafe(run)
        return done.result(RELOAD_TIMEOUT_SECONDS)

    @property
    def config(self) -> GatewayConfig:
        """The current configuration."""
        return self.holder.current.config

    def reload(self) -> list[str]:
        """Re-read the config file and apply it to new sessions; run on the IO loop.

        Returns:
            The problems that kept the new config out (empty: it is in force).
        """
        current = self.holder.current
        source = current.config.source
        audit = current.audit
        if self.worker is None:
            sdnotify.reloading()
        if source is None:
            problems = ["the built-in demo has no config file to reload"]
        else:
            try:
                new_config = config_module.load(source)
                problems = unreloadable_changes(current.config, new_config)
                if not problems:
                    prepare_homes(new_config)
                    self.holder.current = build_gateway(new_config, shared=current)
            except ConfigError as err:
                problems = list(err.problems)
            except GatewayError as err:
                problems = [str(err)]
        if problems:
            audit.event("config_reload", result="refused", problems=problems)
            current.metrics.config_reloaded("invalid-config")
            for problem in problems:
                logger.error("reload refused: %s", problem)
        else:
            audit.event("config_reload", result="ok", source=str(source))
            current.metrics.config_reloaded("ok")
            logger.info("configuration reloaded from %s", source)
        if self.worker is None:
            status = "reload refused" if problems else "reloaded"
            sdnotify.notify("READY=1", f"STATUS={status}")
        return problems

    def _start_sweeper(self) -> None:
        """Remove expired partial uploads (and crash leftovers) now and periodically.

        The walk runs on the worker pool, off the IO loop: it touches every folder a
        user can upload into.
        """
        roots = sweep_roots(self.config)
        retention = self.config.storage.partial_retention_seconds
        interval = min(SWEEP_INTERVAL_SECONDS, max(retention // 2, 60))

        def sweep() -> None:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: stopping
                self.gateway.executor.submit(sweep_partials, roots, retention)

        sweep()
        self.ioloop.call_every(interval, sweep)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of each explicit listener (useful with port 0)."""
        return [(server.address[0], server.address[1]) for server in self.listeners]

    @property
    def implicit_addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of each implicit-TLS listener."""
        return [
            (server.address[0], server.address[1]) for server in self.implicit_listeners
        ]

    def serve_forever(self) -> None:
        """Run the IO loop until ``stop``."""
        for host, port in self.addresses:
            logger.info("listening for explicit FTPS on %s:%s", host, port)
        for host, port in self.implicit_addresses:
            logger.info("listening for implicit FTPS on %s:%s", host, port)
        if self.admin is not None:
            self.admin.start()
        if self.worker is None:  # a supervisor speaks for its workers
            sdnotify.notify("READY=1", "STATUS=serving")
        # pyftpdlib's loop starts with an unbounded poll and only then asks its
        # scheduler for the next deadline: timers set before the loop (metrics push,
        # partial sweep) would wait for the first connection. One wake-up at once
        # lets the scheduler set the first timeout.
        self.waker.call_soon_threadsafe(lambda: None)
        try:
            self.ioloop.loop()
        finally:
            self._release()
            self._stopped.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Close every connection and end ``serve_forever``; safe from any thread."""
        self.waker.call_soon_threadsafe(self.ioloop.close)
        self._stopped.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until ``serve_forever`` has returned; False on timeout."""
        return self._stopped.wait(timeout)

    def drain(self) -> None:
        """Stop gracefully (SIGTERM); run on the IO loop.

        ``/readyz`` fails at once so load balancers send no new sessions; new
        connections get 421; sessions without a transfer are closed with 421;
        running transfers may finish within ``server.shutdown_grace_seconds``; then
        the loop ends. A second call changes nothing (systemd signals every process
        of the service, the supervisor signals its workers too: a worker may hear
        SIGTERM twice); SIGINT is the way to stop at once.
        """
        if self.holder.draining:
            logger.info("already draining; SIGINT stops at once")
            return
        self.holder.draining = True
        if self.worker is None:
            sdnotify.notify("STOPPING=1", "STATUS=draining")
        self.readiness.start_draining()
        grace = self.config.server.shutdown_grace_seconds
        self.gateway.audit.event(
            "drain_started", sessions=len(self.holder.sessions), grace_seconds=grace
        )
        logger.info("draining: transfers may finish within %s s", grace)
        self._drain_step(time.monotonic() + grace)

    def _drain_step(self, deadline: float) -> None:
        busy = 0
        for session in list(self.holder.sessions):
            if session.transfer_in_progress():
                busy += 1
            else:
                session.close_for_shutdown()
        if busy and time.monotonic() < deadline:
            self.ioloop.call_later(DRAIN_POLL_SECONDS, self._drain_step, deadline)
            return
        self.gateway.audit.event("drain_finished", transfers_cut=busy)
        # Let the last 421 replies leave before every channel is closed.
        self.ioloop.call_later(DRAIN_POLL_SECONDS, self.ioloop.close)

    def _release(self) -> None:
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        gateway = self.holder.current
        gateway.executor.shutdown(wait=False, cancel_futures=True)
        gateway.tls.close()
        if self.ioloop.socket_map:
            self.ioloop.close()


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
    ):  # fmt: skip
        if before != after:
            problems.append(f"{key}: changed; this takes effect only on restart")
    return problems


def build_handler_class(
    holder: GatewayHolder, *, implicit: bool = False
) -> type[ControlHandler]:
    """A ControlHandler subclass carrying this server's holder (never global).

    Banner and timeouts are properties that read the session's configuration, so
    a reload changes them for new sessions.
    """
    attributes: dict[str, Any] = {
        "gateways": holder,
        "implicit_tls": implicit,
    }
    return type("GatewayControlHandler", (ControlHandler,), attributes)
