"""DNS names of passive addresses, resolved off the IO loop.

A ``[passive]`` address may be a DNS name (a dynamic public address behind NAT).
Its 227 reply needs an IPv4 address at once, on the IO loop, where a DNS lookup
must never run: ``getaddrinfo`` waits for the resolver, up to its timeout times
its attempts (5 s x 2 by default) when DNS is down, and every session of the
worker would wait with it. So a name is resolved in a thread of its own, never
by the caller:

- when a policy that uses it is built (start-up, reload), so the address is known
  by the first PASV;
- when its address has aged past the TTL: the caller keeps getting the old address
  while the new lookup runs (stale while revalidating), never a wait;
- at most one lookup per name at a time, so the threads are bounded by the names
  in the configuration however many PASVs arrive.

A failed lookup keeps the last good address for another TTL (and logs it); a name
that never resolved has no address, and the caller refuses the PASV until one
arrives (``UnresolvedNameError``); each later PASV starts a new lookup if none is
running. The cache is the server's own (carried across reloads), so a reload
that keeps a name keeps its address.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "DEFAULT_DNS_TTL_SECONDS",
    "PassiveNames",
    "UnresolvedNameError",
    "resolve_ipv4",
    "run_in_thread",
]

_log = logging.getLogger(__name__)

DEFAULT_DNS_TTL_SECONDS = 30.0


class UnresolvedNameError(Exception):
    """A name has no address yet: its lookups failed, or the first is running."""


def resolve_ipv4(name: str) -> str:
    """Resolve ``name`` to its first IPv4 address with ``getaddrinfo`` (blocking).

    Raises:
        OSError: (``socket.gaierror``) the name does not resolve to an IPv4 address.
    """
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no IPv4 address")
    return str(infos[0][4][0])


def run_in_thread(job: Callable[[], None]) -> None:
    """Run ``job`` in a daemon thread (a lookup must not keep the process alive)."""
    threading.Thread(target=job, name="passive-dns", daemon=True).start()


@dataclass
class _Entry:
    address: str
    expires_at: float


class PassiveNames:
    """The addresses of passive DNS names, refreshed in the background."""

    def __init__(
        self,
        *,
        resolver: Callable[[str], str] = resolve_ipv4,
        clock: Callable[[], float] = time.monotonic,
        ttl_seconds: float = DEFAULT_DNS_TTL_SECONDS,
        run: Callable[[Callable[[], None]], None] = run_in_thread,
    ) -> None:
        """Args:
        resolver: name -> dotted IPv4 address, blocking; raises OSError on failure.
        clock: monotonic seconds, for the TTL.
        ttl_seconds: how long a resolved address is used before it is looked up
            again (the old one is still used while that lookup runs).
        run: starts a lookup away from the caller (a thread; tests pass one that
            runs it at once).
        """
        self._resolver = resolver
        self._clock = clock
        self._ttl = ttl_seconds
        self._run = run
        self._lock = threading.Lock()  # held for dictionary work only, never a lookup
        self._entries: dict[str, _Entry] = {}
        self._running: set[str] = set()
        self._last_error: dict[str, str] = {}

    def prefetch(self, names: Iterable[str]) -> None:
        """Start a lookup of each name that has no current address."""
        for name in names:
            self._refresh_if_due(name)

    def known(self, name: str) -> bool:
        """Has a lookup of ``name`` succeeded (its address may be getting old)?"""
        with self._lock:
            return name in self._entries

    def address(self, name: str) -> str:
        """The address of ``name`` now, without waiting for DNS.

        Raises:
            UnresolvedNameError: no lookup of ``name`` has succeeded yet.
        """
        self._refresh_if_due(name)
        with self._lock:
            entry = self._entries.get(name)
            problem = self._last_error.get(name, "its first lookup is still running")
        if entry is None:
            raise UnresolvedNameError(problem)
        return entry.address

    def _refresh_if_due(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and self._clock() < entry.expires_at:
                return
            if name in self._running:
                return
            self._running.add(name)
        try:
            self._run(lambda: self._lookup(name))
        except BaseException:  # no thread could start (RuntimeError): retry next time
            with self._lock:
                self._running.discard(name)
            raise

    def _lookup(self, name: str) -> None:
        """In the lookup's thread: resolve, then store the answer or the failure."""
        try:
            address = self._checked(self._resolver(name))
        except (OSError, UnicodeError, ValueError) as exc:
            self._failed(name, exc)
        else:
            with self._lock:
                self._entries[name] = _Entry(address, self._clock() + self._ttl)
                self._last_error.pop(name, None)
        finally:
            with self._lock:
                self._running.discard(name)

    def _failed(self, name: str, exc: BaseException) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:  # not cached: the next PASV starts another lookup
                self._last_error[name] = f"does not resolve: {exc}"
                return
            entry.expires_at = self._clock() + self._ttl  # no lookup storm
        _log.warning(
            "passive address %r does not resolve (%s); reusing %s",
            name,
            exc,
            entry.address,
        )

    @staticmethod
    def _checked(answer: str) -> str:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            raise ValueError("resolver did not return an IPv4 address") from None
        if not isinstance(address, ipaddress.IPv4Address):
            raise ValueError("resolver did not return an IPv4 address")  # noqa: TRY004
        return str(address)
