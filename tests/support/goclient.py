"""Build and drive the Go FTPS client of ``tests/clients/goftps``; check what it stored.

The client is standard-library Go (Debian 12's golang-go, Go 1.19), built offline
(``GOPROXY=off``) with its caches in a temporary directory. It uploads files whose
names, sizes and contents follow a fixed recipe; ``expected_uploads`` recomputes them
here, independently of what the client reports, so a truncated or altered file on
disk is caught even if client and server both claimed success.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

GO_SOURCE = Path(__file__).resolve().parents[1] / "clients" / "goftps"
BUILD_TIMEOUT = 600  # a cold build compiles crypto/tls and friends: ~10 s on 2 cores
SIZE_STEP = 2654435761  # Knuth's multiplicative hash; spreads sizes over the range


def build(directory: Path) -> Path:
    """Build the client into ``directory`` (once per directory) and return its path.

    Fails, rather than skips, without ``go``: ``scripts/test.sh`` installs golang-go,
    so a missing toolchain means a broken test environment, not an optional extra.
    """
    binary = directory / "goftps"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain is missing: install golang-go (scripts/test.sh does) "
            "to build tests/clients/goftps"
        )
    env = {
        **os.environ,
        "GOCACHE": str(directory / "gocache"),
        "GOPATH": str(directory / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",  # standard library only: nothing may be fetched
        "GOSUMDB": "off",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",  # a static binary, independent of the namespace's libc
    }
    result = subprocess.run(
        [go, "build", "-trimpath", "-o", str(binary), "."],
        cwd=GO_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"go build failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return binary


def size_of(index: int, min_size: int, max_size: int) -> int:
    """The size of file ``index``; mirrors ``sizeOf`` in main.go."""
    return min_size + (index * SIZE_STEP) % (max_size - min_size + 1)


def content(name: str, size: int) -> bytes:
    """The bytes of the file called ``name``; mirrors ``fillContent`` in main.go."""
    blocks = -(-size // hashlib.sha512().digest_size)
    data = b"".join(
        hashlib.sha512(f"{name}:{block}".encode()).digest() for block in range(blocks)
    )
    return data[:size]


@dataclass(frozen=True)
class Expected:
    """What one uploaded file must look like on the server's disk."""

    size: int
    sha256: str


def expected_uploads(
    prefix: str, count: int, min_size: int, max_size: int
) -> dict[str, Expected]:
    """Names, sizes and SHA-256 digests of the files a run uploads."""
    expected = {}
    for index in range(count):
        name = f"{prefix}{index:05d}.bin"
        data = content(name, size_of(index, min_size, max_size))
        expected[name] = Expected(len(data), hashlib.sha256(data).hexdigest())
    return expected


def write_payloads(
    directory: Path, prefix: str, count: int, min_size: int, max_size: int
) -> list[Path]:
    """Write the recipe's files to ``directory`` (for clients that read local files)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        name = f"{prefix}{index:05d}.bin"
        path = directory / name
        path.write_bytes(content(name, size_of(index, min_size, max_size)))
        paths.append(path)
    return paths


def disk_problems(home: Path, prefix: str, expected: dict[str, Expected]) -> list[str]:
    """Every way the files named ``prefix*`` in ``home`` differ from ``expected``.

    Also reports hidden leftovers (upload temporaries) of any name: uploads are over
    when this runs, so one that is still there was neither committed nor discarded.
    """
    problems = []
    present = {path.name: path for path in home.iterdir()}
    for name, want in sorted(expected.items()):
        path = present.get(name)
        if path is None:
            problems.append(f"{name}: missing")
            continue
        data = path.read_bytes()
        if len(data) != want.size:
            problems.append(f"{name}: {len(data)} bytes on disk, {want.size} sent")
        elif hashlib.sha256(data).hexdigest() != want.sha256:
            problems.append(f"{name}: right size, wrong content")
    problems.extend(
        f"{name}: not uploaded by this run"
        for name in sorted(present)
        if name.startswith(prefix) and name not in expected
    )
    problems.extend(
        f"{name}: leftover temporary file" for name in present if name.startswith(".")
    )
    return problems


@dataclass
class GoRun:
    """One run of the Go client: its exit code, JSON summary and diagnostics."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, Any] = field(default_factory=dict)

    def explain(self, limit: int = 20) -> str:
        """The command, exit code, failures (at most ``limit``) and stderr."""
        failures = self.summary.get("failures", [])
        shown = json.dumps(failures[:limit], indent=1)
        return (
            f"command: {self.argv}\nexit code: {self.returncode}\n"
            f"session errors: {self.summary.get('session_errors')}\n"
            f"failures ({len(failures)}, first {limit}): {shown}\n"
            f"--- stderr ---\n{self.stderr}"
            + ("" if self.summary else f"\n--- stdout ---\n{self.stdout}")
        )


def run(
    binary: Path,
    *,
    addr: str,
    ca_file: Path,
    password_file: Path,
    count: int,
    min_size: int,
    max_size: int,
    prefix: str,
    tls_max: str = "1.3",
    resume: bool = True,
    sessions: int = 1,
    pasv: bool = False,
    user: str = "acme",
    wrapper: tuple[str, ...] = (),
    timeout: float = 600,
) -> GoRun:
    """Run the client (inside ``wrapper``, e.g. ``ip netns exec NS``) and parse it."""
    argv = [
        *wrapper, str(binary),
        "-addr", addr, "-user", user, "-password-file", str(password_file),
        "-cafile", str(ca_file), "-count", str(count),
        "-min-size", str(min_size), "-size", str(max_size),
        "-sessions", str(sessions), "-tls-max", tls_max, "-prefix", prefix,
        "-timeout", "60s",
    ]  # fmt: skip
    if resume:
        argv.append("-resume")
    if pasv:
        argv.append("-pasv")
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )
    go_run = GoRun(argv, result.returncode, result.stdout, result.stderr)
    try:
        go_run.summary = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"the Go client printed no JSON summary\n{go_run.explain()}")
    return go_run


def password_file(directory: Path, password: str) -> Path:
    """The password in a mode-0600 file, for ``-password-file``."""
    path = directory / "go-password"
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path
