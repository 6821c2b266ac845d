"""The login queue: turns, bounds and the failure charge, on real threads.

The "loop" here is the test thread: the queue's threads hand results back through a
waker that queues callbacks, and the test runs them, as the IO loop would. Each
verification blocks until the test releases it, so the order of turns is exact.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ftps_gateway.config import DefenderSettings
from ftps_gateway.session.loginqueue import (
    ADDRESS_FULL,
    BANNED,
    QUEUE_FULL,
    FailureBudget,
    LoginQueue,
    Verdict,
)
from ftps_gateway.session.state import LocalState, StateSettings

BUDGET = FailureBudget(max_failures=3, window_seconds=60)
UNLIMITED = FailureBudget(max_failures=None, window_seconds=60)
WAIT_SECONDS = 10


class Loop:
    """A waker whose callbacks run when the test says so (the IO loop's part)."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], object]] = queue.Queue()

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self.calls.put(callback)

    def run_until(self, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not predicate():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the queue never got there"
            self.calls.get(timeout=remaining)()


class Passwords:
    """Verifications that block until released; records the order they started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._gates: dict[str, threading.Event] = {}
        self._results: dict[str, bool] = {}
        self.verdicts: dict[str, Verdict] = {}
        self.cache: set[str] = set()  # keys whose password the "cache" knows

    def submit(
        self,
        login_queue: LoginQueue,
        name: str,
        *,
        key: str | None = None,
        accept: bool = False,
        budget: FailureBudget = BUDGET,
    ) -> object:
        """Queue attempt ``name`` (its key is the part before the dot)."""
        key = key or name.split(".", maxsplit=1)[0]
        gate = self._gates[name] = threading.Event()
        self._results[name] = accept

        def verify() -> bool:
            self.started.append(name)
            assert gate.wait(WAIT_SECONDS)
            if accept:
                self.cache.add(key)
            return accept

        def done(verdict: Verdict) -> None:
            self.verdicts[name] = verdict

        return login_queue.submit(
            key, budget, verify=verify, cached=lambda: key in self.cache, done=done
        )

    def release_all(self) -> None:
        """Let every verification end (teardown: no thread left blocked)."""
        for gate in self._gates.values():
            gate.set()

    def release(self, loop: Loop, name: str) -> Verdict:
        """Let verification ``name`` end; run the loop until its verdict is in."""
        self._gates[name].set()
        loop.run_until(lambda: name in self.verdicts)
        return self.verdicts[name]


class Bans:
    """The real in-process state behind the queue's interface, counting what it is
    told (``LocalState`` answers ``record_failure`` before it returns)."""

    def __init__(self, max_failures: int = 3) -> None:
        settings = DefenderSettings(
            max_failures=max_failures, window_seconds=60, ban_seconds=100
        )
        self.state = LocalState(
            StateSettings(
                defender=settings, safe=(), ipv6_prefix=64, max_sessions=10,
                max_sessions_per_ip=10, max_sessions_per_user=10,
            )
        )  # fmt: skip
        self.reported: list[str] = []

    def is_banned(self, address: str) -> bool:
        return self.state.is_banned(address)

    def record_failure(self, address: str, done: Callable[[object], None]) -> None:
        self.reported.append(address)
        self.state.record_failure(address, done)


@pytest.fixture
def loop() -> Loop:
    return Loop()


@pytest.fixture
def bans() -> Bans:
    return Bans()


@pytest.fixture
def passwords() -> Iterator[Passwords]:
    made = Passwords()
    yield made
    made.release_all()


@pytest.fixture
def make_queue(loop: Loop, bans: Bans) -> Iterator[Callable[..., LoginQueue]]:
    made: list[LoginQueue] = []

    def make(**options: int) -> LoginQueue:
        login_queue = LoginQueue(loop, bans, **{"threads": 1, **options})  # type: ignore[arg-type]
        made.append(login_queue)
        return login_queue

    yield make
    for login_queue in made:
        login_queue.shutdown()


def test_keys_take_turns_so_a_key_waits_behind_one_attempt_per_other_key(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """Three attempts of one address and one each of two others: round robin."""
    login_queue = make_queue()
    for name in ("a.1", "a.2", "a.3", "b.1", "c.1"):
        passwords.submit(login_queue, name, budget=UNLIMITED)
    for name in ("a.1", "b.1", "c.1", "a.2", "a.3"):
        passwords.release(loop, name)
    assert passwords.started == ["a.1", "b.1", "c.1", "a.2", "a.3"]
    assert login_queue.waiting == 0


def test_past_the_bound_new_attempts_are_refused(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """One running and two waiting fill a queue of two: the fourth key is refused."""
    login_queue = make_queue(max_waiting=2)
    for name in ("a.1", "b.1", "c.1", "d.1"):
        passwords.submit(login_queue, name)
    assert passwords.verdicts["d.1"] == Verdict(False, False, reason=QUEUE_FULL)
    assert login_queue.waiting == 2
    for name in ("a.1", "b.1", "c.1"):
        passwords.release(loop, name)
    assert passwords.started == ["a.1", "b.1", "c.1"]


def test_a_full_queue_makes_room_for_a_new_key_from_the_longest_line(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """A new key takes the place of the newest attempt of the key with the most
    waiting; a key that already waits gets no second place in a full queue."""
    login_queue = make_queue(max_waiting=2)
    for name in ("a.1", "a.2", "a.3", "b.1"):
        passwords.submit(login_queue, name, budget=UNLIMITED)
    assert passwords.verdicts["a.3"] == Verdict(False, False, reason=QUEUE_FULL)
    passwords.submit(login_queue, "b.2", budget=UNLIMITED)
    passwords.submit(login_queue, "c.1", budget=UNLIMITED)
    assert passwords.verdicts["b.2"].reason == QUEUE_FULL
    assert passwords.verdicts["c.1"].reason == QUEUE_FULL  # nobody waits twice now
    for name in ("a.1", "b.1", "a.2"):
        passwords.release(loop, name)
    assert passwords.started == ["a.1", "b.1", "a.2"]


def test_attempts_in_flight_never_exceed_the_failures_left_before_a_ban(
    loop: Loop, passwords: Passwords, bans: Bans, make_queue: Callable[..., LoginQueue]
) -> None:
    """With 3 failures to a ban, one address gets 3 attempts in, then each verified
    failure uses one up: the ban comes with the third, and nothing more ran."""
    login_queue = make_queue()
    for name in ("a.1", "a.2", "a.3", "a.4"):
        passwords.submit(login_queue, name)
    assert passwords.verdicts["a.4"] == Verdict(False, False, reason=ADDRESS_FULL)
    first = passwords.release(loop, "a.1")
    assert (first.verified, first.ban) == (True, None)
    passwords.submit(login_queue, "a.5")  # 1 failed + 2 pending: still no room
    assert passwords.verdicts["a.5"].reason == ADDRESS_FULL
    passwords.release(loop, "a.2")
    third = passwords.release(loop, "a.3")
    assert third.ban is not None
    assert third.ban.ip == "a"
    assert bans.reported == ["a", "a", "a"]
    assert passwords.started == ["a.1", "a.2", "a.3"]
    assert login_queue.is_banned("a")


def test_an_address_banned_while_it_waits_is_not_verified(
    loop: Loop, passwords: Passwords, bans: Bans, make_queue: Callable[..., LoginQueue]
) -> None:
    """A ban from elsewhere (another worker, another session) reaches waiting attempts."""
    login_queue = make_queue()
    passwords.submit(login_queue, "x.1")
    passwords.submit(login_queue, "a.1")
    for _ in range(3):
        bans.state.record_failure("a", lambda _ban: None)
    passwords.release(loop, "x.1")
    assert passwords.verdicts["a.1"] == Verdict(False, False, reason=BANNED)
    assert passwords.started == ["x.1"]


def test_a_known_partner_goes_before_unknown_addresses(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """A key that logged in before is served before every unknown key waiting."""
    login_queue = make_queue()
    login_queue.succeeded("partner")
    for name in ("a.1", "b.1", "c.1"):
        passwords.submit(login_queue, name)
    passwords.submit(login_queue, "partner.1", accept=True)
    passwords.release(loop, "a.1")
    passwords.release(loop, "partner.1")
    assert passwords.started[:2] == ["a.1", "partner.1"]
    assert login_queue.is_known("partner")


def test_a_failure_makes_a_known_key_unknown_again(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """Priority is for partners who log in, not for whoever shares their address."""
    login_queue = make_queue()
    login_queue.succeeded("partner")
    passwords.submit(login_queue, "partner.1", accept=False)
    passwords.release(loop, "partner.1")
    assert not login_queue.is_known("partner")


def test_a_known_key_takes_an_unknown_keys_place_in_a_full_queue(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """Unknown keys filling the queue one attempt each cannot lock a partner out."""
    login_queue = make_queue(max_waiting=2)
    login_queue.succeeded("partner")
    for name in ("a.1", "b.1", "c.1", "partner.1"):
        passwords.submit(login_queue, name)
    assert passwords.verdicts["c.1"].reason == QUEUE_FULL  # the newest unknown one
    assert "partner.1" not in passwords.verdicts
    for name in ("a.1", "partner.1", "b.1"):
        passwords.release(loop, name)
    assert passwords.started == ["a.1", "partner.1", "b.1"]


def test_parallel_logins_of_one_partner_cost_one_verification(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """The attempts waiting behind a successful one are answered from the cache."""
    login_queue = make_queue()
    for name in ("p.1", "p.2", "p.3"):
        passwords.submit(login_queue, name, accept=True)
    passwords.release(loop, "p.1")
    assert passwords.started == ["p.1"]
    assert passwords.verdicts["p.2"] == Verdict(True, True, cached=True)
    assert passwords.verdicts["p.3"] == Verdict(True, True, cached=True)
    assert login_queue.waiting == 0


def test_a_withdrawn_attempt_is_never_verified_and_gives_its_charge_back(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """A client that left before its turn costs no verification and no failure."""
    login_queue = make_queue()
    passwords.submit(login_queue, "x.1")
    tickets = [passwords.submit(login_queue, f"a.{n}") for n in (1, 2, 3)]
    for ticket in tickets:
        login_queue.withdraw(ticket)  # type: ignore[arg-type]
    assert login_queue.waiting == 0
    for n in (4, 5, 6):  # the whole budget is free again
        passwords.submit(login_queue, f"a.{n}")
    assert not any(name.startswith("a.") for name in passwords.verdicts)
    passwords.release(loop, "x.1")
    passwords.release(loop, "a.4")
    assert passwords.started == ["x.1", "a.4"]


def test_a_safe_address_is_never_reported_for_a_ban(
    loop: Loop, passwords: Passwords, bans: Bans, make_queue: Callable[..., LoginQueue]
) -> None:
    """Without a failure budget (a safe network, defender off) nothing is scored."""
    login_queue = make_queue()
    passwords.submit(login_queue, "s.1", budget=UNLIMITED)
    verdict = passwords.release(loop, "s.1")
    assert verdict == Verdict(False, True)
    assert bans.reported == []


def test_a_newcomer_during_a_burst_goes_next_and_the_first_still_get_turns(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """Clean keys are served newest and oldest in turn: a partner arriving behind a
    burst of fresh addresses goes next, and the burst's first keep every other turn."""
    login_queue = make_queue()
    burst = [f"k{n}.1" for n in range(6)]
    for name in burst:
        passwords.submit(login_queue, name, budget=UNLIMITED)
    passwords.submit(login_queue, "partner.1", accept=True, budget=UNLIMITED)
    # k0 took the free thread at once; the partner came in behind k1..k5.
    order = ["k0.1", "k1.1", "partner.1", "k2.1", "k5.1", "k3.1", "k4.1"]
    for name in order:
        passwords.release(loop, name)
    assert passwords.started == order
    assert passwords.verdicts["partner.1"].accepted


def test_a_key_that_failed_waits_behind_clean_keys(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """A failed verification puts its key behind every key that has not failed, even
    ones that arrived after its next attempt."""
    login_queue = make_queue()
    passwords.submit(login_queue, "a.1")
    passwords.submit(login_queue, "a.2")
    passwords.submit(login_queue, "b.1")
    passwords.release(loop, "a.1")  # a failed: a.2 now waits behind clean keys
    passwords.submit(login_queue, "c.1")
    for name in ("b.1", "c.1", "a.2"):
        passwords.release(loop, name)
    assert passwords.started == ["a.1", "b.1", "c.1", "a.2"]


def test_a_key_that_failed_still_gets_a_share_of_turns(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """While fresh keys keep arriving, every fourth turn goes to a key that failed:
    a partner who mistyped once is not starved by a stream of new addresses."""
    login_queue = make_queue()
    passwords.submit(login_queue, "partner.1", budget=UNLIMITED)
    passwords.submit(login_queue, "partner.2", accept=True, budget=UNLIMITED)
    for n in range(6):
        passwords.submit(login_queue, f"k{n}.1", budget=UNLIMITED)
    passwords.release(loop, "partner.1")  # mistyped: partner.2 waits as a failed key
    for name in ("k0.1", "k5.1", "partner.2"):
        passwords.release(loop, name)
    assert passwords.started == ["partner.1", "k0.1", "k5.1", "partner.2"]
    assert passwords.verdicts["partner.2"].accepted


def _same(
    passwords: Passwords,
    login_queue: LoginQueue,
    name: str,
    token: bytes,
    *,
    accept: bool = False,
) -> object:
    """Queue attempt ``name`` with credentials ``token`` (the recent-login token)."""
    key = name.split(".", maxsplit=1)[0]

    def verify() -> bool:
        passwords.started.append(name)
        return accept

    def done(verdict: Verdict) -> None:
        passwords.verdicts[name] = verdict

    return login_queue.submit(
        key, BUDGET, verify=verify, cached=lambda: False, done=done, same_as=token
    )


def test_parallel_cold_logins_with_the_same_credentials_share_one_verification(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """16 connections of one partner logging in at once with the right password, more
    than the failure budget of 3: one verification, sixteen logins, no 421."""
    login_queue = make_queue()
    names = [f"p.{n}" for n in range(16)]
    for name in names:
        _same(passwords, login_queue, name, b"right", accept=True)
    loop.run_until(lambda: len(passwords.verdicts) == len(names))
    assert passwords.started == ["p.0"]
    assert all(passwords.verdicts[name].accepted for name in names)
    assert login_queue.waiting == 0


def test_the_same_wrong_password_is_verified_once_but_each_session_is_charged(
    loop: Loop, passwords: Passwords, bans: Bans, make_queue: Callable[..., LoginQueue]
) -> None:
    """Three connections with one wrong password share one verification, and each
    counts one failure: the third earns the ban (budget 3); a different guess waits
    in line of its own and, the address banned meanwhile, is never verified."""
    login_queue = make_queue()
    for n in range(3):
        _same(passwords, login_queue, f"a.{n}", b"wrong")
    _same(passwords, login_queue, "a.3", b"other guess")
    loop.run_until(lambda: len(passwords.verdicts) == 4)
    assert passwords.started == ["a.0"]
    assert passwords.verdicts["a.3"] == Verdict(False, False, reason=BANNED)
    assert [passwords.verdicts[f"a.{n}"].verified for n in range(3)] == [True] * 3
    assert bans.reported[:3] == ["a", "a", "a"]
    assert any(passwords.verdicts[f"a.{n}"].ban is not None for n in range(3))
    assert login_queue.is_banned("a")


def test_a_withdrawn_leader_hands_its_place_to_a_follower(
    loop: Loop, passwords: Passwords, make_queue: Callable[..., LoginQueue]
) -> None:
    """The session whose attempt led goes away while waiting: the next session with
    the same credentials takes its place in line and is verified."""
    login_queue = make_queue()
    passwords.submit(login_queue, "x.1", accept=True)  # holds the only thread
    leader = _same(passwords, login_queue, "p.1", b"right", accept=True)
    _same(passwords, login_queue, "p.2", b"right", accept=True)
    login_queue.withdraw(leader)  # type: ignore[arg-type]
    passwords.release(loop, "x.1")
    loop.run_until(lambda: "p.2" in passwords.verdicts)
    assert passwords.started == ["x.1", "p.2"]
    assert passwords.verdicts["p.2"].accepted
    assert "p.1" not in passwords.verdicts
