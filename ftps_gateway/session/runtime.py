"""The runtime context every session reads (``Gateway``) and what it needs from above.

A ``Gateway`` is immutable per configuration: reload builds a new one and swaps it in
(``GatewayHolder.current``); a session pins the one it logged in under. The service
floor builds it (``service.server.build_gateway``); this floor only describes it, with
``Protocol`` types for the parts that live above (the loop waker, the sessions).
"""

from __future__ import annotations

import socket
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ftps_gateway.policy.passivenames import PassiveNames
from ftps_gateway.session.admission import UnauthenticatedPool
from ftps_gateway.session.events import NO_HOOKS
from ftps_gateway.session.quota import QuotaWalks

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import GatewayConfig
    from ftps_gateway.metrics.gateway import GatewayMetrics
    from ftps_gateway.policy.netpolicy import (
        AccessList,
        PassiveAddressPolicy,
        TLSPolicyTable,
    )
    from ftps_gateway.policy.passwords import PasswordVerifier, RecentLogins
    from ftps_gateway.session.events import HookSink
    from ftps_gateway.session.loginqueue import LoginQueue
    from ftps_gateway.session.state import SharedState
    from ftps_gateway.session.work import FileWork
    from ftps_gateway.tls.contexts import TicketRefresher, TLSContextFactory


class Waker(Protocol):
    """Runs a callback on the IO loop from any thread (``ftp.loop.LoopWaker``)."""

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None: ...


class SessionHandle(Protocol):
    """What the service floor (the drain) and admission ask of a control session."""

    def transfer_in_progress(self) -> bool: ...
    def close_for_shutdown(self) -> None: ...
    def evict(self) -> None:
        """Close a connection that has not logged in, to make room (421)."""
        ...


class PortsInUse:
    """How many passive listeners are open now, in all, per user and per address.

    The total is for metrics and readiness; the per-user and per-address counts cap
    what one account or one client address may hold (``refusal``). Changed on the IO
    loop only; ``count`` is read from the metrics thread (an int read is atomic).
    """

    def __init__(self) -> None:
        self.count = 0
        self._by_user: dict[str, int] = {}
        self._by_address: dict[str, int] = {}

    def refusal(self, user: str, address: str, caps: tuple[int, int]) -> str | None:
        """Why ``user`` from ``address`` may not open one more (caps: user, address)."""
        if self._by_user.get(user, 0) >= caps[0]:
            return "passive-limit-per-user"
        if self._by_address.get(address, 0) >= caps[1]:
            return "passive-limit-per-ip"
        return None

    def take(self, user: str, address: str) -> None:
        """A listener for ``user`` from ``address`` opened."""
        self.count += 1
        self._by_user[user] = self._by_user.get(user, 0) + 1
        self._by_address[address] = self._by_address.get(address, 0) + 1

    def give_back(self, user: str, address: str) -> None:
        """That listener closed (exactly once per ``take``)."""
        self.count -= 1
        for counts, key in ((self._by_user, user), (self._by_address, address)):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)


# argon2id threads. Each verification holds its memory cost (64 MiB with the default
# parameters) while it runs, so this also bounds login memory.
PASSWORD_WORKERS = 2


@dataclass
class Gateway:
    """What the sessions under one configuration share.

    The first group is rebuilt from the config on reload; the second is the
    server's own and carried over to each new ``Gateway``.
    """

    config: GatewayConfig
    tls: TLSContextFactory
    tls_policies: TLSPolicyTable
    passive_policy: PassiveAddressPolicy
    access: AccessList
    proxy_sources: AccessList | None  # None: no PROXY protocol anywhere
    recent_logins: RecentLogins  # per config: a reload forgets them

    verifier: PasswordVerifier
    login_queue: LoginQueue  # password verifications: bounded, fair (loginqueue)
    waker: Waker
    audit: AuditLog
    # Bans, login slots, quota reservations: in this process, or the supervisor's
    # (session.state). Uploads reserve quota through ``gateway.state.reserve``.
    state: SharedState
    metrics: GatewayMetrics
    passive_ports: PortsInUse
    tickets: TicketRefresher
    file_work: FileWork  # slow file work off the loop (session.work)
    hooks: HookSink = NO_HOOKS  # [[hooks]] events: spooled, delivered (service.hooks)
    # Recent quota walks of this process, reused by its uploads (session.quota).
    quota_walks: QuotaWalks = field(default_factory=QuotaWalks)
    # Addresses of passive DNS names, looked up off the loop (policy.passivenames).
    passive_names: PassiveNames = field(default_factory=PassiveNames)

    @property
    def node_name(self) -> str:
        """``server.node_name``, or the host name."""
        return self.config.server.node_name or socket.gethostname()


# The server's own parts of a Gateway, carried over by a reload.
SHARED_PARTS = (
    "verifier", "login_queue", "waker", "audit", "state", "metrics",
    "passive_ports", "tickets", "file_work", "hooks", "quota_walks",
    "passive_names",
)  # fmt: skip


@dataclass
class GatewayHolder:
    """The current ``Gateway`` (swapped on reload) and the server's session state."""

    current: Gateway
    # Admitted control sessions, for the drain; weak, so a session that is gone is
    # never kept alive by this set.
    sessions: weakref.WeakSet[SessionHandle] = field(default_factory=weakref.WeakSet)
    draining: bool = False
    # Connections of this process that have not logged in yet (server.max_unauth...).
    unauthenticated: UnauthenticatedPool = field(default_factory=UnauthenticatedPool)
    worker: tuple[int, int] = (0, 1)  # (index, count): this process's passive share
