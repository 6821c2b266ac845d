"""Passive DNS names are looked up in threads of their own: the PASV path never waits.

The resolver here blocks on an event the test holds, standing in for a DNS server
that does not answer (``getaddrinfo`` then waits up to 10 s by default).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ftps_gateway.config import PassiveSettings
from ftps_gateway.policy.netpolicy import PassiveAddressError, PassiveAddressPolicy
from ftps_gateway.policy.passivenames import PassiveNames

NAME = "ftp.example.test"
WAIT = 10.0  # generous: a slow CI machine must not fail these on timing


class HeldResolver:
    """Answers only when the test releases it; counts lookups and their threads."""

    def __init__(self, answer: str = "192.0.2.9") -> None:
        self.answer = answer
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.calls = 0
        self.threads: set[str] = set()
        self.failing = False

    def __call__(self, name: str) -> str:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        self.started.release()
        assert self.release.wait(WAIT), "the test never released the resolver"
        if self.failing:
            raise socket.gaierror(
                socket.EAI_AGAIN, "Temporary failure in name resolution"
            )
        return self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def policy_for(names: PassiveNames) -> PassiveAddressPolicy:
    return PassiveAddressPolicy(
        PassiveSettings(port_min=60000, port_max=60099, address=NAME), names=names
    )


def test_first_pasv_before_the_answer_is_refused_at_once_not_delayed() -> None:
    """While the first lookup hangs, a PASV gets PassiveAddressError immediately
    (the caller never waits for DNS); once it answers, the address is used."""
    resolver = HeldResolver()
    policy = policy_for(PassiveNames(resolver=resolver))
    assert resolver.started.acquire(timeout=WAIT)  # the policy started the lookup
    began = time.monotonic()
    with pytest.raises(PassiveAddressError, match="first lookup is still running"):
        policy.address_for("8.8.8.8", "127.0.0.1")
    assert time.monotonic() - began < WAIT / 2  # it did not wait for the resolver
    resolver.release.set()
    wait_until(lambda: _answers(policy), "the address never arrived")
    assert policy.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    assert resolver.calls == 1
    assert resolver.threads == {"passive-dns"}


def _answers(policy: PassiveAddressPolicy) -> bool:
    try:
        policy.address_for("8.8.8.8", "127.0.0.1")
    except PassiveAddressError:
        return False
    return True


def test_expired_address_is_served_while_one_lookup_refreshes_it() -> None:
    """After the TTL the old address keeps being answered at once while a single
    lookup (however many PASVs ask) fetches the new one."""
    resolver, clock = HeldResolver(), Clock()
    resolver.release.set()
    names = PassiveNames(resolver=resolver, clock=clock, ttl_seconds=30)
    names.prefetch([NAME])
    wait_until(lambda: names.known(NAME), "first lookup")
    resolver.release.clear()
    resolver.answer = "192.0.2.77"
    clock.now += 31
    for _ in range(50):  # 50 PASVs while DNS hangs
        assert names.address(NAME) == "192.0.2.9"
    assert resolver.started.acquire(timeout=WAIT)
    assert resolver.calls == 2  # one refresh, not fifty
    resolver.release.set()
    wait_until(lambda: names.address(NAME) == "192.0.2.77", "refresh never landed")
    assert resolver.calls == 2


def test_failed_refresh_keeps_the_last_good_address() -> None:
    """A refresh that fails keeps answering the last good address for another TTL."""
    resolver, clock = HeldResolver(), Clock()
    resolver.release.set()
    names = PassiveNames(resolver=resolver, clock=clock, ttl_seconds=30)
    names.prefetch([NAME])
    wait_until(lambda: names.known(NAME), "first lookup")
    resolver.failing = True
    clock.now += 31
    assert names.address(NAME) == "192.0.2.9"
    wait_until(lambda: resolver.calls == 2 and not names._running, "refresh")
    clock.now += 29  # within the extended TTL: no new lookup
    assert names.address(NAME) == "192.0.2.9"
    assert resolver.calls == 2


def test_reload_with_the_same_cache_keeps_the_address() -> None:
    """A new policy (a reload) sharing the server's cache answers at once."""
    resolver = HeldResolver()
    resolver.release.set()
    names = PassiveNames(resolver=resolver)
    first = policy_for(names)
    wait_until(lambda: _answers(first), "first lookup")
    resolver.release.clear()  # DNS hangs from now on
    second = policy_for(names)
    assert second.address_for("8.8.8.8", "127.0.0.1") == "192.0.2.9"
    assert resolver.calls == 1
