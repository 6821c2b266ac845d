"""A strict FTPS client for the namespace labs: many sessions, one JSON line each.

Run inside a namespace as ``python ftpsclient.py SPEC.json`` (``run_sessions`` does
that). Each session connects from its own source address, logs in, asks ``SITE
DIAG`` which node answered and what address it sees, uploads a payload and
(optionally) downloads it back, all over TLS with data connections resuming the
control session (``ReusingFTP_TLS``).

It is strict on purpose, because friendly clients hide exactly the mistakes these
tests look for (``CLIENTS.md``): a 227 address is used as sent
(``trust_server_pasv_ipv4_address``: a wrong masquerade address fails instead of
being replaced by the control address, as curl and ftplib do by default), and a
failed session is reported, never retried (lftp retries on a new connection, which
hides a balancer sending data connections to the wrong node).

Events go to stdout as they happen, one JSON object per line: ``transfer_started``
once an upload's data connection is open (the drain test waits for it) and
``result`` per session. Only the standard library and ``ftps_gateway.client``.
"""

from __future__ import annotations

import ftplib
import hashlib
import json
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ftps_gateway.selftest.client import ReusingFTP_TLS

_print_lock = threading.Lock()
LAB_VIP = "203.0.113.1"  # the name in the balancer lab's certificate
HOLD_SECONDS = 30  # longest wait for a test's go-ahead (see StrictFTP.hold)


def payload(name: str, size: int) -> bytes:
    """The bytes uploaded as ``name``: reproducible, so tests can check the disk."""
    return random.Random(name).randbytes(size)


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def emit(event: dict[str, Any]) -> None:
    """One JSON line to stdout, whole even with several sessions running."""
    with _print_lock:
        print(json.dumps(event), flush=True)


class StrictFTP(ReusingFTP_TLS):
    """Uses the 227 address as sent (or EPSV), with a short data-connect timeout.

    ``last_passive`` records what the server advertised, so a test can say which
    address a failing client was sent to.
    """

    trust_server_pasv_ipv4_address = True

    def __init__(
        self, *, epsv: bool, data_connect_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.epsv = epsv
        self.data_connect_timeout = data_connect_timeout
        self.last_passive: tuple[str, int] | None = None
        # Set for one transfer: announce the passive port, then wait for this file
        # before connecting (a test lets a stranger at the port first).
        self.hold: Path | None = None
        self.label: dict[str, Any] = {}

    def makepasv(self) -> tuple[str, int]:
        """PASV (address as sent) or EPSV (the control connection's address)."""
        if self.epsv:
            host, port = ftplib.parse229(self.sendcmd("EPSV"), self.sock.getpeername())
        else:
            host, port = ftplib.parse227(self.sendcmd("PASV"))
        self.last_passive = (host, port)
        if self.hold is not None:
            hold, self.hold = self.hold, None
            emit({"event": "passive", "host": host, "port": port, **self.label})
            deadline = time.monotonic() + HOLD_SECONDS
            while not hold.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return host, port

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, Any]:
        """Connect the data socket with ``data_connect_timeout``, then go on as usual.

        ftplib connects data sockets with the control timeout; a short one here shows
        an unreachable passive address in seconds.
        """
        control_timeout = self.timeout
        self.timeout = self.data_connect_timeout
        try:
            conn, size = super().ntransfercmd(cmd, rest)
        finally:
            self.timeout = control_timeout
        conn.settimeout(control_timeout)
        return conn, size


class _SlowReader:
    """A file-like payload for ``storbinary`` that sleeps between blocks.

    Makes an upload last long enough to be running when a node is told to drain;
    announces itself with ``transfer_started`` on the first read (by then the data
    connection is open and the server has answered 150).
    """

    def __init__(self, data: bytes, delay: float, on_start: Any) -> None:
        self.data, self.delay, self.on_start = data, delay, on_start
        self.position = 0

    def read(self, size: int) -> bytes:
        if self.position == 0:
            self.on_start()
        elif self.delay:
            time.sleep(self.delay)
        block = self.data[self.position : self.position + size]
        self.position += len(block)
        return block


def parse_diag(reply: str) -> dict[str, str]:
    """The `` name: value`` lines of a SITE DIAG reply."""
    facts = {}
    for line in reply.splitlines():
        if line.startswith(" ") and ": " in line:
            name, _, value = line.strip().partition(": ")
            facts[name] = value
    return facts


def run_session(spec: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    """One session, start to finish; never raises: failures are in the result."""
    name = session["name"]
    result: dict[str, Any] = {
        "event": "result", "name": name, "source": session["source"],
        "mode": session["mode"], "ok": False, "stage": "connect",
        "started": time.time(),
    }  # fmt: skip
    context = ssl.create_default_context(cafile=spec["ca_file"])
    ftp = StrictFTP(
        epsv=session["mode"] == "epsv",
        data_connect_timeout=spec["data_connect_timeout"],
        context=context,
        timeout=spec["timeout"],
    )
    try:
        ftp.connect(spec["host"], spec["port"], source_address=(session["source"], 0))
        result["stage"] = "login"
        ftp.login(spec["user"], spec["password"])
        ftp.prot_p()
        result["stage"] = "diag"
        diag = parse_diag(ftp.sendcmd("SITE DIAG"))
        result["node"] = diag.get("node")
        result["client_ip"] = diag.get("client-ip")
        result["passive_address"] = diag.get("passive-address")
        data = payload(name, session["size"])
        result["sent_sha256"] = sha256(data)
        result["stage"] = "upload"

        def started() -> None:
            result["transfer_started"] = time.time()
            emit({"event": "transfer_started", "name": name, "node": result["node"]})

        reader = _SlowReader(data, session.get("delay", 0.0), started)
        ftp.storbinary(f"STOR {name}", reader, blocksize=session.get("block", 8192))
        result["upload_reply"] = ftp.lastresp
        result["upload_finished"] = time.time()
        result["passive"] = ftp.last_passive
        if session.get("download", True):
            result["stage"] = "download"
            if "hold_download" in session:
                ftp.hold = Path(session["hold_download"])
                ftp.label = {"name": name, "node": result["node"]}
            received = bytearray()
            ftp.retrbinary(f"RETR {name}", received.extend)
            result["received_sha256"] = sha256(bytes(received))
        result["stage"] = "done"
        result["ok"] = True
    except (OSError, EOFError, ftplib.Error, ValueError) as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["passive"] = ftp.last_passive
    finally:
        result["finished"] = time.time()
        if result["ok"]:
            try:
                ftp.quit()
            except (OSError, EOFError, ftplib.Error):
                ftp.close()  # a draining node may already have said 421 and gone
        else:
            ftp.close()
    emit(result)
    return result


def grab(host: str, port: int, source: str, ca_file: str) -> dict[str, Any]:
    """Connect to a data port as a stranger would (new TLS session); count the bytes.

    What another partner, or a host next to the nodes, gets from a port announced
    to someone else: it must be nothing. The certificate is checked against the
    VIP's name, whichever address was dialled. It reads until the server closes
    or 5 s pass without data, so a test can let the real partner send its RETR
    meanwhile (a server that gave the stranger the data connection would then
    send the file to the stranger).
    """
    outcome: dict[str, Any] = {"connected": False, "handshake": False, "bytes": 0}
    try:
        raw = socket.create_connection((host, port), 5, source_address=(source, 0))
        outcome["connected"] = True
        context = ssl.create_default_context(cafile=ca_file)
        with context.wrap_socket(raw, server_hostname=LAB_VIP) as stream:
            outcome["handshake"] = True
            emit({"event": "handshake"})  # the test lets the partner go on now
            stream.settimeout(5)
            while chunk := stream.recv(65536):
                outcome["bytes"] += len(chunk)
    except (OSError, ValueError) as err:
        outcome["error"] = f"{type(err).__name__}: {err}"
    return outcome


def main(argv: list[str]) -> int:
    """Run the sessions of the spec file ``argv[0]``; exit 0 (results say the rest).

    ``grab HOST PORT SOURCE CA_FILE`` instead runs ``grab``: a ``handshake`` event
    once TLS is up, then ``grabbed`` with what it got.
    """
    if argv[0] == "grab":
        host, port, source, ca_file = argv[1:5]
        emit({"event": "grabbed", **grab(host, int(port), source, ca_file)})
        return 0
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    with ThreadPoolExecutor(max_workers=spec["concurrency"]) as pool:
        list(pool.map(lambda s: run_session(spec, s), spec["sessions"]))
    return 0


# --- the test side: write a spec, run this file in a namespace, read the lines


def sessions(
    prefix: str,
    count: int,
    sources: list[str],
    size: int,
    modes: tuple[str, ...] = ("pasv", "epsv"),
    **extra: Any,
) -> list[dict[str, Any]]:
    """``count`` session descriptions cycling through ``sources`` and ``modes``."""
    return [
        {
            "name": f"{prefix}{number:04d}.bin",
            "source": sources[number % len(sources)],
            "mode": modes[number % len(modes)],
            "size": size,
            **extra,
        }
        for number in range(count)
    ]


def spec_file(
    path: Path,
    host: str,
    port: int,
    ca_file: Path,
    password: str,
    session_list: list[dict[str, Any]],
    concurrency: int = 8,
    timeout: float = 20,
    data_connect_timeout: float = 5,
) -> Path:
    """Write the spec ``main`` reads; the password file is readable by root only."""
    path.write_text(
        json.dumps(
            {
                "host": host, "port": port, "ca_file": str(ca_file),
                "user": "acme", "password": password, "sessions": session_list,
                "concurrency": concurrency, "timeout": timeout,
                "data_connect_timeout": data_connect_timeout,
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    path.chmod(0o600)
    return path


def command(spec: Path) -> list[str]:
    """The argv that runs ``spec``'s sessions (wrap it with ``Lab.exec_argv``)."""
    return [sys.executable, str(Path(__file__).resolve()), str(spec)]


def grab_command(host: str, port: int, source: str, ca_file: Path) -> list[str]:
    """The argv that runs ``grab`` (wrap it with ``Lab.exec_argv``)."""
    return [sys.executable, str(Path(__file__).resolve()), "grab", host, str(port),
            source, str(ca_file)]  # fmt: skip


def parse_events(stdout: str) -> list[dict[str, Any]]:
    """The JSON events of one run's stdout."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def results_of(stdout: str) -> list[dict[str, Any]]:
    """Only the per-session results, in the order of the spec's names."""
    results = [e for e in parse_events(stdout) if e["event"] == "result"]
    return sorted(results, key=lambda r: r["name"])


def run(
    exec_argv: list[str], spec: Path, timeout: float
) -> tuple[list[dict[str, Any]], str]:
    """Run the sessions in the namespace ``exec_argv`` enters; (results, explanation)."""
    done = subprocess.run(
        [*exec_argv, *command(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    why = (
        f"client exit code {done.returncode}\n--- client stderr ---\n"
        f"{done.stderr[-4000:]}"
    )
    return results_of(done.stdout), why


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
