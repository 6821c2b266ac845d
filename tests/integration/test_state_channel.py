"""The supervisor's channel over a real socket pair: exact limits across workers,
bans replicated, a dead worker's holdings released, nothing waited for.

A real ``StateService`` (the supervisor's side, with its own threads) sits at one end
of a ``SOCK_SEQPACKET`` pair and a ``ChannelState`` (a worker's side) at the other,
driven here instead of by an IO loop: each message the worker end receives is handed
to ``handle_message``. (The same over real worker processes: test_workers.py.)
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest

from ftps_gateway.service import sharedstate
from ftps_gateway.service.sharedstate import ChannelState, StateService
from ftps_gateway.session.state import (
    LIMIT_TOTAL,
    LocalState,
    LoginSlot,
    QuotaMark,
)
from support.state import Answers, answered, claim, local_state, settings

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.integration


class Worker:
    """A worker's ``ChannelState``, fed by hand instead of by an IO loop."""

    def __init__(self, service: StateService, index: int) -> None:
        supervisor_end, worker_end = sharedstate.channel_pair()
        service.serve(supervisor_end, index)
        self.lost: list[bool] = []
        self.state = ChannelState(
            worker_end, settings(), on_lost=lambda: self.lost.append(True)
        )
        self.state.sync(timeout=10)

    def pump(self, until: Callable[[], bool], timeout: float = 10) -> None:
        """Hand messages to the state until ``until()`` (or fail after timeout)."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "no answer from the supervisor"
            ready, _, _ = select.select([self.state.conn], [], [], 0.1)
            if ready:
                self.state.handle_message(self.state.conn.recv(1 << 20))

    def ask(self, call: Callable[[Answers], None]) -> Any:
        """Make one request and wait for its answer."""
        answers = Answers()
        call(answers)
        self.pump(lambda: bool(answers.values))
        return answers.values[0]

    def close(self) -> None:
        self.state.conn.close()


@pytest.fixture
def service() -> tuple[LocalState, StateService]:
    """A supervisor's state service (its threads end with their channels)."""
    store = local_state(total=100, per_ip=100, per_user=2)
    return store, StateService(store)


def _until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_two_workers_never_both_take_the_last_slot(
    service: tuple[LocalState, StateService],
) -> None:
    """Logins asked at once by two workers: exactly the limit is granted."""
    store, supervisor = service
    one, two = Worker(supervisor, 0), Worker(supervisor, 1)
    answers: list[list[str | None]] = [[], []]
    for _ in range(3):
        one.state.login(LoginSlot("192.0.2.1", "acme"), answers[0].append)
        two.state.login(LoginSlot("192.0.2.2", "acme"), answers[1].append)
    one.pump(lambda: len(answers[0]) == 3)
    two.pump(lambda: len(answers[1]) == 3)
    granted = [a for side in answers for a in side if a is None]
    assert len(granted) == 2
    assert store.snapshot().per_user == {"acme": 2}
    one.close()
    two.close()


def test_a_closed_channel_releases_what_its_worker_held(
    service: tuple[LocalState, StateService],
) -> None:
    """The supervisor gives back a dead worker's slots and reservations."""
    store, supervisor = service
    dead, alive = Worker(supervisor, 0), Worker(supervisor, 1)
    assert (
        dead.ask(lambda a: dead.state.login(LoginSlot("192.0.2.1", "acme"), a)) is None
    )
    assert dead.ask(lambda a: dead.state.reserve("up1", [claim(900)], a)) is None
    assert alive.ask(lambda a: alive.state.reserve("up1", [claim(200)], a)) == (
        "user acme"
    )
    dead.close()  # as SIGKILL would
    _until(lambda: store.snapshot() == (0, {}, {}) and not store.reservations())
    assert alive.ask(lambda a: alive.state.reserve("up1", [claim(200)], a)) is None
    alive.state.release("up1", {"user acme": (200, 1)})
    alive.pump(lambda: not store.reservations())
    assert store.snapshot().sessions == 0
    alive.close()


def test_bans_reach_every_worker_replica(
    service: tuple[LocalState, StateService],
) -> None:
    """A ban scored through one worker reaches the other's replica; a worker that
    starts later gets it in its first list; a lift reaches both."""
    store, supervisor = service
    one, two = Worker(supervisor, 0), Worker(supervisor, 1)
    bans = [
        one.ask(lambda a: one.state.record_failure("2001:db8::1", a)) for _ in "abc"
    ]
    assert bans[:2] == [None, None]
    assert bans[2] is not None
    assert bans[2].ip == "2001:db8::/64"
    two.pump(lambda: two.state.is_banned("2001:db8::55"))
    late = Worker(supervisor, 2)
    assert late.state.is_banned("2001:db8::56")
    assert not late.state.is_banned("2001:db8::7")  # safe
    assert store.remove_ban("2001:db8::/64")
    for worker in (one, two, late):
        worker.pump(lambda w=worker: not w.state.is_banned("2001:db8::55"))
        worker.close()


def test_quota_marks_and_commits_through_the_channel(
    service: tuple[LocalState, StateService],
) -> None:
    """Marks read and commits made by one worker count for another's reservation."""
    store, supervisor = service
    one, two = Worker(supervisor, 0), Worker(supervisor, 1)
    mark = two.ask(lambda a: two.state.quota_marks(["user acme"], a))["user acme"]
    assert one.ask(lambda a: one.state.reserve("x", [claim(400, files=1)], a)) is None
    one.state.release("x", {"user acme": (400, 1)})
    _until(
        lambda: (
            answered(store.quota_marks, ["user acme"])["user acme"] == QuotaMark(400, 1)
        )
    )
    late = claim(601, mark=mark)
    assert two.ask(lambda a: two.state.reserve("y", [late], a)) == "user acme"
    one.close()
    two.close()


def test_a_worker_request_never_waits_for_the_answer() -> None:
    """Without anyone answering, a request returns at once; when the supervisor
    is gone, what waits is answered failing closed and the worker is stopped."""
    supervisor_end, worker_end = sharedstate.channel_pair()
    supervisor_end.send(b'{"bans":[],"replace":true,"synced":true}')
    lost: list[bool] = []
    state = ChannelState(worker_end, settings(), on_lost=lambda: lost.append(True))
    state.sync(timeout=5)
    answers = Answers()
    started = time.monotonic()
    state.login(LoginSlot("192.0.2.1", "acme"), answers)
    state.reserve("r", [claim(1)], answers)
    assert time.monotonic() - started < 5  # returned; nothing was answered
    assert answers.values == []
    assert supervisor_end.recv(1 << 16).startswith(b'{"ops":[["login",')
    supervisor_end.close()
    state.lost()
    assert answers.values == [LIMIT_TOTAL, "user acme"]
    assert lost == [True]
    assert state.is_banned("192.0.2.1")  # fails closed
    state.login(LoginSlot("192.0.2.1", "acme"), answers)
    assert answers.values[-1] == LIMIT_TOTAL


def test_many_requests_leave_in_messages_a_socket_takes() -> None:
    """A burst larger than one message is split (SOCK_SEQPACKET keeps each whole)."""
    supervisor_end, worker_end = sharedstate.channel_pair()
    supervisor_end.send(b'{"synced":true}')
    state = ChannelState(worker_end, settings(), on_lost=lambda: None)
    state.sync(timeout=5)
    flushes: list[Callable[[], None]] = []

    class Port:
        queued = 0

        def send_message(self, data: bytes) -> None:
            worker_end.send(data)

        def close(self) -> None:
            worker_end.close()

    state.attach(Port(), flushes.append)
    for index in range(1200):
        state.logout(LoginSlot("192.0.2.1", f"user{index}"))
    assert len(flushes) == 1  # one flush for the whole turn of the loop
    flushes[0]()
    sizes = []
    supervisor_end.settimeout(5)
    while sum(sizes) < 1200:
        sizes.append(len(_ops(supervisor_end.recv(1 << 20))))
    assert sizes == [500, 500, 200]
    supervisor_end.close()
    worker_end.close()


def _ops(data: bytes) -> list[Any]:
    return list(json.loads(data)["ops"])


def test_socket_pair_is_seqpacket() -> None:
    """Message boundaries are the kernel's (one JSON document per message)."""
    supervisor_end, worker_end = sharedstate.channel_pair()
    assert supervisor_end.type == socket.SOCK_SEQPACKET
    supervisor_end.close()
    worker_end.close()
