"""The login queue: password verifications, bounded and fair across client addresses.

An argon2id verification with the production parameters takes ~0.17 s, and two
threads verify ~6.7 a second (its four lanes already use both cores of the 2-core
test machine; docs/decisions/0006-login-queue.md). Before this queue, every PASS went
straight to the password pool, which had no bound: one address queued 16 verifications
in milliseconds, and 25 addresses pushed every partner's login past the login timeout
(issue 14). Here, on the IO loop and protocol-neutral:

- **One at a time per address.** An address key (``policy.netpolicy.address_key``: an
  IPv4 address, an IPv6 /64) has at most one attempt queued for a thread or running.
  Further attempts from the same key *wait in the key's line* rather than being
  refused: parallel connections of one partner (rclone, lftp mirror, a NAT'd office)
  log in together, and once the first attempt succeeds the others are answered from
  the recent-login cache without a verification of their own. An attempt with the
  *same credentials* as one already in the key's line (``same_as``: the recent-login
  token, an HMAC under a process key) follows it instead of queueing: it gets that
  attempt's verdict and costs no verification and no place in line (16 parallel cold
  logins of one partner used to hear 421 past the failure budget). A failed verdict
  still counts one failure per session toward the ban.
- **Known partners, then clean addresses, then failing ones.** A key that logged in
  successfully in the last ``KNOWN_SECONDS`` (and failed no verification since) is
  served before anyone else. Next come *clean* keys, with no failed verification in
  the last ``FAILED_SECONDS``; last the keys that failed lately, round robin (a key goes
  to the back after each verification). A flood's addresses all land in the last tier
  with their first failure, so they stop delaying anyone who has not failed, except
  on every ``FAILED_SHARE``-th turn, which goes to a failed key (a partner who
  mistyped once still gets in while fresh addresses keep arriving).
- **Clean keys: newest and oldest take turns.** A flood arrives as a burst of fresh
  addresses; a partner who arrives during it would wait behind one verification per
  burst address in arrival order (14-24 s for 64 addresses, decision 0006). Serving
  the newest clean key every other turn puts that partner next (~0.3 s), and serving
  the oldest on the other turns bounds anyone's wait to twice the plain order, so a
  botnet that keeps arriving fresh cannot starve the keys that came first.
- **Bounded.** At most ``max_waiting`` attempts wait in all. When that is full, an
  attempt from a key with nothing waiting takes the place of the newest attempt of the
  key with the longest line (a known key's, of any unknown key's line); otherwise it is
  refused (``QUEUE_FULL``). A key's line is bounded too (``ADDRESS_FULL``, below).
- **Failures are charged when an attempt is submitted.** Each attempt in a key's line
  counts against the key's remaining failure budget (``max_failures`` minus the
  failures this queue saw in the defender's window): no key can have more attempts in
  flight than it has failures left before a ban, so a guesser's burst is refused at
  once instead of being verified and scored afterwards. A verified failure is reported
  to the ban keeper (``BanScore.record_failure``) as it ends, whether or not the
  session is still there.

Everything here runs on the IO loop except ``verify``, which runs on the queue's own
threads; results come back through the loop waker. Nothing is shared between worker
processes: each worker has its own queue and its own view of failures (bans are the
ban keeper's and hold everywhere).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    from ftps_gateway.policy.defender import Ban
    from ftps_gateway.session.runtime import Waker

logger = logging.getLogger("ftps_gateway")

# Why an attempt was refused without a verification (audit reasons; 421 replies).
QUEUE_FULL = "login-queue-full"  # max_waiting attempts wait already
ADDRESS_FULL = "login-queue-address"  # the key's line is at its failure budget
BANNED = "banned"  # the key was banned while the attempt waited

# Attempts waiting for a thread, in all. While fewer addresses than this wait, a full
# queue still takes a new address (one of them has two in line and gives way), so a
# flood from 64 addresses (issue 14's) leaves new partners a turn. A newcomer waits
# behind at most one attempt per other address: at most 128 verifications, ~19 s at
# the ~6.7 verifications/s two threads gave on the 2-core machine (argon2id's four
# lanes already use both cores), inside the 30 s login timeout.
MAX_WAITING = 128
# A key's line, whatever its failure budget (defender off, a safe network, a large
# max_failures): the default max_sessions_per_ip, so one address never holds more.
MAX_PER_KEY = 16
# How long a successful login makes its key a known partner's (served first).
KNOWN_SECONDS = 7 * 86_400
# How long a failed verification puts its key behind clean keys, and the failed keys'
# share of turns while clean keys wait (one in four: a flood's failing addresses get a
# quarter of the verifications, a partner who mistyped is never starved).
FAILED_SECONDS = 600.0
FAILED_SHARE = 4
# Keys remembered as known, and keys whose recent failures are counted; beyond it the
# stalest are forgotten, so a spray from many addresses cannot grow either table.
MAX_KNOWN_KEYS = 10_000
MAX_SCORED_KEYS = 100_000


class BanScore(Protocol):
    """What the queue needs of the bans: ask locally, report failures.

    ``session.state.SharedState`` has this shape (its ``is_banned`` and
    ``record_failure``; they key the address themselves, and a key passed in keys as
    itself). Both are called on the IO loop; ``done`` may run before
    ``record_failure`` returns.
    """

    def is_banned(self, address: str) -> bool:
        """True if ``address`` (a key) is banned now."""
        ...

    def record_failure(self, address: str, done: Callable[[Ban | None], None]) -> None:
        """Score one failed login of ``address``; ``done`` gets the ban it earned."""
        ...


@dataclass(frozen=True)
class FailureBudget:
    """How the ban keeper counts a key's failures (``[defender]``), for the charge."""

    max_failures: int | None  # failures in the window that earn a ban; None: never
    window_seconds: float


@dataclass(frozen=True)
class Verdict:
    """How an attempt ended."""

    accepted: bool
    verified: bool  # the password was checked (argon2id, or the recent-login cache)
    reason: str | None = None  # why it was refused unverified (QUEUE_FULL, ...)
    cached: bool = False  # accepted from the recent-login cache
    ban: Ban | None = None  # the ban this verified failure earned


class _Attempt:
    """One submitted attempt (the caller holds it as a ticket for ``withdraw``)."""

    __slots__ = (
        "cached", "done", "followers", "leader", "line", "same_as", "scored", "verify"
    )  # fmt: skip

    def __init__(
        self,
        line: _Line,
        verify: Callable[[], bool],
        cached: Callable[[], bool],
        done: Callable[[Verdict], None],
        *,
        scored: bool,
        same_as: bytes | None = None,
    ) -> None:
        self.line = line
        self.verify = verify
        self.cached = cached
        self.done = done
        self.scored = scored  # a failure counts toward a ban (else: safe, or off)
        self.same_as = same_as  # the credentials' token (None: nothing to share)
        self.followers: list[_Attempt] = []  # same credentials: share this verdict
        self.leader: _Attempt | None = None  # set while this attempt follows one


Ticket = _Attempt


class _Line:
    """One key's attempts: those waiting (in order), and whether one is running."""

    __slots__ = ("in_ring", "key", "running", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.waiting: deque[_Attempt] = deque()
        self.running: _Attempt | None = None
        self.in_ring = False

    @property
    def pending(self) -> int:
        """Attempts charged against the key's failure budget."""
        return len(self.waiting) + (self.running is not None)


class _Expiring:
    """Keys with a deadline, stalest dropped past a size (known partners)."""

    def __init__(self, seconds: float, limit: int, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._limit = limit
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> None:
        self._until[key] = self._clock() + self._seconds
        self._until.move_to_end(key)
        while len(self._until) > self._limit:
            self._until.popitem(last=False)

    def discard(self, key: str) -> None:
        self._until.pop(key, None)

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[key]
            return False
        return True


class _Failures:
    """Failures this queue saw per key, within a window (its view of the defender)."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def add(self, key: str) -> None:
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque()
        times.append(self._clock())
        self._times.move_to_end(key)
        while len(self._times) > self._limit:
            self._times.popitem(last=False)

    def count(self, key: str, window_seconds: float) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        start = self._clock() - window_seconds
        while times and times[0] <= start:
            times.popleft()
        if not times:
            del self._times[key]
            return 0
        return len(times)

    def clear(self, key: str) -> None:
        """A ban started: the ban keeper forgot the failures that earned it too."""
        self._times.pop(key, None)


class LoginQueue:
    """One worker's password verifications: bounded, fair, charged up front."""

    def __init__(
        self,
        waker: Waker,
        bans: BanScore,
        *,
        threads: int = 2,
        max_waiting: int = MAX_WAITING,
        max_per_key: int = MAX_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start the verification threads.

        Args:
            threads: verifications at once (each holds argon2's memory cost while
                it runs, 64 MiB with the production parameters).
            max_waiting: attempts waiting for a thread, in all.
            max_per_key: attempts one key may have in line, whatever its budget.
        """
        self._waker = waker
        self.bans = bans
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="argon2")
        self._max_waiting = max_waiting
        self._max_per_key = max_per_key
        self._lines: dict[str, _Line] = {}
        # Keys whose next attempt waits for a thread: known partners, then clean keys
        # (served newest and oldest in turn), then keys that failed lately.
        self._known_ring: deque[_Line] = deque()
        self._clean: deque[_Line] = deque()
        self._failed_ring: deque[_Line] = deque()
        self._newest_next = True
        self._turn = 0  # turns given, for the failed keys' share
        self._waiting = 0
        self._running = 0
        self._known = _Expiring(KNOWN_SECONDS, MAX_KNOWN_KEYS, clock)
        self._failures = _Failures(MAX_SCORED_KEYS, clock)
        self._failed_lately = _Expiring(FAILED_SECONDS, MAX_SCORED_KEYS, clock)
        self._closed = False

    # --- what the metrics and tests read

    @property
    def waiting(self) -> int:
        """Attempts waiting for a thread now (the bound is ``max_waiting``)."""
        return self._waiting

    @property
    def running(self) -> int:
        """Verifications running now."""
        return self._running

    def is_known(self, key: str) -> bool:
        """True if ``key`` logged in successfully lately and failed nothing since."""
        return key in self._known

    # --- the caller's side

    def is_banned(self, key: str) -> bool:
        """Ask the ban keeper (locally, never blocking)."""
        return self.bans.is_banned(key)

    def succeeded(self, key: str) -> None:
        """A login of ``key`` succeeded without the queue (the recent-login cache)."""
        self._known.add(key)

    def submit(
        self,
        key: str,
        budget: FailureBudget,
        *,
        verify: Callable[[], bool],
        cached: Callable[[], bool],
        done: Callable[[Verdict], None],
        same_as: bytes | None = None,
    ) -> Ticket:
        """Queue one attempt of ``key``; ``done`` gets its verdict on the IO loop.

        Args:
            verify: the verification, run on a queue thread (True: accepted).
            cached: a cheap check, on the loop, whether the recent-login cache has
                the answer now (asked when the attempt reaches a thread's turn).
            done: called exactly once, unless the attempt is withdrawn first; it
                may run before ``submit`` returns (a refusal).
            same_as: a token of the credentials (equal for the same user and
                password): an attempt of the same key with the same token already
                in line decides this one too.

        Returns:
            A ticket for ``withdraw``.
        """
        line = self._lines.get(key) or _Line(key)
        attempt = _Attempt(
            line,
            verify,
            cached,
            done,
            scored=budget.max_failures is not None,
            same_as=same_as,
        )
        leader = self._same_credentials(line, same_as)
        if leader is not None:
            if len(leader.followers) >= self._max_per_key:
                done(Verdict(accepted=False, verified=False, reason=ADDRESS_FULL))
                return attempt
            attempt.leader = leader
            leader.followers.append(attempt)
            return attempt
        refusal = self._make_room(line, budget)
        if refusal is not None:
            done(Verdict(accepted=False, verified=False, reason=refusal))
            return attempt
        self._lines[key] = line
        line.waiting.append(attempt)
        self._waiting += 1
        self._ring_up(line)
        self._dispatch()
        return attempt

    def withdraw(self, ticket: Ticket) -> None:
        """The session is gone: drop its attempt if it still waits (``done`` is
        never called then). A running verification ends and is scored anyway."""
        if ticket.leader is not None:  # a follower: only its place behind the leader
            ticket.leader.followers.remove(ticket)
            ticket.leader = None
            return
        line = ticket.line
        if ticket in line.waiting:
            if ticket.followers:  # the first follower takes its place in line
                heir, *rest = ticket.followers
                heir.leader, heir.followers = None, rest
                for follower in rest:
                    follower.leader = heir
                line.waiting[line.waiting.index(ticket)] = heir
                ticket.followers = []
                return
            line.waiting.remove(ticket)
            self._waiting -= 1
            self._forget_if_idle(line)

    def shutdown(self) -> None:
        """Stop: queued attempts are dropped, running verifications finish unheard."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- admission to a line

    @staticmethod
    def _same_credentials(line: _Line, same_as: bytes | None) -> _Attempt | None:
        """The attempt in ``line`` (running or waiting) with credentials ``same_as``."""
        if same_as is None:
            return None
        if line.running is not None and line.running.same_as == same_as:
            return line.running
        for attempt in line.waiting:
            if attempt.same_as == same_as:
                return attempt
        return None

    def _make_room(self, line: _Line, budget: FailureBudget) -> str | None:
        """Why ``line`` may not take one more attempt, or None: room was made (by
        evicting another key's newest attempt, if the queue was full)."""
        if self._closed:
            return QUEUE_FULL
        pending = line.pending
        if pending >= self._max_per_key:
            return ADDRESS_FULL
        if budget.max_failures is not None:
            failed = self._failures.count(line.key, budget.window_seconds)
            if failed + pending >= budget.max_failures:
                return ADDRESS_FULL
        if self._waiting < self._max_waiting:
            return None
        victim = self._victim(line)
        if victim is None:
            return QUEUE_FULL
        evicted = victim.waiting.pop()  # its newest: the one that waited least
        self._waiting -= 1
        self._forget_if_idle(victim)
        _tell(evicted, Verdict(accepted=False, verified=False, reason=QUEUE_FULL))
        return None

    def _victim(self, newcomer: _Line) -> _Line | None:
        """The line that gives up an attempt for ``newcomer`` in a full queue.

        The longest line of an unknown key; for an unknown newcomer only a line with
        two or more waiting (every key keeps its turn), and only if the newcomer has
        nothing waiting itself.
        """
        newcomer_known = newcomer.key in self._known
        if not newcomer_known and newcomer.waiting:
            return None
        least = 1 if newcomer_known else 2
        longest: _Line | None = None
        for line in self._lines.values():
            if line is newcomer or len(line.waiting) < least:
                continue
            if line.key in self._known:
                continue
            # Ties: the key that came last gives way (lines are in arrival order).
            if longest is None or len(line.waiting) >= len(longest.waiting):
                longest = line
        return longest

    # --- turns

    def _ring_up(self, line: _Line) -> None:
        """Put ``line`` at the back of its tier if its next attempt needs a turn."""
        if line.in_ring or line.running is not None or not line.waiting:
            return
        line.in_ring = True
        if line.key in self._known:
            self._known_ring.append(line)
        elif line.key in self._failed_lately:
            self._failed_ring.append(line)
        else:
            self._clean.append(line)

    def _next_line(self) -> _Line | None:
        """The line whose attempt goes next: known keys, then clean keys (newest and
        oldest in turn), then failed keys, except that every ``FAILED_SHARE``-th turn
        goes to a failed key first (a partner who mistyped once is not starved by a
        stream of fresh addresses). Entries whose line has nothing to run are
        dropped."""
        self._turn += 1
        tiers = [self._known_ring, self._clean, self._failed_ring]
        if self._turn % FAILED_SHARE == 0:
            tiers = [self._known_ring, self._failed_ring, self._clean]
        for tier in tiers:
            while tier:
                if tier is self._clean and self._newest_next:
                    line = tier.pop()
                else:
                    line = tier.popleft()
                line.in_ring = False
                if line.waiting and line.running is None:
                    if tier is self._clean:
                        self._newest_next = not self._newest_next
                    return line
        return None

    def _dispatch(self) -> None:
        """Give free threads the next attempts, tier by tier (``_next_line``)."""
        while self._running < self._threads and not self._closed:
            line = self._next_line()
            if line is None:
                return
            attempt = line.waiting.popleft()
            self._waiting -= 1
            if self.bans.is_banned(line.key):  # banned meanwhile (another session)
                self._ring_up(line)
                _tell(attempt, Verdict(accepted=False, verified=False, reason=BANNED))
                self._forget_if_idle(line)
                continue
            if attempt.cached():
                self._known.add(line.key)
                self._ring_up(line)
                _tell(attempt, Verdict(accepted=True, verified=True, cached=True))
                self._forget_if_idle(line)
                continue
            line.running = attempt
            self._running += 1
            try:
                future = self._pool.submit(attempt.verify)
            except RuntimeError:  # shut down: the server is stopping
                return
            future.add_done_callback(functools.partial(self._back_to_loop, line))

    def _back_to_loop(self, line: _Line, ended: Future[bool]) -> None:
        """On the verification's thread: hand its end to the IO loop."""
        self._waker.call_soon_threadsafe(lambda: self._verified(line, ended))

    def _verified(self, line: _Line, ended: Future[bool]) -> None:
        """A verification ended (on the loop): answer, score, serve the next."""
        attempt = line.running
        line.running = None
        self._running -= 1
        if attempt is None:  # pragma: no cover - a verification always has its attempt
            return
        if _accepted(ended):
            self._known.add(line.key)
            _tell(attempt, Verdict(accepted=True, verified=True))
            self._answer_from_cache(line)
        elif attempt.scored:
            # Each session that followed failed too, and each failure counts toward
            # the ban as if verified on its own: sharing a verification saves argon2
            # time, it does not buy a guesser (or a misconfigured client) failures.
            self._failed(line.key)
            followers, attempt.followers = attempt.followers, []
            for session in (attempt, *followers):
                session.leader = None
                self._failures.add(line.key)
                self._score(line.key, session)
        else:  # a safe network, or the defender is off: nothing to score
            self._failed(line.key)
            _tell(attempt, Verdict(accepted=False, verified=True))
        self._ring_up(line)
        self._forget_if_idle(line)
        self._dispatch()

    def _failed(self, key: str) -> None:
        """A verification of ``key`` failed: no longer known, behind clean keys."""
        self._known.discard(key)
        self._failed_lately.add(key)

    def _score(self, key: str, attempt: _Attempt) -> None:
        def scored(ban: Ban | None) -> None:
            if ban is not None:
                self._failures.clear(key)
            _tell(attempt, Verdict(accepted=False, verified=True, ban=ban))

        self.bans.record_failure(key, scored)

    def _answer_from_cache(self, line: _Line) -> None:
        """The key just logged in: its waiting attempts with the same password are
        answered now, without a turn (a partner's parallel connections)."""
        while line.waiting and line.waiting[0].cached():
            attempt = line.waiting.popleft()
            self._waiting -= 1
            _tell(attempt, Verdict(accepted=True, verified=True, cached=True))

    def _forget_if_idle(self, line: _Line) -> None:
        if line.pending == 0 and self._lines.get(line.key) is line:
            del self._lines[line.key]


def _tell(attempt: _Attempt, verdict: Verdict) -> None:
    """Hand ``verdict`` to its session, and to the sessions that followed it with the
    same credentials (accepted as if from the cache; a scored failure never comes
    here with followers: ``_verified`` scores each); a session's bug must not stop
    the queue."""
    followers, attempt.followers = attempt.followers, []
    shared = dataclasses.replace(verdict, cached=verdict.accepted, ban=None)
    for session, heard in ((attempt, verdict), *((f, shared) for f in followers)):
        session.leader = None
        try:
            session.done(heard)
        except Exception:
            logger.exception("a login verdict's callback failed")


def _accepted(ended: Future[bool]) -> bool:
    """The verification's answer; an unexpected error counts as a wrong password."""
    if ended.cancelled():
        return False
    error = ended.exception()
    if error is not None:
        logger.error("password verification failed unexpectedly: %r", error)
        return False
    return bool(ended.result())
