"""Where a worker's IO loop spends the sessions row: does it ever wait on another process?

Issue 17's last "done when": a profile of the session run shows no sample waiting on
another process inside the IO loop. Before issue 17, 22% of all samples were a worker
blocked in ``StateChannel.call`` (the supervisor's synchronous answer) on its loop.

What it does: starts the gateway as ``bench.py`` does (two workers by default, every
security feature on), warms it up, then samples the supervisor and its workers with
``py-spy record --subprocesses --idle`` (idle samples included: a wait is what we look
for) while ``bench.py``'s sessions load runs (16 client processes: TLS login, EPSV,
4 KiB RETR, QUIT). It prints, for the workers' IO loop threads (the main thread):

- the share of samples in the loop's own poll (idle, waiting for events),
- the samples whose stack is inside a call to another process: the supervisor's
  state channel (``service/sharedstate.py``), Redis (``redis``/``service/cluster*``),
  or any blocking receive, lock or sleep outside the poll; each such stack is listed,
- the heaviest leaf functions of the busy samples.

    .venv/bin/pip install py-spy      # not a project dependency: a measuring tool
    .venv/bin/python bench/loop_profile.py --seconds 10
    .venv/bin/python bench/loop_profile.py --cluster   # one node with [cluster] (Redis)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as driver

# A frame of py-spy's raw (collapsed) output: "function (file:line)".
_FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# The loop's own wait for events (idle): pyftpdlib's poller.
_POLL = ("_BasePollEpoll.poll (pyftpdlib/ioloop.py", "Poll.poll (pyftpdlib/ioloop.py")
# Frames that mean "waiting for another process" when seen on the loop thread.
_OTHER_PROCESS = ("service/sharedstate.py", "service/cluster", "redis/", "/redis")
# Leaves that block: a receive, a lock, a sleep, a select outside the loop's poll.
_BLOCKING = ("recv", "acquire", "sleep", "select", "wait", "read", "connect")


def _is_loop_poll(stack: str) -> bool:
    frames = stack.split(";")
    return bool(frames) and any(marker in frames[-1] for marker in _POLL)


def analyse(raw: Path, worker_pids: set[int]) -> list[str]:
    """The report lines for the workers' main threads in ``raw`` (py-spy --format raw)."""
    total = idle = waiting = 0
    waits: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # Process frames come first, outermost first ('process 1234:"argv"'; the
        # worker's is the last), then the thread's ("thread (1234): MainThread").
        processes = [f for f in frames if f.startswith("process ")]
        pid_match = re.match(r"process (\d+)", processes[-1] if processes else "")
        if pid_match is None or int(pid_match.group(1)) not in worker_pids:
            continue
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not any("ioloop.py" in f for f in code):
            continue  # not the IO loop thread (argon2, file work, hash lane...)
        total += count
        joined = ";".join(code)
        if _is_loop_poll(joined):
            idle += count
            continue
        leaf = code[-1]
        leaves[leaf] += count
        other = any(marker in f for f in code for marker in _OTHER_PROCESS)
        if other and any(word in leaf.lower() for word in _BLOCKING):
            waiting += count
            waits[" <- ".join(reversed(code[-6:]))] += count
    lines = [
        f"IO loop samples (workers' main threads): {total}",
        f"  in the loop's own poll (idle): {idle} ({_share(idle, total)})",
        f"  busy: {total - idle} ({_share(total - idle, total)})",
        (
            "  waiting on another process (state channel, Redis) inside the loop: "
            f"{waiting} ({_share(waiting, total)})"
        ),
    ]
    for stack, count in waits.most_common(10):
        lines.append(f"    {count:6d}  {stack}")
    lines.append("  heaviest leaves of the busy samples:")
    for leaf, count in leaves.most_common(15):
        lines.append(f"    {count:6d}  {_share(count, total - idle):>6}  {leaf}")
    return lines


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def main(argv: list[str] | None = None) -> int:
    """Run the sessions load under py-spy; print where the workers' loops were."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--workers", type=int, default=2, help="without --cluster")
    parser.add_argument("--cluster", action="store_true", help="with [cluster] Redis")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw output here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is needed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    for line in driver.machine_lines():
        print(line)
    root = Path(tempfile.mkdtemp(prefix="ftpsloop-"))
    raw = args.keep or root / "loop.raw"
    server = None
    try:
        space = driver.prepare_workspace(root, 1 << 20)
        if args.cluster:  # a redis-server of its own, stopped with the node
            server = driver.start_cluster_node(space)
        else:
            server = driver.start_gateway(space, workers=args.workers)
        assert server.pid is not None
        profile = replace(driver.PROFILES["quick"], session_seconds=args.seconds)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(profile.clients, mp_context=context) as pool:
            # Warm-up, as bench.py's run: the first logins (argon2, then the cache).
            driver.login_cpu_seconds(server)
            with contextlib.suppress(driver.BenchError):
                warm = replace(profile, session_seconds=2.0)
                driver.measure_sessions(server, warm, pool)
            workers = set(driver.process_tree(server.pid)) - {server.pid}
            spy_run = subprocess.Popen(
                [
                    spy, "record", "--pid", str(server.pid), "--subprocesses",
                    "--idle", "--threads", "--rate", str(args.rate),
                    "--duration", str(int(args.seconds) + 2), "--format", "raw",
                    "--output", str(raw), "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(1.0)
            sample = driver.measure_sessions(server, profile, pool)
            _, spy_errors = spy_run.communicate(timeout=args.seconds + 60)
        if spy_run.returncode != 0 or not raw.exists():
            print(
                f"py-spy failed: {spy_errors.decode(errors='replace')}", file=sys.stderr
            )
            return 1
        print(
            f"sessions/s during the profile: {sample.value:.1f}, p99 {sample.note} ms"
            f" ({args.workers} workers{', Redis' if args.cluster else ''},"
            f" py-spy at {args.rate} Hz, non-blocking sampling)"
        )
        for line in analyse(raw, workers):
            print(line)
    except driver.BenchError as err:
        print(f"measurement failed: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            with contextlib.suppress(OSError):
                driver.stop_server(server)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
