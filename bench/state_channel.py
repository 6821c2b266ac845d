"""How long a worker's IO loop waits on the supervisor per session: before and after.

Decision 0005 (docs/decisions/0005-shared-state.md). Before it, each session made
five synchronous round trips to the supervisor on the IO loop (``is_banned`` and
``open`` at connect, ``login``, then ``logout`` and ``close``), each one a message
each way over the ``SOCK_SEQPACKET`` pair; the loop served nobody meanwhile. Now
``is_banned`` is a local lookup, the login slot is one asynchronous request (the
loop goes on; the answer arrives as a message) and the logout is fire and forget.

This measures both on the real channel, with the supervisor's side
(``StateService`` over a ``LocalState``) in its own process, as in production:

- *blocking*: a request sent, then ``recv`` until its answer, the way the old
  ``StateChannel.call`` did (the same one-message-each-way cost); the figure is
  the time the loop would have stood still, per call and per session (x5);
- *non-blocking*: the time a session's calls take on the loop now
  (``ChannelState.login`` + ``logout`` + sending the batch), and, apart, how long the
  login's answer takes to come back (latency a paused session sees, while the loop
  serves everyone else).

Run from the repository root in the project's virtualenv::

    .venv/bin/python bench/state_channel.py [--sessions 5000]

The machine's load is printed: the blocking figures grow with it (the supervisor
must be scheduled before the loop can go on), the non-blocking ones do not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import statistics
import time
from typing import TYPE_CHECKING

from ftps_gateway.config import DefenderSettings
from ftps_gateway.service.sharedstate import (
    MAX_MESSAGE_BYTES,
    ChannelState,
    StateService,
    channel_pair,
)
from ftps_gateway.session.state import LocalState, LoginSlot, StateSettings

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

SETTINGS = StateSettings(DefenderSettings(), (), 64, 1_000_000, 1_000_000, 1_000_000)


def supervisor(conn: socket.socket) -> None:
    """The supervisor's side, in its own process, until the channel closes."""
    service = StateService(LocalState(SETTINGS))
    service.serve(conn, 0).join()


def blocking_round_trips(conn: socket.socket, count: int) -> list[float]:
    """Seconds per request answered synchronously (the old way)."""
    conn.setblocking(True)  # noqa: FBT003 - the stdlib's signature
    times = []
    for index in range(count):
        request = {"ops": [["login", index + 1, "192.0.2.1", f"u{index}"]]}
        started = time.perf_counter()
        conn.send(json.dumps(request).encode())
        while True:
            message = json.loads(conn.recv(MAX_MESSAGE_BYTES))
            if "replies" in message:
                break
        times.append(time.perf_counter() - started)
        conn.send(
            json.dumps({"ops": [["logout", 0, "192.0.2.1", f"u{index}"]]}).encode()
        )
    return times


class DirectPort:
    """A ``Port`` that sends on the socket at once (as ``MessagePort`` does when
    the socket has room)."""

    queued = 0

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def send_message(self, data: bytes) -> None:
        """Send one message."""
        self._conn.send(data)

    def close(self) -> None:
        """Nothing to do here."""


def non_blocking(conn: socket.socket, count: int) -> tuple[list[float], list[float]]:
    """(seconds on the loop per session, seconds until the login's answer)."""
    state = ChannelState(conn, SETTINGS, on_lost=lambda: None)
    flushes: list[Callable[[], None]] = []
    state.attach(DirectPort(conn), flushes.append)
    on_loop, answer_after = [], []
    for index in range(count):
        slot = LoginSlot("192.0.2.1", f"u{index}")
        answered: list[float] = []
        started = time.perf_counter()
        state.login(slot, lambda _r, a=answered: a.append(time.perf_counter()))
        flushes.pop()()
        spent = time.perf_counter() - started
        while not answered:  # the loop would serve others here; we just wait
            select.select([conn], [], [])
            state.handle_message(conn.recv(MAX_MESSAGE_BYTES))
        answer_after.append(answered[0] - started)
        started = time.perf_counter()
        state.logout(slot)
        flushes.pop()()
        on_loop.append(spent + time.perf_counter() - started)
    return on_loop, answer_after


def _line(name: str, seconds: list[float]) -> str:
    micro = sorted(s * 1e6 for s in seconds)
    p99 = micro[int(len(micro) * 0.99) - 1]
    return (
        f"{name}: median {statistics.median(micro):.0f} us, p99 {p99:.0f} us, "
        f"max {micro[-1]:.0f} us"
    )


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=5000)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in ("blocking", "non-blocking"):
        ours, theirs = channel_pair()
        process = context.Process(target=supervisor, args=(theirs,))
        process.start()
        theirs.close()
        # The ban list comes first (as a worker reads it before serving anyone).
        ChannelState(ours, SETTINGS, on_lost=lambda: None).sync(30)
        if name == "blocking":
            results[name] = blocking_round_trips(ours, args.sessions)
        else:
            results[name] = non_blocking(ours, args.sessions)  # type: ignore[assignment]
        ours.close()
        process.join(10)
    blocking = results["blocking"]
    on_loop, answer_after = results["non-blocking"]  # type: ignore[misc]
    print(_line("before: one synchronous round trip, loop stopped", blocking))
    per_session = [sum(blocking[i : i + 5]) for i in range(0, len(blocking) - 4, 5)]
    print(_line("before: loop stopped per session (5 round trips)", per_session))
    print(_line("after:  loop busy per session (login + logout sent)", on_loop))
    print(
        _line("after:  login answer arrives after (loop serving others)", answer_after)
    )
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
