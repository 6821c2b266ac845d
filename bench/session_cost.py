"""Server CPU per FTPS session in instructions, under callgrind (issue 17's figure).

Why instructions: this machine is shared, and ``bench.py``'s CPU seconds per session
move with whatever else runs (cache misses, frequency, steal). ``valgrind
--tool=callgrind`` counts the instructions the server executes, which is repeatable
for the same code and inputs whatever the other load (docs/decisions/0011).

What it does: starts the gateway (one process, ``server.workers = 1``, so there is
no supervisor round trip in the figure; ``--workers 2`` counts the supervisor and
both workers) and stock pyftpdlib, each under callgrind, with the same workspace
``bench.py`` builds (ECDSA P-256, production argon2id, ``reuse = "required"``, audit
to a file, metrics, defender). After a warm-up (the argon2 login the login cache
then remembers, imports, first-use caches) it zeroes the counters
(``callgrind_control -z``), runs N sessions one after another (connect, AUTH TLS,
login, PROT P, EPSV, RETR 4 KiB, QUIT; the bench client, TLS 1.3), dumps
(``callgrind_control -d``) and prints instructions per session, and the functions
with the most inclusive instructions per session. ``--uploads`` counts 4 KiB STORs in
one session instead (PASV, resumed data TLS, 226; bench.py's uploads row).

    .venv/bin/python bench/session_cost.py                 # 100 sessions each
    .venv/bin/python bench/session_cost.py --sessions 50 --top 40 --keep /tmp/cg
    .venv/bin/python bench/session_cost.py --uploads --sessions 200   # per upload

Slow (valgrind runs the server ~50x slower): about a minute per 100 sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as driver

if TYPE_CHECKING:
    from collections.abc import Callable

WARMUP_SESSIONS = 5


def callgrind_wrapper(out_dir: Path, name: str, *, children: bool) -> tuple[str, ...]:
    """The valgrind command line in front of a server."""
    return (
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_dir / name}.%p.out",
        "--trace-children=yes" if children else "--trace-children=no",
        # Python's own calls appear as C functions; keep call chains short to
        # keep the dump small, counts are unaffected.
        "--separate-callers=0",
    )


def run_sessions(endpoint: driver.Endpoint, count: int) -> None:
    """``count`` full sessions one after another, as bench.py's sessions row does."""
    context = driver.client_context(endpoint.cafile)
    for _ in range(count):
        ftp = driver.login(endpoint, context)
        data = bytearray()
        ftp.retrbinary(f"RETR {driver.SMALL_NAME}", data.extend)
        ftp.quit()
        if len(data) != driver.SMALL_BYTES:
            raise driver.BenchError("a short RETR")


def run_uploads(endpoint: driver.Endpoint, count: int) -> None:
    """``count`` 4 KiB STORs in one session, as bench.py's uploads row does."""
    ftp = driver.login(endpoint, driver.client_context(endpoint.cafile))
    payload = os.urandom(driver.SMALL_BYTES)
    for index in range(count):
        ftp.storbinary(f"STOR cost-{index}.bin", driver._Reader(payload))  # noqa: SLF001
    ftp.quit()


def _valgrind_pids(root: int) -> list[int]:
    return driver.process_tree(root)


def _control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        capture_output=True,
        timeout=300,
    )


def measure(
    server: driver.Server,
    out_dir: Path,
    name: str,
    sessions: int,
    run: Callable[[driver.Endpoint, int], None] = run_sessions,
) -> tuple[int, list[Path]]:
    """Zero, ``run`` ``sessions`` units, dump; return (instructions, the dumps)."""
    assert server.pid is not None
    run(server.endpoint, WARMUP_SESSIONS)
    time.sleep(1.0)  # let the warm-up's closes and audit writes settle
    pids = _valgrind_pids(server.pid)
    for pid in pids:
        _control("-z", pid)
    run(server.endpoint, sessions)
    time.sleep(1.0)
    before = set(out_dir.glob(f"{name}.*"))
    for pid in pids:
        _control("-d", pid)
    dumps = sorted(set(out_dir.glob(f"{name}.*")) - before)
    total = 0
    for dump in dumps:
        match = re.search(
            r"^summary:\s+(\d+)", dump.read_text(errors="replace"), re.MULTILINE
        )
        if match:
            total += int(match.group(1))
    return total, dumps


# OpenSSL entry points worth naming: where the library's share of a session goes.
_API = re.compile(
    r"(SSL_[A-Za-z_]+|PEM_read_bio_[A-Za-z_]+|OSSL_DECODER_CTX_new_for_pkey)$"
)


# A (compressed) name definition or reference: ob=, fn=, fl= and their callee forms.
_NAME = re.compile(r"^c?(ob|fn|fl|fi|fe)=\((\d+)\)(?: (.*))?$")


def _costs(dump: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(own instructions per library, inclusive instructions per function) of a dump.

    Reads the callgrind format directly (``callgrind_annotate`` 3.19 put every
    instruction on the interpreter's eval loop for these dumps): a cost line after
    ``calls=`` is the callee's inclusive cost, any other cost line is the current
    function's own.
    """
    names: dict[tuple[str, str], str] = {}
    own: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    current = {"ob": "?", "fn": "?"}
    after_call = False
    with dump.open(errors="replace") as lines:
        for line in lines:
            if line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if not after_call:
                    own[Path(current["ob"]).name] += cost
                inclusive[current["fn"]] += cost
                after_call = False
                continue
            after_call = after_call or line.startswith("calls=")
            match = _NAME.match(line.rstrip("\n"))
            if match is None:
                continue
            kind, key, text = match.groups()
            kind = "fl" if kind in ("fi", "fe") else kind
            if text is not None:
                names[(kind, key)] = text
            if line[0] != "c" and kind in current:
                current[kind] = names.get((kind, key), "?")
    return own, inclusive


def breakdown(
    dumps: list[Path], sessions: int, count: int, unit: str = "session"
) -> list[str]:
    """Instructions per unit by library (own code), then OpenSSL calls (inclusive)."""
    by_library: dict[str, int] = {}
    api: dict[str, int] = {}
    for dump in dumps:
        own, inclusive = _costs(dump)
        for library, instructions in own.items():
            by_library[library] = by_library.get(library, 0) + instructions
        for function, instructions in inclusive.items():
            if _API.match(function):
                api[function] = api.get(function, 0) + instructions
    lines = [f"  by library (own code), M instructions per {unit}:"]
    for library, instructions in sorted(by_library.items(), key=lambda kv: -kv[1])[:8]:
        lines.append(f"    {instructions / sessions / 1e6:8.3f}  {library}")
    lines.append(f"  OpenSSL calls (inclusive), M instructions per {unit}:")
    for function, instructions in sorted(api.items(), key=lambda kv: -kv[1])[:count]:
        lines.append(f"    {instructions / sessions / 1e6:8.3f}  {function}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Measure the gateway and stock pyftpdlib; print instructions per session."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--uploads",
        action="store_true",
        help="count 4 KiB STORs in one session instead (--sessions of them)",
    )
    parser.add_argument("--top", type=int, default=15, help="OpenSSL calls to list")
    parser.add_argument("--keep", type=Path, help="keep the callgrind dumps here")
    parser.add_argument("--only", choices=("gateway", "pyftpdlib"))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is needed (apt-get install valgrind)", file=sys.stderr)
        return 2
    for line in driver.machine_lines():
        print(line)
    root = Path(tempfile.mkdtemp(prefix="ftpscost-"))
    out_dir = args.keep or root / "callgrind"
    out_dir.mkdir(parents=True, exist_ok=True)
    servers: list[driver.Server] = []
    try:
        space = driver.prepare_workspace(root, 1 << 20)
        names = [args.only] if args.only else ["gateway", "pyftpdlib"]
        for name in names:
            tag = f"{name}-{random.getrandbits(24):06x}"
            if name == "gateway":
                server = driver.start_gateway(
                    space,
                    wrapper=callgrind_wrapper(out_dir, tag, children=args.workers > 1),
                    workers=args.workers,
                )
            else:
                server = driver.start_reference(
                    space, wrapper=callgrind_wrapper(out_dir, tag, children=False)
                )
            servers.append(server)
            run = run_uploads if args.uploads else run_sessions
            unit = "upload" if args.uploads else "session"
            total, dumps = measure(server, out_dir, tag, args.sessions, run)
            print(
                f"{name}: {total / args.sessions / 1e6:.2f} M instructions per {unit}"
                f" ({args.sessions} {unit}s, {len(dumps)} process(es))"
            )
            for line in breakdown(dumps, args.sessions, args.top, unit):
                print(line)
            driver.stop_server(server)
    except driver.BenchError as err:
        print(f"measurement failed: {err}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            with contextlib.suppress(OSError):
                driver.stop_server(server)
        shutil.rmtree(root, ignore_errors=True)  # --keep dumps live elsewhere
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
