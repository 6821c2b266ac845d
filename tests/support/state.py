"""Driving the shared state (``session.state``) by hand: a fake clock, settings,
quota claims, and callbacks that collect what ``done`` receives.

Imports only ``ftps_gateway``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ftps_gateway.config import DefenderSettings
from ftps_gateway.session.state import (
    LocalState,
    LoginSlot,
    QuotaClaim,
    QuotaMark,
    StateSettings,
)

DEFENDER = DefenderSettings(
    max_failures=3, window_seconds=60, ban_seconds=100, max_ban_seconds=350
)
SAFE = (ipaddress.ip_network("2001:db8::7"),)  # never banned


class Clock:
    """Monotonic and wall time that only move when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        """Wall-clock time that moves with ``now``."""
        return 1_700_000_000.0 + self.now


class Answers:
    """A ``done`` callback that keeps what it receives."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> None:
        self.values.append(value)


def settings(total: int = 10, per_ip: int = 10, per_user: int = 10) -> StateSettings:
    """Defender ``DEFENDER``, ``SAFE`` networks, /64 keys, these login limits."""
    return StateSettings(DEFENDER, SAFE, 64, total, per_ip, per_user)


def local_state(clock: Clock | None = None, **limits: int) -> LocalState:
    """A ``LocalState`` on ``clock`` (a fresh one if None)."""
    clock = clock or Clock()
    return LocalState(settings(**limits), clock=clock, wall_clock=clock.wall)


def claim(
    nbytes: int,
    *,
    walked: int = 0,
    mark: QuotaMark | None = None,
    files: int = 0,
    scope: str = "user acme",
    max_bytes: int | None = 1000,
    max_files: int | None = None,
    walked_files: int = 0,
) -> QuotaClaim:
    """A claim of ``nbytes`` on ``scope`` (1,000 bytes, any files, by default)."""
    return QuotaClaim(
        scope, max_bytes, max_files, walked, walked_files,
        mark or QuotaMark(0, 0), nbytes, files,
    )  # fmt: skip


def answered(call: Any, *args: Any) -> Any:
    """Call ``call(*args, done)`` on a state that answers at once; the answer."""
    answers = Answers()
    call(*args, answers)
    (answer,) = answers.values
    return answer


def login(state: Any, address: str, user: str) -> str | None:
    """``state.login`` of that slot, answered at once."""
    return answered(state.login, LoginSlot(address, user))  # type: ignore[no-any-return]
