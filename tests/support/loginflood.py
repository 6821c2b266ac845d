"""A login flood against a real gateway, and a partner's login timed in the middle of it.

Attackers are many source addresses, each with a few connections that keep doing
``AUTH TLS``, ``USER``, ``PASS <wrong>`` and wait for the answer (the worst case for
the server: every queued attempt is worth verifying), until their address is dropped
before the banner (banned) or the flood's time is up. The partner logs in with the
right password once before the flood (optional: a partner seen before) and then
``partner_after`` seconds into it; a second partner address, never seen before, logs
in at the same moment. Both are timed from connect to ``230``.

One asyncio loop drives every connection, so a thousand attackers cost one process.
Used by the tests (``tests/integration/test_login_flood.py``, in the test process) and
inside network namespaces (``python -m support.loginflood``: the plan as JSON on
stdin, the report as JSON on stdout), and by ``bench/bench.py``. Imports only
``ftps_gateway.ftp.replies`` (to name the replies it counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from ftps_gateway.ftp import replies

STEP_TIMEOUT_SECONDS = 60.0  # one reply; the login timer (30 s) answers before it


@dataclass
class Plan:
    """Who floods, who logs in, and when."""

    host: str
    port: int
    sources: list[str]  # attacker source addresses
    per_source: int  # connections each attacker keeps busy
    user: str  # the account attacked (and the partner's)
    wrong_password: str
    password: str  # the partner's, right
    partner_source: str  # a partner address (logged in before the flood if warm_up)
    fresh_source: str | None = None  # a partner address the server never saw
    seconds: float = 60.0  # the flood stops by then at the latest
    partner_after: float = 1.0  # seconds into the flood the partners log in
    warm_up: bool = True
    until_banned: bool = True  # else the flood stops once the partners are in
    # The partners' accounts (default: ``user``): a server with a login cache needs
    # one account per timed login for each to be uncached.
    warm_up_user: str | None = None
    partner_user: str | None = None
    fresh_user: str | None = None


@dataclass
class Login:
    """One partner login: its reply and how long it took (None: it failed)."""

    reply: str
    seconds: float | None


@dataclass
class Report:
    """What the flood heard, and the partners' logins."""

    replies: dict[str, int] = field(default_factory=dict)  # label -> count
    banned: list[str] = field(default_factory=list)  # sources dropped before 220
    flood_seconds: float = 0.0  # until every attacker was banned, or the limit
    baseline: Login | None = None  # the partner before the flood (if warm_up)
    partner: Login | None = None  # the partner during the flood
    fresh: Login | None = None  # the never-seen partner during the flood


def label(reply: str) -> str:
    """A short name for a reply to ``PASS`` (or for what happened instead)."""
    known = getattr(replies, "LOGIN_QUEUE_REPLIES", {})  # not in older versions
    queue_labels = {text: f"421 {reason}" for reason, text in known.items()}
    if reply in queue_labels:
        return queue_labels[reply]
    return reply[:3] or "closed"


def _context() -> ssl.SSLContext:
    # The flood is about load, not about trust: no certificate check.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _DroppedError(Exception):
    """Closed before the banner: the source is banned (or not allowed)."""


async def _line(reader: asyncio.StreamReader) -> str:
    """One reply line (the last line of a multi-line reply)."""
    while True:
        raw = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT_SECONDS)
        if not raw:
            return ""
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) < 4 or text[3] != "-":
            return text


async def attempt(
    plan: Plan, source: str, password: str, user: str | None = None
) -> str:
    """One connection: AUTH TLS, USER, PASS; the reply to PASS (``""``: closed)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(plan.host, plan.port, local_addr=(source, 0)),
        STEP_TIMEOUT_SECONDS,
    )
    try:
        if not (await _line(reader)).startswith("220"):
            raise _DroppedError
        writer.write(b"AUTH TLS\r\n")
        if not (await _line(reader)).startswith("234"):
            return "auth refused"
        await writer.start_tls(_context())
        writer.write(f"USER {user or plan.user}\r\n".encode())
        if not (await _line(reader)).startswith("331"):
            return "user refused"
        writer.write(f"PASS {password}\r\n".encode())
        return await _line(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def timed_login(plan: Plan, source: str, user: str | None) -> Login:
    """A partner's login from ``source``, timed from connect to its reply."""
    began = time.perf_counter()
    try:
        reply = await attempt(plan, source, plan.password, user)
    except _DroppedError:
        return Login("dropped", None)
    except (TimeoutError, OSError, ssl.SSLError) as err:
        return Login(f"error: {err!r}", None)
    seconds = time.perf_counter() - began
    return Login(reply, seconds if reply.startswith("230") else None)


async def _attacker(
    plan: Plan, source: str, heard: Counter[str], banned: set[str], stop: asyncio.Event
) -> None:
    while not stop.is_set() and source not in banned:
        guess = f"{plan.wrong_password}-{secrets.token_hex(4)}"  # a new one each time
        try:
            reply = await attempt(plan, source, guess)
        except _DroppedError:
            banned.add(source)
            heard["dropped"] += 1
            return
        except (TimeoutError, OSError, ssl.SSLError, EOFError) as err:
            heard[f"error {type(err).__name__}"] += 1
            await asyncio.sleep(0.1)
            continue
        heard[label(reply)] += 1


async def run(plan: Plan) -> Report:
    """Warm up, flood, log the partners in during it; the report."""
    report = Report()
    if plan.warm_up:
        report.baseline = await timed_login(
            plan, plan.partner_source, plan.warm_up_user
        )
    heard: Counter[str] = Counter()
    banned: set[str] = set()
    stop = asyncio.Event()
    began = time.perf_counter()
    attackers = [
        asyncio.create_task(_attacker(plan, source, heard, banned, stop))
        for source in plan.sources
        for _ in range(plan.per_source)
    ]
    await asyncio.sleep(plan.partner_after)
    partners = [timed_login(plan, plan.partner_source, plan.partner_user)]
    if plan.fresh_source is not None:
        partners.append(timed_login(plan, plan.fresh_source, plan.fresh_user))
    logins = await asyncio.gather(*partners)
    report.partner = logins[0]
    report.fresh = logins[1] if len(logins) > 1 else None
    remaining = plan.seconds - (time.perf_counter() - began)
    if not plan.until_banned:
        remaining = 0.0
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*attackers), max(remaining, 0.0))
    stop.set()
    report.flood_seconds = time.perf_counter() - began
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    report.replies = dict(heard)
    report.banned = sorted(banned)
    return report


def flood(plan: Plan) -> Report:
    """``run`` on a fresh event loop (from synchronous code)."""
    return asyncio.run(run(plan))


def main() -> None:
    """Read a ``Plan`` (JSON) on stdin, print the ``Report`` (JSON) on stdout."""
    plan = Plan(**json.load(sys.stdin))
    print(json.dumps(asdict(flood(plan))))


def report_from_json(text: str) -> Report:
    """The ``Report`` that ``main`` printed."""
    fields = json.loads(text)
    for name in ("baseline", "partner", "fresh"):
        if fields[name] is not None:
            fields[name] = Login(**fields[name])
    return Report(**fields)


if __name__ == "__main__":
    main()
