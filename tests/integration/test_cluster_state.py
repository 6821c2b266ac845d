"""``RedisState`` against a real redis-server: two instances are two nodes (issue 15).

The gateway's own wiring is tested end to end in ``test_cluster.py``; here the state
itself, without FTP in the way: limits and quota that hold across nodes, bans that
reach every replica, leases that free a dead node's holdings, the two answers to an
unreachable Redis, and what each start-up failure says.
"""

from __future__ import annotations

import ipaddress
import random
import select
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trustme

from ftps_gateway.audit import AuditLog
from ftps_gateway.config import ClusterSettings, DefenderSettings, IPNetwork
from ftps_gateway.errors import StartupError
from ftps_gateway.policy.defender import Ban
from ftps_gateway.service import sharedstate
from ftps_gateway.service.cluster import RedisState
from ftps_gateway.service.clusterlease import LOCAL, REFUSING, SHARED
from ftps_gateway.service.sharedstate import ChannelState, StateService
from ftps_gateway.session.state import (
    LIMIT_PER_USER,
    LIMIT_TOTAL,
    UNAVAILABLE,
    LocalState,
    LoginSlot,
    QuotaClaim,
    QuotaMark,
    StateSettings,
)
from support.certificates import write_certificate
from support.redis import RedisServer
from support.state import answered, local_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ACME = LoginSlot("192.0.2.1", "acme")
WAIT_SECONDS = 10  # generous: the machine is shared


def settings(
    *,
    total: int = 100,
    per_ip: int = 100,
    per_user: int = 2,
    defender: DefenderSettings = DefenderSettings(max_failures=3),  # noqa: B008
    safe: tuple[IPNetwork, ...] = (),
) -> StateSettings:
    """What a configuration would say (limits, defender, safe networks)."""
    return StateSettings(
        defender=defender, safe=safe, ipv6_prefix=64, max_sessions=total,
        max_sessions_per_ip=per_ip, max_sessions_per_user=per_user,
    )  # fmt: skip


class CountingMetrics:
    """Records what the state counts."""

    def __init__(self) -> None:
        self.round_trips: list[float] = []
        self.errors: list[str] = []
        self.modes: list[str] = []

    def redis_round_trip(self, seconds: float) -> None:
        self.round_trips.append(seconds)

    def redis_error(self, kind: str) -> None:
        self.errors.append(kind)

    def cluster_mode(self, mode: str) -> None:
        self.modes.append(mode)


def ask(method: Callable[..., None], *args: Any) -> Any:
    """Call a SharedState method and wait for its ``done``."""
    answered = threading.Event()
    answers: list[Any] = []

    def done(answer: Any) -> None:
        answers.append(answer)
        answered.set()

    method(*args, done)
    assert answered.wait(WAIT_SECONDS), f"{method.__name__} got no answer"
    return answers[0]


def wait_until(check: Callable[[], bool], seconds: float = WAIT_SECONDS) -> float:
    """Seconds until ``check()`` held (fails after ``seconds``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "condition never held"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Callable[..., RedisState]]:
    """Start nodes against ``redis_server``; all closed at teardown."""
    started: list[RedisState] = []

    def start(
        name: str,
        *,
        url: str | None = None,
        on_unavailable: str = "refuse",
        lease_seconds: int = 3,
        state: StateSettings | None = None,
        metrics: CountingMetrics | None = None,
        audit: AuditLog | None = None,
        ca_file: Path | None = None,
    ) -> RedisState:
        cluster = ClusterSettings(
            redis_url=url or redis_server.url,
            on_unavailable=on_unavailable,
            timeout_seconds=0.5,
            lease_seconds=lease_seconds,
            ca_file=ca_file,
        )
        node = RedisState(
            cluster, name, state or settings(), metrics=metrics, audit=audit
        )
        started.append(node)
        node.start()
        return node

    yield start
    for state in started:
        state.close()


def test_per_user_limit_holds_across_nodes_and_a_logout_frees_it_everywhere(
    nodes: Callable[..., RedisState],
) -> None:
    """max_sessions_per_user = 2 counts both nodes; a logout frees the slot for all."""
    a, b = nodes("a"), nodes("b")
    assert ask(a.login, ACME) is None
    assert ask(b.login, ACME) is None
    assert ask(a.login, ACME) == LIMIT_PER_USER
    assert ask(b.login, ACME) == LIMIT_PER_USER
    b.logout(ACME)
    freed = wait_until(lambda: ask(a.login, ACME) is None)
    print(f"a logout on node b freed the slot for node a within {freed:.3f} s")
    assert a.snapshot() == (2, {"192.0.2.1": 2}, {"acme": 2})


def test_total_limit_counts_every_node(nodes: Callable[..., RedisState]) -> None:
    """max_sessions holds for the cluster, whatever address or user asks."""
    limits = settings(total=3, per_user=100)
    a, b = nodes("a", state=limits), nodes("b", state=limits)
    for index, node in enumerate((a, b, a)):
        assert ask(node.login, LoginSlot(f"192.0.2.{index}", f"u{index}")) is None
    assert ask(b.login, LoginSlot("192.0.2.9", "other")) == LIMIT_TOTAL


def test_a_login_costs_one_round_trip_and_session_ends_are_batched(
    nodes: Callable[..., RedisState], redis_server: RedisServer
) -> None:
    """One round trip per login; many session ends queued together share one."""
    metrics = CountingMetrics()
    a = nodes("a", metrics=metrics, lease_seconds=3600, state=settings(per_user=100))
    wait_until(
        lambda: (
            redis_server.cli("PUBSUB", "NUMSUB", "ftps-gateway:bans").endswith("1")
            and not a._bans.resync_asked()
        )
    )
    before = len(metrics.round_trips)
    for _ in range(20):
        assert ask(a.login, ACME) is None
    assert len(metrics.round_trips) - before == 20
    before = len(metrics.round_trips)
    with a._wakeup:  # hold the thread back while 20 sessions end at once
        for _ in range(20):
            a.logout(ACME)
    wait_until(lambda: len(metrics.round_trips) > before)
    time.sleep(0.5)  # anything else they took would have happened by now
    logouts = len(metrics.round_trips) - before
    print(f"20 session ends took {logouts} round trip(s)")
    assert logouts == 1
    assert a.snapshot()[0] == 0


def test_failures_on_two_nodes_ban_on_both_and_a_remove_lifts_it_on_both(
    nodes: Callable[..., RedisState],
) -> None:
    """max_failures counts failures on all nodes; the ban and its removal replicate."""
    a, b = nodes("a"), nodes("b")
    address = "198.51.100.7"
    assert ask(a.record_failure, address) is None
    assert ask(b.record_failure, address) is None
    ban = ask(a.record_failure, address)
    assert isinstance(ban, Ban)
    assert (ban.ip, ban.offences, round(ban.remaining_seconds)) == (address, 1, 900)
    seen = wait_until(lambda: b.is_banned(address), 2)
    print(f"the ban reached the other node's replica within {seen:.3f} s")
    assert a.is_banned(address)
    assert [found.ip for found in b.bans()] == [address]
    assert b.remove_ban(address)
    lifted = wait_until(lambda: not a.is_banned(address), 2)
    print(f"the removal reached the other node within {lifted:.3f} s")
    assert not b.is_banned(address)
    assert a.bans() == []
    assert not b.remove_ban(address)


def test_a_repeat_offence_doubles_the_ban(nodes: Callable[..., RedisState]) -> None:
    """The defender's doubling ban time is kept in Redis (offences survive the ban)."""
    a = nodes(
        "a", state=settings(defender=DefenderSettings(max_failures=1, ban_seconds=1))
    )
    first = ask(a.record_failure, "198.51.100.8")
    assert (first.offences, first.remaining_seconds) == (1, 1.0)
    wait_until(lambda: not a.is_banned("198.51.100.8"))
    second = ask(a.record_failure, "198.51.100.8")
    assert (second.offences, second.remaining_seconds) == (2, 2.0)


def test_two_nodes_uploading_against_one_quota_never_exceed_it(
    nodes: Callable[..., RedisState],
) -> None:
    """Reservations in chunks from two nodes at once: the sum never passes the limit."""
    a, b = nodes("a"), nodes("b")
    limit, chunk = 100_000, 1_000
    marks = ask(a.quota_marks, ["user acme"])
    assert marks == {"user acme": QuotaMark(0, 0)}
    granted: dict[str, int] = {}

    def upload(node: RedisState, name: str) -> None:
        granted[name] = 0
        while True:
            claim = QuotaClaim(
                "user acme", limit, None, 0, 0, marks["user acme"], chunk, 0
            )
            if ask(node.reserve, name, [claim]) is not None:
                return
            granted[name] += chunk

    threads = [
        threading.Thread(target=upload, args=(node, f"{node.node}-{index}"))
        for index in range(2)
        for node in (a, b)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    print(f"granted per upload: {granted}")
    assert sum(granted.values()) == limit
    assert all(granted.values())  # every node got a share
    # Committing one upload's bytes counts for everyone, the others give theirs back.
    first = next(iter(granted))
    a.release(first, {"user acme": (granted[first], 1)})
    for name in list(granted)[1:]:
        (a if name.startswith("a") else b).release(name, {})
    marks_now = wait_until(
        lambda: ask(b.quota_marks, ["user acme"])["user acme"].committed_bytes > 0
    )
    assert marks_now >= 0
    after = ask(b.quota_marks, ["user acme"])["user acme"]
    assert after == QuotaMark(granted[first], 1)
    room = QuotaClaim("user acme", limit, None, 0, 0, marks["user acme"], 1, 0)
    assert ask(b.reserve, "next", [room]) is None  # the others' reservations are gone
    big = QuotaClaim(
        "user acme", limit, None, 0, 0, marks["user acme"], limit - granted[first], 0
    )
    assert ask(b.reserve, "too-big", [big]) == "user acme"


def test_a_reservation_takes_every_scope_or_none(
    nodes: Callable[..., RedisState],
) -> None:
    """A path in two scopes: one full scope refuses the whole claim."""
    a = nodes("a")
    mark = QuotaMark(0, 0)
    user = QuotaClaim("user acme", 10, None, 0, 0, mark, 8, 1)
    mount = QuotaClaim("mount /finance", 5, None, 0, 0, mark, 8, 1)
    assert ask(a.reserve, "r1", [user, mount]) == "mount /finance"
    assert ask(a.reserve, "r2", [user]) is None  # nothing was held by r1
    files = QuotaClaim("mount /finance", None, 1, 0, 1, mark, 0, 1)
    assert ask(a.reserve, "r3", [files]) == "mount /finance"


def test_a_dead_node_frees_its_holdings_within_the_lease(
    nodes: Callable[..., RedisState],
) -> None:
    """A node that stops renewing (killed) stops counting when its lease ends."""
    a, b = nodes("a", lease_seconds=3), nodes("b", lease_seconds=3)
    assert ask(a.login, ACME) is None
    assert ask(a.login, ACME) is None
    assert ask(b.login, ACME) == LIMIT_PER_USER
    mark = QuotaMark(0, 0)
    whole = QuotaClaim("user acme", 10, None, 0, 0, mark, 10, 1)
    assert ask(a.reserve, "r", [whole]) is None
    died = time.monotonic()
    a._stopping.set()  # its threads stop: no heartbeat, no goodbye (as kill -9)
    for thread in a._threads:
        thread.join(5)
    freed = wait_until(lambda: ask(b.login, ACME) is None, 10)
    room = QuotaClaim("user acme", 10, None, 0, 0, mark, 10, 1)
    assert ask(b.reserve, "r2", [room]) is None
    print(f"a dead node's sessions were free after {time.monotonic() - died:.2f} s")
    assert freed <= 3 + 1  # the lease, plus a beat of slack on a busy machine


def test_redis_lost_in_local_mode_serves_on_and_comes_back_shared(
    nodes: Callable[..., RedisState], redis_server: RedisServer
) -> None:
    """on_unavailable = "local": node-local limits meanwhile; then holdings restored."""
    metrics = CountingMetrics()
    records: list[dict[str, object]] = []
    audit = AuditLog()
    audit.event = lambda name, **fields: records.append({"event": name, **fields})  # type: ignore[method-assign]
    a = nodes("a", on_unavailable="local", metrics=metrics, audit=audit)
    b = nodes("b", on_unavailable="local")
    assert ask(a.login, ACME) is None
    redis_server.stop()
    # The first request after the loss finds out; it is answered locally.
    assert ask(b.login, ACME) is None  # b holds none itself: allowed locally
    wait_until(lambda: b.mode == LOCAL)
    assert ask(a.login, ACME) is None
    assert ask(a.login, ACME) == LIMIT_PER_USER  # a's own two
    wait_until(lambda: a.mode == LOCAL)
    assert "Redis unreachable" in (a.note() or "")
    assert a.problem() is None  # /readyz stays ready in local mode
    redis_server.start()
    back = wait_until(lambda: a.mode == SHARED and b.mode == SHARED, 10)
    print(f"back to shared state {back:.2f} s after Redis returned")
    # Both nodes wrote their holdings back: the cluster counts 3 sessions of acme.
    assert a.snapshot() == (3, {"192.0.2.1": 3}, {"acme": 3})
    assert ask(b.login, ACME) == LIMIT_PER_USER
    assert [r["mode"] for r in records if r["event"] == "cluster_mode"] == [
        SHARED, LOCAL, SHARED,
    ]  # fmt: skip
    assert LOCAL in metrics.modes
    assert metrics.errors


def test_redis_lost_in_refuse_mode_refuses_logins_until_it_is_back(
    nodes: Callable[..., RedisState], redis_server: RedisServer
) -> None:
    """on_unavailable = "refuse": new logins get the 421 reason; bans still work."""
    a = nodes("a", state=settings(defender=DefenderSettings(max_failures=1)))
    assert ask(a.login, ACME) is None
    redis_server.stop()
    assert ask(a.login, ACME) == UNAVAILABLE
    assert a.mode == REFUSING
    assert "Redis unreachable" in (a.problem() or "")
    ban = ask(a.record_failure, "198.51.100.9")  # scored on this node meanwhile
    assert isinstance(ban, Ban)
    assert a.is_banned("198.51.100.9")
    redis_server.start()
    wait_until(lambda: a.mode == SHARED, 10)
    assert ask(a.login, ACME) is None
    assert a.snapshot()[0] == 2  # the session from before the loss is counted again
    assert [ban.ip for ban in a.bans()] == ["198.51.100.9"]  # pushed to the cluster
    assert redis_server.cli("ZCARD", "ftps-gateway:bans") == "1"


def test_unreachable_redis_at_start_up(tmp_path: Path) -> None:
    """No Redis: a clear error naming cluster.redis_url, unless on_unavailable=local."""
    url = f"unix://{tmp_path}/none.sock"
    state = _state(url, "refuse")
    with pytest.raises(StartupError) as caught:
        state.start()
    assert str(caught.value).startswith("cluster.redis_url: ")
    assert "No such file or directory" in str(caught.value)
    assert f"({url})" in str(caught.value)
    state.close()
    local = _state(url, "local")
    local.start()
    try:
        assert local.mode == LOCAL
        answered: list[str | None] = []
        local.login(ACME, answered.append)
        wait_until(lambda: bool(answered))
        assert answered == [None]
    finally:
        local.close()


def test_wrong_password_at_start_up() -> None:
    """A wrong password names authentication, never the password."""
    directory = Path(tempfile.mkdtemp(prefix="redis-"))
    server = RedisServer(directory, password="right-one")
    try:
        for url in (
            f"unix://:wrong-SECRET@{server.socket}",
            f"unix://{server.socket}",
        ):
            state = _state(url, "refuse")
            with pytest.raises(StartupError) as caught:
                state.start()
            state.close()
            message = str(caught.value)
            assert message.startswith("cluster.redis_url: authentication failed")
            assert "SECRET" not in message
        good = _state(server.url, "refuse")
        good.start()
        assert good.mode == SHARED
        good.close()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_tls_redis_works_and_a_wrong_ca_is_a_start_up_error(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """rediss:// with cluster.ca_file; another CA's certificate is a TLS error."""
    chain, key, ca_file = write_certificate(ca, tmp_path, ["127.0.0.1"])
    directory = Path(tempfile.mkdtemp(prefix="redis-"))
    server = RedisServer(directory, tls=(chain, key, ca_file))
    try:
        good = _state(server.tls_url, "refuse", ca_file=ca_file)
        good.start()
        assert good.mode == SHARED
        assert ask(good.login, ACME) is None
        good.close()
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        other_ca = write_certificate(trustme.CA(), other_dir, ["127.0.0.1"])[2]
        bad = _state(server.tls_url, "refuse", ca_file=other_ca)
        with pytest.raises(StartupError) as caught:
            bad.start()
        bad.close()
        assert str(caught.value).startswith("cluster.redis_url: TLS failed")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_node_name_in_use_by_a_live_node_is_refused(
    nodes: Callable[..., RedisState],
) -> None:
    """Two live processes with one node name would mix their holdings: refused."""
    nodes("twin", lease_seconds=3)
    started = time.monotonic()
    with pytest.raises(StartupError) as caught:
        nodes("twin", lease_seconds=3)
    assert "server.node_name: 'twin' is held by another live node" in str(caught.value)
    assert time.monotonic() - started >= 3  # it waited out one lease first


def _state(url: str, on_unavailable: str, ca_file: Path | None = None) -> RedisState:
    return RedisState(
        ClusterSettings(
            redis_url=url, on_unavailable=on_unavailable, timeout_seconds=0.5,
            lease_seconds=3, ca_file=ca_file,
        ),
        "solo",
        settings(total=10, per_ip=10, per_user=10, defender=DefenderSettings()),
    )  # fmt: skip


def test_ban_changes_reach_a_watcher(nodes: Callable[..., RedisState]) -> None:
    """A supervisor can pass the cluster's ban changes on (made, then lifted)."""
    a = nodes("a", state=settings(defender=DefenderSettings(max_failures=1)))
    b = nodes("b")
    seen: list[tuple[str, bool]] = []
    b.watch_bans(lambda ban: seen.append((ban.ip, ban.remaining_seconds > 0)))
    assert isinstance(ask(a.record_failure, "198.51.100.10"), Ban)
    wait_until(lambda: ("198.51.100.10", True) in seen)
    assert a.remove_ban("198.51.100.10")
    wait_until(lambda: ("198.51.100.10", False) in seen)
    assert b.active_bans() == 0


class QueueWaker:
    """A single server's loop waker, run by hand: answers wait until ``run``."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []
        self.lock = threading.Lock()

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        with self.lock:
            self.callbacks.append(callback)

    def run(self) -> int:
        """Run what was handed over so far; how many callbacks ran."""
        with self.lock:
            callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()
        return len(callbacks)


def test_a_single_servers_answers_arrive_through_its_loop_waker(
    redis_server: RedisServer,
) -> None:
    """With a waker (workers = 1), no answer runs on the Redis thread itself."""
    waker = QueueWaker()
    cluster = ClusterSettings(redis_url=redis_server.url, timeout_seconds=0.5)
    node = RedisState(cluster, "solo", settings(), waker=waker)
    node.start()
    try:
        answers: list[str | None] = []
        node.login(ACME, answers.append)
        wait_until(lambda: bool(waker.callbacks))
        assert answers == []  # handed to the loop, not run by the Redis thread
        assert waker.run() == 1
        assert answers == [None]
    finally:
        node.close()
    assert redis_server.cli("EXISTS", "ftps-gateway:held:solo") == "0"  # given back


def test_a_safe_address_is_never_banned_and_ipv6_is_banned_per_prefix(
    nodes: Callable[..., RedisState],
) -> None:
    """Failures from two addresses of one /64 on two nodes ban the prefix on both;
    an address in access.safe inside it is never scored nor banned."""
    safe = (ipaddress.ip_network("2001:db8:1::7/128"),)
    a = nodes("a", state=settings(safe=safe))
    b = nodes("b", state=settings(safe=safe))
    assert ask(a.record_failure, "2001:db8:1::7") is None  # safe: not scored
    assert ask(a.record_failure, "2001:db8:1::1") is None
    assert ask(b.record_failure, "2001:db8:1::2") is None
    ban = ask(a.record_failure, "2001:db8:1::3")
    assert isinstance(ban, Ban)
    assert ban.ip == "2001:db8:1::/64"
    wait_until(lambda: b.is_banned("2001:db8:1::99"), 2)
    assert a.is_banned("2001:db8:1::99")
    assert a.is_banned("2001:db8:1::/64")  # the login queue asks by key
    assert not a.is_banned("2001:db8:1::7")
    assert not b.is_banned("2001:db8:1::7")
    assert not b.is_banned("2001:db8:2::1")
    assert [found.ip for found in b.bans()] == ["2001:db8:1::/64"]
    assert a.remove_ban("2001:db8:1::/64")
    wait_until(lambda: not b.is_banned("2001:db8:1::99"), 2)


def test_quota_answers_are_local_states_exactly(
    nodes: Callable[..., RedisState],
) -> None:
    """Marks, reservations in chunks, releases with commits (also negative ones):
    two nodes answer every step as one LocalState does (session.state's sum)."""
    rng = random.Random(15)
    a, b = nodes("a"), nodes("b")
    local = local_state()
    uploads: dict[str, tuple[RedisState, dict[str, QuotaMark]]] = {}
    outcomes: Counter[str | None] = Counter()
    for step in range(300):
        if rng.random() < 0.6 or not uploads:
            outcomes[_reserve_both(rng, step, (a, b), local, uploads)] += 1
        else:
            _release_both(rng, local, uploads)
    print(f"reservation answers: {dict(outcomes)}")
    assert len(outcomes) == len(QUOTA_SCOPES) + 1  # granted, and each scope full


QUOTA_SCOPES = ("user acme", "mount /finance")


def _reserve_both(
    rng: random.Random,
    step: int,
    nodes: tuple[RedisState, RedisState],
    local: LocalState,
    uploads: dict[str, tuple[RedisState, dict[str, QuotaMark]]],
) -> str | None:
    """One reservation (a new upload, or the next chunk of one), asked of both."""
    if uploads and rng.random() < 0.5:
        name = rng.choice(list(uploads))
        node, marks = uploads[name]
    else:
        name, node = f"up{step}", rng.choice(nodes)
        marks = ask(node.quota_marks, list(QUOTA_SCOPES))
        assert marks == answered(local.quota_marks, list(QUOTA_SCOPES))
    claims = [
        QuotaClaim(
            scope,
            rng.choice((None, 5000, 8000)),
            rng.choice((None, 6)),
            rng.randrange(0, 3000),
            rng.randrange(0, 3),
            marks[scope],
            rng.choice((0, rng.randrange(1, 1500))),
            0 if name in uploads else 1,
        )
        for scope in rng.sample(QUOTA_SCOPES, rng.randint(1, 2))
    ]
    expected = answered(local.reserve, name, claims)
    assert ask(node.reserve, name, claims) == expected, f"step {step}"
    uploads[name] = (node, marks)
    return expected  # type: ignore[no-any-return]


def _release_both(
    rng: random.Random,
    local: LocalState,
    uploads: dict[str, tuple[RedisState, dict[str, QuotaMark]]],
) -> None:
    """One upload ends: discarded, or committed (bytes may be negative)."""
    name = rng.choice(list(uploads))
    owner, _ = uploads.pop(name)
    committed = {}
    if rng.random() < 0.7:
        committed = {
            scope: (rng.randrange(-500, 1500), rng.randint(0, 1))
            for scope in QUOTA_SCOPES
        }
    owner.release(name, committed)
    local.release(name, committed)
    # Fire and forget: wait until Redis has counted it.
    wait_until(
        lambda: (
            ask(owner.quota_marks, list(QUOTA_SCOPES))
            == answered(local.quota_marks, list(QUOTA_SCOPES))
            and _reserved(owner) == _local_reserved(local)
        )
    )


def _reserved(node: RedisState) -> dict[str, int]:
    fields = node._redis.call("totals")  # the live nodes' sums, as Redis has them
    pairs = {
        str(fields[i], "utf-8"): int(fields[i + 1]) for i in range(0, len(fields), 2)
    }
    return {k: v for k, v in pairs.items() if k[:2] in ("b|", "f|") and v}


def _local_reserved(local: LocalState) -> dict[str, int]:
    out: dict[str, int] = {}
    for held in local.reservations().values():
        for scope, (nbytes, files) in held.items():
            out[f"b|{scope}"] = out.get(f"b|{scope}", 0) + nbytes
            out[f"f|{scope}"] = out.get(f"f|{scope}", 0) + files
    return {k: v for k, v in out.items() if v}


class ChannelWorker:
    """A worker's ``ChannelState`` on a real socket pair, pumped by hand."""

    def __init__(self, service: StateService, index: int) -> None:
        supervisor_end, worker_end = sharedstate.channel_pair()
        service.serve(supervisor_end, index)
        self.state = ChannelState(worker_end, settings(), on_lost=lambda: None)
        self.state.sync(timeout=10)

    def pump(self, until: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
        """Hand the supervisor's messages to the state until ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "no answer from the supervisor"
            ready, _, _ = select.select([self.state.conn], [], [], 0.05)
            if ready:
                self.state.handle_message(self.state.conn.recv(1 << 20))

    def ask(self, method: Callable[..., None], *args: Any) -> Any:
        answers: list[Any] = []
        method(*args, answers.append)
        self.pump(lambda: bool(answers))
        return answers[0]


def test_a_supervisor_serves_its_workers_from_redis(
    nodes: Callable[..., RedisState], redis_server: RedisServer
) -> None:
    """RedisState as StateService's store: one lease for the node, bans reach the
    workers' replicas, a dead worker's slots and reservations go back to Redis."""
    node = nodes("node-a", state=settings(per_user=2))
    other = nodes("node-b", state=settings(per_user=2))
    service = StateService(node)
    dead, alive = ChannelWorker(service, 0), ChannelWorker(service, 1)
    assert redis_server.cli("ZRANGE", "ftps-gateway:nodes", "0", "-1").split() == [
        "node-a", "node-b",
    ]  # fmt: skip
    assert dead.ask(dead.state.login, ACME) is None
    assert alive.ask(alive.state.login, ACME) is None
    assert ask(other.login, ACME) == LIMIT_PER_USER  # two on node a: cluster-wide
    whole = QuotaClaim("user acme", 10, None, 0, 0, QuotaMark(0, 0), 10, 1)
    assert dead.ask(dead.state.reserve, "up1", [whole]) is None
    assert ask(other.reserve, "up1", [whole]) == "user acme"
    dead.state.conn.close()  # as kill -9 of the worker would
    wait_until(lambda: ask(other.login, ACME) is None)
    assert ask(other.reserve, "up2", [whole]) is None  # the reservation went too
    for _ in range(3):  # a ban made on node b reaches node a's worker
        ask(other.record_failure, "198.51.100.20")
    alive.pump(lambda: alive.state.is_banned("198.51.100.20"))
    assert node.remove_ban("198.51.100.20")
    alive.pump(lambda: not alive.state.is_banned("198.51.100.20"))
    alive.state.conn.close()
