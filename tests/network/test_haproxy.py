"""Uploads through HAProxy (TCP mode) between network namespaces arrive whole (issue 3).

The gateway runs as ``python -m ftps_gateway serve`` in its own namespace, HAProxy
in another, the clients (curl on OpenSSL, the Go client of ``tests/clients/goftps``)
in a third; see ``netlab``. Every run uploads 200 files (``FTPS_NET_UPLOADS`` for
more) and every file on the gateway's disk is compared with what was sent: zero
truncated uploads, on TLS 1.3 as on TLS 1.2. The audit trail proves the path: every
session came from HAProxy's address. The Go client's data connections all resume the
control session; curl's do on TLS 1.2 but, on TLS 1.3, only the first of a session
(``test_curl_resumes_every_data_connection_of_a_session`` says why).

Needs root and ``ip netns``; skipped otherwise. HAProxy, curl and Go are installed
by ``scripts/test.sh``; a missing one fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from network import netlab
from support import goclient
from support.certificates import write_certificate
from support.credentials import PASSWORD, PASSWORD_HASH

pytestmark = [
    pytest.mark.network,
    pytest.mark.clients,
    pytest.mark.timeout(600),  # set-up and each client run have their own bounds
]

UPLOADS = int(os.environ.get("FTPS_NET_UPLOADS", "200"))
MIN_SIZE = 16 * 1024
MAX_SIZE = 256 * 1024
CLIENT_TIMEOUT = 300 + UPLOADS  # generous: other test runs share two cores


@dataclass
class Deployment:
    """The running lab: gateway behind HAProxy, and where to look at its results."""

    lab: netlab.Lab
    home: Path  # the user acme's home on the gateway
    ca_file: Path
    audit_path: Path  # the gateway's stdout: JSON audit lines

    @property
    def address(self) -> str:
        """The control address partners use (HAProxy's)."""
        return f"{netlab.BALANCER_PUBLIC_IP}:{netlab.CONTROL_PORT}"

    def audit_mark(self) -> int:
        """A position in the audit trail; ``audit_since`` reads what came after."""
        return self.audit_path.stat().st_size

    def audit_since(self, mark: int) -> list[dict[str, object]]:
        """Audit records written after ``mark``."""
        with self.audit_path.open("rb") as stream:
            stream.seek(mark)
            lines = stream.read().decode("utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def explain(self) -> str:
        """The gateway's and HAProxy's diagnostics, for assertion messages."""
        stderr_only = []
        for name in ("gateway", "haproxy"):
            path = self.lab.directory / f"{name}.stderr"
            text = path.read_text(encoding="utf-8", errors="replace")
            stderr_only.append(f"--- {name} stderr ---\n{text[-5000:]}")
        return "\n".join(stderr_only)


def gateway_config(directory: Path, cert: Path, key: Path) -> Path:
    """A gateway.toml for the server namespace; 227 replies name HAProxy's address."""
    low, high = netlab.PASSIVE_PORTS
    path = directory / "gateway.toml"
    path.write_text(
        f"""\
[server]
listen = ["{netlab.SERVER_IP}:{netlab.CONTROL_PORT}"]
[tls]
certificate = "{cert}"
private_key = "{key}"
[passive]
ports = "{low}-{high}"
address = "{netlab.BALANCER_PUBLIC_IP}"
[storage]
root = "{directory / "storage"}"
[[users]]
name = "acme"
password = "{PASSWORD_HASH}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def deployment(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Namespaces, gateway and HAProxy for this module; all removed on every exit."""
    unavailable = netlab.unavailable_reason()
    if unavailable is not None:
        pytest.skip(unavailable)
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy is missing: install it (scripts/test.sh does)")
    directory = tmp_path_factory.mktemp("netlab")
    cert, key, ca_file = write_certificate(ca, directory, [netlab.BALANCER_PUBLIC_IP])
    config = gateway_config(directory, cert, key)

    lab = netlab.Lab(directory)
    with netlab.sigterm_interrupts():
        try:
            lab.create()
            serve = [sys.executable, "-m", "ftps_gateway", "serve", "--config"]
            audit_path = lab.start(lab.server, [*serve, str(config)], "gateway")
            haproxy_cfg = netlab.haproxy_config(directory / "haproxy.cfg")
            lab.start(lab.balancer, [haproxy, "-db", "-f", str(haproxy_cfg)], "haproxy")
            try:
                lab.wait_for_banner(netlab.BALANCER_PUBLIC_IP, netlab.CONTROL_PORT)
            except netlab.LabError as err:
                pytest.fail(f"{err}\n{lab.log('gateway')}\n{lab.log('haproxy')}")
            yield Deployment(
                lab, directory / "storage" / "home" / "acme", ca_file, audit_path
            )
        finally:
            # Also runs on KeyboardInterrupt: pytest tears fixtures down on Ctrl-C.
            lab.close()


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go FTPS client, built from source (shared with the loopback tests)."""
    return goclient.build(tmp_path_factory.getbasetemp() / "goftps-build")


def check_audit(
    records: list[dict[str, object]],
    uploads: int,
    version: str,
    *,
    all_resumed: bool = True,
    refused: frozenset[str] = frozenset(),
) -> list[str]:
    """What the gateway's audit trail says went wrong in one client run.

    ``refused`` names the uploads that must have failed (all others must have
    completed). ``all_resumed=False`` leaves resumption out.
    """
    problems = []
    clients = {r.get("client_ip") for r in records if r["event"] == "connect"}
    if clients != {netlab.BALANCER_PRIVATE_IP}:
        problems.append(f"sessions came from {clients}, not only from HAProxy")
    data = [
        r
        for r in records
        if r["event"] == "tls_established" and r.get("channel") == "data"
    ]
    if len(data) != uploads:
        problems.append(f"{len(data)} data connections, {uploads} expected")
    versions = {r["version"] for r in data}
    if versions != {version}:
        problems.append(f"data connections used {versions}, not {version}")
    not_resumed = [r for r in data if r["resumed"] is not True]
    if all_resumed and not_resumed:
        problems.append(f"{len(not_resumed)} data connections did not resume")
    completed = [r for r in records if r["event"] == "upload_completed"]
    if len(completed) != uploads - len(refused):
        problems.append(
            f"{len(completed)} uploads completed, {uploads - len(refused)} expected"
        )
    failed = {
        str(r["path"]).lstrip("/") for r in records if r["event"] == "upload_failed"
    }
    if failed != refused:
        problems.append(f"uploads failed: {sorted(failed)}, expected {sorted(refused)}")
    return problems


CURL_VARIANTS = {
    # (curl options, TLS version seen); the TLS 1.2 run also takes PASV and trusts
    # its address, which only works if the gateway advertises HAProxy's address.
    "tls1.3-epsv": (["--tlsv1.3"], "TLSv1.3"),
    "tls1.2-pasv": (
        ["--tls-max", "1.2", "--disable-epsv", "--no-ftp-skip-pasv-ip"],
        "TLSv1.2",
    ),
}


def run_curl(
    deployment: Deployment,
    tmp_path: Path,
    prefix: str,
    options: list[str],
    count: int = UPLOADS,
) -> tuple[subprocess.CompletedProcess[str], list[Path], str]:
    """Upload the recipe's files with one curl process in the client namespace.

    Credentials and the url/upload-file pairs go in a config file: one curl process,
    one control connection, a data connection per file. Returns curl's result, the
    local files and an explanation for assertion messages.
    """
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is missing: install it (scripts/test.sh does)")
    payloads = goclient.write_payloads(
        tmp_path / "payloads", prefix, count, MIN_SIZE, MAX_SIZE
    )
    config = tmp_path / "curl.conf"
    lines = [f'user = "acme:{PASSWORD}"']
    for path in payloads:
        lines += [
            f'url = "ftp://{deployment.address}/{path.name}"',
            f'upload-file = "{path}"',
        ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config.chmod(0o600)
    result = deployment.lab.run(
        deployment.lab.client,
        [
            curl, "--silent", "--show-error", "--verbose",
            "--ssl-reqd", "--cacert", str(deployment.ca_file),
            "--connect-timeout", "30", "--max-time", str(CLIENT_TIMEOUT),
            "--write-out", "%{response_code} %{size_upload}\\n",
            *options, "--config", str(config),
        ],
        timeout=CLIENT_TIMEOUT + 30,
    )  # fmt: skip
    # The whole transcript stays behind for a post-mortem; messages show its tail.
    (tmp_path / "curl.stderr").write_text(result.stderr, encoding="utf-8")
    why = (
        f"command: {result.args}\nexit code: {result.returncode}\n"
        f"full transcript: {tmp_path / 'curl.stderr'}\n"
        f"--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
        f"--- stderr (tail) ---\n{result.stderr[-6000:]}\n{deployment.explain()}"
    )
    return result, payloads, why


@dataclass(frozen=True)
class CurlTransfer:
    """One STOR as curl's verbose transcript tells it."""

    name: str
    close_notify_sent: bool  # curl logged its close_notify alert on the data link
    final_reply: str  # e.g. "226"; "" if none was logged


_STOR = re.compile(r"^> STOR (\S+)$", re.MULTILINE)
_REPLY = re.compile(r"^< ([2-5]\d\d) ", re.MULTILINE)


def curl_transfers(transcript: str) -> list[CurlTransfer]:
    """Split curl's ``--verbose`` output into one record per STOR."""
    starts = list(_STOR.finditer(transcript))
    transfers = []
    for number, match in enumerate(starts):
        end = starts[number + 1].start() if number + 1 < len(starts) else None
        part = transcript[match.end() : end]
        # curl logs "We are completely uploaded" only when its last write was
        # whole; when its shutdown fails it may not, and the reply follows anyway.
        _, found, after_upload = part.partition("We are completely uploaded")
        if not found:
            after_upload = part
        replies = _REPLY.findall(after_upload)
        transfers.append(
            CurlTransfer(
                match.group(1),
                "(OUT), TLS alert, close notify" in after_upload,
                replies[0] if replies else "",
            )
        )
    return transfers


@pytest.mark.parametrize("variant", list(CURL_VARIANTS))
def test_curl_uploads_through_haproxy_arrive_whole(
    deployment: Deployment, tmp_path: Path, variant: str
) -> None:
    """curl uploads 200 files through HAProxy in one session: every upload curl
    closed properly arrives whole; none is ever stored truncated.

    curl 7.88 sometimes closes a data connection without its close_notify (its
    ``ossl_close`` does not retry an ``SSL_shutdown`` that would block; curl issue
    11383). The gateway cannot tell such an upload from a truncated one, so it
    answers 426 and stores nothing: that outcome is checked too, per file.
    """
    options, version = CURL_VARIANTS[variant]
    prefix = f"curl-{variant}-"
    mark = deployment.audit_mark()
    result, payloads, why = run_curl(deployment, tmp_path, prefix, options)
    transfers = curl_transfers(result.stderr)
    assert [t.name for t in transfers] == [p.name for p in payloads], why
    unclosed = {t.name for t in transfers if not t.close_notify_sent}
    # curl exits with the result of its last transfer: 18 ("partial file") if the
    # server refused to keep that one.
    assert result.returncode == (18 if transfers[-1].name in unclosed else 0), why
    expected = goclient.expected_uploads(prefix, UPLOADS, MIN_SIZE, MAX_SIZE)
    # The server's reply to each upload follows from how curl ended it, and curl
    # sent every byte each time.
    assert [t.final_reply for t in transfers] == [
        "426" if t.name in unclosed else "226" for t in transfers
    ], why
    assert result.stdout.splitlines() == [
        f"{'426' if p.name in unclosed else '226'} {expected[p.name].size}"
        for p in payloads
    ], why
    assert set(re.findall(r"SSL connection using (TLSv[\d.]+)", result.stderr)) == {
        version
    }, why
    # One control connection, then one data connection per file.
    assert len(re.findall(r"^\* Connected to ", result.stderr, re.MULTILINE)) == (
        UPLOADS + 1
    ), why
    # On disk: every properly closed upload whole, the others absent, no leftovers.
    kept = {name: want for name, want in expected.items() if name not in unclosed}
    assert goclient.disk_problems(deployment.home, prefix, kept) == [], why
    records = deployment.audit_since(mark)
    assert (
        check_audit(
            records, UPLOADS, version, all_resumed=False, refused=frozenset(unclosed)
        )
        == []
    ), why


@pytest.mark.parametrize("variant", ["tls1.3-epsv", "tls1.2-pasv"])
def test_curl_resumes_every_data_connection_of_a_session(
    deployment: Deployment,
    tmp_path: Path,
    variant: str,
) -> None:
    """Every data connection of one curl session with several uploads resumes the
    control session's TLS session (as ``reuse = "required"`` demands).

    On TLS 1.3 this needs the fresh control-connection ticket after each data
    connection (``tls.TicketRefresher``): OpenSSL 3 clients use a ticket once, and
    data connections carry none.
    """
    options, version = CURL_VARIANTS[variant]
    count = 5
    mark = deployment.audit_mark()
    result, _, why = run_curl(
        deployment, tmp_path, f"resume-{variant}-", options, count=count
    )
    assert result.returncode == 0, why
    data = [
        r
        for r in deployment.audit_since(mark)
        if r["event"] == "tls_established" and r.get("channel") == "data"
    ]
    assert [r["version"] for r in data] == [version] * count, why
    assert [r["resumed"] for r in data] == [True] * count, why


GO_VARIANTS = {
    "tls1.3-epsv": ("1.3", False, "TLSv1.3"),
    "tls1.2-pasv": ("1.2", True, "TLSv1.2"),
}


@pytest.mark.parametrize("variant", list(GO_VARIANTS))
def test_go_uploads_through_haproxy_arrive_whole(
    deployment: Deployment, go_client: Path, tmp_path: Path, variant: str
) -> None:
    """The Go client (writes, closes, never reads) uploads 200 files through HAProxy;
    all arrive whole."""
    tls_max, pasv, version = GO_VARIANTS[variant]
    prefix = f"go-{variant}-"
    mark = deployment.audit_mark()
    result = goclient.run(
        go_client,
        addr=deployment.address,
        ca_file=deployment.ca_file,
        password_file=goclient.password_file(tmp_path, PASSWORD),
        count=UPLOADS, min_size=MIN_SIZE, max_size=MAX_SIZE, prefix=prefix,
        tls_max=tls_max, resume=True, sessions=2, pasv=pasv,
        wrapper=tuple(deployment.lab.exec_argv(deployment.lab.client, [])),
        timeout=CLIENT_TIMEOUT,
    )  # fmt: skip
    why = result.explain() + "\n" + deployment.explain()
    summary = result.summary
    assert result.returncode == 0, why
    assert summary["failures"] == [], why
    assert summary["uploads_ok"] == UPLOADS, why
    assert {u["tls_version"] for u in summary["uploads"]} == {version}, why
    assert all(u["resumed"] for u in summary["uploads"]), why

    expected = goclient.expected_uploads(prefix, UPLOADS, MIN_SIZE, MAX_SIZE)
    assert goclient.disk_problems(deployment.home, prefix, expected) == [], why
    assert check_audit(deployment.audit_since(mark), UPLOADS, version) == [], why
