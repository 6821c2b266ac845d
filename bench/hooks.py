"""Benchmark for issue 16: 4 KiB uploads/s with and without event hooks, in one run.

Two gateways run side by side, identical but for one ``[[hooks]]`` entry: every
upload of the second is POSTed (signed) to a receiver that takes 1 s per request,
far slower than uploads arrive. The hooks must not slow the transfers: the spool
write and its fsync, and every delivery, happen off the IO loop. Rounds alternate
in blocks of 50 uploads (without, with, without, ...) so a busy machine moves both
columns alike; the report gives median, min-max and the ratio of uploads/s and of
the server's CPU per upload (from /proc: robust against the machine's load), then
the hook queue as ``/metrics`` shows it at the end (depth, age of the oldest event,
delivered so far).

Run from the repository root, in the project's virtualenv::

    .venv/bin/python bench/hooks.py            # 200 uploads x 3 rounds per gateway
    .venv/bin/python bench/hooks.py --long     # 1,000 uploads x 5 rounds (issue 16)
    .venv/bin/python bench/hooks.py --smoke    # seconds; what tests/bench runs

Each gateway is ``python -m ftps_gateway serve`` with one worker process (the
strictest case: one IO loop serves the uploads and hands every event over), an
ECDSA certificate from ``gen-cert``, a production argon2id hash, audit to a file
and the metrics endpoint on. The client is one ``ReusingFTP_TLS`` session with
TCP_NODELAY (as curl sets it), STOR of 4 KiB to a new name in a loop.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BenchFTP  # noqa: E402  (the same client as bench.py's rows)

SMALL_BYTES = 4096
USER = "bench"
BLOCK = 50  # uploads per gateway before switching to the other one
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Profile:
    """How many uploads, how many rounds."""

    uploads: int
    rounds: int


PROFILES = {
    "long": Profile(1000, 5),
    "short": Profile(200, 3),
    "smoke": Profile(20, 1),
}


@dataclass
class Gateway:
    """One gateway under test."""

    name: str
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # server CPU per upload


class BenchError(Exception):
    """A server did not start or a measurement failed."""


class SlowReceiver:
    """A hook receiver that takes ``seconds`` per request (then 204)."""

    def __init__(self, seconds: float) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(seconds)
                with receiver._lock:
                    receiver.requests += 1
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def _run(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ftps_gateway", *args], input=stdin, text=True,
        capture_output=True, check=True, cwd=REPO,
    )  # fmt: skip
    return done.stdout.strip()


def _free_port_block(size: int) -> tuple[int, int]:
    """A passive range below the ephemeral ports, free now."""
    for _ in range(50):
        start = secrets.randbelow(10000 - size) + 20000
        try:
            for port in (start, start + size - 1):
                with socket.create_server(("127.0.0.1", port)):
                    pass
        except OSError:
            continue
        return start, start + size - 1
    raise BenchError("no free passive port block in 20000-29999")


def start_gateway(root: Path, name: str, password_hash: str, hook: str) -> Gateway:
    """``ftps-gateway serve`` with one worker; ``hook``: a [[hooks]] table or ""."""
    directory = root / name
    directory.mkdir()
    low, high = _free_port_block(100)
    config = directory / "gateway.toml"
    config.write_text(
        f"""
[server]
listen = ["127.0.0.1:0"]
workers = 1
[tls]
certificate = "{root / "certs/server.crt"}"
private_key = "{root / "certs/server.key"}"
[passive]
ports = "{low}-{high}"
[storage]
root = "{directory / "storage"}"
[access]
allow = ["127.0.0.0/8"]
[admin]
socket = "{directory / "admin.sock"}"
[logging]
audit_file = "{directory / "audit.jsonl"}"
[metrics]
listen = "127.0.0.1:0"
[[users]]
name = "{USER}"
password = "{password_hash}"
{hook}
""",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "ftps_gateway", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    ports: dict[str, int] = {}
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    for line in process.stderr:
        match = re.search(r"listening for explicit FTPS on [^ ]+:(\d+)", line)
        if match:
            ports["ftp"] = int(match[1])
        match = re.search(r"serving /metrics.* on [^ ]+:(\d+)", line)
        if match:
            ports["metrics"] = int(match[1])
        if len(ports) == 2 or time.monotonic() > deadline:
            break
    if len(ports) != 2:
        process.kill()
        raise BenchError(f"{name} did not start")
    # Keep reading stderr: a full pipe would stall the server.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # type: ignore[union-attr]
    return Gateway(name, process, ports["ftp"], ports["metrics"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def login(gateway: Gateway, password: str, ca: Path) -> BenchFTP:
    """One session with PROT P whose data connections resume its TLS session."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    ftp = BenchFTP(context=context, timeout=60)
    ftp.connect("127.0.0.1", gateway.port)
    ftp.login(USER, password)
    ftp.prot_p()
    return ftp


def measure_round(
    gateways: list[Gateway], password: str, ca: Path, profile: Profile, round_: int
) -> None:
    """``profile.uploads`` 4 KiB STORs per gateway, one session each, in alternating
    blocks of ``BLOCK`` so that the machine's load drifts over both alike; records
    uploads/s and server CPU per upload of each gateway."""
    sessions = [login(gateway, password, ca) for gateway in gateways]
    payload = os.urandom(SMALL_BYTES)
    seconds = [0.0] * len(gateways)
    cpu = [0.0] * len(gateways)
    for block in range(0, profile.uploads, BLOCK):
        for index, (gateway, ftp) in enumerate(zip(gateways, sessions, strict=True)):
            cpu_before = cpu_seconds(gateway.process.pid)
            began = time.perf_counter()
            for n in range(block, min(block + BLOCK, profile.uploads)):
                ftp.storbinary(f"STOR r{round_}-{n}.bin", io.BytesIO(payload))
            seconds[index] += time.perf_counter() - began
            cpu[index] += cpu_seconds(gateway.process.pid) - cpu_before
    for index, (gateway, ftp) in enumerate(zip(gateways, sessions, strict=True)):
        ftp.quit()
        gateway.rates.append(profile.uploads / seconds[index])
        gateway.cpu_ms.append(cpu[index] / profile.uploads * 1000)
        print(
            f"  round {round_ + 1} {gateway.name}: {gateway.rates[-1]:,.1f} uploads/s,"
            f" server CPU {gateway.cpu_ms[-1]:.2f} ms per upload",
            flush=True,
        )


def hook_metrics(gateway: Gateway) -> dict[str, float]:
    """The hook series of ``/metrics``."""
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r"(ftps_gateway_hook_[a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            found[match[1]] = float(match[2])
    return found


def _stats(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def run(kind: str, receiver_seconds: float) -> int:
    """Start the receiver and both gateways, measure interleaved, report."""
    profile = PROFILES[kind]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python "
        f"{platform.python_version()}, {ssl.OPENSSL_VERSION}"
    )
    print(f"profile: {kind} ({profile.uploads} uploads x {profile.rounds} rounds per"
          f" gateway), receiver {receiver_seconds} s per request")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="ftpshooks-"))
    receiver = SlowReceiver(receiver_seconds)
    gateways: list[Gateway] = []
    try:
        _run("gen-cert", "--hostname", "localhost", "--out", str(root / "certs"))
        password = secrets.token_urlsafe(16)
        password_hash = _run("hash-password", stdin=password + "\n")
        secret = root / "hook.secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)
        hook = (
            f'[[hooks]]\nname = "slow"\nevents = ["upload"]\nurl = "{receiver.url}"\n'
            f'secret_file = "{secret}"\n'
        )
        gateways = [
            start_gateway(root, "without-hooks", password_hash, ""),
            start_gateway(root, "with-hooks", password_hash, hook),
        ]
        for round_ in range(profile.rounds):
            measure_round(
                gateways, password, root / "certs/server.crt", profile, round_
            )
        without, with_hooks = gateways
        print(
            "\n| row | without hooks median (min-max) | with hooks, receiver "
            f"{receiver_seconds:g} s/request | ratio with/without |"
        )
        print("|---|---|---|---|")
        rows = (
            ("4 KiB uploads/s, one session", without.rates, with_hooks.rates),
            ("server CPU per upload, ms", without.cpu_ms, with_hooks.cpu_ms),
        )
        for label, first, second in rows:
            ratio = statistics.median(second) / statistics.median(first)
            print(f"| {label} | {_stats(first)} | {_stats(second)} | {ratio:.2f} |")
        series = hook_metrics(with_hooks)
        prefix = "ftps_gateway_hook_"
        results = {
            result: series.get(f'{prefix}deliveries_total{{result="{result}"}}', 0)
            for result in ("delivered", "failed", "dropped")
        }
        print(
            f"\nwith-hooks /metrics after {profile.uploads * profile.rounds} uploads: "
            f"{prefix}events_queued {series.get(prefix + 'events_queued', 0):.0f}, "
            f"{prefix}oldest_queued_age_seconds "
            f"{series.get(prefix + 'oldest_queued_age_seconds', 0):.1f}, "
            + ", ".join(f"{name} {value:.0f}" for name, value in results.items())
            + f"; the receiver answered {receiver.requests} requests"
        )
    except (BenchError, OSError, subprocess.CalledProcessError) as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    finally:
        for gateway in gateways:
            gateway.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gateway.process.wait(15)
            if gateway.process.poll() is None:
                gateway.process.kill()
                gateway.process.wait()
        receiver.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--long", action="store_true", help="1,000 uploads x 5 rounds")
    size.add_argument("--smoke", action="store_true", help="20 uploads, 1 round")
    parser.add_argument(
        "--receiver-seconds", type=float, default=1.0, help="per request (1.0)"
    )
    args = parser.parse_args(argv)
    kind = "long" if args.long else "smoke" if args.smoke else "short"
    return run(kind, args.receiver_seconds)


if __name__ == "__main__":
    sys.exit(main())
