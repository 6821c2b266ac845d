"""Build a running gateway from a validated config: listeners, loop, workers, homes.

pyftpdlib keeps all settings in class attributes, so any change is global. Each
``GatewayServer`` therefore builds its own handler subclass that carries a ``Gateway``
(the runtime objects sessions share), and its own IO loop: two servers in one process
(as in the tests) never see each other's settings.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

from ftps_gateway.audit import AuditLog
from ftps_gateway.authorizer import GatewayAuthorizer
from ftps_gateway.errors import StartupError
from ftps_gateway.filesystem import sweep_partials
from ftps_gateway.handler import ControlHandler, DataHandler
from ftps_gateway.loopwaker import LoopWaker
from ftps_gateway.mounts import sweep_roots
from ftps_gateway.netpolicy import PassiveAddressPolicy
from ftps_gateway.passwords import PasswordVerifier
from ftps_gateway.tls import TLSContextFactory

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.config import GatewayConfig

logger = logging.getLogger("ftps_gateway")

# How often expired partial uploads are looked for (at most; see _start_sweeper).
SWEEP_INTERVAL_SECONDS = 600

# argon2id threads. Each verification holds its memory cost (64 MiB with the default
# parameters) while it runs, so this also bounds login memory.
PASSWORD_WORKERS = 2


@dataclass
class Gateway:
    """What every session of one server shares."""

    config: GatewayConfig
    tls: TLSContextFactory
    passive_policy: PassiveAddressPolicy
    verifier: PasswordVerifier
    executor: ThreadPoolExecutor
    waker: LoopWaker
    audit: AuditLog

    def home_for(self, username: str) -> Path:
        """``<storage.root>/home/<user>``."""
        return home_dir(self.config, username)


def home_dir(config: GatewayConfig, username: str) -> Path:
    """Where ``username``'s home lives: ``<storage.root>/home/<user>``."""
    return config.storage.root / "home" / username


def prepare_homes(config: GatewayConfig) -> None:
    """Create every user's home (mode 0750, parents included) if missing."""
    try:
        for user in config.users:
            if user.home:  # other folders are created at login (they may hold {user})
                home_dir(config, user.name).mkdir(
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
    ) -> None:
        self.config = config
        prepare_homes(config)
        self.ioloop = IOLoop()
        tls_factory = TLSContextFactory(config.tls)
        self.gateway = Gateway(
            config=config,
            tls=tls_factory,
            passive_policy=PassiveAddressPolicy(config.passive),
            verifier=verifier or PasswordVerifier(),
            executor=ThreadPoolExecutor(PASSWORD_WORKERS, thread_name_prefix="argon2"),
            waker=LoopWaker(self.ioloop),
            audit=audit or AuditLog(),
        )
        self.handler_class = build_handler_class(self.gateway)
        self.listeners: list[FTPServer] = []
        try:
            for listen in config.server.listen:
                listener = FTPServer(
                    (listen.host, listen.port), self.handler_class, ioloop=self.ioloop
                )
                listener.max_cons = config.server.max_sessions
                self.listeners.append(listener)
        except OSError as err:
            self._release()
            raise StartupError(
                f"server.listen: cannot listen on {listen.host}:{listen.port}: "
                f"{err.strerror}"
            ) from err
        self._stopped = threading.Event()
        self._start_sweeper()

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
        """The bound (host, port) of each listener (useful with port 0)."""
        return [(server.address[0], server.address[1]) for server in self.listeners]

    def serve_forever(self) -> None:
        """Run the IO loop until ``stop``."""
        for host, port in self.addresses:
            logger.info("listening for explicit FTPS on %s:%s", host, port)
        try:
            self.ioloop.loop()
        finally:
            self._release()
            self._stopped.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Close every connection and end ``serve_forever``; safe from any thread."""
        self.gateway.waker.call_soon_threadsafe(self.ioloop.close)
        self._stopped.wait(timeout)

    def _release(self) -> None:
        self.gateway.executor.shutdown(wait=False, cancel_futures=True)
        self.gateway.tls.close()
        if self.ioloop.socket_map:
            self.ioloop.close()


def build_handler_class(gateway: Gateway) -> type[ControlHandler]:
    """A ControlHandler subclass carrying this server's settings (never global)."""
    settings = gateway.config.server
    data_class: type[Any] = type(
        "GatewayDataHandler", (DataHandler,), {"timeout": settings.idle_timeout_seconds}
    )
    attributes: dict[str, Any] = {
        "gateway": gateway,
        "authorizer": GatewayAuthorizer(
            frozenset(u.name for u in gateway.config.users)
        ),
        "banner": settings.banner,
        "timeout": settings.idle_timeout_seconds,
        "dtp_handler": data_class,
    }
    return type("GatewayControlHandler", (ControlHandler,), attributes)
