"""Draining one of two nodes behind HAProxy: transfers finish, new sessions move.

The lab of ``balancer`` with HAProxy checking each node's ``/readyz`` every 200 ms
(down after one failure), ``balance source`` with consistent hashing on the control
port and on the passive range (passive servers track their control server). While
8 throttled uploads (about 11 s each) run, the node holding most of them gets
SIGTERM, as ``systemctl stop`` or ``docker stop`` would send:

- its ``/readyz`` answers 503 at once, and HAProxy marks it down;
- new sessions, from every client address including those of its running uploads,
  all reach the other node and stay intact, while it is still draining;
- its running uploads finish: 226, whole on its disk; then it exits 0, having cut
  no transfer.

Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from network import balancer, ftpsclient

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

RUNNING = 8  # uploads in flight when the node is told to stop
RUNNING_SIZE = 1024 * 1024
BLOCK = 32 * 1024
BLOCK_DELAY = 0.35  # 32 blocks: about 11 s per upload, time to move new sessions
NEW_SESSIONS = 16
STATE_TIMEOUT = 15  # seconds for a state change we wait for (loaded CI machine)


def readyz_status(deployment: balancer.TwoNodes, node: str) -> str:
    """The node's /readyz status code as HAProxy would get it (from its namespace)."""
    probe = (
        "import urllib.error, urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen({deployment.nodes[node].readyz!r}, timeout=3).status)\n"
        "except urllib.error.HTTPError as err:\n"
        "    print(err.code)\n"
        "except OSError as err:\n"
        "    print(type(err).__name__)\n"
    )
    result = deployment.lab.run(
        deployment.lab.balancer, [sys.executable, "-c", probe], timeout=30
    )
    return result.stdout.strip()


def wait_for(what: str, check: Any, explain: Any) -> None:
    """Poll ``check()`` until true, or fail saying ``what`` did not happen."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {STATE_TIMEOUT} s\n{explain()}")
        time.sleep(0.1)


def test_sigterm_drains_a_node_behind_haproxy(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM to a node during uploads: its uploads finish intact, HAProxy takes it
    out on /readyz, and every new session lands on the other node, intact."""
    directory: Path = tmp_path_factory.mktemp("drain")
    with balancer.two_nodes(
        ca,
        directory,
        haproxy={"control": "source", "passive": "source", "checks": True},
    ) as deployment:
        lab = deployment.lab
        running = ftpsclient.sessions(
            "drain-running-", RUNNING, balancer.CLIENT_SOURCES[:RUNNING],
            RUNNING_SIZE, delay=BLOCK_DELAY, block=BLOCK, download=False,
        )  # fmt: skip
        spec = deployment.spec(running, concurrency=RUNNING, timeout=60)
        output = lab.start(lab.client, ftpsclient.command(spec), "running-client")
        client = lab.named["running-client"]

        def events() -> list[dict[str, Any]]:
            return ftpsclient.parse_events(output.read_text(encoding="utf-8"))

        def all_begun() -> bool:
            # Each session has either started its upload or already failed.
            return len({e["name"] for e in events()}) == RUNNING

        wait_for("the uploads did not start", all_begun, events)
        started = [e for e in events() if e["event"] == "transfer_started"]
        assert len(started) == RUNNING, f"{events()}\n{deployment.explain()}"
        victim, _ = collections.Counter(e["node"] for e in started).most_common(1)[0]
        [survivor] = set(deployment.nodes) - {victim}

        sigterm_at = time.time()
        lab.named[victim].send_signal(signal.SIGTERM)
        wait_for(
            f"{victim}'s /readyz did not turn 503",
            lambda: readyz_status(deployment, victim) == "503",
            deployment.explain,
        )
        wait_for(
            f"HAProxy did not mark {victim} down",
            lambda: deployment.server_status("control_nodes", victim).startswith(
                "DOWN"
            ),
            deployment.explain,
        )
        assert deployment.server_status("control_nodes", survivor) == "UP"

        fresh = ftpsclient.sessions(
            "drain-new-", NEW_SESSIONS, balancer.CLIENT_SOURCES, 32 * 1024
        )
        results, why = deployment.run(fresh, concurrency=8)
        assert balancer.intact_problems(deployment, results) == [], why
        assert {r["node"] for r in results} == {survivor}, why
        # The sessions moved while the victim was still finishing its uploads.
        assert lab.named[victim].poll() is None, "the draining node exited too soon"

        try:
            client.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the running uploads never ended\n{deployment.explain()}")
        finished = [e for e in events() if e["event"] == "result"]
        why = f"{finished}\n{deployment.explain()}"
        assert all(r["ok"] for r in finished), why
        on_victim = [r for r in finished if r["node"] == victim]
        assert on_victim, why
        for result in on_victim:
            assert (
                result["transfer_started"] < sigterm_at < result["upload_finished"]
            ), why
            assert result["upload_reply"].startswith("226"), why
            stored = deployment.stored_on(result["name"])
            assert stored == {victim: result["sent_sha256"]}, why

        try:
            exit_code = lab.named[victim].wait(40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{victim} did not exit after draining\n{deployment.explain()}")
        assert exit_code == 0, deployment.explain()
        drained = [
            r
            for r in deployment.nodes[victim].audit()
            if r["event"] == "drain_finished"
        ]
        assert drained, deployment.explain()
        assert all(r["transfers_cut"] == 0 for r in drained), drained
