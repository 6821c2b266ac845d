"""Several worker processes, one gateway: the supervisor.

Why this shape (docs/decisions/0003-worker-processes.md has the measurements):
pyftpdlib's prefork shares one epoll set between forked workers (transfers failed)
and ``MultiprocessFTPServer`` breaks limits and hooks. Here the supervisor binds the
listening sockets and starts N independent workers (``python -m ftps_gateway
worker``, a fresh interpreter each: no fork of a threaded process), each with its own
IO loop on the inherited sockets; the kernel hands each new connection to one of
them. What must be shared is shared explicitly:

- passive ports: disjoint shares by port number (``ftp.passive.worker_ports``);
- bans, login slots and quota reservations: kept here, served over a socket pair
  per worker (``sharedstate``): bans replicated to every worker, the rest answered
  asynchronously, nothing ever waited for on a worker's IO loop; with ``[cluster]``
  "here" is the node's one Redis client (``cluster.RedisState``, one lease per
  node), and ``/readyz`` and ``/metrics`` say its mode;
- metrics: each worker writes its values into prometheus-client's multiprocess
  files, ``/metrics`` here reads them at each scrape (``workermetrics``);
- signals: SIGTERM drains every worker, SIGHUP reloads (validated here first);
- the admin socket and the HTTP endpoint live here;
- hook events: each worker spools and delivers its own (``hooks``); ``hooks
  list|retry`` here work on the spool files (``hookspool.SpoolAdmin``).
A worker that dies is restarted; what it held (login slots, reservations) is released.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftps_gateway.audit import AuditLog
from ftps_gateway.errors import StartupError
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.metrics.valuestore import keep_values_in
from ftps_gateway.service import lifecycle, sdnotify, sharedstate
from ftps_gateway.service.admin import AdminServer
from ftps_gateway.service.hookspool import SpoolAdmin, spool_root
from ftps_gateway.service.server import GatewayServer, WorkerRole
from ftps_gateway.service.workermetrics import ENVIRONMENT, WorkerMetrics
from ftps_gateway.tls.certificates import certificate_not_after

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.config import GatewayConfig
    from ftps_gateway.session.state import StateAdmin

logger = logging.getLogger("ftps_gateway")

EXIT_CONFIG = 3  # a worker that exits 3 found the config unusable: do not restart
RESTART_DELAY_SECONDS = 1.0
POLL_SECONDS = 0.2


def worker_count(config: GatewayConfig) -> int:
    """``server.workers``, with "auto" as one per CPU core; never more than ports."""
    wanted = config.server.workers or os.cpu_count() or 1
    ports = config.passive.port_max - config.passive.port_min + 1
    return max(1, min(wanted, ports))


class Supervisor:
    """Binds, starts and watches the workers; owns the shared state, admin, /metrics."""

    def __init__(self, config: GatewayConfig, count: int) -> None:
        if config.source is None:
            raise StartupError("several workers need a config file to start them from")
        lifecycle.prepare_homes(config)
        self.config = config
        self.count = count
        self.audit = AuditLog()
        # What /metrics says for the whole gateway (build, reloads, bans, the
        # certificate, a cluster node's Redis series), and its shape (workermetrics).
        own = GatewayMetrics(
            per_user_labels=config.metrics.per_user_labels,
            process_metrics=False,
            node=config.server.node_name or socket.gethostname(),
        )
        # With [cluster], the node's one Redis client and lease (whatever the worker
        # count): the workers ask it through StateService like any store. Made
        # before anything is bound: a node without its cluster state may not start.
        self._state = lifecycle.new_kept_state(config, audit=self.audit, metrics=own)
        self.state = sharedstate.StateService(self._state)
        self._not_after = certificate_not_after(config.tls.certificate)
        self.readiness = lifecycle.readiness(
            self._workers_problem,
            config=lambda: self.config,
            not_after=lambda: self._not_after,
        )
        self.readiness.add_check(self._stalled_workers_problem)
        lifecycle.watch_kept_state(self._state, self.readiness)
        own.track_bans(self._state.active_bans)
        own.track_certificate_expiry(lambda: self._not_after)
        # The workers' scrape-time series, at zero until a worker has written them.
        own.track_passive_ports(lambda: (0, 0))
        own.track_login_queue(lambda: 0)
        own.track_hooks(lambda: (0, 0.0))
        self.metrics = WorkerMetrics(own)
        self._lock = threading.Lock()  # reload from the admin thread vs signals
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._pending: list[Callable[[], object]] = []  # signals, for _watch
        try:
            self.explicit = lifecycle.bind_listeners(
                config.server.listen, "server.listen"
            )
            self.implicit = lifecycle.bind_listeners(
                config.server.implicit_listen, "server.implicit_listen"
            )
            self.admin = AdminServer(config.admin.socket, self)
        except BaseException:
            lifecycle.close_kept_state(self._state)
            raise
        # From here on a stop request is kept for ``run`` (the caller may announce
        # the server, and someone may signal it, before ``run`` starts).
        pending = self._pending.append
        lifecycle.install_signal_handlers(
            drain=lambda: pending(lambda: self._stop(signal.SIGTERM)),
            stop=lambda: pending(lambda: self._stop(signal.SIGINT)),
            reload=lambda: pending(self.reload_from_thread),
        )
        self.health = lifecycle.health_endpoint(config, self.metrics, self.readiness)

    # --- admin.AdminTarget

    @property
    def state_admin(self) -> StateAdmin:
        """The one state all workers are served from."""
        return self._state

    @property
    def hook_spool(self) -> SpoolAdmin:
        """Every worker's hook folder, as files (``ftps-gateway hooks``)."""
        return SpoolAdmin(spool_root(self.config))

    def reload_from_thread(self) -> list[str]:
        """Validate the config, apply what is shared here, then reload each worker."""
        with self._lock:
            # Counted here, once (the file is validated here; each worker then
            # reloads, and audits and logs its own outcome).
            return lifecycle.reload_config(
                self.config,
                self._take_over,
                audit=self.audit,
                metrics=self.metrics.own,
                tell_systemd=True,
            )

    # --- running

    def run(self) -> int:
        """Start the workers and watch them until stopped; the exit code."""
        self.metrics.open()
        try:
            for index in range(self.count):
                self._start(index)
        except BaseException:
            self.metrics.close()  # the folder never outlives a failed start
            raise
        self.admin.start()
        if self.health is not None:
            self.health.start()  # logs where it serves
        for sock in (*self.explicit, *self.implicit):
            host, port = sock.getsockname()[:2]
            logger.info("listening on %s:%s with %d workers", host, port, self.count)
        sdnotify.notify("READY=1", f"STATUS=serving with {self.count} workers")
        code = 0
        try:
            code = self._watch()
        finally:
            self._shutdown()
        return code

    def _start(self, index: int) -> None:
        supervisor_end, worker_end = sharedstate.channel_pair()
        self.state.serve(supervisor_end, index)
        fds = [sock.fileno() for sock in (*self.explicit, *self.implicit)]
        command = [
            sys.executable, "-m", "ftps_gateway", "worker",
            "--config", str(self.config.source),
            "--index", str(index), "--count", str(self.count),
            "--explicit-fds", ",".join(str(s.fileno()) for s in self.explicit),
            "--implicit-fds", ",".join(str(s.fileno()) for s in self.implicit),
            "--state-fd", str(worker_end.fileno()),
        ]  # fmt: skip
        process = subprocess.Popen(  # noqa: S603 - our own module, no shell
            command,
            pass_fds=[*fds, worker_end.fileno()],
            env={**os.environ, **self.metrics.environment()},
        )
        worker_end.close()
        self._processes[index] = process

    def _watch(self) -> int:
        while True:
            while self._pending:  # what signals asked for, outside the handler
                self._pending.pop(0)()
            for index, process in list(self._processes.items()):
                code = process.poll()
                if code is None:
                    continue
                del self._processes[index]
                self.metrics.worker_gone(process.pid)  # its counts stay, gauges go
                if self._stopping:
                    continue
                if code == EXIT_CONFIG:
                    logger.error("worker %d found the config unusable; stopping", index)
                    self._stop(signal.SIGTERM)
                    return EXIT_CONFIG
                logger.error("worker %d exited with %s; restarting it", index, code)
                self.audit.event("worker_restart", worker=index, exit_code=code)
                time.sleep(RESTART_DELAY_SECONDS)
                self._start(index)
            if self._stopping and not self._processes:
                return 0
            time.sleep(POLL_SECONDS)

    def _stop(self, signum: int) -> None:
        """SIGTERM: every worker drains; SIGINT (or SIGTERM during a drain): at once."""
        if self._stopping:
            signum = signal.SIGINT
        self._stopping = True
        lifecycle.announce_draining(self.readiness, tell_systemd=True)
        for process in list(self._processes.values()):
            if process.poll() is None:
                process.send_signal(signum)

    def _take_over(self, new: GatewayConfig) -> None:
        """Apply what is shared here, then have each worker reload on its own."""
        not_after = certificate_not_after(new.tls.certificate)
        self.config = new
        lifecycle.update_kept_state(new, self._state)
        self._not_after = not_after
        for process in list(self._processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGHUP)

    def _shutdown(self) -> None:
        for process in self._processes.values():
            process.kill()
            process.wait()
        self.admin.close()
        if self.health is not None:
            self.health.stop()
        self.metrics.close()
        lifecycle.close_kept_state(self._state)  # the node's lease, given back
        for sock in (*self.explicit, *self.implicit):
            sock.close()

    # --- readiness

    def _workers_problem(self) -> str | None:
        alive = sum(1 for p in list(self._processes.values()) if p.poll() is None)
        return None if alive == self.count else f"{alive} of {self.count} workers up"

    def _stalled_workers_problem(self) -> str | None:
        """Workers whose IO loop watchdog reports a stall (sharedstate)."""
        now = time.monotonic()
        stalls = sorted(dict(self.state.loop_stalls).items())
        if not stalls:
            return None
        return "; ".join(
            f"worker {index + 1}: IO loop stalled for {now - since:.0f} s"
            for index, since in stalls
        )


def build_worker(args: Any, config: GatewayConfig) -> GatewayServer:
    """Build one worker's GatewayServer from the fds the supervisor passed.

    Args:
        args: the ``worker`` verb's arguments.
        config: ``args.config``, loaded by the caller (for its logging settings).
    """

    def sockets(fds: str) -> list[socket.socket]:
        return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]

    _die_with_parent()
    folder = os.environ.get(ENVIRONMENT)
    if not folder or not Path(folder).is_dir():  # its counts would reach no /metrics
        raise StartupError(f"a worker needs {ENVIRONMENT} from its supervisor")
    keep_values_in(folder)  # before its GatewayMetrics: values into the files
    role = WorkerRole(
        index=args.index,
        count=args.count,
        explicit=sockets(args.explicit_fds),
        implicit=sockets(args.implicit_fds),
        channel=socket.socket(fileno=args.state_fd),
    )
    return GatewayServer(config, worker=role)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies (no orphans)."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    import ctypes  # noqa: PLC0415

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
