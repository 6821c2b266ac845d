"""One gateway process, alone or one worker of several: build, bind, serve, drain, stop.

pyftpdlib keeps all settings in class attributes, so any change is global. Each
``GatewayServer`` therefore builds its own handler subclasses that carry a
``GatewayHolder``, and its own IO loop: two servers in one process (as in the tests)
never see each other's settings.

Reload (SIGHUP, ``ftps-gateway reload``) builds a complete new ``Gateway`` from the
config file first and swaps it in only if that worked: an invalid config changes
nothing. Sessions that have logged in keep the ``Gateway`` they logged in under; the
shared state (bans, login slots, quota reservations) belongs to the server, not to a
config, and carries over.

What a supervisor of workers does the same way (binding, the kept state, the reload
flow, readiness, signals) is in ``lifecycle``; this module adds what needs the IO
loop and pyftpdlib (outside ``ftp/``, the one module allowed to import it).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

from ftps_gateway.audit import REFUSAL_DIGEST_SECONDS, AuditLog
from ftps_gateway.config.tree import sweep_roots
from ftps_gateway.errors import GatewayError, StartupError
from ftps_gateway.ftp.control import ControlHandler
from ftps_gateway.ftp.loop import LoopWaker, MessagePort, TimerScheduler
from ftps_gateway.ftp.passive import worker_ports
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.metrics.scrapetime import PUBLISH_SECONDS
from ftps_gateway.policy.netpolicy import (
    AccessList,
    PassiveAddressPolicy,
    TLSPolicyTable,
)
from ftps_gateway.policy.passivenames import PassiveNames
from ftps_gateway.policy.passwords import PasswordVerifier, RecentLogins
from ftps_gateway.service import lifecycle, sdnotify
from ftps_gateway.service.admin import RELOAD_TIMEOUT_SECONDS, AdminServer
from ftps_gateway.service.hooks import HookDispatcher
from ftps_gateway.service.hookspool import SpoolAdmin, spool_root
from ftps_gateway.service.sharedstate import MAX_MESSAGE_BYTES, ChannelState
from ftps_gateway.service.watchdog import LoopWatchdog
from ftps_gateway.session.loginqueue import LoginQueue
from ftps_gateway.session.runtime import (
    PASSWORD_WORKERS,
    SHARED_PARTS,
    Gateway,
    GatewayHolder,
    PortsInUse,
)
from ftps_gateway.session.state import StateSettings
from ftps_gateway.session.work import FileWork, Outcome
from ftps_gateway.storage.uploads import sweep_partials
from ftps_gateway.tls.contexts import (
    TicketRefresher,
    TLSContextFactory,
    prove_session_binding,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ftps_gateway.config import GatewayConfig, ListenAddress
    from ftps_gateway.service.health import HealthServer
    from ftps_gateway.session.state import SharedState, StateAdmin, StateStore

logger = logging.getLogger("ftps_gateway")

# How often expired partial uploads are looked for (at most; see _start_sweeper).
SWEEP_INTERVAL_SECONDS = 600

# How often a drain looks for sessions whose transfer has finished.
DRAIN_POLL_SECONDS = 0.2


@dataclass
class WorkerRole:
    """What makes a GatewayServer one worker of several (see ``supervisor``)."""

    index: int
    count: int
    explicit: list[socket.socket]  # listening sockets, bound by the supervisor
    implicit: list[socket.socket]
    channel: socket.socket  # the shared-state channel to the supervisor


def build_gateway(config: GatewayConfig, own: Mapping[str, Any]) -> Gateway:
    """A ``Gateway`` for ``config`` around the server's own parts.

    Args:
        own: one value per name in ``SHARED_PARTS``: what the server keeps across
            reloads (bans, session counts, metrics, the login queue...).

    Raises:
        ConfigError: the certificate or key is unusable.
        StartupError: TLS session binding cannot be enforced on this runtime.
    """
    tls_factory = TLSContextFactory(config.tls)
    tickets: TicketRefresher = own["tickets"]
    prove_session_binding(tls_factory, tickets)
    if not tickets.available and not tickets.warned:
        tickets.warned = True
        logger.warning(
            "TLS 1.3 clients that keep one session (curl) resume only their first "
            "data connection per session: cannot issue fresh tickets (%s)",
            tickets.problem,
        )
    return Gateway(
        config=config,
        tls=tls_factory,
        tls_policies=TLSPolicyTable(config.tls),
        passive_policy=PassiveAddressPolicy(config.passive, names=own["passive_names"]),
        access=AccessList(config.access.allow),
        proxy_sources=(
            AccessList(config.server.proxy_protocol_from)
            if config.server.proxy_protocol_from
            else None
        ),
        recent_logins=RecentLogins(config.server.login_cache_seconds),
        **own,
    )


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
                come bound from the supervisor, bans, login slots and quota are
                the supervisor's (over ``worker.channel``), and the admin socket, the
                HTTP endpoint and the word to systemd are the supervisor's too.
        """
        lifecycle.prepare_homes(config)
        self.worker = worker
        self._speaks_for_service = worker is None
        # The state, when this process keeps it (in-process, or its cluster's).
        self._store: StateStore | None = None
        self._channel: ChannelState | None = None  # or the supervisor's, if a worker
        self.ioloop = IOLoop()
        self.ioloop.sched = TimerScheduler()  # no traceback for a cancelled timer
        self.waker = LoopWaker(self.ioloop)
        self.holder = GatewayHolder(self._first_gateway(config, verifier, audit))
        if worker is not None:
            self.holder.worker = (worker.index, worker.count)
        self.listeners: list[FTPServer] = []
        self.implicit_listeners: list[FTPServer] = []
        self.admin: AdminServer | None = None
        self.health: HealthServer | None = None
        self.readiness = lifecycle.readiness(
            self._passive_ports_problem,
            config=lambda: self.config,
            not_after=lambda: self.gateway.tls.not_after,
        )
        self.watchdog = LoopWatchdog(
            self.waker,
            lambda: self.config.server.loop_stall_seconds,
            self.gateway.metrics,
            report=self._report_loop if worker is not None else None,
        )
        self.readiness.add_check(self.watchdog.problem)
        lifecycle.watch_kept_state(self._store, self.readiness)
        self._stopped = threading.Event()
        try:
            if worker is None:
                self._listen(config.server.listen, implicit=False)
                self._listen(config.server.implicit_listen, implicit=True)
                self.admin = AdminServer(config.admin.socket, self)
            else:
                self._adopt(worker.explicit, implicit=False)
                self._adopt(worker.implicit, implicit=True)
            self._start_monitoring()
        except BaseException:
            self._release()
            raise
        if worker is None or worker.index == 0:
            self._start_sweeper()
        # The refusal digest's interval ends on time even when refusals stop.
        self.ioloop.call_every(REFUSAL_DIGEST_SECONDS, self._flush_refusals)

    def _report_loop(self, stalled: float) -> None:
        """The watchdog's news, on to the supervisor (from the watchdog's thread)."""
        channel = self._channel
        if channel is not None:
            channel.report_loop(stalled)

    def _first_gateway(
        self,
        config: GatewayConfig,
        verifier: PasswordVerifier | None,
        audit: AuditLog | None,
    ) -> Gateway:
        """The first ``Gateway``, with the parts this server keeps from then on."""
        state: SharedState
        if self.worker is not None:  # the supervisor's, over the channel
            channel = ChannelState(
                self.worker.channel, StateSettings.from_config(config)
            )
            try:
                channel.sync()
            except (OSError, ValueError) as err:
                self.ioloop.close()
                raise StartupError(f"no ban list from the supervisor: {err}") from err
            port = MessagePort(
                self.worker.channel, self.ioloop, channel.handle_message, channel.lost,
                max_message_bytes=MAX_MESSAGE_BYTES,
            )  # fmt: skip
            channel.attach(port, lambda flush: self.ioloop.call_later(0, flush))
            state = self._channel = channel
        audit = audit or AuditLog()
        metrics = GatewayMetrics(
            per_user_labels=config.metrics.per_user_labels,
            node=config.server.node_name or socket.gethostname(),
            worker=self.worker is not None,  # into the supervisor's files
        )
        if self.worker is None:  # before binding: a cluster node may not start
            try:
                state = self._store = lifecycle.new_kept_state(
                    config, waker=self.waker, audit=audit, metrics=metrics
                )
            except GatewayError:
                self.ioloop.close()
                raise
        login_queue = LoginQueue(self.waker, state, threads=PASSWORD_WORKERS)
        file_work = FileWork(self.waker)
        own = {
            "verifier": verifier or PasswordVerifier(),
            "login_queue": login_queue,
            "waker": self.waker,
            "audit": audit,
            "state": state,
            "metrics": metrics,
            "passive_ports": PortsInUse(),
            "tickets": TicketRefresher(),
            "file_work": file_work,
            "passive_names": PassiveNames(),
        }
        self.hooks: HookDispatcher | None = None
        try:
            worker = self.worker
            self.hooks = HookDispatcher(
                config, audit=audit, metrics=metrics,
                worker=(worker.index, worker.count) if worker else (0, 1),
            )  # fmt: skip
            return build_gateway(config, own | {"hooks": self.hooks})
        except GatewayError:
            login_queue.shutdown()
            file_work.shutdown()
            if self.hooks is not None:
                self.hooks.close()
            lifecycle.close_kept_state(self._store)
            self.ioloop.close()
            raise

    def _listen(self, addresses: Sequence[ListenAddress], *, implicit: bool) -> None:
        key = "server.implicit_listen" if implicit else "server.listen"
        self._adopt(lifecycle.bind_listeners(addresses, key), implicit=implicit)

    def _adopt(self, sockets: Sequence[socket.socket], *, implicit: bool) -> None:
        """Serve already listening sockets (this process's, or the supervisor's)."""
        handler_class = build_handler_class(self.holder, implicit=implicit)
        for sock in sockets:
            listener = FTPServer(sock, handler_class, ioloop=self.ioloop)
            listener.max_cons = 0  # session.admission counts sessions, not sockets
            (self.implicit_listeners if implicit else self.listeners).append(listener)

    def _start_monitoring(self) -> None:
        """Metrics gauges read at scrape time, and the HTTP endpoint (a worker's is
        the supervisor's, which reads the workers' metrics files; workermetrics)."""
        metrics = self.gateway.metrics
        metrics.track_passive_ports(self._passive_ports)
        metrics.track_bans(self.gateway.state.active_bans)
        metrics.track_login_queue(lambda: self.gateway.login_queue.waiting)
        metrics.track_certificate_expiry(self._certificate_expiry)
        if self.hooks is not None:
            metrics.track_hooks(self.hooks.snapshot)
        if self.worker is not None:
            # The owner-read gauges into this worker's metrics files: now, so the
            # first scrape has every series, then every PUBLISH_SECONDS (the other
            # series are written as they change; decision 0012).
            metrics.publish_scrape_time()
            self.ioloop.call_every(PUBLISH_SECONDS, metrics.publish_scrape_time)
            return
        self.health = lifecycle.health_endpoint(self.config, metrics, self.readiness)
        if self.health is not None:
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

    @property
    def gateway(self) -> Gateway:
        """The current configuration's runtime objects."""
        return self.holder.current

    @property
    def config(self) -> GatewayConfig:
        """The current configuration."""
        return self.holder.current.config

    # --- what the admin socket works on (admin.AdminTarget)

    @property
    def state_admin(self) -> StateAdmin:
        """Bans and counts for the admin socket: a single server's own state, or
        its cluster's (``ban list|remove`` then act on every node)."""
        if self._store is None:
            raise AssertionError("a worker has no admin socket")
        return self._store

    @property
    def audit(self) -> AuditLog:
        """The audit log."""
        return self.gateway.audit

    @property
    def hook_spool(self) -> SpoolAdmin:
        """The hook spool, as files (``ftps-gateway hooks list|retry``)."""
        return SpoolAdmin(spool_root(self.config))

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

    # --- reload

    def reload(self) -> list[str]:
        """Re-read the config file and apply it to new sessions; run on the IO loop.

        Returns:
            The problems that kept the new config out (empty: it is in force).
        """
        current = self.holder.current
        return lifecycle.reload_config(
            current.config,
            self._swap_in,
            audit=current.audit,
            metrics=current.metrics,
            tell_systemd=self._speaks_for_service,
        )

    def _swap_in(self, config: GatewayConfig) -> None:
        """Make ``config`` the one new sessions get; raises with nothing changed."""
        lifecycle.prepare_homes(config)
        current = self.holder.current
        own = {name: getattr(current, name) for name in SHARED_PARTS}
        gateway = build_gateway(config, own)
        if self.hooks is not None:
            self.hooks.configure(config)  # new hooks apply to events from now on
        lifecycle.update_kept_state(config, current.state)
        self.holder.current = gateway

    def _flush_refusals(self) -> None:
        self.gateway.audit.flush_refusals()

    def _start_sweeper(self) -> None:
        """Remove expired partial uploads (and crash leftovers) now and periodically.

        The walk runs on the file-work pool, off the IO loop (it touches every folder
        a user can upload into), never on the login queue's threads, where it would
        delay logins.
        """
        roots = sweep_roots(self.config)
        retention = self.config.storage.partial_retention_seconds
        interval = min(SWEEP_INTERVAL_SECONDS, max(retention // 2, 60))

        def sweep() -> None:
            self.gateway.file_work.submit(
                "partial-sweep", lambda: sweep_partials(roots, retention), _log_sweep
            )

        sweep()
        self.ioloop.call_every(interval, sweep)

    # --- serve

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

    def install_signal_handlers(self) -> Callable[[], None]:
        """SIGTERM drains, SIGINT stops at once, SIGHUP reloads; main thread only.

        A second SIGTERM stops at once too, except in a worker: systemd signals every
        process of the service and the supervisor forwards its own, so a worker hears
        SIGTERM twice for one stop (the supervisor sends SIGINT for "at once").

        Returns:
            A function that puts the previous handlers back (see ``lifecycle``).
        """
        terms = 0

        def drain() -> None:
            nonlocal terms
            terms += 1
            if terms > 1 and self.worker is None:
                self.waker.request_stop()
            else:
                self.waker.call_soon_threadsafe(self.drain)

        return lifecycle.install_signal_handlers(
            drain=drain,
            stop=self.waker.request_stop,
            reload=lambda: self.waker.call_soon_threadsafe(self.reload),
        )

    def serve_forever(self) -> None:
        """Run the IO loop until ``stop``."""
        for host, port in self.addresses:
            logger.info("listening for explicit FTPS on %s:%s", host, port)
        for host, port in self.implicit_addresses:
            logger.info("listening for implicit FTPS on %s:%s", host, port)
        if self.admin is not None:
            self.admin.start()
        if self.hooks is not None:
            self.hooks.start()  # queued events of an earlier run go out now
        if self._speaks_for_service:
            sdnotify.notify("READY=1", "STATUS=serving")
        # pyftpdlib's loop starts with an unbounded poll and only then asks its
        # scheduler for the next deadline: timers set before the loop (the partial
        # sweep) would wait for the first connection. One wake-up at once
        # lets the scheduler set the first timeout.
        self.waker.call_soon_threadsafe(lambda: None)
        self.watchdog.start(threading.get_ident())
        try:
            self.ioloop.loop()
        finally:
            self._release()
            self._stopped.set()

    # --- drain and stop

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
        lifecycle.announce_draining(
            self.readiness, tell_systemd=self._speaks_for_service
        )
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

    def stop(self, timeout: float | None = 10.0) -> None:
        """Close every connection and end ``serve_forever``; safe from any thread."""
        self.waker.call_soon_threadsafe(self.ioloop.close)
        self._stopped.wait(timeout)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until ``serve_forever`` has returned; False on timeout."""
        return self._stopped.wait(timeout)

    def _release(self) -> None:
        self.watchdog.stop()  # the loop is done: what follows is not a stall
        if self.health is not None:
            self.health.stop()
            self.health = None
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        gateway = self.holder.current
        gateway.login_queue.shutdown()
        gateway.file_work.shutdown()
        if self.hooks is not None:
            self.hooks.close()  # unsent events stay spooled for the next start
        gateway.tls.close()
        if self.ioloop.socket_map:
            self.ioloop.close()
        # After the sessions' ends: a cluster node gives back what it held at once.
        lifecycle.close_kept_state(self._store)


def _log_sweep(outcome: Outcome[int]) -> None:
    """A failed sweep is logged, not raised into the loop."""
    if outcome.error is not None and not isinstance(outcome.error, CancelledError):
        logger.error("sweeping partial uploads failed: %s", outcome.error)


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
